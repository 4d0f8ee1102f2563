"""The equivalence check for launchers: a two-layer regression trained for 24 steps with SGD+momentum and
with Adam; each rank saves its final weights (``<optimizer>_rank<r>.npz``) and what it ran on
(``info_rank<r>.json``). tests/test_multihost.py compares each launch with this script on one device:
within 1e-5 relative, bitwise equal across ranks.

(A smaller cousin of tests/workers/equivalence.py, which checks every training feature on every backend;
this one checks launchers, several of which start the same backend.)
"""

import json
import os

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STEPS_PER_EPOCH, EPOCHS, BATCH = 3, 8, 32
data = np.random.default_rng(3).normal(size=(STEPS_PER_EPOCH * BATCH, 5)).astype("float32")
targets = np.sin(data.sum(axis=1, keepdims=True)).astype("float32")
info = {"backend": backend.name, "rank": backend.rank, "size": backend.size, "replicas": backend.num_replicas,
        "controllers": {}}
if backend.name == "horovod":
    import horovod.tensorflow as hvd

    info["controllers"] = {"gloo": bool(hvd.gloo_enabled()), "mpi": bool(hvd.mpi_enabled())}

for label, optimizer_class, options in (("momentum", keras.optimizers.SGD, {"learning_rate": 0.1, "momentum": 0.9}),
                                        ("adam", keras.optimizers.Adam, {"learning_rate": 0.02})):
    with backend.scope():
        keras.utils.set_random_seed(11)
        net = keras.Sequential([keras.Input(shape=(5,)), keras.layers.Dense(12, activation="relu"),
                                keras.layers.Dense(1)])
        opt = optimizer_class(**options)

    def step(ctx, batch, net=net, opt=opt):
        inputs, wanted = batch
        with tf.GradientTape() as tape:
            errors = tf.reduce_mean(tf.square(net(inputs, training=True) - wanted), axis=-1)
            loss = ctx.average_loss(errors)
        ctx.apply_gradients(opt, tape.gradient(loss, net.trainable_variables), net.trainable_variables)
        return loss

    dt.Trainer(model=net, optimizer=opt, train_step=step, backend=backend, verbose=0).fit(
        tf.data.Dataset.from_tensor_slices((data, targets)), global_batch_size=BATCH, epochs=EPOCHS, shuffle_seed=2)
    info[f"{label}_steps"] = int(opt.iterations.numpy())
    np.savez(os.path.join(args.out, f"{label}_rank{backend.rank}.npz"), *[w.numpy() for w in net.trainable_variables])

with open(os.path.join(args.out, f"info_rank{backend.rank}.json"), "w") as f:
    json.dump(info, f)
