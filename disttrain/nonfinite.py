"""Non-finite loss or gradients: decided on a GLOBAL flag, so every rank does the same at the same step.

    trainer = dt.Trainer(..., on_nonfinite="raise")   # default; or "skip", or "ignore"

A NaN or Inf in one rank's loss or gradients spreads through the gradient all-reduce to every rank's
weights at the next update, and training goes on with NaN weights. With ``on_nonfinite`` other than
``"ignore"``, ``ctx.apply_gradients`` (for an optimizer that is not a ``LossScaleOptimizer``) does this
on every replica, inside the compiled step:

1. it computes this replica's flags: is the loss it passed to ``ctx.average_loss`` finite, are its
   gradients finite; as a one-hot vector over the replicas ``[loss flags..., gradient flags...]``;
2. that vector rides in the gradients' own all-reduce (one more small tensor in the last bucket: no
   extra collective), so every replica gets every replica's flags together with the summed gradients;
3. the update is applied only if the summed gradients are finite and no flag is set: the same decision
   on every replica, taken by the backend (``Backend.apply_reduced_gradients(..., apply=flag)``: a
   ``tf.cond`` in the cross-replica context under ``tf.distribute``, as Keras' ``LossScaleOptimizer``
   does, a plain ``tf.cond`` under Horovod). A skipped update changes no weight, no optimizer slot and
   not ``optimizer.iterations``.

After the step, the trainer reads the flags (they come back with the step's outputs):
``"raise"`` raises :class:`NonFiniteError` on every rank, naming the step and the rank(s) where the
values first appeared (the weights are those before that step); ``"skip"`` goes on, prints one line on
the chief, leaves that step's returned values out of the epoch's means and counts it: the logs carry
``skipped_steps`` and ``skipped_fraction``, as for the steps a ``LossScaleOptimizer`` skips (one
record of skipped steps, :data:`NONFINITE`). A ``LossScaleOptimizer`` keeps its own rule (it skips
non-finite steps and lowers its scale, deciding on the summed gradients) whatever ``on_nonfinite``
says: in mixed precision an overflow is expected. With ``steps_per_execution=K`` a call runs K steps and
the error names the call's steps.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import tensorflow as tf

POLICIES = ("raise", "skip", "ignore")

#: Step output (and log): the share of steps whose update was skipped (by a LossScaleOptimizer or by
#: ``on_nonfinite="skip"``); ``skipped_steps`` in the logs is their number.
NONFINITE = "skipped_fraction"
SKIPPED_STEPS = "skipped_steps"
#: Hidden step outputs: the replicas' flags ``[loss..., gradients..., step skipped]``, and the steps whose
#: returned values ``on_nonfinite="skip"`` left out.
FLAGS = "__nonfinite_flags__"
DROPPED = "__dropped_steps__"

_SHOWN = 10  # skipped steps reported one by one on the chief; later ones every 100th


class NonFiniteError(FloatingPointError):
    """Raised on every rank after a step whose loss or gradients were not finite (``on_nonfinite="raise"``).

    Attributes:
      message: What was not finite, at which step, on which rank(s), and the fix.
      steps: ``(first, last)`` global steps of the call that had it (equal with one step per call).
      ranks: Ranks where a value was not finite (empty: only the sum over the replicas overflowed).
    """

    def __init__(self, message: str, *, steps: tuple[int, int], ranks: list[int]):
        super().__init__(message)
        self.steps, self.ranks = steps, ranks


def check_policy(value: Any) -> str:
    """Returns ``value`` if it is one of :data:`POLICIES`.

    Raises:
      ValueError: Naming the bad value and the choices.
    """
    if value not in POLICIES:
        raise ValueError(f"on_nonfinite={value!r} is not supported; use one of {', '.join(map(repr, POLICIES))}")
    return value


# -- in the compiled step ---------------------------------------------------------------------------
def is_bad(values: list) -> tf.Tensor:
    """1.0 if any of ``values`` (tensors or None) holds a NaN or Inf, else 0.0 (float32).

    One reduction a tensor and one test in all: the float32 sum of every value is NaN or Inf when one
    value is (NaN and Inf propagate through a sum), so the test reads the sum instead of testing each
    element (``is_finite`` + ``reduce_all`` per tensor cost ~0.06 ms a step on P1's tiny model, a third of
    its step). A sum can also overflow from finite values: only when it exceeds float32's range (~3.4e38),
    a gradient that no optimizer update survives; such a step counts as non-finite. Half-precision values
    are summed in float32, so their own range (65504 for float16) cannot overflow the test.
    """
    tensors = [tf.convert_to_tensor(v) for v in values if v is not None]
    sums = [_sum32(v) for v in tensors if v.dtype.is_floating]
    if not sums:
        return tf.constant(0.0)
    total = sums[0] if len(sums) == 1 else tf.add_n(sums)
    return tf.cast(tf.logical_not(tf.math.is_finite(total)), tf.float32)


def _sum32(value: tf.Tensor) -> tf.Tensor:
    """``value``'s sum as a float32 scalar, finite exactly when the sum in float32 or wider is (a float32
    scalar is its own sum: no op; a float64 sum is tested in float64, so a large finite one stays finite)."""
    if value.dtype == tf.float64:
        return tf.where(tf.math.is_finite(tf.reduce_sum(value)), 0.0, float("nan"))
    if value.dtype != tf.float32:
        value = tf.cast(value, tf.float32)
    return value if value.shape.rank == 0 else tf.reduce_sum(value)


def local_flags(*, loss_bad: tf.Tensor, grads: list, replica: Any, num_replicas: int, dtype: tf.DType) -> tf.Tensor:
    """This replica's one-hot flags ``[loss bad at replica r..., gradients bad at replica r...]`` (length
    2 x ``num_replicas``), in ``dtype`` (that of the gradients, so it joins their all-reduce)."""
    bad = tf.stack([loss_bad, is_bad(grads)])
    if num_replicas == 1:
        return tf.cast(bad, dtype)
    return tf.cast(tf.reshape(bad[:, None] * tf.one_hot(replica, num_replicas, dtype=tf.float32), [-1]), dtype)


def decide(reduced: list, flags: tf.Tensor, *, num_replicas: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Whether to apply the update: ``(apply, skipped)``, the same on every replica. ``apply`` (bool) is True
    when no replica flagged and the summed gradients are finite (a sum of finite values can still
    overflow; with one replica the sum is the replica's own); ``skipped`` is its opposite as 1.0 / 0.0."""
    skipped = tf.reduce_max(flags)  # the flags are 0 or 1
    if num_replicas > 1:
        skipped = tf.maximum(skipped, is_bad(reduced))
    return tf.equal(skipped, 0.0), skipped


