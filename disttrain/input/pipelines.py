"""Building one pipeline's ``tf.data`` input: shuffle, batch, shard over the replicas, pad and mask.

These functions turn examples (or files of records) into the per-replica batches of ONE input
pipeline, for one epoch; what they do is described in :mod:`disttrain.data` (the public entry
point: ``from_dataset``, ``from_files``). Use :func:`element_sharded` or :func:`file_sharded` directly
in your own ``dataset_fn(ctx)`` to keep disttrain's sharding while changing the rest.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from disttrain.backends.base import InputContext
from disttrain.input.data_checks import check_unbatched

AUTOTUNE = tf.data.AUTOTUNE
REMAINDERS = ("drop", "pad")
#: The key of the padding mask in a padded batch that is a dict (a tuple gets it as its last element).
MASK_KEY = "mask"
CHUNK = 256  # records read, shuffled and parsed together: per-record tf.data overhead dominates otherwise
DEFAULT_WINDOW = 16_384  # default shuffle window of a pipeline's own examples

__all__ = ["element_sharded", "file_sharded", "count_records", "epoch_seed", "pipeline_options", "mask_of",
           "MASK_KEY"]


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``choices``.

    Raises:
      ValueError: Naming the bad value and the choices.
    """
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")
    return value


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch``: the same on every process, different for every epoch."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def pipeline_options() -> tf.data.Options:
    """Options for disttrain pipelines: deterministic order, no automatic re-sharding by tf.distribute,
    parallel and autotuned stages."""
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.parallel_batch = True
    return options


# -- masks and padding ----------------------------------------------------------------------------
def mask_of(batch: Any) -> tf.Tensor:
    """The padding mask of a batch made with ``remainder="pad"`` (1 for real examples, 0 for padding).

    Args:
      batch: A padded batch: a dict (its :data:`MASK_KEY` entry) or a tuple (its last element).
    """
    if isinstance(batch, dict):
        return batch[MASK_KEY]
    return batch[-1]


def _attach_mask(batch: Any, mask: tf.Tensor) -> Any:
    if isinstance(batch, dict):
        if MASK_KEY in batch:
            raise ValueError(f"the examples already have a {MASK_KEY!r} key ({sorted(batch)}); rename it: "
                             f"remainder='pad' adds the padding mask under {MASK_KEY!r}")
        return {**batch, MASK_KEY: mask}
    if isinstance(batch, tuple):
        return batch + (mask,)
    if isinstance(batch, list):
        return batch + [mask]
    return (batch, mask)


def _pad_batch(batch: Any, size: int) -> Any:
    """Pads a batch of up to ``size`` examples to exactly ``size`` with zeros and attaches the mask."""
    flat = tf.nest.flatten(batch)
    n = tf.shape(flat[0])[0]
    extra = size - n

    def pad(t):
        t = tf.concat([t, tf.zeros(tf.concat([[extra], tf.shape(t)[1:]], 0), t.dtype)], 0)
        return tf.ensure_shape(t, tf.TensorShape([size]).concatenate(t.shape[1:]))

    mask = tf.concat([tf.ones([n], tf.float32), tf.zeros([extra], tf.float32)], 0)
    mask = tf.ensure_shape(mask, [size])
    return _attach_mask(tf.nest.map_structure(pad, batch), mask)


def _masked_padding(dataset: tf.data.Dataset, count: int) -> tf.data.Dataset:
    """``count`` batches shaped like ``dataset``'s with every example masked out (all zeros)."""
    spec = dataset.element_spec
    if all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec)):
        zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
        return tf.data.Dataset.from_tensors(zeros).repeat(count)
    return dataset.take(1).map(lambda *b: tf.nest.map_structure(
        tf.zeros_like, b[0] if len(b) == 1 else b)).repeat(count)


def _batch_steps(stream: tf.data.Dataset, *, batch: int, remainder: str,
                 decode_batch: Callable | None) -> tf.data.Dataset:
    """Batches of ``batch`` examples: decoded, and padded + masked when ``remainder == "pad"``."""
    batched = stream.batch(batch, drop_remainder=remainder == "drop", num_parallel_calls=AUTOTUNE,
                           deterministic=True)
    return _decode_and_pad(batched, batch=batch, remainder=remainder, decode_batch=decode_batch)


