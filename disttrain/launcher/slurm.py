"""SLURM's variables turned into what disttrain's launchers need (used by launch/*.sbatch).

Inside ``srun``, every task knows the step's nodes (``SLURM_STEP_NODELIST``, e.g. ``node[01-02]``), the
tasks per node (``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x2)``) and its own rank (``SLURM_PROCID``).
With SLURM's default block distribution, task ``r`` runs on the node whose slots hold rank ``r``; the
i-th task of a node gets port ``PORT + i``. Outside a step (in the batch script) the job's variables
(``SLURM_JOB_NODELIST``, ``SLURM_TASKS_PER_NODE``) are used.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from disttrain.launcher.hosts import expand_counts, expand_hostlist


def _get(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise KeyError(f"{' or '.join(names)} is not set: run this inside a SLURM job (sbatch/srun)")


def nodes_and_tasks(env: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
    """``[(node, tasks on it), ...]`` of the current step (or job), in SLURM's order.

    Raises:
      KeyError: Outside SLURM.
      ValueError: If the node list and the task counts do not match.
    """
    env = os.environ if env is None else env
    nodes = expand_hostlist(_get(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    counts = expand_counts(_get(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if len(counts) != len(nodes):
        raise ValueError(f"SLURM lists {len(nodes)} nodes ({', '.join(nodes)}) but task counts for {len(counts)}")
    return list(zip(nodes, counts))


def tf_config(*, port: int = 12345, env: Mapping[str, str] | None = None) -> str:
    """This task's TF_CONFIG (JSON): every task of the step is a worker, rank = ``SLURM_PROCID``.

    Raises:
      KeyError: Outside a SLURM step.
      ValueError: If SLURM placed this task elsewhere than the block layout says (use --distribution=block).
    """
    env = os.environ if env is None else env
    workers = [f"{node}:{port + i}" for node, count in nodes_and_tasks(env) for i in range(count)]
    rank = int(_get(env, "SLURM_PROCID"))
    if rank >= len(workers):
        raise ValueError(f"SLURM_PROCID={rank} but the step has {len(workers)} tasks")
    node, local = env.get("SLURMD_NODENAME"), env.get("SLURM_LOCALID")
    if node and local is not None and workers[rank] != f"{node}:{port + int(local)}":
        raise ValueError(f"task {rank} runs on {node} as local task {local}, but the block layout puts it at "
                         f"{workers[rank]}; launch with srun --distribution=block")
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}})


def horovod_hosts(env: Mapping[str, str] | None = None) -> str:
    """The job's hosts with their task counts, ``node01:4,node02:4``, for ``horovodrun -H``."""
    return ",".join(f"{node}:{count}" for node, count in nodes_and_tasks(env))
