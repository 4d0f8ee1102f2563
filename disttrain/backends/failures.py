"""Network loss named: a collective that fails or times out ends as :class:`CollectiveError`, naming the
backend, the step, the unreachable peer and what to do.

    try:
        trainer.fit(...)
    except dt.CollectiveError as err:       # a RuntimeError
        print(err.peers, err.global_step)   # e.g. ('rank 1 (worker 1 at 10.0.0.2:40123)',), 7

When the network between two processes breaks (or a peer's host dies or stops answering), each backend
ends its collectives in its own way and with its own words:

  * MultiWorker: TensorFlow's coordination service misses the peer's heartbeats for its heartbeat timeout
    (10 s) and aborts every collective with "The following tasks are unhealthy (stopped sending
    heartbeats): /job:worker/replica:0/task:1"; the far side's heartbeats to the service time out
    ("DEADLINE_EXCEEDED ... CoordinationService/Heartbeat").
  * Horovod with Gloo: a send or receive waits ``HOROVOD_GLOO_TIMEOUT_SECONDS`` (default 30); Horovod's
    background thread logs Gloo's error ("Timed out waiting 30000ms ...", "Connection closed by peer")
    and shuts down, and every pending or later collective fails with "Horovod has been shut down".
  * MPI: a rank that dies makes mpirun end the whole job at once (mpirun names the rank); OpenMPI's TCP
    transport between hosts has no timeout of its own, so the stall watchdog bounds a partition
    (``DISTTRAIN_STEP_TIMEOUT``, on by default).

The backend translates its own errors (:meth:`disttrain.Backend.describe_collective_failure`: which peer,
read from the error text or found by a quick TCP probe of the peers' addresses, see
:mod:`disttrain.backends.reachability`); :func:`translating` wraps the place a collective or a compiled
step is called and raises the :class:`CollectiveError`, and the trainer adds the step and how to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator


@dataclasses.dataclass(frozen=True)
class CollectiveFailure:
    """A backend's reading of an error raised by its collectives (see ``describe_collective_failure``).

    Attributes:
      summary: What the backend's error says, in plain words (e.g. "TensorFlow's coordination service
        stopped hearing worker 1's heartbeats").
      peers: The peers found unreachable or lost, each as ``"rank 1 (worker 1 at host:port)"``; empty
        when neither the error nor a probe can tell.
      next_step: What to check, e.g. "check the network between 10.0.0.1 and 10.0.0.2".
      unknown_why: Why the peer is unknown (shown when ``peers`` is empty).
    """

    summary: str
    peers: tuple[str, ...] = ()
    next_step: str = ""
    unknown_why: str = ""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the training loop was: in global step ``global_step`` (running) or after it (finished)."""

    global_step: int
    epoch: int
    epoch_step: int
    epoch_steps: int | None
    running: bool

    def describe(self) -> str:
        total = self.epoch_steps if self.epoch_steps is not None else "?"
        return (f"{'in' if self.running else 'after'} global step {self.global_step} (epoch {self.epoch}, "
                f"step {self.epoch_step}/{total})")


def resume_hint(checkpoint_directory: str | None) -> str:
    """How to go on after a lost peer, given the run's checkpoint directory (None: no checkpoints)."""
    if checkpoint_directory is not None:
        return f"then rerun the same command: it resumes from the last checkpoint in {checkpoint_directory!r}"
    return ("then rerun the same command (it starts from the beginning; with Trainer(checkpointing="
            "dt.Checkpointing(...)) it would resume)")


