"""The backend protocol: the one place that knows how processes and replicas talk.

Everything outside ``disttrain/backends`` speaks to a :class:`Backend` only, so a training step written
once runs unchanged on one device, on ``tf.distribute`` strategies and under Horovod.

Vocabulary:
  * process (= worker, = Horovod rank): one Python process. ``rank`` in ``[0, size)``.
  * replica: one copy of the model computing on one slice of the global batch. A process drives
    ``local_replicas`` replicas; ``num_replicas = size * local_replicas`` in total.
  * input pipeline: one ``tf.data`` pipeline per process, feeding that process's replicas.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import tensorflow as tf

from disttrain import watchdog
from disttrain.backends import failures
from disttrain.backends import gradients as gradients_lib

REDUCE_OPS = ("sum", "mean", "max", "min")


@dataclasses.dataclass(frozen=True)
class InputContext:
    """What one input pipeline needs to know to produce its share of each global batch.

    Attributes:
      num_input_pipelines: Number of pipelines (one per process).
      input_pipeline_id: This pipeline's index in ``[0, num_input_pipelines)``.
      num_replicas_in_sync: Replicas over all processes.
      replicas_per_pipeline: Replicas this pipeline feeds (one per device of the process).
      global_batch_size: Examples per step over all replicas.
    """

    num_input_pipelines: int
    input_pipeline_id: int
    num_replicas_in_sync: int
    replicas_per_pipeline: int
    global_batch_size: int

    @property
    def per_replica_batch_size(self) -> int:
        """Examples per step on each replica: ``global_batch_size // num_replicas_in_sync``."""
        return self.global_batch_size // self.num_replicas_in_sync


def check_reduce_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"reduce op {op!r} is not supported; use one of {', '.join(REDUCE_OPS)}")
    return op


