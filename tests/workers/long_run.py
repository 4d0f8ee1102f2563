"""Trains a small model for a very long time with checkpoints, until a signal stops it.

    long_run.py --out DIR

Rank 0 writes the global step to DIR/step after every step; checkpoints go to DIR/ckpt every 50 steps.
Used to SIGTERM a launcher (horovodrun, mpirun, disttrain launch) in the middle of a run: every worker
must stop after its next step, save and exit with code 42; the same command then resumes.
"""

import os

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True)))
with backend.scope():
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.01)


def train_step(ctx, batch):
    features, target = batch
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features)), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss


class StepFile(dt.Callback):
    def on_step_logs(self, trainer, step, logs):
        if backend.is_chief:
            with open(os.path.join(args.out, "step.tmp"), "w") as f:
                f.write(str(step))
            os.replace(os.path.join(args.out, "step.tmp"), os.path.join(args.out, "step"))


trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                     callbacks=[StepFile()], log_every_steps=1,
                     checkpointing=dt.Checkpointing(os.path.join(args.out, "ckpt"), every_steps=50))
trainer.fit(dataset, global_batch_size=16, epochs=100_000, shuffle_seed=0)
