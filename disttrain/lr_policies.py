"""The learning-rate policies an :class:`disttrain.lr.LRController` applies: step-level
(:class:`LinearScaling`, :class:`Warmup`) and epoch-level rules (:class:`Rule` and its subclasses).

Import them from :mod:`disttrain.lr` (``dt.lr.ReduceOnPlateau``, ...); how the controller combines
them, and why every rank applies the same LR, is described there.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf


def state_variable(value: float, name: str) -> tf.Variable:
    """A float64 variable holding policy state (checkpointed and broadcast with the controller)."""
    return tf.Variable(float(value), dtype=tf.float64, trainable=False, name=name)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, fix: str = "") -> float:
    """``value`` as a float, checked against the bounds (``low_open``: excluded).

    Raises:
      TypeError: If it is not a number.
      ValueError: If it is not finite or out of bounds; the message names the value, the bounds and ``fix``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r} must be a number{'; ' + fix if fix else ''}") from None
    bad = not math.isfinite(number)
    if low is not None:
        bad = bad or (number <= low if low_open else number < low)
    if high is not None:
        bad = bad or (number >= high if high_open else number > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        need = " and ".join(p for p in (lo, hi) if p) or "finite"
        raise ValueError(f"{name}={value!r} must be {need}{'; ' + fix if fix else ''}")
    return number


# -- step-level policies ----------------------------------------------------------------------------
class LinearScaling:
    """The linear scaling rule: multiply the LR by ``global batch / reference batch``, or by the number
    of replicas (Goyal et al. 2017).

    Args:
      reference_batch_size: The batch size the base LR was tuned for; the factor is
        ``global_batch_size / reference_batch_size``.
      replicas: Scale by the number of replicas in sync instead (the base LR was tuned for one).
      global_batch_size: Global batch to use; default the one passed to ``Trainer.fit``.

    Raises:
      ValueError: Unless exactly one of ``reference_batch_size`` and ``replicas=True`` is given, or for a
        non-positive batch size.
    """

    def __init__(self, *, reference_batch_size: int | None = None, replicas: bool = False,
                 global_batch_size: int | None = None):
        if (reference_batch_size is None) == (not replicas):
            raise ValueError(f"LinearScaling needs exactly one of reference_batch_size=N (got "
                             f"{reference_batch_size!r}) or replicas=True (got {replicas!r}); e.g. "
                             "LinearScaling(reference_batch_size=256) or LinearScaling(replicas=True)")
        for name, value in (("reference_batch_size", reference_batch_size),
                            ("global_batch_size", global_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive int")
        self.reference_batch_size = reference_batch_size
        self.replicas = bool(replicas)
        self.global_batch_size = global_batch_size

    def factor(self, *, num_replicas: int, global_batch_size: int | None) -> float:
        """The multiplier for a run with ``num_replicas`` replicas and ``global_batch_size``.

        Args:
          num_replicas: Replicas of the run.
          global_batch_size: Its global batch (None when unknown).

        Raises:
          ValueError: If the rule scales by batch and no global batch is known.
        """
        if self.replicas:
            return float(num_replicas)
        batch = self.global_batch_size or global_batch_size
        if batch is None:
            raise ValueError("LinearScaling(reference_batch_size=...) needs the global batch size: train with "
                             "Trainer.fit(global_batch_size=...) or pass LinearScaling(global_batch_size=...)")
        return batch / self.reference_batch_size

    def __repr__(self) -> str:
        what = "replicas=True" if self.replicas else f"reference_batch_size={self.reference_batch_size}"
        return f"LinearScaling({what})"


class Warmup:
    """Gradual warmup over the first ``steps`` optimizer steps.

    The LR at step ``t`` is ``target(t) * (s + (1 - s) * min(t, steps) / steps)``, where ``target`` is the
    fully scaled LR. By default ``s = 1 / scale`` so the ramp starts at the unscaled base LR and reaches
    ``scale x base`` at step ``steps`` (Goyal et al. 2017); ``start=0.0`` ramps from zero instead.

    Args:
      steps: Warmup length in optimizer steps (> 0).
      start: Fraction of the target LR at step 0, in [0, 1]; default ``1 / scale``.

    Raises:
      ValueError: For ``steps`` <= 0 or ``start`` outside [0, 1].
    """

    def __init__(self, *, steps: int, start: float | None = None):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
            raise ValueError(f"Warmup steps={steps!r} must be a positive int (optimizer steps, e.g. "
                             "5 * steps_per_epoch)")
        self.steps = int(steps)
        self.start = None if start is None else check_number(
            "Warmup start", start, low=0, high=1, fix="it is a fraction of the target LR")

    def __repr__(self) -> str:
        return f"Warmup(steps={self.steps}, start={self.start})"


# -- epoch-level rules ------------------------------------------------------------------------------
class Rule(tf.Module):
    """An epoch-level LR rule. Subclass it and implement :meth:`decide`.

    ``decide`` receives the trainer's logs, which are already reduced over all replicas and processes,
    so it must not communicate or read per-process values. It returns the LR to use from now on, or
    None; the controller turns that into this rule's ``multiplier``. Keep any state the rule needs in
    ``tf.Variable`` attributes: they are checkpointed with the controller and broadcast from rank 0
    after every decision.

    Args:
      name: Module name (for checkpoints and messages).
    """

    def __init__(self, *, name: str | None = None):
        super().__init__(name=name)
        self.multiplier = state_variable(1.0, "multiplier")

    def setup(self, trainer: Any) -> None:
        """Called when training starts, before any decision (e.g. to resolve a metric's direction).

        Args:
          trainer: The :class:`disttrain.Trainer` (its ``metrics`` and ``eval_metrics``).
        """

    def decide(self, *, epoch: int, logs: Mapping[str, float], lr: float) -> float | None:
        """Returns the new LR (applied from the next step on) or None for no change.

        Args:
          epoch: The epoch that just ended.
          logs: Globally reduced values of that epoch (``loss``, metrics, ``val_*``, ``lr``).
          lr: The LR the next step would apply without this decision.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement decide(*, epoch, logs, lr)")

    def reset(self) -> None:
        """Forgets past decisions (multiplier back to 1)."""
        self.multiplier.assign(1.0)


def _monitored(rule: str, monitor: str, logs: Mapping[str, float]) -> float:
    if monitor not in logs:
        raise KeyError(f"{rule} monitors {monitor!r}, which is not logged; logged values are {sorted(logs)} "
                       "(pass monitor=one of them; val_* needs validation_data in fit)")
    return float(logs[monitor])


class ReduceOnPlateau(Rule):
    """Multiplies the LR by ``factor`` when ``monitor`` stops improving: the semantics of
    ``keras.callbacks.ReduceLROnPlateau`` (best, wait, patience, cooldown, min_delta, min_lr, mode),
    decided on the global value of ``monitor``.

    One difference: the state is not reset when training starts again, so a resumed run (or a second
    ``fit``) continues where it stopped; call :meth:`reset` to start afresh.

    Args:
      monitor: Logged value to watch, e.g. ``loss`` or ``val_loss``.
      factor: Multiplier applied on a plateau, in (0, 1).
      patience: Epochs without improvement before reducing.
      mode: ``min``, ``max`` or ``auto`` (min for losses, else the direction of the Keras metric of that
        name among the trainer's metrics).
      min_delta: An improvement must beat the best value by more than this.
      cooldown: Epochs to wait after a reduction before counting again.
      min_lr: Lower bound of the LR set by a reduction.
      name: Module name.

    Raises:
      ValueError: For a factor outside (0, 1), a negative patience/cooldown/min_lr, an unknown mode, or
        (when training starts) ``mode="auto"`` on a value whose direction is unknown.
    """

    def __init__(self, *, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0,
                 name: str | None = None):
        super().__init__(name=name)
        self.factor = check_number("ReduceOnPlateau factor", factor, low=0, high=1, low_open=True,
                                   high_open=True, fix="the LR is multiplied by it, e.g. 0.5 halves it")
        for label, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"ReduceOnPlateau {label}={value!r} must be an int >= 0 (epochs)")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"ReduceOnPlateau mode={mode!r} is unknown; use 'min', 'max' or 'auto'")
        self.monitor, self.mode = monitor, mode
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.min_delta = abs(check_number("ReduceOnPlateau min_delta", min_delta))
        self.min_lr = check_number("ReduceOnPlateau min_lr", min_lr, low=0)
        self._direction = {"min": -1.0, "max": 1.0}.get(mode)
        self.best = state_variable(0.0, "best")
        self.has_best = tf.Variable(False, trainable=False, name="has_best")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        self.cooldown_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="cooldown_counter")

    def setup(self, trainer: Any) -> None:
        if self.mode != "auto":
            return
        name = self.monitor.removeprefix("val_")
        direction = -1.0 if name == "loss" else None
        for metric in list(getattr(trainer, "metrics", [])) + list(getattr(trainer, "eval_metrics", [])):
            if metric.name == name and hasattr(metric, "_direction"):
                direction = 1.0 if metric._direction == "up" else -1.0
        if direction is None:
            raise ValueError(f"ReduceOnPlateau cannot tell whether {self.monitor!r} should go down or up; "
                             "pass mode='min' or mode='max'")
        self._direction = direction

    def _is_improvement(self, current: float) -> bool:
        if not bool(self.has_best.numpy()):
            return True
        best = float(self.best.numpy())
        if self._direction < 0:
            return current + self.min_delta < best
        return current - self.min_delta > best

    def decide(self, *, epoch: int, logs: Mapping[str, float], lr: float) -> float | None:
        if self._direction is None:
            raise RuntimeError("ReduceOnPlateau(mode='auto') decides only after setup(trainer); use it "
                               "inside an LRController passed to Trainer(callbacks=...)")
        current = _monitored("ReduceOnPlateau", self.monitor, logs)
        new_lr = None
        if self.cooldown_counter.numpy() > 0:
            self.cooldown_counter.assign_sub(1)
            self.wait.assign(0)
        if self._is_improvement(current):
            self.best.assign(current)
            self.has_best.assign(True)
            self.wait.assign(0)
        elif self.cooldown_counter.numpy() <= 0:
            self.wait.assign_add(1)
            if self.wait.numpy() >= self.patience and lr > np.float32(self.min_lr):
                new_lr = max(lr * self.factor, self.min_lr)
                self.cooldown_counter.assign(self.cooldown)
                self.wait.assign(0)
        return new_lr

    def reset(self) -> None:
        super().reset()
        self.has_best.assign(False)
        self.best.assign(0.0)
        self.wait.assign(0)
        self.cooldown_counter.assign(0)


class LossThresholdCut(Rule):
    """The seed rule: when the global ``monitor`` falls strictly below a threshold, multiply the LR by
    ``factor`` (once per threshold).

    With one threshold the LR becomes ``factor`` x the LR it would otherwise have (for a float LR: the
    initial LR x ``factor``, the seed's "loss < 0.01 -> LR = initial / 10"). With several decreasing
    thresholds the LR is cut again each time a lower one is crossed; crossing several in one epoch
    applies all their cuts. The number of cuts applied is a variable (``cuts``), so it is checkpointed.

    Args:
      thresholds: One threshold, or a strictly decreasing sequence of them.
      factor: Multiplier per cut, > 0.
      monitor: Logged value to watch.
      name: Module name.

    Raises:
      ValueError: For an empty or non-decreasing threshold sequence or a factor <= 0.
    """

    def __init__(self, *, thresholds: float | Sequence[float] = 0.01, factor: float = 0.1,
                 monitor: str = "loss", name: str | None = None):
        super().__init__(name=name)
        values = [thresholds] if isinstance(thresholds, (int, float, np.floating)) else list(thresholds)
        if not values:
            raise ValueError("LossThresholdCut needs at least one threshold, e.g. thresholds=0.01")
        self.thresholds = tuple(check_number("LossThresholdCut threshold", v) for v in values)
        if any(b >= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"LossThresholdCut thresholds={list(self.thresholds)} must strictly decrease "
                             "(each cut happens when the value falls below the next, lower one)")
        self.factor = check_number("LossThresholdCut factor", factor, low=0, low_open=True,
                                   fix="use e.g. 0.1 for LR = initial / 10")
        self.monitor = monitor
        self.cuts = tf.Variable(0, dtype=tf.int64, trainable=False, name="cuts")

    def decide(self, *, epoch: int, logs: Mapping[str, float], lr: float) -> float | None:
        current = _monitored("LossThresholdCut", self.monitor, logs)
        done = before = int(self.cuts.numpy())
        while done < len(self.thresholds) and current < self.thresholds[done]:
            done += 1
        if done == before:
            return None
        self.cuts.assign(done)
        return lr * self.factor ** (done - before)

    def reset(self) -> None:
        super().reset()
        self.cuts.assign(0)


class FunctionRule(Rule):
    """A user rule from a function: ``fn(*, epoch, logs, lr) -> new LR or None``.

    ``logs`` are the global values of the epoch. State kept in the function's closure is neither
    checkpointed nor synchronised: subclass :class:`Rule` and keep it in ``tf.Variable`` s if it matters.

    Args:
      fn: The decision function.
      name: Module name.

    Raises:
      TypeError: If ``fn`` is not callable.
    """

    def __init__(self, fn: Callable[..., float | None], *, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"FunctionRule needs a function fn(*, epoch, logs, lr) -> float | None, got {fn!r}")
        super().__init__(name=name)
        self._fn = fn

    def decide(self, *, epoch: int, logs: Mapping[str, float], lr: float) -> float | None:
        return self._fn(epoch=epoch, logs=logs, lr=lr)
