"""``disttrain launch``: start the workers of a run on one or several hosts, watch them, stop them together.

    disttrain launch -n 2 train.py                              # 2 MultiWorker workers here (TF_CONFIG)
    disttrain launch --backend horovod -H a:2,b:2 train.py      # 4 Horovod ranks (Gloo) on hosts a and b

Modules: :mod:`~disttrain.launcher.hosts` (host lists), :mod:`~disttrain.launcher.plans` (what each worker
runs), :mod:`~disttrain.launcher.supervisor` (watching, signals, restarts), :mod:`~disttrain.launcher.guard`
(the process around each worker), :mod:`~disttrain.launcher.slurm` (SLURM's variables). See docs/launch.md.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from disttrain.launcher.hosts import Host, assign_slots
from disttrain.launcher.plans import horovod_plan, multiworker_plan
from disttrain.launcher.supervisor import PREEMPTED, Supervisor

#: The remote shell used for hosts other than this one (as horovodrun's).
DEFAULT_SSH = "ssh -o BatchMode=yes -o StrictHostKeyChecking=no"
#: How the workers of each backend are started (see disttrain.launcher.plans).
BACKENDS = ("multiworker", "horovod")


def launch(command: Sequence[str], *, backend: str = "multiworker", hosts: Sequence[Host], num_workers: int,
           max_restarts: int = 0, grace_period: float = 60.0, stop_timeout: float = 5.0,
           timeout: float | None = None, startup_timeout: float | None = None, ssh: str = DEFAULT_SSH,
           env: dict | None = None) -> int:
    """Runs ``command`` as ``num_workers`` workers on ``hosts`` and returns the launcher's exit code.

    Args:
      command: The program and its arguments, e.g. ``[sys.executable, "train.py"]``.
      backend: ``multiworker`` (TF_CONFIG) or ``horovod`` (Gloo controller, Horovod's rendezvous server).
      hosts: Where the workers run, filled in order.
      num_workers: Number of workers (processes).
      max_restarts: Times all workers are started again after a failure.
      grace_period: Seconds from a forwarded SIGTERM/SIGINT to SIGKILL.
      stop_timeout: Seconds from SIGTERM to SIGKILL for the others after one worker failed.
      timeout: Seconds for the whole run; None for no limit.
      startup_timeout: Seconds the workers wait for their peers at start-up (DISTTRAIN_STARTUP_TIMEOUT).
      ssh: Remote shell command for other hosts.
      env: Base environment of the workers (default ``os.environ``).

    Raises:
      ValueError: For an unknown backend, no command, or more workers than slots.
      ImportError: For ``horovod`` where Horovod is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown launch backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not command:
        raise ValueError("no command to launch; give the training script, e.g. `disttrain launch train.py`")
    slots = assign_slots(hosts, num_workers=num_workers)
    ssh_argv = shlex.split(ssh)
    base_env = dict(os.environ if env is None else env)
    if startup_timeout is not None:
        base_env["DISTTRAIN_STARTUP_TIMEOUT"] = f"{startup_timeout:g}"

    plans = {"multiworker": lambda: multiworker_plan(list(command), slots, ssh=ssh_argv),
             "horovod": lambda: horovod_plan(list(command), slots)}

    supervisor = Supervisor(grace_period=grace_period, stop_timeout=stop_timeout, timeout=timeout, ssh=ssh_argv,
                            env=base_env)
    return supervisor.run(plans[backend], max_restarts=max_restarts)


__all__ = ["BACKENDS", "DEFAULT_SSH", "PREEMPTED", "Supervisor", "launch"]
