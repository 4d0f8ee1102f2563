"""Write a dataset of examples into N TFRecord shard files, and read them back.

:func:`write_shards` stores each example as a ``tf.train.Example`` (one feature per tensor of the
example's structure) and writes a small manifest (``shards.json``) next to the files with the element
spec and the number of records in every file. Readers use the manifest to decode whole batches at once
(``tf.io.parse_example``, vectorised) and to know each file's length without reading it, so sharded
pipelines know their number of steps up front.

    files = dt.shards.write_shards(dataset, "/data/train", num_shards=16)
    trainer.fit(dt.data.from_files(files), global_batch_size=256)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

MANIFEST = "shards.json"
#: The public part (``dt.shards.*``); the rest serves ``disttrain.data.from_files``.
__all__ = ["write_shards", "read_shards", "list_shards"]
_FLOATS = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_INTS = (tf.bool, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32)


# -- element specs as JSON ------------------------------------------------------------------------
def encode_spec(spec: Any) -> Any:
    """A JSON-able description of an element spec (tensors, tuples, lists and dicts of them).

    Raises:
      ValueError: For a component that is not a ``tf.TensorSpec`` with a fully known shape.
    """
    if isinstance(spec, tf.TensorSpec):
        if not spec.shape.is_fully_defined():
            raise ValueError(f"write_shards needs fixed shapes, got {spec}; pad or reshape the examples "
                             "to a fixed shape with dataset.map(...) before writing them")
        return {"shape": spec.shape.as_list(), "dtype": spec.dtype.name}
    if isinstance(spec, dict):
        return {"dict": {str(k): encode_spec(v) for k, v in spec.items()}}
    if isinstance(spec, (tuple, list)):
        return {"tuple" if isinstance(spec, tuple) else "list": [encode_spec(s) for s in spec]}
    raise ValueError(f"write_shards supports tensors, tuples, lists and dicts of tensors, got {spec!r}; "
                     "convert the examples with dataset.map(...) first")


def decode_spec(encoded: Any) -> Any:
    """Inverse of :func:`encode_spec`."""
    if "shape" in encoded:
        return tf.TensorSpec(encoded["shape"], tf.as_dtype(encoded["dtype"]))
    if "dict" in encoded:
        return {k: decode_spec(v) for k, v in encoded["dict"].items()}
    if "tuple" in encoded:
        return tuple(decode_spec(v) for v in encoded["tuple"])
    return [decode_spec(v) for v in encoded["list"]]


def _feature(value: np.ndarray, dtype: tf.DType) -> tf.train.Feature:
    flat = np.asarray(value).reshape(-1)
    if dtype in _FLOATS:
        return tf.train.Feature(float_list=tf.train.FloatList(value=flat.astype(np.float32)))
    if dtype in _INTS:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=flat.astype(np.int64)))
    if dtype == tf.string:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(flat)))
    raise ValueError(f"write_shards cannot store dtype {dtype.name}; cast it to float32, int64 or string")


def _check_dtype(spec: tf.TensorSpec) -> None:
    if spec.dtype not in _FLOATS + _INTS + (tf.string,):
        raise ValueError(f"write_shards cannot store dtype {spec.dtype.name} ({spec}); cast it to float32, "
                         "int64 or string with dataset.map(...)")


# -- writing --------------------------------------------------------------------------------------
def write_shards(dataset: tf.data.Dataset, directory: str | os.PathLike, *, num_shards: int,
                 prefix: str = "shard") -> list[str]:
    """Writes the examples of ``dataset`` into ``num_shards`` TFRecord files and returns their paths.

    Example ``i`` goes to file ``i % num_shards`` (so the files differ in length by at most one record)
    in the dataset's order. A manifest ``shards.json`` in ``directory`` records the element spec and each
    file's record count; :func:`read_shards` and ``disttrain.data.from_files`` use it. Floats are stored
    as float32, integers and bools as int64 (cast back to their dtype when read).

    Args:
      dataset: Unbatched examples with fixed shapes: a tensor, or a tuple/list/dict of tensors.
      directory: Where to write (created if needed). Existing shard files of the same prefix are
        overwritten.
      num_shards: Number of files, >= 1.
      prefix: File name prefix: files are ``{prefix}-00000-of-00004.tfrecord`` and so on.

    Returns:
      The file paths, in shard order.

    Raises:
      ValueError: If ``num_shards`` < 1, the dataset is infinite, or an example component has no fixed
        shape or an unsupported dtype.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError("cannot write an infinite dataset; remove .repeat() or add .take(n)")
    spec = dataset.element_spec
    encoded = encode_spec(spec)
    flat_specs = tf.nest.flatten(spec)
    for s in flat_specs:
        _check_dtype(s)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
    counts = [0] * num_shards
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, example in enumerate(dataset.as_numpy_iterator()):
            values = tf.nest.flatten(example)
            features = {str(k): _feature(v, s.dtype) for k, (v, s) in enumerate(zip(values, flat_specs))}
            writers[i % num_shards].write(
                tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
            counts[i % num_shards] += 1
    finally:
        for w in writers:
            w.close()
    manifest_path = os.path.join(directory, MANIFEST)
    manifest = {"files": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    for p, c in zip(paths, counts):
        manifest["files"][os.path.basename(p)] = {"records": c, "spec": encoded}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return paths


# -- reading --------------------------------------------------------------------------------------
def _manifest_entry(path: str) -> dict | None:
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path) as f:
        return json.load(f).get("files", {}).get(os.path.basename(path))


def shard_info(files: Sequence[str]) -> tuple[Any, list[int]] | None:
    """``(element_spec, record counts)`` of files written by :func:`write_shards`, else None.

    Raises:
      ValueError: If the files were written with different element specs.
    """
    entries = [_manifest_entry(os.fspath(f)) for f in files]
    if not entries or any(e is None for e in entries):
        return None
    specs = {json.dumps(e["spec"], sort_keys=True) for e in entries}
    if len(specs) > 1:
        raise ValueError(f"the shard files hold examples of different structures ({len(specs)} element "
                         f"specs in {list(files)[:4]}...); read them as separate datasets")
    return decode_spec(entries[0]["spec"]), [int(e["records"]) for e in entries]


def batch_decoder(spec: Any) -> Callable[[tf.Tensor], Any]:
    """A function from a 1-D batch of serialized records to a batch of examples of ``spec``."""
    flat = tf.nest.flatten(spec)

    def stored(s: tf.TensorSpec) -> tf.DType:
        return tf.float32 if s.dtype in _FLOATS else tf.int64 if s.dtype in _INTS else tf.string

    features = {str(k): tf.io.FixedLenFeature(s.shape, stored(s)) for k, s in enumerate(flat)}

    def decode(serialized: tf.Tensor) -> Any:
        parsed = tf.io.parse_example(serialized, features)
        values = [parsed[str(k)] if parsed[str(k)].dtype == s.dtype else tf.cast(parsed[str(k)], s.dtype)
                  for k, s in enumerate(flat)]
        return tf.nest.pack_sequence_as(spec, values)

    return decode


def read_shards(files: Sequence[str] | str | os.PathLike, *, cycle_length: int = 4) -> tf.data.Dataset:
    """All examples of shard files written by :func:`write_shards`, unsharded and unbatched.

    The files are interleaved one record at a time (``cycle_length`` files at once), so reading every
    shard of a :func:`write_shards` call with ``cycle_length >= num_shards`` restores the original order.
    To shard the files over workers, pass them to ``disttrain.data.from_files`` instead.

    Args:
      files: Shard file paths, or the directory they were written to (all its ``*.tfrecord`` shards).
      cycle_length: Files read in parallel (interleaved record by record).

    Returns:
      A ``tf.data.Dataset`` of the examples, as they were written.

    Raises:
      ValueError: If there are no files or they have no manifest.
    """
    files = list_shards(files)
    info = shard_info(files)
    if info is None:
        raise ValueError(f"no {MANIFEST} manifest next to {files[0]}; read_shards reads files written by "
                         "write_shards (for other TFRecord files use tf.data.TFRecordDataset and your parser)")
    spec, counts = info
    records = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = records.apply(tf.data.experimental.assert_cardinality(sum(counts)))
    decode = batch_decoder(spec)
    return records.batch(256).map(decode, num_parallel_calls=tf.data.AUTOTUNE).unbatch().apply(
        tf.data.experimental.assert_cardinality(sum(counts)))


def list_shards(files: Sequence[str] | str | os.PathLike) -> list[str]:
    """The shard paths: ``files`` itself, or the sorted ``*.tfrecord`` files of a directory.

    Args:
      files: Shard file paths, one path, or a directory.

    Raises:
      ValueError: If no files are given or found.
    """
    if isinstance(files, (str, os.PathLike)):
        path = os.fspath(files)
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tfrecord"))
            if not found:
                raise ValueError(f"no *.tfrecord files in directory {path!r}; write them with write_shards")
            return found
        return [path]
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("the list of files is empty; pass at least one file")
    return files