# -- after the step -----------------------------------------------------------------------------------
def pop_skips(sums: dict[str, float], *, steps: int) -> tuple[float, dict[str, float]]:
    """Takes the skip records out of ``sums`` (reduced step outputs over ``steps`` steps).

    Returns:
      ``(steps whose values were left out, logs to add: skipped_fraction and skipped_steps)``.
    """
    dropped = float(round(sums.pop(DROPPED, 0.0)))
    skipped = sums.pop(NONFINITE, None)
    if skipped is None:
        return dropped, {}
    return dropped, {NONFINITE: skipped / steps if steps else 0.0, SKIPPED_STEPS: float(round(skipped))}


def epoch_logs(reduced: Any, *, steps: int, global_batch_size: int, masked: bool) -> dict[str, float]:
    """An epoch's logs from its reduced totals (``disttrain.loop.totals``: ``sums``, ``real``, ``metrics``).

    Step values are global-batch-scaled (like ``ctx.average_loss``): their sum over the epoch times the
    global batch, over the examples, is the mean per example; padded examples and skipped steps count for
    nothing.

    Args:
      reduced: The epoch's reduced totals.
      steps: Steps of the epoch.
      global_batch_size: Examples per step.
      masked: Whether the input was padded (then ``reduced.real`` counts the real examples).

    Returns:
      The step values per example, the metrics and the skip records.
    """
    dropped, skips = pop_skips(reduced.sums, steps=steps)
    examples = reduced.real if masked and reduced.real > 0 else (steps - dropped) * global_batch_size
    logs = {n: v * global_batch_size / examples if examples else float("nan") for n, v in reduced.sums.items()}
    logs.update(reduced.metrics)
    logs.update(skips)
    return logs


