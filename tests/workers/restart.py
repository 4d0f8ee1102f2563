"""Checkpointed training whose rank --kill-rank kills itself with SIGKILL at step --kill-step, once.

    restart.py --out DIR --ckpt CKPT [--kill-rank R --kill-step K]

First (unless DIR/reference_rank<r>.npz exists) it trains the same model without checkpoints and saves
those weights as the reference. Then it trains with checkpoints every 2 steps; on the first attempt
(no DIR/killed yet) rank R sends itself SIGKILL after global step K: a real kill -9, no chance to save.
Under `disttrain launch --max-restarts 1` the launcher stops the other workers and starts all of them
again; they resume from the last checkpoint. The final weights go to DIR/final_rank<r>.npz.
"""

import json
import os
import signal

import disttrain as dt
import worker_args

args, backend = worker_args.start(
    (("--ckpt",), {"required": True}), (("--kill-rank",), {"type": int, "default": None}),
    (("--kill-step",), {"type": int, "default": 7}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, EXAMPLES, EPOCHS = 16, 64, 4  # 4 steps an epoch, 16 steps
rng = np.random.default_rng(1)
x = rng.normal(size=(EXAMPLES, 4)).astype("float32")
y = (x @ rng.normal(size=(4, 1))).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y))
killed_marker = os.path.join(args.out, "killed")


class KillOnce(dt.Callback):
    def on_step_logs(self, trainer, step, logs):
        if backend.rank == args.kill_rank and step == args.kill_step and not os.path.exists(killed_marker):
            open(killed_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def train(checkpointing, callbacks=()):
    with backend.scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.02)

    def train_step(ctx, batch):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                         callbacks=list(callbacks), checkpointing=checkpointing, log_every_steps=1)
    trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=5)
    return model, optimizer


reference = os.path.join(args.out, f"reference_rank{backend.rank}.npz")
if not os.path.exists(reference):
    model, _ = train(None)
    np.savez(reference, *[v.numpy() for v in model.variables])
model, optimizer = train(dt.Checkpointing(args.ckpt, every_steps=2, keep=2), [KillOnce()])
np.savez(os.path.join(args.out, f"final_rank{backend.rank}.npz"), *[v.numpy() for v in model.variables])
with open(os.path.join(args.out, f"info_rank{backend.rank}.json"), "w") as f:
    json.dump({"backend": backend.name, "steps": int(optimizer.iterations.numpy())}, f)
