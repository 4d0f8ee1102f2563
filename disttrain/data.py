"""Input pipelines: shard examples over the input pipelines and batch them, identically on every backend.

A *source* says what to read and how to shard it (see :func:`from_dataset`, :func:`from_files`):

* ``sharding="elements"``: every pipeline reads the whole stream and keeps its replicas' slices of each
  global batch. Exact: with R replicas and per-replica batch b = G / R, replica r receives examples
  ``[k*G + r*b, k*G + (r+1)*b)`` of the (optionally shuffled) stream at step k, which is precisely its
  slice of the single-device global batch k. Runs on N replicas compute the gradients of one device.
* ``sharding="files"``: pipeline i reads files ``i, i+P, i+2P, ...`` (P pipelines) of the (per epoch
  shuffled) file list, interleaved in parallel: no pipeline reads another's data. Pipelines may hold
  different numbers of examples; the ranks agree on the number of steps through the backend's
  all-reduce, so nobody waits forever for a peer that ran out of data. With fewer files than
  pipelines it warns and falls back to element sharding.
* ``sharding="off"``: every pipeline reads all the data (synthetic data, or data that is already
  per-worker).

The last partial batch of an epoch (``remainder``):

* ``"drop"`` (training default): only full global batches are used; with file sharding, every rank
  runs the smallest step count of any rank (the longer pipelines' extra batches are skipped this epoch).
* ``"pad"`` (evaluation default): batches are padded to full size with zero examples and every batch
  gains a float32 ``mask`` (1 = real example, 0 = padding): a tuple ``(x, y)`` becomes
  ``(x, y, mask)`` (the Keras ``sample_weight`` position), a dict gains the key ``"mask"``, a lone
  tensor ``x`` becomes ``(x, mask)``. With file sharding every rank runs the LARGEST step count of any
  rank; a rank that ran out of data gets fully masked batches. Pass the mask as ``sample_weight`` to
  ``ctx.average_loss`` and to metrics: every real example is then counted exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from disttrain.backends.base import Backend, InputContext
from disttrain.shards import batch_decoder, list_shards, read_shards, shard_info, write_shards

AUTOTUNE = tf.data.AUTOTUNE
DatasetFn = Callable[[InputContext], tf.data.Dataset]
SHARDINGS = ("auto", "files", "elements", "off")
REMAINDERS = ("drop", "pad")
MASK_KEY = "mask"
_BIG = 2**62  # "infinite" step count in agreements

__all__ = ["Source", "EpochInput", "from_dataset", "from_files", "element_sharded", "file_sharded",
           "epoch_input", "epoch_seed", "pipeline_options", "check_matches_model", "write_shards",
           "read_shards", "count_records", "check_data", "MASK_KEY"]


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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")
    return value


# -- checks ---------------------------------------------------------------------------------------
_BATCH_TYPES = ("_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset", "BatchDataset",
                "ParallelBatchDataset", "PaddedBatchDataset")
_UNBATCH_TYPES = ("_UnbatchDataset", "UnbatchDataset", "_RebatchDataset")


def batched_by(dataset: tf.data.Dataset) -> int | None:
    """The batch size if ``dataset`` was made by ``.batch``/``.padded_batch`` (and not unbatched since).

    Walks the dataset's chain of transformations; returns -1 for a batch of unknown size and None when
    no batching is found.
    """
    seen = 0
    while dataset is not None and seen < 1000:
        seen += 1
        kind = type(dataset).__name__
        if kind in _UNBATCH_TYPES:
            return None
        if kind in _BATCH_TYPES:
            size = getattr(dataset, "_batch_size", None)
            try:
                return int(size)
            except (TypeError, ValueError):
                return -1
        try:
            inputs = dataset._inputs()  # noqa: SLF001 - tf.data has no public lineage API
        except Exception:  # pragma: no cover - defensive for other dataset types
            return None
        dataset = inputs[0] if len(inputs) == 1 else None
    return None


def _check_unbatched(dataset: tf.data.Dataset) -> None:
    size = batched_by(dataset)
    if size is not None:
        shown = f"batch size {size}" if size > 0 else "batched"
        raise ValueError(
            f"the dataset is already batched ({shown}, element spec {dataset.element_spec}); disttrain "
            "batches and splits the examples over the replicas itself: remove the .batch(...) call (or "
            "call .unbatch()) and pass the global batch size to fit/evaluate instead")


def check_matches_model(element_spec: Any, model: Any) -> None:
    """Raises if the examples' features cannot feed ``model`` (shapes without the batch dimension).

    The features are the first component of a tuple/list example, the matching keys of a dict
    example, or the example itself. Models without known inputs (subclassed, unbuilt) are not checked.

    Raises:
      ValueError: Naming the feature spec, the model's input shape, and how to fix it.
    """
    try:
        inputs = list(model.inputs)
    except Exception:
        return
    if not inputs:
        return
    if isinstance(element_spec, (tuple, list)):
        features = element_spec[0] if element_spec else None
    else:
        features = element_spec
    wanted = [(getattr(t, "name", f"input_{i}"), tuple(t.shape)[1:]) for i, t in enumerate(inputs)]
    if isinstance(features, dict):
        names = [n for n, _ in wanted]
        if not all(n in features for n in names):
            return  # no convention to match on; the model call will tell
        pairs = [(n, features[n], shape) for n, shape in wanted]
    elif isinstance(features, tf.TensorSpec):
        if len(wanted) != 1:
            raise ValueError(f"the examples' features are one tensor {features} but model {model.name!r} has "
                             f"{len(wanted)} inputs {[n for n, _ in wanted]}; make the features a tuple or "
                             "dict with one entry per model input")
        pairs = [(wanted[0][0], features, wanted[0][1])]
    elif isinstance(features, (tuple, list)) and len(features) == len(wanted):
        pairs = [(n, f, shape) for (n, shape), f in zip(wanted, features)]
    else:
        return
    for name, spec, shape in pairs:
        if not isinstance(spec, tf.TensorSpec):
            continue
        if not spec.shape.is_compatible_with(tf.TensorShape(shape)):
            raise ValueError(
                f"the examples' features {spec} do not match input {name!r} of model {model.name!r}, which "
                f"expects examples of shape {list(shape)} (batch dimension excluded; got "
                f"{spec.shape.as_list() if spec.shape.rank is not None else 'unknown'}); reshape the "
                "examples with dataset.map(...), or fix the model's keras.Input(shape=...). Pass unbatched "
                "examples: disttrain adds the batch dimension")


# -- masks and padding ----------------------------------------------------------------------------
def mask_of(batch: Any) -> tf.Tensor:
    """The padding mask of a batch made with ``remainder="pad"`` (1 for real examples, 0 for padding)."""
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


# -- the three sharding modes ---------------------------------------------------------------------
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
        batch then carries a mask, see the module docs).
      decode_batch: Optional function turning a batch of records into a batch of examples.
      pad_to_steps: With ``remainder="pad"``, append fully masked steps up to this many.

    Returns:
      A dataset whose elements are per-replica batches; ``context.replicas_per_pipeline`` consecutive
      elements form this process's share of one global step.

    Raises:
      ValueError: If the dataset is already batched, or (with ``"drop"``) smaller than one global batch.
    """
    _check_choice("remainder", remainder, REMAINDERS)
    if decode_batch is None:
        _check_unbatched(dataset)
    size = int(dataset.cardinality())
    global_batch = context.global_batch_size
    if remainder == "drop" and 0 <= size < global_batch:
        raise ValueError(f"global batch {global_batch} is larger than the dataset ({size} examples); "
                         f"use a global batch of at most {size}, or remainder='pad'")
    if size == 0:
        raise ValueError("the dataset is empty; there is nothing to train or evaluate on")
    stream = _shuffled(dataset, seed=seed, epoch=epoch, buffer=shuffle_buffer, size=size)
    steps = _batch_steps(stream, batch=global_batch, remainder=remainder, decode_batch=decode_batch)
    return _finish(steps, context, pad_to_steps=pad_to_steps, parts=context.num_replicas_in_sync,
                   first=context.input_pipeline_id * context.replicas_per_pipeline)


