"""Cost of observability: step time with TensorBoard summaries + JSON-lines log on vs off.

Both trainers (same model and data) are built and warmed up in ONE process, then timed in interleaved
repetitions (off, on, on, off, ...) so machine noise hits both alike; the medians are compared. Prints
a self-contained Markdown section to stdout (progress goes to stderr):

    python bench/summaries.py [--reps 11] [--steps 300] [--log-every 50] [--histogram-every 500]

Wall time per step is the number that counts; the process CPU time per step is shown too because on a
shared machine it is much less sensitive to other people's jobs.

A second table compares, like for like, the two ways of writing the same events: what
``dt.TensorBoard`` does (one serialized ``Summary`` of scalar/histogram protos built in numpy, written
with ``tf.summary.experimental.write_raw_pb``) against ``tf.summary.scalar`` / ``tf.summary.histogram``
per value, for a step-log event (8 scalars) and a histogram event (the MLP's 6 weights and 6 gradients).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISTTRAIN_THREADS", "1")

import disttrain as dt  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="single")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions of each variant")
    parser.add_argument("--steps", type=int, default=300, help="train steps per repetition")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=50, help="step-log (scalar summary) interval")
    parser.add_argument("--histogram-every", type=int, default=500, help="weight+gradient histogram interval")
    parser.add_argument("--limit", type=float, default=1.05, help="the ratio the section reports against")
    parser.add_argument("--events", type=int, default=200, help="events per repetition in the writer comparison")
    return parser.parse_args(argv)


def build(backend, args, callbacks, log_every):
    import keras
    import tensorflow as tf

    with backend.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        optimizer = keras.optimizers.Adam(1e-3)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = ctx.average_loss(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, grads, model.trainable_variables)
        accuracy.update_state(y, logits)
        return loss

    return dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend,
                      metrics=[accuracy], callbacks=callbacks, verbose=0, log_every_steps=log_every)


def writer_costs(args, trainer) -> list[str]:
    """Raw Summary protos vs tf.summary ops, writing the same events to the same kind of writer."""
    import numpy as np
    import tensorflow as tf

    from disttrain import summaries

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common

    scalars = {f"step/value_{i}": 0.5 + i for i in range(8)}
    arrays = {f"weights/{v.path}": np.asarray(v) for v in trainer.model.trainable_variables}
    arrays.update({f"gradients/{v.path}": np.asarray(v) * 1e-3 for v in trainer.model.trainable_variables})
    root = tempfile.mkdtemp(prefix="disttrain-writers-")
    writers = {name: tf.summary.create_file_writer(os.path.join(root, name)) for name in ("raw", "tf")}

    def raw(kind: str, step: int) -> None:
        with writers["raw"].as_default():
            values = ([summaries.scalar_value(t, v) for t, v in scalars.items()] if kind == "scalars" else
                      [summaries.histogram_value(t, a) for t, a in arrays.items()])
            tf.summary.experimental.write_raw_pb(
                summaries.summary_pb2.Summary(value=values).SerializeToString(), step=step)

    def ops(kind: str, step: int) -> None:
        with writers["tf"].as_default():
            if kind == "scalars":
                for tag, value in scalars.items():
                    tf.summary.scalar(tag, value, step=step)
            else:
                for tag, array in arrays.items():
                    tf.summary.histogram(tag, array, step=step)

    rows = []
    for kind, events in (("scalars", args.events), ("histograms", max(10, args.events // 10))):
        variants = {"raw": lambda k=kind, n=events: _common.timed(lambda: [raw(k, i) for i in range(n)]) / n,
                    "tf": lambda k=kind, n=events: _common.timed(lambda: [ops(k, i) for i in range(n)]) / n}
        for fn in variants.values():
            fn()  # warm-up
        times = _common.interleaved(variants, reps=max(5, args.reps // 2))
        what = "8 scalars" if kind == "scalars" else f"{len(arrays)} histograms"
        rows.append((f"summaries {kind}", f"time per event ({what}), raw Summary protos / tf.summary ops",
                     _common.ratios(times["raw"], times["tf"]), "<= 1.0",
                     f"{statistics.median(times['raw']) * 1e3:.3f} vs {statistics.median(times['tf']) * 1e3:.3f} ms"))
    for writer in writers.values():
        writer.close()
    shutil.rmtree(root, ignore_errors=True)
    return ["", "### Writing the events: raw Summary protos (what dt.TensorBoard does) vs tf.summary ops", "",
            f"The same events written {args.events} (scalars) / {max(10, args.events // 10)} (histograms) times per "
            "repetition to a file writer each, interleaved; ratio < 1 means the raw protos are faster. Load "
            f"average: {_common.load()}.", ""] + _common.ratio_table(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = dt.get_backend(args.backend)
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    n = args.global_batch * 64
    x = rng.normal(size=(n, 64)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat()

    logdir = tempfile.mkdtemp(prefix="disttrain-bench-")
    on_callbacks = [dt.TensorBoard(logdir=logdir, histogram_every_steps=args.histogram_every, announce=False),
                    dt.JsonLinesLogger(os.path.join(logdir, "metrics.jsonl"))]
    trainers = {"off": build(backend, args, [], 0), "on": build(backend, args, on_callbacks, args.log_every)}

    def timed(name: str) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        trainers[name].fit(data, global_batch_size=args.global_batch, epochs=1, steps_per_epoch=args.steps)
        return (time.perf_counter() - start) / args.steps, (time.process_time() - cpu) / args.steps

    # Warm-up: traces the step (and the gradient-capturing variant for histograms) for both.
    warm_steps = max(args.steps, args.histogram_every or 0)
    for trainer in trainers.values():
        trainer.fit(data, global_batch_size=args.global_batch, epochs=1, steps_per_epoch=warm_steps)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu_times: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(args.reps):
        order = ("off", "on") if rep % 2 == 0 else ("on", "off")
        for name in order:
            wall, cpu = timed(name)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        print(f"rep {rep + 1}/{args.reps}: off {times['off'][-1] * 1e3:.3f} ms, on {times['on'][-1] * 1e3:.3f} ms",
              file=sys.stderr, flush=True)

    shutil.rmtree(logdir, ignore_errors=True)
    if not backend.is_chief:
        return 0
    writer_lines = writer_costs(args, trainers["on"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["on"] / med["off"]
    paired = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    command = "python bench/summaries.py" + ("" if argv is None and len(sys.argv) == 1 else
                                             " " + shlex.join(sys.argv[1:] if argv is None else argv))
    lines = [
        "## Cost of summaries (TensorBoard + JSON-lines log)",
        "",
        f"Command: `{command}`",
        "",
        f"Backend {backend.describe()}; MLP 64-256-256-10 with Adam and an accuracy metric, global batch "
        f"{args.global_batch}, {args.steps} steps per repetition, {args.reps} interleaved repetitions of each "
        f"variant in one process (after a warm-up). *On* = `log_every_steps={args.log_every}` (one all-reduce "
        f"of loss, metric states and timing; scalar summaries; a JSON line) and weight + gradient histograms "
        f"every {args.histogram_every} steps; *off* = no step logs, no callbacks. Wall time of `fit` per step.",
        "",
        "| variant | median step time (ms) | min (ms) | max (ms) | median CPU time per step (ms) |",
        "|---|---|---|---|---|",
    ]
    for name in ("off", "on"):
        lines.append(f"| summaries {name} | {med[name] * 1e3:.3f} | {min(times[name]) * 1e3:.3f} | "
                     f"{max(times[name]) * 1e3:.3f} | {cpu_med[name] * 1e3:.3f} |")
    verdict = "within" if ratio <= args.limit else "ABOVE"
    lines += ["", f"Step time ratio on / off of the medians: **{ratio:.3f}** ({verdict} the {args.limit:.2f} "
              f"target); median of the paired (same repetition) ratios: {paired:.3f}; CPU time ratio of the "
              f"medians: {cpu_med['on'] / cpu_med['off']:.3f}. Load average when done: "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.", ""]
    print("\n".join(lines + writer_lines + [""]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
