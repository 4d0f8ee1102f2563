"""P4: weak scaling of a compute-bound CNN: per-rank throughput with 2 ranks x 1 thread / 1 rank x 1 thread.

    python bench/p4_weak_scaling.py [--reps 3]

Each repetition launches, in rotating order: one process alone (the reference); 2 Horovod ranks
(horovodrun --gloo) and 2 MultiWorker workers (disttrain launch --tf-config), each with disttrain and with
the peer's hand-written loop (Horovod's tensorflow2_synthetic_benchmark.py recipe: a ``tf.function`` step
with ``hvd.grouped_allreduce``; TensorFlow's multi-worker custom-loop tutorial: ``strategy.run`` +
``strategy.reduce``), same model, data, optimizer and threads; and, to separate what the machine costs from
what communication costs, 2 independent single-device processes at the same time (no communication at
all: the ceiling; they start their timed steps together, see ``meet``). Every process trains the same CNN
on cached batches (32 images a replica) and times one epoch of ``--steps`` steps after a warm-up epoch
(``Trainer.fit``, or the hand-written epoch: a new iterator, the steps, the epoch's mean loss over the
ranks). Ratios are per repetition: 2-rank per-rank throughput / the lone process's, disttrain /
hand-written, and disttrain / 2 independent. "Horovod paired" runs disttrain and the hand-written Horovod
loop in the same two processes, an epoch of each in turn (``horovod_paired``): the like-for-like
comparison, since this VM's step time moves by up to 2x between launches and even between epochs.
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


def build_cnn():
    """The benchmark's CNN (seeded: the same initial weights everywhere)."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input(shape=(32, 32, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(10)])


def cnn_data(rank: int):
    """This rank's cached batches (``BATCH`` images a replica, repeated)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(rank)
    x = rng.normal(size=(BATCH * 8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=BATCH * 8).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).cache().repeat()


def report(args, *, steps_seconds: float, cpu_before: dict, per_rank: float, chief: bool) -> None:
    cpu = {k: (v - cpu_before.get(k, 0.0)) / args.steps for k, v in thread_cpu().items()}
    if chief:
        with open(args.out, "w") as f:
            json.dump({"per_rank": per_rank, "step_seconds": steps_seconds / args.steps,
                       "cpu_per_step": {k: v for k, v in cpu.items() if v > 0}}, f)


def meet(args) -> None:
    """Independent processes (no collective to wait in) start timing together: each one marks that its
    warm-up is done in ``args.meet`` and waits until ``args.meet_count`` have. Without it one process's
    timed steps overlap the other's start-up (import, tracing: more than one thread), which costs the
    timed one up to a third of its core."""
    if not args.meet:
        return
    with open(os.path.join(args.meet, f"ready-{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + args.timeout
    while len([n for n in os.listdir(args.meet) if n.startswith("ready-")]) < args.meet_count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other independent process did not finish its warm-up in {args.timeout:g} s")
        time.sleep(0.005)


def threads_of_one() -> None:
    """What a hand-written loop at 1 thread sets (disttrain does the same from DISTTRAIN_THREADS=1)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def horovod_hand_written_epoch():
    """Horovod's own recipe (examples/tensorflow2/tensorflow2_synthetic_benchmark.py, adapted to Keras 3):
    a ``tf.function`` step whose gradients go through one ``hvd.grouped_allreduce`` (the averaging
    ``hvd.DistributedGradientTape`` does), variables broadcast from rank 0 once. Returns ``epoch(steps)``."""
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf

    hvd.init()
    model = build_cnn()
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dataset = cnn_data(hvd.rank())

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        # what hvd.DistributedGradientTape does, written out: it cannot take Keras 3 variables (no .ref())
        grads = hvd.grouped_allreduce(tape.gradient(loss, model.trainable_variables), op=hvd.Average)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    # Keras 3 variables wrap a tf.Variable (``.value``), which is what Horovod assigns to
    hvd.broadcast_variables([v.value for v in model.variables + optimizer.variables], root_rank=0)

    def epoch(steps):  # as a user writes one: a new iterator, the steps, the epoch's mean loss over the ranks
        iterator, total = iter(dataset), tf.constant(0.0)
        for _ in range(steps):
            total += step(iterator)
        return float(hvd.allreduce(total / steps, op=hvd.Average))

    return epoch


def horovod_hand_written(args) -> None:
    threads_of_one()
    import horovod.tensorflow as hvd
    import tensorflow as tf

    epoch = horovod_hand_written_epoch()
    epoch(5)  # warm-up: tracing
    hvd.allreduce(tf.constant(0.0))  # a barrier
    cpu_before, start = thread_cpu(), time.perf_counter()
    epoch(args.steps)
    seconds = time.perf_counter() - start
    per_rank = float(hvd.allreduce(tf.constant(args.steps * BATCH / seconds), op=hvd.Average))
    report(args, steps_seconds=seconds, cpu_before=cpu_before, per_rank=per_rank, chief=hvd.rank() == 0)


