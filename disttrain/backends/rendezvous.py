"""Start-up of multi-process backends: forming TF_CONFIG under mpirun, and waiting for peers with a limit.

TensorFlow's MultiWorkerMirroredStrategy waits for every worker of TF_CONFIG inside one C++ call that
holds the GIL and ignores SIGTERM (its preemption notifier takes the signal over): a worker whose peer
never starts hangs silently. So before TensorFlow starts, every worker meets the others in plain Python
on its own TF_CONFIG port (:func:`wait_for_peers`): this ends after ``DISTTRAIN_STARTUP_TIMEOUT``
seconds (default 300) with an error naming the workers that did not come, and SIGTERM/SIGINT end it at
once. Horovod ranks started with Gloo meet the same way in the launcher's rendezvous server
(:func:`wait_for_horovod_peers`) before ``hvd.init()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

#: Variables set by MPI launchers (mpirun, srun with PMI/PMIx) in every process.
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
DEFAULT_STARTUP_TIMEOUT = 300.0
_HINT = ("raise the limit with DISTTRAIN_STARTUP_TIMEOUT=<seconds> (disttrain launch --startup-timeout); "
         "0 waits forever")


def startup_timeout(value: float | None = None) -> float:
    """Seconds to wait for peers at start-up: ``value``, else DISTTRAIN_STARTUP_TIMEOUT, else 300; 0 = forever.

    Raises:
      ValueError: If the variable is not a non-negative number.
    """
    if value is None:
        raw = os.environ.get("DISTTRAIN_STARTUP_TIMEOUT", "")
        try:
            value = float(raw) if raw else DEFAULT_STARTUP_TIMEOUT
        except ValueError:
            raise ValueError(f"DISTTRAIN_STARTUP_TIMEOUT={raw!r} is not a number of seconds; e.g. 300") from None
    if value < 0:
        raise ValueError(f"start-up timeout {value:g} is negative; give seconds >= 0 (0 waits forever)")
    return value


@contextlib.contextmanager
def signals_end_waiting(what: str) -> Iterator[None]:
    """While waiting for peers, SIGTERM/SIGINT end the process at once with a message (exit 128 + signal).

    ``os._exit``: nothing needs cleaning up before TensorFlow starts, and a normal exit after importing
    TensorFlow can take seconds.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        name = signal.Signals(signum).name
        sys.stderr.write(f"disttrain: {name} while {what}; exiting\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_peers(addresses: Sequence[str], index: int, *, timeout: float, what: str = "MultiWorker") -> None:
    """Meets every other worker of ``addresses`` on this worker's own port, before TensorFlow binds it.

    Each worker listens on its address and greets every other one; it returns once it has greeted all
    and been greeted by all (then everyone has started, and TensorFlow's own wait is short).

    Args:
      addresses: ``host:port`` of every worker, in rank order (TF_CONFIG's cluster).
      index: This worker's position in ``addresses``.
      timeout: Seconds before giving up; 0 waits forever.
      what: Name of the backend for messages.

    Raises:
      TimeoutError: If some workers did not show up in time (names each, its address and what failed).
      OSError: If this worker's port is taken.
    """
    others = [i for i in range(len(addresses)) if i != index]
    if not others:
        return
    token = hashlib.sha1(json.dumps(list(addresses)).encode()).hexdigest()[:12]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _split(addresses[index])[1]))
    except OSError as err:
        listener.close()
        raise OSError(f"{what} start-up: worker {index} cannot listen on {addresses[index]} ({err}); the port "
                      "is taken: pick other ports in TF_CONFIG (disttrain launch picks free ones)") from err
    listener.listen(len(addresses))
    reached: set[int] = set()  # peers this worker greeted
    heard: set[int] = set()  # peers that greeted this worker
    start = time.monotonic()
    next_note = start + 10.0
    try:
        with signals_end_waiting(f"worker {index} waited for its {what} peers"):
            while not (reached.issuperset(others) and heard.issuperset(others)):
                for i in [i for i in others if i not in reached]:
                    try:
                        with socket.create_connection(_split(addresses[i]), timeout=0.5) as conn:
                            conn.sendall(f"disttrain {token} {index}\n".encode())
                        reached.add(i)
                    except OSError:
                        pass
                readable, _, _ = select.select([listener], [], [], 0.2)
                if readable:
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(2.0)
                        try:
                            words = conn.recv(256).decode(errors="replace").split()
                        except OSError:
                            words = []
                    if len(words) == 3 and words[:2] == ["disttrain", token] and words[2].isdigit():
                        heard.add(int(words[2]))
                now = time.monotonic()
                missing = [i for i in others if i not in reached or i not in heard]
                if timeout and now - start > timeout:
                    raise TimeoutError(f"{what} start-up: worker {index} ({addresses[index]}) waited {timeout:g}s "
                                       f"for its peers; missing: {_describe(missing, addresses, reached, heard, index)}."
                                       f" Start every worker listed in TF_CONFIG, or {_HINT}")
                if now > next_note and missing:
                    sys.stderr.write(f"disttrain: worker {index} is waiting for {what} peers: "
                                     f"{_describe(missing, addresses, reached, heard, index)}\n")
                    sys.stderr.flush()
                    next_note = now + 60.0
    finally:
        listener.close()


