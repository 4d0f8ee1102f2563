"""P3: 2-rank gradient all-reduce, disttrain's Horovod path / mpi4py ``Allreduce``; and overlap of the
reduction with the backward pass (buckets), with each variant's CPU floor.

    python bench/p3_allreduce.py [--reps 5]

One ``mpirun -np 2`` launch (1 thread per rank); both sides run in the same processes, interleaved:

* bandwidth: a float32 gradient of 1 KiB, 1 MiB, 64 MiB summed over the 2 ranks by
  ``backend.reduce_gradients`` inside a ``tf.function`` (what ``ctx.apply_gradients`` runs: Horovod
  ``grouped_allreduce``, here over MPI), by raw ``hvd.allreduce`` in a ``tf.function`` (Horovod as its
  docs show it, with ``hvd.Compression.fp16`` for fp16) and by mpi4py ``Allreduce`` on a numpy buffer;
  the ratio is against the faster of the two peers in each repetition; with fp16 the
  disttrain side casts (compression="fp16") and mpi4py sums float16 buffers with a numpy ``MPI.Op``.
  Bandwidth = float32 bytes / time (so fp16 counts the bytes it saves); ratio = the peer's time / disttrain's.
* overlap: an 8-layer MLP with 64 MiB of float32 gradients; per rank the time of the local step (no
  reduction), of the reduction alone, and of the full step with one group after the backward pass
  (bucket_mb=0) or in buckets (bucket_mb=16). Goal: full (bucketed) <= 1.3 x max(local, reduction) where
  the cores allow it: each variant also records the CPU seconds both ranks used per step, and that over
  the machine's cores is the shortest wall time it can take (its CPU floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SIZES = {"1 KiB": 1 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
CALLS = {"1 KiB": 200, "1 MiB": 40, "64 MiB": 8}
WIDTH, LAYERS, BATCH = 1448, 8, 16  # 8 x 1448^2 float32 weights = 64 MiB of gradients
BUCKET_MB = 16


def bandwidth_worker(args) -> None:
    from mpi4py import MPI

    import disttrain as dt

    backend = dt.get_backend("horovod")
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    comm = MPI.COMM_WORLD
    synced = _common.synced_timer(backend)

    def sum16(a, b, datatype):  # a float16 sum for mpi4py (MPI has no half-precision reduction)
        x, y = np.frombuffer(a, np.float16), np.frombuffer(b, np.float16)
        y[:] = x + y

    half_sum = MPI.Op.Create(sum16, commute=True)
    variants = {}
    for label, nbytes in SIZES.items():
        for compression in ("none", "fp16"):
            backend.gradient_options = dt.GradientOptions(compression=compression)
            grad = tf.random.stateless_normal([nbytes // 4], seed=[backend.rank, 0])
            reduce = tf.function(lambda g: backend.reduce_gradients([g])[0])
            reduce(grad)
            wire = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
            raw = tf.function(lambda g, w=wire: hvd.allreduce(g, op=hvd.Sum, compression=w))  # Horovod as its docs
            raw(grad)
            numpy = grad.numpy().astype(np.float16 if compression == "fp16" else np.float32)
            out = np.empty_like(numpy)
            op = half_sum if compression == "fp16" else MPI.SUM
            kind = MPI.SHORT if compression == "fp16" else MPI.FLOAT  # float16 travels as 2-byte words
            calls = CALLS[label]
            variants[f"dt {label} {compression}"] = lambda r=reduce, g=grad, c=calls: synced(lambda: r(g).numpy(), c)
            variants[f"raw {label} {compression}"] = lambda r=raw, g=grad, c=calls: synced(lambda: r(g).numpy(), c)
            variants[f"mpi {label} {compression}"] = lambda n=numpy, o=out, op=op, k=kind, c=calls: synced(
                lambda: comm.Allreduce([n, k], [o, k], op=op), c)
    finish(args, backend, variants)


def finish(args, backend, variants, cpu: dict | None = None) -> None:
    for fn in variants.values():  # warm-up
        fn()
    if cpu is not None:
        cpu.clear()  # the warm-up's CPU is not measured
    times = _common.interleaved(variants, reps=args.reps)
    times.update({f"cpu: {name}": values for name, values in (cpu or {}).items()})
    if backend.is_chief:
        with open(args.out, "w") as f:
            json.dump(times, f)


def overlap_worker(args) -> None:
    """The same step with and without reduction, and the reduction alone (horovodrun --gloo)."""
    import disttrain as dt

    backend = dt.get_backend("horovod", **({"cycle_time_ms": args.cycle_time_ms} if args.cycle_time_ms else {}))
    import keras
    import tensorflow as tf

    cpu: dict[str, list[float]] = {}
    synced = _common.synced_timer(backend, cpu)
    variants = {}
    keras.utils.set_random_seed(0)
    layers = [keras.Input(shape=(WIDTH,))] + [keras.layers.Dense(WIDTH, use_bias=False, activation="tanh")
                                              for _ in range(LAYERS)]
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.SGD(1e-4)
    optimizer.build(model.trainable_variables)
    x = tf.random.stateless_normal([BATCH, WIDTH], seed=[backend.rank, 1])
    grads = [tf.random.stateless_normal(v.shape, seed=[backend.rank, 2]) for v in model.trainable_variables]

    def step_fn(name: str, reduce: bool, bucket_mb: float):
        backend.gradient_options = dt.GradientOptions(bucket_mb=bucket_mb)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True)))
            g = tape.gradient(loss, model.trainable_variables)
            if reduce:
                backend.apply_gradients(optimizer, g, model.trainable_variables)
            else:
                optimizer.apply_gradients(zip(g, model.trainable_variables))
            return loss

        step(x)  # trace now, with these options
        return lambda: synced(lambda: step(x).numpy(), 3, name)

    backend.gradient_options = dt.GradientOptions()
    reduce_all = tf.function(lambda g: backend.reduce_gradients(g))
    reduce_all(grads)
    variants["local step"] = step_fn("local step", False, 0)
    variants["reduction alone"] = lambda: synced(lambda: [t.numpy() for t in reduce_all(grads)][0], 3, "reduction alone")
    variants["full, one group"] = step_fn("full, one group", True, 0)
    for bucket_mb in args.buckets:
        name = f"full, {bucket_mb:g} MiB buckets"
        variants[name] = step_fn(name, True, bucket_mb)
    finish(args, backend, variants, cpu)


def report(args, argv, times) -> str:
    rows = []
    for label, nbytes in SIZES.items() if "dt 1 KiB none" in times else ():
        for compression in ("none", "fp16"):
            dt_t, mpi_t = times[f"dt {label} {compression}"], times[f"mpi {label} {compression}"]
            raw_t = times.get(f"raw {label} {compression}", mpi_t)
            best = [min(a, b) for a, b in zip(raw_t, mpi_t)]  # per repetition: the faster of the two peers
            gbs = lambda ts: nbytes / statistics.median(ts) / 1e9  # noqa: E731
            wire = ", fp16 on the wire" if compression == "fp16" else ""
            rows.append((f"P3 {label} {compression}", f"bandwidth, disttrain Horovod path / the best of raw Horovod "
                         f"and mpi4py, {label}{wire}", _common.ratios(best, dt_t),
                         ">= 0.9" if label == "64 MiB" else None,
                         f"{gbs(dt_t):.3f} vs raw Horovod {gbs(raw_t):.3f}, mpi4py {gbs(mpi_t):.3f} GB/s "
                         "(float32 bytes / time)"))
            rows.append((f"P3 {label} {compression} vs raw Horovod", f"bandwidth, disttrain Horovod path / "
                         f"hvd.allreduce in a tf.function, {label}{wire}", _common.ratios(raw_t, dt_t), None,
                         "what disttrain adds to Horovod"))
    local, alone = times.get("local step", []), times.get("reduction alone", [])
    bound = [max(a, b) for a, b in zip(local, alone)]
    serial = [a + b for a, b in zip(local, alone)]
    ms = lambda ts: f"{statistics.median(ts) * 1e3:.1f} ms"  # noqa: E731
    cores = os.cpu_count() or 1
    floor = lambda name: [c / cores for c in times.get(f"cpu: {name}", [])]  # noqa: E731
    for variant in [v for v in times if v.startswith("full")]:
        full = times[variant]
        rows.append((f"P3 overlap {variant.split(', ')[1]}", f"step / max(local step, reduction alone), {variant}",
                     _common.ratios(full, bound), "<= 1.3" if variant == f"full, {BUCKET_MB:g} MiB buckets" else None,
                     f"step {ms(full)}; local {ms(local)}, reduction {ms(alone)}"))
        rows.append((f"P3 overlap {variant.split(', ')[1]} vs serial", f"step / (local step + reduction), {variant}",
                     _common.ratios(full, serial), None, "< 1 = some communication hidden behind compute"))
        if floor(variant):
            rows.append((f"P3 overlap {variant.split(', ')[1]} vs CPU floor", f"step / max(local step, reduction "
                         f"alone, its own CPU floor), {variant}",
                         _common.ratios(full, [max(b, f) for b, f in zip(bound, floor(variant))]), None,
                         f"CPU floor {ms(floor(variant))}: both ranks' CPU per step / {cores} cores"))
    cpu_rows = [n for n in times if n.startswith("cpu: ")]
    for side, name in (("dt", "Horovod path"), ("mpi", "mpi4py")):  # for bench/scaling_model.py
        if f"{side} 64 MiB none" in times:
            _common.measure(f"P3 64 MiB bandwidth, {name}", SIZES["64 MiB"] / statistics.median(
                times[f"{side} 64 MiB none"]) / 1e9, "GB/s", "float32 bytes / time, 2 ranks, mpirun, loopback")
            _common.measure(f"P3 1 KiB time, {name}", statistics.median(times[f"{side} 1 KiB none"]), "s",
                            "seconds per 1 KiB all-reduce, 2 ranks, mpirun, loopback")
    if alone:
        _common.measure("P3 64 MiB bandwidth, Horovod gloo", SIZES["64 MiB"] / statistics.median(alone) / 1e9, "GB/s",
                        "float32 bytes / time of the overlap part's reduction alone, 2 ranks, horovodrun --gloo")
    lines = ["## P3: 2-rank gradient all-reduce (Horovod over MPI vs mpi4py) and overlap with the backward pass", "",
             f"Command: `{_common.command('p3_allreduce.py', argv)}`. Bandwidth: `mpirun -np 2`; overlap: "
             f"`horovodrun -np 2 --gloo`; 1 thread per rank; {args.reps} interleaved repetitions; each time is "
             f"the slower rank's. Overlap model: {LAYERS} Dense {WIDTH}x{WIDTH} layers (64 MiB of float32 "
             f"gradients), batch {BATCH} per rank, SGD; one group vs buckets of {', '.join(f'{b:g}' for b in args.buckets)} MiB. "
             f"Load average: {_common.load()}.", ""]
    lines += _common.ratio_table(rows)
    if cpu_rows:
        lines += ["", f"Where the overlap step's time goes (medians): the CPU seconds per step of both ranks' processes "
                  f"(all threads: the step's, Horovod's background thread, gloo's) and that over the {cores} cores, "
                  "the shortest wall time those cores allow. Wherever the floor is above max(local step, reduction "
                  "alone), the reduction is CPU work that competes with the other rank's compute, and no overlap "
                  "can bring the step below the floor.", "",
                  "| variant | wall ms / step | CPU ms / step, both ranks | CPU floor ms (CPU / cores) | wall / floor |",
                  "|---|---:|---:|---:|---:|"]
        for name in cpu_rows:
            variant = name[len("cpu: "):]
            wall, cpu_ms = statistics.median(times[variant]) * 1e3, statistics.median(times[name]) * 1e3
            lines.append(f"| {variant} | {wall:.1f} | {cpu_ms:.1f} | {cpu_ms / cores:.1f} | {wall / (cpu_ms / cores):.2f} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--buckets", type=float, nargs="+", default=[BUCKET_MB, 4], help="bucket sizes (MiB) to time")
    parser.add_argument("--cycle-time-ms", type=float, default=None, help="Horovod cycle time (overlap part)")
    parser.add_argument("--parts", nargs="+", default=["bandwidth", "overlap"], choices=["bandwidth", "overlap"])
    parser.add_argument("--worker", choices=["bandwidth", "overlap"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (bandwidth_worker if args.worker == "bandwidth" else overlap_worker)(args)
        return 0
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            out = os.path.join(tmp, f"{part}.json")
            env = _common.worker_env()
            script = [sys.executable, os.path.abspath(__file__), "--worker", part, "--out", out, "--reps", str(args.reps),
                      "--buckets", *map(str, args.buckets)]
            script += ["--cycle-time-ms", str(args.cycle_time_ms)] if args.cycle_time_ms else []
            if part == "bandwidth":
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                           OMPI_MCA_btl_vader_single_copy_mechanism="none")
                exports = [a for k in ("DISTTRAIN_THREADS", "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL",
                                       "TF_ENABLE_ONEDNN_OPTS", "PYTHONPATH", "PATH") for a in ("-x", k)]
                cmd = [shutil.which("mpirun") or "mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
                       *exports, *script]
            else:
                cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "-H", "localhost:2",
                       "--gloo", *script]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode or not os.path.exists(out):
                sys.stderr.write(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-5000:]}\n")
                return 1
            with open(out) as f:
                times.update(json.load(f))
    print(report(args, argv, times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
