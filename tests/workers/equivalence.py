"""Trains the same model with SGD and with Adam for 20 steps and saves each rank's final weights.

Last, mixed_float16 and mixed_bfloat16 with a LossScaleOptimizer on data with one inf example (one
step an epoch must be skipped everywhere). "accum" is the Adam training again with 4 accumulated micro-batches per step (the same updates).
Then, with fp16 and bf16 gradient compression (small buckets, so several collectives per step): the
SGD training again, and one step's reduced gradients next to each replica's local ones (``reduce_*``),
so the test can check the sum was taken in the compressed dtype.
"""

import json
import os

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, EXAMPLES, EPOCHS = 64, 256, 5  # 4 steps an epoch, 20 steps in all
rng = np.random.default_rng(0)
x = rng.normal(size=(EXAMPLES, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(EXAMPLES, 1))).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y))

info = {"backend": backend.name, "rank": backend.rank, "size": backend.size, "replicas": backend.num_replicas}
if backend.name == "horovod":
    import horovod.tensorflow as hvd

    info["mpi"] = bool(hvd.mpi_enabled())
    info["gloo"] = bool(hvd.gloo_enabled())

# (name, optimizer, gradient accumulation steps): "accum" must end where "adam" does
for name, make_optimizer, accumulation in [("sgd", lambda: keras.optimizers.SGD(0.05), 1),
                                           ("adam", lambda: keras.optimizers.Adam(0.01), 1),
                                           ("accum", lambda: keras.optimizers.Adam(0.01), 4)]:
    with backend.scope():
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = make_optimizer()

    def train_step(ctx, batch, model=model, optimizer=optimizer):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        grads = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, grads, model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                         accumulation_steps=accumulation)
    history = trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=7)
    info[f"{name}_steps"] = int(optimizer.iterations.numpy())
    info[f"{name}_loss"] = history["loss"]
    np.savez(os.path.join(args.out, f"{name}_rank{backend.rank}.npz"),
             *[v.numpy() for v in model.trainable_variables])

# Two models, two optimizers, one step (the shape of a GAN's or an actor-critic's update).
with backend.scope():
    keras.utils.set_random_seed(43)
    body = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="tanh")])
    head = keras.Sequential([keras.Input(shape=(16,)), keras.layers.Dense(1)])
    body_opt, head_opt = keras.optimizers.SGD(0.05, momentum=0.9), keras.optimizers.Adam(0.01)
    body_opt.build(body.trainable_variables)
    head_opt.build(head.trainable_variables)


def two_model_step(ctx, batch):
    features, target = batch
    with tf.GradientTape(persistent=True) as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - head(body(features))), axis=-1))
    ctx.apply_gradients(body_opt, tape.gradient(loss, body.trainable_variables), body.trainable_variables)
    ctx.apply_gradients(head_opt, tape.gradient(loss, head.trainable_variables), head.trainable_variables)
    return loss


trainer = dt.Trainer(model=[body, head], optimizer=[body_opt, head_opt], train_step=two_model_step,
                     backend=backend, verbose=0)
trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=7)
info["two_steps"] = int(head_opt.iterations.numpy())
np.savez(os.path.join(args.out, f"two_rank{backend.rank}.npz"),
         *[v.numpy() for v in body.trainable_variables + head.trainable_variables])

# Gradient clipping by the GLOBAL norm: decided on the reduced gradients, applied to the local ones.
with backend.scope():
    keras.utils.set_random_seed(44)
    clipped = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(1)])
    clip_opt = keras.optimizers.SGD(0.5)
CLIP_NORM = 0.05


def clip_step(ctx, batch):
    features, target = batch
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(target - clipped(features)), axis=-1))
    grads = tape.gradient(loss, clipped.trainable_variables)
    norm = tf.linalg.global_norm(ctx.reduce_gradients(grads))
    factor = tf.minimum(1.0, CLIP_NORM / norm)
    ctx.apply_gradients(clip_opt, [g * factor for g in grads], clipped.trainable_variables)
    return {"loss": loss, "clipped": tf.cast(norm > CLIP_NORM, tf.float32) / ctx.num_replicas}


