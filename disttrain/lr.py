"""Learning-rate policies decided on globally reduced values, so every rank applies the same LR.

One :class:`LRController` owns the learning rate of one optimizer. It replaces the optimizer's
learning rate (a float or a Keras schedule) by a schedule computed inside the compiled step from the
step counter and a few variables::

    lr(step) = base(step) * scale * warmup(step) * rule_1.multiplier * ... * rule_n.multiplier

* ``base``: the optimizer's own learning rate (float or ``LearningRateSchedule``), or the ``schedule``
  given to the controller: any Keras schedule. Step decay (the LR times ``factor`` every ``n`` steps)
  is ``keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=n, decay_rate=factor,
  staircase=True)``; also ``CosineDecay``, ``PiecewiseConstantDecay``, ...
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

The policies live in :mod:`disttrain.lr_policies`; import them from here (``dt.lr.Warmup``, ...). The
controller takes over the optimizer's learning rate in :func:`replace_learning_rate`, the one place
that reaches into a Keras optimizer's internals.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from disttrain.callbacks import Callback
from disttrain.lr_policies import (FunctionRule, LinearScaling, LossThresholdCut, ReduceOnPlateau, Rule, Warmup,
                                   check_number, state_variable)

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

__all__ = ["FunctionRule", "LRController", "LinearScaling", "LossThresholdCut", "ReduceOnPlateau", "Rule",
           "Warmup", "controller_of", "set_learning_rate"]


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


def replace_learning_rate(optimizer: keras.optimizers.Optimizer, schedule: LearningRateSchedule) -> Any:
    """Makes ``schedule`` the learning rate of ``optimizer`` and returns the one it replaces (the LR
    variable of a float learning rate, a schedule, or a callable).

    The one place in disttrain that touches a Keras optimizer's internals: it sets the private
    ``_learning_rate``, which Keras 3.15 reads at every step (``_get_current_learning_rate``). The
    public setter (``optimizer.learning_rate = schedule``) would do the same, but for a float learning
    rate it also deletes the LR variable from the optimizer's tracked variable list, after which
    ``tf.train.Checkpoint(optimizer=...)`` refuses to save ("A list element was replaced ... or
    deleted"). Here the old variable stays tracked, unused. ``tests/test_lr.py::
    test_keras_learning_rate_internals`` fails when a Keras release changes either behaviour.
    """
    previous = optimizer._learning_rate
    optimizer._learning_rate = schedule
    return previous


_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> its LRController


def controller_of(optimizer: Any) -> "LRController | None":
    """The :class:`LRController` installed in ``optimizer``, or None.

    Args:
      optimizer: A Keras optimizer.
    """
    return _CONTROLLERS.get(optimizer)


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
            schedule = check_number("schedule", schedule, low=0,
                                    fix="pass a float LR or a keras LearningRateSchedule")
        self._scalings = tuple(scalings)
        self._warmup = warmups[0] if warmups else None
        self.rules = list(rules)
        self._schedule = schedule
        self.verbose = verbose
        self.base_lr = state_variable(0.0, "base_lr")  # used when the base is a float
        self.scale = state_variable(1.0, "scale")
        self.warmup_start = state_variable(1.0, "warmup_start")
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
        owner = controller_of(optimizer)
        if owner is not None and owner is not self:
            raise ValueError(f"optimizer {optimizer.name!r} already has an LRController ({owner.name!r}); use "
                             "one controller per optimizer and put all policies in it")
        if owner is None:
            if self._installed is not None:
                raise ValueError(f"LRController {self.name!r} already controls optimizer "
                                 f"{self._installed.optimizer.name!r}; create one controller per optimizer")
            current = replace_learning_rate(optimizer, _ControlledSchedule(self))
            base = self._schedule if self._schedule is not None else current
            if isinstance(base, (LearningRateSchedule,)) or (callable(base) and not hasattr(base, "numpy")):
                self._installed = _Installed(optimizer, base, backend)
            else:
                if self.base_lr.numpy() == 0.0 or self._schedule is not None:  # keep a restored base
                    self.base_lr.assign(float(np.asarray(base)))
                self._installed = _Installed(optimizer, None, backend)
            _CONTROLLERS[optimizer] = self
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

        Args:
          value: The new base learning rate.

        Raises:
          TypeError: If the base is a schedule.
          ValueError: For a negative or non-finite value.
        """
        if self._installed is not None and self._installed.base is not None:
            raise TypeError(f"the base LR is a schedule ({type(self._installed.base).__name__}) and cannot be "
                            "set; change the schedule, or add a Rule that sets the LR")
        self.base_lr.assign(check_number("learning rate", value, low=0))

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

        Args:
          step: A global step (0-based: the optimizer's ``iterations`` before the step).

        Raises:
          RuntimeError: If the controller is not installed yet.
        """
        if self._installed is None:
            raise RuntimeError(f"LRController {self.name!r} is not installed; pass it to Trainer(callbacks=...) "
                               "or call install(optimizer, backend=...)")
        return float(self._lr_tensor(tf.constant(int(step), tf.int64)).numpy())

    @property
    def learning_rate(self) -> float:
        """The LR the optimizer applies at its next step (identical on every rank).

        Raises:
          RuntimeError: If the controller is not installed yet.
        """
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
            new_lr = check_number(f"the LR from {rule.name}", new_lr, low=0,
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

    Args:
      optimizer: A Keras optimizer.
      value: The learning rate.

    Raises:
      TypeError: If the learning rate is a schedule (Keras cannot assign those): use an
        :class:`LRController` with a :class:`Rule` to change it.
    """
    controller = controller_of(optimizer)
    if controller is not None:
        controller.set_base_learning_rate(value)
        return
    try:
        optimizer.learning_rate = value  # Keras refuses (TypeError) when the learning rate is a schedule
    except (TypeError, AttributeError) as err:
        raise TypeError(f"the optimizer's learning rate is a schedule or a function, which cannot be set to "
                        f"{value!r}; use an LRController (its rules multiply the schedule) or a float learning "
                        "rate") from err
