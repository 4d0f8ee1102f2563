"""Backends built on a ``tf.distribute.Strategy`` (single device, Mirrored, MultiWorkerMirrored)."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import tensorflow as tf

from disttrain.backends.base import Backend, InputContext


def _raw(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras 3 variable (or the variable itself)."""
    return getattr(variable, "value", variable) if not isinstance(variable, tf.Variable) else variable


class StrategyBackend(Backend):
    """A backend that delegates replication and collectives to a ``tf.distribute.Strategy``.

    Args:
      strategy: The strategy; created by the subclass.
      rank: This process's worker index.
      size: Number of worker processes.
      on_cpu: The strategy's devices are this process's CPU (no GPU to prefetch batches to).
    """

    def __init__(self, *, strategy: tf.distribute.Strategy, rank: int = 0, size: int = 1, on_cpu: bool = False):
        self.strategy = strategy
        self._rank = rank
        self._size = size
        self._local_replicas = strategy.num_replicas_in_sync // size
        self._reducers: dict[str, Callable] = {}
        # One replica on this process's CPU: its pipeline feeds the step as it is (see distribute_dataset)
        self._plain_input = on_cpu and self._local_replicas == 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def input_waits_for_peers(self) -> bool:
        # Over several workers, tf.distribute's iterator all-reduces "has a batch" at every batch of a
        # finite dataset (input_lib._calculate_replicas_with_values); a plain pipeline does not.
        return self._size > 1 and not self._plain_input

    @property
    def size(self) -> int:
        return self._size

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def local_replicas(self) -> int:
        return self._local_replicas

    def scope(self) -> contextlib.AbstractContextManager:
        return self.strategy.scope()

    def check_created_in_scope(self, *, models: list, optimizers: list) -> None:
        for optimizer in optimizers:
            where = getattr(optimizer, "_distribution_strategy", None)
            if where is not None and where is not self.strategy:
                raise ValueError(
                    f"the optimizer {type(optimizer).__name__} was created outside backend.scope() "
                    f"(it belongs to {type(where).__name__}, the backend runs {type(self.strategy).__name__}); "
                    "create it inside `with backend.scope():`")
        for model in models:
            for variable in model.variables:
                if not self.strategy.extended.variable_created_in_scope(_raw(variable)):
                    raise ValueError(
                        f"variable {getattr(variable, 'path', variable.name)!r} of model {model.name!r} was "
                        "created outside backend.scope(); build the model inside `with backend.scope():`")

    # -- the step ------------------------------------------------------------------------------
    def run(self, fn: Callable, args: tuple = ()) -> Any:
        return self.strategy.run(fn, args=args)

    def local_values(self, per_replica: Any) -> tuple:
        return tuple(self.strategy.experimental_local_results(per_replica))

    def _sum_gradients(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        # A step function's input placeholders carry no device, which the collective needs to know;
        # an identity made here is placed on the replica's device.
        tensors = [t if t.device else tf.identity(t) for t in tensors]
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tensors)

    def apply_reduced_gradients(self, optimizer: Any, reduced: list, variables: list, *,
                                apply: tf.Tensor | None = None) -> None:
        if apply is None:
            return super().apply_reduced_gradients(optimizer, reduced, variables)
        base = super()

        # Keras' apply_gradients calls merge_call, which tf.distribute forbids inside a cond in a replica
        # context: merge into the cross-replica context and branch there, as Keras' LossScaleOptimizer
        # does (keras/src/optimizers/loss_scale_optimizer.py, _tf_apply). ``apply`` is identical on every
        # replica (decided on the summed gradients and every replica's flags), so any replica's value is
        # the global one (Keras' own takes the first local replica's, which is not global across workers
        # for local gradients; here it is).
        def cross_replica(distribution, apply, reduced):
            def update():
                distribution.extended.call_for_each_replica(
                    lambda grads: base.apply_reduced_gradients(optimizer, grads, variables), args=(reduced,))
                return tf.constant(True)

            flag = distribution.experimental_local_results(apply)[0]
            return tf.cond(flag, update, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(apply, reduced))

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce_tensor(self, value: tf.Tensor, op: str) -> tf.Tensor:
        if op not in self._reducers:
            self._reducers[op] = tf.function(functools.partial(self._replicated_reduce, op=op))
        return self._reducers[op](value)

    def _replicated_reduce(self, value: tf.Tensor, *, op: str) -> tf.Tensor:
        """Runs on every replica with this process's ``value``; each process counts once."""
        local = self.local_replicas

        def per_replica(v):
            ctx = tf.distribute.get_replica_context()
            if op == "sum":  # only the first replica of each process contributes
                first = tf.equal(ctx.replica_id_in_sync_group % local, 0)
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(first, v, tf.zeros_like(v)))
            gathered = ctx.all_gather(tf.expand_dims(v, 0), axis=0)  # duplicates don't change max/min
            return tf.reduce_max(gathered, 0) if op == "max" else tf.reduce_min(gathered, 0)

        return self.strategy.experimental_local_results(self.strategy.run(per_replica, args=(value,)))[0]

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_writer(self, directory: str) -> str | None:
        """Every worker saves (a tf.distribute save may run collectives, and a worker that skips it
        deadlocks the others); the non-chiefs write into ``workertemp_<rank>`` inside ``directory``."""
        if self.is_chief:
            return directory
        return os.path.join(directory, f"workertemp_{self.rank}")

    # -- input ---------------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> Any:
        """With one replica on the CPU the pipeline is used as is and ``strategy.run`` takes its batches as
        that replica's: the step runs where the data already is, creating a tf.distribute iterator every
        epoch (tens of ms) is saved, and so is its cost to the steps: in TensorFlow 2.21 a ``tf.function``
        first run after a ``distribute_datasets_from_function`` iterator exists costs about twice the CPU
        a step (P4's CNN under MultiWorker: 73.5 vs 43.0 ms; bench/multiworker_iterator.py). Otherwise
        tf.distribute splits the batches over the replicas and prefetches them to each device."""
        context = self.input_context(global_batch_size)
        if self._plain_input:
            return dataset_fn(context)

        def build(tf_context: tf.distribute.InputContext) -> tf.data.Dataset:
            if tf_context.num_input_pipelines != context.num_input_pipelines:
                raise RuntimeError(
                    f"tf.distribute made {tf_context.num_input_pipelines} input pipelines, expected "
                    f"{context.num_input_pipelines}")
            return dataset_fn(context)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return self.strategy.distribute_datasets_from_function(build, options=options)
