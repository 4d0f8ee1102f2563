"""Cost of the fault checks on a healthy run: step time with each check / with all of them off.

    python bench/fault_checks.py [--reps 5] [--scale 1.0]

One device, 1 thread, the Trainer with the same model, data and batch in every variant (P1's tiny MLP
and its 3x1024 MLP, Adam), one epoch per repetition after a warm-up epoch, variants interleaved:
* off: ``on_nonfinite="ignore"``, no watchdog, no drift check (the behaviour before these checks);
* nonfinite: ``on_nonfinite="raise"`` (the default): finiteness flags of the loss and the gradients,
  carried in the gradients' reduction, and the update under a ``tf.cond``;
* watchdog: ``step_timeout=600``: in-graph marks of the batch and the gradients, a timed phase per call;
* drift: ``drift_check_every_steps=100``: a checksum of every variable and one all-reduce every 100 steps.
On one device no check communicates; with several ranks the flags ride in the gradients' all-reduce
and the drift check adds one small all-reduce per N steps.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISTTRAIN_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import disttrain as dt  # noqa: E402
from p1_step_time import MODELS, build, data  # noqa: E402

VARIANTS = {"off": dict(on_nonfinite="ignore"), "nonfinite": dict(on_nonfinite="raise"),
            "watchdog": dict(on_nonfinite="ignore", step_timeout=600),
            "drift": dict(on_nonfinite="ignore", drift_check_every_steps=100)}


def trainer_epoch(backend, widths, batch, steps, options):
    import tensorflow as tf

    model, optimizer = build(widths, backend)

    def train_step(ctx, b):
        x, y = b
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                         **options)
    dataset = data(widths, batch, steps)
    return lambda: trainer.fit(dataset, global_batch_size=batch, epochs=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the steps per repetition")
    args = parser.parse_args(argv)
    backend = dt.get_backend("single")
    rows = []
    for name, (widths, batch, steps) in MODELS.items():
        steps = max(16, int(steps * args.scale))
        variants = {k: trainer_epoch(backend, widths, batch, steps, options) for k, options in VARIANTS.items()}
        per_step, ms = _common.epoch_times(variants, steps=steps, reps=args.reps)
        for check, goal in (("nonfinite", "<= 1.03"), ("watchdog", "<= 1.03"), ("drift", "<= 1.03")):
            rows.append((f"F {name.split()[0]} {check}", f"{check} / off, {name}, batch {batch}",
                         _common.ratios(per_step[check], per_step["off"]), goal,
                         f"{ms[check]:.3f} vs {ms['off']:.3f} ms/step, {steps} steps a repetition"))
    lines = ["## Cost of the fault checks (one device, 1 thread)", "",
             f"Command: `{_common.command('fault_checks.py', argv)}`. {args.reps} interleaved repetitions of one "
             "epoch each after a warm-up epoch; ratio per repetition pair; each check alone against all off. Load "
             f"average: {_common.load()}.", ""]
    lines += _common.ratio_table(rows) + [""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
