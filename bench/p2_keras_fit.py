"""P2: throughput of disttrain's Trainer / Keras ``fit``, each at its best steps_per_execution.

    python bench/p2_keras_fit.py [--reps 5]

One device and MirroredStrategy over 2 logical CPU devices, in one process (1 thread). The same
tiny MLP, data, batch and optimizer. Keras' best steps_per_execution is picked from 1, 8, 32 by one
timed epoch each; disttrain runs 1 step per call (``fit(steps_per_execution=K)`` is phase 2 of
issue 11). Then the two are timed in interleaved epochs; ratio = disttrain examples/s / Keras'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
import disttrain as dt  # noqa: E402
from disttrain.backends.mirrored import MirroredBackend  # noqa: E402
from disttrain.backends.single import SingleBackend  # noqa: E402

FEATURES, HIDDEN, BATCH, STEPS = 8, 16, 64, 256
KERAS_K = (1, 8, 32)
rng = np.random.default_rng(0)
X = rng.normal(size=(BATCH * STEPS, FEATURES)).astype("float32")
Y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape=(FEATURES,)), keras.layers.Dense(HIDDEN, activation="tanh"),
                             keras.layers.Dense(1)])


def keras_fit(strategy, k):
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=k)
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return lambda: model.fit(data, epochs=1, verbose=0)


def disttrain_fit(backend):
    with backend.scope():
        model, optimizer = make_model(), keras.optimizers.Adam(1e-3)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    return lambda: trainer.fit(data, global_batch_size=BATCH, epochs=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    settings = {"one device": SingleBackend(device="/cpu:0"),
                "Mirrored, 2 logical CPUs": MirroredBackend(devices=["/cpu:0", "/cpu:1"])}
    rows = []
    for setting, backend in settings.items():
        rate = lambda fn: BATCH * STEPS / _common.timed(fn)  # noqa: E731
        candidates = {k: keras_fit(backend.strategy, k) for k in KERAS_K}
        for fn in candidates.values():
            fn()  # warm-up: tracing
        best = max(KERAS_K, key=lambda k: statistics.median(rate(candidates[k]) for _ in range(2)))
        ours = disttrain_fit(backend)
        ours()
        rates = _common.interleaved({"disttrain": lambda: rate(ours), "keras": lambda: rate(candidates[best])},
                                    reps=args.reps)
        rows.append((f"P2 {setting.split(',')[0]}", f"examples/s, disttrain (K=1) / Keras fit (K={best}), {setting}",
                     _common.ratios(rates["disttrain"], rates["keras"]), ">= 1.0",
                     f"{statistics.median(rates['disttrain']):,.0f} vs {statistics.median(rates['keras']):,.0f} "
                     f"examples/s; Keras' best steps_per_execution of {KERAS_K}: {best}"))
    lines = ["## P2: throughput, disttrain / Keras fit at its best steps_per_execution", "",
             f"Command: `{_common.command('p2_keras_fit.py', argv)}`. MLP {FEATURES}-{HIDDEN}-1, Adam, batch {BATCH}, "
             f"{STEPS} steps an epoch, 1 thread; {args.reps} interleaved epochs after warm-up. disttrain runs 1 step "
             "per call until `fit(steps_per_execution=K)` lands (phase 2). Load average: "
             f"{_common.load()}.", ""]
    lines += _common.ratio_table(rows)
    print("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
