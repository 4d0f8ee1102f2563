"""Seed program (b): the linear regression of linear_regression.py plus a custom mean-absolute-error
metric, written as the seed writes it: a plain function ``mae(y_true, y_pred)``.

Given to ``Trainer(metrics=[mae])``, the function becomes a Keras mean metric (a sum of |error| and a
count) that the step updates; each epoch's value comes from the state merged over all replicas, so
it is the exact MAE on any number of replicas. (Returned from the step instead, ``mae(y, pred)``
would be summed over the replicas: doubled on two. See "What the step returns" in the README.)

    python examples/linear_regression_mae.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/linear_regression_mae.py
"""

from __future__ import annotations

import keras

from linear_regression import parse_args, run


def mae(y_true, y_pred):
    """Mean absolute error of each example (over its last axis)."""
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


if __name__ == "__main__":
    run(parse_args(), metrics=[mae])
