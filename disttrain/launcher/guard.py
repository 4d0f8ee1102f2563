"""The small process ``disttrain launch`` puts around each worker, locally or at the far end of ssh.

    python -m disttrain.launcher.guard [--grace S] [--iface-for ADDRESS] -- python train.py ...
    python -m disttrain.launcher.guard --free-ports N

It starts the worker in its own session and relays the launcher's requests, read as lines on stdin:
``TERM`` / ``INT`` send that signal to the worker's process group, ``KILL`` kills it. When stdin
closes without a request (the launcher or its ssh connection died, even by ``kill -9``), the worker
gets SIGTERM and, ``--grace`` seconds later, SIGKILL: no worker outlives its launcher. Meanwhile the
guard keeps reading the worker's output (discarding what it can no longer pass on), so a worker saving
its checkpoint is not killed by a broken pipe. The worker also gets SIGKILL if the guard itself dies
(Linux parent-death signal). SIGTERM/SIGINT sent to the guard are passed on to the worker. The guard
exits with the worker's code (128 + N if signal N ended it).

``--iface-for ADDRESS`` sets ``HOROVOD_GLOO_IFACE`` and ``NCCL_SOCKET_IFNAME`` to the interface that holds
``ADDRESS`` on this host (what horovodrun finds with its task services). ``--free-ports N`` prints N
free TCP ports of this host (for MultiWorker's TF_CONFIG on remote hosts) and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from disttrain.launcher.hosts import free_ports, interface_of

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _copy(source, target) -> None:
    """Copies the worker's output to the guard's; once that breaks (launcher gone), keeps draining it."""
    for chunk in iter(lambda: os.read(source.fileno(), 65536), b""):
        if target is not None:
            try:
                target.write(chunk)
                target.flush()
            except (BrokenPipeError, OSError, ValueError):
                target = None


def _relay(child: subprocess.Popen, grace: float) -> None:
    """Reads the launcher's requests from stdin; handles its disappearance."""
    names = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
    for line in sys.stdin:
        if line.strip() in names:
            _signal_group(child.pid, names[line.strip()])
    # stdin closed: the launcher is gone. Stop the worker, gracefully first.
    if child.poll() is None:
        _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(child.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disttrain.launcher.guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds between SIGTERM and SIGKILL when the launcher disappears (default 60)")
    parser.add_argument("--iface-for", metavar="ADDRESS", default=None,
                        help="set HOROVOD_GLOO_IFACE/NCCL_SOCKET_IFNAME to the interface holding ADDRESS")
    parser.add_argument("--free-ports", type=int, metavar="N", default=None,
                        help="print N free TCP ports of this host and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the worker's command")
    args = parser.parse_args(argv)
    if args.free_ports is not None:
        print(" ".join(str(p) for p in free_ports(args.free_ports)))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no worker command given after --")
    env = dict(os.environ)
    if args.iface_for:
        iface = interface_of(args.iface_for)
        if iface is None:
            sys.stderr.write(f"disttrain guard: no interface of this host holds {args.iface_for}; "
                             "leaving HOROVOD_GLOO_IFACE unset\n")
        else:
            env.update(HOROVOD_GLOO_IFACE=iface, NCCL_SOCKET_IFNAME=iface)
    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    copies = [threading.Thread(target=_copy, args=(stream, target), daemon=True)
              for stream, target in ((child.stdout, sys.stdout.buffer), (child.stderr, sys.stderr.buffer))]
    for thread in copies:
        thread.start()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: _signal_group(child.pid, signal.SIGTERM if signum == signal.SIGHUP
                                                              else signum))
    threading.Thread(target=_relay, args=(child, args.grace), daemon=True).start()
    code = child.wait()
    for thread in copies:
        thread.join(timeout=5)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
