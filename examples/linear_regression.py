"""Seed program (a): a Dense(1) layer learns y = 2x + 1 + noise with SGD(0.01) and an MSE loss.

Runs unchanged on every backend:
    python examples/linear_regression.py --backend single
    python examples/linear_regression.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/linear_regression.py
    disttrain launch --tf-config -n 2 examples/linear_regression.py
"""

from __future__ import annotations

import argparse

import disttrain as dt
import example_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_args.parser(__doc__.splitlines()[0], epochs=10)
    parser.add_argument("--examples", type=int, default=2048)
    return parser.parse_args(argv)


def make_data(examples: int, seed: int = 0):
    """y = 2x + 1 + N(0, 0.05^2), x ~ N(0, 1): the same examples on every process."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, 1)).astype("float32")
    y = (2.0 * x + 1.0 + rng.normal(scale=0.05, size=(examples, 1))).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y))


def run(args: argparse.Namespace, *, metrics=(), callbacks_fn=None) -> dict:
    """Builds the model inside the backend's scope and trains it; returns the history.

    ``metrics`` are Keras metrics or plain functions ``fn(y_true, y_pred)``; the trainer wraps the
    functions as Keras mean metrics (in ``trainer.metrics``), which the step updates.
    """
    backend = example_args.backend_of(args)
    import keras
    import tensorflow as tf

    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(learning_rate=0.01)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = model(x, training=True)
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - prediction), axis=-1))
        gradients = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, gradients, model.trainable_variables)
        for metric in trainer.metrics:  # exact over replicas: their states are merged, not their values
            metric.update_state(y, prediction)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend,
                         metrics=metrics, callbacks=callbacks_fn() if callbacks_fn else ())
    history = trainer.fit(make_data(args.examples), global_batch_size=args.global_batch, epochs=args.epochs,
                          shuffle_seed=1)
    kernel, bias = (float(v.numpy().ravel()[0]) for v in model.trainable_variables)
    if backend.is_chief:
        print(f"learned y = {kernel:.3f} x + {bias:.3f} on {backend.describe()}", flush=True)
    example_args.write_record(args, backend, {"history": history, "kernel": kernel, "bias": bias,
                                              "backend": backend.name, "replicas": backend.num_replicas})
    return history


if __name__ == "__main__":
    run(parse_args())
