"""Start N local worker processes with TF_CONFIG (MultiWorkerMirroredStrategy) and supervise them.

If any worker fails, the others are stopped at once (a collective would otherwise wait forever), and
a ``timeout`` bounds the whole run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on localhost right now."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def tf_config(workers: Sequence[str], index: int) -> str:
    """The TF_CONFIG of worker ``index`` in a cluster of ``workers`` (host:port strings)."""
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}})


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()


def launch_tf_config(command: Sequence[str], *, num_workers: int, timeout: float | None = None,
                     env: dict | None = None, prefix_output: bool = True) -> int:
    """Runs ``command`` as ``num_workers`` local workers and returns the first non-zero exit code (or 0).

    Args:
      command: The program and its arguments, e.g. ``[sys.executable, "train.py"]``.
      num_workers: Number of worker processes (>= 1).
      timeout: Seconds before every worker is killed and 124 returned; None waits forever.
      env: Base environment (default ``os.environ``); TF_CONFIG is set per worker.
      prefix_output: Prefix each output line with ``[i]``.

    Raises:
      ValueError: If ``num_workers`` < 1 or ``command`` is empty.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1")
    if not command:
        raise ValueError("no command to launch; give the training script, e.g. `python train.py`")
    workers = [f"localhost:{p}" for p in free_ports(num_workers)]
    base = dict(os.environ if env is None else env)
    procs, pumps = [], []
    for i in range(num_workers):
        worker_env = dict(base, TF_CONFIG=tf_config(workers, i))
        proc = subprocess.Popen(list(command), env=worker_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        thread = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] " if prefix_output else "",
                                                       sys.stdout), daemon=True)
        thread.start()
        pumps.append(thread)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(f"disttrain launch: timeout after {timeout:.0f}s; stopping the workers\n")
                code = 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)
