"""The step context: what the user's step function is handed on every replica."""

from __future__ import annotations

import threading
from typing import Any

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

    def __init__(self, *, backend: Backend, global_batch_size: int, marker: Any = None):
        self.backend = backend
        self.global_batch_size = global_batch_size
        self.num_replicas = backend.num_replicas
        # Per replica thread, while tracing: (variable, local gradient) pairs of a gradient-histogram step,
        # and the step-number tensor for the watchdog's gradient mark.
        self._capture = threading.local()
        self._marker = marker  # a disttrain.watchdog.GradientMarker, or None
        self._traced = self._traced_apply = False

    @property
    def applies_gradients(self) -> bool:
        """Whether the step calls :meth:`apply_gradients` (True until it has been traced)."""
        return self._traced_apply or not self._traced

    def _begin_trace(self, step: Any, batch: Any) -> Any:
        """Called by the trainer when the step is traced on a replica: ``step`` is the call's number for the
        watchdog's marks (or None), ``batch`` this replica's input; returns the batch to hand the step."""
        self._traced = True
        self._capture.step = step
        if self._marker is not None and step is not None:
            return self._marker.mark_batch(step, batch)
        return batch

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
        return self.backend.reduce_gradients(grads)

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """Sums ``grads`` over all replicas (once) and applies them with ``optimizer``."""
        captured = getattr(self._capture, "pairs", None)
        if captured is not None:
            captured.extend((v, g) for g, v in zip(grads, variables) if g is not None)
        step = getattr(self._capture, "step", None)
        if self._marker is not None and step is not None:
            self._marker.mark_gradients(step, grads)
        self._traced_apply = True
        self.backend.apply_gradients(optimizer, grads, variables)
