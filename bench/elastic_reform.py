"""Elastic re-formation time: seconds from a worker's kill -9 (or a new host) to the next training step done.

    python bench/elastic_reform.py [--reps 5] [--backend multiworker|horovod]

One elastic launch (``disttrain launch --min-workers 1 --max-workers 2 --host-discovery-script ...``) of
a small MLP that trains until stopped, on 2 workers, checkpointing every 5 steps, rank 0 writing its last
step, the formation and the time to a file after every step. Each repetition:

* **loss**: kill -9 of worker 1; time from the kill to the first step done by the re-formed job (one
  worker, resumed from the last checkpoint): detection, killing the survivor, starting a process,
  TensorFlow's start-up, the restore, tracing the step;
* **join**: a new host line (``127.0.0.<k>:1``) in the discovery script's output; time from that write to
  the first step of the 2-worker formation: up to one discovery interval (1 s here), the stop at an
  agreed step with its checkpoint, then the same start-up as above.

The killed host's slot is out of use afterwards (disttrain's rule), so every join brings a new loopback
address. Reports the median, min and max over the repetitions; seconds, not ratios (no plot row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

WORKER = r"""
import json, os, sys, time
import disttrain as dt
backend = dt.get_backend("auto")
import keras, numpy as np, tensorflow as tf
out = sys.argv[1]
event = json.loads(os.environ["DISTTRAIN_ELASTIC_EVENT"])
with open(os.path.join(out, f"pid{backend.rank}"), "w") as f:
    f.write(str(os.getpid()))
x = np.random.default_rng(0).normal(size=(4096, 32)).astype("float32")
with backend.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(shape=(32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.01)
def step(ctx, batch):
    with tf.GradientTape() as tape:
        loss = ctx.average_loss(tf.reduce_mean(tf.square(model(batch, training=True)), axis=-1))
    ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return loss
class Progress(dt.Callback):
    def on_step_logs(self, trainer, step, logs):
        time.sleep(0.05)  # a slow step: leaves the CPU to the starting processes
        if backend.is_chief:
            with open(os.path.join(out, "step.tmp"), "w") as f:
                json.dump({"formation": event["formation"], "size": backend.size, "step": step, "time": time.time()}, f)
            os.replace(os.path.join(out, "step.tmp"), os.path.join(out, "step"))
trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                     callbacks=[Progress()], log_every_steps=1,
                     checkpointing=dt.Checkpointing(os.path.join(out, "ckpt"), every_steps=5, keep=1))
trainer.fit(tf.data.Dataset.from_tensor_slices(x), global_batch_size=64, epochs=100000)
"""


def read_step(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "step")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_step(out: str, *, formation: int, after_step: int = 0, proc: subprocess.Popen, timeout: float = 300
              ) -> dict:
    """The first step record of ``formation`` (at or after ``after_step`` steps of it)."""
    end = time.monotonic() + timeout
    while True:
        record = read_step(out)
        if record and record["formation"] >= formation and record["step"] >= after_step:
            return record
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"formation {formation} did no step within {timeout:.0f}s (launcher exit "
                               f"{proc.poll()})")
        time.sleep(0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", choices=("multiworker", "horovod"), default="multiworker")
    args = parser.parse_args(argv)
    out = tempfile.mkdtemp(prefix="disttrain-elastic-")
    worker, hosts = os.path.join(out, "worker.py"), os.path.join(out, "hosts")
    with open(worker, "w") as f:
        f.write(WORKER)
    with open(hosts, "w") as f:
        f.write("127.0.0.1:1\n127.0.0.2:1\n")
    script = os.path.join(out, "discover.sh")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\ncat {hosts}\n")
    os.chmod(script, 0o755)
    cmd = [os.path.join(os.path.dirname(sys.executable), "disttrain"), "launch", "--backend", args.backend,
           "--min-workers", "1", "--max-workers", "2", "--host-discovery-script", script, "--discovery-interval", "1",
           worker, out]
    log = open(os.path.join(out, "launcher.log"), "w")
    proc = subprocess.Popen(cmd, env=_common.worker_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    loss, join, formation, next_host = [], [], 1, 3
    try:
        wait_step(out, formation=1, after_step=12, proc=proc)
        for _ in range(args.reps):
            with open(os.path.join(out, "pid1")) as f:
                victim = int(f.read())
            start = time.time()
            os.kill(victim, signal.SIGKILL)
            formation += 1
            loss.append(wait_step(out, formation=formation, proc=proc)["time"] - start)
            wait_step(out, formation=formation, after_step=read_step(out)["step"] + 7, proc=proc)
            start = time.time()
            with open(hosts, "a") as f:
                f.write(f"127.0.0.{next_host}:1\n")
            next_host += 1
            formation += 1
            join.append(wait_step(out, formation=formation, proc=proc)["time"] - start)
            wait_step(out, formation=formation, after_step=read_step(out)["step"] + 7, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(out, ignore_errors=True)
    lines = ["## elastic_reform", "",
             f"Command: `{_common.command('elastic_reform.py', argv)}`. One elastic launch ({args.backend}, 2 workers, "
             f"--min-workers 1, discovery every 1 s, checkpoints every 5 steps); {args.reps} repetitions of a kill -9 "
             f"of worker 1 and a new host. Load average: {_common.load()}.", "",
             "| event | seconds to the next step done: median (min-max) | each |", "|---|---|---|",
             f"| worker lost (kill -9) -> 1 worker | {_spread(loss)} | {', '.join(f'{v:.1f}' for v in loss)} |",
             f"| host joined (discovery) -> 2 workers | {_spread(join)} | {', '.join(f'{v:.1f}' for v in join)} |", ""]
    print("\n".join(lines))
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    sys.exit(main())
