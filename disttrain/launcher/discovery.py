"""Which hosts an elastic launch may use: a fixed host list, or a host discovery script polled in the background.

The script's contract is horovodrun's (``--host-discovery-script``): an executable (run through the shell)
that prints the hosts available right now, one ``host:slots`` line each (``host`` alone is one slot), and
exits 0. It is run again every ``interval`` seconds; a run that fails, times out or prints a bad line is
reported once and the last good answer is kept. A new answer counts once two runs in a row print it (the
first answer counts at once): a host file rewritten in place and read half-way (empty, one line short)
does not re-form the job.

Nothing here imports TensorFlow or Horovod.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Callable, Sequence

from disttrain.launcher.hosts import Host, parse_hosts

#: Seconds a run of the discovery script may take.
SCRIPT_TIMEOUT = 30.0


def parse_discovery_output(text: str, *, script: str) -> list[Host]:
    """Parses the script's output: ``host:slots`` lines (blank lines and ``#`` comments skipped).

    Raises:
      ValueError: For a bad line or a host listed twice (quoting the script and the line).
    """
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return []
    try:
        return parse_hosts(",".join(lines))
    except ValueError as err:
        raise ValueError(f"host discovery script {script!r} printed {text.strip()[:200]!r}: {err}") from None


def run_script(script: str, *, timeout: float = SCRIPT_TIMEOUT) -> list[Host]:
    """Runs the discovery script once and returns the hosts it lists.

    Raises:
      RuntimeError: If it exits with another code than 0 or takes longer than ``timeout`` seconds.
      ValueError: For output that is not ``host:slots`` lines.
    """
    try:
        proc = subprocess.run(script, shell=True, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"host discovery script {script!r} gave no answer within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"host discovery script {script!r} exited with {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return parse_discovery_output(proc.stdout, script=script)


class Discovery:
    """The hosts available now: fixed, or the latest good answer of a discovery script.

    Args:
      hosts: A fixed host list (``-H`` / ``--hostfile``); or None with ``script``.
      script: The discovery command, run every ``interval`` seconds by a background thread.
      interval: Seconds between two runs of the script.
      log: Where problems with the script are reported (each distinct one once).

    Raises:
      ValueError: With both or neither of ``hosts`` and ``script``.
    """

    def __init__(self, *, hosts: Sequence[Host] | None = None, script: str | None = None, interval: float = 2.0,
                 log: Callable[[str], None] = print):
        if (hosts is None) == (script is None):
            raise ValueError("give either a host list or a host discovery script")
        self.script, self.interval, self._log = script, interval, log
        self._hosts: list[Host] | None = list(hosts) if hosts is not None else None
        self._version = 0  # answers received (the first one: 1)
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        """Where the hosts come from, for messages."""
        return f"the host discovery script {self.script!r}" if self.script else "the host list"

    def start(self) -> "Discovery":
        """Starts polling the script (nothing to do for a fixed list)."""
        if self.script is not None and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="disttrain-discovery", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def hosts(self) -> list[Host] | None:
        """The latest good answer (None before the script first answered)."""
        with self._lock:
            return None if self._hosts is None else list(self._hosts)

    @property
    def version(self) -> int:
        """How many answers were received so far (a fresh one has a higher number)."""
        with self._lock:
            return self._version

    def wait_fresh(self, *, after: int, timeout: float) -> None:
        """Waits until an answer newer than ``after`` came in (or ``timeout`` seconds passed)."""
        end = time.monotonic() + timeout
        while self.script is not None and self.version <= after and time.monotonic() < end:
            time.sleep(0.05)

    def _poll(self) -> None:
        previous = None
        while not self._stop.is_set():
            try:
                found = run_script(self.script)
            except (RuntimeError, ValueError, OSError) as err:
                message = str(err)
                if message != self._last_error:
                    self._log(f"{message}; keeping the last answer")
                self._last_error = message
            else:
                self._last_error = None
                with self._lock:
                    if self._hosts is None or found == previous:  # the first answer, or the same one twice
                        self._hosts, self._version = found, self._version + 1
                previous = found
            self._stop.wait(self.interval)
