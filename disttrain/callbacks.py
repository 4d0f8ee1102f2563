"""Callbacks: the hooks :meth:`disttrain.Trainer.fit` calls with globally reduced values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import keras
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from disttrain.trainer import Trainer


class Callback:
    """Hooks called by :meth:`Trainer.fit` on every process with the same, globally reduced, values.

    Callbacks that write or print should do so on ``trainer.backend.is_chief`` only.

    Attributes:
      histogram_every_steps: When > 0, :meth:`on_histograms` is called every so many train steps.
      wants_gradients: When True (with ``histogram_every_steps``), those calls get the global gradients.
    """

    histogram_every_steps: int = 0
    wants_gradients: bool = False

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

    def on_train_end(self, trainer: "Trainer", logs: dict[str, float]) -> None:
        """After the last epoch; ``logs`` are the last epoch's logs."""

    def on_step_logs(self, trainer: "Trainer", step: int, logs: dict[str, float]) -> None:
        """Every ``log_every_steps`` train steps, with the running epoch values reduced over all processes.

        ``step`` is the global train step (continues across epochs); ``trainer.epoch``,
        ``trainer.epoch_step`` and ``trainer.epoch_steps`` say where in the epoch it is.
        """

    def on_histograms(self, trainer: "Trainer", step: int, gradients: dict) -> None:
        """Every ``histogram_every_steps`` steps; ``gradients`` maps variable paths to the global gradients
        (summed over all replicas, i.e. what the optimizer applied) when ``wants_gradients``, else is empty."""

    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None:
        pass


def dispatch(callbacks: Sequence[Callback], hook: str, trainer: "Trainer", *args: Any,
             phase: Callable[[str], ContextManager] | None = None) -> None:
    """Calls ``callback.<hook>(trainer, *args)`` on every callback, in order; each call inside
    ``phase("<Callback class>.<hook>")`` when given (the stall watchdog's timed phase)."""
    for callback in callbacks:
        if phase is None:
            getattr(callback, hook)(trainer, *args)
            continue
        with phase(f"{type(callback).__name__}.{hook}"):
            getattr(callback, hook)(trainer, *args)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer applies at its next step (evaluates schedules)."""
    lr = optimizer._get_current_learning_rate() if hasattr(optimizer, "_get_current_learning_rate") \
        else optimizer.learning_rate
    return float(np.asarray(lr))
