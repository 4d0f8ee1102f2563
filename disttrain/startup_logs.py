"""Quiet start-up: TensorFlow's C++ start-up notices stay out of the user's output.

Measured with tensorflow-cpu 2.21 (each ``import tensorflow`` on this machine):

* ``TF_CPP_MIN_LOG_LEVEL`` (unset: 0) removes the ``I ... cpu_feature_guard.cc ... This TensorFlow
  binary is optimized to use available CPU instructions ...`` line at 1 or more, and the C++ INFO and
  WARNING lines of a run (e.g. tf.data's "Local rendezvous is aborting ... End of sequence") at 2.
* Nothing but ``TF_ENABLE_ONEDNN_OPTS=0`` removes the two ``WARNING: All log messages before
  absl::InitializeLog() is called are written to STDERR`` / ``I ... port.cc:153] oneDNN custom
  operations are on ...`` pairs (one per TensorFlow library that checks it): they are written before
  TensorFlow reads its log level. ``TF_CPP_MIN_LOG_LEVEL=3``, ``GLOG_minloglevel``,
  ``ABSL_MIN_LOG_LEVEL`` and ``TF_ENABLE_ONEDNN_OPTS=1`` all leave them.

``TF_ENABLE_ONEDNN_OPTS=0`` switches oneDNN's kernels off, which changes the numbers (and speed) of a
CPU run, so disttrain does not set it. Instead, once ``import disttrain`` ran, the first ``import
tensorflow`` of the process (the user's or disttrain's own) runs with file descriptor 2 passed through a
filter that drops exactly those notices; everything else written meanwhile goes through unchanged.
``import disttrain`` also sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless it is set already, so every process
disttrain starts (and their children: horovodrun's and mpirun's ranks inherit it) logs C++ errors only.

horovodrun imports TensorFlow itself (to check its build) and so prints the notices once more, from its
own process; ``disttrain run -- horovodrun ...`` passes the launcher's stderr through the same filter.

``DISTTRAIN_VERBOSE=1`` (``disttrain launch --verbose`` sets it for its workers) turns all of this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading

#: Set to 1 to keep TensorFlow's start-up notices and its C++ INFO/WARNING lines.
VERBOSE_ENV = "DISTTRAIN_VERBOSE"
#: The C++ log level set (unless given) for TensorFlow: 2 = errors only.
DEFAULT_LOG_LEVEL = "2"
#: Pieces of the start-up lines that are dropped (lines holding any of them).
NOTICES = (b"All log messages before absl::InitializeLog() is called are written to STDERR",
           b"oneDNN custom operations are on.")

_set_level: str | None = None  # the TF_CPP_MIN_LOG_LEVEL install() set, if it set one


def verbose(environ=None) -> bool:
    """True when :data:`VERBOSE_ENV` asks for TensorFlow's own start-up output."""
    value = (os.environ if environ is None else environ).get(VERBOSE_ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no")


def install() -> None:
    """Sets ``TF_CPP_MIN_LOG_LEVEL`` (unless set) and filters the first ``import tensorflow``; called by
    ``import disttrain``. Does nothing with :data:`VERBOSE_ENV` set or once TensorFlow is loaded."""
    global _set_level
    if verbose() or "tensorflow" in sys.modules:
        return
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _set_level = DEFAULT_LOG_LEVEL
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def make_verbose() -> None:
    """Sets :data:`VERBOSE_ENV` in this process's environment (for the processes it starts) and takes back
    the ``TF_CPP_MIN_LOG_LEVEL`` that :func:`install` set (one the user set stays)."""
    global _set_level
    os.environ[VERBOSE_ENV] = "1"
    if _set_level is not None and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == _set_level:
        del os.environ["TF_CPP_MIN_LOG_LEVEL"]
    _set_level = None


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` the ordinary way, once, and wraps its loader in :class:`_QuietLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the ordinary finders find it now
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader's ``exec_module`` with stderr filtered (:func:`_filtered_stderr`)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with _FilteredStderr():
            self._loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _FilteredStderr:
    """While active, file descriptor 2 is a pipe; a thread copies its lines to the real stderr, except
    those holding one of :data:`NOTICES`."""

    def __enter__(self) -> "_FilteredStderr":
        self._thread = None
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            read_end, write_end = os.pipe()
        except (OSError, ValueError, AttributeError):
            self._saved = None
            return self
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=copy_without_notices, args=(read_end, os.dup(self._saved)), daemon=True,
                                        name="disttrain-quiet-startup")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the copying thread reads its end
        os.close(self._saved)
        if self._thread is not None:
            self._thread.join(timeout=5)

def copy_without_notices(read_end: int, target: int) -> None:
    """Copies the lines read from file descriptor ``read_end`` to ``target``, except those holding one of
    :data:`NOTICES`, until no one writes to it; closes both.

    Args:
      read_end: The read end of a pipe.
      target: Where the lines go (e.g. a duplicate of file descriptor 2).
    """
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not any(notice in line for notice in NOTICES):
                    _write_all(target, line + b"\n")
    if pending and not any(notice in pending for notice in NOTICES):
        _write_all(target, pending)
    os.close(target)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass
