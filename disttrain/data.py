"""Input pipelines: split each global batch over the replicas, identically on every backend.

Element sharding here is *exact*: with R replicas and per-replica batch b = global_batch / R, replica r
receives examples ``[k*G + r*b, k*G + (r+1)*b)`` of the (optionally shuffled) stream at step k, which is
precisely the slice of the single-device global batch k. Every process therefore takes the same number
of steps, and a run on N replicas computes the same gradients as a run on one device.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from disttrain.backends.base import InputContext

AUTOTUNE = tf.data.AUTOTUNE
DatasetFn = Callable[[InputContext], tf.data.Dataset]


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch``: the same on every process, different for every epoch."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def pipeline_options() -> tf.data.Options:
    """Options for disttrain pipelines: deterministic order, no automatic re-sharding by tf.distribute."""
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def _is_batched_hint(dataset: tf.data.Dataset) -> bool:
    return any(isinstance(s, tf.TensorSpec) and s.shape.rank and s.shape[0] is None
               for s in tf.nest.flatten(dataset.element_spec))


def element_sharded(dataset: tf.data.Dataset, context: InputContext, *, seed: int | None = None,
                    epoch: int = 0, shuffle_buffer: int | None = None) -> tf.data.Dataset:
    """This pipeline's per-replica batches of ``dataset`` (unbatched examples).

    Args:
      dataset: Unbatched examples (tensors, tuples or dicts), in a deterministic order.
      context: The input context of this pipeline (``backend.input_context(global_batch)``).
      seed: Shuffle with this seed (combined with ``epoch``); None keeps the order.
      epoch: Epoch number, to reshuffle differently every epoch.
      shuffle_buffer: Shuffle buffer; default the whole dataset when its size is known, else 10000.

    Returns:
      A dataset whose elements are per-replica batches; ``context.replicas_per_pipeline`` consecutive
      elements form this process's share of one global step. The last partial global batch is dropped.

    Raises:
      ValueError: If the dataset looks already batched, or is smaller than one global batch.
    """
    if _is_batched_hint(dataset):
        raise ValueError(
            f"the dataset looks already batched (element spec {dataset.element_spec}); pass unbatched "
            "examples and the global batch size: disttrain batches and splits them over the replicas")
    size = int(dataset.cardinality())
    global_batch = context.global_batch_size
    if 0 <= size < global_batch:
        raise ValueError(f"global batch {global_batch} is larger than the dataset ({size} examples); "
                         f"use a global batch of at most {size}")
    if seed is not None:
        buffer = shuffle_buffer or (size if size > 0 else 10_000)
        dataset = dataset.shuffle(buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
    replicas, local = context.num_replicas_in_sync, context.replicas_per_pipeline
    per_replica = context.per_replica_batch_size
    first = context.input_pipeline_id * local

    def split(*batch):
        batch = batch[0] if len(batch) == 1 else batch

        def mine(t):
            t = tf.reshape(t, tf.concat([[replicas, per_replica], tf.shape(t)[1:]], 0))
            return t[first] if local == 1 else t[first:first + local]

        return tf.nest.map_structure(mine, batch)

    dataset = dataset.batch(global_batch, drop_remainder=True).map(split, num_parallel_calls=AUTOTUNE)
    if local > 1:
        steps = int(dataset.cardinality())
        dataset = dataset.unbatch()
        if steps >= 0:
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps * local))
    return dataset.prefetch(AUTOTUNE).with_options(pipeline_options())


def as_dataset_fn(data: tf.data.Dataset | DatasetFn, *, seed: int | None, epoch: int) -> DatasetFn:
    """Turns what a user passes to ``Trainer.fit`` into a function of the input context.

    A dataset of examples is element-sharded (see :func:`element_sharded`); a callable is used as is
    and must return per-replica batches for the context it receives.
    """
    if isinstance(data, tf.data.Dataset):
        return lambda context: element_sharded(data, context, seed=seed, epoch=epoch)
    if callable(data):
        return data
    raise TypeError(f"data must be a tf.data.Dataset of examples or a function of the input context, "
                    f"got {type(data).__name__}")


def steps_in(dataset: tf.data.Dataset, context: InputContext) -> int | None:
    """Steps one epoch of this pipeline gives (None when unknown or infinite)."""
    size = int(dataset.cardinality())
    if size < 0:
        return None
    return size // context.replicas_per_pipeline
