"""Exact metrics across replicas and processes: merge the metric *states* (sums, counts), then compute.

Averaging per-rank averages is wrong whenever ranks see different numbers of examples; merging the
accumulators first is exact. Keras metrics keep their state in variables with an aggregation (almost
always ``sum``), which says how replicas' states combine.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from disttrain.backends.base import Backend


def _flat_local_states(backend: Backend, metrics: Iterable[keras.metrics.Metric]):
    """Yields ``(metric, variable, local value)``: each state summed over this process's replicas."""
    for metric in metrics:
        for variable in metric.variables:
            raw = getattr(variable, "value", variable)
            aggregation = getattr(variable, "aggregation", "sum")
            if aggregation in ("sum", "mean"):
                local = backend.local_sum(raw)
            else:  # none / only_first_replica: every replica holds the same value
                local = tf.convert_to_tensor(backend.local_values(raw)[0])
            yield metric, variable, aggregation, local


def merged_states(backend: Backend, metrics: Iterable[keras.metrics.Metric]) -> dict:
    """Returns ``{metric: [global state values]}``: every replica's state merged exactly.

    All processes must call this together (it communicates once, whatever the number of metrics).
    """
    rows = list(_flat_local_states(backend, metrics))
    if not rows:
        return {}
    flat = [tf.reshape(tf.cast(local, tf.float64), [-1]) for _, _, _, local in rows]
    sizes = [int(f.shape[0]) for f in flat]
    summed = np.asarray(backend.all_reduce(tf.concat(flat, 0), "sum"))
    first = None
    if any(aggregation not in ("sum", "mean") for _, _, aggregation, _ in rows):
        first = np.asarray(backend.broadcast(tf.concat(flat, 0), root=0))
    out: dict = {}
    offset = 0
    for (metric, variable, aggregation, local), n in zip(rows, sizes):
        if aggregation == "sum":
            value = summed[offset:offset + n]
        elif aggregation == "mean":
            value = summed[offset:offset + n] / backend.num_replicas
        else:
            value = first[offset:offset + n]
        out.setdefault(metric, []).append(
            tf.constant(value.reshape(local.shape), dtype=variable.dtype))
        offset += n
    return out


def merged_results(backend: Backend, metrics: Iterable[keras.metrics.Metric]) -> dict[str, float]:
    """Returns ``{metric.name: float}`` computed from the globally merged states.

    The metrics' own variables are left untouched (keep accumulating, or reset them yourself).
    """
    results = {}
    for metric, states in merged_states(backend, metrics).items():
        value = metric.stateless_result(states)
        results[metric.name] = float(np.asarray(value))
    return results


def reset(metrics: Iterable[keras.metrics.Metric]) -> None:
    for metric in metrics:
        metric.reset_state()


def as_list(metrics: Mapping[str, keras.metrics.Metric] | Iterable[keras.metrics.Metric] | None
            ) -> list[keras.metrics.Metric]:
    """Normalises ``metrics`` (list or ``{name: metric}``) to a list of uniquely named metrics.

    Raises:
      ValueError: If two metrics share a name.
    """
    if metrics is None:
        return []
    items = list(metrics.values()) if isinstance(metrics, Mapping) else list(metrics)
    names = [m.name for m in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"metric names must be unique, {dupes} repeat; pass name=... when creating them")
    return items
