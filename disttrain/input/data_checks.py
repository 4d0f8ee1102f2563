"""Checks on what a user passes as training data, before anything runs: unbatched examples that fit
the model, the same element spec on every rank, and labels whose dtype the step can combine with the
model's output.

:func:`batched_by` is the only place in disttrain that reads ``tf.data`` internals (see its docstring
for why no public API can answer); ``tests/test_data.py::test_batched_by_knows_this_tf_version`` fails
when a TensorFlow upgrade changes them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import tensorflow as tf

# Python class names of tf.data's batching transformations (TF 2.21: the underscored ones; older
# releases: without the underscore).
_BATCH_TYPES = ("_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset", "BatchDataset",
                "ParallelBatchDataset", "PaddedBatchDataset")
_UNBATCH_TYPES = ("_UnbatchDataset", "UnbatchDataset", "_RebatchDataset")


def batched_by(dataset: tf.data.Dataset) -> int | None:
    """The batch size if ``dataset`` was made by ``.batch``/``.padded_batch`` (and not unbatched since).

    Walks the dataset's chain of transformations through the private ``Dataset._inputs()`` and the
    transformations' class names. tf.data has no public lineage API: the public route, serialising
    the pipeline with ``tf.raw_ops.DatasetToGraphV2(tf.data.experimental.to_variant(ds))`` and reading
    the op types, copies in-memory data into the graph (measured with TF 2.21: 0.9 s and a 100 MB
    GraphDef for a 100 MB ``from_tensor_slices`` dataset, against 0.1 ms for this walk; over 2 GB it
    fails), and the element spec cannot tell a batch from an example of variable length.

    Returns:
      The batch size; -1 for a batch of unknown size; None when no batching is found (also when the
      walk cannot continue, e.g. at a ``zip`` of several datasets).
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
            inputs = dataset._inputs()  # noqa: SLF001 - see the docstring
        except Exception:  # pragma: no cover - defensive for other dataset types
            return None
        dataset = inputs[0] if len(inputs) == 1 else None
    return None


def check_unbatched(dataset: tf.data.Dataset) -> None:
    """Raises if ``dataset`` is already batched.

    Raises:
      ValueError: Naming the batch size and element spec, and how to fix it.
    """
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


# -- the same element spec on every rank ----------------------------------------------------------
def spec_text(spec: Any) -> str:
    """A canonical text of an element spec (dict keys sorted): ``(float32[8, 3], int64[8])``."""
    if spec is None:
        return "unknown"
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k!r}: {spec_text(spec[k])}" for k in sorted(spec)) + "}"
    if isinstance(spec, (tuple, list)):
        return "(" + ", ".join(spec_text(s) for s in spec) + ("," if len(spec) == 1 else "") + ")"
    if isinstance(spec, tf.TensorSpec):
        shape = "?" if spec.shape.rank is None else str(spec.shape.as_list()).replace("None", "?")
        return f"{spec.dtype.name}{shape}"
    return repr(spec)


def spec_hash(spec: Any) -> int:
    """A 62-bit hash of :func:`spec_text`, identical on every process (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(spec_text(spec).encode()).digest()[:8], "little") & (2**62 - 1)


def gather_texts(backend: Any, text: str) -> list[str]:
    """Every process's ``text``, by rank (two all-reduces: the longest length, then the bytes)."""
    data = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    length = int(backend.all_reduce(np.array([data.size], np.int64), "max")[0])
    rows = np.zeros([backend.size, length], np.int32)
    rows[backend.rank, :data.size] = data
    rows = np.asarray(backend.all_reduce(rows, "sum"))
    return [bytes(row.astype(np.uint8).tolist()).rstrip(b"\0").decode(errors="replace") for row in rows]


def raise_spec_mismatch(backend: Any, spec: Any, *, what: str) -> None:
    """Raises, on every process, a ValueError that prints each rank's element spec (collective: call it on
    every process once they know the specs differ).

    Args:
      spec: This process's element spec.
      what: What the spec describes (``"examples"``, ``"per-replica batches"``).
    """
    texts = gather_texts(backend, spec_text(spec))
    shown = "\n".join(f"  rank {r}: {t}" for r, t in enumerate(texts))
    raise ValueError(f"the input pipelines give {what} of different shapes or dtypes on different ranks:\n{shown}\n"
                     "every rank must feed the same element spec (or the steps' collectives do not match): make the "
                     "data, or your dataset_fn(ctx), build the same structure, shapes and dtypes on every rank "
                     "(only which examples it reads may depend on ctx.input_pipeline_id)")


# -- labels the step cannot combine with the model's output -----------------------------------------
_TF_DTYPE_ERRORS = (
    re.compile(r"Input '\w+' of '(?P<op>\w+)' Op has type (?P<a>\w+) that does not match type (?P<b>\w+)"),
    re.compile(r"cannot compute (?P<op>\w+) as input #\d+\(zero-based\) was expected to be a (?P<a>\w+) tensor "
               r"but is a (?P<b>\w+) tensor"),
)


_TF_NAMES = {"float": "float32", "double": "float64", "half": "float16"}  # DataType names in eager errors


def _components(spec: Any) -> list[tuple[str, tf.TensorSpec]]:
    """``(name, spec)`` of an example's or batch's non-feature components (labels, weights, mask)."""
    if isinstance(spec, dict):
        return [(repr(k), v) for k, v in sorted(spec.items()) if isinstance(v, tf.TensorSpec)]
    if isinstance(spec, (tuple, list)):
        return [(f"element {i}", v) for i, v in enumerate(spec) if i > 0 and isinstance(v, tf.TensorSpec)]
    return []


def explain_dtype_mismatch(error: Exception, *, element_spec: Any, model: Any) -> ValueError | None:
    """A ValueError naming both dtypes and the fix, when ``error`` (raised while tracing the step) is TF
    refusing an op on int labels and float predictions (or the reverse); else None.

    Only TF's own error triggers it, so legitimate integer labels (sparse class ids given to a
    crossentropy) are never reported.
    """
    match = next((m for p in _TF_DTYPE_ERRORS if (m := p.search(str(error)))), None)
    if match is None:
        return None
    dtypes = {_TF_NAMES.get(match["a"], match["a"]), _TF_NAMES.get(match["b"], match["b"])}
    models = model if isinstance(model, (list, tuple)) else [model]
    outputs = set()
    for m in models:
        try:
            outputs |= {tf.as_dtype(t.dtype).name for t in tf.nest.flatten(m.outputs)}
        except Exception:  # noqa: BLE001 - subclassed or unbuilt models have no outputs
            continue
    labels = [(name, s.dtype.name) for name, s in _components(element_spec) if s.dtype.name in dtypes]
    predicted = sorted(dtypes & outputs)
    if not labels or not predicted or {labels[0][1], predicted[0]} != dtypes:
        return None
    name, label_dtype = labels[0]
    output_dtype = predicted[0]
    return ValueError(
        f"the step combines the labels ({name} of the examples, {label_dtype}) with the model's output "
        f"({output_dtype}) in one '{match['op']}' op, and TensorFlow does not convert dtypes implicitly. Cast the "
        f"labels in the dataset: dataset.map(lambda x, y: (x, tf.cast(y, tf.{output_dtype}))) (or in the step: "
        f"tf.cast(y, prediction.dtype)). Integer labels are right for sparse class ids given to a crossentropy "
        f"loss, not for arithmetic with the predictions. (TensorFlow said: {match.group(0)})")
