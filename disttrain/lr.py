"""Learning-rate policies decided on globally reduced values, so every rank applies the same LR.

One :class:`LRController` owns the learning rate of one optimizer. It replaces the optimizer's
learning rate (a float or a Keras schedule) by a schedule computed inside the compiled step from the
step counter and a few variables::

    lr(step) = base(step) * scale * warmup(step) * rule_1.multiplier * ... * rule_n.multiplier

* ``base``: the optimizer's own learning rate (float or ``LearningRateSchedule``), or the ``schedule``
  given to the controller (e.g. :class:`StepDecay`, ``keras.optimizers.schedules.CosineDecay``).
* ``scale``: the product of the :class:`LinearScaling` policies (global batch / reference batch, or
  the number of replicas), recomputed whenever training starts. A run resumed from a checkpoint on
  another number of replicas re-applies ``LinearScaling(replicas=True)`` for the new count and says
  so on the chief; ``reference_batch_size`` scaling stays, since a resume keeps the global batch.
* ``warmup``: a :class:`Warmup` ramp from ``base`` (Goyal et al. 2017) or a fraction of the target to
  the full scaled LR over the first ``steps`` steps.
* ``rule.multiplier``: what each epoch-level :class:`Rule` (:class:`ReduceOnPlateau`,
  :class:`LossThresholdCut`, :class:`FunctionRule` or a user subclass) decided so far.

Why this is the same on every rank: the step-level part depends only on the optimizer's step counter,
which every replica shares; the rules decide at the end of an epoch from the trainer's logs, which are
already reduced over all replicas and processes; and after every decision the controller broadcasts
its state from rank 0 through the backend, so even a last-bit difference in a logged value cannot
make ranks diverge. The state (base LR, scale, multipliers, best value, wait, cooldown, cuts) lives in
``tf.Variable`` s: the controller is a ``tf.Module``, so ``tf.train.Checkpoint(lr=controller)`` saves
and restores it, and a resumed run continues the same decisions.

Because the schedule is evaluated by the optimizer at every step, ``logs["lr"]`` in the history (the LR
applied at each epoch's first step) and :attr:`LRController.learning_rate` are the LR actually applied,
including warmup, scaling and schedules.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from disttrain.callbacks import Callback

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

__all__ = ["FunctionRule", "LRController", "LinearScaling", "LossThresholdCut", "ReduceOnPlateau", "Rule",
           "StepDecay", "Warmup", "controller_of", "set_learning_rate"]


def _f64(value: float, name: str) -> tf.Variable:
    return tf.Variable(float(value), dtype=tf.float64, trainable=False, name=name)


def _check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, fix: str = "") -> float:
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


# -- schedules -------------------------------------------------------------------------------------
class StepDecay(LearningRateSchedule):
    """Step decay: ``initial_learning_rate * factor ** floor(step / step_size)``.

    For a decay every E epochs, pass ``step_size=E * steps_per_epoch``. For cosine decay use
    ``keras.optimizers.schedules.CosineDecay``; any Keras schedule works as a base.

    Args:
      initial_learning_rate: LR of the first ``step_size`` steps.
      step_size: Steps between two decays (> 0).
      factor: Multiplier applied at every decay, in (0, 1].

    Raises:
      ValueError: For a non-positive ``step_size`` or ``initial_learning_rate``, or a ``factor``
        outside (0, 1].
    """

    def __init__(self, initial_learning_rate: float, *, step_size: int, factor: float = 0.1):
        self.initial_learning_rate = _check_number("initial_learning_rate", initial_learning_rate, low=0,
                                                   low_open=True)
        if isinstance(step_size, bool) or not isinstance(step_size, (int, np.integer)) or step_size <= 0:
            raise ValueError(f"step_size={step_size!r} must be a positive int (steps between decays; "
                             "for epochs use epochs * steps_per_epoch)")
        self.step_size = int(step_size)
        self.factor = _check_number("factor", factor, low=0, high=1, low_open=True,
                                    fix="use e.g. 0.1 to divide the LR by 10 at every decay")

    def __call__(self, step):
        drops = tf.floor(tf.cast(step, tf.float64) / self.step_size)
        lr = self.initial_learning_rate * tf.pow(tf.constant(self.factor, tf.float64), drops)
        return tf.cast(lr, tf.float32)

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial_learning_rate, "step_size": self.step_size,
                "factor": self.factor}

    @classmethod
    def from_config(cls, config: dict) -> "StepDecay":
        config = dict(config)
        return cls(config.pop("initial_learning_rate"), **config)


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
        self.start = None if start is None else _check_number(
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
        self.multiplier = _f64(1.0, "multiplier")

    def setup(self, trainer: Any) -> None:
        """Called when training starts, before any decision (e.g. to resolve a metric's direction)."""

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
        self.factor = _check_number("ReduceOnPlateau factor", factor, low=0, high=1, low_open=True,
                                    high_open=True, fix="the LR is multiplied by it, e.g. 0.5 halves it")
        for label, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"ReduceOnPlateau {label}={value!r} must be an int >= 0 (epochs)")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"ReduceOnPlateau mode={mode!r} is unknown; use 'min', 'max' or 'auto'")
        self.monitor, self.mode = monitor, mode
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.min_delta = abs(_check_number("ReduceOnPlateau min_delta", min_delta))
        self.min_lr = _check_number("ReduceOnPlateau min_lr", min_lr, low=0)
        self._direction = {"min": -1.0, "max": 1.0}.get(mode)
        self.best = _f64(0.0, "best")
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
        self.thresholds = tuple(_check_number("LossThresholdCut threshold", v) for v in values)
        if any(b >= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"LossThresholdCut thresholds={list(self.thresholds)} must strictly decrease "
                             "(each cut happens when the value falls below the next, lower one)")
        self.factor = _check_number("LossThresholdCut factor", factor, low=0, low_open=True,
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


# -- the controller ---------------------------------------------------------------------------------
class _Installed:
    """Where a controller is installed (kept out of tf.Module tracking and checkpoints)."""

    def __init__(self, optimizer: Any, base: Any, backend: Any):
        self.optimizer, self.base, self.backend = optimizer, base, backend


class _Records:
    """Python-side records (kept out of tf.Module tracking and checkpoints)."""

    def __init__(self):
        self.timeline: list[dict] = []


class _ControlledSchedule(LearningRateSchedule):
    """The schedule an :class:`LRController` installs into its optimizer."""

    def __init__(self, controller: "LRController"):
        self.controller = controller

    def __call__(self, step):
        return self.controller._lr_tensor(step)

    def get_config(self) -> dict:
        raise NotImplementedError("an LRController's schedule is state, not config: save it with "
                                  "tf.train.Checkpoint(lr=controller) instead of serialising the optimizer")


def controller_of(optimizer: Any) -> "LRController | None":
    """The :class:`LRController` installed in ``optimizer``, or None."""
    lr = getattr(optimizer, "_learning_rate", None)
    return lr.controller if isinstance(lr, _ControlledSchedule) else None


class LRController(Callback, tf.Module):
    """Owns an optimizer's learning rate: schedule, scaling, warmup and epoch-level rules, applied
    identically on every rank. Pass it to ``Trainer(callbacks=[...])``; it installs itself when
    training starts (or call :meth:`install` yourself).

    Args:
      policies: :class:`LinearScaling`, at most one :class:`Warmup`, and :class:`Rule` s (applied in
        order at the end of every epoch).
      schedule: Base LR (float or ``LearningRateSchedule``) replacing the optimizer's own; default:
        the optimizer's learning rate (float, schedule or callable) at installation.
      verbose: 1 prints every LR change on the chief.
      name: Module name.

    Raises:
      TypeError: For a policy of an unknown type.
      ValueError: For more than one Warmup.
    """

    def __init__(self, *, policies: Iterable[Any] = (), schedule: float | LearningRateSchedule | None = None,
                 verbose: int = 0, name: str = "lr_controller"):
        tf.Module.__init__(self, name=name)
        policies = list(policies)
        scalings, warmups, rules = [], [], []
        for policy in policies:
            if isinstance(policy, LinearScaling):
                scalings.append(policy)
            elif isinstance(policy, Warmup):
                warmups.append(policy)
            elif isinstance(policy, Rule):
                rules.append(policy)
            else:
                raise TypeError(f"unknown LR policy {policy!r}; use LinearScaling, Warmup or a Rule "
                                "(ReduceOnPlateau, LossThresholdCut, FunctionRule or a Rule subclass)")
        if len(warmups) > 1:
            raise ValueError(f"at most one Warmup per controller, got {warmups}")
        if schedule is not None and not isinstance(schedule, LearningRateSchedule):
            schedule = _check_number("schedule", schedule, low=0,
                                     fix="pass a float LR or a keras LearningRateSchedule")
        self._scalings = tuple(scalings)
        self._warmup = warmups[0] if warmups else None
        self.rules = list(rules)
        self._schedule = schedule
        self.verbose = verbose
        self.base_lr = _f64(0.0, "base_lr")  # used when the base is a float
        self.scale = _f64(1.0, "scale")
        self.warmup_start = _f64(1.0, "warmup_start")
        # Replicas the scale was computed for (0: never installed); restored from a checkpoint it tells
        # that a resumed run has another world size.
        self.scaled_replicas = tf.Variable(0, dtype=tf.int64, trainable=False, name="scaled_replicas")
        self._installed: _Installed | None = None
        self._records = _Records()

    # -- installation --------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """Whether the controller owns an optimizer's learning rate."""
        return self._installed is not None

    @property
    def timeline(self) -> list[dict]:
        """One record per epoch end on this process: ``epoch``, ``step`` (optimizer steps done),
        ``next_lr`` (the LR of the following step) and ``changes`` (names of the rules that changed it)."""
        return self._records.timeline

    def install(self, optimizer: keras.optimizers.Optimizer, *, backend: Any, num_replicas: int | None = None,
                global_batch_size: int | None = None) -> None:
        """Takes over ``optimizer``'s learning rate and computes the scaling for this run.

        Call it before the training step is traced (``Trainer`` callbacks do it in ``on_train_begin``).

        Args:
          optimizer: A Keras optimizer with a float, schedule or callable learning rate.
          backend: The run's backend (for the replica count and the rank-0 broadcast).
          num_replicas: Replicas to scale by; default ``backend.num_replicas``.
          global_batch_size: Global batch for ``LinearScaling(reference_batch_size=...)``.

        Raises:
          ValueError: If another controller already owns ``optimizer``, or this one owns another
            optimizer.
        """
        current = optimizer._learning_rate
        if isinstance(current, _ControlledSchedule):
            if current.controller is not self:
                raise ValueError(f"optimizer {optimizer.name!r} already has an LRController "
                                 f"({current.controller.name!r}); use one controller per optimizer and put "
                                 "all policies in it")
        else:
            if self._installed is not None:
                raise ValueError(f"LRController {self.name!r} already controls optimizer "
                                 f"{self._installed.optimizer.name!r}; create one controller per optimizer")
            base = self._schedule if self._schedule is not None else current
            if isinstance(base, (LearningRateSchedule,)) or (callable(base) and not hasattr(base, "numpy")):
                self._installed = _Installed(optimizer, base, backend)
            else:
                if self.base_lr.numpy() == 0.0 or self._schedule is not None:  # keep a restored base
                    self.base_lr.assign(float(np.asarray(base)))
                self._installed = _Installed(optimizer, None, backend)
            # Not through the `learning_rate` setter: for a float LR it untracks the LR variable by
            # deleting it from the optimizer's tracked variable list, after which
            # tf.train.Checkpoint(optimizer=...) refuses to save. The old variable stays (unused).
            optimizer._learning_rate = _ControlledSchedule(self)
        self._installed.backend = backend
        replicas = backend.num_replicas if num_replicas is None else num_replicas
        scale = 1.0
        for scaling in self._scalings:
            scale *= scaling.factor(num_replicas=replicas, global_batch_size=global_batch_size)
        before, previous = float(self.scale.numpy()), int(self.scaled_replicas.numpy())
        if previous and previous != replicas and self._scalings and backend.is_chief:
            print(f"LRController {self.name!r}: the state was saved with {previous} replicas, this run has "
                  f"{replicas}: LinearScaling is re-applied (scale {before:g} -> {scale:g})", flush=True)
        self.scale.assign(scale)
        self.scaled_replicas.assign(replicas)
        if self._warmup is not None:
            self.warmup_start.assign(1.0 / scale if self._warmup.start is None else self._warmup.start)

    def set_base_learning_rate(self, value: float) -> None:
        """Sets the base LR (when the base is a float): scaling, warmup and rules still apply on top.

        Raises:
          TypeError: If the base is a schedule.
          ValueError: For a negative or non-finite value.
        """
        if self._installed is not None and self._installed.base is not None:
            raise TypeError(f"the base LR is a schedule ({type(self._installed.base).__name__}) and cannot be "
                            "set; change the schedule, or add a Rule that sets the LR")
        self.base_lr.assign(_check_number("learning rate", value, low=0))

    # -- the LR --------------------------------------------------------------------------------
    def _lr_tensor(self, step) -> tf.Tensor:
        """The LR applied at optimizer step ``step`` (a tensor; runs inside the compiled step)."""
        base = self._installed.base if self._installed is not None else None
        if base is None:
            lr = tf.convert_to_tensor(self.base_lr)
        elif isinstance(base, LearningRateSchedule):
            lr = tf.cast(base(step), tf.float64)
        else:
            lr = tf.cast(base(), tf.float64)
        lr = lr * self.scale
        if self._warmup is not None:
            t = tf.cast(tf.convert_to_tensor(step), tf.float64)
            done = tf.minimum(t, float(self._warmup.steps)) / float(self._warmup.steps)
            lr = lr * (self.warmup_start + (1.0 - self.warmup_start) * done)
        for rule in self.rules:
            lr = lr * rule.multiplier
        return tf.cast(lr, tf.float32)

    def lr_at(self, step: int) -> float:
        """The LR step ``step`` applies with the current state (for logging or plotting).

        Raises:
          RuntimeError: If the controller is not installed yet.
        """
        if self._installed is None:
            raise RuntimeError(f"LRController {self.name!r} is not installed; pass it to Trainer(callbacks=...) "
                               "or call install(optimizer, backend=...)")
        return float(self._lr_tensor(tf.constant(int(step), tf.int64)).numpy())

    @property
    def learning_rate(self) -> float:
        """The LR the optimizer applies at its next step (identical on every rank)."""
        if self._installed is None:
            raise RuntimeError(f"LRController {self.name!r} is not installed; pass it to Trainer(callbacks=...) "
                               "or call install(optimizer, backend=...)")
        return self.lr_at(int(np.asarray(self._installed.optimizer.iterations)))

    # -- synchronisation -----------------------------------------------------------------------
    def _state(self) -> list[tf.Variable]:
        return list(self.variables)  # tf.Module order: sorted by attribute path, the same on every process

    def sync(self) -> None:
        """Makes the state equal on every process (rank 0's values win). All processes must call it."""
        backend = self._installed.backend if self._installed is not None else None
        if backend is None or backend.size == 1:
            return
        state = self._state()
        if not state:
            return
        packed = tf.stack([tf.cast(tf.reshape(v, []), tf.float64) for v in state])
        packed = backend.broadcast(packed, root=0)
        for variable, value in zip(state, tf.unstack(packed)):
            variable.assign(tf.cast(value, variable.dtype))

    def reset(self) -> None:
        """Forgets every rule's decisions (scaling, warmup progress and the base LR are kept)."""
        for rule in self.rules:
            rule.reset()

    # -- Callback hooks ------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        newly = self._installed is None
        self.install(trainer.optimizer, backend=trainer.backend,
                     global_batch_size=getattr(trainer, "global_batch_size", None))
        if newly and hasattr(trainer, "reset_compiled_steps"):
            trainer.reset_compiled_steps()  # a step traced before would keep applying the old LR
        for rule in self.rules:
            rule.setup(trainer)
        self.sync()

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        lr = self.learning_rate
        changes = []
        for rule in self.rules:
            new_lr = rule.decide(epoch=epoch, logs=logs, lr=lr)
            if new_lr is None:
                continue
            new_lr = _check_number(f"the LR from {rule.name}", new_lr, low=0,
                                   fix="a rule must return a finite LR >= 0 or None")
            if new_lr == lr:
                continue
            if lr == 0.0:
                raise ValueError(f"{rule.name} asked for LR {new_lr} while the LR is 0; rules scale the LR, "
                                 "so a zero LR cannot be changed by a rule (use a Warmup start > 0)")
            rule.multiplier.assign(rule.multiplier * (new_lr / lr))
            lr = self.learning_rate
            changes.append((rule.name, lr))
        self.sync()
        lr = self.learning_rate
        self._records.timeline.append({"epoch": int(epoch), "step": int(np.asarray(trainer.optimizer.iterations)),
                              "next_lr": lr, "changes": [name for name, _ in changes]})
        if self.verbose and changes and trainer.backend.is_chief:
            print(f"epoch {epoch + 1}: {', '.join(name for name, _ in changes)} set the learning rate "
                  f"to {lr:.6g}", flush=True)


def set_learning_rate(optimizer: keras.optimizers.Optimizer, value: float) -> None:
    """Sets an optimizer's learning rate; with an :class:`LRController` installed, its base LR.

    Raises:
      TypeError: If the learning rate is a schedule (Keras cannot assign those): use an
        :class:`LRController` with a :class:`Rule` to change it.
    """
    controller = controller_of(optimizer)
    if controller is not None:
        controller.set_base_learning_rate(value)
        return
    if isinstance(optimizer._learning_rate, LearningRateSchedule):
        raise TypeError(f"the optimizer's learning rate is a schedule "
                        f"({type(optimizer._learning_rate).__name__}) and cannot be set; use an "
                        "LRController (its rules multiply the schedule) or a float learning rate")
    optimizer.learning_rate.assign(value)
