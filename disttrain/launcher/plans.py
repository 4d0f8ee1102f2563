"""What ``disttrain launch`` starts: one :class:`WorkerSpec` per worker, for MultiWorker or Horovod.

A plan is made afresh for every (re)start: new TF_CONFIG ports, a new Horovod rendezvous server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from disttrain.launcher.hosts import Slot, free_ports, is_local, route_address

#: Variables copied into a remote worker's environment (locally the whole environment is inherited).
EXPORTED_PREFIXES = ("DISTTRAIN_", "TF_", "HOROVOD_", "NCCL_", "OMP_", "PYTHON", "CUDA_", "KERAS_", "OMPI_")
EXPORTED_NAMES = ("PATH", "LD_LIBRARY_PATH")


@dataclasses.dataclass
class WorkerSpec:
    """One worker: where it runs, what it runs, and the variables set for it on top of the environment.

    Attributes:
      rank: Worker index in ``[0, size)``.
      host: Host name as given by the user (``localhost`` for local runs).
      command: The program and its arguments.
      env: Variables added for this worker (TF_CONFIG, HOROVOD_RANK, ...).
      local: True if the worker runs on this machine (no ssh).
      guard_options: Extra options for the guard (e.g. ``--iface-for host``).
    """

    rank: int
    host: str
    command: list[str]
    env: dict[str, str]
    local: bool = True
    guard_options: list[str] = dataclasses.field(default_factory=list)

    def argv(self, *, ssh: Sequence[str], grace: float, base_env: dict[str, str]) -> list[str]:
        """The exact command line the launcher runs for this worker (the guard, through ssh if remote)."""
        guard = [sys.executable, "-m", "disttrain.launcher.guard", "--grace", f"{grace:g}", *self.guard_options,
                 "--"]
        if self.local:
            return guard + self.command
        exported = {k: v for k, v in base_env.items() if k.startswith(EXPORTED_PREFIXES) or k in EXPORTED_NAMES}
        exported.update(self.env)
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(exported.items()))
        remote = f"cd {shlex.quote(os.getcwd())} && exec env {assignments} {shlex.join(guard + self.command)}"
        return [*ssh, self.host, remote]

    def describe(self, argv: list[str]) -> str:
        """The command as it is run, with this worker's own variables in front when it runs locally."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " if self.local else ""
        return prefix + shlex.join(argv)


@dataclasses.dataclass
class Plan:
    """The workers of one (re)start and what to release when they are done."""

    workers: list[WorkerSpec]
    close: Callable[[], None] = lambda: None


class HostUnreachable(RuntimeError):
    """No worker can be started on ``host`` (ssh failed or gave no answer)."""

    def __init__(self, message: str, *, host: str):
        super().__init__(message)
        self.host = host


def remote_free_ports(host: str, count: int, *, ssh: Sequence[str], timeout: float = 60) -> list[int]:
    """Asks ``host`` (through ssh) for ``count`` free TCP ports.

    Raises:
      HostUnreachable: If ssh fails or the answer is not a list of ports (quoting the command and its output).
    """
    argv = [*ssh, host, shlex.join([sys.executable, "-m", "disttrain.launcher.guard", "--free-ports", str(count)])]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HostUnreachable(f"no answer from {host} within {timeout:.0f}s: {shlex.join(argv)}; check that "
                              f"`{shlex.join(ssh)} {host} true` works without a password", host=host) from None
    words = proc.stdout.split()
    if proc.returncode != 0 or len(words) != count or not all(w.isdigit() for w in words):
        raise HostUnreachable(f"cannot start processes on {host}: `{shlex.join(argv)}` exited with "
                              f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}; check passwordless "
                              f"ssh and that {sys.executable} exists there with disttrain installed", host=host)
    return [int(w) for w in words]


def multiworker_plan(command: list[str], slots: Sequence[Slot], *, ssh: Sequence[str]) -> Plan:
    """Workers with TF_CONFIG (MultiWorkerMirroredStrategy); ports are free ports of each host.

    The ports of all hosts that are this machine (``localhost``, ``127.0.0.2``, ...) are taken together:
    the workers listen on every interface, so two of them must not share a port.
    """
    ports: dict[int, int] = {}
    by_host: dict[str, list[Slot]] = {}
    for slot in slots:
        by_host.setdefault(slot.host if not is_local(slot.host) else "", []).append(slot)
    for host, host_slots in by_host.items():
        found = free_ports(len(host_slots)) if not host else remote_free_ports(host, len(host_slots), ssh=ssh)
        ports.update({slot.rank: port for slot, port in zip(host_slots, found)})
    cluster = {"worker": [f"{slot.host}:{ports[slot.rank]}" for slot in slots]}
    workers = [WorkerSpec(rank=slot.rank, host=slot.host, command=list(command), local=is_local(slot.host),
                          env={"TF_CONFIG": json.dumps({"cluster": cluster,
                                                        "task": {"type": "worker", "index": slot.rank}})})
               for slot in slots]
    return Plan(workers)


def require_horovod() -> None:
    """Checks that Horovod's launcher parts import.

    Raises:
      ImportError: If Horovod is not installed (naming the command that installs it).
    """
    try:
        import horovod.runner.gloo_run  # noqa: F401
        import horovod.runner.http.http_server  # noqa: F401
    except ImportError as err:
        from disttrain.install import INSTALL_HINT

        raise ImportError(f"--backend horovod needs Horovod, which is not installed here ({err}); {INSTALL_HINT}"
                          ) from err


def horovod_plan(command: list[str], slots: Sequence[Slot]) -> Plan:
    """Horovod ranks with the Gloo controller and Horovod's own rendezvous server (as horovodrun runs them).

    Raises:
      ImportError: If Horovod is not installed (naming the command that installs it).
    """
    require_horovod()
    from horovod.runner.common.util.hosts import SlotInfo
    from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
    from horovod.runner.http.http_server import RendezvousServer

    infos = [SlotInfo(hostname=s.host, rank=s.rank, local_rank=s.local_rank, cross_rank=s.cross_rank, size=s.size,
                      local_size=s.local_size, cross_size=s.cross_size) for s in slots]
    all_local = all(is_local(s.host) for s in slots)
    server_ip = "127.0.0.1" if all_local else route_address(next(s.host for s in slots if not is_local(s.host)))
    server = RendezvousServer()
    port = server.start()
    server.init(infos)
    shared = {k: str(v) for k, v in create_run_env_vars(server_ip, ["lo"], port).items()}
    if not all_local:  # each host's interface is found there, by the guard
        del shared["HOROVOD_GLOO_IFACE"], shared["NCCL_SOCKET_IFNAME"]
    workers = [WorkerSpec(rank=s.rank, host=s.host, command=list(command), local=is_local(s.host),
                          env={**shared, **create_slot_env_vars(info)},
                          guard_options=[] if all_local else ["--iface-for", s.host])
               for s, info in zip(slots, infos)]
    return Plan(workers, close=server.stop)