def horovod_paired(args) -> None:
    """disttrain and the hand-written Horovod loop in the same two processes, one epoch each in turn
    (order alternating), ``args.pairs`` pairs: both meet the same machine state, which between launches
    (and between epochs) moves by up to 2x on this VM. Writes the per-step seconds (slower rank) of each."""
    import disttrain as dt

    backend = dt.get_backend("horovod")
    epochs = {"hand-written": horovod_hand_written_epoch(), "disttrain": disttrain_epoch(backend)}
    for epoch in epochs.values():
        epoch(5)  # warm-up: tracing
    synced = _common.synced_timer(backend)
    seconds = _common.interleaved({name: (lambda epoch=epoch: synced(lambda: epoch(args.steps), 1) / args.steps)
                                   for name, epoch in epochs.items()}, reps=args.pairs)  # order rotating
    if backend.is_chief:
        with open(args.out, "w") as f:
            json.dump({"paired": seconds}, f)


def multiworker_hand_written(args) -> None:
    """TensorFlow's custom-loop tutorial (distribute/multi_worker_with_ctl): ``strategy.run`` of a step
    with ``tf.nn.compute_average_loss`` on a distributed dataset, ``strategy.reduce`` of the loss."""
    threads_of_one()
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = strategy.cluster_resolver.task_id
    global_batch = BATCH * strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_cnn()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = strategy.distribute_datasets_from_function(lambda context: cnn_data(rank).with_options(options))

    @tf.function
    def step(iterator):
        def step_fn(batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)), global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        per_replica = strategy.run(step_fn, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def epoch(steps):  # as the tutorial's epoch: a new iterator, the steps, the mean of the reduced losses
        iterator, total = iter(dataset), tf.constant(0.0)
        for _ in range(steps):
            total += step(iterator)
        return float(total / steps)

    epoch(5)  # warm-up: tracing
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(0.0)), axis=None)  # a barrier
    cpu_before, start = thread_cpu(), time.perf_counter()
    epoch(args.steps)
    seconds = time.perf_counter() - start
    mean = strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(
        lambda: tf.constant(args.steps * BATCH / seconds)), axis=None)
    report(args, steps_seconds=seconds, cpu_before=cpu_before, per_rank=float(mean), chief=rank == 0)


