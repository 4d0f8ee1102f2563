"""Trains with TensorBoard, a JSON-lines log and a progress bar; replicas see differently weighted data.

Replica ``i`` (over all processes) gets targets around ``10 * i`` and, for ``i >= 1``, sample weight 1
on only the first quarter of each batch (0 elsewhere): the mean of per-replica metric means is then
far from the exact global value. Each rank writes ``rank<r>.json`` with what it saw (its history, the
step logs its callbacks received, its own replicas' weighted sums computed with numpy) so the test can
compare TensorBoard's files with the globally reduced values. Every rank works in ``<out>/work`` (the
test checks it stays empty) and the chief writes the summaries to ``<out>/tb``.
"""

import json
import os

import disttrain as dt
import worker_args

args, backend = worker_args.start((("--chief-only-callbacks",), dict(
    action="store_true", help="create TensorBoard/JsonLinesLogger on the chief only (the trainer must still "
                              "agree on the histogram steps with the other processes)")))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from disttrain import metrics as metrics_lib  # noqa: E402

out = os.path.abspath(args.out)
os.chdir(os.path.join(out, "work"))
GLOBAL_BATCH, STEPS, EPOCHS, LOG_EVERY, HIST_EVERY = 16, 6, 2, 2, 3


def replica_data(replica: int, per_replica: int):
    """Replica ``replica``'s STEPS batches: features, targets, sample weights (numpy)."""
    rng = np.random.default_rng(100 + replica)
    n = STEPS * per_replica
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) + 10.0 * replica).astype("float32")
    w = np.ones((n,), "float32")
    if replica >= 1:
        w = np.tile((np.arange(per_replica) < max(1, per_replica // 4)).astype("float32"), STEPS)
    return x, y, w


def dataset_fn(context: dt.InputContext) -> tf.data.Dataset:
    """Per-replica batches; for several local replicas, one batch per replica for each step in turn."""
    b = context.per_replica_batch_size
    first = context.input_pipeline_id * context.replicas_per_pipeline
    per = [tf.data.Dataset.from_tensor_slices(replica_data(first + j, b)).batch(b)
           for j in range(context.replicas_per_pipeline)]
    if len(per) == 1:
        return per[0]
    return tf.data.Dataset.zip(tuple(per)).flat_map(
        lambda *batches: tf.data.Dataset.from_tensor_slices(tuple(tf.stack(t) for t in zip(*batches))))


with backend.scope():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="tanh", name="dense"),
                              keras.layers.Dense(1, name="dense_1")], name="obs")
    optimizer = keras.optimizers.SGD(0.01)
    target_mean = keras.metrics.Mean(name="target_mean")
    mse = keras.metrics.MeanSquaredError(name="mse")
    val_target_mean = keras.metrics.Mean(name="target_mean")


def train_step(ctx, batch):
    x, y, w = batch
    with tf.GradientTape() as tape:
        prediction = model(x, training=True)
        loss = ctx.average_loss(tf.reduce_mean(tf.square(y - prediction), axis=-1), sample_weight=w)
    grads = tape.gradient(loss, model.trainable_variables)
    ctx.apply_gradients(optimizer, grads, model.trainable_variables)
    target_mean.update_state(y, sample_weight=w)
    mse.update_state(y, prediction, sample_weight=w)
    return loss


def eval_step(ctx, batch):
    x, y, w = batch
    val_target_mean.update_state(y, sample_weight=w)
    return ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=False)), axis=-1), sample_weight=w)


class Recorder(dt.Callback):
    """What this process's callbacks are handed (the test checks every rank got the same)."""

    def __init__(self):
        self.steps, self.histograms = [], []

    def on_step_logs(self, trainer, step, logs):
        self.steps.append([step, trainer.epoch, trainer.epoch_step, dict(logs)])

    def on_histograms(self, trainer, step, gradients):
        self.histograms.append([step, {k: [list(v.shape), float(np.sum(v))] for k, v in gradients.items()}])


recorder = Recorder()
callbacks = [recorder]
if backend.is_chief or not args.chief_only_callbacks:
    callbacks += [dt.TensorBoard(logdir=os.path.join(out, "tb"), histogram_every_steps=HIST_EVERY,
                                 config={"worker": "obs_train"}),
                  dt.JsonLinesLogger(os.path.join(out, "metrics.jsonl"))]
trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=eval_step,
                     backend=backend, metrics=[target_mean, mse], eval_metrics=[val_target_mean],
                     callbacks=callbacks, verbose=2, log_every_steps=LOG_EVERY)
history = trainer.fit(dataset_fn, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, steps_per_epoch=STEPS,
                      validation_data=dataset_fn, validation_steps=STEPS)

ctx = backend.input_context(GLOBAL_BATCH)
first = ctx.input_pipeline_id * ctx.replicas_per_pipeline
replicas = {}
for j in range(ctx.replicas_per_pipeline):
    _, y, w = replica_data(first + j, ctx.per_replica_batch_size)
    replicas[first + j] = {"sum_wy": float(np.sum(w * y[:, 0], dtype=np.float64)), "sum_w": float(np.sum(w))}

info = {"rank": backend.rank, "size": backend.size, "pid": os.getpid(), "is_chief": backend.is_chief,
        "replicas": backend.num_replicas, "history": history, "steps": recorder.steps,
        "histograms": recorder.histograms, "replica_sums": replicas,
        "local_results": metrics_lib.local_results(backend, [target_mean]),
        "global_step": trainer.global_step}
with open(os.path.join(out, f"rank{backend.rank}.json"), "w") as f:
    json.dump(info, f)
