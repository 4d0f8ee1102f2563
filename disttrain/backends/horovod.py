"""One process per device, gradients all-reduced by Horovod (MPI, Gloo or NCCL)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import tensorflow as tf

from disttrain.backends.base import Backend, InputContext
from disttrain.backends.rendezvous import startup_timeout as _startup_timeout
from disttrain.backends.rendezvous import under_mpi, wait_for_horovod_peers
from disttrain.install import INSTALL_HINT as SETUP_HINT


def import_horovod():
    """Imports ``horovod.tensorflow`` or raises an ImportError that says how to get it."""
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise ImportError(f"the horovod backend needs Horovod with TensorFlow support, which is not "
                          f"installed here ({err}); {SETUP_HINT}") from err
    return hvd


def _raw(variable: Any) -> tf.Variable:
    return variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)


class HorovodBackend(Backend):
    """Data parallelism with one replica per process; launch with ``horovodrun -np N`` or ``mpirun``.

    The gradients of every step are summed with one grouped all-reduce, and the model and optimizer
    variables are broadcast from rank 0 before the first step (``sync_initial_state``).

    Ranks started with Gloo first meet in the launcher's rendezvous server, so a rank that never comes is
    named within ``startup_timeout`` seconds (and SIGTERM ends that wait). Started by plain ``python``
    (no horovodrun, mpirun or ``disttrain launch``), it warns that it runs one process.

    Args:
      compression: ``none`` or ``fp16`` (halves the bytes on the wire, at fp16 precision).
      startup_timeout: Seconds to wait for the other ranks (default DISTTRAIN_STARTUP_TIMEOUT or 300).

    Raises:
      ImportError: If Horovod is not installed; the message names the set-up command.
      TimeoutError: If a rank does not reach the rendezvous in time.
    """

    name = "horovod"

    def __init__(self, *, compression: str = "none", startup_timeout: float | None = None):
        hvd = import_horovod()
        self._hvd = hvd
        if "HOROVOD_RANK" not in os.environ and not under_mpi():
            sys.stderr.write("disttrain: warning: the horovod backend was started without horovodrun, mpirun or "
                             "`disttrain launch --backend horovod`, so it runs ONE process (rank 0 of 1); launch "
                             "it with e.g. `horovodrun -np 2 python script.py`\n")
            sys.stderr.flush()
        wait_for_horovod_peers(timeout=_startup_timeout(startup_timeout))
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            try:  # one GPU per process, picked by local rank
                tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
                tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
            except RuntimeError:
                pass
        try:
            self._compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression]
        except KeyError:
            raise ValueError(f"compression {compression!r} is not supported; use 'none' or 'fp16'") from None
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def local_rank(self) -> int:
        return self._hvd.local_rank()

    @property
    def local_replicas(self) -> int:
        return 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sync_initial_state(self, variables: list) -> None:
        if self.size > 1 and variables:
            self._hvd.broadcast_variables([_raw(v) for v in variables], root_rank=0)

    # -- the step ------------------------------------------------------------------------------
    def run(self, fn: Callable, args: tuple = ()) -> Any:
        return fn(*args)

    def local_values(self, per_replica: Any) -> tuple:
        return (per_replica,)

    def reduce_gradients(self, grads: list) -> list:
        present = [(i, tf.convert_to_tensor(g)) for i, g in enumerate(grads) if g is not None]
        if not present or self.size == 1:
            return list(grads)
        reduced = self._hvd.grouped_allreduce([g for _, g in present], op=self._hvd.Sum,
                                              compression=self._compression)
        out = list(grads)
        for (i, _), g in zip(present, reduced):
            out[i] = g
        return out

    def apply_gradients(self, optimizer: Any, grads: list, variables: list) -> None:
        optimizer.apply_gradients(zip(self.reduce_gradients(grads), variables))

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce_tensor(self, value: tf.Tensor, op: str) -> tf.Tensor:
        if value.dtype.is_bool:
            return tf.cast(self._hvd.allreduce(tf.cast(value, tf.int32), op=self._ops[op]), tf.bool)
        return self._hvd.allreduce(value, op=self._ops[op])

    def _broadcast_tensor(self, value: tf.Tensor, root: int) -> tf.Tensor:
        return self._hvd.broadcast(value, root_rank=root)

    # -- input ---------------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> tf.data.Dataset:
        return dataset_fn(self.input_context(global_batch_size))
