"""Step-level logging: every N train steps, ONE all-reduce makes the running values global.

The decision *when* to reduce is taken identically on every process (from the global step count and
an interval agreed on by all processes when ``fit`` starts), because every process must take part in
each collective; only what callbacks do with the values (write summaries, print) depends on the rank.

At a logging step the running totals of the epoch (:class:`disttrain.loop.totals.EpochTotals`: output
sums, window seconds, metric states) are summed over all processes once. Callbacks then get, on every process, identical values:

  * each step output (``loss`` ...): its mean over the epoch's steps so far, summed over replicas
    (at the epoch's last step this equals the epoch's value);
  * each metric: computed from its globally merged state (see :mod:`disttrain.metrics`);
  * ``lr``: the learning rate of the next step;
  * ``examples_per_sec``: global examples per second over the steps since the last logging step;
  * ``step_time``: seconds per step over the same window (the mean over processes). Both leave out
    the calls that traced a step function (:meth:`StepLogger.exclude`), unless all of the window's did.

Gradient histograms work the same way: at histogram steps the trainer runs a variant of the step that
also returns the local gradients, and one all-reduce sums them into the global gradient.

Profiling needs no agreement: a callback with ``profile_steps = (first, last)`` (``dt.TensorBoard``)
has its ``start_profile(trainer)`` called just before global step ``first`` and ``stop_profile(trainer)``
just after step ``last``; only the chief's callback records anything.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from disttrain import nonfinite
from disttrain.callbacks import Callback, current_learning_rate
from disttrain.loop.totals import EpochTotals

if TYPE_CHECKING:  # pragma: no cover
    from disttrain.callbacks import RunningTrainer

#: Logging interval used when something consumes step logs and the trainer was given none.
DEFAULT_LOG_EVERY_STEPS = 50


@dataclasses.dataclass(frozen=True)
class Intervals:
    """The step intervals every process agreed on (0 = off)."""

    log_every_steps: int
    histogram_every_steps: int
    gradients: bool
    profile_steps: tuple[int, int] | None = None  # this process's own request (not agreed: no collectives)

    @property
    def active(self) -> bool:
        return bool(self.log_every_steps or self.histogram_every_steps or self.profile_steps)


def requested_intervals(*, log_every_steps: int | None, callbacks: list
                        ) -> tuple[int, int, bool, tuple[int, int] | None]:
    """What this process asks for: ``(log_every_steps, histogram_every_steps, wants_gradients,
    profile_steps)``, the last the span of every callback's ``profile_steps`` (or None).

    Args:
      log_every_steps: The trainer's argument; None picks :data:`DEFAULT_LOG_EVERY_STEPS` when a
        callback consumes step logs (overrides ``on_step_logs``, like the progress bar), else 0.
      callbacks: The trainer's callbacks.

    Raises:
      ValueError: For a negative interval.
    """
    windows = [tuple(c.profile_steps) for c in callbacks if getattr(c, "profile_steps", None)]
    profile = (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else None
    if log_every_steps is None:
        consumers = any(type(c).on_step_logs is not Callback.on_step_logs for c in callbacks)
        log_every_steps = DEFAULT_LOG_EVERY_STEPS if consumers else 0
    histogram = 0
    gradients = False
    for callback in callbacks:
        every = int(getattr(callback, "histogram_every_steps", 0) or 0)
        if every < 0:
            raise ValueError(f"{type(callback).__name__}.histogram_every_steps={every} must be >= 0")
        if every:
            histogram = math.gcd(histogram, every)
            gradients = gradients or bool(getattr(callback, "wants_gradients", False))
    if int(log_every_steps) < 0:
        raise ValueError(f"log_every_steps={log_every_steps} must be >= 0 (0 turns step logs off)")
    return int(log_every_steps), histogram, gradients, profile


def agree(backend, requested: tuple[int, int, bool, tuple[int, int] | None]) -> Intervals:
    """Makes every process use the same intervals: the largest any process asked for (one all-reduce).

    A process whose callbacks ask for nothing (e.g. TensorBoard created on the chief only) still
    takes part in every logging all-reduce, so the collectives never deadlock.
    """
    log_every, histogram, gradients, profile = requested
    agreed = backend.all_reduce(np.array([log_every, histogram, int(gradients)], np.int64), "max")
    return Intervals(log_every_steps=int(agreed[0]), histogram_every_steps=int(agreed[1]),
                     gradients=bool(agreed[2]) and int(agreed[1]) > 0, profile_steps=profile)


class StepLogger:
    """Reduces running values at agreed steps and hands them to the callbacks (one per ``fit``).

    Args:
      trainer: The trainer; its ``backend``, ``optimizer``, ``global_batch_size`` and ``callbacks`` are used,
        its ``position`` read (the loop keeps it) and its ``dispatch`` called.
      intervals: From :func:`agree`.
    """

    def __init__(self, *, trainer: "RunningTrainer", intervals: Intervals):
        self.trainer = trainer
        self.intervals = intervals
        self._last = time.perf_counter()
        self._last_step = 0
        self._untimed = [0, 0.0]  # steps and seconds of this window's calls that traced (see exclude)

    def begin_epoch(self, *, done: int = 0) -> None:
        """Starts the timing window; call just before an epoch's first step (or, resuming, the first
        step after the ``done`` ones)."""
        self._profile(next_step=self.trainer.position.global_step + 1)
        self._last = time.perf_counter()
        self._last_step = done
        self._untimed = [0, 0.0]

    def _profile(self, *, next_step: int) -> None:
        """Starts the callbacks' profiles that begin at ``next_step``, stops those that ended before it."""
        for callback in self.trainer.callbacks:
            window = getattr(callback, "profile_steps", None)
            if window and next_step == window[0]:
                callback.start_profile(self.trainer)
            elif window and next_step == window[1] + 1:
                callback.stop_profile(self.trainer)

    def exclude(self, *, steps: int, seconds: float) -> None:
        """Leaves a call that traced a step function out of the window's throughput (unless every call of
        the window traced).

        Args:
          steps: Steps the call ran.
          seconds: Its wall time.
        """
        self._untimed = [self._untimed[0] + steps, self._untimed[1] + seconds]

    def wants_gradients(self, step: int) -> bool:
        """Whether global step ``step`` (1-based, the step about to run) must return its gradients."""
        every = self.intervals.histogram_every_steps
        return self.intervals.gradients and every > 0 and step % every == 0

    def after_step(self, *, step: int, epoch_step: int, totals: EpochTotals,
                   gradients: dict[str, tf.Tensor] | None = None) -> None:
        """Called on every process after every train step; communicates only at agreed steps.

        Args:
          step: Global step number just completed (1-based, continues across epochs).
          epoch_step: Steps completed in this epoch (1-based).
          totals: This process's running totals of the epoch.
          gradients: ``{variable name: local gradient sum}`` on gradient steps, else None.
        """
        trainer = self.trainer
        log_every, hist_every = self.intervals.log_every_steps, self.intervals.histogram_every_steps
        if log_every and step % log_every == 0:
            trainer.dispatch("on_step_logs", step, self._reduce(epoch_step=epoch_step, totals=totals))
        if hist_every and step % hist_every == 0:
            global_grads = {}
            if gradients:
                global_grads = _all_reduce_structure(trainer.backend, gradients)
            trainer.dispatch("on_histograms", step, global_grads)
        if self.intervals.profile_steps:
            self._profile(next_step=step + 1)

    def _reduce(self, *, epoch_step: int, totals: EpochTotals) -> dict[str, float]:
        trainer, backend = self.trainer, self.trainer.backend
        window_steps = epoch_step - self._last_step
        untimed_steps, untimed_seconds = self._untimed if self._untimed[0] < window_steps else (0, 0.0)
        window_steps -= untimed_steps
        reduced = totals.reduce(seconds=time.perf_counter() - self._last - untimed_seconds)
        dropped, skips = nonfinite.pop_skips(reduced.sums, steps=epoch_step)  # skipped steps' values are left out
        logs = {n: v / (epoch_step - dropped) if epoch_step > dropped else float("nan") for n, v in reduced.sums.items()}
        logs.update(reduced.metrics)
        logs.update(skips)
        logs["lr"] = current_learning_rate(trainer.optimizer)
        seconds = reduced.seconds / backend.size
        if window_steps > 0 and seconds > 0:
            logs["examples_per_sec"] = window_steps * trainer.global_batch_size / seconds
            logs["step_time"] = seconds / window_steps
        self._last, self._last_step, self._untimed = time.perf_counter(), epoch_step, [0, 0.0]
        return logs


def _all_reduce_structure(backend, values: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
    """Sums a dict of tensors over all processes with one all-reduce; returns numpy arrays."""
    names = list(values)
    flat = [tf.reshape(tf.cast(tf.convert_to_tensor(values[n]), tf.float32), [-1]) for n in names]
    summed = np.asarray(backend.all_reduce(tf.concat(flat, 0), "sum"))
    out, offset = {}, 0
    for name, f in zip(names, flat):
        n = int(f.shape[0])
        out[name] = summed[offset:offset + n].reshape(tf.convert_to_tensor(values[name]).shape)
        offset += n
    return out