def _first_lines(err: BaseException, limit: int = 400) -> str:
    """The error's type and words, without TensorFlow's "Detected at node ... defined at" traceback."""
    lines = [line.strip() for line in str(getattr(err, "message", None) or err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("File ", "Graph execution error", "Detected at node"))]
    text = " ".join(kept)
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer was lost (a network partition, a dead or stopped host).

    Attributes:
      backend: The backend's name (``multiworker``, ``horovod``, ...).
      rank, size: This process and the number of processes.
      peers: The unreachable peers named (empty when unknown).
      phase: What was running (a compiled step, or an eager collective and its caller).
      global_step, epoch, epoch_step: The step (1-based epoch and step within it); None outside ``fit``.
      cause: The backend's own error.

    Args:
      backend: The backend's name.
      rank: This process's rank.
      size: The number of processes.
      failure: What the backend read from its error (summary, peers, next step).
      phase: What was running.
      cause: The backend's own error.
    """

    def __init__(self, *, backend: str, rank: int, size: int, failure: CollectiveFailure, phase: str,
                 cause: BaseException):
        self.backend, self.rank, self.size, self.failure, self.phase, self.cause = backend, rank, size, failure, phase, cause
        self.peers = failure.peers
        self.global_step = self.epoch = self.epoch_step = None
        self._where, self._resume = "", ""
        super().__init__(self._compose())

    def locate(self, position: Position, *, resume: str = "") -> None:
        """Adds the training loop's position and how to resume (once; the innermost position wins).

        Args:
          position: Where the training loop is.
          resume: How to resume (the checkpoint directory's hint), "" for none.
        """
        if self.global_step is not None:
            return
        self.global_step, self.epoch, self.epoch_step = position.global_step, position.epoch, position.epoch_step
        self._where, self._resume = position.describe(), resume
        self.args = (self._compose(),)

    def _compose(self) -> str:
        failure = self.failure
        where = f" {self._where}" if self._where else ""
        peers = ("; ".join(failure.peers) if failure.peers
                 else f"unknown ({failure.unknown_why or 'neither the error nor a probe of the peers tells'})")
        steps = [s for s in (failure.next_step, self._resume) if s]
        return (f"disttrain: {self.backend}: rank {self.rank} of {self.size}: a collective failed{where} "
                f"({self.phase}): {failure.summary}. Lost peer: {peers}."
                + (f" Next: {'; '.join(steps)}." if steps else "")
                + f" [the backend's error: {_first_lines(self.cause)}]")


def caller(depth: int = 2) -> str:
    """``"Function.name (file.py)"`` of the frame ``depth`` levels above the caller of this function."""
    code = sys._getframe(depth).f_code  # noqa: SLF001
    return f"{code.co_qualname} ({os.path.basename(code.co_filename)})"


@contextlib.contextmanager
def translating(backend: Any, *, phase: str, position: Callable[[], Position] | None = None,
                resume: str = "") -> Iterator[None]:
    """Turns a backend error that ``backend.describe_collective_failure`` recognises into a
    :class:`CollectiveError` (other errors pass unchanged).

    Args:
      backend: The backend whose collectives run inside.
      phase: What runs inside, for the message (e.g. ``"the compiled train step"``).
      position: The training loop's position, or None (e.g. an eager collective: an enclosing
        ``translating`` of the trainer adds it).
      resume: How to resume, added with the position (e.g. "rerun the same command to resume ...").

    Raises:
      CollectiveError: For a recognised failure, from the backend's error.
    """
    try:
        yield
    except CollectiveError as err:
        if position is not None:
            err.locate(position(), resume=resume)
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unless the backend recognises it
        error = translate(backend, err, phase=phase, position=position, resume=resume)
        if error is None:
            raise
        raise error from err


def translate(backend: Any, err: BaseException, *, phase: str, position: Callable[[], Position] | None = None,
              resume: str = "") -> CollectiveError | None:
    """The :class:`CollectiveError` for ``err`` if ``backend.describe_collective_failure`` recognises it
    (arguments as :func:`translating`), else None."""
    if isinstance(err, CollectiveError):
        if position is not None:
            err.locate(position(), resume=resume)
        return err
    if type(err).__module__.startswith("disttrain."):  # disttrain's own errors (a failed save ...) say it already
        return None
    try:
        failure = backend.describe_collective_failure(err)
    except Exception:  # noqa: BLE001 - reading the error must never hide it
        failure = None
    if failure is None:
        return None
    error = CollectiveError(backend=backend.name, rank=backend.rank, size=backend.size, failure=failure,
                            phase=phase, cause=err)
    if position is not None:
        error.locate(position(), resume=resume)
    return error
