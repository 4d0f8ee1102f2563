"""Several processes (hosts), each with its devices: ``tf.distribute.MultiWorkerMirroredStrategy``."""

from __future__ import annotations

import json
import os
import signal
import threading

import tensorflow as tf

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
    tasks = [("chief", i, a) for i, a in enumerate(cluster.get("chief", []))]
    tasks += [("worker", i, a) for i, a in enumerate(cluster.get("worker", []))]
    ranks = [r for r, (k, i, _) in enumerate(tasks) if (k, i) == (kind, index)]
    if not ranks:
        raise ValueError(f"TF_CONFIG task {kind}:{index} is not a chief or worker of the cluster {cluster}")
    return ranks[0], [address for _, _, address in tasks]


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
        super().__init__(strategy=strategy, rank=rank, size=size)
        self._local_rank = local_rank

    @property
    def local_rank(self) -> int:
        return self._local_rank
