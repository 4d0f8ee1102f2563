"""The compiled steps: the user's step function on every replica, one or several steps per call.

:func:`compile_steps` wraps ``step(ctx, batch)`` in ``tf.function`` s that run it on every local replica
through the backend and sum the outputs over this process's replicas (no communication; the trainer
reduces over processes once per epoch or log step):

* ``run(iterator, control, mark)``: one step on the iterator's next input;
* ``run_many(iterator, count, control, mark)``: ``count`` steps in one call (a ``tf.while_loop``; ``count``
  is a tensor, so any count up to ``steps_per_execution`` reuses one trace), returning the sums of
  the steps' outputs: what ``fit(steps_per_execution=K)`` runs;
* ``run_batch(batch, control, mark)``: one step on a batch fetched (and agreed on) outside, for pipelines
  of unknown length.

``control`` (checkpointing's stop/save flags, see :mod:`disttrain.checkpoint`) is all-reduced (max)
once per call beside the steps, and returned with the outputs; None leaves it out. ``mark`` (an int64
tensor, or None) is the value the stall watchdog's in-graph marks take in this call (see
:class:`disttrain.watchdog.GradientMarker`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import tensorflow as tf

from disttrain.input import data as data_lib
from disttrain import nonfinite
from disttrain.backends import Backend
from disttrain.loop.step_context import StepContext
from disttrain.loop.totals import EXAMPLES

#: Step output: the share of steps whose update was skipped (see :mod:`disttrain.nonfinite`).
NONFINITE = nonfinite.NONFINITE


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The compiled functions of one step variant (see the module docs), and their step context."""

    run: Callable
    run_many: Callable
    run_batch: Callable
    ctx: StepContext


class StepResult(NamedTuple):
    """What one call of a compiled step gives back, whatever its variant.

    Attributes:
      outputs: ``{name: tensor}``: the step outputs summed over this process's replicas (and over the
        call's steps).
      grads: ``{variable path: local gradient}`` for a variant compiled with ``gradients=True``, else None.
      control: Checkpointing's flags maximised over every process when the call was given ``control``,
        else None.
    """

    outputs: dict
    grads: dict | None
    control: Any

    @classmethod
    def of(cls, value: Any, *, gradients: bool, control: bool) -> "StepResult":
        """The result of a call that returned ``value``.

        Args:
          value: What the compiled function returned: ``outputs`` or ``(outputs, grads)``, inside
            ``(..., control)`` when it was given control flags.
          gradients: The variant returns gradients.
          control: The call was given control flags.
        """
        flags = None
        if control:
            value, flags = value
        outputs, grads = value if gradients else (value, None)
        return cls(outputs=outputs, grads=grads, control=flags)


def check_micro_batches(global_batch_size: int, *, replicas: int, accumulation_steps: int) -> None:
    """Checks that each replica's share of the global batch splits into ``accumulation_steps`` micro-batches.

    Raises:
      ValueError: If it does not, naming the multiple to use.
    """
    per_replica = global_batch_size // replicas
    if per_replica % accumulation_steps:
        raise ValueError(f"global batch {global_batch_size} gives {per_replica} examples a replica, which do not "
                         f"split into accumulation_steps={accumulation_steps} micro-batches; use a multiple of "
                         f"{replicas * accumulation_steps}")


def check_accumulation_steps(value: Any) -> int:
    """Checks ``Trainer(accumulation_steps=...)``; returns it as an int.

    Raises:
      ValueError: Unless it is an integer >= 1.
    """
    if int(value) != value or value < 1:
        raise ValueError(f"accumulation_steps={value!r} must be an integer >= 1 (1 = no accumulation)")
    return int(value)

def named_gradients(pairs: list) -> dict[str, tf.Tensor]:
    """``{variable path: gradient}`` (a repeated variable gets a ``_<index>`` suffix)."""
    grads: dict[str, tf.Tensor] = {}
    for i, (variable, grad) in enumerate(pairs):
        name = getattr(variable, "path", None) or variable.name
        grads[name if name not in grads else f"{name}_{i}"] = tf.convert_to_tensor(grad)
    return grads


def micro_batches(batch: Any, count: int) -> list:
    """``batch`` (a structure of tensors) split along the first axis into ``count`` equal parts."""
    flat = tf.nest.flatten(batch)
    parts = [tf.split(t, count) for t in flat]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in parts]) for i in range(count)]


