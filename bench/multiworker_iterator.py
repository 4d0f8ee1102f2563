"""MultiWorker diagnostic: under MultiWorkerMirroredStrategy, a ``tf.function`` first run after a
distributed-dataset iterator was created costs about twice the CPU of the same function first run before.

    python bench/multiworker_iterator.py

Two launches of 2 workers (``disttrain launch --tf-config -n 2``, 1 thread each). Each worker builds P4's
CNN and a training step that takes no input from the iterator (a fixed batch: the step never reads it),
creates an iterator over ``strategy.distribute_datasets_from_function`` (P4's cached batches) either
*before* or *after* the step's first run, then times 20 steps: wall and CPU time per step of the main
thread and TensorFlow's ``tf_Compute`` threads. Measured on 2026-12-04 (tensorflow-cpu 2.21, 2 cores):
``tf_Compute`` 74-77 ms per step with the iterator created first, 44-46 ms created after (and 37-40 ms
with no iterator at all), in both a hand-written step and disttrain's; tracing before the iterator and
running after does not help, deleting the iterator before the first run does not either. Related
reports without a diagnosis: tensorflow/tensorflow#48374, #60245.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import p4_weak_scaling as p4  # noqa: E402

STEPS = 20


def worker(order: str) -> None:
    p4.threads_of_one()
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = strategy.cluster_resolver.task_id
    with strategy.scope():
        model = p4.build_cnn()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = tf.random.normal([p4.BATCH, 32, 32, 3], seed=rank), tf.zeros([p4.BATCH], tf.int32)

    @tf.function
    def step():
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)),
                                                  global_batch_size=2 * p4.BATCH)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return strategy.run(fn)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = strategy.distribute_datasets_from_function(lambda context: p4.cnn_data(rank).with_options(options))
    if order == "before":
        iterator = iter(dataset)
    for _ in range(3):
        step()
    if order == "after":
        iterator = iter(dataset)  # noqa: F841 - it exists while the steps run, as in a training loop
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(0.0)), axis=None)  # a barrier
    before, start = p4.thread_cpu(), time.perf_counter()
    for _ in range(STEPS):
        step()
    float(strategy.reduce("SUM", step(), axis=None))
    wall = (time.perf_counter() - start) / STEPS
    after = p4.thread_cpu()
    if rank == 0:
        cpu = {k: (after[k] - before.get(k, 0.0)) / STEPS for k in after}
        print(f"RESULT {order} wall {wall * 1e3:.1f} tf_Compute {cpu.get('tf_Compute', 0) * 1e3:.1f} "
              f"all {sum(cpu.values()) * 1e3:.1f}", flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    disttrain = os.path.join(os.path.dirname(sys.executable), "disttrain")
    print("## MultiWorker: a step first run after a distributed iterator exists costs twice the CPU\n")
    print("Command: `python bench/multiworker_iterator.py`. 2 workers x 1 thread, P4's CNN, a step that reads no "
          f"input (a fixed batch), {STEPS} timed steps, rank 0; the iterator over "
          "`distribute_datasets_from_function` is created before or after the step's first run (bench/"
          f"multiworker_iterator.py says what else was tried). Load average: {_common.load()}.\n")
    print("| iterator created | wall ms / step | tf_Compute CPU ms / step | all threads CPU ms / step |")
    print("|---|---:|---:|---:|")
    for order in ("before", "after"):
        proc = subprocess.run([disttrain, "launch", "--tf-config", "-n", "2", "--", sys.executable,
                               os.path.abspath(__file__), "--worker", order], env=_common.worker_env(),
                              capture_output=True, text=True, timeout=300)
        line = next((l for l in proc.stdout.splitlines() if "RESULT" in l), None)  # noqa: E741
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            return 1
        values = line.split("RESULT ", 1)[1].split()
        print(f"| {order} the step's first run | {values[2]} | {values[4]} | {values[6]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
