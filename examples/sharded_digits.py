"""Sharded TFRecord input: train a classifier on the 8x8 digits of examples/data read from shard files.

Writes the digits into TFRecord shards (``disttrain.shards.write_shards``), trains with file sharding
(each rank reads its own files) and evaluates exactly with pad-and-mask. Runs unchanged on every backend:
    python examples/sharded_digits.py --backend single
    python examples/sharded_digits.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/sharded_digits.py
    disttrain launch --tf-config -n 2 examples/sharded_digits.py
"""

from __future__ import annotations

import argparse
import os
import tempfile

import disttrain as dt
import example_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_args.parser(__doc__.splitlines()[0], epochs=5)
    parser.add_argument("--shards", type=int, default=8, help="TFRecord files per split")
    parser.add_argument("--data-dir", default=None, help="where to write the shards (default: a temp dir)")
    return parser.parse_args(argv)


def write_digits(directory: str, shards: int, backend) -> tuple[list[str], list[str]]:
    """Rank 0 writes train/test shards; the others wait for it (a barrier) and list the files."""
    import numpy as np
    import tensorflow as tf
    from digits_data import load_digits

    train_dir, test_dir = os.path.join(directory, "train"), os.path.join(directory, "test")
    if backend.is_chief:
        images, labels = load_digits()
        x = (images / 16.0).astype("float32")
        y = labels
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
        split = 1500  # 297 test examples: not a multiple of the batch, so evaluation pads
        dt.shards.write_shards(tf.data.Dataset.from_tensor_slices((x[:split], y[:split])), train_dir, num_shards=shards)
        dt.shards.write_shards(tf.data.Dataset.from_tensor_slices((x[split:], y[split:])), test_dir, num_shards=shards)
    backend.barrier()
    return dt.shards.list_shards(train_dir), dt.shards.list_shards(test_dir)


def run(args: argparse.Namespace) -> dict:
    backend = example_args.backend_of(args)
    import keras
    import tensorflow as tf

    from disttrain import data

    directory = args.data_dir or os.path.join(tempfile.gettempdir(), "disttrain_digits_shards")
    train_files, test_files = write_digits(directory, args.shards, backend)
    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10)])
        optimizer = keras.optimizers.Adam(1e-2)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        val_loss = keras.metrics.Mean(name="loss_mean")
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(xent(y, model(x, training=True)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def eval_step(ctx, batch):
        x, y, mask = batch  # evaluation pads the last batch: mask is 0 for padding
        logits = model(x)
        per_example = xent(y, logits)
        accuracy.update_state(y, logits, sample_weight=mask)
        val_loss.update_state(per_example, sample_weight=mask)
        return ctx.average_loss(per_example, sample_weight=mask)

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=eval_step,
                         eval_metrics=[accuracy, val_loss], backend=backend)
    history = trainer.fit(data.from_files(train_files), global_batch_size=args.global_batch, epochs=args.epochs,
                          shuffle_seed=0, validation_data=data.from_files(test_files))
    example_args.write_record(args, backend, history)
    return history


if __name__ == "__main__":
    run(parse_args())
