"""Where a run stands: the one record of the training loop's position.

The :class:`disttrain.Trainer` owns one :class:`RunPosition` (``trainer.position``) and only its loop
(``disttrain/trainer.py``) writes it; step logs, checkpointing, progress, summaries and callbacks read it
(``tests/test_structure.py`` checks that nothing else assigns its fields).
"""

from __future__ import annotations

import dataclasses

from disttrain.backends import failures


@dataclasses.dataclass
class RunPosition:
    """The training loop's position: what it has done, counted in global train steps.

    Attributes:
      global_step: Train steps done, over every ``fit`` of the trainer (and the run it resumed).
      epoch: The epoch under way, or the next one between epochs (0-based).
      epoch_step: Steps of ``epoch`` done (0 at an epoch's start).
      epoch_steps: Steps ``epoch`` has (None while a pipeline of unknown length runs without step logs;
        with them, the best guess of its length).
    """

    global_step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    epoch_steps: int | None = 0

    def describe(self) -> str:
        """``after global step 7 (epoch 2, step 3/4)`` (``?`` for an unknown length): for the stall watchdog."""
        steps = self.epoch_steps if self.epoch_steps is not None else "?"
        return f"after global step {self.global_step} (epoch {self.epoch + 1}, step {self.epoch_step}/{steps})"

    def for_failure(self, *, running: bool = False) -> failures.Position:
        """The position a failure report names: in the next train step (``running``) or after the last one."""
        return failures.Position(global_step=self.global_step + running, epoch=self.epoch + 1,
                                 epoch_step=self.epoch_step + running, epoch_steps=self.epoch_steps,
                                 running=running)


class PositionField:
    """A read-only attribute of an owner of a :class:`RunPosition` (in ``self.position``): the trainer's
    ``global_step``, ``epoch``, ``epoch_step`` and ``epoch_steps`` read the position's field of that name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, owner: object, owner_type: type | None = None):
        if owner is None:
            return self
        return getattr(owner.position, self.name)

    def __set__(self, owner: object, value: object) -> None:
        raise AttributeError(f"trainer.{self.name} is read-only: the training loop keeps the run's position "
                             f"(trainer.position); set initial_epoch= in fit, or resume from a checkpoint")
