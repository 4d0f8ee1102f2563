"""Starts the workers of a plan, watches every one of them, stops and restarts them together.

The rules (docs/launch.md has them as a table):

* A worker that exits with a code other than 0 or 42 is a failure: the launcher names it and its code,
  sends SIGTERM to the others and SIGKILL ``stop_timeout`` seconds later (a peer blocked in a collective
  would otherwise wait forever). With restarts left it starts all workers again (they resume from their
  last checkpoint); otherwise it returns that code.
* A worker that exits with 42 was preempted and saved a checkpoint; the others stop at the same step by
  themselves. The launcher waits up to ``grace_period`` seconds for them and returns 42. No restart: the
  machines are going away; run the same command again to resume.
* SIGTERM or SIGINT to the launcher is forwarded to every worker (SIGTERM again every 5 s, for a worker
  that was starting up and missed it); after ``grace_period`` seconds the ones still running get SIGKILL.
  A second signal kills them at once. The launcher returns 42 if the workers exited with 42 (the
  preemption checkpoint is saved).
* No worker outlives the launcher, even after ``kill -9`` of the launcher: see the guard
  (:mod:`disttrain.launcher.guard`).

An elastic launch (:mod:`disttrain.launcher.elastic`) calls :meth:`Supervisor.run_once` for each
formation, with a ``poll`` that asks for a stop when the hosts change and ``kill_on_failure``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

from disttrain.launcher.plans import Plan, WorkerSpec

#: Exit code of a worker that stopped for a preemption signal after saving (disttrain.PREEMPTION_EXIT_CODE).
PREEMPTED = 42
#: Exit code when the launcher's --timeout expires (as coreutils' timeout).
TIMED_OUT = 124
#: Seconds between repeated SIGTERMs of a stop (a forwarded SIGTERM, or one ``poll`` asked for): a worker
#: still starting up, whose TensorFlow held the signal (MultiWorker's coordination service takes SIGTERM
#: over while it connects), gets it again; disttrain's handler ignores a repeat while it saves.
STOP_RESEND_SECONDS = 5.0


class State(enum.Enum):
    """Where the workers of one start are: ``RUNNING`` while all may run, then how the start ends.

    ``DONE``: every worker exited 0 or 42 by itself; ``FAILED``: one failed; ``PREEMPTED``: one exited 42
    first; ``SIGNALLED``: the launcher got a signal; ``TIMEOUT``: ``--timeout`` expired; ``STOPPED``: the
    ``poll`` of :meth:`Supervisor.run_once` asked for a stop.
    """

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PREEMPTED = "preempted"
    SIGNALLED = "signalled"
    TIMEOUT = "timeout"
    STOPPED = "stopped"


def describe_code(code: int) -> str:
    """``3``, ``137 (SIGKILL)`` or ``42 (preempted, checkpoint saved)``."""
    if code == PREEMPTED:
        return f"{code} (preempted, checkpoint saved)"
    if code > 128:
        try:
            return f"{code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return str(code)


class _Worker:
    def __init__(self, spec: WorkerSpec, proc: subprocess.Popen, pumps: list[threading.Thread]):
        self.spec, self.proc, self.pumps = spec, proc, pumps
        self.code: int | None = None

    @property
    def name(self) -> str:
        return f"worker {self.spec.rank} on {self.spec.host}"

    def send(self, request: str) -> None:
        """Asks the guard to signal the worker (TERM, INT or KILL)."""
        try:
            self.proc.stdin.write(f"{request}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def close(self) -> None:
        """Closes the pipe to the guard. A request that could not be written (the guard had exited) is
        still in the pipe's buffer, and closing would flush it again: the BrokenPipeError that raises is
        expected and dropped."""
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass


@dataclasses.dataclass
class Outcome:
    """How one start of all workers ended.

    Attributes:
      mode: How the start ended: a :class:`State` other than ``RUNNING`` (``FAILED``: see ``failure``).
      code: The launcher's exit code for this outcome.
      failure: The worker that failed first, for ``failed``.
      workers: Every worker of the start.
      since: ``time.time()`` when the stop began (the failure, signal or poll was noticed); None for ``done``.
    """

    mode: State
    code: int
    failure: "_Worker | None" = None
    workers: list = dataclasses.field(default_factory=list)
    since: float | None = None


class Supervisor:
    """Runs plans of workers under the rules in this module's docstring.

    Args:
      grace_period: Seconds between forwarding SIGTERM/SIGINT (or a worker's preemption exit) and SIGKILL.
      stop_timeout: Seconds between SIGTERM and SIGKILL for the other workers after one failed.
      timeout: Seconds for the whole run (all restarts); None for no limit.
      ssh: The remote-shell command for workers on other hosts.
      env: Base environment of the workers (default ``os.environ``).
      out, err: Where the workers' prefixed output and the launcher's messages go.
    """

    def __init__(self, *, grace_period: float = 60.0, stop_timeout: float = 5.0, timeout: float | None = None,
                 ssh: Sequence[str] = ("ssh",), env: dict | None = None, out=None, err=None):
        self.grace_period, self.stop_timeout, self.timeout = grace_period, stop_timeout, timeout
        self.ssh = list(ssh)
        self.env = dict(os.environ if env is None else env)
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._signals: list[int] = []
        self._write_lock = threading.Lock()
        #: Called with ``(rank, line)`` for every line a worker writes (e.g. to read its reports).
        self.on_line: Callable[[int, str], None] | None = None

    @property
    def signalled(self) -> bool:
        """True once the launcher received SIGTERM, SIGINT or SIGHUP."""
        return bool(self._signals)

    def log(self, message: str) -> None:
        with self._write_lock:
            self.err.write(f"disttrain launch: {message}\n")
            self.err.flush()

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        """While active, SIGTERM/SIGINT/SIGHUP to the launcher are recorded (and acted on by :meth:`run_once`)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, lambda signum, frame: self._signals.append(signum))
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def run(self, make_plan: Callable[[], Plan], *, max_restarts: int = 0) -> int:
        """Runs the workers of ``make_plan()`` (made again for each restart); returns the launcher's exit code."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self.catching_signals():
            for attempt in range(max_restarts + 1):
                plan = make_plan()
                try:
                    outcome = self.run_once(plan, deadline)
                finally:
                    plan.close()
                failed, code = outcome.mode == State.FAILED, outcome.code
                if not failed or self._signals or attempt == max_restarts:
                    if failed and max_restarts:
                        self.log(f"giving up after {attempt} restart(s) (--max-restarts {max_restarts})")
                    return code
                self.log(f"restarting all {len(plan.workers)} workers (restart {attempt + 1} of {max_restarts}); "
                         "they resume from their last checkpoint")
        raise AssertionError("unreachable")

    # -- one start of all workers ---------------------------------------------------------------
    def _start(self, spec: WorkerSpec) -> _Worker:
        argv = spec.argv(ssh=self.ssh, grace=self.grace_period, base_env=self.env)
        self.log(f"worker {spec.rank} on {spec.host}: {spec.describe(argv)}")
        env = {**self.env, **spec.env} if spec.local else self.env
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        pumps = [threading.Thread(target=self._pump, args=(stream, f"[{spec.rank}] ", target), daemon=True)
                 for stream, target in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for pump in pumps:
            pump.start()
        return _Worker(spec, proc, pumps)

    def _pump(self, stream, prefix: str, target) -> None:
        rank = int(prefix.strip()[1:-1])
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            with self._write_lock:
                target.write(prefix + line)
                target.flush()
            if self.on_line is not None:
                self.on_line(rank, line)

    def run_once(self, plan: Plan, deadline: float | None, *, poll: Callable[[], str | None] | None = None,
                 kill_on_failure: bool = False) -> Outcome:
        """Starts every worker of ``plan`` and watches them until all have exited.

        Args:
          plan: The workers.
          deadline: ``time.monotonic()`` value of ``--timeout``, or None.
          poll: Called about every 50 ms while all workers run; a string it returns (the reason) stops
            them as a preemption does: SIGTERM to each (they save at the same step and exit 42), SIGKILL
            ``grace_period`` seconds later. The outcome is then ``State.STOPPED``.
          kill_on_failure: After a worker failed, kill the others at once instead of SIGTERM first (their
            collectives wait for the lost one: they can neither finish a step nor save).
        """
        workers = [self._start(spec) for spec in plan.workers]
        mode, kill_at, failure, stop_since, killed = State.RUNNING, None, None, 0.0, False
        resend_at, resend = STOP_RESEND_SECONDS, True
        handled_signals = 0
        order: list[_Worker] = []  # in the order they exited
        stop_codes = (0, PREEMPTED, 128 + signal.SIGTERM)  # what a worker asked to stop may exit with
        try:
            while True:
                now = time.monotonic()
                for w in workers:
                    if w.code is None and w.proc.poll() is not None:
                        w.code = w.proc.returncode if w.proc.returncode >= 0 else 128 - w.proc.returncode
                        order.append(w)
                        if mode == State.RUNNING and w.code == PREEMPTED:
                            mode, kill_at, stop_since = State.PREEMPTED, now + self.grace_period, now
                            self.log(f"{w.name} exited with code {describe_code(w.code)}; waiting up to "
                                     f"{self.grace_period:g}s for the others to save and exit")
                        elif (mode == State.RUNNING and w.code != 0) or (mode == State.STOPPED
                                                                        and w.code not in stop_codes and not killed):
                            mode, failure, stop_since = State.FAILED, w, now
                            if kill_on_failure:
                                self.log(f"{w.name} failed with exit code {describe_code(w.code)}; killing the "
                                         "other workers (their collectives wait for it)")
                                kill_at = now
                            else:
                                kill_at = now + self.stop_timeout
                                self.log(f"{w.name} failed with exit code {describe_code(w.code)}; stopping the "
                                         "other workers")
                                self._send_alive(workers, "TERM")
                alive = [w for w in workers if w.code is None]
                if not alive:
                    break
                if len(self._signals) > handled_signals:
                    handled_signals = len(self._signals)
                    name = signal.Signals(self._signals[-1]).name
                    if handled_signals == 1 and mode in (State.RUNNING, State.PREEMPTED, State.STOPPED):
                        mode, kill_at, stop_since = State.SIGNALLED, now + self.grace_period, now
                        request = "INT" if self._signals[-1] == signal.SIGINT else "TERM"
                        resend = request == "TERM"  # a second SIGINT interrupts disttrain's save: never repeated
                        resend_at = STOP_RESEND_SECONDS
                        self.log(f"{name} received: forwarded SIG{request} to {len(alive)} worker(s); SIGKILL "
                                 f"in {self.grace_period:g}s if they have not exited (--grace-period)")
                        self._send_alive(workers, request)
                    elif handled_signals == 1:
                        self.log(f"{name} received while the workers are being stopped; SIGKILL on schedule")
                    else:
                        self.log(f"{name} received again: killing the workers now")
                        kill_at = now
                if mode == State.RUNNING and deadline is not None and now > deadline:
                    mode, kill_at, stop_since = State.TIMEOUT, now + self.stop_timeout, now
                    self.log(f"timeout after {self.timeout:g}s (--timeout); stopping the workers")
                    self._send_alive(workers, "TERM")
                if mode == State.RUNNING and poll is not None:
                    reason = poll()
                    if reason:
                        mode, kill_at, stop_since = State.STOPPED, now + self.grace_period, now
                        self.log(f"{reason}: asking the {len(alive)} worker(s) to stop after the same step and "
                                 f"save (SIGTERM; SIGKILL in {self.grace_period:g}s)")
                        self._send_alive(workers, "TERM")
                if mode in (State.STOPPED, State.SIGNALLED) and resend and now - stop_since >= resend_at:
                    resend_at += STOP_RESEND_SECONDS  # a worker still starting up may have missed the first one
                    self._send_alive(workers, "TERM")
                if kill_at is not None and now >= kill_at:
                    for w in alive:
                        if now > stop_since:
                            self.log(f"{w.name} has not exited {now - stop_since:.0f}s after the stop request; "
                                     "SIGKILL")
                        w.send("KILL")
                    kill_at, killed = None, True
                    threading.Thread(target=self._reap, args=(alive,), daemon=True).start()
                time.sleep(0.05)
        finally:
            for w in workers:  # never leave one behind, even on an exception here
                if w.proc.poll() is None:
                    w.send("KILL")
                    self._reap([w])
                for pump in w.pumps:
                    pump.join(timeout=5)
                if w.proc.stdin:
                    w.close()
        outcome = self._outcome(mode, workers, order, failure)
        if stop_since:
            outcome.since = time.time() - (time.monotonic() - stop_since)
        return outcome

    def _outcome(self, mode: State, workers: list[_Worker], order: list[_Worker], failure: _Worker | None) -> Outcome:
        codes = [w.code for w in workers]
        if mode in (State.TIMEOUT, State.STOPPED):
            return Outcome(mode, TIMED_OUT if mode == State.TIMEOUT else 0, None, workers)
        if mode == State.FAILED:
            if len(workers) > 1:
                self.log("exit codes: " + ", ".join(f"worker {w.spec.rank}: {describe_code(w.code)}" for w in workers))
            return Outcome(mode, failure.code, failure, workers)
        if all(c == 0 for c in codes):
            return Outcome(State.DONE if mode == State.RUNNING else mode, 0, None, workers)
        if all(c in (0, PREEMPTED) for c in codes):
            return Outcome(State.DONE if mode == State.RUNNING else mode, PREEMPTED, None, workers)
        first = next(w for w in order if w.code not in (0, PREEMPTED))
        self.log("exit codes: " + ", ".join(f"worker {w.spec.rank}: {describe_code(w.code)}" for w in workers))
        return Outcome(mode, first.code, None, workers)

    def _send_alive(self, workers: list[_Worker], request: str) -> None:
        for w in workers:
            if w.code is None:
                w.send(request)

    def _reap(self, workers: list[_Worker], wait: float = 5.0) -> None:
        """After KILL was requested: if a guard has not exited ``wait`` seconds later, kill it (and so its worker)."""
        end = time.monotonic() + wait
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
