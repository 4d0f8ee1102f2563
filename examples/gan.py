"""A GAN: two models, two optimizers, alternating updates in one step, on every backend.

The generator maps 4-d noise to 2-d points; the discriminator tells them from real points drawn from
N((2, -1), 0.5^2). Each step first updates the discriminator, then the generator (with the updated
discriminator), each with its own Adam. The noise is part of the dataset (one noise vector per real
example), so the exact input split gives every backend the single device's global batches: 2 replicas
match one device. disttrain builds each optimizer on its own model's variables (optimizer i on model i).

    python examples/gan.py                                   # one device
    python examples/gan.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/gan.py                  # Horovod
    disttrain launch -n 2 examples/gan.py                    # MultiWorkerMirrored

With ``--save-dir DIR`` the trained generator is saved for serving (``DIR/generator_serving``, a
SavedModel) and as a Keras file (``DIR/generator.keras``), once, by the chief; every process then loads
both back and checks they generate what the trained generator does.
"""

from __future__ import annotations

import os
import sys

import disttrain as dt
import example_args

REAL_MEAN = (2.0, -1.0)


def main(argv=None) -> int:
    parser = example_args.parser("disttrain example: a GAN with two models and two optimizers", epochs=8)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--save-dir", default=None, help="save the generator here (SavedModel and .keras)")
    args = parser.parse_args(argv)
    backend = example_args.backend_of(args)
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    real = (np.array(REAL_MEAN) + 0.5 * rng.normal(size=(args.examples, 2))).astype("float32")
    noise = rng.normal(size=(args.examples, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((real, noise))
    probe = rng.normal(size=(256, 4)).astype("float32")  # fixed noise to look at the generator with

    with backend.scope():  # both models and both optimizers inside the scope
        keras.utils.set_random_seed(0)
        generator = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(16, activation="relu"),
                                      keras.layers.Dense(2)], name="generator")
        discriminator = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(16, activation="relu"),
                                          keras.layers.Dense(1)], name="discriminator")
        g_optimizer = keras.optimizers.Adam(1e-2, beta_1=0.5)
        d_optimizer = keras.optimizers.Adam(1e-2, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)  # one loss per example

    def train_step(ctx, batch):
        real_points, z = batch
        ones, zeros = tf.ones([tf.shape(z)[0], 1]), tf.zeros([tf.shape(z)[0], 1])
        with tf.GradientTape() as tape:  # 1. the discriminator: real -> 1, generated -> 0
            fake = generator(z, training=True)
            d_loss = ctx.average_loss(bce(ones, discriminator(real_points, training=True)) +
                                      bce(zeros, discriminator(fake, training=True)))
        grads = tape.gradient(d_loss, discriminator.trainable_variables)
        ctx.apply_gradients(d_optimizer, grads, discriminator.trainable_variables)
        with tf.GradientTape() as tape:  # 2. the generator: make the (updated) discriminator say 1
            g_loss = ctx.average_loss(bce(ones, discriminator(generator(z, training=True), training=True)))
        grads = tape.gradient(g_loss, generator.trainable_variables)
        ctx.apply_gradients(g_optimizer, grads, generator.trainable_variables)
        return {"d_loss": d_loss, "g_loss": g_loss}

    start_distance = float(np.linalg.norm(generator(probe).numpy().mean(0) - REAL_MEAN))
    trainer = dt.Trainer(model=[generator, discriminator], optimizer=[g_optimizer, d_optimizer],
                         train_step=train_step, backend=backend)
    history = trainer.fit(data, global_batch_size=args.global_batch, epochs=args.epochs, shuffle_seed=0)
    generated = generator(probe).numpy()
    distance = float(np.linalg.norm(generated.mean(0) - REAL_MEAN))
    record = {"history": history, "replicas": backend.num_replicas, "start_distance": start_distance,
              "distance": distance, "generated_mean": generated.mean(0).tolist()}
    if backend.is_chief:
        print(f"generated mean {np.round(generated.mean(0), 3).tolist()} (real {list(REAL_MEAN)}): distance "
              f"{start_distance:.3f} -> {distance:.3f}", flush=True)
    if args.save_dir:
        serving = trainer.save_model(os.path.join(args.save_dir, "generator_serving"), model=generator)
        keras_file = trainer.save_model(os.path.join(args.save_dir, "generator.keras"), model=generator)
        loaded = tf.saved_model.load(serving)  # keep a reference while serve() runs
        served = loaded.serve(tf.constant(probe)).numpy()
        reloaded = keras.models.load_model(keras_file)(probe).numpy()
        # every process loaded the chief's copy: the largest difference over all of them
        record["served_max_diff"] = backend.all_reduce(float(np.abs(served - generated).max()), "max")
        record["keras_max_diff"] = backend.all_reduce(float(np.abs(reloaded - generated).max()), "max")
        record["saved"] = sorted(os.listdir(args.save_dir)) if backend.is_chief else None
    example_args.write_record(args, backend, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