def _decode_and_pad(batches: tf.data.Dataset, *, batch: int, remainder: str,
                    decode_batch: Callable | None) -> tf.data.Dataset:
    """Decodes batches of records (if ``decode_batch``), then pads + masks them to ``batch`` when
    ``remainder == "pad"``."""
    if decode_batch is not None:
        batches = batches.map(decode_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    if remainder == "pad":
        batches = batches.map(lambda *b: _pad_batch(b[0] if len(b) == 1 else b, batch),
                              num_parallel_calls=AUTOTUNE, deterministic=True)
    return batches


def _split(dataset: tf.data.Dataset, *, parts: int, first: int, count: int) -> tf.data.Dataset:
    """Cuts each batch into ``parts`` equal slices and keeps slices ``[first, first + count)``, one per
    element (``count`` consecutive elements form this pipeline's share of a step)."""
    steps = int(dataset.cardinality())

    def cut(*batch):
        batch = batch[0] if len(batch) == 1 else batch

        def mine(t):
            t = tf.reshape(t, tf.concat([[parts, tf.shape(t)[0] // parts], tf.shape(t)[1:]], 0))
            return t[first] if count == 1 else t[first:first + count]

        return tf.nest.map_structure(mine, batch)

    if parts == 1:
        return dataset
    dataset = dataset.map(cut, num_parallel_calls=AUTOTUNE, deterministic=True)
    if count > 1:
        dataset = dataset.unbatch()
        if steps >= 0:
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps * count))
    return dataset


def _finish(step_batches: tf.data.Dataset, context: InputContext, *, pad_to_steps: int | None,
            parts: int, first: int) -> tf.data.Dataset:
    if pad_to_steps is not None:
        have = int(step_batches.cardinality())
        if have < 0:
            raise ValueError("pad_to_steps needs a pipeline of known length")
        if pad_to_steps > have:
            step_batches = step_batches.concatenate(_masked_padding(step_batches, pad_to_steps - have))
        step_batches = step_batches.take(pad_to_steps)
    dataset = _split(step_batches, parts=parts, first=first, count=context.replicas_per_pipeline)
    return dataset.prefetch(AUTOTUNE).with_options(pipeline_options())


def _shuffled(stream: tf.data.Dataset, *, seed: int | None, epoch: int, buffer: int | None,
              size: int) -> tf.data.Dataset:
    if seed is None:
        return stream
    buffer = buffer or (size if size > 0 else 10_000)
    return stream.shuffle(buffer, seed=epoch_seed(seed, epoch),
                          reshuffle_each_iteration=False)


# -- element and file sharding (and "off": local_stream) ------------------------------------------
def element_sharded(dataset: tf.data.Dataset, context: InputContext, *, seed: int | None = None,
                    epoch: int = 0, shuffle_buffer: int | None = None, remainder: str = "drop",
                    decode_batch: Callable | None = None, pad_to_steps: int | None = None) -> tf.data.Dataset:
    """This pipeline's per-replica batches of ``dataset``, element-sharded exactly.

    Args:
      dataset: Unbatched examples (tensors, tuples or dicts), in a deterministic order; or serialized
        records when ``decode_batch`` is given.
      context: The input context of this pipeline (``backend.input_context(global_batch)``).
      seed: Shuffle with this seed (combined with ``epoch``); None keeps the order.
      epoch: Epoch number, to reshuffle differently every epoch.
      shuffle_buffer: Shuffle buffer; default the whole dataset when its size is known, else 10000.
      remainder: ``"drop"`` the last partial global batch, or ``"pad"`` it with masked examples (every
        batch then carries a mask, see :mod:`disttrain.data`).
      decode_batch: Optional function turning a batch of records into a batch of examples.
      pad_to_steps: With ``remainder="pad"``, append fully masked steps up to this many.

    Returns:
      A dataset whose elements are per-replica batches; ``context.replicas_per_pipeline`` consecutive
      elements form this process's share of one global step.

    Raises:
      ValueError: If the dataset is already batched, or (with ``"drop"``) smaller than one global batch.
    """
    check_choice("remainder", remainder, REMAINDERS)
    if decode_batch is None:
        check_unbatched(dataset)
    size = int(dataset.cardinality())
    global_batch = context.global_batch_size
    if size == 0:
        raise ValueError("the dataset is empty (0 examples); there is nothing to train or evaluate on: check the "
                         "data source (e.g. a filter that drops everything)")
    if remainder == "drop" and 0 <= size < global_batch:
        raise ValueError(f"global batch {global_batch} is larger than the dataset ({size} examples); "
                         f"use a global batch of at most {size}, or remainder='pad'")
    stream = _shuffled(dataset, seed=seed, epoch=epoch, buffer=shuffle_buffer, size=size)
    steps = _batch_steps(stream, batch=global_batch, remainder=remainder, decode_batch=decode_batch)
    return _finish(steps, context, pad_to_steps=pad_to_steps, parts=context.num_replicas_in_sync,
                   first=context.input_pipeline_id * context.replicas_per_pipeline)



def local_stream(chunks: tf.data.Dataset, context: InputContext, *, size: int, seed, epoch, shuffle_buffer,
                 remainder, decode_batch, pad_to_steps, salt: int) -> tf.data.Dataset:
    """Per-replica batches of this pipeline's own examples (file sharding and sharding off).

    ``chunks`` yields batches of records or examples (vectors, not single elements): shuffling and
    re-batching work on whole windows of ``shuffle_buffer`` examples with one gather each, which costs
    a small fraction of an element-wise ``Dataset.shuffle``. Every window is permuted with a seed
    derived from (seed, epoch, pipeline, window index), so the order is reproducible.
    """
    local_batch = context.per_replica_batch_size * context.replicas_per_pipeline
    drop = remainder == "drop"
    if seed is not None:
        window = max(1, min(size if size > 0 else DEFAULT_WINDOW, shuffle_buffer or DEFAULT_WINDOW))
        base = (epoch_seed(seed, epoch) + 7919 * salt) % (2**31 - 1)

        def permute(index, batch):
            n = tf.shape(tf.nest.flatten(batch)[0])[0]
            keys = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(base, tf.int64), index]))
            order = tf.argsort(keys)
            return tf.nest.map_structure(lambda t: tf.gather(t, order), batch)

        chunks = chunks.rebatch(window).enumerate().map(permute, num_parallel_calls=AUTOTUNE, deterministic=True)
    batches = _decode_and_pad(chunks.rebatch(local_batch, drop_remainder=drop), batch=local_batch,
                              remainder=remainder, decode_batch=decode_batch)
    if size >= 0:
        steps = size // local_batch if drop else -(-size // local_batch)
        batches = batches.apply(tf.data.experimental.assert_cardinality(steps))
    return _finish(batches, context, pad_to_steps=pad_to_steps, parts=context.replicas_per_pipeline, first=0)


