"""Backends built on a ``tf.distribute.Strategy`` (single device, Mirrored, MultiWorkerMirrored)."""

from __future__ import annotations

import contextlib
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
    """

    def __init__(self, *, strategy: tf.distribute.Strategy, rank: int = 0, size: int = 1):
        self.strategy = strategy
        self._rank = rank
        self._size = size
        self._local_replicas = strategy.num_replicas_in_sync // size

    @property
    def rank(self) -> int:
        return self._rank

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

    def check_created_in_scope(self, *, model: Any, optimizer: Any) -> None:
        where = getattr(optimizer, "_distribution_strategy", None)
        if where is not None and where is not self.strategy:
            raise ValueError(
                f"the optimizer {type(optimizer).__name__} was created outside backend.scope() "
                f"(it belongs to {type(where).__name__}, the backend runs {type(self.strategy).__name__}); "
                "create it inside `with backend.scope():`")
        for variable in getattr(model, "variables", []):
            if not self.strategy.extended.variable_created_in_scope(_raw(variable)):
                raise ValueError(
                    f"model variable {variable.path if hasattr(variable, 'path') else variable.name!r} "
                    "was created outside backend.scope(); build the model inside `with backend.scope():`")

    # -- the step ------------------------------------------------------------------------------
    def run(self, fn: Callable, args: tuple = ()) -> Any:
        return self.strategy.run(fn, args=args)

    def local_values(self, per_replica: Any) -> tuple:
        return tuple(self.strategy.experimental_local_results(per_replica))

    def reduce_gradients(self, grads: list) -> list:
        ctx = tf.distribute.get_replica_context()
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [g for _, g in present])
        out = list(grads)
        for (i, _), g in zip(present, reduced):
            out[i] = g
        return out

    def apply_gradients(self, optimizer: Any, grads: list, variables: list) -> None:
        # Keras' optimizer sums the gradients over the replicas itself when called in a replica context.
        optimizer.apply_gradients(zip(grads, variables))

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce_tensor(self, value: tf.Tensor, op: str) -> tf.Tensor:
        # Each process contributes its value once: through its first local replica for a sum, through
        # every replica for max/min (duplicates do not change those).
        local = self.local_replicas
        zero = tf.zeros_like(value)

        def per_replica(ctx: tf.distribute.InputReplicaContext) -> tf.Tensor:
            first = ctx.replica_id_in_sync_group % local == 0
            return value if (op != "sum" or first) else zero

        distributed = self.strategy.experimental_distribute_values_from_function(per_replica)
        reduce_op = {"sum": tf.distribute.ReduceOp.SUM, "max": "max", "min": "min"}[op]
        if op == "sum":
            return self.strategy.reduce(reduce_op, distributed, axis=None)
        # max / min: gather every replica's value and reduce locally (the strategy has no MAX op).
        gathered = self.strategy.gather(
            self.strategy.run(lambda v: tf.expand_dims(v, 0), args=(distributed,)), axis=0)
        return tf.reduce_max(gathered, axis=0) if op == "max" else tf.reduce_min(gathered, axis=0)

    # -- input ---------------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> Any:
        context = self.input_context(global_batch_size)

        def build(tf_context: tf.distribute.InputContext) -> tf.data.Dataset:
            if tf_context.num_input_pipelines != context.num_input_pipelines:
                raise RuntimeError(
                    f"tf.distribute made {tf_context.num_input_pipelines} input pipelines, expected "
                    f"{context.num_input_pipelines}")
            return dataset_fn(context)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return self.strategy.distribute_datasets_from_function(build, options=options)
