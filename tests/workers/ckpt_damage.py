"""Faults below the loop on several processes, in one launch (tests/test_checkpoint_damage_distributed.py):

1. ``fallback``: a run saves ckpt-1..4 (every 2 steps, keep 3); the chief deletes the newest index; the
   same run started again falls back to ckpt-3, trains to the end, keeps only loadable checkpoints.
2. ``disk_full``: the chief mounts a 2 MiB tmpfs as the directory and fills it after step 3; the save at
   step 4 fails on the chief; every rank must stop with a CheckpointError naming rank 0.
3. ``not_shared``: each rank gets its own directory; every rank must stop before the first step.

Writes DIR/rank<r>.json: {case: {"error": "...", "stderr": "...", "seconds": s, ...}}; rank 0 also writes
the final weights of case 1 and of the same run uninterrupted to DIR/{fallback,reference}_weights.npz.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import disttrain as dt  # noqa: E402
from disk_faults import FillDiskAt  # noqa: E402

X = np.random.default_rng(0).normal(size=(48, 3)).astype("float32")
DATA = tf.data.Dataset.from_tensor_slices((X, X @ np.array([[1.0], [-2.0], [0.5]], "float32")))
GB = 16  # 3 steps an epoch


def train(directory, *, epochs, callbacks=()):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                         callbacks=list(callbacks), log_every_steps=1 if callbacks else None,
                         checkpointing=dt.Checkpointing(directory, every_steps=2, keep=3, exit_on_preemption=False))
    trainer.fit(DATA, global_batch_size=GB, epochs=epochs, shuffle_seed=5)
    return model


@contextlib.contextmanager
def case(name, results):
    """Runs a case, keeping what it printed on stderr, its error and its seconds."""
    captured, real = io.StringIO(), sys.stderr
    sys.stderr = captured
    started = time.monotonic()
    record = results[name] = {}
    try:
        yield record
    except Exception as err:  # noqa: BLE001 - the error is the result
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        sys.stderr = real
        record["seconds"] = round(time.monotonic() - started, 2)
        record["stderr"] = captured.getvalue()
    backend.barrier()


out = os.path.abspath(args.out)
results = {}

with case("reference", results) as record:  # the same run, never interrupted
    model = train(os.path.join(out, "reference"), epochs=4)
    if backend.is_chief:
        np.savez(os.path.join(out, "reference_weights.npz"), *model.get_weights())

with case("fallback", results) as record:
    directory = os.path.join(out, "fallback")
    train(directory, epochs=2)  # ckpt-2, ckpt-3, ckpt-4 (keep 3)
    backend.barrier()
    if backend.is_chief:
        os.remove(os.path.join(directory, "ckpt-4.index"))
    backend.barrier()
    model = train(directory, epochs=4)
    record["files"] = sorted(os.listdir(directory))
    if backend.is_chief:
        np.savez(os.path.join(out, "fallback_weights.npz"), *model.get_weights())

disk = os.path.join(out, "disk")
with case("disk_full", results) as record:
    if backend.is_chief:
        os.makedirs(disk)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", disk], capture_output=True)
        record["mount"] = mounted.returncode
    mounted = backend.broadcast(int(record.get("mount", 0)))
    if mounted == 0:
        train(os.path.join(disk, "ckpt"), epochs=4, callbacks=[FillDiskAt(os.path.join(disk, "filler"), 3)])
    else:
        record["skipped"] = "cannot mount a tmpfs here (needs root)"
if backend.is_chief:
    subprocess.run(["umount", "-l", disk], capture_output=True)

with case("not_shared", results) as record:
    train(os.path.join(out, f"own-rank{backend.rank}"), epochs=1)

with open(os.path.join(out, f"rank{backend.rank}.json"), "w") as f:
    json.dump(results, f, indent=1)
