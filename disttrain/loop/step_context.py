"""The step context: what the user's step function is handed on every replica."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import keras
import tensorflow as tf

from disttrain import nonfinite
from disttrain.backends import Backend


class StepContext:
    """Handed to the user's step function: the few operations whose meaning depends on the backend.

    The trainer creates it (one per compiled step variant); a step uses :meth:`average_loss`,
    :meth:`scale_regularization_loss`, :meth:`apply_gradients` and :meth:`reduce_gradients`, and may read
    ``ctx.num_replicas`` and ``ctx.global_batch_size``.

    Args:
      backend: The active backend.
      global_batch_size: Examples per step over all replicas.
      marker: The stall watchdog's in-graph marker (a ``disttrain.watchdog.GradientMarker``), or None.
      on_nonfinite: See below.

    Attributes:
      backend: The active backend.
      global_batch_size: Examples per step over all replicas.
      num_replicas: Replicas the global batch is split over.
      on_nonfinite: ``raise``, ``skip`` or ``ignore``: what :meth:`apply_gradients` does about a non-finite
        loss or gradient on any replica (see :mod:`disttrain.nonfinite`).
    """

    def __init__(self, *, backend: Backend, global_batch_size: int, marker: Any = None,
                 on_nonfinite: str = "ignore"):
        self.backend = backend
        self.global_batch_size = global_batch_size
        self.num_replicas = backend.num_replicas
        # Per replica thread, while tracing: (variable, local gradient) pairs of a gradient-histogram step,
        # and the mark tensor for the watchdog's in-graph marks.
        self._capture = threading.local()
        self._marker = marker  # a disttrain.watchdog.GradientMarker, or None
        self._traced = self._traced_apply = False
        # per replica thread, while tracing accumulated micro-batches: {key: [optimizer, grad sums, variables]}
        self._pending = threading.local()
        # per replica thread, while tracing a train step: 1.0 when an update is skipped (a LossScaleOptimizer,
        # or on_nonfinite), the replicas' flags (on_nonfinite) and the loss's own flag since the last update
        self._nonfinite = threading.local()
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)

    @property
    def applies_gradients(self) -> bool:
        """Whether the step calls :meth:`apply_gradients` (True until it has been traced)."""
        return self._traced_apply or not self._traced

    def begin_trace(self, mark: Any, batch: Any) -> Any:
        """Called by the compiled steps (:mod:`disttrain.loop.step_functions`) when the step is traced on a replica,
        before the user's step runs.

        Args:
          mark: The call's value for the watchdog's in-graph marks (an int64 tensor), or None.
          batch: This replica's input.

        Returns:
          The batch to hand the step (marked for the watchdog when it watches).
        """
        self._traced = True
        self._capture.mark = mark
        self._nonfinite.loss = self._nonfinite.flags = self._nonfinite.value = None  # nothing from an earlier trace
        if self._marker is not None and mark is not None:
            return self._marker.mark_batch(mark, batch)
        return batch

    @contextlib.contextmanager
    def capturing_gradients(self):
        """Within it, on this replica's thread, :meth:`apply_gradients` also records its ``(variable, local
        gradient)`` pairs into the list it yields (a gradient-histogram step; replicas may trace in parallel
        threads, each has its own list).

        Yields:
          The list the pairs are appended to.
        """
        self._capture.pairs = captured = []
        try:
            yield captured
        finally:
            self._capture.pairs = None

    @tf.autograph.experimental.do_not_convert  # called from the (converted) step: keep disttrain's code as is
    def average_loss(self, per_example_loss: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        """This replica's share of the mean loss over the GLOBAL batch: ``sum(loss * w) / global_batch``.

        Summed over the replicas (which the gradient reduction does) it is the global mean loss, so the
        gradients match a single device running the whole global batch. The counterpart of
        ``tf.nn.compute_average_loss(per_example_loss, global_batch_size=...)``.

        Args:
          per_example_loss: One loss per example of this replica's batch (reduce any other axes first).
          sample_weight: Optional weights per example (e.g. the ``mask`` of a padded batch).

        Returns:
          A scalar: ``sum(loss * w) / global_batch_size``.
        """
        per_example_loss = tf.convert_to_tensor(per_example_loss)
        if sample_weight is None and per_example_loss.shape.rank:
            # What tf.nn.compute_average_loss computes (sum / global batch, 0 for a batch of 0), without its
            # run-time checks that the (Python int, validated) global batch is a non-negative integer: four
            # ops per step, a share of a small model's.
            loss = tf.math.divide_no_nan(tf.reduce_sum(per_example_loss),
                                         tf.cast(self.global_batch_size, per_example_loss.dtype))
        else:
            loss = tf.nn.compute_average_loss(per_example_loss, sample_weight=sample_weight,
                                              global_batch_size=self.global_batch_size)
        if self.on_nonfinite != "ignore":  # read by the next apply_gradients on this replica
            self._keep_max("loss", nonfinite.is_bad([loss]))
        return loss

    @tf.autograph.experimental.do_not_convert
    def scale_regularization_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """Divides a regularisation loss by the number of replicas (it is added once per replica), as
        ``tf.nn.scale_regularization_loss``: ``loss = ctx.average_loss(...) +
        ctx.scale_regularization_loss(tf.add_n(model.losses))``.

        Args:
          loss: The regularisation loss of the model (e.g. ``tf.add_n(model.losses)``).

        Returns:
          ``loss / num_replicas``.
        """
        return loss / tf.cast(self.num_replicas, loss.dtype)

    @tf.autograph.experimental.do_not_convert
    def reduce_gradients(self, grads: list) -> list:
        """The gradients summed over all replicas: the global gradient, identical on every replica.

        Use it for decisions that need the global gradient (its norm for clipping, a NaN check,
        logging). Do not pass the result to :meth:`apply_gradients`, which sums again; change the
        local gradients instead (linear changes commute with the sum). Clipping by the global norm::

            norm = tf.linalg.global_norm(ctx.reduce_gradients(grads))
            factor = tf.minimum(1.0, clip_norm / norm)
            ctx.apply_gradients(optimizer, [g * factor for g in grads], variables)

        Args:
          grads: This replica's gradients.

        Returns:
          The gradients summed over all replicas.

        Raises:
          ValueError: With ``accumulation_steps > 1`` (it would see one micro-batch only).
        """
        if getattr(self._pending, "updates", None) is not None:
            raise ValueError("ctx.reduce_gradients is not available with accumulation_steps > 1: it would see one "
                             "micro-batch's gradients, not the update's; use accumulation_steps=1 for steps that "
                             "decide on the global gradient (e.g. clipping by its norm)")
        return self.backend.reduce_gradients(grads)

    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """Sums ``grads`` over all replicas (once) and applies them with ``optimizer``.

        With gradient accumulation (``Trainer(accumulation_steps=K)``) the call only adds ``grads`` to
        this update's sums; they are reduced and applied once, after the K-th micro-batch. Call it once
        per optimizer and step; a GAN calls it twice (discriminator, then generator).

        Args:
          optimizer: A Keras optimizer created in ``backend.scope()``.
          grads: This replica's gradients of a loss scaled by :meth:`average_loss` (``tape.gradient``).
          variables: The variables they belong to.
        """
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
        mark = getattr(self._capture, "mark", None)
        if self._marker is not None and mark is not None:
            self._marker.mark_gradients(mark, grads)
        self._traced_apply = True
        if self.on_nonfinite != "ignore" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            self._apply_if_finite(optimizer, grads, variables)
            return
        reduced = self.backend.reduce_gradients(grads)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # It skips the update when a gradient is not finite; decided on the reduced gradients, the
            # decision is the same on every replica. Counted for the logs (see take_nonfinite).
            skipped = tf.cast(tf.logical_not(optimizer.check_finite(reduced)), tf.float32)
            self._record_skipped(skipped)
        self.backend.apply_reduced_gradients(optimizer, reduced, variables)

    def _apply_if_finite(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """``on_nonfinite``: the replicas' flags ride in the gradients' all-reduce (first, so in the bucket
        reduced last); the update happens only when all are clear (see :mod:`disttrain.nonfinite`)."""
        loss_bad = getattr(self._nonfinite, "loss", None)
        loss_bad = tf.constant(0.0) if loss_bad is None else loss_bad
        self._nonfinite.loss = None
        present = [g for g in grads if g is not None]
        dtype = tf.convert_to_tensor(present[0]).dtype if present else tf.float32
        flags = nonfinite.local_flags(loss_bad=loss_bad, grads=grads, replica=self.backend.replica_id(),
                                      num_replicas=self.num_replicas, dtype=dtype)
        reduced = self.backend.reduce_gradients([flags] + list(grads))
        flags, reduced = tf.cast(reduced[0], tf.float32), reduced[1:]
        finite, skipped = nonfinite.decide(reduced, flags, num_replicas=self.num_replicas)
        self.backend.apply_reduced_gradients(optimizer, reduced, variables, apply=finite)
        if self.on_nonfinite == "skip":  # counted in the logs with a LossScaleOptimizer's skips ("raise" stops)
            self._record_skipped(skipped)
        self._keep_max("flags", tf.concat([flags, [skipped]], 0))

    def _record_skipped(self, skipped: tf.Tensor) -> None:
        """Records that this step's update was skipped (1.0) or not (0.0), for :meth:`take_nonfinite`."""
        self._keep_max("value", skipped)

    def _keep_max(self, name: str, value: tf.Tensor) -> None:
        """This replica's record ``name`` (``loss``, ``flags`` or ``value``) becomes ``value``, or its
        element-wise maximum with what was recorded since the trace began or the record was last taken."""
        previous = getattr(self._nonfinite, name, None)
        setattr(self._nonfinite, name, value if previous is None else tf.maximum(previous, value))

    def take_flags(self) -> tf.Tensor | None:
        """The replicas' flags and whether this step's update was skipped (``on_nonfinite``), or None if no
        update was checked; resets the record."""
        value = getattr(self._nonfinite, "flags", None)
        self._nonfinite.flags = None
        return value

    def take_nonfinite(self) -> tf.Tensor | None:
        """Whether an update of this replica's step was skipped for non-finite gradients (by a
        ``LossScaleOptimizer``, or with ``on_nonfinite="skip"``): 1.0, 0.0, or None if no such update ran;
        resets the record (the trainer calls it while tracing)."""
        value = getattr(self._nonfinite, "value", None)
        self._nonfinite.value = None
        return value

    @tf.autograph.experimental.do_not_convert
    def run_accumulated(self, micro_step: Callable[[Any], Any], micro_batches: list) -> list:
        """Runs ``micro_step`` on each micro-batch (at trace time, unrolled), summing the gradients each
        passes to :meth:`apply_gradients`; then reduces and applies each optimizer's sums once.

        Args:
          micro_step: ``fn(micro_batch)``: the user's step on one micro-batch.
          micro_batches: The replica's batch split into ``accumulation_steps`` parts.

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
