"""P5: does the sharded TFRecord input pipeline keep training fed?

    python bench/input_pipeline.py            # prints a Markdown section to stdout

Launches itself under ``horovodrun -np 2 --gloo`` (2 local processes, 1 thread each) on TFRecord shards
written with ``disttrain.shards.write_shards``. In ONE run it measures, in interleaved repetitions (the
order rotates every repetition) and reports medians of the global rate (examples/s over both ranks):

* input only: one epoch of the sharded pipeline (file sharding, shuffle, batched parse), no training;
* training on cached tensors: ``Trainer.fit`` on batches already in memory (no input work);
* end to end: ``Trainer.fit`` on the sharded pipeline, as a user would run it.

Goal: end-to-end / best >= 0.95 (per repetition), where best = 1 / (1/input only + 1/cached training) is
the most that is achievable when input and training share each rank's core (their times add up; with
spare cores the best would be min(input only, cached training)). Run for the 64-wide MLP (little compute per
example: input work matters most) and the 1024-wide one. Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("input", "cached", "end_to_end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="Horovod ranks (local processes)")
    p.add_argument("--examples", type=int, default=24576, help="examples in the shards")
    p.add_argument("--shards", type=int, default=8, help="TFRecord files")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 1024], help="widths of the MLP's two hidden layers")
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the three measurements")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the per-rank measurement ---------------------------------------------------------------------
def worker(args) -> None:
    import disttrain as dt

    backend = dt.get_backend("horovod")
    import keras
    import tensorflow as tf

    from disttrain import data as D
    from disttrain.input import epoch_agreement
    from disttrain.shards import list_shards

    files = list_shards(args.data)
    source = D.from_files(files)
    gb = args.global_batch
    with backend.scope():
        keras.utils.set_random_seed(0)
        hidden = args.hidden[0]
        model = keras.Sequential([keras.Input(shape=(args.features,)), keras.layers.Dense(hidden, activation="relu"),
                                  keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.square(y - model(x, training=True)[:, 0]))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    steps = epoch_agreement.epoch_input(backend, source, global_batch_size=gb, seed=0).steps
    context = backend.input_context(gb)
    cached = list(source.build(context, seed=0).take(8))

    def cached_fn(ctx):
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda *t: tf.stack(t), *cached)).repeat()

    def timed(fn) -> float:
        backend.barrier()
        start = time.perf_counter()
        fn()
        backend.barrier()
        return backend.all_reduce(time.perf_counter() - start, "max")

    def input_only(epoch):
        epoch_input = epoch_agreement.epoch_input(backend, source, global_batch_size=gb, seed=0, epoch=epoch)
        for _ in range(epoch_input.steps):
            next(epoch_input.iterator)

    runs = {
        "input": lambda epoch: input_only(epoch),
        "cached": lambda epoch: trainer.fit(cached_fn, global_batch_size=gb, steps_per_epoch=steps,
                                            initial_epoch=epoch),
        "end_to_end": lambda epoch: trainer.fit(source, global_batch_size=gb, shuffle_seed=0, initial_epoch=epoch),
    }
    for mode in MODES:  # warm up: trace the steps, fill caches
        runs[mode](0)
    rates = {m: [] for m in MODES}
    for rep in range(args.reps):
        order = MODES[rep % 3:] + MODES[:rep % 3]
        for mode in order:
            seconds = timed(lambda: runs[mode](rep + 1))
            rates[mode].append(steps * gb / seconds)
    if backend.is_chief:
        with open(args.out, "w") as f:
            json.dump({"rates": rates, "steps": steps, "ranks": backend.size, "tf": tf.__version__}, f)


# -- the driver: write shards, launch, report -------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tensorflow as tf

    from disttrain.shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.examples, args.features)).astype("float32")
        y = (x @ rng.normal(size=args.features)).astype("float32")
        write_shards(tf.data.Dataset.from_tensor_slices((x, y)), tmp, num_shards=args.shards)
        results = {}
        for hidden in args.hidden:
            out = os.path.join(tmp, f"result{hidden}.json")
            env = dict(os.environ, DISTTRAIN_THREADS="1", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
                       TF_ENABLE_ONEDNN_OPTS="0",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            horovodrun = str(Path(sys.executable).parent / "horovodrun")
            cmd = [horovodrun, "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo", sys.executable,
                   os.path.abspath(__file__), "--worker", "--data", tmp, "--out", out,
                   "--global-batch", str(args.global_batch), "--features", str(args.features), "--reps", str(args.reps),
                   "--hidden", str(hidden)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0 or not os.path.exists(out):
                sys.stderr.write(f"benchmark failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-5000:]}\n")
                return 1
            with open(out) as f:
                results[hidden] = json.load(f)
    print(report(args, results, argv))
    return 0


def report(args, results: dict, argv) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common

    names = {"input": "input only", "cached": "training on cached tensors", "end_to_end": "end to end"}
    rows = []
    for hidden, result in results.items():
        rates = result["rates"]
        # input and training compete for the same core of each rank: at best their times add up
        best = [1 / (1 / i + 1 / c) for i, c in zip(rates["input"], rates["cached"])]
        med = {m: statistics.median(v) for m, v in rates.items()}
        rows.append((f"P5 {args.features}-{hidden}-{hidden}-1", "examples/s, end to end / best sharing the cores: 1 / (1/input only + "
                     f"1/training on cached batches), MLP {args.features}-{hidden}-{hidden}-1", _common.ratios(rates["end_to_end"], best),
                     ">= 0.95", "; ".join(f"{names[m]} {med[m]:,.0f}" for m in MODES) + " examples/s (medians)"))
    first = next(iter(results.values()))
    lines = [
        "## P5: input pipeline (sharded TFRecord, Horovod gloo) when input and training share the cores",
        "",
        f"Command: `{_common.command('input_pipeline.py', argv)}`. {first['ranks']} ranks (1 thread each), "
        f"{args.examples} examples in {args.shards} TFRecord shards written by `write_shards`, file sharding, "
        f"shuffled, global batch {args.global_batch} ({first['steps']} steps an epoch); {args.reps} repetitions "
        f"of the three measurements, order rotating. Load average: {_common.load()}.",
        "",
    ]
    return "\n".join(lines + _common.ratio_table(rows) + [""])


if __name__ == "__main__":
    sys.exit(main())
