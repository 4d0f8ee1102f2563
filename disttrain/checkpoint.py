"""Checkpoints of a whole training run and exact resume, on any backend and any number of replicas.

    ckpt = dt.Checkpointing("runs/exp1/ckpt", every_steps=500, every_seconds=600, keep=3)
    trainer = dt.Trainer(..., checkpointing=ckpt)
    trainer.fit(data, global_batch_size=256, epochs=90, shuffle_seed=0)  # resumes if a checkpoint exists

What a checkpoint holds (one ``tf.train.Checkpoint``, written by ``tf.train.CheckpointManager``): every
model and optimizer of the trainer, every callback that is a ``tf.Module`` (an ``LRController`` and its
rules), the ``extra`` objects you add, and one string variable with the run's position as JSON: global
step, epoch, step within the epoch, the ``fit`` arguments that fix the data order (global batch,
shuffle seed, steps per epoch), the global sums of the unfinished epoch (step outputs and metric
states) and the history so far.

The data position is derived from (seed, epoch, step): each epoch's order depends only on the seed and
the epoch, and a resumed epoch skips the steps already done. No iterator state is saved, which is why
the same checkpoint resumes under any backend and any number of replicas: the global batch k is the
same everywhere (element sharding; file sharding gives each process other files when their number
changes). Checkpoints are numbered by their save counter (``ckpt-1``, ``ckpt-2``, ...), never rewritten:
TensorFlow renames a checkpoint into place, but rewriting an existing name would not be atomic. See
docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import tensorflow as tf

from disttrain import exit_status
from disttrain.preemption import DEFAULT_SIGNALS, PREEMPTION_EXIT_CODE, Preempted, SignalWatcher
from disttrain.totals import Carry, EpochTotals

if TYPE_CHECKING:  # pragma: no cover
    from disttrain.trainer import Trainer

_FORMAT = 1
#: Seconds a process waits after the preemption barrier before it exits (see ``after_step``).
EXIT_LINGER_SECONDS = 1.0
#: ``fit`` arguments a resumed run must repeat: they fix which examples form global batch k.
RESUME_KEYS = ("global_batch_size", "shuffle_seed", "steps_per_epoch")


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stood when a checkpoint was saved (stored as JSON inside the checkpoint).

    Attributes:
      global_step: Train steps done.
      epoch: The epoch under way (0-based); ``epoch_step`` of its steps are done.
      epoch_step: Steps of ``epoch`` done (0 at an epoch's start).
      fit: The ``fit`` arguments of :data:`RESUME_KEYS`.
      carry: Global sums of the unfinished epoch, or None at an epoch's start.
      epoch_lr: The learning rate logged for ``epoch`` (the one of its first step).
      history: ``trainer.history`` of the finished epochs.
      writer: Backend, processes and replicas of the run that saved it.
    """

    global_step: int
    epoch: int
    epoch_step: int
    fit: dict[str, Any]
    carry: Carry | None
    epoch_lr: float | None
    history: dict[str, list[float]]
    writer: dict[str, Any]

    def to_json(self) -> str:
        value = dataclasses.asdict(self)
        value["carry"] = self.carry.to_json() if self.carry is not None else None
        return json.dumps({"format": _FORMAT, **value})

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        value = json.loads(text)
        if value.pop("format", None) != _FORMAT:
            raise ValueError(f"unknown checkpoint progress format in {text[:80]!r}")
        carry = value.pop("carry")
        return cls(carry=Carry.from_json(carry) if carry is not None else None, **value)


