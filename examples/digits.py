"""The demo: a small classifier on the 8x8 handwritten digits of examples/data (1,797 real images,
no download), trained data-parallel with disttrain. Rank 0 alone prints per-epoch loss and validation
accuracy.

    horovodrun -np 2 python examples/digits.py                     # Horovod, 2 ranks
    python examples/digits.py --backend mirrored --cpu-replicas 2  # MirroredStrategy, 2 logical CPUs
    disttrain launch --tf-config -n 2 examples/digits.py           # MultiWorkerMirrored, 2 workers
"""

from __future__ import annotations

import argparse
import os
import sys

import disttrain as dt
import example_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_args.parser("disttrain demo: digits classifier", epochs=15)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--logdir", default="runs", help="TensorBoard logs go to LOGDIR/digits-<backend>")
    parser.add_argument("--progress", action="store_true", help="a progress bar instead of one line per epoch")
    parser.add_argument("--min-accuracy", type=float, default=0.9,
                        help="exit with status 1 if the final validation accuracy is below this")
    return parser.parse_args(argv)


def load_digits(validation: int = 360):
    """Features scaled to [0, 1], a fixed shuffled split: (train, validation) datasets of examples."""
    import numpy as np
    import tensorflow as tf
    from digits_data import load_digits as read_digits

    images, labels = read_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    x = (images[order] / 16.0).astype("float32")
    y = labels[order].astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x[validation:], y[validation:]))
    val = tf.data.Dataset.from_tensor_slices((x[:validation], y[:validation]))
    return train, val


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = example_args.backend_of(args)
    import keras
    import tensorflow as tf

    train, val = load_digits()
    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input(shape=(64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])
        optimizer = keras.optimizers.Adam(args.learning_rate)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        val_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def train_step(ctx, batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = ctx.average_loss(per_example(labels, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, grads, model.trainable_variables)
        accuracy.update_state(labels, logits)
        return loss

    def eval_step(ctx, batch):
        # evaluation pads the last global batch: the mask weighs padded examples 0, so metrics are exact
        images, labels, mask = batch
        logits = model(images, training=False)
        val_accuracy.update_state(labels, logits, sample_weight=mask)
        return ctx.average_loss(per_example(labels, logits), sample_weight=mask)

    # Created on every rank; only the chief writes (event files, metrics.jsonl) or prints.
    tensorboard = dt.TensorBoard(logdir=dt.summaries.run_dir(args.logdir, f"digits-{backend.name}"),
                                 histogram_every_steps=100, config=vars(args))
    metrics_log = dt.JsonLinesLogger(os.path.join(tensorboard.logdir, "metrics.jsonl"))
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=eval_step,
                         backend=backend, metrics=[accuracy], eval_metrics=[val_accuracy],
                         callbacks=[tensorboard, metrics_log], log_every_steps=10,
                         verbose=2 if args.progress else 1)
    if backend.is_chief:
        print(f"disttrain demo: digits on {backend.describe()}", flush=True)
    history = trainer.fit(train, global_batch_size=args.global_batch, epochs=args.epochs, shuffle_seed=0,
                          validation_data=val, validation_batch_size=120)
    final = history["val_accuracy"][-1]
    if backend.is_chief:
        verdict = "ok" if final >= args.min_accuracy else f"BELOW the required {args.min_accuracy:.0%}"
        print(f"final validation accuracy {final:.2%} ({verdict})", flush=True)
        print(f"view the curves: {tensorboard.command}", flush=True)
    example_args.write_record(args, backend, {"history": history})
    return 0 if final >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
