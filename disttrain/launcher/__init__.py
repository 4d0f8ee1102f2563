"""``disttrain launch``: start the workers of a run on one or several hosts, watch them, stop them together.

    disttrain launch -n 2 train.py                              # 2 MultiWorker workers here (TF_CONFIG)
    disttrain launch --backend horovod -H a:2,b:2 train.py      # 4 Horovod ranks (Gloo) on hosts a and b
    disttrain launch --min-workers 2 --max-workers 4 --host-discovery-script ./hosts.sh train.py   # elastic

Modules: :mod:`~disttrain.launcher.hosts` (host lists), :mod:`~disttrain.launcher.plans` (what each worker
runs), :mod:`~disttrain.launcher.supervisor` (watching, signals, restarts), :mod:`~disttrain.launcher.guard`
(the process around each worker), :mod:`~disttrain.launcher.slurm` (SLURM's variables),
:mod:`~disttrain.launcher.elastic` and :mod:`~disttrain.launcher.discovery` (elastic jobs). See docs/launch.md
and docs/elastic.md.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from disttrain.launcher.discovery import Discovery
from disttrain.launcher.elastic import DEFAULT_ELASTIC_TIMEOUT, TOO_FEW_WORKERS, ElasticAgent
from disttrain.launcher.hosts import Host, assign_slots
from disttrain.launcher.plans import horovod_plan, multiworker_plan, require_horovod
from disttrain.launcher.supervisor import PREEMPTED, Supervisor

#: The remote shell used for hosts other than this one (as horovodrun's).
DEFAULT_SSH = "ssh -o BatchMode=yes -o StrictHostKeyChecking=no"
#: How the workers of each backend are started (see disttrain.launcher.plans).
BACKENDS = ("multiworker", "horovod")


def launch(command: Sequence[str], *, backend: str = "multiworker", hosts: Sequence[Host] | None,
           num_workers: int | None, max_restarts: int = 0, grace_period: float = 60.0, stop_timeout: float = 5.0,
           timeout: float | None = None, startup_timeout: float | None = None, ssh: str = DEFAULT_SSH,
           env: dict | None = None, min_workers: int | None = None, max_workers: int | None = None,
           discovery_script: str | None = None, discovery_interval: float = 2.0,
           elastic_timeout: float = DEFAULT_ELASTIC_TIMEOUT) -> int:
    """Runs ``command`` as ``num_workers`` workers on ``hosts`` and returns the launcher's exit code.

    With ``min_workers``, ``max_workers`` or ``discovery_script`` the job is elastic
    (:mod:`disttrain.launcher.elastic`): between ``min_workers`` (default 1) and ``max_workers`` (default
    every usable slot) workers, re-formed when one is lost or the hosts change.

    Args:
      command: The program and its arguments, e.g. ``[sys.executable, "train.py"]``.
      backend: ``multiworker`` (TF_CONFIG) or ``horovod`` (Gloo controller, Horovod's rendezvous server).
      hosts: Where the workers run, filled in order (None with ``discovery_script``).
      num_workers: Number of workers (processes); None for an elastic job.
      max_restarts: Times all workers are started again after a failure.
      grace_period: Seconds from a forwarded SIGTERM/SIGINT to SIGKILL.
      stop_timeout: Seconds from SIGTERM to SIGKILL for the others after one worker failed.
      timeout: Seconds for the whole run; None for no limit.
      startup_timeout: Seconds the workers wait for their peers at start-up (DISTTRAIN_STARTUP_TIMEOUT).
      ssh: Remote shell command for other hosts.
      env: Base environment of the workers (default ``os.environ``).
      min_workers: Elastic: fewest workers.
      max_workers: Elastic: most workers.
      discovery_script: Elastic: a command printing the available ``host:slots`` lines (horovodrun's
        ``--host-discovery-script``), run every ``discovery_interval`` seconds.
      discovery_interval: Seconds between two runs of the discovery script.
      elastic_timeout: Elastic: seconds with fewer than ``min_workers`` usable slots before the job ends
        with exit code 75.

    Raises:
      ValueError: For an unknown backend, no command, more workers than slots, or elastic options that do
        not fit together.
      ImportError: For ``horovod`` where Horovod is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown launch backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not command:
        raise ValueError("no command to launch; give the training script, e.g. `disttrain launch train.py`")
    ssh_argv = shlex.split(ssh)
    base_env = dict(os.environ if env is None else env)
    if startup_timeout is not None:
        base_env["DISTTRAIN_STARTUP_TIMEOUT"] = f"{startup_timeout:g}"
    plans = {"multiworker": lambda slots: multiworker_plan(list(command), slots, ssh=ssh_argv),
             "horovod": lambda slots: horovod_plan(list(command), slots)}
    supervisor = Supervisor(grace_period=grace_period, stop_timeout=stop_timeout, timeout=timeout, ssh=ssh_argv,
                            env=base_env)
    if min_workers is None and max_workers is None and discovery_script is None:
        slots = assign_slots(hosts, num_workers=num_workers)
        return supervisor.run(lambda: plans[backend](slots), max_restarts=max_restarts)
    if num_workers is not None or max_restarts:
        raise ValueError("an elastic launch (--min-workers/--max-workers/--host-discovery-script) takes no "
                         "-n/--num-workers and no --max-restarts: give --min-workers and --max-workers instead")
    if (hosts is None) == (discovery_script is None):
        raise ValueError("an elastic launch needs either a host list (-H/--hostfile) or --host-discovery-script, "
                         "not both")
    if backend == "horovod":
        require_horovod()
    discovery = Discovery(hosts=hosts, script=discovery_script, interval=discovery_interval,
                          log=lambda message: supervisor.log(f"elastic: {message}"))
    agent = ElasticAgent(supervisor=supervisor, make_plan=plans[backend], discovery=discovery,
                         min_workers=min_workers or 1, max_workers=max_workers, elastic_timeout=elastic_timeout)
    return agent.run()


__all__ = ["BACKENDS", "DEFAULT_SSH", "PREEMPTED", "TOO_FEW_WORKERS", "Supervisor", "launch"]
