"""Exact metrics across replicas and processes: merge the metric *states* (sums, counts), then compute.

Averaging per-rank averages is wrong whenever ranks see different numbers of examples (or different
sample weights); merging the accumulators first is exact. Keras metrics keep their state in
variables with an aggregation (almost always ``sum``), which says how replicas' states combine:

  * ``sum``: the global state is the sum over every replica;
  * ``mean``: the sum over every replica divided by the number of replicas;
  * ``none`` / ``only_first_replica``: every replica holds the same value; the chief's first
    replica's value is used.

All three are carried by ONE all-reduce (sum) of a flat float64 vector: for the last kind only the
chief contributes a non-zero value, so the sum is the chief's value. The state vector can be packed
together with other numbers (the trainer appends its running loss totals) so that a logging step
costs exactly one collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Any, Callable, ContextManager, Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from disttrain.backends.base import Backend

#: The public part (``dt.metrics.*``); the rest serves the trainer's exact merging.
__all__ = ["from_function", "merged_results", "merged_states", "local_results"]

_SUMMED = ("sum", "mean")
_FROM_FUNCTIONS: "weakref.WeakSet" = weakref.WeakSet()  # metrics made by from_function


@dataclasses.dataclass(frozen=True)
class _Slot:
    metric: keras.metrics.Metric
    aggregation: str
    shape: tuple
    dtype: Any
    size: int


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where each metric variable sits in a packed state vector (from :func:`pack_local_states`)."""

    slots: tuple
    size: int


def _aggregation(variable: Any) -> str:
    aggregation = getattr(variable, "aggregation", "sum")
    aggregation = getattr(aggregation, "name", aggregation)  # a tf.VariableAggregation enum
    aggregation = str(aggregation or "none").lower()
    return {"only_first_replica": "first", "none": "first"}.get(aggregation, aggregation)


def pack_local_states(backend: Backend, metrics: Iterable[keras.metrics.Metric]
                      ) -> tuple[tf.Tensor, StateLayout]:
    """This process's contribution to the global metric states, as one flat float64 vector.

    ``sum`` and ``mean`` states are summed over this process's replicas; ``first`` states
    (aggregation ``none``) contribute the first replica's value on the chief and zeros elsewhere. Sum
    the vector over all processes (``backend.all_reduce(vector, "sum")``) and pass the result to
    :func:`results_from_vector`. No communication happens here.

    Args:
      backend: The active backend.
      metrics: Keras metrics (possibly holding sub-metrics).

    Returns:
      ``(vector, layout)``; ``vector`` has ``layout.size`` elements (0 when there are no states).
    """
    flat, slots = [], []
    for metric in metrics:
        for variable in metric.variables:
            raw = getattr(variable, "value", variable)
            aggregation = _aggregation(variable)
            if aggregation in _SUMMED:
                local = backend.local_sum(raw)
            else:
                local = tf.convert_to_tensor(backend.local_values(raw)[0])
                if not backend.is_chief:
                    local = tf.zeros_like(local)
            local = tf.cast(local, tf.float64)
            n = int(np.prod(local.shape.as_list(), dtype=np.int64))
            flat.append(tf.reshape(local, [-1]))
            slots.append(_Slot(metric=metric, aggregation=aggregation, shape=tuple(local.shape.as_list()),
                               dtype=variable.dtype, size=n))
    size = sum(s.size for s in slots)
    vector = tf.concat(flat, 0) if flat else tf.zeros([0], tf.float64)
    return vector, StateLayout(slots=tuple(slots), size=size)