def disttrain_epoch(backend):
    """disttrain's side: the same CNN, data and optimizer under ``backend``; returns ``epoch(steps)`` (one
    ``Trainer.fit`` of ``steps`` steps)."""
    import keras
    import tensorflow as tf

    import disttrain as dt

    with backend.scope():
        model = build_cnn()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(loss_fn(y, model(x, training=True)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def cached(context):
        return cnn_data(backend.rank)

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0)
    gb = BATCH * backend.num_replicas
    return lambda steps: trainer.fit(cached, global_batch_size=gb, steps_per_epoch=steps)


def worker(args) -> None:
    if args.backend == "horovod hand-written":
        return horovod_hand_written(args)
    if args.backend == "horovod paired":
        return horovod_paired(args)
    if args.backend == "multiworker hand-written":
        return multiworker_hand_written(args)
    import disttrain as dt

    options = {"cycle_time_ms": args.cycle_time_ms} if args.cycle_time_ms else {}
    backend = dt.get_backend(args.backend, **options)
    epoch = disttrain_epoch(backend)
    epoch(5)  # warm-up: tracing
    backend.barrier()
    meet(args)
    cpu_before, start = thread_cpu(), time.perf_counter()
    epoch(args.steps)
    seconds = time.perf_counter() - start
    rate = backend.all_reduce(args.steps * BATCH * backend.local_replicas / seconds, "mean")  # per rank
    report(args, steps_seconds=seconds, cpu_before=cpu_before, per_rank=rate, chief=backend.is_chief)


PROFILES: dict[str, dict] = {}  # kind -> the chief's last {"step_seconds", "cpu_per_step"}
PAIRED: dict[str, list[float]] = {}  # "disttrain" / "hand-written" -> seconds per step, epoch i of each a pair


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
        meeting = tempfile.mkdtemp(dir=tmp)
        cmds = [me + ["--backend", "single", "--out", o, "--meet", meeting, "--meet-count", "2"] for o in outs]
    elif kind.startswith("Horovod"):
        extra = ["--cycle-time-ms", str(args.cycle_time_ms)] if "cycle" in kind else []
        which = ("horovod hand-written" if "hand-written" in kind else "horovod paired" if "paired" in kind
                 else "horovod")
        extra += ["--pairs", str(args.pairs)] if "paired" in kind else []
        cmds = [[os.path.join(bindir, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"] + me +
                ["--backend", which, "--out", outs[0]] + extra]
    else:
        which = "multiworker hand-written" if "hand-written" in kind else "multiworker"
        cmds = [[os.path.join(bindir, "disttrain"), "launch", "--tf-config", "-n", "2", "--"] + me +
                ["--backend", which, "--out", outs[0]]]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    rates = []
    for proc, out in zip(procs, outs):
        _, err = proc.communicate(timeout=args.timeout)
        if proc.returncode or not os.path.exists(out):
            raise RuntimeError(f"{kind} failed (exit {proc.returncode}): {' '.join(proc.args)}\n{err[-4000:]}")
        with open(out) as f:
            result = json.load(f)
        if "paired" in result:  # per-step seconds of each side; the launch's value: disttrain's throughput
            for side, values in result["paired"].items():
                PAIRED.setdefault(side, []).extend(values)
            os.remove(out)
            return BATCH / statistics.median(result["paired"]["disttrain"])
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
    parser.add_argument("--pairs", type=int, default=2, help="epoch pairs per 'Horovod paired' launch")
    parser.add_argument("--kinds", default=None, help="comma-separated subset of the launches (development)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--meet", help=argparse.SUPPRESS)
    parser.add_argument("--meet-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    kinds = ["one process", "Horovod gloo", "Horovod hand-written", "Horovod paired", "MultiWorker",
             "MultiWorker hand-written", "2 independent"]
    if args.kinds:
        kinds = ["one process"] + [k for k in args.kinds.split(",") if k != "one process"]
    if args.cycle_time_ms:
        kinds.append(f"Horovod gloo, cycle {args.cycle_time_ms:g} ms")
    with tempfile.TemporaryDirectory() as tmp:
        rates = _common.interleaved({k: (lambda k=k: launch(k, args, tmp)) for k in kinds}, reps=args.reps)
    base = rates["one process"]
    for kind in kinds:  # for bench/scaling_model.py: seconds per step of one rank (median over repetitions)
        _common.measure(f"P4 step time, {kind}", BATCH / statistics.median(rates[kind]), "s",
                        f"{BATCH} images / median per-rank examples/s, CNN of P4, {kind}")
    rows = []
    for kind in [k for k in kinds[1:] if k != "Horovod paired"]:
        goal = ">= 0.9" if kind in ("Horovod gloo", "MultiWorker") else None
        detail = f"{statistics.median(rates[kind]):.0f} vs {statistics.median(base):.0f} examples/s per rank"
        if kind == "2 independent":
            detail += "; no communication: what the 2 cores give two processes"
        rows.append((f"P4 {kind}", f"per-rank throughput, 2 x 1 thread ({kind}) / 1 x 1 thread", _common.ratios(rates[kind], base),
                     goal, detail))
    # against the peers in the same run: the hand-written loops, and the machine's ceiling
    if PAIRED:
        ours, theirs = PAIRED["disttrain"], PAIRED["hand-written"]
        rows.append(("P4 Horovod gloo / Horovod hand-written, same processes", "per-rank throughput, disttrain / "
                     "the hand-written loop, alternating epochs in the same 2 Horovod processes",
                     _common.ratios(theirs, ours), ">= 0.97",
                     f"{BATCH / statistics.median(ours):.0f} vs {BATCH / statistics.median(theirs):.0f} examples/s "
                     f"per rank; {len(ours)} epoch pairs from {args.reps} launches"))
    for ours, theirs, goal in (("Horovod gloo", "Horovod hand-written", None),
                               ("MultiWorker", "MultiWorker hand-written", ">= 0.97"),
                               ("Horovod gloo", "2 independent", ">= 0.85"), ("MultiWorker", "2 independent", None)):
        if ours in rates and theirs in rates:
            rows.append((f"P4 {ours} / {theirs}", f"per-rank throughput, disttrain {ours} / {theirs}",
                         _common.ratios(rates[ours], rates[theirs]), goal,
                         f"{statistics.median(rates[ours]):.0f} vs {statistics.median(rates[theirs]):.0f} examples/s "
                         "per rank" + ("" if "hand" in theirs else "; the ceiling with no communication")))
    lines = ["## P4: weak scaling, compute-bound CNN, 2 ranks x 1 thread / 1 rank x 1 thread", "",
             f"Command: `{_common.command('p4_weak_scaling.py', argv)}`. CNN 4 x Conv2D(16/32) on 32x32x3, batch "
             f"{BATCH} per rank, SGD with momentum, {args.steps} timed steps after a warm-up; {args.reps} repetitions, "
             f"launches in rotating order. Load average: {_common.load()}.", ""]
    lines += _common.ratio_table(rows)
    kinds = [k for k in kinds if k in PROFILES]  # the paired launches keep no per-thread profile
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