class Checkpointing:
    """Periodic checkpoints of a :class:`disttrain.Trainer`, exact resume, and preemption handling.

    Pass it as ``Trainer(checkpointing=...)``. ``fit`` then restores the latest checkpoint in
    ``directory`` when it starts (every process loads the checkpoint rank 0 names), continues at the
    exact next global batch, saves every ``every_steps`` steps and/or ``every_seconds`` seconds and when
    training ends, and keeps the last ``keep``. A SIGTERM or SIGINT to any process (see
    :mod:`disttrain.preemption`) makes every process stop after its next step, save, and exit with
    code 42; running the same command again resumes.

    Args:
      directory: Where checkpoints go; on a filesystem every process can read (the chief writes it).
      every_steps: Save every so many global steps (decided from the step count alone).
      every_seconds: Save when this many seconds passed since the last save (the chief's clock, agreed
        through the all-reduce every step carries).
      keep: Checkpoints to keep (older ones are deleted).
      signals: Signals that request a preemption stop; ``()`` leaves signals alone.
      extra: More objects to save and restore, ``{name: trackable}`` (``tf.Variable``, ``tf.Module``,
        Keras objects), e.g. a replay buffer's counters.
      save_at_end: Save when ``fit`` finishes (a second run of the command then has nothing to do).
      exit_on_preemption: After the preemption checkpoint, end the process at once with code 42
        (see :mod:`disttrain.preemption` for why); False raises :class:`disttrain.Preempted` instead.

    Raises:
      ValueError: For a non-positive interval or ``keep``, or an ``extra`` name that is taken.
    """

    def __init__(self, directory: str | os.PathLike, *, every_steps: int | None = None,
                 every_seconds: float | None = None, keep: int = 3, signals: Iterable[int] = DEFAULT_SIGNALS,
                 extra: Mapping[str, Any] | None = None, save_at_end: bool = True,
                 exit_on_preemption: bool = True):
        for name, value in (("every_steps", every_steps), ("every_seconds", every_seconds)):
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"Checkpointing {name}={value!r} must be > 0 (or None for never)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointing keep={keep!r} must be an int >= 1 (checkpoints to keep)")
        extra = dict(extra or {})
        taken = sorted(set(extra) & {"models", "optimizers", "callbacks", "progress"})
        if taken:
            raise ValueError(f"Checkpointing extra names {taken} are taken by disttrain; rename them")
        self.directory = os.fspath(directory)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.keep = keep
        self.signals = tuple(signals)
        self.extra = extra
        self.save_at_end = save_at_end
        self.exit_on_preemption = exit_on_preemption

    def __repr__(self) -> str:
        return (f"Checkpointing({self.directory!r}, every_steps={self.every_steps}, "
                f"every_seconds={self.every_seconds}, keep={self.keep})")


