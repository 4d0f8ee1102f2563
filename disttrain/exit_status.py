"""Each process's own exit status, written where ``disttrain run`` reads it.

horovodrun exits 1 when its workers exit 42 after its own SIGTERM (and 0.28.1 sometimes 0, having lost
their status), mpirun exits 1, and srun the highest code of its tasks (a task it killed counts as
128 + the signal): a scheduler that requeues on 42 never sees it. ``disttrain run -- LAUNCHER ...``
(:mod:`disttrain.launcher.outcome`) sets :data:`STATUS_DIR_ENV` to a directory; every disttrain
process then writes ``rank<r>.json`` there, with what it knows of its own end:

* when its backend starts (``get_backend``): ``{"code": null, "ended": false}`` (a file still like this
  after the run means the process was killed, or lost);
* preempted after its checkpoint was saved: 42 and the chief's "preempted after global step ..." text;
* a stall the watchdog ended: 124 and the watchdog's first line;
* an uncaught exception: 1 (130 for ``KeyboardInterrupt``) and ``Type: message``;
* any other end through Python's shutdown (the end of the script, ``sys.exit``):
  ``{"code": null, "ended": true}``: the code is the launcher's to tell.

Nothing is written without :data:`STATUS_DIR_ENV`, nor by a process that never created a backend (the
launcher's own helpers). Writes are atomic (a temporary file renamed into place); this module imports
no TensorFlow.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

#: The directory the processes of a run write their status into (set by ``disttrain run``).
STATUS_DIR_ENV = "DISTTRAIN_STATUS_DIR"

_identity: dict | None = None  # {"rank", "size"} once the backend started, with a status directory
_final = False  # a final status (a code) has been written


def start(*, rank: int, size: int) -> None:
    """Called once the backend knows this process's rank: writes the "running" status and arranges for
    the final one (uncaught exceptions, the interpreter's shutdown). Does nothing without
    :data:`STATUS_DIR_ENV`.

    Args:
      rank: This process's rank.
      size: The number of processes of the run.
    """
    global _identity
    if not os.environ.get(STATUS_DIR_ENV) or _identity is not None:
        return
    _identity = {"rank": int(rank), "size": int(size)}
    _write(code=None, reason="running", ended=False)
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        code = 130 if issubclass(kind, KeyboardInterrupt) else 1
        record(code=code, reason=f"{kind.__name__}: {value}".strip().rstrip(":"))
        previous(kind, value, traceback)

    sys.excepthook = hook
    atexit.register(_at_exit)


def record(*, code: int, reason: str) -> None:
    """Writes this process's final status (the first one written stays). Does nothing before
    :func:`start` or without :data:`STATUS_DIR_ENV`.

    Args:
      code: The exit code the process is about to exit with.
      reason: One line: why.
    """
    global _final
    if _identity is None or _final:
        return
    _final = True
    _write(code=int(code), reason=reason.splitlines()[0] if reason else "", ended=True)


def _at_exit() -> None:
    if _identity is not None and not _final:
        _write(code=None, reason="ended through Python's shutdown (the launcher tells its code)", ended=True)


def _write(*, code: int | None, reason: str, ended: bool) -> None:
    directory = os.environ.get(STATUS_DIR_ENV)
    if not directory or _identity is None:
        return
    status = dict(_identity, code=code, reason=reason, ended=ended, pid=os.getpid(), host=socket.gethostname(),
                  time=time.time())
    path = os.path.join(directory, f"rank{_identity['rank']}.json")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            json.dump(status, f)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    except OSError as err:  # never let the status break the run itself
        sys.stderr.write(f"disttrain: could not write the exit status {path}: {err}\n")


def read_all(directory: str) -> list[dict]:
    """The statuses in ``directory``, by rank (files that cannot be read are skipped).

    Args:
      directory: A status directory (:data:`STATUS_DIR_ENV`).
    """
    statuses = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    statuses.append(json.load(f))
            except (OSError, ValueError):
                continue
    return sorted(statuses, key=lambda s: s.get("rank", 0))
