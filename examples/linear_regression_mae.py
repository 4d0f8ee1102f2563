"""Seed program (b): the linear regression of linear_regression.py plus a custom mean-absolute-error
metric, reported each epoch from its exactly merged state (sum of |error| and count over all replicas).

    python examples/linear_regression_mae.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/linear_regression_mae.py
"""

from __future__ import annotations

import keras

from linear_regression import parse_args, run


class MeanAbsoluteError(keras.metrics.Metric):
    """A hand-written MAE: two sum-aggregated states, so replicas merge exactly."""

    def __init__(self, name: str = "mae", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        errors = keras.ops.abs(keras.ops.cast(y_true, "float32") - keras.ops.cast(y_pred, "float32"))
        self.total.assign_add(keras.ops.sum(errors))
        self.count.assign_add(keras.ops.cast(keras.ops.size(errors), "float32"))

    def result(self):
        return keras.ops.divide_no_nan(self.total, self.count)


if __name__ == "__main__":
    run(parse_args(), metrics_fn=lambda: [MeanAbsoluteError()])
