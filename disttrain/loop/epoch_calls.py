"""One epoch's compiled calls: the variant each call runs, how many steps, and the calls that traced.

The training loop (``disttrain/trainer.py``) asks :meth:`EpochCalls.next` for the next call until the
epoch's input ends, and acts on each result itself (it alone moves the run's position). A call that
traced a step function is left out of the epoch's timing and the step logs' throughput, unless every
call of the epoch traced.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable

from disttrain.loop import step_calls
from disttrain.loop.step_functions import StepResult


class EpochCalls:
    """Runs the calls of one epoch of ``kind`` (``"train"`` or ``"eval"``).

    Args:
      calls: The trainer's :class:`disttrain.loop.step_calls.CompiledCalls`.
      kind: ``"train"`` or ``"eval"``.
      global_batch_size: Examples per step over all replicas.
      epoch_input: The epoch's agreed input (``disttrain.input.epoch_agreement.epoch_input``).
      steps_per_execution: The most steps one call may run.
      step_logger: The ``fit``'s :class:`disttrain.loop.step_logs.StepLogger` (train only), or None.
      control: Returns checkpointing's flags for the next call, or None (no checkpointing).
      checkpoint_every_steps: ``Checkpointing(every_steps=...)``, or None.
      drift_every_steps: The drift check's interval (0: off).
      phase: ``phase(kind, what)``: the stall watchdog's timed phase.

    Attributes:
      traced: ``[steps, seconds]`` of the calls that traced a step function.
    """

    def __init__(self, *, calls: step_calls.CompiledCalls, kind: str, global_batch_size: int, epoch_input: Any,
                 steps_per_execution: int, step_logger: Any, control: Callable[[], Any] | None,
                 checkpoint_every_steps: int | None, drift_every_steps: int,
                 phase: Callable[[str, str], contextlib.AbstractContextManager]):
        self._calls, self._kind, self._global_batch_size = calls, kind, global_batch_size
        self._input, self._steps_per_execution, self._step_logger = epoch_input, steps_per_execution, step_logger
        self._control, self._checkpoint_every, self._drift_every = control, checkpoint_every_steps, drift_every_steps
        self._phase = phase
        self._concrete = step_calls.ConcreteCalls()  # this epoch's concrete functions
        self._start = time.perf_counter()
        self.traced = [0, 0.0]

    def next(self, *, step: int, ran: int) -> tuple[StepResult, int] | None:
        """Runs the next call; None when the epoch's input has ended.

        Args:
          step: The global step before the call.
          ran: Steps of this epoch run so far (in this process's run of it).

        Returns:
          ``(result, steps the call ran)``, or None.
        """
        epoch_input, step_logger = self._input, self._step_logger
        if epoch_input.steps is not None and ran >= epoch_input.steps:
            return None
        wants_gradients = step_logger is not None and step_logger.wants_gradients(step + 1)
        key = (self._kind, self._global_batch_size, wants_gradients, epoch_input.masked)
        compiled = self._calls.compiled(key)
        control = self._control() if self._control is not None else None
        count, spec = 1, epoch_input.element_spec
        call_start, tracings = time.perf_counter(), step_calls.tracings(compiled)
        if epoch_input.steps is None:  # unknown length: the processes agree on every batch
            with self._phase("input", "the next batch of a pipeline of unknown length"):
                batch = epoch_input.next_agreed()
            if batch is None:
                return None
            result = self._calls.call(key, compiled.run_batch, (batch,), control, element_spec=spec)
        else:
            if not wants_gradients:
                count = step_calls.call_length(
                    step=step, steps_per_execution=self._steps_per_execution, remaining=epoch_input.steps - ran,
                    drift_every_steps=self._drift_every, checkpoint_every_steps=self._checkpoint_every,
                    intervals=step_logger.intervals if step_logger is not None and self._kind == "train" else None)
            if count == 1:
                result = self._calls.call(key, functools.partial(self._concrete, compiled.run),
                                          (epoch_input.iterator,), control, element_spec=spec)
            else:
                result = self._calls.call(key, functools.partial(self._concrete, compiled.run_many),
                                          (epoch_input.iterator, self._concrete.count(count)), control,
                                          element_spec=spec, count=count)
        if step_calls.tracings(compiled) != tracings:  # this call traced: its time is left out
            self.traced = [self.traced[0] + count, self.traced[1] + time.perf_counter() - call_start]
            if step_logger is not None:
                step_logger.exclude(steps=count, seconds=time.perf_counter() - call_start)
        return result, count

    def timing(self, ran: int) -> tuple[int, float, float]:
        """``(steps timed, wall seconds of the timed calls so far, seconds left out)`` after ``ran`` steps:
        the calls that traced are left out unless every call did (the same on every process: they trace
        alike)."""
        timed = ran - self.traced[0]
        untimed = self.traced[1] if timed else 0.0
        return timed or ran, time.perf_counter() - self._start - untimed, untimed
