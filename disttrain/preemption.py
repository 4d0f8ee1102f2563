"""Preemption: a SIGTERM or SIGINT to any process stops every process together, after a checkpoint.

While :meth:`disttrain.Trainer.fit` runs with checkpointing, a :class:`SignalWatcher` replaces the
handlers of the preemption signals. The first signal only raises a local flag (and says so on stderr).
Every training step carries the flags of all processes through one small all-reduce inside the
compiled step, so all processes learn about it at the same step boundary, save one checkpoint
together, end the callbacks (``on_train_end``: summaries and logs are flushed) and exit with
:data:`PREEMPTION_EXIT_CODE`. A second SIGINT interrupts at once (``KeyboardInterrupt``), as Python
does by default.

By default the exit is immediate (:func:`exit_now`, ``os._exit``): launchers give their workers only a
few seconds between SIGTERM and SIGKILL (horovodrun 5 s, hard-coded), and a Python process that has
loaded TensorFlow takes seconds to tear down its interpreter; the checkpoint is complete by then, so
nothing is lost. ``Checkpointing(exit_on_preemption=False)`` raises :class:`Preempted` (a
``SystemExit`` with the same code) instead, for programs that clean up after ``fit``.

The exit code is the one of TensorFlow's ``PreemptionCheckpointHandler`` (42), so cluster tooling that
knows it treats a disttrain worker the same way: "preempted after saving; run the same command to
resume".
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable

#: Exit status of a process that stopped for a preemption signal after saving its checkpoint.
PREEMPTION_EXIT_CODE = 42

#: Signals that request a preemption stop by default.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Raised on every process after the preemption checkpoint is saved; exits with code 42.

    A ``SystemExit``: uncaught, the program ends with :data:`PREEMPTION_EXIT_CODE` and no traceback.

    Attributes:
      step: The global step the checkpoint holds.
      checkpoint: Path of the checkpoint saved.
    """

    def __init__(self, *, step: int, checkpoint: str | None):
        super().__init__(PREEMPTION_EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        return f"preempted after global step {self.step}; checkpoint {self.checkpoint}"


def exit_now(code: int = PREEMPTION_EXIT_CODE) -> None:
    """Flushes stdout and stderr and ends the process at once with ``code`` (no interpreter teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class SignalWatcher:
    """Replaces the handlers of ``signals`` while active (a context manager); restores them after.

    Args:
      signals: Signals that request a stop (default SIGTERM and SIGINT).
      rank: This process's rank, for the message.

    Handlers can only be installed from the main thread; elsewhere the watcher stays inactive (and
    says so on stderr), and signals keep their previous behaviour.
    """

    def __init__(self, *, signals: Iterable[int] = DEFAULT_SIGNALS, rank: int = 0):
        self.signals = tuple(signals)
        self.rank = rank
        self.requested: str | None = None  # name of the first signal received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SignalWatcher":
        self.requested = None
        if not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            sys.stderr.write("disttrain: fit() runs outside the main thread, so preemption signals cannot be "
                             "caught; a SIGTERM will end the process without a checkpoint\n")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.requested is None:
            self.requested = name
            sys.stderr.write(f"disttrain: {name} on rank {self.rank}: every process stops after its next step, "
                             f"saves a checkpoint and exits with code {PREEMPTION_EXIT_CODE}\n")
            sys.stderr.flush()
