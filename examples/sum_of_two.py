"""Seed program (d): a Dense(1) layer learns to add two integers.

100 training pairs of integers in [0, 9) with their sum as the target, ``Input(2) -> Dense(1)``,
Adam(1e-4), a sum-of-squared-errors loss, ONE example per replica per step (the global batch is the
number of replicas), a progress bar with the running mean training loss, then a test loop over 10
new pairs that prints the mean test loss. Runs unchanged on every backend:

    python examples/sum_of_two.py --backend single
    python examples/sum_of_two.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/sum_of_two.py
    disttrain launch --tf-config -n 2 examples/sum_of_two.py
"""

from __future__ import annotations

import argparse

import numpy as np

import disttrain as dt
import example_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_args.parser(__doc__.splitlines()[0], epochs=5, global_batch=None)
    parser.add_argument("--log-every-steps", type=int, default=10, help="progress bar updates")
    return parser.parse_args(argv)


def pairs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of integers in [0, 9) (as floats) and their sums: the same on every process."""
    x = np.random.default_rng(seed).integers(0, 9, size=(count, 2)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def sum_of_squared_errors(y_true, y_pred):
    """Per example: the sum over its outputs of the squared errors."""
    import tensorflow as tf

    return tf.reduce_sum(tf.square(y_true - y_pred), axis=-1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = example_args.backend_of(args)
    import keras
    import tensorflow as tf

    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(1e-4)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            # one example per replica: the mean over the global batch of each example's squared errors
            loss = ctx.average_loss(sum_of_squared_errors(y, model(x, training=True)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def test_step(ctx, batch):
        x, y, mask = batch  # the test loop pads a last partial batch; the mask weighs padding 0
        return ctx.average_loss(sum_of_squared_errors(y, model(x, training=False)), sample_weight=mask)

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=test_step,
                         backend=backend, verbose=2, log_every_steps=args.log_every_steps)
    replicas = backend.num_replicas
    history = trainer.fit(tf.data.Dataset.from_tensor_slices(pairs(100, seed=0)), global_batch_size=replicas,
                          epochs=args.epochs, shuffle_seed=0)
    x_test, y_test = pairs(10, seed=1)
    test_loss = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x_test, y_test)),
                                 global_batch_size=replicas)["loss"]
    kernel, bias = (v.numpy().ravel().tolist() for v in model.trainable_variables)
    if backend.is_chief:
        print(f"mean test loss over {len(x_test)} pairs: {test_loss:.4f} (on {backend.describe()})", flush=True)
    example_args.write_record(args, backend, {"history": history, "test_loss": test_loss, "kernel": kernel,
                                              "bias": bias, "replicas": replicas, "test_x": x_test.tolist(),
                                              "test_y": y_test.tolist()})
    return history


if __name__ == "__main__":
    main()