class Monitor:
    """Reads the flags after every compiled call and raises or reports (one per trainer).

    Args:
      policy: ``raise`` or ``skip``.
      backend: The backend (ranks, replicas, chief).
      print_fn: Where the chief reports skipped steps (default stderr).
    """

    def __init__(self, *, policy: str, backend: Any, print_fn: Callable[[str], None] | None = None):
        self.policy, self.backend = policy, backend
        self._print = print_fn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.skipped = 0  # steps skipped in this trainer's life

    def after_call(self, outputs: dict, *, first_step: int, count: int, where: str | Callable[[], str]) -> dict:
        """Pops :data:`FLAGS` from a call's summed outputs; raises or reports when a step was not finite.

        Args:
          outputs: The call's outputs (summed over its steps and this process's replicas).
          first_step: Global step of the call's first step; ``count`` steps ran.
          where: The position in the epoch, for the message (or a function that returns it, called only
            for a message).

        Raises:
          NonFiniteError: With ``policy="raise"``, on every rank alike.
        """
        flags = outputs.pop(FLAGS, None)
        if flags is None:
            return outputs
        values = np.asarray(flags, np.float64)
        bad_steps = int(round(values[-1]))
        if bad_steps == 0:
            return outputs
        replicas = self.backend.num_replicas
        loss = [r for r in range(replicas) if values[r] > 0.5]
        grads = [r for r in range(replicas) if values[replicas + r] > 0.5]
        steps = (first_step, first_step + count - 1)
        what = self._describe(loss, grads, steps, where() if callable(where) else where)
        ranks = sorted({r // self.backend.local_replicas for r in loss + grads})
        if self.policy == "raise":
            raise NonFiniteError(
                f"{what}. Its update was not applied on any rank (the weights are those from before that step"
                f"{'' if count == 1 else ', plus the finite steps of the call'}). "
                "Look for a NaN or Inf in that step's input on that rank (a corrupt example, a log of 0, a division "
                "by 0) or a too high learning rate; or pass Trainer(on_nonfinite='skip') to skip such steps on "
                "every rank and go on (the logs count them as skipped_steps)", steps=steps, ranks=ranks)
        self.skipped += bad_steps
        if self.backend.is_chief and (self.skipped <= _SHOWN or self.skipped % 100 == 0):
            later = " (from now on reported every 100th)" if self.skipped == _SHOWN else ""
            self._print(f"disttrain: {what}: the update was skipped on every rank ({self.skipped} step(s) skipped "
                        f"so far){later}")
        return outputs

    def _describe(self, loss: list[int], grads: list[int], steps: tuple[int, int], where: str) -> str:
        local = self.backend.local_replicas
        replicas = self.backend.num_replicas

        def on(rs: list[int]) -> str:
            return ", ".join(f"rank {r // local} (replica {r} of {replicas})" for r in rs)

        at = f"global step {steps[0]}" if steps[0] == steps[1] else f"one of global steps {steps[0]}-{steps[1]}"
        if not loss and not grads:
            return (f"non-finite gradients at {at} ({where}) in their sum over the replicas only: every replica's "
                    "own loss and gradients were finite (an overflow in the sum)")
        if loss == grads:
            found = f"loss and gradients at {at} ({where}) on {on(loss)}"
        else:
            found = " and ".join(f"{name} on {on(rs)}" for name, rs in (("loss", loss), ("gradients", grads)) if rs)
            found += f" at {at} ({where})"
        return f"non-finite {found}"