class Backend(abc.ABC):
    """How one run's processes and replicas compute and communicate.

    Subclasses implement the abstract methods; the trainer, data, metrics and LR code use only this
    interface.
    """

    #: Short name used by ``get_backend`` and in logs: single, mirrored, multiworker, horovod.
    name: str = "abstract"

    # -- topology ------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's index in ``[0, size)``."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of processes in the run."""

    @property
    @abc.abstractmethod
    def local_rank(self) -> int:
        """This process's index among the processes on its host."""

    @property
    @abc.abstractmethod
    def local_replicas(self) -> int:
        """Replicas driven by this process."""

    @property
    def num_replicas(self) -> int:
        """Replicas over all processes; the global batch is split evenly over them."""
        return self.size * self.local_replicas

    @property
    def is_chief(self) -> bool:
        """True on exactly one process: the one that logs, writes summaries and checkpoints."""
        return self.rank == 0

    # -- variables -----------------------------------------------------------------------------
    @abc.abstractmethod
    def scope(self) -> contextlib.AbstractContextManager:
        """The context in which the models, optimizers and metrics must be created (``with backend.scope():``).

        Returns:
          A context manager (the strategy's scope under tf.distribute, a device scope otherwise).
        """

    def check_created_in_scope(self, *, models: list, optimizers: list) -> None:
        """Checks that the models and optimizers were created inside :meth:`scope`.

        Args:
          models: Keras models.
          optimizers: Keras optimizers.

        Raises:
          ValueError: Naming the first one created outside the scope (tf.distribute backends).
        """

    def sync_initial_state(self, variables: list[tf.Variable]) -> None:
        """Makes ``variables`` equal on every process (rank 0's values win). Call once, before training.

        Horovod broadcasts them (``hvd.broadcast_variables``); tf.distribute backends keep them in sync
        already.

        Args:
          variables: The models' and optimizers' variables.
        """

    # -- the step ------------------------------------------------------------------------------
    @abc.abstractmethod
    def run(self, fn: Callable, args: tuple = ()) -> Any:
        """Runs ``fn(*args)`` on every local replica (inside ``tf.function``), as ``strategy.run``.

        Args:
          fn: The per-replica function.
          args: Its arguments (per-replica values are unpacked for each replica).

        Returns:
          The per-replica results.
        """

    @abc.abstractmethod
    def local_values(self, per_replica: Any) -> tuple:
        """The values of a per-replica result (or sync-on-read variable) on this process's replicas.

        Args:
          per_replica: What :meth:`run` returned (or a variable).
        """

    def local_sum(self, per_replica: Any) -> tf.Tensor:
        """Sums a per-replica result over this process's replicas (no communication).

        Args:
          per_replica: What :meth:`run` returned.

        Returns:
          One tensor: the sum of the local replicas' values.
        """
        values = [tf.convert_to_tensor(v) for v in self.local_values(per_replica)]
        return tf.add_n(values) if len(values) > 1 else tf.identity(values[0])

    #: Compression and bucket size of the gradient reduction (``get_backend(compression=..., bucket_mb=...)``);
    #: read when a step is traced.
    gradient_options: gradients_lib.GradientOptions = gradients_lib.GradientOptions()

    def reduce_gradients(self, grads: list) -> list:
        """In a replica context: the gradients summed over all replicas (compressed and bucketed as
        :attr:`gradient_options` say), identical on every replica.

        Args:
          grads: This replica's gradients (None entries stay None).

        Returns:
          The summed gradients, in the same order.
        """
        return gradients_lib.reduce_gradients(grads, options=self.gradient_options, num_replicas=self.num_replicas,
                                              sum_bucket=self._sum_gradients)

    @abc.abstractmethod
    def _sum_gradients(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        """In a replica context: one bucket of (possibly compressed) gradients summed over all replicas."""

    def apply_gradients(self, optimizer: Any, grads: list, variables: list) -> None:
        """In a replica context: sums ``grads`` over all replicas once (:meth:`reduce_gradients`) and
        applies them (:meth:`apply_reduced_gradients`).

        Args:
          optimizer: A Keras optimizer created in :meth:`scope`.
          grads: This replica's gradients.
          variables: The variables they belong to.
        """
        self.apply_reduced_gradients(optimizer, self.reduce_gradients(grads), variables)

    def apply_reduced_gradients(self, optimizer: Any, reduced: list, variables: list, *,
                                apply: tf.Tensor | None = None) -> None:
        """In a replica context: applies gradients already summed over all replicas; the optimizer's own
        sum over replicas is skipped.

        Args:
          optimizer: A Keras optimizer created in :meth:`scope`.
          reduced: Gradients already summed over all replicas.
          variables: The variables they belong to.
          apply: A boolean scalar, identical on every replica (e.g. "the summed gradients are finite"):
            when given, the update (weights, slots, ``iterations``) happens only where it is True.
        """
        def update():
            with gradients_lib.applying_reduced(optimizer):
                optimizer.apply_gradients(zip(reduced, variables))
            return tf.constant(True)

        if apply is None:
            update()
        else:  # no tf.distribute merge_call below (no strategy): a plain cond in the replica
            tf.cond(apply, update, lambda: tf.constant(False))

    def replica_id(self) -> Any:
        """In a replica context: this replica's index in ``[0, num_replicas)`` over all processes.

        Returns:
          An int32 scalar tensor.
        """
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    # -- collectives (eager, called by every process) -------------------------------------------
    @abc.abstractmethod
    def _all_reduce_tensor(self, value: tf.Tensor, op: str) -> tf.Tensor:
        """Reduces one value per process over all processes. ``op`` is sum, max or min."""

    def all_reduce(self, value: Any, op: str = "mean") -> Any:
        """Reduces a tensor, array or Python number held by each process over all processes.

        Every process must call this with a value of the same shape and dtype. The result is identical
        on every process and has the type of ``value`` (Python numbers stay Python numbers).

        Args:
          value: A tensor, numpy array or Python int/float.
          op: One of ``sum``, ``mean``, ``max``, ``min``.

        Returns:
          The reduced value, of ``value``'s type.

        Raises:
          ValueError: If ``op`` is unknown.
        """
        check_reduce_op(op)
        is_python = isinstance(value, (int, float)) and not isinstance(value, bool)
        is_numpy = not is_python and not tf.is_tensor(value)
        tensor = tf.convert_to_tensor(value, dtype=tf.float64 if isinstance(value, float) else None)
        if self.size == 1:
            result = tensor
        else:
            with watchdog.collective(f"all_reduce({op})"), \
                    failures.translating(self, phase=f"all_reduce({op}) called from {failures.caller()}"):
                result = self._all_reduce_tensor(tensor, "sum" if op == "mean" else op)
                if op == "mean":
                    result = (result / tf.cast(self.size, result.dtype) if result.dtype.is_floating
                              else result // self.size)
        if is_python:
            return type(value)(result.numpy())
        if is_numpy:
            return result.numpy()
        return result

    def broadcast(self, value: Any, *, root: int = 0) -> Any:
        """Returns process ``root``'s ``value`` on every process (numeric values of equal shape).

        Args:
          value: A tensor, numpy array or Python int/float; every process passes one of the same shape.
          root: The process whose value everyone gets.
        """
        is_python = isinstance(value, (int, float)) and not isinstance(value, bool)
        tensor = tf.convert_to_tensor(value, dtype=tf.float64 if isinstance(value, float) else None)
        if self.size > 1:
            with watchdog.collective(f"broadcast(root={root})"), \
                    failures.translating(self, phase=f"broadcast(root={root}) called from {failures.caller()}"):
                tensor = self._broadcast_tensor(tensor, root)
        if is_python:
            return type(value)(tensor.numpy())
        return tensor if tf.is_tensor(value) else tensor.numpy()

    def _broadcast_tensor(self, value: tf.Tensor, root: int) -> tf.Tensor:
        contribution = value if self.rank == root else tf.zeros_like(value)
        if contribution.dtype.is_bool:
            return tf.cast(self._all_reduce_tensor(tf.cast(contribution, tf.int32), "sum"), tf.bool)
        return self._all_reduce_tensor(contribution, "sum")

    def barrier(self) -> None:
        """Blocks until every process has reached this call."""
        if self.size > 1:
            with watchdog.collective("barrier"), \
                    failures.translating(self, phase=f"barrier called from {failures.caller()}"):
                self._all_reduce_tensor(tf.constant(1, tf.int32), "sum").numpy()

    def reduce_across_processes(self, value: tf.Tensor, op: str) -> tf.Tensor:
        """Reduces one tensor per process over all processes, eagerly or inside ``tf.function``.

        Unlike :meth:`all_reduce` it can sit in a compiled step (e.g. the stop flag that every step
        carries, see ``disttrain.checkpoint``). Every process must run it at the same point.

        Args:
          value: A tensor; the same shape and dtype on every process.
          op: ``sum``, ``max`` or ``min``.

        Returns:
          The reduced tensor, identical on every process.
        """
        if self.size == 1:
            return tf.identity(value)
        return self._all_reduce_tensor(value, check_reduce_op(op))

    #: Whether the input iterator runs a collective for every batch (then a rank waiting for its batch
    #: may wait for a peer); read by the stall watchdog.
    input_waits_for_peers: bool = False

    #: The stall watchdog's timeout (seconds) when neither ``Trainer(step_timeout=...)`` nor
    #: ``DISTTRAIN_STEP_TIMEOUT`` gives one; None: off. Set by backends whose collectives never time out by
    #: themselves when a peer is lost, so that such a run still ends in bounded time.
    default_step_timeout: float | None = None

    def stall_hint(self) -> str:
        """The advice the stall watchdog adds to its message on this backend ("" for none)."""
        return ""

    # -- failures ------------------------------------------------------------------------------
    def describe_collective_failure(self, err: BaseException) -> failures.CollectiveFailure | None:
        """Reads an error raised by this backend's collectives (or a compiled step running them): when it
        says a collective failed or timed out because a peer or the network was lost, returns what
        happened, the peer(s) that are unreachable (from the error text or a quick TCP probe of the
        peers' addresses) and what to check; None for any other error. Backends with one process
        return None.

        Args:
          err: The error a collective or a compiled step raised.

        Returns:
          A :class:`disttrain.backends.failures.CollectiveFailure`, or None.
        """
        return None

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_writer(self, directory: str) -> str | None:
        """Where this process writes the checkpoints of ``directory``, or None if it writes nothing.

        The variables are identical on every process, so by default the chief alone writes them, into
        ``directory``. Backends whose saving is itself collective (MultiWorkerMirroredStrategy) return
        a private temporary directory on the other processes: they must save too, and the caller
        removes that directory afterwards.

        Args:
          directory: The checkpoint directory every process names.
        """
        return directory if self.is_chief else None

    # -- input ---------------------------------------------------------------------------------
    def input_context(self, global_batch_size: int) -> InputContext:
        """This process's :class:`InputContext` for ``global_batch_size``.

        Args:
          global_batch_size: Examples per step over all replicas.

        Raises:
          ValueError: If the global batch does not split evenly over the replicas.
        """
        if global_batch_size <= 0 or global_batch_size % self.num_replicas:
            up = max(self.num_replicas, -(-global_batch_size // self.num_replicas) * self.num_replicas)
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by {self.num_replicas} replicas; "
                f"use a multiple of {self.num_replicas} (e.g. {up})")
        return InputContext(
            num_input_pipelines=self.size, input_pipeline_id=self.rank,
            num_replicas_in_sync=self.num_replicas, replicas_per_pipeline=self.local_replicas,
            global_batch_size=global_batch_size)

    @abc.abstractmethod
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> Iterator | Any:
        """Builds this process's pipeline with ``dataset_fn`` and returns an iterable of step inputs.

        ``dataset_fn`` returns a dataset of per-replica batches for the given input context; the
        result yields what :meth:`run` takes as its argument.

        Args:
          dataset_fn: ``fn(InputContext) -> tf.data.Dataset`` of per-replica batches.
          global_batch_size: Examples per step over all replicas.
        """

    def describe(self) -> str:
        """A one-line description: name, rank, size, local rank and replicas (e.g. for a log line)."""
        return (f"{self.name}: rank {self.rank}/{self.size}, local rank {self.local_rank}, "
                f"{self.local_replicas} replica(s) here, {self.num_replicas} in sync")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