def _describe(missing: list[int], addresses: Sequence[str], reached: set[int], heard: set[int], index: int) -> str:
    parts = []
    for i in missing:
        if i not in reached and i not in heard:
            why = "not started: nothing listens there"
        elif i not in heard:
            why = f"started, but it has not reached this worker at {addresses[index]}"
        else:
            why = "it reached this worker, but its address is unreachable from here"
        parts.append(f"worker {i} at {addresses[i]} ({why})")
    return "; ".join(parts)


def under_mpi(environ=None) -> bool:
    """True when an MPI launcher (mpirun, srun with PMI) started this process."""
    env = os.environ if environ is None else environ
    return any(k in env for k in MPI_SIZE_ENV)


def tf_config_from_mpi() -> str:
    """Forms TF_CONFIG under mpirun/srun: each process takes a free port and all exchange ``host:port``.

    The host is ``DISTTRAIN_HOST`` if set, else this machine's host name; when every process runs on the
    same machine, ``localhost``. The exchange is one mpi4py ``allgather``; MPI is then finalized again
    unless the program had initialized it itself (an initialized OpenMPI made TensorFlow's collectives
    about twice as slow here).

    Raises:
      ImportError: If mpi4py is not installed (names the fix).
    """
    ours = "mpi4py.MPI" not in sys.modules
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"the multiworker backend under mpirun/srun exchanges worker addresses with mpi4py, which "
                          f"is not installed ({err}); pip install mpi4py (disttrain's [mpi] extra), or set "
                          "TF_CONFIG yourself") from err
    from disttrain.launcher.hosts import free_ports

    comm = MPI.COMM_WORLD
    host = os.environ.get("DISTTRAIN_HOST") or socket.gethostname()
    peers = comm.allgather((host, free_ports(1)[0]))
    rank = comm.Get_rank()
    if ours:
        MPI.Finalize()
    if len({h for h, _ in peers}) == 1:
        peers = [("localhost", port) for _, port in peers]
    return json.dumps({"cluster": {"worker": [f"{h}:{p}" for h, p in peers]},
                       "task": {"type": "worker", "index": rank}})


def tf_config_from_launcher(environ=None) -> str | None:
    """TF_CONFIG for a worker started by mpirun/srun without one: from mpi4py (MPI launchers) or, under
    plain ``srun``, from SLURM's variables (ports ``DISTTRAIN_PORT`` + local task, default 12345); else None.
    """
    env = os.environ if environ is None else environ
    if env.get("TF_CONFIG"):
        return env["TF_CONFIG"]
    if under_mpi(env):
        return tf_config_from_mpi()
    if "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        from disttrain.launcher import slurm

        return slurm.tf_config(port=int(env.get("DISTTRAIN_PORT", "12345")), env=env)
    return None


def wait_for_horovod_peers(*, timeout: float, environ=None) -> dict[int, str]:
    """Meets the other Horovod ranks in the launcher's Gloo rendezvous server before ``hvd.init()``.

    Only for ranks started with Gloo (horovodrun or ``disttrain launch --backend horovod``); under mpirun,
    ``MPI_Init`` is the meeting and mpirun starts every rank itself.

    Returns:
      The host of every rank (as the launcher named it), ``{}`` when there is no rendezvous server.

    Raises:
      TimeoutError: If some ranks did not arrive in time (names them and the server).
    """
    env = os.environ if environ is None else environ
    addr, port = env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), env.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if not addr or not port or "HOROVOD_RANK" not in env or env.get("HOROVOD_ELASTIC") == "1":
        return {}  # no Gloo rendezvous server (mpirun), or elastic Horovod (ranks come and go by design)
    rank, size = int(env["HOROVOD_RANK"]), int(env.get("HOROVOD_SIZE", "1"))
    base = f"http://{addr}:{port}/disttrain-startup"
    host = env.get("HOROVOD_HOSTNAME", socket.gethostname())
    start = time.monotonic()
    with signals_end_waiting(f"rank {rank} waited for its Horovod peers"):
        _http(f"{base}/{rank}", data=host.encode(), timeout=timeout, start=start)
        hosts = {rank: host}
        missing = [r for r in range(size) if r != rank]
        while missing:
            for r in missing:
                found = _http(f"{base}/{r}", timeout=timeout, start=start)
                if found is not None:
                    hosts[r] = found.decode(errors="replace")
            missing = [r for r in missing if r not in hosts]
            if missing and timeout and time.monotonic() - start > timeout:
                raise TimeoutError(f"Horovod start-up: rank {rank} waited {timeout:g}s; rank(s) "
                                   f"{', '.join(map(str, missing))} of {size} did not reach the rendezvous server "
                                   f"at {addr}:{port}. Check that every rank was started, or {_HINT}")
            if missing:
                time.sleep(0.2)
    return hosts


def _http(url: str, *, timeout: float, start: float, data: bytes | None = None) -> bytes | None:
    """GET (or PUT ``data``) against Horovod's rendezvous server; None for a key not there yet."""
    while True:
        request = urllib.request.Request(url, data=data, method="PUT" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        except OSError as err:
            if timeout and time.monotonic() - start > timeout:
                raise TimeoutError(f"Horovod start-up: the rendezvous server {url.split('/')[2]} is unreachable "
                                   f"({err}); it is started by horovodrun or disttrain launch") from err
            time.sleep(0.5)
