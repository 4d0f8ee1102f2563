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

from disttrain import checkpoint_files, elastic_worker, exit_status
from disttrain.checkpoint_files import CheckpointError
from disttrain.preemption import DEFAULT_SIGNALS, PREEMPTION_EXIT_CODE, Preempted, SignalWatcher
from disttrain.loop.totals import Carry, EpochTotals

if TYPE_CHECKING:  # pragma: no cover
    from disttrain.callbacks import RunningTrainer

_FORMAT = 1
#: Seconds a process waits after the preemption barrier before it exits (see ``after_step``).
EXIT_LINGER_SECONDS = 1.0
#: ``fit`` arguments a resumed run must repeat: they fix which examples form global batch k.
RESUME_KEYS = ("global_batch_size", "shuffle_seed", "steps_per_epoch")
#: The checkpoint key of the run's position (the ``progress`` string variable).
PROGRESS_KEY = "progress/.ATTRIBUTES/VARIABLE_VALUE"


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


def session(config: Checkpointing | None, *, trainer: "RunningTrainer") -> "CheckpointSession | None":
    """The trainer's :class:`CheckpointSession` for ``Trainer(checkpointing=config)`` (None for None).

    Raises:
      TypeError: If ``config`` is not a :class:`Checkpointing`.
    """
    if config is None:
        return None
    if not isinstance(config, Checkpointing):
        raise TypeError(f"checkpointing must be a disttrain.Checkpointing, got {config!r}; e.g. "
                        "checkpointing=dt.Checkpointing('runs/exp/ckpt', every_steps=500)")
    return CheckpointSession(config=config, trainer=trainer)


