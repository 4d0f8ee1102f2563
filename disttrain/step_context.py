"""The step context: what the user's step function is handed on every replica."""

from __future__ import annotations

import threading
from typing import Any, Callable

import keras
import tensorflow as tf

from disttrain.backends import Backend


class StepContext:
    """Handed to the user's step function: the few operations whose meaning depends on the backend.

    Attributes:
      backend: The active backend.
      global_batch_size: Examples per step over all replicas.
      num_replicas: Replicas the global batch is split over.
    """

    def __init__(self, *, backend: Backend, global_batch_size: int):
        self.backend = backend
        self.global_batch_size = global_batch_size
        self.num_replicas = backend.num_replicas
        # (variable, local gradient) pairs, per replica thread, while tracing a gradient-histogram step
        self._capture = threading.local()
        # per replica thread, while tracing accumulated micro-batches: {key: [optimizer, grad sums, variables]}
        self._pending = threading.local()
        # per replica thread, while tracing a train step: 1.0 when a LossScaleOptimizer skips the update
        self._nonfinite = threading.local()

    def average_loss(self, per_example_loss: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        """This replica's share of the mean loss over the GLOBAL batch: ``sum(loss * w) / global_batch``.

        Summed over the replicas (which the gradient reduction does) it is the global mean loss, so the
        gradients match a single device running the whole global batch.
        """
        return tf.nn.compute_average_loss(per_example_loss, sample_weight=sample_weight,
                                          global_batch_size=self.global_batch_size)

    def scale_regularization_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """Divides a regularisation loss by the number of replicas (it is added once per replica)."""
        return loss / tf.cast(self.num_replicas, loss.dtype)

    def reduce_gradients(self, grads: list) -> list:
        """The gradients summed over all replicas: the global gradient, identical on every replica.

        Use it for decisions that need the global gradient (its norm for clipping, a NaN check,
        logging). Do not pass the result to :meth:`apply_gradients`, which sums again; change the
        local gradients instead (linear changes commute with the sum). Clipping by the global norm::

            norm = tf.linalg.global_norm(ctx.reduce_gradients(grads))
            factor = tf.minimum(1.0, clip_norm / norm)
            ctx.apply_gradients(optimizer, [g * factor for g in grads], variables)
        """
        if getattr(self._pending, "updates", None) is not None:
            raise ValueError("ctx.reduce_gradients is not available with accumulation_steps > 1: it would see one "
                             "micro-batch's gradients, not the update's; use accumulation_steps=1 for steps that "
                             "decide on the global gradient (e.g. clipping by its norm)")
        return self.backend.reduce_gradients(grads)

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """Sums ``grads`` over all replicas (once) and applies them with ``optimizer``.

        With gradient accumulation (``Trainer(accumulation_steps=K)``) the call only adds ``grads`` to
        this update's sums; they are reduced and applied once, after the K-th micro-batch."""
        pending = getattr(self._pending, "updates", None)
        if pending is not None:
            key = (id(optimizer), tuple(id(v) for v in variables))
            if key not in pending:
                pending[key] = [optimizer, list(grads), list(variables)]
            else:
                sums = pending[key][1]
                pending[key][1] = [s if g is None else g if s is None else s + g for s, g in zip(sums, grads)]
            return
        captured = getattr(self._capture, "pairs", None)
        if captured is not None:
            captured.extend((v, g) for g, v in zip(grads, variables) if g is not None)
        reduced = self.backend.reduce_gradients(grads)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # It skips the update when a gradient is not finite; decided on the reduced gradients, the
            # decision is the same on every replica. Counted for the logs (see take_nonfinite).
            skipped = tf.cast(tf.logical_not(optimizer.check_finite(reduced)), tf.float32)
            self._nonfinite.value = tf.maximum(getattr(self._nonfinite, "value", 0.0), skipped)
        self.backend.apply_reduced_gradients(optimizer, reduced, variables)

    def take_nonfinite(self) -> tf.Tensor | None:
        """1.0 if a ``LossScaleOptimizer`` skipped this replica's step for non-finite gradients, 0.0 if
        not, None if no such optimizer applied gradients; resets the record."""
        value = getattr(self._nonfinite, "value", None)
        self._nonfinite.value = None
        return value

    def run_accumulated(self, micro_step: Callable[[Any], Any], micro_batches: list) -> list:
        """Runs ``micro_step`` on each micro-batch (at trace time, unrolled), summing the gradients each
        passes to :meth:`apply_gradients`; then reduces and applies each optimizer's sums once.

        Returns:
          The micro-steps' results, in order.
        """
        self._pending.updates = pending = {}
        try:
            results = [micro_step(batch) for batch in micro_batches]
        finally:
            self._pending.updates = None
        for optimizer, grads, variables in pending.values():
            self.apply_gradients(optimizer, grads, variables)
        return results