trainer = dt.Trainer(model=clipped, optimizer=clip_opt, train_step=clip_step, backend=backend, verbose=0)
history = trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=7)
info["clip_steps"] = int(clip_opt.iterations.numpy())
info["clipped_fraction"] = history["clipped"]
np.savez(os.path.join(args.out, f"clip_rank{backend.rank}.npz"), *[v.numpy() for v in clipped.trainable_variables])


# Gradient compression (and buckets): the SGD training again, and the reduction of known tensors.
rows = np.random.default_rng(1).normal(size=(backend.num_replicas * 4, 3)).astype("float32") * 1e-2


def shard_rows(context):
    per_replica = len(rows) // context.num_replicas_in_sync
    mine = rows[context.input_pipeline_id * per_replica * context.replicas_per_pipeline:]
    return tf.data.Dataset.from_tensor_slices(mine[:per_replica * context.replicas_per_pipeline]).batch(per_replica)


def reduce_known(ctx_rows):
    local = [ctx_rows, tf.reduce_sum(ctx_rows, axis=0) * 3.1, tf.cast(ctx_rows[0], tf.float64)]
    return local, backend.reduce_gradients(local)


for compression in ("fp16", "bf16", "none"):
    backend.gradient_options = dt.GradientOptions(compression=compression, bucket_mb=16 / (1 << 20))
    iterator = iter(backend.distribute_dataset(shard_rows, global_batch_size=len(rows)))
    per_replica = tf.function(lambda it: backend.run(reduce_known, args=(next(it),)))(iterator)
    arrays = {}
    for j, (local, reduced) in enumerate(backend.local_values(per_replica)):
        replica = backend.rank * backend.local_replicas + j
        arrays.update({f"local{replica}_{k}": np.asarray(v) for k, v in enumerate(local)})
        arrays.update({f"reduced{replica}_{k}": np.asarray(v) for k, v in enumerate(reduced)})
    np.savez(os.path.join(args.out, f"reduce_{compression}_rank{backend.rank}.npz"), **arrays)
    if compression == "none":
        break
    with backend.scope():
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.05)

    def compressed_step(ctx, batch, model=model, optimizer=optimizer):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=compressed_step, backend=backend, verbose=0)
    trainer.fit(dataset, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=7)
    info[f"sgd_{compression}_steps"] = int(optimizer.iterations.numpy())
    np.savez(os.path.join(args.out, f"sgd_{compression}_rank{backend.rank}.npz"),
             *[v.numpy() for v in model.trainable_variables])

# Mixed precision with a LossScaleOptimizer; one example is inf, so one step of each epoch is skipped.
backend.gradient_options = dt.GradientOptions()
x_bad = x.copy()
x_bad[5] = np.inf
bad = tf.data.Dataset.from_tensor_slices((x_bad, y))
for policy in ("mixed_float16", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    try:
        with backend.scope():
            keras.utils.set_random_seed(42)
            model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="tanh"),
                                      keras.layers.Dense(1, dtype="float32")])
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
    finally:
        keras.mixed_precision.set_global_policy("float32")

    def mixed_step(ctx, batch, model=model, optimizer=optimizer):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
            scaled = optimizer.scale_loss(loss)
        ctx.apply_gradients(optimizer, tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=mixed_step, backend=backend, verbose=0)
    history = trainer.fit(bad, global_batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle_seed=7)
    info[f"{policy}_steps"] = int(optimizer.iterations.numpy())
    info[f"{policy}_skipped"] = history["skipped_fraction"]
    np.savez(os.path.join(args.out, f"{policy}_rank{backend.rank}.npz"), *[v.numpy() for v in model.trainable_variables])

with open(os.path.join(args.out, f"info_rank{backend.rank}.json"), "w") as f:
    json.dump(info, f)