CHUNK = 256  # records read, shuffled and parsed together: per-record tf.data overhead dominates otherwise
DEFAULT_WINDOW = 16_384  # default shuffle window of a pipeline's own examples


def _local_stream(chunks: tf.data.Dataset, context: InputContext, *, size: int, seed, epoch, shuffle_buffer,
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

    Files written by :func:`write_shards` do not need this: their counts are in the manifest.
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


def _read_files(files: Sequence[str], reader: Callable, *, cycle_length: int, total: int | None,
                chunked: bool = False) -> tf.data.Dataset:
    """The files' elements, interleaved in parallel (one element, or one chunk of elements, per file in
    turn); the same order whatever the parallelism."""
    read = (lambda path: reader(path).batch(CHUNK)) if chunked else reader
    stream = tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        read, cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
        num_parallel_calls=AUTOTUNE, deterministic=True)
    if total is not None and not chunked:
        stream = stream.apply(tf.data.experimental.assert_cardinality(total))
    return stream


def _file_share(num_files: int, context: InputContext, *, seed: int | None, epoch: int) -> list[int]:
    """Indices of the files pipeline ``context.input_pipeline_id`` reads in ``epoch``."""
    order = np.arange(num_files)
    if seed is not None:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_files)
    return [int(i) for i in order[context.input_pipeline_id::context.num_input_pipelines]]


