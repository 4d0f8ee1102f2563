"""A real NaN in ONE replica's data at global step 3 (example 20: with a global batch of 8 it is in the
last replica's slice of the third batch), trained with on_nonfinite = raise, skip and ignore in turn,
plus the references: the same data without that batch, and the first two steps alone.

Writes DIR/<case>_rank<r>.npz (weights) and DIR/nonfinite_rank<r>.json (messages, histories, counts).
"""

import json
import os
import time

import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import disttrain as dt  # noqa: E402

GB, BAD_STEP = 8, 3
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 3)).astype("float32")
y = (x @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")
x_bad = x.copy()
x_bad[(BAD_STEP - 1) * GB + GB - 1 - (GB // backend.num_replicas - 1)] = np.nan  # last replica's first example
keep = np.r_[0:(BAD_STEP - 1) * GB, BAD_STEP * GB:64]  # every example but the bad step's batch


def train(data, policy, **fit):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.01)

    def step(ctx, batch):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                         on_nonfinite=policy)
    result = {}
    started = time.monotonic()
    try:
        result["history"] = trainer.fit(tf.data.Dataset.from_tensor_slices(data), global_batch_size=GB, **fit)
    except dt.NonFiniteError as err:
        result.update(error=str(err), steps=list(err.steps), ranks=err.ranks)
    result["seconds"] = time.monotonic() - started
    result["iterations"] = int(optimizer.iterations.numpy())
    result["global_step"] = trainer.global_step
    return result, [v.numpy() for v in model.variables + optimizer.variables]


out = {}
for case, data, policy, fit in [("raise", (x_bad, y), "raise", {}), ("skip", (x_bad, y), "skip", {}),
                                 ("ignore", (x_bad, y), "ignore", {}),
                                 ("without_bad_batch", (x[keep], y[keep]), "raise", {}),
                                 ("first_steps", (x, y), "raise", {"steps_per_epoch": BAD_STEP - 1})]:
    out[case], weights = train(data, policy, **fit)
    np.savez(os.path.join(args.out, f"{case}_rank{backend.rank}.npz"), *weights)
out["raise_seconds"] = out["raise"]["seconds"]  # from fit's start to the error on every rank
with open(os.path.join(args.out, f"nonfinite_rank{backend.rank}.json"), "w") as f:
    json.dump(out, f)
print(f"rank {backend.rank}: done", flush=True)