class CheckpointSession:
    """Binds a :class:`Checkpointing` to one trainer (made by the trainer; not public API).

    Args:
      config: The user's :class:`Checkpointing`.
      trainer: The trainer whose state is saved.
    """

    def __init__(self, *, config: Checkpointing, trainer: "RunningTrainer"):
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
        self.elastic = elastic_worker.from_env(is_chief=backend.is_chief, directory=config.directory,
                                               every_steps=config.every_steps)  # None unless launched elastic

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
        step = self.trainer.position.global_step
        if self.elastic is not None:
            self.elastic.after_step(step=step, resumed_step=self._last_saved[0] if self.restored else None,
                                    size=self.backend.size)
        every = self.config.every_steps
        if stop or due or (every and step % every == 0):
            path = self.save(carry=totals.carry())
            if stop:
                self.backend.barrier()  # nobody exits (and makes a launcher kill the others) before the save
                preempted = Preempted(step=step, checkpoint=path)
                # Said (and recorded for `disttrain run`) before lingering: mpirun's default gives a rank 1 s
                # from SIGTERM to SIGKILL, and a kill during the linger used to swallow this line.
                if self.backend.is_chief:
                    position = self.trainer.position
                    print(f"disttrain: preempted after global step {step} (epoch {position.epoch + 1}, step "
                          f"{position.epoch_step}/{position.epoch_steps}); saved {path}; exiting with code "
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

        The new checkpoint counts (becomes the latest, and lets rotation delete the oldest) only after it
        read back. With several processes, each one's outcome is agreed in one small all-reduce, so a
        failed save stops every process with the same message.

        Returns:
          The checkpoint's path on the chief; None elsewhere.

        Raises:
          CheckpointError: On every process, if a process could not write its part (disk full, not
            writable, or it did not read back): the message names the directory, the rank, the
            checkpoint's size and the free space; its partial files are removed.
        """
        trainer, position = self.trainer, self.trainer.position
        progress = Progress(global_step=position.global_step, epoch=position.epoch, epoch_step=position.epoch_step,
                            fit={k: trainer.fit_config.get(k) for k in RESUME_KEYS}, carry=carry,
                            epoch_lr=trainer.epoch_lr, history=trainer.history,
                            writer={"backend": self.backend.name, "processes": self.backend.size,
                                    "replicas": self.backend.num_replicas})
        self._progress.assign(progress.to_json())
        path, failure = None, None
        if self._manager is not None:
            try:
                # numbered by the checkpoint's save counter: never overwritten; verified before it counts
                path = self._manager.save(options=tf.train.CheckpointOptions(
                    experimental_write_callbacks=[checkpoint_files.verify_save]))
            except (tf.errors.OpError, OSError, CheckpointError) as err:
                failure = self._failed_save(err)
            if path is not None and self._writer_dir != self.config.directory:
                shutil.rmtree(self._writer_dir, ignore_errors=True)  # a worker's private copy: only its taking
                path = None                                          # part mattered
        self._agree_on_save(failure)
        self._last_saved = self._position()
        self._last_save_time = time.monotonic()
        return path

    def _failed_save(self, err: BaseException) -> str:
        """Cleans up after this process's failed save; returns the message."""
        counter = self.checkpoint.save_counter
        attempted = os.path.join(self._writer_dir, f"{checkpoint_files.PREFIX}-{int(counter.numpy())}")
        checkpoint_files.remove_partial(attempted)
        counter.assign_sub(1)  # the number is free again
        return checkpoint_files.describe_save_failure(path=attempted, err=err, rank=self.backend.rank,
                                                      previous=self._manager.latest_checkpoint,
                                                      variables_bytes=self._variables_bytes(),
                                                      private=self._writer_dir != self.config.directory)

    def _agree_on_save(self, failure: str | None) -> None:
        """Every process learns whether every process saved (one all-reduce of one flag per rank)."""
        flags = checkpoint_files.per_rank(self.backend, int(failure is not None))
        if failure is not None:
            print(f"disttrain: {failure}", file=sys.stderr, flush=True)
            raise CheckpointError(failure)
        if flags.any():
            ranks = ", ".join(str(r) for r in np.flatnonzero(flags))
            raise CheckpointError(f"rank(s) {ranks} could not write their part of the checkpoint to "
                                  f"{self.config.directory!r} (their message says why: disk full, not writable); "
                                  "every process stops; the previous checkpoint is intact")

    def _variables_bytes(self) -> int:
        """The bytes of the models' and optimizers' variables (a checkpoint's size before one exists)."""
        objects = [*self.trainer.models, *self.trainer.optimizers]
        return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for o in objects for v in o.variables)

    def save_at_end(self) -> None:
        """The final save of ``fit`` (skipped when this position is saved already)."""
        if self.config.save_at_end and self._last_saved != self._position():
            self.save(carry=None)

    def _position(self) -> tuple[int, int, int]:
        position = self.trainer.position
        return position.global_step, position.epoch, position.epoch_step

    # -- restoring -----------------------------------------------------------------------------
    def restore(self) -> Progress | None:
        """Restores the newest checkpoint that loads, on every process (collective); returns its progress.

        First checks that the directory is writable and the same on every process. Checkpoints that do not
        load (a missing index, truncated or garbled data, a position that does not parse) are reported
        with the reason and skipped for the next older one, and moved to ``damaged/``; see
        :mod:`disttrain.checkpoint_files`.

        Returns:
          The restored checkpoint's progress, or None when the directory holds no checkpoint.

        Raises:
          CheckpointError: If the directory is not usable by every process, or it holds checkpoints and
            none of them loads (nothing is deleted then).
          ValueError: If a process cannot see the checkpoint rank 0 sees, the checkpoint does not match
            the trainer, or the run's ``fit`` arguments differ from the saved run's.
        """
        backend, directory = self.backend, self.config.directory
        checkpoint_files.check_directory(directory, backend=backend, writer_dir=self._writer_dir)
        self._remove_leftovers()
        found = checkpoint_files.candidates(directory)
        self._agree(found[0] if found else None, what="newest checkpoint")
        if not found:
            return None
        chosen, rejected = None, []
        for path in found:
            reason = checkpoint_files.problem(path, parse=Progress.from_json, parse_key=PROGRESS_KEY)
            if reason is None:
                reason = self._try_restore(path)
            if reason is None:
                chosen = path
                break
            rejected.append((path, reason))
        self._agree(chosen, what="checkpoint that loads")
        if chosen is None:
            listing = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in rejected)
            raise CheckpointError(f"none of the {len(rejected)} checkpoint(s) in {directory!r} loads ({listing}); "
                                  "nothing was deleted: move them away (or give Checkpointing a new directory) "
                                  "to start afresh, or restore the files from a copy")
        progress = Progress.from_json(self._progress.numpy().decode())
        self._check_same_run(progress, chosen)
        if rejected:
            self._set_aside(rejected, chosen=chosen, older=found[len(rejected) + 1:], progress=progress)
        self._last_saved = (progress.global_step, progress.epoch, progress.epoch_step)
        self.restored = True
        if backend.is_chief:
            where = (f"epoch {progress.epoch + 1}, step {progress.epoch_step}" if progress.epoch_step
                     else f"the start of epoch {progress.epoch + 1}")
            writer = progress.writer
            print(f"disttrain: resuming from {chosen} at {where} (global step {progress.global_step}); saved by "
                  f"{writer['backend']} with {writer['processes']} process(es) and {writer['replicas']} replica(s); "
                  f"this run: {backend.name} with {backend.size} and {backend.num_replicas}", file=sys.stderr, flush=True)
        return progress

    def _try_restore(self, path: str) -> str | None:
        """Restores ``path`` into the trainer's objects; the reason it does not load, or None.

        Raises:
          ValueError: If it loads but holds other objects than this trainer's (not damage: no fallback).
        """
        try:
            status = self.checkpoint.restore(path)
            status.assert_existing_objects_matched()
        except checkpoint_files.LOAD_ERRORS as err:
            return checkpoint_files.load_error(err)
        except (AssertionError, ValueError) as err:
            raise ValueError(f"checkpoint {path!r} does not match this trainer's models, optimizers or "
                             f"callbacks ({str(err)[:400]}); resume with the same objects, or give "
                             "Checkpointing a new directory to start afresh") from None
        status.expect_partial()
        return None

    def _agree(self, path: str | None, *, what: str) -> None:
        """Every process must pick the same checkpoint (one all-reduce of two integers)."""
        number = checkpoint_files.number(path)
        agreed = self.backend.all_reduce(np.array([number, -number], np.int64), "min")
        if int(agreed[0]) != -int(agreed[1]):
            raise ValueError(f"the processes see different checkpoints in {self.config.directory!r}: this is rank "
                             f"{self.backend.rank}, its {what} is {path!r}; put the checkpoint directory on a "
                             "filesystem that every process shares")

    def _set_aside(self, rejected: list[tuple[str, str]], *, chosen: str, older: list[str],
                   progress: Progress) -> None:
        """Warns about the damaged checkpoints newer than ``chosen``; the writer moves them to ``damaged/``
        and rewrites the state file, so no save reuses their numbers and rotation counts only loadable ones."""
        directory = self.config.directory
        moved = self._writer_dir == directory
        if moved:
            checkpoint_files.set_aside(directory, [p for p, _ in rejected])
            checkpoint_files.rewrite_state(directory, latest=chosen, older=list(reversed(older)))
            self._manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=self.config.keep)
        if self.backend.is_chief:
            for path, reason in rejected:
                print(f"disttrain: WARNING: checkpoint {path} does not load: {reason}", file=sys.stderr, flush=True)
            where = f"; their files are moved to {os.path.join(directory, checkpoint_files.DAMAGED_DIR)}/" \
                if moved else ""
            print(f"disttrain: WARNING: resuming from {chosen} (global step {progress.global_step}), the newest "
                  f"checkpoint that loads, instead of {rejected[0][0]}{where}", file=sys.stderr, flush=True)

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