def file_sharded(files: Sequence[str], context: InputContext, *, reader: Callable[[str], tf.data.Dataset] | None = None,
                 decode_batch: Callable | None = None, counts: Sequence[int] | None = None,
                 seed: int | None = None, epoch: int = 0, shuffle_buffer: int | None = None,
                 remainder: str = "drop", cycle_length: int = 4, pad_to_steps: int | None = None
                 ) -> tf.data.Dataset:
    """This pipeline's per-replica batches, read from its own share of ``files``.

    The file list is shuffled with ``(seed, epoch)`` (identically on every process), pipeline i takes
    files ``i, i+P, ...`` and reads them interleaved in parallel, shuffles its examples, and batches them
    into per-replica batches of ``context.per_replica_batch_size``.

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
    _check_choice("remainder", remainder, REMAINDERS)
    files = list(files)
    pipelines = context.num_input_pipelines
    if len(files) < pipelines:
        raise ValueError(f"file sharding needs at least one file per input pipeline: {len(files)} file(s) for "
                         f"{pipelines} pipelines; write more shards (write_shards(..., num_shards={pipelines})) "
                         "or use sharding='elements'")
    reader = reader or tf.data.TFRecordDataset
    counts = list(counts) if counts is not None else count_records(files, reader)
    mine = _file_share(len(files), context, seed=seed, epoch=epoch)
    size = sum(counts[i] for i in mine)
    chunks = _read_files([files[i] for i in mine], reader, cycle_length=cycle_length, total=size, chunked=True)
    return _local_stream(chunks, context, size=size, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                         remainder=remainder, decode_batch=decode_batch, pad_to_steps=pad_to_steps,
                         salt=context.input_pipeline_id + 1)


# -- sources --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """Examples to feed and how to shard them; make one with :func:`from_dataset` or :func:`from_files`.

    Attributes:
      dataset: Unbatched examples (or None for files).
      files: File paths (or None for a dataset).
      reader: ``path -> dataset`` of one file's elements (files only).
      decode_batch: Batch of records -> batch of examples (files only; None: the reader yields examples).
      counts: Elements per file, when known.
      element_spec: Spec of one decoded example, when known.
      sharding: ``files``, ``elements`` or ``off`` (``auto`` is resolved per input context).
      shuffle_buffer: Element sharding: shuffle buffer (default the whole stream when its size is known,
        else 10000). File sharding and off: shuffle window of each pipeline (default its whole share,
        at most 16384).
      cycle_length: Files read at once.
    """

    dataset: tf.data.Dataset | None = None
    files: tuple[str, ...] | None = None
    reader: Callable[[str], tf.data.Dataset] | None = None
    decode_batch: Callable | None = None
    counts: tuple[int, ...] | None = None
    element_spec: Any = None
    sharding: str = "auto"
    shuffle_buffer: int | None = None
    cycle_length: int = 4

    def mode(self, context: InputContext) -> str:
        """The sharding used for ``context``: ``files``, ``elements`` or ``off``.

        Warns (and uses ``elements``) when file sharding would leave a pipeline without files.
        """
        if self.sharding == "off":
            return "off"
        if self.files is None:
            if self.sharding == "files":
                raise ValueError("sharding='files' needs files; pass a list of paths to from_files")
            return "elements"
        if self.sharding == "elements":
            return "elements"
        if len(self.files) < context.num_input_pipelines:
            warnings.warn(
                f"{len(self.files)} file(s) for {context.num_input_pipelines} input pipelines: file sharding "
                "would leave a pipeline without data, so disttrain falls back to element sharding (every "
                "pipeline reads all files and keeps its slice of each batch). Write at least "
                f"{context.num_input_pipelines} shards to shard by file.", stacklevel=3)
            return "elements"
        return "files"

    def local_steps(self, context: InputContext, *, seed: int | None = None, epoch: int = 0,
                    remainder: str = "drop") -> int | None:
        """Steps :meth:`build` gives for ``context``, from the known lengths, without building it.

        Returns None when the length is unknown (then build the dataset and ask its cardinality), and
        a huge number for an infinite dataset.
        """
        mode = self.mode(context)
        if self.files is None:
            size = int(self.dataset.cardinality())
        elif self.counts is None:
            return None
        elif mode == "files":
            size = sum(self.counts[i] for i in _file_share(len(self.files), context, seed=seed, epoch=epoch))
        else:
            size = sum(self.counts)
        if size == tf.data.INFINITE_CARDINALITY:
            return _BIG
        if size < 0:
            return None
        total = sum(self.counts) if self.files is not None else size
        if remainder == "drop" and mode != "off" and total < context.global_batch_size:
            raise ValueError(f"global batch {context.global_batch_size} is larger than the dataset ({total} "
                             f"examples); use a global batch of at most {total}, or remainder='pad'")
        batch = context.global_batch_size if mode == "elements" else (
            context.per_replica_batch_size * context.replicas_per_pipeline)
        return size // batch if remainder == "drop" else -(-size // batch)

    def build(self, context: InputContext, *, seed: int | None = None, epoch: int = 0, remainder: str = "drop",
              pad_to_steps: int | None = None) -> tf.data.Dataset:
        """This pipeline's dataset of per-replica batches (see the module docs)."""
        mode = self.mode(context)
        common = dict(seed=seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer, remainder=remainder,
                      pad_to_steps=pad_to_steps)
        if self.files is None:
            if mode == "off":
                _check_unbatched(self.dataset)
                return _local_stream(self.dataset.batch(CHUNK), context, size=int(self.dataset.cardinality()),
                                     decode_batch=None, salt=0, **common)
            return element_sharded(self.dataset, context, **common)
        reader = self.reader or tf.data.TFRecordDataset
        if mode == "files":
            return file_sharded(self.files, context, reader=reader, decode_batch=self.decode_batch,
                                counts=self.counts, cycle_length=self.cycle_length, **common)
        counts = list(self.counts) if self.counts is not None else count_records(self.files, reader)
        if mode == "off":
            chunks = _read_files(self.files, reader, cycle_length=self.cycle_length, total=None, chunked=True)
            return _local_stream(chunks, context, size=sum(counts), decode_batch=self.decode_batch, salt=0,
                                 **common)
        stream = _read_files(self.files, reader, cycle_length=self.cycle_length, total=sum(counts))
        return element_sharded(stream, context, decode_batch=self.decode_batch, **common)


