"""TensorFlow's CPU memory: the BFC allocator (a pool) instead of a ``malloc`` per tensor.

TensorFlow allocates every CPU tensor with ``malloc`` unless ``TF_CPU_ALLOCATOR_USE_BFC`` is true
(``ProcessState::GetCPUAllocator``, read once, when the first CPU tensor is allocated). glibc serves a
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap``, so a step that makes a 64 MiB
gradient or all-reduce output pays the kernel's page faults and zeroing of 16,384 pages on every call.
The BFC allocator keeps freed blocks and hands them out again.

Measured on this project's 2-core machine (tensorflow-cpu 2.21, Horovod 0.28.1 over OpenMPI, 2 ranks,
``bench/p3_allreduce.py``'s tensors): a 64 MiB float32 all-reduce in a ``tf.function`` took 95-100 ms
with ``malloc`` (mpi4py on preallocated numpy buffers: 74 ms) and 56-58 ms with the BFC allocator, the
same for ``hvd.allreduce`` and ``hvd.grouped_allreduce``. See docs/benchmarks.md for the rows.

So ``import disttrain`` sets ``TF_CPU_ALLOCATOR_USE_BFC=1`` unless the variable is set already; processes
started from it (``disttrain launch``'s workers, horovodrun's and mpirun's ranks) inherit it. It takes
effect in this process only if no CPU tensor exists yet: import disttrain before running TensorFlow ops.
``TF_CPU_ALLOCATOR_USE_BFC=0`` keeps TensorFlow's default. The pool is not returned to the system while
the process runs, so resident memory stays at its peak; :func:`peak_bytes` reports that peak.
"""

from __future__ import annotations

import os

#: TensorFlow's switch (true/1 = BFC pool); set by :func:`install` unless the user set it.
ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def install(environ=None) -> bool:
    """Sets :data:`ENV` to ``1`` in ``environ`` (default ``os.environ``) unless it is set; returns True
    if it set it."""
    environ = os.environ if environ is None else environ
    if ENV in environ:
        return False
    environ[ENV] = "1"
    return True


def peak_bytes() -> int | None:
    """The largest number of bytes the CPU allocator has held at once in this process, or None if the
    BFC allocator is not in use (TensorFlow keeps no statistics for ``malloc``)."""
    import tensorflow as tf

    try:
        return int(tf.config.experimental.get_memory_info("CPU:0")["peak"])
    except ValueError:  # "Allocator stats not available": not the BFC allocator
        return None
