"""How far N replicas drift from one device in float32: the README's equivalence claim, measured.

Trains the conv net of examples/custom_training.py (TF's tf.distribute tutorial: two regularised
convolutions, two dense layers) on the 8x8 digits with the same global batch (64) and seed on each
backend, and records all weights after steps 16 and 48 (and the loss of each step). Run it once per
backend, then compare:

    python bench/drift.py --backend single --out /tmp/single.npz
    python bench/drift.py --backend mirrored --cpu-replicas 2 --out /tmp/mirrored.npz
    python bench/drift.py --compare /tmp/single.npz /tmp/mirrored.npz

The relative drift is ``||w_N - w_1|| / ||w_1||`` over all weights, and the largest relative
difference of a step's loss. The exact input split gives both the same examples in every step; the
difference is only float32 rounding (a sum over 2 replicas is added in another order than one
device's sum over the batch), which training then amplifies, the more the more adaptive the optimizer.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

CHECKPOINTS = (16, 48)


def train(args) -> None:
    import disttrain as dt

    backend = dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)
    import keras
    import numpy as np
    import tensorflow as tf
    from custom_training import create_model, datasets

    train_data, _ = datasets(tf)
    with backend.scope():
        keras.utils.set_random_seed(0)
        model = create_model(keras)
        optimizer = keras.optimizers.Adam(1e-3) if args.optimizer == "adam" else keras.optimizers.SGD(0.1)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def step(ctx, batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(loss_object(labels, model(images, training=True)))
            loss += ctx.scale_regularization_loss(tf.add_n(model.losses))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    class Record(dt.Callback):
        def __init__(self):
            self.weights, self.losses = {}, []

        def on_step_logs(self, trainer, step, logs):
            self.losses.append(logs["loss"])

        def on_epoch_end(self, trainer, epoch, logs):
            if trainer.global_step in CHECKPOINTS:
                self.weights[trainer.global_step] = np.concatenate([v.numpy().ravel() for v in model.weights])

    record = Record()
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                         callbacks=[record], log_every_steps=1)
    # epochs of 16 steps (of the 22 the 1,437 training digits give), reshuffled every epoch
    trainer.fit(train_data, global_batch_size=64, steps_per_epoch=16, epochs=CHECKPOINTS[-1] // 16, shuffle_seed=0)
    if backend.is_chief:
        np.savez(args.out, losses=np.array(record.losses), replicas=backend.num_replicas,
                 **{f"w{k}": v for k, v in record.weights.items()})


def compare(one: str, many: str) -> None:
    import numpy as np

    a, b = np.load(one), np.load(many)
    print(f"{os.path.basename(one)} ({int(a['replicas'])} replica) vs {os.path.basename(many)} "
          f"({int(b['replicas'])} replicas)")
    for k in CHECKPOINTS:
        w1, wn = a[f"w{k}"], b[f"w{k}"]
        losses = np.abs(a["losses"][:k] - b["losses"][:k]) / np.abs(a["losses"][:k])
        print(f"  after {k} steps: weights {np.linalg.norm(wn - w1) / np.linalg.norm(w1):.1e} relative, "
              f"running mean loss {losses.max():.1e} relative (largest over the steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="single")
    parser.add_argument("--cpu-replicas", type=int, default=None)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", nargs=2, default=None, metavar=("ONE_DEVICE", "N_REPLICAS"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.out:
        train(args)
    else:  # as `make bench` runs it: the three commands above, as a section of the page
        both()


def both() -> None:
    import subprocess
    import tempfile

    print("## Drift: 2 Mirrored replicas against one device (float32)\n")
    print(f"Command: `python bench/drift.py` (the three commands of its docstring), {CHECKPOINTS} steps.\n")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"single": [], "mirrored": ["--cpu-replicas", "2"]}
        for name, extra in runs.items():
            subprocess.run([sys.executable, __file__, "--backend", name, *extra, "--out", f"{tmp}/{name}.npz"],
                           check=True, timeout=600, env=dict(os.environ, DISTTRAIN_THREADS="1"))
        print("```")
        compare(f"{tmp}/single.npz", f"{tmp}/mirrored.npz")
        print("```")


if __name__ == "__main__":
    main()
