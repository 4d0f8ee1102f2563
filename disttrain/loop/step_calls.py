"""What the training loop does per compiled call, kept cheap: on a small model it is a share of the step.

* :class:`CompiledCalls` holds the trainer's compiled steps (traced once per variant) and makes each call:
  under the stall watchdog, with a labels/model dtype clash and a lost peer explained, its result as one
  :class:`disttrain.loop.step_functions.StepResult` whatever the variant.
* :class:`ConcreteCalls` calls ``run`` / ``run_many`` through their concrete functions. A ``tf.function``
  call matches its arguments against its traces every time (the iterator's type spec, each keyword's
  default, a function-type hash): 0.1-0.2 ms a call on 2 cores, as much as a whole step of a tiny model.
  Within an epoch the arguments keep their types (the same iterator; control flags and a watchdog mark of
  fixed shape and dtype, or None; a count tensor), so the concrete function the first call finds serves
  every later call of that epoch. It runs the same graph: only the Python that picks it is skipped.
* :func:`call_length`: how many steps the next call of ``fit(steps_per_execution=K)`` runs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from disttrain.input import data_checks
from disttrain.loop import step_functions
from disttrain.backends import Backend, failures
from disttrain.loop.position import RunPosition
from disttrain.loop.step_functions import CompiledSteps, StepResult


class CompiledCalls:
    """The compiled step variants of one trainer, and each call of one (see the module docs).

    A variant's key is ``(kind, global_batch_size, gradients, masked)``: ``kind`` ``"train"`` or ``"eval"``.

    Args:
      backend: The trainer's backend.
      model: The trainer's model (named when the labels' dtype does not fit its output).
      train_step: The user's train step.
      eval_step: The user's eval step, or None.
      accumulation_steps: The train step's micro-batches.
      on_nonfinite: The train step's policy (the eval step ignores non-finite values).
      marker: The stall watchdog's in-graph marker, or None.
      watch: The trainer's :class:`disttrain.watchdog.Watch`: a call runs in its ``step`` phase while armed.
      position: The trainer's position (read: a call's name and where a lost peer left the loop).
      locate: ``fn(running=...)``: the loop's position for a failure report.
      resume: How to resume after a failure (the checkpoint directory's hint).

    Attributes:
      functions: ``{key: CompiledSteps}``, traced so far.
    """

    def __init__(self, *, backend: Backend, model: Any, train_step: Callable, eval_step: Callable | None,
                 accumulation_steps: int, on_nonfinite: str, marker: Any, watch: Any, position: RunPosition,
                 locate: Callable[..., failures.Position], resume: str):
        self.backend, self.model, self.marker, self._watch = backend, model, marker, watch
        self._steps = {"train": train_step, "eval": eval_step}
        self._accumulation_steps, self._on_nonfinite = accumulation_steps, on_nonfinite
        self.position, self._locate, self._resume = position, locate, resume
        self.functions: dict[tuple, CompiledSteps] = {}
        self._called: set[tuple] = set()  # compiled steps called once (traced) already
        self._calls = 0  # compiled step calls under the watchdog (the value of its in-graph marks)

    def compiled(self, key: tuple) -> CompiledSteps:
        """The compiled steps of variant ``key`` (see :mod:`disttrain.loop.step_functions`), traced once."""
        if key not in self.functions:
            kind, global_batch_size, gradients, masked = key
            self.functions[key] = step_functions.compile_steps(
                step=self._steps[kind], backend=self.backend, global_batch_size=global_batch_size,
                gradients=gradients, masked=masked, marker=self.marker,
                accumulation_steps=self._accumulation_steps if kind == "train" else 1,
                on_nonfinite=self._on_nonfinite if kind == "train" else "ignore")
        return self.functions[key]

    def reset(self) -> None:
        """Drops the traced steps, so the next is traced again."""
        self.functions.clear()
        self._called.clear()

    def call(self, key: tuple, fn: Callable, args: tuple, control: Any, *, element_spec: Any,
             count: int = 1) -> StepResult:
        """Calls the compiled ``fn(*args, control, mark)`` of variant ``key`` (``count`` steps).

        Args:
          key: The variant.
          fn: One of its functions (or a :class:`ConcreteCalls` partial of one).
          args: Its arguments before ``control``.
          control: Checkpointing's flags, or None.
          element_spec: The input's element spec (to explain a dtype clash).
          count: Steps the call runs.

        Returns:
          The call's :class:`disttrain.loop.step_functions.StepResult`.

        Raises:
          TypeError: A dtype clash between the labels and the model's output (which TF reports when it
            traces the step), with both dtypes and the fix.
          disttrain.CollectiveError: A failed collective the backend calls a lost peer.
        """
        compiled, watchdog = self.functions[key], self._watch.current
        name_ = name(key[0], self.position.global_step, count)
        try:
            if watchdog is None:
                value = fn(*args, control, None)
            else:
                self._calls += 1  # the marks' value for this call
                first = key not in self._called
                self._called.add(key)
                watchdog.step_applies_gradients = compiled.ctx.applies_gradients
                with watchdog.phase("step", name_, mark=self._calls, first=first, count=count):
                    value = fn(*args, control, tf.constant(self._calls, tf.int64))
        except TypeError as err:
            explained = data_checks.explain_dtype_mismatch(err, element_spec=element_spec, model=self.model)
            if explained is None:
                raise
            raise explained from err
        except Exception as err:  # noqa: BLE001 - re-raised as it is unless the backend calls it a lost peer
            if (lost := failures.translate(
                    self.backend, err, phase=f"compiled {name_}",
                    position=functools.partial(self._locate, running=key[0] == "train"),
                    resume=self._resume)) is None:
                raise
            raise lost from err
        return StepResult.of(value, gradients=key[2], control=control is not None)


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
      intervals: The step logger's :class:`disttrain.loop.step_logs.Intervals`, or None.
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
    """How often a :class:`disttrain.loop.step_functions.CompiledSteps`' functions were traced so far: a call that
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
