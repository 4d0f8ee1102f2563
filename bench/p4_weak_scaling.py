"""P4: weak scaling of a compute-bound CNN: per-rank throughput with 2 ranks x 1 thread / 1 rank x 1 thread.

    python bench/p4_weak_scaling.py [--reps 3]

Each repetition launches, in rotating order: one process alone (the reference), 2 Horovod ranks
(horovodrun --gloo), 2 MultiWorker workers (disttrain launch --tf-config), and, to separate what the
machine costs from what communication costs, 2 independent single-device processes at the same time
(no communication at all: the ceiling). Every process trains the same CNN with ``Trainer.fit`` on
cached batches (32 images a replica), times ``--steps`` steps after a warm-up epoch and reports its
examples/s. Ratios are per repetition: 2-rank per-rank throughput / the lone process's.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

BATCH = 32  # per replica


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process's threads, summed by thread name
    (digits dropped: ``tf_data_private_threadpool_3`` counts as ``tf_data_private_threadpool_``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")].rstrip("0123456789") or "?"
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def worker(args) -> None:
    import disttrain as dt

    options = {"cycle_time_ms": args.cycle_time_ms} if args.cycle_time_ms else {}
    backend = dt.get_backend(args.backend, **options)
    import keras
    import numpy as np
    import tensorflow as tf

    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input(shape=(32, 32, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(10)])
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(loss_fn(y, model(x, training=True)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    rng = np.random.default_rng(backend.rank)
    x = rng.normal(size=(BATCH * 8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=BATCH * 8).astype("int32")

    def cached(context):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).cache().repeat()

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    gb = BATCH * backend.num_replicas
    trainer.fit(cached, global_batch_size=gb, steps_per_epoch=5)  # warm-up: tracing
    backend.barrier()
    cpu_before, start = thread_cpu(), time.perf_counter()
    trainer.fit(cached, global_batch_size=gb, steps_per_epoch=args.steps)
    seconds = time.perf_counter() - start
    cpu = {k: (v - cpu_before.get(k, 0.0)) / args.steps for k, v in thread_cpu().items()}
    rate = backend.all_reduce(args.steps * BATCH * backend.local_replicas / seconds, "mean")  # per rank
    if backend.is_chief:
        with open(args.out, "w") as f:
            json.dump({"per_rank": rate, "step_seconds": seconds / args.steps,
                       "cpu_per_step": {k: v for k, v in cpu.items() if v > 0}}, f)


PROFILES: dict[str, dict] = {}  # kind -> the chief's last {"step_seconds", "cpu_per_step"}


def launch(kind: str, args, tmp: str) -> float:
    """Runs one configuration; returns per-rank examples/s (mean over its ranks); keeps the chief's
    per-thread CPU profile in PROFILES."""
    env = _common.worker_env()
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps)]
    bindir = os.path.dirname(sys.executable)
    outs = [os.path.join(tmp, f"{kind}-{i}.json") for i in range(2)]
    if kind == "one process":
        cmds = [me + ["--backend", "single", "--out", outs[0]]]
    elif kind == "2 independent":
        cmds = [me + ["--backend", "single", "--out", o] for o in outs]
    elif kind.startswith("Horovod"):
        extra = ["--cycle-time-ms", str(args.cycle_time_ms)] if "cycle" in kind else []
        cmds = [[os.path.join(bindir, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"] + me +
                ["--backend", "horovod", "--out", outs[0]] + extra]
    else:
        cmds = [[os.path.join(bindir, "disttrain"), "launch", "--tf-config", "-n", "2", "--"] + me +
                ["--backend", "multiworker", "--out", outs[0]]]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    rates = []
    for proc, out in zip(procs, outs):
        _, err = proc.communicate(timeout=args.timeout)
        if proc.returncode or not os.path.exists(out):
            raise RuntimeError(f"{kind} failed (exit {proc.returncode}): {' '.join(proc.args)}\n{err[-4000:]}")
        with open(out) as f:
            result = json.load(f)
        rates.append(result["per_rank"])
        PROFILES[kind] = result
        os.remove(out)
    return statistics.mean(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cycle-time-ms", type=float, default=None,
                        help="also time Horovod with this cycle (off by default: 0.56 at 10 ms against 0.64 at "
                             "the default 1 ms on 2026-11-26); a worker: this rank's setting")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    kinds = ["one process", "Horovod gloo", "MultiWorker", "2 independent"]
    if args.cycle_time_ms:
        kinds.append(f"Horovod gloo, cycle {args.cycle_time_ms:g} ms")
    with tempfile.TemporaryDirectory() as tmp:
        rates = _common.interleaved({k: (lambda k=k: launch(k, args, tmp)) for k in kinds}, reps=args.reps)
    base = rates["one process"]
    for kind in kinds:  # for bench/scaling_model.py: seconds per step of one rank (median over repetitions)
        _common.measure(f"P4 step time, {kind}", BATCH / statistics.median(rates[kind]), "s",
                        f"{BATCH} images / median per-rank examples/s, CNN of P4, {kind}")
    rows = []
    for kind in kinds[1:]:
        goal = ">= 0.9" if kind in ("Horovod gloo", "MultiWorker") else None
        detail = f"{statistics.median(rates[kind]):.0f} vs {statistics.median(base):.0f} examples/s per rank"
        if kind == "2 independent":
            detail += "; no communication: what the 2 cores give two processes"
        rows.append((f"P4 {kind}", f"per-rank throughput, 2 x 1 thread ({kind}) / 1 x 1 thread", _common.ratios(rates[kind], base),
                     goal, detail))
    lines = ["## P4: weak scaling, compute-bound CNN, 2 ranks x 1 thread / 1 rank x 1 thread", "",
             f"Command: `{_common.command('p4_weak_scaling.py', argv)}`. CNN 4 x Conv2D(16/32) on 32x32x3, batch "
             f"{BATCH} per rank, SGD with momentum, {args.steps} timed steps after a warm-up; {args.reps} repetitions, "
             f"launches in rotating order. Load average: {_common.load()}.", ""]
    lines += _common.ratio_table(rows)
    lines += ["", "Where the time goes (last repetition, rank 0): wall time per step and CPU seconds per step by "
              "thread (name without digits; `python3` is the main thread that runs the step's ops at 1 thread, "
              "`tf_` threads are TensorFlow's pools, others are Horovod / gloo / gRPC). CPU time beyond the "
              "one-process column is what the second rank's communication costs on the shared cores.", "",
              "| thread | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    lines.append("| wall ms / step | " + " | ".join(f"{PROFILES[k]['step_seconds'] * 1e3:.1f}" for k in kinds) + " |")
    names = sorted({n for k in kinds for n in PROFILES[k]["cpu_per_step"]},
                   key=lambda n: -max(PROFILES[k]["cpu_per_step"].get(n, 0) for k in kinds))
    for name in names[:8]:
        lines.append(f"| {name} | " + " | ".join(f"{PROFILES[k]['cpu_per_step'].get(name, 0) * 1e3:.1f}"
                                                 for k in kinds) + " |")
    lines.append("| all threads, CPU ms / step | " + " | ".join(
        f"{sum(PROFILES[k]['cpu_per_step'].values()) * 1e3:.1f}" for k in kinds) + " |")
    print("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
