"""One rank stalls (really sleeps) at global step K, inside its compiled step or in a callback; the
watchdog (DISTTRAIN_STEP_TIMEOUT, set by the test) must abort every rank, each saying where it was.

    stall.py --out DIR --stall-rank R --stall-step K --where step|callback [--sleep S]

Writes DIR/stall_time (when the sleep starts) and DIR/steps_rank<r> (steps finished, one line each).
"""

import os
import time

import worker_args

args, backend = worker_args.start(
    (("--stall-rank",), {"type": int, "default": 1}), (("--stall-step",), {"type": int, "default": 3}),
    (("--where",), {"choices": ["step", "callback"], "default": "step"}),
    (("--sleep",), {"type": float, "default": 600.0}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import disttrain as dt  # noqa: E402

calls = {"step": 0}


def stall_here():
    with open(os.path.join(args.out, "stall_time"), "w") as f:
        f.write(repr(time.time()))
    time.sleep(args.sleep)  # the stall: this rank makes no progress


def maybe_stall_in_step(features):
    """Runs inside the compiled step (tf.py_function, on this replica's batch) on every call."""
    calls["step"] += 1
    if args.where == "step" and backend.rank == args.stall_rank and calls["step"] == args.stall_step:
        stall_here()
    return np.float32(0.0)


class StallInCallback(dt.Callback):
    def on_step_logs(self, trainer, step, logs):
        with open(os.path.join(args.out, f"steps_rank{backend.rank}"), "a") as f:
            f.write(f"{step}\n")
        if args.where == "callback" and backend.rank == args.stall_rank and step == args.stall_step:
            stall_here()


x = np.random.default_rng(0).normal(size=(512, 4)).astype("float32")
data = tf.data.Dataset.from_tensor_slices((x, x[:, :1] * 2.0))
with backend.scope():
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.01)


def train_step(ctx, batch):
    features, target = batch
    zero = tf.ensure_shape(tf.py_function(maybe_stall_in_step, [features], tf.float32), [])
    with tf.GradientTape() as tape:
        prediction = model(features + zero)
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - prediction), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss


with open(os.path.join(args.out, "default_step_timeout"), "w") as f:  # the backend's own default (env aside)
    f.write(repr(backend.default_step_timeout))
trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                     callbacks=[StallInCallback()], log_every_steps=1)
trainer.fit(data, global_batch_size=16, epochs=1)
print(f"rank {backend.rank}: finished without a stall being caught", flush=True)
