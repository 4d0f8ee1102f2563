"""Trains a small model with LR rules under checkpointing, stops it with a real SIGTERM, or resumes it.

    resume.py --out DIR --stop CKPT --sigterm-rank R --sigterm-step K
        trains the model WITHOUT checkpoints (the uninterrupted reference: reference_rank<r>.npz/.json), then
        again with checkpoints in CKPT, and rank R sends itself SIGTERM after global step K (a real signal,
        between steps): every rank must stop after step K+1, save, and exit with code 42 (also when rank R
        gets a second SIGTERM while it ends).
    resume.py --out DIR --resume NAME=CKPT [--resume NAME2=CKPT2 ...]
        for each: a fresh model trained with Checkpointing(CKPT), i.e. resumed from CKPT's latest
        checkpoint, possibly written by another backend; writes final_NAME_rank<r>.npz and info_NAME_rank<r>.json.
"""

import json
import os
import signal
import time

import disttrain as dt
import worker_args

args, backend = worker_args.start(
    (("--stop",), {"default": None}), (("--sigterm-rank",), {"type": int, "default": None}),
    (("--sigterm-step",), {"type": int, "default": None}), (("--resume",), {"action": "append", "default": []}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, EXAMPLES, EPOCHS = 32, 160, 6  # 5 steps an epoch, 30 steps
rng = np.random.default_rng(0)
x = rng.normal(size=(EXAMPLES, 4)).astype("float32")
y = (x @ rng.normal(size=(4, 1)) + 0.1 * rng.normal(size=(EXAMPLES, 1))).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y))


class SelfSignal(dt.Callback):
    """Rank R sends itself a real SIGTERM after global step K (between steps, via step logs every step), and
    another one while the preempted fit ends (as a launcher that signals twice): the exit code stays 42."""

    def on_step_logs(self, trainer, step, logs):
        if backend.rank == args.sigterm_rank and step == args.sigterm_step:
            with open(os.path.join(args.out, "signal_time"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, logs):
        if backend.rank == args.sigterm_rank:
            os.kill(os.getpid(), signal.SIGTERM)


def build():
    with backend.scope():
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)
        mae = keras.metrics.MeanAbsoluteError(name="mae")

    def train_step(ctx, batch):
        features, target = batch
        with tf.GradientTape() as tape:
            prediction = model(features, training=True)
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - prediction), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        mae.update_state(target, prediction)
        return loss

    # Rules that fire in the first epochs, before the stop: a loss-threshold cut and a plateau cut. The
    # scaling is by batch (the same on every world size, so a resume on other replicas keeps the LR).
    controller = dt.lr.LRController(policies=[
        dt.lr.LinearScaling(reference_batch_size=16), dt.lr.Warmup(steps=4),
        dt.lr.LossThresholdCut(thresholds=[2.0, 0.5], factor=0.5),
        dt.lr.ReduceOnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)])
    return model, optimizer, mae, train_step, controller


def train(checkpointing, callbacks=()):
    model, optimizer, mae, train_step, controller = build()
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, metrics=[mae],
                         callbacks=[controller, *callbacks], verbose=0, checkpointing=checkpointing,
                         log_every_steps=1 if callbacks else None)
    history = trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=3)
    return model, optimizer, controller, history


def save(name, model, optimizer, controller, history):
    np.savez(os.path.join(args.out, f"{name}_rank{backend.rank}.npz"), *[v.numpy() for v in model.variables])
    with open(os.path.join(args.out, f"{name}_rank{backend.rank}.json"), "w") as f:
        json.dump({"backend": backend.name, "replicas": backend.num_replicas, "history": history,
                   "steps": int(optimizer.iterations.numpy()), "lr": controller.learning_rate}, f)


def checkpointing(directory):
    return dt.Checkpointing(directory, every_steps=3, keep=2)


if args.stop:
    save("reference", *train(None))
    train(checkpointing(args.stop), [SelfSignal()])  # exits with code 42
    raise AssertionError("the preempted run went on to the end")
for item in args.resume:
    name, directory = item.split("=", 1)
    save(f"final_{name}", *train(checkpointing(directory)))
