"""P1: step time of disttrain's Trainer / a hand-written tf.function loop, one device, 1 thread.

    python bench/p1_step_time.py [--reps 5]

Like for like: the same model, initial weights, optimizer (Adam), data and batch; the hand-written
loop passes its iterator into its ``tf.function`` (``next`` inside the graph) and sums the loss as a
tensor, as the Trainer does; one epoch of ``steps`` steps per repetition (the Trainer's per-epoch work,
one all-reduce of the loss and metric states, is included), the variants interleaved.
K = steps per call: K = 16 is ``fit(steps_per_execution=16)`` against a hand-written loop that runs
16 steps per ``tf.function`` call (a ``tf.range`` loop, as disttrain's ``tf.while_loop``).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISTTRAIN_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import disttrain as dt  # noqa: E402

# name: (layer widths, batch, steps per repetition)
MODELS = {"tiny MLP 8-16-1": ([8, 16, 1], 64, 400),
          "3x1024 MLP 256-1024-1024-1024-10": ([256, 1024, 1024, 1024, 10], 256, 30)}


def build(widths, backend=None):
    import keras

    def make():
        keras.utils.set_random_seed(0)
        layers = [keras.Input(shape=(widths[0],))]
        layers += [keras.layers.Dense(w, activation="tanh") for w in widths[1:-1]] + [keras.layers.Dense(widths[-1])]
        model = keras.Sequential(layers)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        return model, optimizer

    if backend is None:
        return make()
    with backend.scope():
        return make()


def data(widths, batch, steps):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, widths[0])).astype("float32")
    y = rng.normal(size=(batch * steps, widths[-1])).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y))


def hand_written(widths, batch, steps, k):
    """A user's loop: batch + prefetch, iterator into the tf.function, ``k`` steps per call."""
    import tensorflow as tf

    model, optimizer = build(widths)
    batches = data(widths, batch, steps).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def one_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(y - model(x, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    @tf.function
    def call(iterator):
        total = tf.constant(0.0)
        for _ in tf.range(k) if k > 1 else range(1):
            total += one_step(*next(iterator))
        return total

    def epoch():
        iterator, total = iter(batches), tf.constant(0.0)
        for _ in range(steps // k):
            total += call(iterator)
        return float(total)

    return epoch


def with_disttrain(backend, widths, batch, steps, k):
    import tensorflow as tf

    model, optimizer = build(widths, backend)

    def train_step(ctx, b):
        x, y = b
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    dataset = data(widths, batch, steps)
    return lambda: trainer.fit(dataset, global_batch_size=batch, epochs=1, steps_per_execution=k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the steps per repetition")
    args = parser.parse_args(argv)
    backend = dt.get_backend("single")
    rows, times = [], {}
    for name, (widths, batch, steps) in MODELS.items():
        steps = max(16, int(steps * args.scale) // 16 * 16)
        variants = {"disttrain": with_disttrain(backend, widths, batch, steps, 1),
                    "hand": hand_written(widths, batch, steps, 1),
                    "disttrain16": with_disttrain(backend, widths, batch, steps, 16),
                    "hand16": hand_written(widths, batch, steps, 16)}
        per_step, ms = _common.epoch_times(variants, steps=steps, reps=args.reps)
        times[name] = per_step
        rows.append((f"P1 {name.split()[0]} K=1", f"disttrain / hand-written, {name}, batch {batch}",
                     _common.ratios(per_step["disttrain"], per_step["hand"]), "<= 1.03",
                     f"{ms['disttrain']:.3f} vs {ms['hand']:.3f} ms/step, {steps} steps a repetition"))
        rows.append((f"P1 {name.split()[0]} K=16", f"disttrain / hand-written, both 16 steps per call, {name}",
                     _common.ratios(per_step["disttrain16"], per_step["hand16"]), "<= 1.03",
                     f"{ms['disttrain16']:.3f} vs {ms['hand16']:.3f} ms/step"))
        rows.append((f"P1 {name.split()[0]} K=16/K=1", f"disttrain 16 steps per call / 1 step per call, {name}",
                     _common.ratios(per_step["disttrain16"], per_step["disttrain"]), None,
                     f"{ms['disttrain16']:.3f} vs {ms['disttrain']:.3f} ms/step (what steps_per_execution saves)"))
    lines = ["## P1: step time, disttrain / hand-written (one device, 1 thread)", "",
             f"Command: `{_common.command('p1_step_time.py', argv)}`. {args.reps} interleaved repetitions of one "
             "epoch each after a warm-up epoch; Adam; ratio per repetition pair. Load average: "
             f"{_common.load()}.", ""]
    lines += _common.ratio_table(rows) + [""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
