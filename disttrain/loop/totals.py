"""An epoch's running totals on this process, made global with ONE all-reduce.

The epoch end, the step logs and the checkpoints all need the same thing: the sums over the epoch so
far of what the step returned, the count of real (unmasked) examples, the wall time and the metrics'
states, summed over every process. :class:`EpochTotals` keeps this process's share and packs it into
one float64 vector ``[step sums..., seconds, real examples, metric states...]``, so each of them costs
exactly one collective.

A resumed run continues an epoch from a checkpoint: the global sums saved then (a :class:`Carry`) are
added once, by the chief, to every reduction of that epoch, so the epoch's numbers cover the steps
before the stop too.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from disttrain import metrics as metrics_lib
from disttrain.backends import Backend

#: The count of real examples in a step's outputs, for padded (masked) input.
EXAMPLES = "__examples__"


@dataclasses.dataclass(frozen=True)
class Carry:
    """Global sums of an unfinished epoch, saved in a checkpoint and added back on resume.

    Attributes:
      sums: ``{output name: sum over the steps done and all replicas}``.
      real: Real (unmasked) examples seen.
      states: The metrics' states summed over every process (the layout of
        :func:`disttrain.metrics.pack_local_states`), or empty.
      num_replicas: Replicas of the run that saved it (``mean`` states are rescaled to the new count).
    """

    sums: dict[str, float]
    real: float = 0.0
    states: tuple[float, ...] = ()
    num_replicas: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"sums": self.sums, "real": self.real, "states": list(self.states),
                "num_replicas": self.num_replicas}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Carry":
        return cls(sums={str(k): float(v) for k, v in value["sums"].items()}, real=float(value["real"]),
                   states=tuple(float(v) for v in value["states"]), num_replicas=int(value["num_replicas"]))


@dataclasses.dataclass(frozen=True)
class Reduced:
    """One reduction's result, identical on every process.

    Attributes:
      sums: ``{output name: sum over the epoch's steps so far and every replica}``.
      seconds: Wall seconds summed over the processes (divide by ``backend.size`` for the mean).
      real: Real (unmasked) examples seen by every process together.
      metrics: ``{metric name: result}`` from the merged states (non-scalar results flattened).
      states: The summed metric state vector (what a :class:`Carry` keeps).
    """

    sums: dict[str, float]
    seconds: float
    real: float
    metrics: dict[str, float]
    states: np.ndarray


class EpochTotals:
    """This process's running sums over one epoch, and their global reduction.

    Args:
      backend: The backend.
      metrics: Keras metrics whose states are reduced with the sums (reset by the caller).
      carry: Global sums of the same epoch saved by a checkpoint (a resumed run), or None.

    Raises:
      ValueError: If ``carry`` holds metric states of another layout (the metrics changed).
    """

    def __init__(self, *, backend: Backend, metrics: Sequence[keras.metrics.Metric] = (),
                 carry: Carry | None = None):
        self.backend = backend
        self.metrics = list(metrics)
        self.sums: dict[str, Any] = {}  # numpy scalars (or tensors of outputs on a device)
        self.real: Any = np.float64(0.0)
        self._layout, self._pack, self._results = _compiled(backend, self.metrics)
        self._carry = carry
        if carry is not None:
            self.sums = {name: np.float32(0.0) for name in carry.sums}
            if len(carry.states) != self._layout.size:
                raise ValueError(f"the checkpoint holds {len(carry.states)} metric state values, the trainer's "
                                 f"metrics {[m.name for m in self.metrics]} have {self._layout.size}; resume "
                                 "with the metrics the run was saved with")

    def add(self, outputs: dict[str, tf.Tensor]) -> None:
        """Adds one call's outputs (summed over its steps and this process's replicas); pops :data:`EXAMPLES`.

        Each sum adds in its output's own dtype (float32; the count of real examples in float64), so it is
        the same number as adding the tensors. Outputs in host memory are added as numpy scalars: an eager
        op per output and call costs more than a tiny model's step. Device outputs stay tensors (adding
        them does not wait for the step)."""
        outputs = dict(outputs)
        if EXAMPLES in outputs:
            real = outputs.pop(EXAMPLES)
            self.real = (self.real + np.asarray(real).astype(np.float64)) if _on_host(real) else \
                (tf.cast(real, tf.float64) + self.real)
        outputs = {k: np.asarray(v) if _on_host(v) else v for k, v in outputs.items()}
        if not self.sums:
            self.sums = outputs
            return
        missing = set(outputs) ^ set(self.sums)
        if missing:
            raise ValueError(f"the step returned {sorted(outputs)} but earlier steps of this epoch returned "
                             f"{sorted(self.sums)}; return the same names at every step")
        self.sums = {k: self.sums[k] + v for k, v in outputs.items()}

    def reduce(self, *, seconds: float = 0.0) -> Reduced:
        """Sums everything over all processes (ONE all-reduce; every process must call it together)."""
        names = sorted(self.sums)
        if self._layout.size:
            local = self._pack([tf.convert_to_tensor(self.sums[n]) for n in names], tf.constant(seconds, tf.float64),
                               tf.convert_to_tensor(self.real, tf.float64))
        else:  # no metric states: the same float64 vector without a compiled call
            local = tf.constant(np.array([np.asarray(self.sums[n]) for n in names] + [seconds, np.asarray(self.real)],
                                         np.float64).reshape(-1))
        if self._carry is not None and self.backend.is_chief:
            local = local + self._carry_vector(names)
        summed = self.backend.all_reduce(local, "sum")
        values = np.asarray(summed)
        head = len(names)
        states = summed[head + 2:]
        metrics = metrics_lib.flat_results(self._results(states)) if self._layout.slots else {}
        metrics_lib.warn_never_updated(self.backend, self._layout, values[head + 2:])
        return Reduced(sums={n: float(v) for n, v in zip(names, values[:head])}, seconds=float(values[head]),
                       real=float(values[head + 1]), metrics=metrics, states=values[head + 2:])

    def carry(self) -> Carry:
        """The global sums so far, for a checkpoint (one all-reduce)."""
        reduced = self.reduce()
        return Carry(sums=reduced.sums, real=reduced.real, states=tuple(float(v) for v in reduced.states),
                     num_replicas=self.backend.num_replicas)

    def _carry_vector(self, names: list[str]) -> tf.Tensor:
        carry = self._carry
        states = np.asarray(carry.states, np.float64)
        offset = 0
        for slot in self._layout.slots:  # "mean" states are divided by the replica count when read
            if slot.aggregation == "mean":
                states[offset:offset + slot.size] *= self.backend.num_replicas / carry.num_replicas
            offset += slot.size
        head = [carry.sums.get(n, 0.0) for n in names] + [0.0, carry.real]
        return tf.constant(np.concatenate([np.asarray(head, np.float64), states]))


def _on_host(value: Any) -> bool:
    """Whether ``value`` (a step output) is in host memory: a CPU tensor or not a tensor at all."""
    return not isinstance(value, tf.Tensor) or ":CPU:" in value.device


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(backend: Backend, metrics: list[keras.metrics.Metric]) -> tuple:
    """``(layout, pack, results)`` for ``metrics``, compiled once per metric list (keyed by its first
    metric). Packing the states and computing the results are many small ops: compiled, each is one call."""
    key = metrics[0] if metrics else backend
    cached = _COMPILED.get(key)
    if cached is not None and cached[0] == [id(m) for m in metrics]:
        return cached[1]
    _, layout = metrics_lib.pack_local_states(backend, metrics)

    @tf.function
    def pack(sums: list, seconds: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
        head = [tf.cast(t, tf.float64) for t in sums] + [seconds, real]
        return tf.concat([tf.stack(head), metrics_lib.pack_local_states(backend, metrics)[0]], 0)

    @tf.function
    def results(summed: tf.Tensor) -> dict:
        return metrics_lib.result_tensors(backend, layout, summed)

    _COMPILED[key] = ([id(m) for m in metrics], (layout, pack, results))
    return layout, pack, results
