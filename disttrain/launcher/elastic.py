"""Elastic launches: workers leave and join a running job (``disttrain launch --min-workers M --max-workers N``).

    disttrain launch --min-workers 2 --max-workers 3 --host-discovery-script ./hosts.sh train.py
    disttrain launch --min-workers 2 -H localhost:3 train.py          # a fixed list: workers can only leave

An agent in the launcher, as torchrun's elastic agent: it owns the membership (the hosts of a fixed list,
or what a discovery script prints now, see :mod:`disttrain.launcher.discovery`), starts one *formation*
of workers for it (a plan, run by the :class:`~disttrain.launcher.supervisor.Supervisor`) and re-forms the
job when the membership changes:

* **a worker lost** (it exits with another code than 0 or 42: killed, crashed, its ssh connection or host
  gone): the others are stuck in a collective that waits for it, so they are killed at once; its slot
  is taken out of use, and a new formation of the survivors' slots (if at least M remain) resumes from
  the **last checkpoint**: the steps after it are done again (``Checkpointing(every_steps=k)`` bounds that
  to k - 1 steps).
* **a host added or removed** in the discovery output (or more slots): every worker gets SIGTERM, which
  disttrain's preemption handling turns into a stop after the same step, a checkpoint and exit 42; the new
  formation resumes from that checkpoint: **no step is lost**. A worker that exits 42 by itself (it was
  preempted) is handled alike.

Each formation is new processes (as torchrun's): the global batch is fixed and the data position comes
from the step, so global batch k is the same batch on any number of workers (see docs/checkpoints.md).
A slot lost to a failed worker stays out of use until the discovery script stops listing that host (a
host that comes back is a new machine). Fewer than M usable slots for longer than ``elastic_timeout``
seconds ends the job with :data:`TOO_FEW_WORKERS`, naming what is missing. See docs/elastic.md.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Sequence

from disttrain.elastic_worker import EVENT_ENV, REPORT_PREFIX, encode_event
from disttrain.launcher.discovery import SCRIPT_TIMEOUT, Discovery
from disttrain.launcher.hosts import Host, Slot, assign_slots
from disttrain.launcher.plans import HostUnreachable, Plan
from disttrain.launcher.supervisor import PREEMPTED, TIMED_OUT, Outcome, State, Supervisor, describe_code

#: Exit code when fewer than --min-workers slots were usable for longer than --elastic-timeout
#: (EX_TEMPFAIL of sysexits.h: try again later).
TOO_FEW_WORKERS = 75
#: Default seconds an elastic job waits for at least --min-workers usable slots.
DEFAULT_ELASTIC_TIMEOUT = 300.0


class Membership:
    """The usable slots: the discovered hosts' slots minus those lost to failed workers."""

    def __init__(self):
        self.lost: collections.Counter[str] = collections.Counter()

    def usable(self, discovered: Sequence[Host]) -> list[Host]:
        """The hosts with their usable slots (hosts with none left out). A host no longer listed is
        forgotten: when it is listed again, it is a new machine with all its slots."""
        listed = {h.name for h in discovered}
        for name in [n for n in self.lost if n not in listed]:
            del self.lost[name]
        return [Host(h.name, h.slots - self.lost[h.name]) for h in discovered if h.slots > self.lost[h.name]]

    def lose(self, host: str) -> None:
        """Takes one slot of ``host`` out of use (its worker failed)."""
        self.lost[host] += 1

    def describe_lost(self) -> str:
        return ", ".join(f"{name}: {count}" for name, count in sorted(self.lost.items()))


def choose(current: Sequence[str], usable: Sequence[Host], *, max_workers: int | None) -> list[str]:
    """The hosts of the next formation, one entry per worker: the current workers' hosts that still have
    a usable slot first (in rank order, so rank 0 stays where it was when it can), then free slots in
    the order the hosts are listed, up to ``max_workers``."""
    capacity = {h.name: h.slots for h in usable}
    chosen: list[str] = []
    for host in current:
        if chosen.count(host) < capacity.get(host, 0):
            chosen.append(host)
    for h in usable:
        while chosen.count(h.name) < h.slots and (max_workers is None or len(chosen) < max_workers):
            chosen.append(h.name)
    return chosen if max_workers is None else chosen[:max_workers]


