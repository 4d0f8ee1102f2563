"""Several processes (hosts), each with its devices: ``tf.distribute.MultiWorkerMirroredStrategy``."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import tensorflow as tf

from disttrain.backends import reachability
from disttrain.backends.failures import CollectiveFailure
from disttrain.backends.devices import collective_implementation
from disttrain.backends.rendezvous import startup_timeout as _startup_timeout
from disttrain.backends.rendezvous import tf_config_from_launcher, wait_for_peers
from disttrain.backends.strategy import StrategyBackend


def parse_tf_config(raw: str | None = None) -> tuple[int, int, int]:
    """Returns ``(rank, size, local_rank)`` of this task from ``TF_CONFIG``.

    The chief task (if the cluster has one) is rank 0 and workers follow in index order.

    Raises:
      ValueError: If TF_CONFIG is missing, not JSON, or names a task that is not in the cluster.
    """
    rank, tasks = _tasks(raw)
    host = tasks[rank].rsplit(":", 1)[0]
    local_rank = sum(1 for address in tasks[:rank] if address.rsplit(":", 1)[0] == host)
    return rank, len(tasks), local_rank


def _tasks(raw: str | None = None) -> tuple[int, list[str]]:
    """``(rank, addresses of all tasks in rank order)`` from TF_CONFIG (chief first, then workers)."""
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if not raw:
        raise ValueError("the multiworker backend needs TF_CONFIG; launch the workers with "
                         "`disttrain launch -n N script.py`, under `mpirun -np N` (with mpi4py) or `srun`, or "
                         "set TF_CONFIG yourself")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"TF_CONFIG is not valid ({err}): {raw!r}; expected "
                         '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
                         ) from err
    tasks = _task_list(cluster)
    ranks = [r for r, (k, i, _) in enumerate(tasks) if (k, i) == (kind, index)]
    if not ranks:
        raise ValueError(f"TF_CONFIG task {kind}:{index} is not a chief or worker of the cluster {cluster}")
    return ranks[0], [address for _, _, address in tasks]


def _task_list(cluster: dict) -> list[tuple[str, int, str]]:
    """``(job, index, address)`` of every task that trains, in rank order (chief first, then workers)."""
    tasks = [("chief", i, a) for i, a in enumerate(cluster.get("chief", []))]
    return tasks + [("worker", i, a) for i, a in enumerate(cluster.get("worker", []))]


# What TensorFlow's collectives and coordination service say when a peer or the network is lost.
_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
_UNHEALTHY = "stopped sending heartbeats"
#: Words of TensorFlow's collectives and coordination service (not of, e.g., a file system a step reads).
_LOST = ("Collective ops is aborted", "CoordinationService", "coordination service", _UNHEALTHY)


def describe_tf_failure(err: BaseException, *, rank: int, tasks: list[tuple[str, int, str]],
                        probe=reachability.probe) -> CollectiveFailure | None:
    """Reads a TensorFlow error of a multi-worker collective (see
    :meth:`MultiWorkerBackend.describe_collective_failure`); ``tasks`` as :func:`_task_list`."""
    text = (err.message or "") if isinstance(err, tf.errors.OpError) else ""
    peers_named = any(address in text for r, (_, _, address) in enumerate(tasks) if r != rank)
    if not text or not (peers_named or any(word in text for word in _LOST)):
        return None
    ranks = {(job, index): r for r, (job, index, _) in enumerate(tasks)}
    label = lambda r: f"rank {r} ({tasks[r][0]} {tasks[r][1]} at {tasks[r][2]})"  # noqa: E731
    own_host = tasks[rank][2].rpartition(":")[0]
    named: list[int] = []
    if _UNHEALTHY in text:  # the coordination service (on rank 0) lists the tasks whose heartbeats stopped
        listed = text.split(_UNHEALTHY, 1)[1].split("The tasks have crashed", 1)[0]
        named = [ranks[(j, int(i))] for j, i in _TASK.findall(listed) if (j, int(i)) in ranks]
        whose = ", ".join(f"{tasks[r][0]} {tasks[r][1]}" for r in named) or "a task"
        summary = f"TensorFlow's coordination service stopped hearing the heartbeats of {whose} and aborted the collectives"
    elif "CoordinationService" in text or "coordination service" in text:
        named = [0]  # the service runs in the first task (TF's coordination leader)
        summary = (f"this worker's heartbeats to TensorFlow's coordination service (in {tasks[0][0]} {tasks[0][1]} "
                   f"at {tasks[0][2]}) got no answer, and TensorFlow aborted the collectives")
    else:
        summary = "a collective of TensorFlow's MultiWorkerMirroredStrategy was aborted"
        named = [r for r, (_, _, address) in enumerate(tasks) if r != rank and address in text]
    named = [r for r in dict.fromkeys(named) if r != rank]
    others = named or [r for r in range(len(tasks)) if r != rank]
    addresses = [tasks[r][2].rpartition(":") for r in others]
    verdicts = probe([(host.strip("[]"), int(port)) for host, _, port in addresses])
    unreachable = [r for r, v in zip(others, verdicts) if not v.reachable]
    if named:  # TensorFlow named them; the probe says how they look from here
        peers = tuple(f"{label(r)}: {v.describe()}" for r, v in zip(others, verdicts))
    else:
        peers = tuple(f"{label(r)}: {v.describe()}" for r, v in zip(others, verdicts) if not v.reachable)
    hosts = sorted({tasks[r][2].rpartition(":")[0] for r in (unreachable or named)})
    if hosts and all(h == own_host for h in hosts):
        next_step = (f"the peer runs on this host ({own_host}): not the network; see its log for why it died "
                     "or stopped")
    elif hosts:
        next_step = f"check the network between {own_host} and {', '.join(hosts)} (and that those hosts are up)"
    else:
        next_step = "see the other workers' logs for the first error"
    return CollectiveFailure(summary=summary, peers=peers, next_step=next_step,
                             unknown_why="TensorFlow's error names no task and every peer's port answers a probe")


class MultiWorkerBackend(StrategyBackend):
    """Synchronous data parallelism over the workers named in ``TF_CONFIG`` (collective all-reduce).

    The cluster comes from TF_CONFIG; without it, under ``mpirun`` (or ``srun`` with PMI) the processes
    form it themselves (free ports exchanged with mpi4py), and under plain ``srun`` from SLURM's
    variables. Before TensorFlow starts, the workers meet on their
    ports: a worker that does not come within ``startup_timeout`` seconds is named in a TimeoutError, and
    SIGTERM ends the wait (see :mod:`disttrain.backends.rendezvous`).

    Args:
      cpu_replicas: Must be None or 1: MultiWorkerMirroredStrategy drives all local GPUs, or else
        exactly one CPU device per worker (it does not replicate over logical CPU devices).
      communication: ``ring``, ``nccl`` or ``auto`` collective implementation (``auto``: NCCL where the
        worker has GPUs, ring where it has none).
      startup_timeout: Seconds to wait for the other workers (default DISTTRAIN_STARTUP_TIMEOUT or 300).

    Raises:
      ValueError: If TF_CONFIG is missing or malformed, or ``communication='nccl'`` on a worker without GPUs.
      TimeoutError: If a worker of the cluster does not start in time.
    """

    name = "multiworker"

    def __init__(self, *, cpu_replicas: int | None = None, communication: str = "auto",
                 startup_timeout: float | None = None):
        formed = tf_config_from_launcher()
        if formed:  # the strategy's cluster resolver reads the variable
            os.environ["TF_CONFIG"] = formed
        rank, size, local_rank = parse_tf_config()
        if cpu_replicas not in (None, 1):
            raise ValueError(f"cpu_replicas={cpu_replicas} is not supported by the multiworker backend: "
                             "MultiWorkerMirroredStrategy uses one CPU device per worker; start more "
                             "workers instead (disttrain launch -n N)")
        impl = collective_implementation(communication, num_gpus=len(tf.config.list_physical_devices("GPU")))
        wait_for_peers(_tasks()[1], rank, timeout=_startup_timeout(startup_timeout))
        # TensorFlow's coordination service installs a SIGTERM handler of its own that only logs; give the
        # signal back to Python (default: end the process; fit() installs the preemption handler).
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if on_main else None
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl))
        if on_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if strategy.cluster_resolver.task_type not in ("chief", "worker"):
            raise ValueError(f"task type {strategy.cluster_resolver.task_type!r} cannot train; "
                             "only chief and worker tasks run the training loop")
        super().__init__(strategy=strategy, rank=rank, size=size,
                         on_cpu=not tf.config.list_physical_devices("GPU"))
        self._local_rank = local_rank
        self._tasks = _task_list(json.loads(os.environ["TF_CONFIG"])["cluster"])

    def describe_collective_failure(self, err: BaseException) -> CollectiveFailure | None:
        """TensorFlow's errors of a lost peer: "tasks are unhealthy (stopped sending heartbeats):
        /job:worker/replica:0/task:1" (on the coordination service's task, after its heartbeat timeout of
        10 s), a heartbeat to the coordination service that timed out (on the far side), or an aborted
        collective naming a peer's address. The named tasks (else every peer) are probed on their
        TF_CONFIG ports."""
        return describe_tf_failure(err, rank=self.rank, tasks=self._tasks)

    @property
    def local_rank(self) -> int:
        return self._local_rank
