"""Backends and their selection. ``get_backend("auto")`` picks one from the launcher's environment."""

from __future__ import annotations

import os
from typing import Mapping

from disttrain import exit_status
from disttrain.backends.base import REDUCE_OPS, Backend, InputContext
from disttrain.backends.rendezvous import MPI_SIZE_ENV
from disttrain.backends.gradients import DEFAULT_BUCKET_MB, GradientOptions

NAMES = ("single", "mirrored", "multiworker", "horovod")

# Variables set by the launchers that start one process per rank.
HOROVOD_ENV = ("HOROVOD_RANK",)  # horovodrun (gloo controller)
MPI_ENV = MPI_SIZE_ENV  # mpirun / horovodrun --mpi / srun with PMI

_current: Backend | None = None


def detect(environ: Mapping[str, str] | None = None, *, num_gpus: int | None = None) -> str:
    """Names the backend a launcher's environment asks for.

    Horovod when started by horovodrun or mpirun; multiworker when TF_CONFIG is set; mirrored when more
    than one GPU is visible or DISTTRAIN_CPU_REPLICAS > 1; else single.

    Args:
      environ: Environment to read (default ``os.environ``).
      num_gpus: Visible GPUs (default: asks TensorFlow).

    Returns:
      ``horovod``, ``multiworker``, ``mirrored`` or ``single``.
    """
    env = os.environ if environ is None else environ
    if any(k in env for k in HOROVOD_ENV + MPI_ENV):
        return "horovod"
    if env.get("TF_CONFIG"):
        return "multiworker"
    if int(env.get("DISTTRAIN_CPU_REPLICAS", "0") or 0) > 1:
        return "mirrored"
    if num_gpus is None:
        import tensorflow as tf
        num_gpus = len(tf.config.list_physical_devices("GPU"))
    return "mirrored" if num_gpus > 1 else "single"


def get_backend(name: str = "auto", *, cpu_replicas: int | None = None, threads: int | None = None,
                compression: str = "none", bucket_mb: float = DEFAULT_BUCKET_MB, **options) -> Backend:
    """Creates (once per process) and returns the backend.

    Call it first thing in a program: logical CPU devices and thread limits must be set before
    TensorFlow initialises its runtime, and Horovod / MultiWorker start their communication here.

    Args:
      name: ``auto``, ``single``, ``mirrored``, ``multiworker`` or ``horovod``.
      cpu_replicas: Logical CPU devices to replicate over (mirrored; default from
        ``DISTTRAIN_CPU_REPLICAS``).
      threads: Cap on TensorFlow's thread pools for this process; default from ``DISTTRAIN_THREADS``.
      compression: Gradients are summed over the replicas in ``none`` (their own dtype), ``fp16`` or
        ``bf16`` (half the bytes; see :mod:`disttrain.backends.gradients`). Every backend.
      bucket_mb: Gradients are summed in buckets of about this many MiB, last layer first, so the
        communication overlaps the backward pass; 0 = one group after the backward pass. Every backend.
      **options: Passed to the backend class (e.g. ``fusion_threshold_mb=``, ``cycle_time_ms=`` for
        Horovod, ``communication=`` for multiworker).

    Raises:
      ValueError: For an unknown name, a second call asking for a different backend, or a bad
        compression or bucket size.
      ImportError: For ``horovod`` where Horovod is not installed (names the set-up command).
    """
    global _current
    if name == "auto":
        name = detect()
    gradient_options = GradientOptions(compression=compression, bucket_mb=bucket_mb)
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; use one of auto, {', '.join(NAMES)}")
    if _current is not None:
        if _current.name != name:
            raise ValueError(f"this process already runs the {_current.name!r} backend; a process can "
                             f"use one backend only (asked for {name!r})")
        if gradient_options not in (GradientOptions(), _current.gradient_options):
            raise ValueError(f"the {name!r} backend already runs with {_current.gradient_options}; a second "
                             f"get_backend cannot change it to {gradient_options}: pass the options to the first call")
        return _current
    from disttrain.backends.devices import limit_threads

    limit_threads(threads or int(os.environ.get("DISTTRAIN_THREADS", "0") or 0))
    if name == "single":
        from disttrain.backends.single import SingleBackend
        _current = SingleBackend(**options)
    elif name == "mirrored":
        from disttrain.backends.mirrored import MirroredBackend
        if cpu_replicas is None and os.environ.get("DISTTRAIN_CPU_REPLICAS"):
            cpu_replicas = int(os.environ["DISTTRAIN_CPU_REPLICAS"])
        _current = MirroredBackend(cpu_replicas=cpu_replicas, **options)
    elif name == "multiworker":
        from disttrain.backends.multiworker import MultiWorkerBackend
        _current = MultiWorkerBackend(cpu_replicas=cpu_replicas, **options)
    else:
        from disttrain.backends.horovod import HorovodBackend
        _current = HorovodBackend(**options)
    _current.gradient_options = gradient_options
    exit_status.start(rank=_current.rank, size=_current.size)  # for `disttrain run` (DISTTRAIN_STATUS_DIR)
    if not _current.is_chief:  # silence elsewhere: only the chief talks
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    return _current


__all__ = ["Backend", "GradientOptions", "InputContext", "NAMES", "REDUCE_OPS", "detect", "get_backend"]