def to_slots(chosen: Sequence[str]) -> list[Slot]:
    """Slots for workers on ``chosen`` (grouped by host, hosts in order of their first entry)."""
    counts = collections.Counter(chosen)
    hosts = [Host(name, counts[name]) for name in dict.fromkeys(chosen)]
    return assign_slots(hosts, num_workers=len(chosen))


def describe_change(old: Sequence[str], new: Sequence[str]) -> str:
    """``host discovery: 127.0.0.2 +1 slot, localhost -1 slot (2 -> 3 workers)``."""
    before, after = collections.Counter(old), collections.Counter(new)
    changes = [f"{name} {after[name] - before[name]:+d} slot{'' if abs(after[name] - before[name]) == 1 else 's'}"
               for name in dict.fromkeys([*old, *new]) if after[name] != before[name]]
    return f"host discovery: {', '.join(changes)} ({len(old)} -> {len(new)} workers)"


class ElasticAgent:
    """Runs an elastic job: formations of workers, re-formed when the membership changes.

    Args:
      supervisor: Starts and watches each formation (its ``env`` is the workers' base environment).
      make_plan: ``fn(slots) -> Plan`` for the backend (MultiWorker TF_CONFIG or Horovod Gloo).
      discovery: Where the hosts come from.
      min_workers: Fewest workers a formation may have.
      max_workers: Most workers a formation may have (None: every usable slot).
      elastic_timeout: Seconds to wait for ``min_workers`` usable slots before giving up.

    Raises:
      ValueError: For ``min_workers`` < 1 or ``max_workers`` < ``min_workers``.
    """

    def __init__(self, *, supervisor: Supervisor, make_plan: Callable[[list[Slot]], Plan], discovery: Discovery,
                 min_workers: int, max_workers: int | None, elastic_timeout: float = DEFAULT_ELASTIC_TIMEOUT):
        if min_workers < 1 or (max_workers is not None and max_workers < min_workers):
            raise ValueError(f"--min-workers {min_workers} / --max-workers {max_workers}: need 1 <= min <= max, "
                             "e.g. --min-workers 2 --max-workers 4")
        self.supervisor, self.make_plan, self.discovery = supervisor, make_plan, discovery
        self.min_workers, self.max_workers, self.elastic_timeout = min_workers, max_workers, elastic_timeout
        self.membership = Membership()
        self.reported = False  # the chief of some formation said it checkpoints (see disttrain.elastic_worker)
        self.formations = 0
        self._change: str | None = None
        supervisor.on_line = self._read_line

    def log(self, message: str) -> None:
        self.supervisor.log(f"elastic: {message}")

    def _read_line(self, rank: int, line: str) -> None:
        if line.startswith(REPORT_PREFIX):
            self.reported = True

    def run(self) -> int:
        """Runs formations until the job ends; returns the launcher's exit code."""
        timeout = self.supervisor.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.supervisor.catching_signals():
            self.discovery.start()
            try:
                return self._loop(deadline)
            finally:
                self.discovery.stop()

    def _loop(self, deadline: float | None) -> int:
        current: list[str] = []
        reason, since, old_size = "the launch", time.time(), 0
        self.discovery.wait_fresh(after=0, timeout=SCRIPT_TIMEOUT)  # the script's first answer
        while True:
            chosen = self._wait_for_slots(current, deadline)
            if isinstance(chosen, int):
                return chosen
            self.formations += 1
            slots = to_slots(chosen)
            chosen = [slot.host for slot in slots]  # in rank order
            if self.formations > 1:
                self.log(f"re-forming {old_size} -> {len(chosen)} workers after {reason}: "
                         f"{', '.join(f'{h}:{n}' for h, n in collections.Counter(chosen).items())}")
            self.supervisor.env[EVENT_ENV] = encode_event(reason=reason, old_size=old_size, new_size=len(chosen),
                                                          formation=self.formations, at=since)
            try:
                plan = self.make_plan(slots)
            except HostUnreachable as err:  # as lost as a worker that failed there
                for _ in range(chosen.count(err.host)):
                    self.membership.lose(err.host)
                self.log(f"{err}; its slots are out of use")
                reason, since = f"{err.host} unreachable", time.time()
                current = [h for h in chosen if h != err.host]
                self.formations -= 1
                continue
            self._change = None
            try:
                outcome = self.supervisor.run_once(plan, deadline, poll=lambda: self._poll(chosen),
                                                   kill_on_failure=True)
            finally:
                plan.close()
            since, current, old_size = outcome.since or time.time(), chosen, len(chosen)
            if outcome.mode in (State.DONE, State.SIGNALLED, State.TIMEOUT):
                return outcome.code
            if outcome.mode == State.FAILED:
                if not self.reported:
                    self.log(f"not re-forming: {outcome.failure.name} failed (exit code "
                             f"{describe_code(outcome.code)}) before any formation's rank 0 reported "
                             "dt.Checkpointing; an elastic job needs a Trainer with checkpointing=dt.Checkpointing"
                             "(...) to resume (see docs/elastic.md)")
                    return outcome.code
                reason = self._lost(outcome, current)
                current = [h for i, h in enumerate(current) if i != outcome.failure.spec.rank]
            elif outcome.mode == State.STOPPED:
                reason = self._change or "a change of hosts"
                self.log(f"the workers stopped after {reason}; the next formation resumes from the checkpoint "
                         "they saved at the stop (no step lost)")
            elif not self.reported:
                return outcome.code
            else:  # preempted: a worker exited 42 by itself; its host may be leaving: ask discovery again
                reason = "a preemption of a worker (exit 42)"
                self.log(f"the workers stopped after {reason}; asking {self.discovery.describe()} again")
                self.discovery.wait_fresh(after=self.discovery.version, timeout=self.discovery.interval * 3)

    def _lost(self, outcome: Outcome, current: list[str]) -> str:
        worker = outcome.failure
        self.membership.lose(worker.spec.host)
        self.log(f"lost {worker.name} (exit code {describe_code(worker.code)}); its slot is out of use "
                 f"(slots out of use: {self.membership.describe_lost()}); the next formation resumes from the "
                 "last checkpoint (the steps after it are done again)")
        return f"the loss of {worker.name} (exit code {describe_code(worker.code)})"

    def _poll(self, chosen: list[str]) -> str | None:
        """While a formation runs: a reason to stop it when the usable slots changed."""
        hosts = self.discovery.hosts()
        if hosts is None:
            return None
        proposed = choose(chosen, self.membership.usable(hosts), max_workers=self.max_workers)
        if collections.Counter(proposed) == collections.Counter(chosen):
            return None
        change = describe_change(chosen, proposed)
        if not self.reported:  # without checkpoints a new formation would start from scratch
            if change != self._change:
                self.log(f"{change}: waiting with the re-formation until rank 0 reports dt.Checkpointing (without "
                         "checkpoints the job cannot resume; see docs/elastic.md)")
            self._change = change
            return None
        self._change = change
        return f"elastic: {change}"

    def _wait_for_slots(self, current: list[str], deadline: float | None) -> list[str] | int:
        """The hosts of the next formation, once at least ``min_workers`` slots are usable; or an exit code."""
        waiting_since = None
        while True:
            if self.supervisor.signalled:
                self.log("signal received while no workers run; exiting with code 42 (the last checkpoint holds "
                         "the state; run the same command to resume)")
                return PREEMPTED
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"timeout after {self.supervisor.timeout:g}s (--timeout)")
                return TIMED_OUT
            hosts = self.discovery.hosts()
            usable = self.membership.usable(hosts) if hosts is not None else []
            chosen = choose(current, usable, max_workers=self.max_workers)
            if len(chosen) >= self.min_workers:
                if waiting_since is not None:
                    self.log(f"{len(chosen)} slot(s) usable after {time.monotonic() - waiting_since:.0f}s")
                return chosen
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                self.log(f"waiting up to {self.elastic_timeout:g}s (--elastic-timeout) for at least "
                         f"{self.min_workers} usable worker slots: {self._seen(hosts, usable)}")
            if now - waiting_since > self.elastic_timeout:
                self.log(f"fewer than --min-workers {self.min_workers} usable worker slots for "
                         f"{self.elastic_timeout:g}s (--elastic-timeout): {self._seen(hosts, usable)}; "
                         f"{self.min_workers - len(chosen)} more needed; exiting with code {TOO_FEW_WORKERS}")
                return TOO_FEW_WORKERS
            time.sleep(0.1)

    def _seen(self, hosts: list[Host] | None, usable: list[Host]) -> str:
        source = self.discovery.describe()
        if hosts is None:
            return f"{source} has not answered yet"
        listed = ",".join(f"{h.name}:{h.slots}" for h in hosts) or "no host"
        text = f"{source} lists {listed} ({sum(h.slots for h in usable)} usable slot(s))"
        if self.membership.lost:
            text += f"; out of use after failed workers: {self.membership.describe_lost()}"
        return text