_COUNT_CACHE: dict[tuple, int] = {}


def count_records(files: Sequence[str], reader: Callable[[str], tf.data.Dataset]) -> list[int]:
    """Number of elements ``reader`` yields for each file (cached per file, size and modification time).

    Files written by :func:`disttrain.shards.write_shards` do not need this: their counts are in the manifest.
    """
    counts = []
    for path in files:
        try:
            stat = os.stat(path)
            key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, id(reader))
        except OSError:
            key = None
        if key is None or key not in _COUNT_CACHE:
            n = int(reader(path).reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))
            if key is None:
                counts.append(n)
                continue
            _COUNT_CACHE[key] = n
        counts.append(_COUNT_CACHE[key])
    return counts


def read_files(files: Sequence[str], reader: Callable, *, cycle_length: int, total: int | None,
               chunked: bool = False, ranges: Sequence[tuple[int, int]] | None = None) -> tf.data.Dataset:
    """The files' elements, interleaved in parallel (one element, or one chunk of elements, per file in
    turn); the same order whatever the parallelism. With ``ranges``, file i yields only its elements
    ``[skip, skip + take)`` for ``(skip, take) = ranges[i]`` (``take=-1``: to its end)."""
    skips, takes = zip(*ranges) if ranges is not None else ([0] * len(files), [-1] * len(files))

    def read(path, skip, take):
        elements = reader(path).skip(skip).take(take)  # (0, -1): the whole file
        return elements.batch(CHUNK) if chunked else elements

    stream = tf.data.Dataset.from_tensor_slices(
        (list(files), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64))).interleave(
        read, cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
        num_parallel_calls=AUTOTUNE, deterministic=True)
    if total is not None and not chunked:
        stream = stream.apply(tf.data.experimental.assert_cardinality(total))
    return stream


