"""What the training loop does per compiled call, kept cheap: on a small model it is a share of the step.

* :class:`ConcreteCalls` calls ``run`` / ``run_many`` through their concrete functions. A ``tf.function``
  call matches its arguments against its traces every time (the iterator's type spec, each keyword's
  default, a function-type hash): 0.1-0.2 ms a call on 2 cores, as much as a whole step of a tiny model.
  Within an epoch the arguments keep their types (the same iterator; control flags and a watchdog mark of
  fixed shape and dtype, or None; a count tensor), so the concrete function the first call finds serves
  every later call of that epoch. It runs the same graph: only the Python that picks it is skipped.
* :func:`call_length`: how many steps the next call of ``fit(steps_per_execution=K)`` runs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf


class ConcreteCalls:
    """Calls ``fn(iterator, *rest)`` for one epoch's iterator through ``fn``'s concrete function.

    One object per epoch (it keeps the epoch's concrete functions, and nothing once it is dropped). An
    argument that is None is part of the trace (a ``Literal[None]``), so which ones are None is part of
    the key; tensors only need the same shape and dtype, which ``run`` / ``run_many`` keep.
    """

    def __init__(self):
        self._concrete: dict[tuple, Callable] = {}
        self._counts: dict[int, tf.Tensor] = {}

    def count(self, count: int) -> tf.Tensor:
        """``count`` as the int32 tensor ``run_many`` takes (one constant per count, not one per call)."""
        tensor = self._counts.get(count)
        if tensor is None:
            tensor = self._counts[count] = tf.constant(count)
        return tensor

    def __call__(self, fn: Any, iterator: Any, *rest: Any) -> Any:
        key = (fn, id(iterator), tuple(a is None for a in rest))
        concrete = self._concrete.get(key)
        if concrete is None:
            if tf.config.functions_run_eagerly():  # debugging: the Python step runs as Python
                return fn(iterator, *rest)
            # Traces (or finds the trace) as a call would; a tracing error surfaces here, as from a call.
            concrete = self._concrete[key] = fn.get_concrete_function(iterator, *rest)
        return concrete(iterator, *rest)


def call_length(*, step: int, steps_per_execution: int, remaining: int, intervals: Any = None,
                checkpoint_every_steps: int | None = None, drift_every_steps: int = 0) -> int:
    """Steps the next call runs: up to ``steps_per_execution`` and ``remaining``, ending exactly at the next
    step that logs, checkpoints, checks for drift or ends the epoch (and just before a step that records
    gradients).

    Args:
      step: The global step before the call.
      steps_per_execution: The most steps a call may run.
      remaining: Steps left in the epoch.
      intervals: The step logger's :class:`disttrain.step_logs.Intervals`, or None.
      checkpoint_every_steps: ``Checkpointing(every_steps=...)``, or None.
      drift_every_steps: The drift check's interval (0: off).
    """
    count = min(steps_per_execution, remaining)
    if intervals is not None:
        if intervals.log_every_steps:
            count = min(count, intervals.log_every_steps - step % intervals.log_every_steps)
        if intervals.histogram_every_steps:  # a gradient histogram step runs alone (with gradients)
            until = intervals.histogram_every_steps - step % intervals.histogram_every_steps
            count = min(count, until - 1 if intervals.gradients and until > 1 else until)
        if intervals.profile_steps:  # a profile covers exactly its steps
            first, last = intervals.profile_steps
            count = min([count] + [b - step for b in (first - 1, last) if b > step])
    if checkpoint_every_steps:
        count = min(count, checkpoint_every_steps - step % checkpoint_every_steps)
    if drift_every_steps:
        count = min(count, drift_every_steps - step % drift_every_steps)
    return max(1, count)


def name(kind: str, step: int, count: int) -> str:
    """``"train step 7"``, ``"train steps 7-22 (one call)"`` (the call after global ``step``) or ``"eval step"``."""
    if kind != "train":
        return "eval step"
    return f"train step {step + 1}" if count == 1 else f"train steps {step + 1}-{step + count} (one call)"


def tracings(compiled: Any) -> int:
    """How often a :class:`disttrain.step_functions.CompiledSteps`' functions were traced so far: a call that
    changes it traced (the trainer leaves such calls out of the throughput it reports).

    Args:
      compiled: The compiled steps of one variant.

    Returns:
      The sum of their ``tf.function`` tracing counts.
    """
    return sum(f.experimental_get_tracing_count() for f in (compiled.run, compiled.run_many, compiled.run_batch))


def check_steps_per_execution(value: Any) -> None:
    """Checks ``fit``'s / ``evaluate``'s ``steps_per_execution``.

    Args:
      value: The value given.

    Raises:
      ValueError: Unless it is an int >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"steps_per_execution={value!r} must be an int >= 1 (steps run in one compiled call)")
