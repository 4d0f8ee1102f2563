"""Trains a small model with LR rules under checkpointing; optionally preempts itself with a real SIGTERM.

    resume.py --out DIR --ckpt CKPT [--sigterm-rank R --sigterm-step K] [--reference]

With --reference it first trains the same model WITHOUT stopping (no checkpoint) and saves its weights as
reference_rank<r>.npz, then runs the checkpointed training in CKPT. --sigterm-rank/--sigterm-step make rank R
send itself SIGTERM after global step K (a real signal, delivered between steps): every rank must stop after
step K+1, save, and exit with code 42. Run again with the same CKPT to resume; the final weights are saved as
final_rank<r>.npz, with info_rank<r>.json (steps, history, LR timeline, the backend).
"""

import json
import os
import signal

import disttrain as dt
import worker_args

args, backend = worker_args.start(
    (("--ckpt",), {"required": True}), (("--sigterm-rank",), {"type": int, "default": None}),
    (("--sigterm-step",), {"type": int, "default": None}), (("--reference",), {"action": "store_true"}),
    (("--every-steps",), {"type": int, "default": 3}))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, EXAMPLES, EPOCHS = 32, 160, 6  # 5 steps an epoch, 30 steps
rng = np.random.default_rng(0)
x = rng.normal(size=(EXAMPLES, 4)).astype("float32")
y = (x @ rng.normal(size=(4, 1)) + 0.1 * rng.normal(size=(EXAMPLES, 1))).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y))


class SelfSignal(dt.Callback):
    """Rank R sends itself a real SIGTERM after global step K (between steps, via step logs every step)."""

    def on_step_logs(self, trainer, step, logs):
        if backend.rank == args.sigterm_rank and step == args.sigterm_step:
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

    # Rules that fire in the first epochs, before the stop: a loss-threshold cut and a plateau cut.
    controller = dt.lr.LRController(policies=[
        dt.lr.LinearScaling(replicas=True), dt.lr.Warmup(steps=4),
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


if args.reference:
    model, *_ = train(None)
    np.savez(os.path.join(args.out, f"reference_rank{backend.rank}.npz"), *[v.numpy() for v in model.variables])

callbacks = [SelfSignal()] if args.sigterm_rank is not None else []
model, optimizer, controller, history = train(dt.Checkpointing(args.ckpt, every_steps=args.every_steps, keep=2),
                                              callbacks)
np.savez(os.path.join(args.out, f"final_rank{backend.rank}.npz"), *[v.numpy() for v in model.variables])
with open(os.path.join(args.out, f"info_rank{backend.rank}.json"), "w") as f:
    json.dump({"backend": backend.name, "replicas": backend.num_replicas, "steps": int(optimizer.iterations.numpy()),
               "history": history, "lr": controller.learning_rate,
               "cuts": [int(r.multiplier.numpy() != 1.0) for r in controller.rules]}, f)