def file_ranges(counts: Sequence[int], context: InputContext, *, seed: int | None, epoch: int
                ) -> list[tuple[int, int, int]]:
    """What pipeline ``context.input_pipeline_id`` reads in ``epoch``: ``(file index, skip, take)`` triples.

    The file list is shuffled with ``(seed, epoch)`` (identically everywhere) and dealt out: pipeline i of P
    gets files ``i, i+P, ...``. Concatenated in that order (pipeline 0's files, then pipeline 1's, ...),
    the N records are cut into P contiguous ranges of ``N // P`` or ``N // P + 1`` records (the longer
    ones first), range i for
    pipeline i: each pipeline reads mostly its own files, a file on a boundary is split between two
    pipelines, every record is read by exactly one, and the pipelines' lengths differ by at most one, so
    ``remainder="drop"`` loses fewer than one global batch per epoch (as with element sharding).
    """
    pipelines = context.num_input_pipelines
    order = np.arange(len(counts))
    if seed is not None:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(counts))
    dealt = [int(f) for p in range(pipelines) for f in order[p::pipelines]]
    total = int(sum(counts))
    i = context.input_pipeline_id
    start, end = -(-i * total // pipelines), -(-(i + 1) * total // pipelines)  # ceil: earlier ranges get the extra
    mine, offset = [], 0
    for f in dealt:
        first, last = max(start, offset), min(end, offset + int(counts[f]))
        if first < last:
            mine.append((f, first - offset, last - first))
        offset += int(counts[f])
    return mine


def file_sharded(files: Sequence[str], context: InputContext, *, reader: Callable[[str], tf.data.Dataset] | None = None,
                 decode_batch: Callable | None = None, counts: Sequence[int] | None = None,
                 seed: int | None = None, epoch: int = 0, shuffle_buffer: int | None = None,
                 remainder: str = "drop", cycle_length: int = 4, pad_to_steps: int | None = None
                 ) -> tf.data.Dataset:
    """This pipeline's per-replica batches, read from its own share of ``files``.

    The file list is shuffled with ``(seed, epoch)`` (identically on every process), pipeline i takes
    files ``i, i+P, ...``, balanced with its neighbours so that every pipeline reads N // P or N // P + 1
    of the N records (see :func:`file_ranges`); it reads them interleaved in parallel, shuffles its
    examples, and batches them into per-replica batches of ``context.per_replica_batch_size``.

    Args:
      files: File paths; at least ``context.num_input_pipelines`` of them.
      context: The input context of this pipeline.
      reader: ``path -> dataset`` of one file's records or examples (default ``tf.data.TFRecordDataset``).
      decode_batch: Function from a batch of records to a batch of examples (vectorised parsing).
      counts: Elements per file, for a pipeline of known length (default: counted once and cached).
      seed, epoch, remainder, pad_to_steps: As in :func:`element_sharded`.
      shuffle_buffer: Examples shuffled together, as one window (default this pipeline's whole share,
        at most 16384); windows are read in turn, so memory stays bounded.
      cycle_length: Files read at once by each pipeline.

    Raises:
      ValueError: If there are fewer files than pipelines.
    """
    check_choice("remainder", remainder, REMAINDERS)
    files = list(files)
    pipelines = context.num_input_pipelines
    if len(files) < pipelines:
        raise ValueError(f"file sharding needs at least one file per input pipeline: {len(files)} file(s) for "
                         f"{pipelines} pipelines; write more shards (write_shards(..., num_shards={pipelines})) "
                         "or use sharding='elements'")
    reader = reader or tf.data.TFRecordDataset
    counts = list(counts) if counts is not None else count_records(files, reader)
    mine = file_ranges(counts, context, seed=seed, epoch=epoch)
    size = sum(take for _, _, take in mine)
    chunks = read_files([files[f] for f, _, _ in mine], reader, cycle_length=cycle_length, total=size, chunked=True,
                        ranges=[(skip, take) for _, skip, take in mine])
    return local_stream(chunks, context, size=size, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                        remainder=remainder, decode_batch=decode_batch, pad_to_steps=pad_to_steps,
                        salt=context.input_pipeline_id + 1)