def from_dataset(dataset: tf.data.Dataset, *, sharding: str = "elements",
                 shuffle_buffer: int | None = None) -> Source:
    """A source of unbatched examples.

    Args:
      dataset: Unbatched examples, in the same deterministic order on every process.
      sharding: ``elements`` (exact split of every global batch) or ``off`` (every pipeline reads it all).
      shuffle_buffer: Shuffle buffer (default the whole dataset when its size is known, else 10000).

    Raises:
      ValueError: If the dataset is already batched or ``sharding`` is unknown or ``files``.
      TypeError: If ``dataset`` is not a ``tf.data.Dataset``.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"from_dataset takes a tf.data.Dataset, got {type(dataset).__name__}")
    _check_choice("sharding", sharding, ("elements", "off"))
    _check_unbatched(dataset)
    return Source(dataset=dataset, sharding=sharding, shuffle_buffer=shuffle_buffer,
                  element_spec=dataset.element_spec)


def from_files(files: Sequence[str | os.PathLike] | str | os.PathLike, *, sharding: str = "auto",
               reader: Callable[[str], tf.data.Dataset] | None = None, decode_batch: Callable | None = None,
               shuffle_buffer: int | None = None, cycle_length: int = 4) -> Source:
    """A source read from files: TFRecord shards of :func:`write_shards`, or any files with a ``reader``.

    Args:
      files: File paths, or a directory of :func:`write_shards` shards.
      sharding: ``auto``/``files`` (each pipeline reads its own files; falls back to ``elements`` with a
        warning when there are fewer files than pipelines), ``elements`` or ``off``.
      reader: ``path -> tf.data.Dataset`` of one file's examples (e.g. ``tf.data.TextLineDataset``), or of
        its records when ``decode_batch`` is given. Default: TFRecord shards written by ``write_shards``.
      decode_batch: Batch of records -> batch of examples (e.g. ``tf.io.parse_example`` with your
        features). Default for ``write_shards`` files: decoded from the manifest.
      shuffle_buffer: Examples each pipeline shuffles together (a window; default its whole share, at
        most 16384). With ``sharding="elements"``: the shuffle buffer of the common stream.
      cycle_length: Files each pipeline reads at once (interleaved in parallel).

    Raises:
      ValueError: For no files, an unknown ``sharding``, or files without a manifest and no ``reader``.
    """
    _check_choice("sharding", sharding, SHARDINGS)
    paths = tuple(list_shards(files))
    info = shard_info(paths)
    counts = spec = None
    if info is not None and reader is None:
        spec, counts = info[0], tuple(info[1])
        decode_batch = decode_batch or batch_decoder(spec)
    elif reader is None and decode_batch is None:
        raise ValueError(f"{paths[0]!r} has no write_shards manifest: pass reader=... (path -> dataset of "
                         "examples), or decode_batch=... to parse TFRecord records in batches")
    return Source(files=paths, reader=reader, decode_batch=decode_batch, counts=counts, element_spec=spec,
                  sharding=sharding, shuffle_buffer=shuffle_buffer, cycle_length=cycle_length)


def as_source(data: Any) -> Source | None:
    """A :class:`Source` for a dataset, a list of files or a source; None for a ``dataset_fn``.

    Raises:
      TypeError: For anything else.
    """
    if isinstance(data, Source):
        return data
    if isinstance(data, tf.data.Dataset):
        return from_dataset(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(f, (str, os.PathLike)) for f in data):
        return from_files(data)
    if callable(data):
        return None
    raise TypeError(f"data must be a tf.data.Dataset of examples, a list of files, a disttrain.data.Source "
                    f"or a function of the input context, got {type(data).__name__}")


# -- one epoch: agreeing on the steps -------------------------------------------------------------
def _local_steps(dataset: tf.data.Dataset, context: InputContext) -> int | None:
    """Steps this pipeline gives: None when unknown, ``_BIG`` when infinite."""
    size = int(dataset.cardinality())
    if size == tf.data.INFINITE_CARDINALITY:
        return _BIG
    if size < 0:
        return None
    return size // context.replicas_per_pipeline


class EpochInput:
    """One epoch's step inputs on this process, with a step count every process agrees on.

    Attributes:
      steps: Steps to run (the same on every process), or None when the pipelines' lengths are unknown:
        then call :meth:`next_agreed` before every step, which stops all processes together.
      iterator: Iterator of step inputs (what ``backend.run`` takes).
      masked: The batches carry a padding mask (``remainder="pad"``): see :func:`mask_of`.
    """

    def __init__(self, *, backend: Backend, iterator: Any, steps: int | None, max_steps: int | None,
                 masked: bool = False):
        self.backend, self.iterator, self.steps, self.max_steps = backend, iterator, steps, max_steps
        self.masked = masked  # batches carry a padding mask (see mask_of)
        self._taken = 0

    def next_agreed(self) -> Any | None:
        """The next step input, or None (on every process) once any process has run out of data or
        ``max_steps`` were taken. One all-reduce per call.

        The pipelines are made endless by :func:`_with_end_flag`: each element says whether it is real
        data, so a process that ran out still answers (a tf.distribute iterator would otherwise hand it
        empty batches while the others continue, and a Horovod rank would stop and leave its peers
        waiting in a collective).
        """
        if self.max_steps is not None and self._taken >= self.max_steps:
            return None
        batch, real = next(self.iterator)
        local = all(bool(np.asarray(v)) for v in self.backend.local_values(real))
        if not self.backend.all_reduce(int(local), "min"):
            return None
        self._taken += 1
        return batch


def _with_end_flag(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``(element, True)`` for every element of ``dataset``, then ``(filler, False)`` forever."""
    def filler(s: tf.TensorSpec) -> tf.Tensor:
        if s.shape.rank is None:
            raise ValueError(f"cannot agree on the steps of a pipeline whose elements have unknown rank ({s}); "
                             "give its elements a known shape or pass steps_per_epoch with a repeating dataset")
        return tf.zeros([d if d is not None else 0 for d in s.shape.as_list()], s.dtype)

    end = tf.data.Dataset.from_tensors((tf.nest.map_structure(filler, dataset.element_spec),
                                        tf.constant(False))).repeat()
    real = dataset.map(lambda *b: (b[0] if len(b) == 1 else b, tf.constant(True)))
    return real.concatenate(end).with_options(pipeline_options())


