"""Several processes (hosts), each with its devices: ``tf.distribute.MultiWorkerMirroredStrategy``."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from disttrain.backends.strategy import StrategyBackend


def parse_tf_config(raw: str | None = None) -> tuple[int, int, int]:
    """Returns ``(rank, size, local_rank)`` of this task from ``TF_CONFIG``.

    The chief task (if the cluster has one) is rank 0 and workers follow in index order.

    Raises:
      ValueError: If TF_CONFIG is missing, not JSON, or names a task that is not in the cluster.
    """
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if not raw:
        raise ValueError("the multiworker backend needs TF_CONFIG; launch the workers with "
                         "`disttrain launch --tf-config -n N script.py` or set TF_CONFIG yourself")
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
    rank = ranks[0]
    host = tasks[rank][2].rsplit(":", 1)[0]
    local_rank = sum(1 for _, _, address in tasks[:rank] if address.rsplit(":", 1)[0] == host)
    return rank, len(tasks), local_rank


class MultiWorkerBackend(StrategyBackend):
    """Synchronous data parallelism over the workers named in ``TF_CONFIG`` (collective all-reduce).

    Args:
      cpu_replicas: Must be None or 1: MultiWorkerMirroredStrategy drives all local GPUs, or else
        exactly one CPU device per worker (it does not replicate over logical CPU devices).
      communication: ``ring``, ``nccl`` or ``auto`` collective implementation.

    Raises:
      ValueError: If TF_CONFIG is missing or malformed.
    """

    name = "multiworker"

    def __init__(self, *, cpu_replicas: int | None = None, communication: str = "auto"):
        rank, size, local_rank = parse_tf_config()
        if cpu_replicas not in (None, 1):
            raise ValueError(f"cpu_replicas={cpu_replicas} is not supported by the multiworker backend: "
                             "MultiWorkerMirroredStrategy uses one CPU device per worker; start more "
                             "workers instead (disttrain launch --tf-config -n N)")
        impl = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}[communication]
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl))
        if strategy.cluster_resolver.task_type not in ("chief", "worker"):
            raise ValueError(f"task type {strategy.cluster_resolver.task_type!r} cannot train; "
                             "only chief and worker tasks run the training loop")
        super().__init__(strategy=strategy, rank=rank, size=size)
        self._local_rank = local_rank

    @property
    def local_rank(self) -> int:
        return self._local_rank
