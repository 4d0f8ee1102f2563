"""A long, slow training run for tests/test_network_faults.py: the test cuts the network between the two
processes (the veth link between their namespaces goes down) while they train, and every process must end
with disttrain's CollectiveError naming the backend, the step and the unreachable peer, in bounded time.

    partition.py --out DIR [--step-seconds S] [--examples N]   (N / 16 steps)

Each rank appends every finished global step to DIR/steps_rank<r> (one line each, flushed at once); the test
waits for a few before it cuts the link. Each rank writes DIR/error_rank<r>.json with the error it ended with.
"""

import json
import os
import time

import worker_args

args, backend = worker_args.start((("--step-seconds",), {"type": float, "default": 0.2}),
                                  (("--examples",), {"type": int, "default": 4096}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import disttrain as dt  # noqa: E402


def slow(features):
    time.sleep(args.step_seconds)  # a step of a real model takes a while; so the cut falls mid-run
    return np.float32(0.0)


class StepsToFile(dt.Callback):
    def on_step_logs(self, trainer, step, logs):
        with open(os.path.join(args.out, f"steps_rank{backend.rank}"), "a") as f:
            f.write(f"{step}\n")


x = np.random.default_rng(0).normal(size=(args.examples, 4)).astype("float32")
data = tf.data.Dataset.from_tensor_slices((x, x[:, :1] * 2.0))
with backend.scope():
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.01)


def train_step(ctx, batch):
    features, target = batch
    zero = tf.ensure_shape(tf.py_function(slow, [features], tf.float32), [])
    with tf.GradientTape() as tape:
        prediction = model(features + zero)
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - prediction), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss


trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                     callbacks=[StepsToFile()], log_every_steps=1)
try:
    trainer.fit(data, global_batch_size=16, epochs=1)
except dt.CollectiveError as err:
    with open(os.path.join(args.out, f"error_rank{backend.rank}.json"), "w") as f:
        json.dump({"message": str(err), "backend": err.backend, "global_step": err.global_step,
                   "epoch": err.epoch, "epoch_step": err.epoch_step, "peers": list(err.peers),
                   "time": time.time()}, f)
    raise
print(f"rank {backend.rank}: finished although the network was cut", flush=True)
