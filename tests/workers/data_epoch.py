"""Records which example ids every rank consumes in one epoch, for several sharding set-ups.

The training step adds each real example's id (mask > 0) to a per-replica counts vector (a Keras metric
state). After each epoch the worker writes, per rank, the counts on this rank's replicas, the counts
merged over all ranks through the backend, and the steps run. Shard files are written by the test.
"""

import argparse
import json
import os

import disttrain as dt

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="auto")
parser.add_argument("--cpu-replicas", type=int, default=None)
parser.add_argument("--out", required=True)
parser.add_argument("--shards", required=True, help="directory with even/ and uneven/ shard files")
parser.add_argument("--cases", default="all")
args = parser.parse_args()

backend = dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from disttrain import data as D  # noqa: E402
from disttrain import metrics as metrics_lib  # noqa: E402
from disttrain.input import pipelines  # noqa: E402

MAX_ID = 64


class IdCounts(keras.metrics.Metric):
    """How often each example id was consumed (mask-weighted)."""

    def __init__(self, name="ids"):
        super().__init__(name=name)
        self.counts = self.add_variable(shape=(MAX_ID,), initializer="zeros", name="counts", aggregation="sum")

    def update_state(self, ids, weights):
        self.counts.assign_add(tf.math.unsorted_segment_sum(weights, tf.cast(ids, tf.int32), MAX_ID))

    def result(self):
        return tf.reduce_sum(self.counts)


with backend.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.01)
    ids_metric = IdCounts()


def train_step(ctx, batch):
    mask = batch.get("mask", tf.ones_like(batch["y"]))
    ids_metric.update_state(batch["id"], mask)
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.square(batch["y"] - model(batch["x"])[:, 0]), sample_weight=mask)
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss


trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, metrics=[ids_metric],
                     backend=backend, verbose=0)
even = sorted(os.path.join(args.shards, "even", f) for f in os.listdir(os.path.join(args.shards, "even"))
              if f.endswith(".tfrecord"))
uneven = json.load(open(os.path.join(args.shards, "uneven_order.json")))  # rank 0 files: 20, rank 1: 16
three = sorted(os.path.join(args.shards, "three", f) for f in os.listdir(os.path.join(args.shards, "three"))
               if f.endswith(".tfrecord"))  # 3 x 12 examples: dealt whole, rank 0 would read 24 and rank 1 12
with open(os.path.join(args.shards, "elements.json")) as f:
    n_elements = json.load(f)["examples"]
rng = np.random.default_rng(0)
element_ds = tf.data.Dataset.from_tensor_slices(
    {"id": np.arange(n_elements, dtype=np.int64), "x": rng.normal(size=(n_elements, 3)).astype("float32"),
     "y": rng.normal(size=n_elements).astype("float32")})

GB = 8


def file_fn(files, remainder, *, repeat=False, unknown=False):
    source = D.from_files(files)

    def fn(ctx):
        ds = pipelines.file_sharded(source.files, ctx, decode_batch=source.decode_batch, counts=source.counts,
                                     remainder=remainder)
        if unknown:
            ds = ds.filter(lambda b: True)
        return ds.repeat() if repeat else ds

    return fn


CASES = {
    # name: (data, fit kwargs)
    "elements_pad": (D.from_dataset(element_ds), dict(remainder="pad", shuffle_seed=3)),
    "files_pad": (D.from_files(even), dict(remainder="pad", shuffle_seed=3)),
    "uneven_drop": (D.from_files(uneven), dict(remainder="drop")),
    "three_drop": (D.from_files(three), dict(remainder="drop")),
    "uneven_pad": (D.from_files(uneven), dict(remainder="pad")),
    "uneven_fn_unknown": (file_fn(uneven, "drop", unknown=True), {}),
    "uneven_fn_repeat": (file_fn(uneven, "drop", repeat=True), dict(steps_per_epoch=6)),
    "elements_repeat": (D.from_dataset(element_ds.repeat()), dict(steps_per_epoch=7, shuffle_seed=1)),
}
chosen = list(CASES) if args.cases == "all" else args.cases.split(",")
results = {"rank": backend.rank, "size": backend.size, "replicas": backend.num_replicas}
for name in chosen:
    data, kwargs = CASES[name]
    for epoch in range(2):
        before = int(optimizer.iterations.numpy())
        trainer.fit(data, global_batch_size=GB, epochs=1, initial_epoch=epoch, **kwargs)
        merged = metrics_lib.merged_states(backend, [ids_metric])[ids_metric][0]
        local = backend.local_sum(getattr(ids_metric.counts, "value", ids_metric.counts))
        results[f"{name}/{epoch}"] = {
            "steps": int(optimizer.iterations.numpy()) - before,
            "global": np.asarray(merged).round().astype(int).tolist(),
            "local": np.asarray(local).round().astype(int).tolist(),
        }
with open(os.path.join(args.out, f"rank{backend.rank}.json"), "w") as f:
    json.dump(results, f)
print(f"rank {backend.rank}: done", flush=True)
