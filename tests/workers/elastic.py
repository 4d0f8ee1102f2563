"""Checkpointed training for an elastic launch that goes 3 -> 2 -> 3 workers (tests/test_elastic.py).

    elastic.py --out DIR --ckpt CKPT --hosts-file FILE --add-line HOST:SLOTS [--kill-step K --add-step A]

First (unless DIR/reference.npz exists: in the first formation only) it trains the same model without
checkpoints and rank 0 saves those weights as the reference: an uninterrupted run on as many workers as
the first formation has. Then it trains with checkpoints every 3 steps and TensorBoard logs in DIR/tb:

* in a formation of 3 workers, before DIR/killed exists: rank 2 sends itself SIGKILL after global step
  --kill-step (a real kill -9 in the middle of an epoch; the others are then waiting in the next step's
  all-reduce);
* in a formation of 2 workers, before DIR/added exists: after global step --add-step rank 0 appends
  --add-line to --hosts-file (what the discovery script prints: a host appears) and waits (at most 120 s)
  until the launcher's SIGTERM reaches it, so the stop comes at a known step whatever the machine's load.

Every rank writes DIR/final_rank<r>.npz and DIR/steps_rank<r> at the end.
"""

import os
import signal
import time

import disttrain as dt
import worker_args

args, backend = worker_args.start(
    (("--ckpt",), {"required": True}), (("--hosts-file",), {"required": True}),
    (("--add-line",), {"required": True}), (("--kill-step",), {"type": int, "default": 8}),
    (("--add-step",), {"type": int, "default": 14}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, EXAMPLES, EPOCHS = 12, 72, 4  # divisible by 2 and 3 workers; 6 steps an epoch, 24 steps
rng = np.random.default_rng(3)
x = rng.normal(size=(EXAMPLES, 5)).astype("float32")
y = np.tanh(x @ rng.normal(size=(5, 2))).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y))


def marker(name):
    return os.path.join(args.out, name)


class Choreography(dt.Callback):
    """The kill and the new host, each once, at fixed global steps."""

    def on_step_logs(self, trainer, step, logs):
        if backend.size == 3 and step == args.kill_step and backend.rank == 2 and not os.path.exists(marker("killed")):
            open(marker("killed"), "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        if backend.size == 2 and step == args.add_step and backend.rank == 0 and not os.path.exists(marker("added")):
            open(marker("added"), "w").close()
            with open(args.hosts_file, "a") as f:
                f.write(args.add_line + "\n")
            watcher, deadline = trainer.checkpointing.watcher, time.monotonic() + 120
            while watcher.requested is None and time.monotonic() < deadline:
                time.sleep(0.05)


def train(checkpointing, callbacks=()):
    with backend.scope():
        keras.utils.set_random_seed(11)
        model = keras.Sequential([keras.Input(shape=(5,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(2)])
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)

    def train_step(ctx, batch):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                         callbacks=list(callbacks), checkpointing=checkpointing,
                         log_every_steps=1 if callbacks else 0)  # the reference needs no step logs
    trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=4)
    return model, optimizer


if not os.path.exists(marker("reference.npz")):
    model, _ = train(None)
    if backend.rank == 0:
        np.savez(marker("reference.npz"), *[v.numpy() for v in model.variables])
model, optimizer = train(dt.Checkpointing(args.ckpt, every_steps=3, keep=2),
                         [Choreography(), dt.TensorBoard(logdir=marker("tb"), announce=False)])
np.savez(marker(f"final_rank{backend.rank}.npz"), *[v.numpy() for v in model.variables])
with open(marker(f"steps_rank{backend.rank}"), "w") as f:
    f.write(f"{int(optimizer.iterations.numpy())} {backend.size}")
