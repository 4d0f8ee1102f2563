"""Callbacks: the hooks :meth:`disttrain.Trainer.fit` calls with globally reduced values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol, Sequence

import keras
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from disttrain.backends import Backend


class Position(Protocol):
    """What callbacks read of the run's position (the trainer's :class:`disttrain.loop.position.RunPosition`,
    which only the training loop writes): read-only here."""

    @property
    def global_step(self) -> int:
        """Train steps done."""

    @property
    def epoch(self) -> int:
        """The epoch under way (0-based)."""

    @property
    def epoch_step(self) -> int:
        """Steps of the epoch done."""

    @property
    def epoch_steps(self) -> int | None:
        """Steps the epoch has (None: not known)."""


class RunningTrainer(Protocol):
    """What a callback (and checkpointing, step logs, summaries) may use of the running
    :class:`disttrain.Trainer`: typed against this, those modules need not import the trainer's module.

    Attributes:
      backend: The trainer's backend.
      position: Where the loop is (:class:`Position`: read it, never write it; the trainer also has its
        fields as read-only attributes, ``trainer.global_step`` ...).
      callbacks: The trainer's callbacks, in order.
      models: The trainer's models.
      optimizers: The trainer's optimizers; ``optimizer`` is the first, whose learning rate is logged.
      optimizer: The first optimizer.
      global_batch_size: The running ``fit``'s global batch.
      fit_config: The running ``fit``'s arguments.
      history: ``{name: [value per epoch]}``.
      epoch_lr: The learning rate logged for the running epoch.
      verbose: The trainer's ``verbose``.
      stop_training: Set True to stop ``fit`` after the running epoch.
    """

    backend: "Backend"
    position: Position
    callbacks: list
    models: list
    optimizers: list
    optimizer: Any
    global_batch_size: int
    fit_config: dict
    history: dict
    epoch_lr: float | None
    verbose: int
    stop_training: bool

    @property
    def trainable_variables(self) -> list:
        """The trainable variables of every model."""

    def dispatch(self, hook: str, *args: Any) -> None:
        """Calls ``callback.<hook>(trainer, *args)`` on every callback."""

    def print(self, text: str) -> None:
        """Prints a line where the trainer's epoch lines go."""

    def run_config(self) -> dict[str, Any]:
        """The run's configuration."""


class Callback:
    """Hooks called by :meth:`Trainer.fit` on every process with the same, globally reduced, values.

    Callbacks that write or print should do so on ``trainer.backend.is_chief`` only.

    Attributes:
      histogram_every_steps: When > 0, :meth:`on_histograms` is called every so many train steps.
      wants_gradients: When True (with ``histogram_every_steps``), those calls get the global gradients.
    """

    histogram_every_steps: int = 0
    wants_gradients: bool = False

    def on_train_begin(self, trainer: "RunningTrainer") -> None:
        """When ``fit`` starts (after a checkpoint, if any, was restored).

        Args:
          trainer: The running :class:`disttrain.Trainer`.
        """

    def on_train_end(self, trainer: "RunningTrainer", logs: dict[str, float]) -> None:
        """After the last epoch (also after a preemption, before the exit).

        Args:
          trainer: The running :class:`disttrain.Trainer`.
          logs: The last epoch's logs.
        """

    def on_step_logs(self, trainer: "RunningTrainer", step: int, logs: dict[str, float]) -> None:
        """Every ``log_every_steps`` train steps, with the running epoch values reduced over all processes.

        Args:
          trainer: The running :class:`disttrain.Trainer`; ``trainer.position`` (``epoch``, ``epoch_step``,
            ``epoch_steps``, also ``trainer.epoch`` ...) says where in the epoch it is.
          step: The global train step (continues across epochs).
          logs: Each step output's running mean over the epoch, each metric, ``lr``, and
            ``examples_per_sec`` / ``step_time`` over the steps since the last call (the calls that
            traced a step function left out, see ``disttrain.loop.step_logs``).
        """

    def on_histograms(self, trainer: "RunningTrainer", step: int, gradients: dict) -> None:
        """Every ``histogram_every_steps`` train steps.

        Args:
          trainer: The running :class:`disttrain.Trainer`.
          step: The global train step.
          gradients: Variable paths to the global gradients (summed over all replicas, i.e. what the
            optimizer applied) when ``wants_gradients``, else empty.
        """

    def on_epoch_begin(self, trainer: "RunningTrainer", epoch: int) -> None:
        """Before an epoch's first step.

        Args:
          trainer: The running :class:`disttrain.Trainer`.
          epoch: The epoch's index (0-based).
        """

    def on_epoch_end(self, trainer: "RunningTrainer", epoch: int, logs: dict[str, float]) -> None:
        """After an epoch (and its validation), before its logs join the history.

        Args:
          trainer: The running :class:`disttrain.Trainer`.
          epoch: The epoch's index (0-based).
          logs: The epoch's global values: step outputs, metrics, ``val_*``, ``lr``, ``examples_per_sec``
            and ``step_time`` (the calls that traced a step function left out, unless all did).
        """


def dispatch(callbacks: Sequence[Callback], hook: str, trainer: "RunningTrainer", *args: Any,
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
    """The learning rate the optimizer applies at its next step (evaluates schedules).

    Args:
      optimizer: A Keras optimizer.
    """
    lr = optimizer._get_current_learning_rate() if hasattr(optimizer, "_get_current_learning_rate") \
        else optimizer.learning_rate
    return float(np.asarray(lr))
