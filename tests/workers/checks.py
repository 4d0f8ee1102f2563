"""Faults that must fail fast and say so, all in one launch: per-rank element specs that differ (multi-
process only), a variable updated on one rank only (the drift check), an empty dataset, int64 labels vs
float32 predictions. Writes DIR/checks_rank<r>.json: {case: {"error": "Type: message", "seconds": s}}.
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
from disttrain.input.pipelines import element_sharded  # noqa: E402

rng = np.random.default_rng(0)
X = rng.normal(size=(64, 3)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")
GB = 8


def make(**options):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.01)

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return model, dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0, **options)


class UpdateOnOneReplica(dt.Callback):
    """After global step 3, changes the first kernel on rank 1 (on a one-process run: on its second
    device copy) outside disttrain, as horovod.tensorflow.keras's optimizer on Keras 3 effectively does."""

    def __init__(self, model):
        self.model, self.when = model, None

    def on_step_logs(self, trainer, step, logs):
        if step != 3:
            return
        self.when = time.monotonic()
        kernel = self.model.layers[0].kernel
        if backend.size > 1:
            if backend.rank == 1:
                kernel.assign(kernel * 1.5)
        else:
            copies = backend.local_values(kernel.value)
            copies[-1].assign(copies[-1] * 1.5)


def attempt(fn):
    started = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded for the test
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


results = {}
if backend.size > 1:
    def labels_shaped_by_rank(ctx):
        """Labels of shape [4, 1] on rank 0 and [4] on rank 1: a rank-dependent dataset_fn bug."""
        y = Y if ctx.input_pipeline_id == 0 else Y[:, 0]
        return element_sharded(tf.data.Dataset.from_tensor_slices((X, y)), ctx)

    _, trainer = make()
    results["spec_mismatch"] = attempt(lambda: trainer.fit(labels_shaped_by_rank, global_batch_size=GB))

model, trainer = make(drift_check_every_steps=2, log_every_steps=1)
changer = UpdateOnOneReplica(model)
trainer.callbacks.append(changer)
results["drift"] = attempt(lambda: trainer.fit(tf.data.Dataset.from_tensor_slices((X, Y)), global_batch_size=GB))
results["drift"]["seconds_after_update"] = time.monotonic() - changer.when if changer.when else None

_, trainer = make()
empty = tf.data.Dataset.from_tensor_slices((X[:0], Y[:0]))
results["empty"] = attempt(lambda: trainer.fit(empty, global_batch_size=GB))

_, trainer = make()
int_labels = tf.data.Dataset.from_tensor_slices((X, np.round(Y).astype(np.int64)))
results["int_labels"] = attempt(lambda: trainer.fit(int_labels, global_batch_size=GB))

_, trainer = make(drift_check_every_steps=1)  # in sync: the check passes every step
results["in_sync"] = attempt(lambda: trainer.fit(tf.data.Dataset.from_tensor_slices((X, Y)), global_batch_size=GB))

with open(os.path.join(args.out, f"checks_rank{backend.rank}.json"), "w") as f:
    json.dump(results, f)
print(f"rank {backend.rank}: done", flush=True)
