"""P6: process start to the end of the first training step, and peak memory: disttrain / hand-written.

    python bench/p6_startup.py [--reps 5]

Each repetition starts two fresh Python processes in turn (order rotating): one that trains a small
MLP for one step with ``disttrain`` (single device: ``get_backend``, ``Trainer``, ``fit``), one that
does the same with a hand-written ``tf.function`` step. Time = from just before the process is
started to when it has the first step's loss; memory = the process's peak resident set size
(``ru_maxrss``) when it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

DISTTRAIN = """
import disttrain as dt
backend = dt.get_backend("single")
import keras, numpy as np, tensorflow as tf
x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
with backend.scope():
    model = keras.Sequential([keras.Input(shape=(32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-3)
def step(ctx, batch):
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(model(batch, training=True)), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss
trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0)
loss = trainer.fit(tf.data.Dataset.from_tensor_slices(x), global_batch_size=64, steps_per_epoch=1)["loss"][0]
"""

HAND_WRITTEN = """
import keras, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
model = keras.Sequential([keras.Input(shape=(32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
optimizer = keras.optimizers.Adam(1e-3)
iterator = iter(tf.data.Dataset.from_tensor_slices(x).batch(64, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
@tf.function
def step(iterator):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(next(iterator), training=True)))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return loss
loss = float(step(iterator))
"""

FOOTER = """
import json, resource, sys, time
print(json.dumps({"done": time.time(), "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def start_to_first_step(code: str) -> tuple[float, float]:
    env = _common.worker_env()
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code + FOOTER], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["done"] - start, result["peak_kib"] / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    runs = _common.interleaved({"disttrain": lambda: start_to_first_step(DISTTRAIN),
                                "hand": lambda: start_to_first_step(HAND_WRITTEN)}, reps=args.reps)
    seconds = {k: [s for s, _ in v] for k, v in runs.items()}
    memory = {k: [m for _, m in v] for k, v in runs.items()}
    med = lambda v: statistics.median(v)  # noqa: E731
    rows = [("P6 start-up", "process start to first step done, disttrain / hand-written",
             _common.ratios(seconds["disttrain"], seconds["hand"]), "<= 1.1",
             f"{med(seconds['disttrain']):.2f} vs {med(seconds['hand']):.2f} s"),
            ("P6 memory", "peak resident memory, disttrain / hand-written",
             _common.ratios(memory["disttrain"], memory["hand"]), "<= 1.05",
             f"{med(memory['disttrain']):.0f} vs {med(memory['hand']):.0f} MiB")]
    lines = ["## P6: start-up to the first step and peak memory, disttrain / hand-written", "",
             f"Command: `{_common.command('p6_startup.py', argv)}`. A fresh process per measurement (1 thread), "
             f"MLP 32-64-1, one step of batch 64; {args.reps} interleaved pairs. Load average: {_common.load()}.", ""]
    lines += _common.ratio_table(rows)
    print("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
