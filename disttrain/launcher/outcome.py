"""``disttrain run -- LAUNCHER ...``: runs horovodrun, mpirun, srun (or any launcher) and exits with a code
a scheduler can use.

horovodrun and mpirun exit 1 when every worker exited 42 after their own SIGTERM (horovodrun 0.28.1
sometimes even 0), and srun with the highest code of its tasks. This wrapper gives the launcher a fresh
status directory (:data:`disttrain.exit_status.STATUS_DIR_ENV`; every disttrain process writes its own
``rank<r>.json`` there, see :mod:`disttrain.exit_status`), waits for it, and returns:

* 42 when every rank of the run recorded 42 (preempted, checkpoint saved), whatever the launcher said;
* otherwise the code of the first rank that recorded a failure (not 0 or 42), by time;
* otherwise the launcher's own code (no rank recorded a failure: a normal end, or ranks killed
  before they could write).

It prints one line on stderr saying which, e.g.
``disttrain run: every rank (2 of 2) was preempted and saved (rank 0: preempted after global step 14;
checkpoint runs/ckpt/ckpt-5); exit 42 (mpirun exited 1)``. SIGTERM and SIGHUP (and a SIGINT that did not
come from the terminal, which signals the whole foreground group itself) are passed on to the launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

from disttrain import startup_logs
from disttrain.exit_status import STATUS_DIR_ENV, read_all
from disttrain.launcher.supervisor import PREEMPTED

#: Launchers whose remote ranks get only the variables named with ``-x``.
MPI_LAUNCHERS = ("mpirun", "mpiexec", "orterun")
#: Characters of a rank's reason quoted in the line (a watchdog's message is long).
REASON_CHARS = 200


def _reason(status: dict) -> str:
    reason = status.get("reason") or ""
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 3] + "..."


def decide(statuses: Sequence[dict], *, launcher: str, launcher_code: int) -> tuple[int, str]:
    """The run's exit code and the line that explains it.

    Args:
      statuses: The ranks' statuses (:func:`disttrain.exit_status.read_all`).
      launcher: The launcher's name, for the message.
      launcher_code: The launcher's own exit code.
    """
    said = f"{launcher} exited {launcher_code}"
    by_rank = {s["rank"]: s for s in statuses}
    size = max((s.get("size", 0) for s in statuses), default=0)
    missing = [r for r in range(size) if r not in by_rank or not by_rank[r].get("ended")]
    if size and not missing and all(by_rank[r].get("code") == PREEMPTED for r in range(size)):
        chief = _reason(by_rank[0]) or "saved"
        return PREEMPTED, (f"every rank ({size} of {size}) was preempted and saved (rank 0: {chief}); "
                           f"exit {PREEMPTED} ({said})")
    lost = (f"; rank(s) {', '.join(map(str, missing))} of {size} left no final status (killed, or the status "
            "directory is not on a filesystem every host shares)") if missing else ""
    failed = sorted((s for s in statuses if s.get("code") not in (None, 0, PREEMPTED)), key=lambda s: s["time"])
    if failed:
        first = failed[0]
        others = f"; also failed: {', '.join(str(s['rank']) for s in failed[1:])}" if failed[1:] else ""
        return first["code"], (f"rank {first['rank']} failed first, with exit code {first['code']} "
                               f"({_reason(first)}){others}{lost}; exit {first['code']} ({said})")
    if not statuses:
        return launcher_code, (f"no rank recorded an exit status; exit {launcher_code}, {launcher}'s own (do the "
                               "workers create a disttrain backend, and see the status directory?)")
    preempted = sum(1 for s in statuses if s.get("code") == PREEMPTED)
    note = lost + (f"; {preempted} rank(s) recorded {PREEMPTED}" if missing and preempted else "")
    return launcher_code, f"no rank recorded a failure; exit {launcher_code}, {launcher}'s own{note}"


def _with_exports(command: list[str]) -> list[str]:
    """Under mpirun, ``-x`` passes the status directory to the ranks on other hosts too."""
    if os.path.basename(command[0]) in MPI_LAUNCHERS:
        return command[:1] + ["-x", STATUS_DIR_ENV] + command[1:]
    return command


def run(command: Sequence[str], *, status_dir: str | None = None, err=None) -> int:
    """Runs the launcher ``command`` and returns the run's exit code (the rules in the module docstring).

    Args:
      command: The launcher and its arguments, e.g. ``["mpirun", "-np", "2", "python", "train.py"]``.
      status_dir: Where the ranks write their status: a directory every host can write and this one can
        read (default: a new temporary directory, enough when all ranks run on this machine). Its
        ``rank*.json`` are removed first; a directory this call creates is removed at the end.
      err: Where the explaining line goes (default stderr).

    Raises:
      ValueError: For an empty command.
      FileNotFoundError: When the launcher is not found.
    """
    err = err or sys.stderr
    command = list(command)
    if not command:
        raise ValueError("no launcher to run; give one, e.g. `disttrain run -- mpirun -np 2 python train.py`")
    if shutil.which(command[0]) is None:
        raise FileNotFoundError(f"launcher {command[0]!r} not found on PATH; give its full path")
    made = status_dir is None or not os.path.exists(status_dir)  # then it is removed at the end
    directory = tempfile.mkdtemp(prefix="disttrain-status-") if status_dir is None else os.path.abspath(status_dir)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith("rank") and name.endswith(".json"):
            os.remove(os.path.join(directory, name))
    env = dict(os.environ, **{STATUS_DIR_ENV: directory})
    interactive = _in_foreground()
    started: list[subprocess.Popen] = []
    copier = None
    pending: list[int] = []  # signals that came before the launcher existed

    def forward(signum, frame) -> None:
        if signum == signal.SIGINT and interactive:
            return  # the terminal sent it to the launcher too
        if not started:
            pending.append(signum)
            return
        try:
            started[0].send_signal(signum)
        except ProcessLookupError:
            pass

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        proc, copier = _start(_with_exports(command), env=env)
        started.append(proc)
        for signum in pending:
            started[0].send_signal(signum)
        returncode = started[0].wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if copier is not None:
        copier.join(timeout=5)  # the launcher's last lines come before ours (a rank left running may hold the pipe)
    launcher_code = returncode if returncode >= 0 else 128 - returncode
    code, message = decide(read_all(directory), launcher=os.path.basename(command[0]), launcher_code=launcher_code)
    err.write(f"disttrain run: {message}\n")
    err.flush()
    if made:
        shutil.rmtree(directory, ignore_errors=True)
    return code


def _start(command: list[str], *, env: dict) -> tuple[subprocess.Popen, threading.Thread | None]:
    """Starts the launcher; its stderr goes through :func:`disttrain.startup_logs.copy_without_notices`
    (horovodrun imports TensorFlow itself), unless DISTTRAIN_VERBOSE is set. Returns it and the copying
    thread."""
    if startup_logs.verbose(env):
        return subprocess.Popen(command, env=env), None
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(command, env=env, stderr=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    copier = threading.Thread(target=startup_logs.copy_without_notices, args=(read_end, os.dup(2)), daemon=True,
                              name="disttrain-run-stderr")
    copier.start()
    return proc, copier


def _in_foreground() -> bool:
    """True when this process belongs to the terminal's foreground group (Ctrl-C reaches the launcher too)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
