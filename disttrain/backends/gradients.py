"""How gradients travel between replicas: compression, buckets, and applying them once.

Every backend reduces gradients the same way (:func:`reduce_gradients`); only the collective that
sums one bucket differs (``hvd.grouped_allreduce`` under Horovod, ``ReplicaContext.all_reduce`` under
``tf.distribute``):

  * **compression** (``fp16`` / ``bf16``): each floating gradient is cast down before the sum and back
    to its own dtype after it, so the wire (and the summation) carries half the bytes. Integer and
    already-narrow gradients are left alone. With one replica nothing is communicated and nothing is
    cast.
  * **buckets** (``bucket_mb``): instead of one grouped all-reduce that waits for the whole backward
    pass, the gradients are summed in buckets of about ``bucket_mb`` MiB, last variable first (the
    order back-propagation produces them, as PyTorch DDP's buckets). Each bucket's collective depends
    only on its own gradients, so TensorFlow's executor starts it while the backward pass of earlier
    layers still runs. ``bucket_mb=0`` keeps one group.

Keras 3's TensorFlow optimizer sums the gradients over the replicas itself when ``apply_gradients``
runs in a replica context (``_all_reduce_sum_gradients`` in keras/src/backend/tensorflow/optimizer.py;
Keras 2's ``skip_gradients_aggregation`` flag is gone, keras#19308). :func:`applying_reduced` turns
that sum off while disttrain applies gradients it has already reduced, so they are summed exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import tensorflow as tf

COMPRESSIONS = {"none": None, "fp16": tf.float16, "bf16": tf.bfloat16}
MIB = 1 << 20
DEFAULT_BUCKET_MB = 25.0  # as PyTorch DDP's bucket_cap_mb; smaller models stay one group (bench/p3_allreduce.py)


@dataclasses.dataclass(frozen=True)
class GradientOptions:
    """How a backend reduces gradients (read when a step is traced).

    Attributes:
      compression: ``none``, ``fp16`` or ``bf16``: the dtype floating gradients are summed in.
      bucket_mb: Sum the gradients in buckets of about this many MiB (of the uncompressed gradients),
        last variable first, so communication overlaps the backward pass; 0 = one group after it.
    """

    compression: str = "none"
    bucket_mb: float = DEFAULT_BUCKET_MB

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r} is not supported; use one of "
                             f"{', '.join(map(repr, COMPRESSIONS))}")
        if not self.bucket_mb >= 0:
            raise ValueError(f"bucket_mb={self.bucket_mb!r} must be >= 0 (0 = one all-reduce group)")


def _nbytes(tensor: tf.Tensor) -> int:
    shape = tensor.shape
    if not shape.is_fully_defined():
        return 0  # unknown size: counts as small, fills the current bucket
    return shape.num_elements() * tensor.dtype.size


def buckets(tensors: list[tf.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets, last tensor first.

    A bucket is closed once it holds at least ``bucket_bytes``; ``bucket_bytes <= 0`` gives one bucket.
    Every process computes the same buckets (same shapes, same order), so their collectives match.
    """
    if bucket_bytes <= 0:
        return [list(range(len(tensors)))] if tensors else []
    out, current, size = [], [], 0
    for i in reversed(range(len(tensors))):
        current.append(i)
        size += _nbytes(tensors[i])
        if size >= bucket_bytes:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def reduce_gradients(grads: list, *, options: GradientOptions, num_replicas: int,
                     sum_bucket: Callable[[list[tf.Tensor]], list[tf.Tensor]]) -> list:
    """The gradients summed over all replicas, compressed and bucketed as ``options`` say.

    Args:
      grads: Local gradients (``None`` entries are kept as ``None``; ``IndexedSlices`` are densified).
      options: Compression and bucket size.
      num_replicas: Replicas in sync; with one, the gradients are returned unchanged.
      sum_bucket: The backend's collective: sums a list of tensors over all replicas.
    """
    present = [(i, tf.convert_to_tensor(g)) for i, g in enumerate(grads) if g is not None]
    if not present or num_replicas == 1:
        return list(grads)
    wire = COMPRESSIONS[options.compression]
    tensors = [t for _, t in present]
    sent = [tf.cast(t, wire) if wire is not None and t.dtype.is_floating and t.dtype.size > wire.size else t
            for t in tensors]
    summed: list[Any] = [None] * len(sent)
    for bucket in buckets(tensors, int(options.bucket_mb * MIB)):
        for i, value in zip(bucket, sum_bucket([sent[i] for i in bucket])):
            summed[i] = value
    out = list(grads)
    for (i, original), value in zip(present, summed):
        out[i] = tf.cast(value, original.dtype) if value.dtype != original.dtype else value
    return out


class _Switch:
    """Shared by an optimizer and the optimizers it wraps: > 0 while reduced gradients are applied."""

    def __init__(self):
        self.depth = 0


def _optimizer_chain(optimizer: Any) -> Iterator[Any]:
    """The optimizer and any it wraps (``LossScaleOptimizer.inner_optimizer``)."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def _unless_reduced(switch: _Switch, keras_sum: Callable, grads_and_vars):
    return list(grads_and_vars) if switch.depth else keras_sum(grads_and_vars)


def _switch_of(optimizer: Any) -> _Switch:
    switch = optimizer.__dict__.get("_disttrain_reduced")
    if switch is not None:
        return switch
    switch = _Switch()
    for opt in _optimizer_chain(optimizer):
        keras_sum = getattr(opt, "_all_reduce_sum_gradients", None)
        if keras_sum is None:
            continue  # an optimizer that does not sum over replicas itself
        # object.__setattr__: Keras' attribute tracking has nothing to track here.
        object.__setattr__(opt, "_all_reduce_sum_gradients", functools.partial(_unless_reduced, switch, keras_sum))
        object.__setattr__(opt, "_disttrain_reduced", switch)
    return switch


@contextlib.contextmanager
def applying_reduced(optimizer: Any) -> Iterator[None]:
    """Within this context (at trace time), ``optimizer`` applies gradients without summing them over
    the replicas again. Outside it, the optimizer behaves as Keras made it."""
    switch = _switch_of(optimizer)
    switch.depth += 1  # a counter: MirroredStrategy's replica threads enter and leave interleaved
    try:
        yield
    finally:
        switch.depth -= 1