def epoch_input(backend: Backend, data: Any, *, global_batch_size: int, epoch: int = 0, seed: int | None = None,
                steps: int | None = None, remainder: str = "drop", skip_steps: int = 0) -> EpochInput:
    """Builds this process's input for one epoch and agrees with the other processes on its length.

    Each process computes how many steps its pipeline gives; one all-reduce yields the minimum (for
    ``remainder="drop"`` and for ``dataset_fn`` callables) or the maximum (``"pad"``: shorter pipelines
    are padded with fully masked batches), capped by ``steps``. If any pipeline's length is unknown,
    the processes agree step by step instead (see :meth:`EpochInput.next_agreed`).

    Args:
      backend: The backend.
      data: A dataset, a list of files, a :class:`Source`, or ``fn(input_context)`` returning per-replica
        batches.
      global_batch_size: Examples per step over all replicas.
      epoch: Epoch number (reshuffles).
      seed: Shuffle seed; None keeps the order.
      steps: Steps wanted (``steps_per_epoch``); required for infinite datasets.
      remainder: ``drop`` or ``pad``.
      skip_steps: Steps of this epoch already done (a resumed run): the pipelines skip their first
        ``skip_steps`` step inputs, and ``steps`` of the result counts the remaining ones only.

    Raises:
      ValueError: For an infinite dataset without ``steps``, an epoch of 0 steps, or ``skip_steps``
        beyond the epoch's end.
    """
    _check_choice("remainder", remainder, REMAINDERS)
    context = backend.input_context(global_batch_size)
    source = as_source(data)
    if source is None:
        build = data
        local = _local_steps(data(context), context)
        padded = False
    else:
        def build(ctx, pad_to_steps=None):
            return source.build(ctx, seed=seed, epoch=epoch, remainder=remainder, pad_to_steps=pad_to_steps)

        local = source.local_steps(context, seed=seed, epoch=epoch, remainder=remainder)
        if local is None:
            local = _local_steps(build(context), context)
        padded = remainder == "pad"
    # One all-reduce: min of [-unknown, steps, -steps] = [-any unknown, min steps, -max steps].
    agreed = backend.all_reduce(np.array([-(local is None), local or 0 if local is not None else _BIG,
                                          -(local or 0)], np.int64), "min")
    any_unknown, lowest, highest = bool(-agreed[0]), int(agreed[1]), int(-agreed[2])
    if any_unknown:
        if padded:
            raise ValueError("remainder='pad' needs pipelines of known length; the dataset's cardinality is "
                             "unknown (e.g. after filter()): use remainder='drop', or set it with "
                             "dataset.apply(tf.data.experimental.assert_cardinality(n))")
        iterator = iter(backend.distribute_dataset(lambda ctx: _with_end_flag(_skipped(build(ctx), ctx, skip_steps)),
                                                   global_batch_size=global_batch_size))
        return EpochInput(backend=backend, iterator=iterator, steps=None,
                          max_steps=None if steps is None else max(0, steps - skip_steps))
    available = highest if padded else lowest
    if available >= _BIG and steps is None:
        raise ValueError("the dataset is infinite (it repeats); pass steps_per_epoch (or validation_steps) "
                         "to say how many steps make an epoch")
    run_steps = available if steps is None else min(int(steps), available)
    if steps is not None and steps > available and backend.is_chief:
        warnings.warn(f"{steps} steps per epoch were asked for but the data gives {available} steps of "
                      f"global batch {global_batch_size}; running {available}", stacklevel=3)
    if run_steps <= 0:
        raise ValueError(f"an epoch has 0 steps of global batch {global_batch_size} (a pipeline has fewer "
                         "examples than its share of one batch); use a smaller global batch, more data, "
                         "or remainder='pad'")
    if skip_steps > run_steps:
        raise ValueError(f"cannot skip {skip_steps} steps of an epoch of {run_steps} steps of global batch "
                         f"{global_batch_size}: the data changed since the checkpoint; resume with the same data")
    remaining = run_steps - skip_steps
    if remaining == 0:  # resumed right at the epoch's end: nothing to read
        return EpochInput(backend=backend, iterator=None, steps=0, max_steps=0, masked=padded)
    if padded and highest > lowest:
        fn = lambda ctx: _skipped(build(ctx, pad_to_steps=run_steps), ctx, skip_steps)  # noqa: E731
    else:
        fn = lambda ctx: _skipped(build(ctx), ctx, skip_steps)  # noqa: E731
    iterator = iter(backend.distribute_dataset(fn, global_batch_size=global_batch_size))
    return EpochInput(backend=backend, iterator=iterator, steps=remaining, max_steps=remaining, masked=padded)


def _skipped(dataset: tf.data.Dataset, context: InputContext, steps: int) -> tf.data.Dataset:
    """``dataset`` (per-replica batches) without its first ``steps`` step inputs. The skipped batches
    are still read (not trained on): the position comes from the step count, never from an iterator."""
    if not steps:
        return dataset
    return dataset.skip(steps * context.replicas_per_pipeline)


def check_data(data: Any, *, model: Any = None) -> None:
    """Checks what a user passes to ``fit``/``evaluate`` before anything runs.

    Raises:
      ValueError: If a dataset is already batched, or its examples do not fit ``model``'s inputs.
      TypeError: If ``data`` is of an unsupported type.
    """
    source = as_source(data)
    if source is None:
        return
    if source.dataset is not None and source.sharding != "off":
        _check_unbatched(source.dataset)
    if model is not None and source.element_spec is not None:
        check_matches_model(source.element_spec, model)
