"""Where a run stands: the one record of the training loop's position.

The :class:`disttrain.Trainer` owns one :class:`RunPosition` (``trainer.position``) and only its loop
(``disttrain/trainer.py``) writes it; step logs, checkpointing, progress, summaries and callbacks read it
(``tests/test_structure.py`` checks that nothing else assigns its fields).
"""

from __future__ import annotations

import dataclasses


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
