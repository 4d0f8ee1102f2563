"""Communication threads that yield the CPU to compute: Linux's ``SCHED_IDLE`` for the threads a library
starts (Horovod's background thread and Gloo's), found as the threads that appeared while it started.

Why: Horovod's background thread runs a coordination round with every peer each cycle (1 ms by
default), also while the ranks compute. When the ranks' compute fills the cores - 2 ranks at 1 thread
on 2 cores, or ranks x threads = cores on a CPU cluster node - each round preempts a compute thread,
and the ranks drift apart. A ``SCHED_IDLE`` thread runs only when a core has nothing else to run (it is
not starved forever: the kernel still gives it a small share). It gets a whole core as soon as its
rank's compute waits for the reduction, which is the moment the reduction is needed; and on a core left
free it runs at once. Measured in bench/p4_weak_scaling.py (2 ranks on 2 cores, the hand-written
Horovod loop): 48 -> 41.5 ms a step, against 38-40 for one process alone.

What it costs: while the compute of a rank keeps every core busy, its reductions do not progress, so
they overlap nothing. On one host that is no loss (the transfer is CPU work on the same cores); across
hosts a NIC could move bytes while the cores compute, so :func:`auto_idle` keeps Horovod's own priority
there (and with GPUs, whose compute does not need the cores, and under the MPI controller: see there).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

PRIORITIES = ("auto", "normal", "idle")
PRIORITY_ENV = "DISTTRAIN_COMM_PRIORITY"
_TASKS = "/proc/self/task"


def thread_ids() -> dict[int, str]:
    """This process's threads, ``{thread id: name}`` (empty where ``/proc`` has no task list)."""
    out = {}
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except (OSError, ValueError):
            pass  # the thread ended meanwhile
    return out


@contextlib.contextmanager
def started_threads(*, exclude_prefix: str = "tf_") -> Iterator[list[int]]:
    """Collects the ids of the threads started inside the ``with`` block (their names not starting with
    ``exclude_prefix``: TensorFlow's pools, which may start at the same time, are compute).

    Yields:
      A list, filled when the block ends.
    """
    before = thread_ids()
    found: list[int] = []
    yield found
    found.extend(t for t, name in thread_ids().items() if t not in before and not name.startswith(exclude_prefix))


def set_idle(tids: list[int], *, setscheduler: Callable | None = None) -> list[str]:
    """Gives each thread the ``SCHED_IDLE`` policy (threads they start later inherit it).

    Lowering a policy needs no privilege; where the kernel refuses (or on a system without
    ``sched_setscheduler``) the thread keeps its priority and the reason is returned.

    Returns:
      One line per thread that could not be changed (empty when all were).
    """
    setscheduler = setscheduler or getattr(os, "sched_setscheduler", None)
    if setscheduler is None or not hasattr(os, "SCHED_IDLE"):
        return [f"{sys.platform} has no SCHED_IDLE; communication threads keep their priority"] if tids else []
    failed = []
    for tid in tids:
        try:
            setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            pass  # ended already
        except OSError as err:
            failed.append(f"thread {tid}: {err}")
    return failed


def resolve(priority: str | None, *, environ=None) -> str:
    """The priority asked for: the argument, else ``DISTTRAIN_COMM_PRIORITY``, else ``auto``.

    Raises:
      ValueError: For a value other than auto, normal or idle.
    """
    env = os.environ if environ is None else environ
    value = priority if priority is not None else (env.get(PRIORITY_ENV, "").strip() or "auto")
    if value not in PRIORITIES:
        source = "communication_priority" if priority is not None else PRIORITY_ENV
        raise ValueError(f"{source}={value!r} is not a communication priority; use one of "
                         f"{', '.join(PRIORITIES)}")
    return value


#: Horovod's cycle time (ms) where its threads run idle and nobody set one (Horovod's default is 1 ms).
#: An idle thread costs the compute nothing while it sleeps between cycles, and a shorter cycle answers a
#: rank that waits for its reduction sooner: bench/p4_weak_scaling.py (2 Gloo ranks on 2 cores, idle
#: threads, 6 interleaved launches each) ran at 1.041 (0.958-1.086) of the 1 ms cycle's throughput at
#: 0.5 ms and 1.025 (0.934-1.091) at 0.2 ms.
IDLE_CYCLE_TIME_MS = 0.5


def auto_idle_before_init(*, num_gpus: int, environ=None) -> bool:
    """:func:`auto_idle` read before ``hvd.init()`` from what horovodrun gives each rank
    (``HOROVOD_SIZE``, ``HOROVOD_LOCAL_SIZE``, ``HOROVOD_CONTROLLER``); False where they are missing
    (mpirun, or a process started by hand)."""
    env = os.environ if environ is None else environ
    try:
        size, local_size = int(env["HOROVOD_SIZE"]), int(env["HOROVOD_LOCAL_SIZE"])
    except (KeyError, ValueError):
        return False
    return auto_idle(num_gpus=num_gpus, size=size, local_size=local_size,
                     gloo=env.get("HOROVOD_CONTROLLER", "").lower() == "gloo")


def auto_idle(*, num_gpus: int, size: int, local_size: int, gloo: bool) -> bool:
    """``auto``'s choice: idle when this process computes on the CPU, every rank runs on this host (so
    every byte the threads move is CPU work on the cores the compute uses) and Horovod's controller is
    Gloo. Under the MPI controller (mpirun) it stays normal: there the 64 MiB all-reduce of
    bench/p3_allreduce.py ran at 0.65-0.74 of raw ``hvd.allreduce`` at idle against 0.91-1.05 at normal
    priority (3 alternating launches each; OpenMPI's shared-memory transfer polls, cause not traced)."""
    return num_gpus == 0 and size > 1 and size == local_size and gloo
