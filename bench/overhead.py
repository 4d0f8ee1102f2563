"""Overhead of disttrain's Trainer against a hand-written GradientTape loop, on one device and on
MirroredStrategy over 2 logical CPU devices. Both run the same model, data and optimizer; one epoch per
repetition, the configurations interleaved, medians reported. Prints a Markdown section.

    python bench/overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import tensorflow as tf

# two logical CPU devices before the runtime starts (Mirrored needs them; the single device uses one)
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain.backends.mirrored import MirroredBackend  # noqa: E402
from disttrain.backends.single import SingleBackend  # noqa: E402

EXAMPLES, FEATURES, CLASSES, GLOBAL_BATCH = 24576, 256, 10, 256
rng = np.random.default_rng(0)
X = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
Y = rng.integers(0, CLASSES, size=EXAMPLES).astype("int32")
DATA = tf.data.Dataset.from_tensor_slices((X, Y))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape=(FEATURES,)), keras.layers.Dense(512, activation="relu"),
                             keras.layers.Dense(512, activation="relu"), keras.layers.Dense(CLASSES)])


def hand_written(strategy: tf.distribute.Strategy | None):
    """The loop a user writes by hand: plain TF on one device (``strategy=None``), or the TF
    custom-training tutorial's shape with a ``tf.distribute`` strategy."""
    scope = strategy.scope() if strategy else tf.init_scope()
    with scope:
        model, optimizer = make_model(), keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    batches = DATA.batch(GLOBAL_BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)  # as disttrain
    dataset = strategy.experimental_distribute_dataset(batches) if strategy else batches

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(LOSS(y, model(x, training=True)), global_batch_size=GLOBAL_BATCH)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    @tf.function
    def step(batch):
        if strategy is None:
            return replica_step(*batch)
        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    def epoch():
        total = 0.0
        for batch in dataset:
            total += step(batch)
        return float(total)

    return epoch


def with_disttrain(backend):
    with backend.scope():
        model, optimizer = make_model(), keras.optimizers.Adam(1e-3)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(LOSS(y, model(x, training=True)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    return lambda: trainer.fit(DATA, global_batch_size=GLOBAL_BATCH, epochs=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    single = SingleBackend(device="/cpu:0")
    mirrored = MirroredBackend(devices=["/cpu:0", "/cpu:1"])
    configs = {
        ("one device", "hand-written"): hand_written(None),
        ("one device", "disttrain"): with_disttrain(single),
        ("Mirrored, 2 logical CPUs", "hand-written"): hand_written(mirrored.strategy),
        ("Mirrored, 2 logical CPUs", "disttrain"): with_disttrain(mirrored),
    }
    times = {key: [] for key in configs}
    for fn in configs.values():  # warm-up: tracing
        fn()
    for _ in range(args.repeats):
        for key, fn in configs.items():  # interleaved
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    steps = EXAMPLES // GLOBAL_BATCH
    print("## Trainer overhead vs a hand-written loop\n")
    print(f"Command: `python bench/overhead.py --repeats {args.repeats}`. One epoch = {steps} steps of global "
          f"batch {GLOBAL_BATCH} (MLP {FEATURES}-512-512-{CLASSES}, Adam); medians of {args.repeats} "
          "interleaved repetitions after a warm-up epoch. Hand-written: a plain tf.function loop on one "
          "device; on Mirrored, the TF tutorial's experimental_distribute_dataset + strategy.run loop. "
          "Ratio = disttrain / hand-written (1.00 = no overhead; goal <= 1.05).\n")
    print("| setting | hand-written s/epoch | disttrain s/epoch | ratio |")
    print("|---|---|---|---|")
    for setting in ("one device", "Mirrored, 2 logical CPUs"):
        base = statistics.median(times[(setting, "hand-written")])
        ours = statistics.median(times[(setting, "disttrain")])
        print(f"| {setting} | {base:.3f} | {ours:.3f} | {ours / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