def states_from_vector(backend: Backend, layout: StateLayout, summed: Any) -> dict:
    """``{metric: [global state tensors]}`` from the all-reduced vector of :func:`pack_local_states`.

    Works eagerly and inside ``tf.function`` (``summed`` may be a numpy array or a tensor).

    Raises:
      ValueError: If ``summed`` does not have the layout's size.
    """
    summed = tf.reshape(tf.cast(summed, tf.float64), [-1])
    if summed.shape[0] != layout.size:
        raise ValueError(f"the reduced state vector has {summed.shape[0]} values, the layout expects {layout.size}")
    out: dict = {}
    offset = 0
    for slot in layout.slots:
        value = summed[offset:offset + slot.size]
        if slot.aggregation == "mean":
            value = value / backend.num_replicas
        dtype = tf.as_dtype(slot.dtype)
        if dtype.is_integer or dtype.is_bool:
            value = tf.round(value)
        out.setdefault(slot.metric, []).append(tf.cast(tf.reshape(value, slot.shape), dtype))
        offset += slot.size
    return out


def result_items(name: str, value: Any) -> dict[str, float]:
    """Flattens one metric result to ``{name: float}``.

    A scalar stays ``{name: v}``; a vector (e.g. per-class F1, several thresholds) becomes
    ``{name_0: v0, name_1: v1, ...}``; a dict result becomes ``{name_key: v}``.
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(result_items(f"{name}_{key}", item))
        return out
    array = np.asarray(value, dtype=np.float64)
    if array.size == 1:
        return {name: float(array.reshape(()))}
    return {f"{name}_{i}": float(v) for i, v in enumerate(array.reshape(-1))}


def result_tensors(backend: Backend, layout: StateLayout, summed: Any) -> dict[str, Any]:
    """``{metric name: result}`` (tensors) from the merged states; usable inside ``tf.function``.

    The metrics' own variables are left untouched.
    """
    return {metric.name: metric.stateless_result(states)
            for metric, states in states_from_vector(backend, layout, summed).items()}


def results_from_vector(backend: Backend, layout: StateLayout, summed: Any) -> dict[str, float]:
    """``{metric name: float}`` computed with ``metric.stateless_result`` from the merged states.

    The metrics' own variables are left untouched. Non-scalar results are flattened by
    :func:`result_items`. Warns like :func:`warn_never_updated`.
    """
    warn_never_updated(backend, layout, summed)
    return flat_results(result_tensors(backend, layout, summed))


def warn_never_updated(backend: Backend, layout: StateLayout, summed: Any) -> None:
    """Warns (on the chief) about each :func:`from_function` metric whose merged count in ``summed``
    (the all-reduced vector of :func:`pack_local_states`) is 0: no step updated it, and its 0 would
    otherwise pass for a result."""
    if not backend.is_chief:
        return
    summed = np.asarray(summed, np.float64).reshape(-1)
    offset, seen = 0, {}
    for slot in layout.slots:
        index = seen[slot.metric] = seen.get(slot.metric, -1) + 1  # the slot's place among its metric's variables
        value = summed[offset:offset + slot.size]
        offset += slot.size
        if slot.metric in _FROM_FUNCTIONS and "count" in slot.metric.variables[index].name and not value.any():
            warnings.warn(f"metric {slot.metric.name!r} (a plain function) was never updated, so it reads 0: call "
                          "its update_state(y_true, y_pred) in the step (it is in trainer.metrics or "
                          "trainer.eval_metrics)", stacklevel=2)


def flat_results(results: Mapping[str, Any]) -> dict[str, float]:
    """Flattens ``{metric name: result}`` to floats with :func:`result_items`."""
    out: dict[str, float] = {}
    for name, value in results.items():
        out.update(result_items(name, tf.nest.map_structure(np.asarray, value)))
    return out


def merged_states(backend: Backend, metrics: Iterable[keras.metrics.Metric]) -> dict:
    """Returns ``{metric: [global state values]}``: every replica's state merged exactly.

    All processes must call this together (it communicates once, whatever the number of metrics).

    Args:
      backend: The run's backend.
      metrics: Keras metrics created in its scope.
    """
    vector, layout = pack_local_states(backend, metrics)
    if not layout.slots:
        return {}
    return states_from_vector(backend, layout, backend.all_reduce(vector, "sum"))


def merged_results(backend: Backend, metrics: Iterable[keras.metrics.Metric]) -> dict[str, float]:
    """Returns ``{metric.name: float}`` computed from the globally merged states (one all-reduce).

    All processes must call this together. The metrics' own variables are left untouched (keep
    accumulating, or reset them yourself). Non-scalar results are flattened by :func:`result_items`.

    Args:
      backend: The run's backend.
      metrics: Keras metrics created in its scope.
    """
    vector, layout = pack_local_states(backend, metrics)
    if not layout.slots:
        return {}
    return results_from_vector(backend, layout, backend.all_reduce(vector, "sum"))


def local_results(backend: Backend, metrics: Iterable[keras.metrics.Metric]) -> dict[str, float]:
    """The results ``{metric.name: float}`` from THIS process's replicas only (no communication).

    For diagnostics and tests: the per-rank values whose average is NOT the global metric.

    Args:
      backend: The run's backend.
      metrics: Keras metrics created in its scope.
    """
    results: dict[str, float] = {}
    for metric in metrics:
        states = []
        for variable in metric.variables:
            raw = getattr(variable, "value", variable)
            if _aggregation(variable) in _SUMMED:
                local = backend.local_sum(raw)
                if _aggregation(variable) == "mean":
                    local = local / tf.cast(backend.local_replicas, local.dtype)
            else:
                local = tf.convert_to_tensor(backend.local_values(raw)[0])
            states.append(tf.cast(local, variable.dtype))
        results.update(result_items(metric.name, metric.stateless_result(states)))
    return results


def reset(metrics: Iterable[keras.metrics.Metric]) -> None:
    for metric in metrics:
        metric.reset_state()


def from_function(fn: Callable, *, name: str | None = None) -> keras.metrics.Metric:
    """A plain metric function ``fn(y_true, y_pred)`` as a Keras mean metric (``MeanMetricWrapper``).

    Create it inside ``backend.scope()`` and update it in the step with ``update_state(y_true, y_pred,
    sample_weight=...)`` like any Keras metric: its state (a sum and a count) is merged exactly over
    every replica and process. For exact means, let ``fn`` return one value per example (reduce over
    the last axis only); a ``fn`` returning one number per batch is averaged over batches.

    Args:
      fn: The function.
      name: The metric's name (default ``fn.__name__``).

    Raises:
      ValueError: If ``fn`` has no usable name (a lambda) and none is given.
    """
    name = name or getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        raise ValueError(f"the metric function {fn!r} needs a name: use a def, or pass "
                         "disttrain.metrics.from_function(fn, name=...) instead")
    metric = keras.metrics.MeanMetricWrapper(fn, name=name)
    _FROM_FUNCTIONS.add(metric)
    return metric


def as_list(metrics: Mapping[str, Any] | Iterable[Any] | None, *,
            scope: Callable[[], ContextManager] | None = None) -> list[keras.metrics.Metric]:
    """Normalises ``metrics`` (list or ``{name: metric}``) to a list of uniquely named Keras metrics.

    Plain functions ``fn(y_true, y_pred)`` become :func:`from_function` metrics, created inside
    ``scope()`` (the backend's scope), in the same place of the list; a dict's key names them.

    Raises:
      ValueError: If two metrics share a name, or a lambda has no name.
      TypeError: For an entry that is neither a Keras metric nor a function.
    """
    if metrics is None:
        return []
    pairs = list(metrics.items()) if isinstance(metrics, Mapping) else [(None, m) for m in metrics]
    items = []
    for key, metric in pairs:
        if not isinstance(metric, keras.metrics.Metric):
            if not callable(metric):
                raise TypeError(f"metrics must be keras.metrics.Metric objects or functions fn(y_true, y_pred), "
                                f"got {metric!r}")
            with scope() if scope is not None else contextlib.nullcontext():
                metric = from_function(metric, name=key)
        items.append(metric)
    names = [m.name for m in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"metric names must be unique, {dupes} repeat; pass name=... when creating them")
    return items
