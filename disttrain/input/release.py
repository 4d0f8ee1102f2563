"""An epoch's iterator is released on a background thread, so the next epoch (or the end of ``fit``) does
not wait for TensorFlow to tear it down.

Measured on this project's machine (tensorflow-cpu 2.21, one process, P4's CNN and ``dataset_fn``, 40 steps
of ~42 ms a ``fit``): dropping the epoch's last reference to its ``tf.data`` iterator blocked the caller for
0.7-0.8 s in about a third of the fits, with no CPU used: an strace showed the main thread waiting on
tf.data's autotuning thread (``Model::OptimizeLoop``), which had not been woken by the iterator's
cancellation and slept out its optimization period (10 ms, doubling after each round up to 60 s) before
the iterator could be destroyed. Such fits took 65 ms a step instead of 42; with autotuning off
(``options.autotune.enabled = False``) none did, and neither did a plain loop that drops its iterator
the same way (what triggers it in the Trainer's use was not found). Autotuning is worth keeping, so the
Trainer hands each finished epoch's iterator to one daemon thread here, which drops it; the wait, where it
happens, is that thread's, and the next epoch starts at once. At interpreter exit the thread is given
up to :data:`EXIT_WAIT_SECONDS` to finish (no worse than the synchronous drop it replaces).
"""

from __future__ import annotations

import atexit
import queue
import threading
from typing import Any

#: At interpreter exit, the longest wait for the thread to finish (a daemon thread still inside
#: TensorFlow's teardown while the process exits could crash it).
EXIT_WAIT_SECONDS = 120.0

_pending: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def release(obj: Any) -> None:
    """Drops ``obj`` (the caller's reference must be its last one) on the release thread."""
    global _thread
    if obj is None:
        return
    with _lock:
        if _thread is None or not _thread.is_alive():
            if _thread is None:  # at exit, wait for what is being torn down (as a synchronous drop did)
                atexit.register(wait_idle, EXIT_WAIT_SECONDS)
            _thread = threading.Thread(target=_run, name="disttrain-release", daemon=True)
            _thread.start()
    _pending.put(obj)


def wait_idle(timeout: float = 60.0) -> bool:
    """Blocks until everything handed over so far has been dropped (tests; at exit); False on timeout."""
    done = threading.Event()
    release(done)  # reaches the thread after everything before it; _run sets it
    return done.wait(timeout)


def _run() -> None:
    while True:
        obj = _pending.get()
        if isinstance(obj, threading.Event):
            obj.set()
        del obj  # the last reference: TensorFlow tears the iterator down here
