"""Trains a model with ~16 MiB of weights for 8 steps on one device, saving a checkpoint at every step.

    big_checkpoints.py --out DIR --backend single

The checkpoints go to DIR/ckpt (keep=2); the final step count is written to DIR/steps. Used to kill -9
the process in the middle of a save (tests/test_checkpoint_faults.py).
"""

import os

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

WIDTH = 1024
x = np.random.default_rng(0).normal(size=(64, WIDTH)).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1]))
with backend.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(WIDTH,)), keras.layers.Dense(4 * WIDTH, use_bias=False),
                              keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(1e-4)


def train_step(ctx, batch):
    features, target = batch
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features)), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss


trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                     checkpointing=dt.Checkpointing(os.path.join(args.out, "ckpt"), every_steps=1, keep=2))
trainer.fit(dataset, global_batch_size=8, epochs=1, shuffle_seed=0)
with open(os.path.join(args.out, "steps"), "w") as f:
    f.write(str(int(optimizer.iterations.numpy())))
