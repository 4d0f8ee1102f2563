"""Trains with every LR policy on purpose-made rank-dependent data and records each rank's LR timeline.

Replica r (over all processes) sees targets y = 2x + 1 + NOISE[r] * N(0, 1): the replicas' local losses
differ a lot, so an LR decision taken on a local loss would differ from one taken on the global loss.
Three configurations run in one launch (float LR, schedule-valued LR, controller schedule), each with
a fresh model; the per-rank results go to ``<out>/rank<r>.json``.
"""

import json
import os

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lr_configs import EPOCHS, PER_REPLICA_BATCH, STEPS, make_controller, make_optimizer, replica_data  # noqa: E402

R = backend.num_replicas
GLOBAL_BATCH = PER_REPLICA_BATCH * R


def dataset_fn(context):
    """Per-replica batches of this pipeline's replicas: replica r's own (rank-dependent) examples."""
    first = context.input_pipeline_id * context.replicas_per_pipeline
    xs, ys = [], []
    for j in range(context.replicas_per_pipeline):
        x, y = replica_data(first + j)
        xs.append(x.reshape(STEPS, PER_REPLICA_BATCH, 1))
        ys.append(y.reshape(STEPS, PER_REPLICA_BATCH, 1))
    x = np.stack(xs, 1).reshape(-1, PER_REPLICA_BATCH, 1)  # step-major: the replicas of step k in a row
    y = np.stack(ys, 1).reshape(-1, PER_REPLICA_BATCH, 1)
    return tf.data.Dataset.from_tensor_slices((x, y))


class Recorder(dt.Callback):
    """Records, per epoch, the LR of every step (from the controller) before the epoch runs."""

    def __init__(self, controller):
        self.controller, self.step_lrs = controller, []

    def on_epoch_begin(self, trainer, epoch):
        first = int(np.asarray(trainer.optimizer.iterations))
        self.step_lrs.append([self.controller.lr_at(s) for s in range(first, first + STEPS)])


out = {"backend": backend.name, "rank": backend.rank, "size": backend.size, "replicas": R, "configs": {}}
for name in ("float", "schedule", "cosine"):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1)])
        optimizer = make_optimizer(name)
        # one controller is created inside the scope, to check that works too
        controller = make_controller(name) if name == "schedule" else None
    controller = controller or make_controller(name)
    recorder = Recorder(controller)

    def train_step(ctx, batch, model=model, optimizer=optimizer):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
        grads = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, grads, model.trainable_variables)
        # this replica's share of the loss, labelled by its global replica index (diagnostic only)
        replica = backend.rank * backend.local_replicas + \
            tf.distribute.get_replica_context().replica_id_in_sync_group % backend.local_replicas
        return {"loss": loss, **{f"share_r{r}": tf.where(tf.equal(replica, r), loss, 0.0) for r in range(2)}}

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend,
                         callbacks=[controller, recorder], verbose=0)
    history = trainer.fit(dataset_fn, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS)
    out["configs"][name] = {
        "history": history, "timeline": controller.timeline, "step_lrs": recorder.step_lrs,
        "steps": int(np.asarray(optimizer.iterations)),
        "state": {v.name + str(i): float(np.asarray(v)) for i, v in enumerate(controller.variables)},
        "weights": [v.numpy().ravel().tolist() for v in model.trainable_variables],
    }

# The probe: loss = mean(w * 1) has gradient exactly 1, so SGD moves w by exactly -lr every step and the
# weight after each epoch reveals the LRs the compiled step really applied (on every backend).
with backend.scope():
    probe = keras.Sequential([keras.Input(shape=(1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    probe_optimizer = make_optimizer("float")
probe_controller = make_controller("float")
probe_recorder = Recorder(probe_controller)


class Weights(dt.Callback):
    def __init__(self):
        self.values = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.values.append(float(probe.trainable_variables[0].numpy().ravel()[0]))


def probe_step(ctx, batch):
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reshape(probe(batch, training=True), [-1]))
    ctx.apply_gradients(probe_optimizer, tape.gradient(loss, probe.trainable_variables), probe.trainable_variables)
    return loss


weights = Weights()
trainer = dt.Trainer(model=probe, optimizer=probe_optimizer, train_step=probe_step, backend=backend,
                     callbacks=[probe_controller, probe_recorder, weights], verbose=0)
history = trainer.fit(tf.data.Dataset.from_tensor_slices(np.ones((STEPS * GLOBAL_BATCH, 1), "float32")),
                      global_batch_size=GLOBAL_BATCH, epochs=EPOCHS)
out["probe"] = {"history": history, "step_lrs": probe_recorder.step_lrs, "weights": weights.values,
                "changes": [t["changes"] for t in probe_controller.timeline]}

with open(os.path.join(args.out, f"rank{backend.rank}.json"), "w") as f:
    json.dump(out, f)