class CheckpointSession:
    """Binds a :class:`Checkpointing` to one trainer (made by the trainer; not public API).

    Args:
      config: The user's :class:`Checkpointing`.
      trainer: The trainer whose state is saved.
    """

    def __init__(self, *, config: Checkpointing, trainer: "Trainer"):
        self.config, self.trainer = config, trainer
        backend = trainer.backend
        self.backend = backend
        with tf.device("/cpu:0"):
            self._progress = tf.Variable("", dtype=tf.string, trainable=False, name="disttrain_progress")
        modules = [c for c in trainer.callbacks if isinstance(c, tf.Module)]
        self.checkpoint = tf.train.Checkpoint(models=list(trainer.models), optimizers=list(trainer.optimizers),
                                              callbacks=modules, progress=self._progress, **config.extra)
        self._writer_dir = backend.checkpoint_writer(config.directory)
        self._manager = None
        if self._writer_dir is not None:
            is_chief = self._writer_dir == config.directory
            self._manager = tf.train.CheckpointManager(self.checkpoint, self._writer_dir,
                                                       max_to_keep=config.keep if is_chief else 1)
        self.watcher = SignalWatcher(signals=config.signals, rank=backend.rank)
        self._last_saved: tuple[int, int, int] | None = None  # (global step, epoch, epoch step)
        self._last_save_time = time.monotonic()
        self.restored = False

    # -- every step ----------------------------------------------------------------------------
    def control(self) -> tf.Tensor:
        """This process's flags for the step about to run: ``[stop requested, time-based save due]``."""
        due = (self.config.every_seconds is not None and self.backend.is_chief
               and time.monotonic() - self._last_save_time >= self.config.every_seconds)
        return tf.constant([int(self.watcher.requested is not None), int(due)], tf.int32)

    def after_step(self, *, control: Any, totals: EpochTotals) -> None:
        """Saves when a save is due; after a preemption signal on any process, saves and raises
        :class:`Preempted` on every process.

        Args:
          control: The step's flags, maximised over all processes (identical everywhere).
          totals: The running epoch totals (their global sums go into the checkpoint).
        """
        stop, due = (int(v) for v in np.asarray(control))
        step = self.trainer.global_step
        every = self.config.every_steps
        if stop or due or (every and step % every == 0):
            path = self.save(carry=totals.carry())
            if stop:
                self.backend.barrier()  # nobody exits (and makes a launcher kill the others) before the save
                preempted = Preempted(step=step, checkpoint=path)
                # Said (and recorded for `disttrain run`) before lingering: mpirun's default gives a rank 1 s
                # from SIGTERM to SIGKILL, and a kill during the linger used to swallow this line.
                if self.backend.is_chief:
                    trainer = self.trainer
                    print(f"disttrain: preempted after global step {step} (epoch {trainer.epoch + 1}, step "
                          f"{trainer.epoch_step}/{trainer.epoch_steps}); saved {path}; exiting with code "
                          f"{PREEMPTION_EXIT_CODE}; run the same command to resume",
                          file=sys.stderr, flush=True)
                exit_status.record(code=PREEMPTION_EXIT_CODE, reason=str(preempted))
                if self.backend.size > 1:
                    # Leaving the barrier's collective, this process may still be sending to a peer that has
                    # not left it; exiting at once can cut that connection ("Collective ops is aborted by:
                    # Socket closed" on the peer). A moment lets every process leave the barrier.
                    time.sleep(EXIT_LINGER_SECONDS)
                raise preempted

    # -- saving --------------------------------------------------------------------------------
    def save(self, *, carry: Carry | None) -> str | None:
        """Saves the trainer's state now (every process must call it at the same step).

        Returns:
          The checkpoint's path on the chief; None elsewhere.
        """
        trainer = self.trainer
        progress = Progress(global_step=trainer.global_step, epoch=trainer.epoch, epoch_step=trainer.epoch_step,
                            fit={k: trainer.fit_config.get(k) for k in RESUME_KEYS}, carry=carry,
                            epoch_lr=trainer.epoch_lr, history=trainer.history,
                            writer={"backend": self.backend.name, "processes": self.backend.size,
                                    "replicas": self.backend.num_replicas})
        self._progress.assign(progress.to_json())
        path = None
        if self._manager is not None:
            path = self._manager.save()  # numbered by the checkpoint's save counter: never overwritten
            if self._writer_dir != self.config.directory:  # a worker's private copy: only its taking part mattered
                shutil.rmtree(self._writer_dir, ignore_errors=True)
                path = None
        self._last_saved = self._position()
        self._last_save_time = time.monotonic()
        return path

    def save_at_end(self) -> None:
        """The final save of ``fit`` (skipped when this position is saved already)."""
        if self.config.save_at_end and self._last_saved != self._position():
            self.save(carry=None)

    def _position(self) -> tuple[int, int, int]:
        trainer = self.trainer
        return trainer.global_step, trainer.epoch, trainer.epoch_step

    # -- restoring -----------------------------------------------------------------------------
    def restore(self) -> Progress | None:
        """Restores the latest checkpoint on every process (collective); returns its progress or None.

        Raises:
          ValueError: If a process cannot see the checkpoint rank 0 sees, the checkpoint does not match
            the trainer, or the run's ``fit`` arguments differ from the saved run's.
        """
        backend, directory = self.backend, self.config.directory
        self._remove_leftovers()
        latest = tf.train.latest_checkpoint(directory)
        number = _checkpoint_number(latest)
        agreed = backend.all_reduce(np.array([number, -number], np.int64), "min")
        if int(agreed[0]) != -int(agreed[1]):
            raise ValueError(f"the processes see different latest checkpoints in {directory!r} (this is rank "
                             f"{backend.rank}, it sees {latest!r}); put the checkpoint directory on a filesystem "
                             "that every process shares")
        if latest is None:
            return None
        try:
            status = self.checkpoint.restore(latest)
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            raise ValueError(f"checkpoint {latest!r} does not match this trainer's models, optimizers or "
                             f"callbacks ({str(err)[:400]}); resume with the same objects, or give "
                             "Checkpointing a new directory to start afresh") from None
        status.expect_partial()
        progress = Progress.from_json(self._progress.numpy().decode())
        self._check_same_run(progress, latest)
        self._last_saved = (progress.global_step, progress.epoch, progress.epoch_step)
        self.restored = True
        if backend.is_chief:
            where = (f"epoch {progress.epoch + 1}, step {progress.epoch_step}" if progress.epoch_step
                     else f"the start of epoch {progress.epoch + 1}")
            writer = progress.writer
            print(f"disttrain: resuming from {latest} at {where} (global step {progress.global_step}); saved by "
                  f"{writer['backend']} with {writer['processes']} process(es) and {writer['replicas']} replica(s); "
                  f"this run: {backend.name} with {backend.size} and {backend.num_replicas}", file=sys.stderr, flush=True)
        return progress

    def _check_same_run(self, progress: Progress, path: str) -> None:
        fit = self.trainer.fit_config
        for key in RESUME_KEYS:
            saved, now = progress.fit.get(key), fit.get(key)
            if saved != now:
                raise ValueError(f"checkpoint {path!r} was saved by a run with {key}={saved!r}, this run has "
                                 f"{key}={now!r}: resume with {key}={saved!r} (the examples of global batch k "
                                 "depend on it), or give Checkpointing a new directory to start afresh")

    def _remove_leftovers(self) -> None:
        """Removes what a save killed midway left (TF writes into ``<prefix>_temp/`` and renames, and the
        state file changes only after that, so those directories are never a checkpoint)."""
        if self._writer_dir is None:
            return
        if self._writer_dir != self.config.directory:
            shutil.rmtree(self._writer_dir, ignore_errors=True)
            return
        for leftover in glob.glob(os.path.join(self.config.directory, "*_temp")):
            shutil.rmtree(leftover, ignore_errors=True)


def _checkpoint_number(path: str | None) -> int:
    """The save counter of ``.../ckpt-<n>`` (-1 for None)."""
    if path is None:
        return -1
    try:
        return int(path.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"unexpected checkpoint name {path!r}; disttrain's checkpoints are named ckpt-<n>"
                         ) from None
