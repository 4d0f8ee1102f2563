"""Input pipelines: shard examples over the input pipelines and batch them, identically on every backend.

A *source* says what to read and how to shard it (see :func:`from_dataset`, :func:`from_files`):

* ``sharding="elements"``: every pipeline reads the whole stream and keeps its replicas' slices of each
  global batch. Exact: with R replicas and per-replica batch b = G / R, replica r receives examples
  ``[k*G + r*b, k*G + (r+1)*b)`` of the (optionally shuffled) stream at step k, which is precisely its
  slice of the single-device global batch k. Runs on N replicas compute the gradients of one device.
* ``sharding="files"``: pipeline i reads files ``i, i+P, i+2P, ...`` (P pipelines) of the (per epoch
  shuffled) file list, interleaved in parallel, balanced with its neighbours so that every pipeline
  gets N // P or N // P + 1 of the N records (a file on a boundary is split between two pipelines; see
  :func:`disttrain.input.pipelines.file_ranges`): every record is read by exactly one pipeline. The ranks
  agree on the number of steps through the backend's all-reduce, so nobody waits forever for a peer
  that ran out of data. With fewer files than pipelines it warns and falls back to element sharding.
* ``sharding="off"``: every pipeline reads all the data (synthetic data, or data that is already
  per-worker).

The last partial batch of an epoch (``remainder``):

* ``"drop"`` (training default): only full global batches are used: fewer than one global batch of
  examples is left out per epoch, with element and file sharding alike (every rank runs the smallest
  step count of any rank; a ``dataset_fn`` of your own whose pipelines differ in length more than
  that leaves the longer ones' extra batches out).
* ``"pad"`` (evaluation default): batches are padded to full size with zero examples and every batch
  gains a float32 ``mask`` (1 = real example, 0 = padding): a tuple ``(x, y)`` becomes
  ``(x, y, mask)`` (the Keras ``sample_weight`` position), a dict gains the key ``"mask"``, a lone
  tensor ``x`` becomes ``(x, mask)``. With file sharding every rank runs the LARGEST step count of any
  rank; a rank that ran out of data gets fully masked batches. Pass the mask as ``sample_weight`` to
  ``ctx.average_loss`` and to metrics: every real example is then counted exactly once.

This module is the public entry point (its ``__all__``). The work is done elsewhere: the pipelines in
:mod:`disttrain.input.pipelines`, the input checks in :mod:`disttrain.input.data_checks`, the per-epoch agreement
on the step count in :mod:`disttrain.input.epoch_agreement`, and shard files in :mod:`disttrain.shards`
(``dt.shards.write_shards`` / ``read_shards``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Sequence

import tensorflow as tf

from disttrain.backends.base import InputContext
from disttrain.input.data_checks import check_matches_model, check_unbatched
from disttrain.input.pipelines import (CHUNK, MASK_KEY, check_choice, count_records, element_sharded,
                                 file_ranges, file_sharded, local_stream, mask_of, read_files)
from disttrain.input.shards import batch_decoder, list_shards, shard_info

SHARDINGS = ("auto", "files", "elements", "off")
INFINITE_STEPS = 2**62  # the step count of an infinite dataset, in agreements

__all__ = ["Source", "from_dataset", "from_files", "mask_of", "MASK_KEY"]


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

        Args:
          context: The process's :class:`disttrain.InputContext`.

        Raises:
          ValueError: For ``sharding="files"`` without files.
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

        Args:
          context: The process's :class:`disttrain.InputContext`.
          seed: The shuffle seed (file sharding: which files this pipeline reads).
          epoch: The epoch (likewise).
          remainder: ``"drop"`` or ``"pad"`` the last partial batch.

        Returns:
          The steps; None when the length is unknown (then build the dataset and ask its cardinality),
          and a huge number for an infinite dataset.

        Raises:
          ValueError: For an empty dataset, or one smaller than a global batch with ``remainder="drop"``.
        """
        mode = self.mode(context)
        if self.files is None:
            size = int(self.dataset.cardinality())
        elif self.counts is None:
            return None
        elif mode == "files":
            size = sum(take for _, _, take in file_ranges(self.counts, context, seed=seed, epoch=epoch))
        else:
            size = sum(self.counts)
        if size == tf.data.INFINITE_CARDINALITY:
            return INFINITE_STEPS
        if size < 0:
            return None
        total = sum(self.counts) if self.files is not None else size
        if total == 0:
            raise ValueError(f"the dataset is empty (0 examples{f' in {len(self.files)} file(s)' if self.files else ''}); "
                             "there is nothing to train or evaluate on: check the data source (e.g. a filter "
                             "that drops everything, or files without records)")
        if remainder == "drop" and mode != "off" and total < context.global_batch_size:
            raise ValueError(f"global batch {context.global_batch_size} is larger than the dataset ({total} "
                             f"examples); use a global batch of at most {total}, or remainder='pad'")
        batch = context.global_batch_size if mode == "elements" else (
            context.per_replica_batch_size * context.replicas_per_pipeline)
        return size // batch if remainder == "drop" else -(-size // batch)

    def build(self, context: InputContext, *, seed: int | None = None, epoch: int = 0, remainder: str = "drop",
              pad_to_steps: int | None = None) -> tf.data.Dataset:
        """This pipeline's dataset of per-replica batches (see the module docs).

        Args:
          context: The process's :class:`disttrain.InputContext`.
          seed: Shuffle seed (None: no shuffle).
          epoch: The epoch (mixed into the shuffle).
          remainder: ``"drop"`` or ``"pad"`` (padded batches carry a mask).
          pad_to_steps: With ``"pad"``: pad this pipeline to this many steps (every rank runs alike).
        """
        mode = self.mode(context)
        common = dict(seed=seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer, remainder=remainder,
                      pad_to_steps=pad_to_steps)
        if self.files is None:
            if mode == "off":
                check_unbatched(self.dataset)
                return local_stream(self.dataset.batch(CHUNK), context, size=int(self.dataset.cardinality()),
                                    decode_batch=None, salt=0, **common)
            return element_sharded(self.dataset, context, **common)
        reader = self.reader or tf.data.TFRecordDataset
        if mode == "files":
            return file_sharded(self.files, context, reader=reader, decode_batch=self.decode_batch,
                                counts=self.counts, cycle_length=self.cycle_length, **common)
        counts = list(self.counts) if self.counts is not None else count_records(self.files, reader)
        if mode == "off":
            chunks = read_files(self.files, reader, cycle_length=self.cycle_length, total=None, chunked=True)
            return local_stream(chunks, context, size=sum(counts), decode_batch=self.decode_batch, salt=0,
                                **common)
        stream = read_files(self.files, reader, cycle_length=self.cycle_length, total=sum(counts))
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
    check_choice("sharding", sharding, ("elements", "off"))
    check_unbatched(dataset)
    return Source(dataset=dataset, sharding=sharding, shuffle_buffer=shuffle_buffer,
                  element_spec=dataset.element_spec)


def from_files(files: Sequence[str | os.PathLike] | str | os.PathLike, *, sharding: str = "auto",
               reader: Callable[[str], tf.data.Dataset] | None = None, decode_batch: Callable | None = None,
               shuffle_buffer: int | None = None, cycle_length: int = 4) -> Source:
    """A source read from files: TFRecord shards of :func:`disttrain.shards.write_shards`, or any files
    with a ``reader``.

    Args:
      files: File paths, or a directory of ``write_shards`` shards.
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
    check_choice("sharding", sharding, SHARDINGS)
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
        check_unbatched(source.dataset)
    if model is not None and source.element_spec is not None:
        check_matches_model(source.element_spec, model)