def as_outputs(value: Any) -> dict[str, tf.Tensor]:
    """What a step returned, as ``{name: float32 tensor}`` (a lone value is the ``loss``)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): tf.cast(tf.convert_to_tensor(v), tf.float32) for k, v in value.items()}
    return {"loss": tf.cast(tf.convert_to_tensor(value), tf.float32)}


def _share(value: tf.Tensor, parts: int) -> tf.Tensor:
    """``value / parts`` (no op for one part: x / 1 is x)."""
    return value if parts == 1 else value / parts


def autograph(step: Callable) -> Callable:
    """``step`` with AutoGraph applied, as ``tf.function`` would (Python ``if``/``for``/``while`` on tensors
    work in it, and in the functions it calls); a callable AutoGraph cannot convert (no source, e.g.) is
    traced as written, as ``tf.function`` does. disttrain's own wrappers around it are not converted:
    converting them took about 1 s of every trace (3.5 of the 4.7 s from start-up to the first step)."""
    try:
        return tf.autograph.to_graph(step)
    except Exception:  # noqa: BLE001 - whatever AutoGraph refuses runs unconverted, as under tf.function
        return step


def compile_steps(*, step: Callable, backend: Backend, global_batch_size: int, gradients: bool = False,
                  masked: bool = False, accumulation_steps: int = 1, marker: Any = None,
                  on_nonfinite: str = "ignore") -> CompiledSteps:
    """Compiles ``step(ctx, batch)`` for every local replica.

    Args:
      step: The user's step function.
      backend: The backend.
      global_batch_size: Examples per step over all replicas (for ``ctx.average_loss``).
      gradients: Also return ``{variable path: local gradient}`` (summed over the local replicas) of
        what the step applied: ``(outputs, gradients)`` (one step per call only).
      masked: The batches carry a padding mask: the outputs count the real examples under ``EXAMPLES``.
      accumulation_steps: Split each replica's batch into this many micro-batches whose gradients are
        summed and applied once (see ``StepContext.run_accumulated``).
      marker: The stall watchdog's :class:`disttrain.watchdog.GradientMarker`, or None.
      on_nonfinite: What ``ctx.apply_gradients`` does about non-finite values (see
        :mod:`disttrain.nonfinite`); its flags come back under ``nonfinite.FLAGS``, and with ``skip`` a
        skipped step's values are left out (zeros, counted under ``nonfinite.DROPPED``).
    """
    ctx = StepContext(backend=backend, global_batch_size=global_batch_size, marker=marker,
                      on_nonfinite=on_nonfinite)
    user_step = autograph(step)

    def one_step(batch):
        outputs = as_outputs(user_step(ctx, batch))
        if masked:
            outputs[EXAMPLES] = tf.reduce_sum(tf.cast(data_lib.mask_of(batch), tf.float32))
        return outputs

    def outputs_of(batch):
        if accumulation_steps == 1:
            outputs = one_step(batch)
        else:
            # Global-batch-scaled outputs (ctx.average_loss) of the micro-batches add up to the batch's.
            results = ctx.run_accumulated(one_step, micro_batches(batch, accumulation_steps))
            outputs = {name: tf.add_n([r[name] for r in results]) for name in results[0]}
        flags = ctx.take_flags()
        if flags is not None:  # identical on every replica; summed over this process's replicas
            if on_nonfinite == "skip":  # a skipped step's (non-finite) values are left out of the means
                dropped = flags[-1]
                was_dropped = dropped > 0
                outputs = {k: tf.where(was_dropped, tf.zeros_like(v), v) for k, v in outputs.items()}
                outputs[nonfinite.DROPPED] = _share(dropped, ctx.num_replicas)
            outputs[nonfinite.FLAGS] = _share(flags, backend.local_replicas)
        skipped = ctx.take_nonfinite()
        if skipped is not None:  # summed over the replicas, each counts 1/num_replicas
            outputs[NONFINITE] = _share(skipped, ctx.num_replicas)
        return outputs

    @tf.autograph.experimental.do_not_convert  # (tf.distribute would convert it, and all it calls)
    def replica_fn(batch, mark):
        batch = ctx.begin_trace(mark, batch)
        if not gradients:
            return outputs_of(batch)
        with ctx.capturing_gradients() as captured:
            outputs = outputs_of(batch)
        return outputs, named_gradients(captured)

    def on_replicas(batch, mark):
        return tf.nest.map_structure(backend.local_sum, backend.run(replica_fn, args=(batch, mark)))

    def with_control(outputs, control):
        if control is None:
            return outputs
        # The stop/save flags of every process, in one small all-reduce beside the step's own.
        return outputs, backend.reduce_across_processes(control, "max")

    @tf.function(autograph=False)
    def run(iterator, control=None, mark=None):
        return with_control(on_replicas(next(iterator), mark), control)

    @tf.function(autograph=False)
    def run_many(iterator, count, control=None, mark=None):
        def more(i, outputs):
            return i + 1, tf.nest.map_structure(tf.add, outputs, on_replicas(next(iterator), mark))

        first = on_replicas(next(iterator), mark)
        _, outputs = tf.while_loop(lambda i, _: i < count - 1, more, (tf.zeros_like(count), first))
        return with_control(outputs, control)

    @tf.function(autograph=False)
    def run_batch(batch, control=None, mark=None):
        return with_control(on_replicas(batch, mark), control)

    return CompiledSteps(run=run, run_many=run_many, run_batch=run_batch, ctx=ctx)
