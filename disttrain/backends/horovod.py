"""One process per device, gradients all-reduced by Horovod (MPI, Gloo or NCCL)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import tensorflow as tf

from disttrain.backends.base import Backend, InputContext
from disttrain.watchdog import TIMEOUT_ENV

SETUP_HINT = ("run scripts/setup.sh in the disttrain checkout to build and install it (`make demo` and "
              "`make test` run it too)")


def import_horovod():
    """Imports ``horovod.tensorflow`` or raises an ImportError that says how to get it."""
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise ImportError(f"the horovod backend needs Horovod with TensorFlow support, which is not "
                          f"installed here ({err}); {SETUP_HINT}") from err
    return hvd


def stall_check_env(environ: dict) -> dict[str, str]:
    """Horovod's stall inspector settings derived from disttrain's watchdog timeout, unless the user set
    them: ``HOROVOD_STALL_CHECK_TIME_SECONDS`` = a quarter of ``DISTTRAIN_STEP_TIMEOUT`` (at least 1), so
    Horovod names the ranks missing from a collective before the watchdog aborts: for a tensor in its
    response cache (every step after the first) it needs two to three check periods (MPI controller
    only: see :meth:`HorovodBackend.stall_hint`)."""
    raw = environ.get(TIMEOUT_ENV, "").strip()
    if not raw or "HOROVOD_STALL_CHECK_TIME_SECONDS" in environ:
        return {}
    try:
        seconds = float(raw)
    except ValueError:
        return {}  # the trainer reports the bad value
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, int(seconds / 4)))} if seconds > 0 else {}


def _raw(variable: Any) -> tf.Variable:
    return variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)


class HorovodBackend(Backend):
    """Data parallelism with one replica per process; launch with ``horovodrun -np N`` or ``mpirun``.

    The gradients of every step are summed with one grouped all-reduce, and the model and optimizer
    variables are broadcast from rank 0 before the first step (``sync_initial_state``).

    Args:
      compression: ``none`` or ``fp16`` (halves the bytes on the wire, at fp16 precision).

    Raises:
      ImportError: If Horovod is not installed; the message names the set-up command.
    """

    name = "horovod"

    def __init__(self, *, compression: str = "none"):
        hvd = import_horovod()
        self._hvd = hvd
        os.environ.update(stall_check_env(os.environ))  # read by hvd.init()
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

    def stall_hint(self) -> str:
        # Horovod 0.28.1's Gloo controller never fills the rank list its stall inspector loops over
        # (gloo_controller.cc: global_ranks_.reserve(size_) then writes through data(), so size() stays 0),
        # so "Missing ranks" is printed under mpirun / horovodrun --mpi only.
        return ("Horovod's own stall inspector (HOROVOD_STALL_CHECK_TIME_SECONDS, printed by rank 0) names the ranks "
                "missing from a collective under mpirun or horovodrun --mpi; Horovod 0.28.1 under Gloo "
                "(horovodrun --gloo) never prints it.")

    # -- input ---------------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> tf.data.Dataset:
        return dataset_fn(self.input_context(global_batch_size))
