"""Cost of the preemption flag: step time with Checkpointing (each step all-reduces the stop/save flags
inside the compiled step) against the same Trainer without it, on 2 processes (Horovod gloo and
MultiWorker), where the flag needs communication. No checkpoint is written in either configuration
(no interval, no final save), so the difference is the flag alone. Prints a Markdown section.

    python bench/preemption_flag.py [--repeats 5] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODELS = {"tiny (8-16-1)": [16], "MLP 256-1024-1024-1": [1024, 1024]}


def worker(args) -> None:
    """One rank: for each model, alternate epochs of the plain and the flagged trainer."""
    import time

    import disttrain as dt

    backend = dt.get_backend("auto")
    import keras
    import numpy as np
    import tensorflow as tf

    results = {}
    for label, widths in MODELS.items():
        features = 8 if widths == [16] else 256
        x = np.random.default_rng(0).normal(size=(args.steps * 64, features)).astype("float32")
        data = tf.data.Dataset.from_tensor_slices((x, x[:, :1]))

        def make(checkpointing):
            with backend.scope():
                keras.utils.set_random_seed(0)
                model = keras.Sequential([keras.Input(shape=(features,))]
                                         + [keras.layers.Dense(w, activation="relu") for w in widths]
                                         + [keras.layers.Dense(1)])
                optimizer = keras.optimizers.SGD(1e-3)

            def step(ctx, batch):
                features_, target = batch
                with tf.GradientTape() as tape:
                    loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features_)), axis=-1))
                ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables),
                                    model.trainable_variables)
                return loss

            return dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                              checkpointing=checkpointing)

        plain = make(None)
        # one directory for every rank (next to --out): the checkpoint directory check wants a shared one
        flagged = make(dt.Checkpointing(os.path.join(os.path.dirname(os.path.abspath(args.out)), "checkpoints"),
                                        save_at_end=False))
        times = {"plain": [], "flag": []}
        for repeat in range(args.repeats + 1):  # the first round traces: not counted
            for name, trainer in (("plain", plain), ("flag", flagged)) if repeat % 2 else (
                    ("flag", flagged), ("plain", plain)):
                backend.barrier()
                start = time.perf_counter()
                trainer.fit(data, global_batch_size=64, epochs=1)
                elapsed = backend.all_reduce(time.perf_counter() - start, "max")
                if repeat:
                    times[name].append(elapsed / args.steps)
        results[label] = times
    if backend.is_chief:
        Path(args.out).write_text(json.dumps(results))


def launch(kind: str, args, out: str) -> None:
    script = [sys.executable, __file__, "--worker", "--out", out, "--repeats", str(args.repeats),
              "--steps", str(args.steps)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", DISTTRAIN_THREADS="1", PYTHONPATH=str(ROOT))
    if kind == "horovod":
        cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"] + script
    else:
        cmd = [str(BIN / "disttrain"), "launch", "--tf-config", "-n", "2", "--"] + script
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for kind, label in (("horovod", "Horovod gloo, 2 ranks"), ("multiworker", "MultiWorker, 2 workers")):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            launch(kind, args, out)
            results = json.loads(Path(out).read_text())
        for model, times in results.items():
            ratios = [f / p for f, p in zip(times["flag"], times["plain"])]
            rows.append(f"| {label} | {model} | {statistics.median(times['plain']) * 1e3:.2f} | "
                        f"{statistics.median(times['flag']) * 1e3:.2f} | **{statistics.median(ratios):.3f}** "
                        f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    print("## Preemption flag: Checkpointing on / off\n")
    print(f"Command: `python bench/preemption_flag.py --repeats {args.repeats} --steps {args.steps}`. "
          f"Epochs of {args.steps} steps of global batch 64, SGD; the two trainers alternate epochs in the same "
          "processes (1 thread each); per-pair ratios, median (min-max). The flag is one 2-int all-reduce "
          "per step inside the compiled step; no checkpoint is written.\n")
    print("| backend | model | off ms/step | on ms/step | ratio on/off |\n|---|---|---:|---:|---|")
    print("\n".join(rows))
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
