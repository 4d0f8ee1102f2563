"""Horovod's examples/tensorflow2/tensorflow2_synthetic_benchmark.py, ported to disttrain.

The same benchmark: a fixed random batch per replica, SGD(0.01), warm-up batches, then ``--epochs``
iterations (Horovod's ``--num-iters``) of ``--num-batches-per-iter`` batches, each printed as img/sec
per device, then the mean and the total. The figures leave out the calls that traced the step (as
Horovod's warm-up does), so they can be set beside Horovod's. By default the model is a small conv net
on 32x32 images (``--model small``), since ResNet50 on 224x224 takes minutes per step on a few CPU
cores; ``--model ResNet50`` (any ``keras.applications`` name, ``weights=None``: no download) runs
Horovod's. The same file runs on one device, Mirrored, MultiWorker and Horovod:

    horovodrun -np 2 python examples/synthetic_benchmark.py            # as Horovod's
    python examples/synthetic_benchmark.py --backend mirrored --cpu-replicas 2
    horovodrun -np 4 python examples/synthetic_benchmark.py --model ResNet50 --fp16-allreduce
"""

from __future__ import annotations

import sys

import disttrain as dt
import example_args


def main(argv=None) -> int:
    parser = example_args.parser("disttrain port of Horovod's TensorFlow 2 synthetic benchmark", epochs=10,
                                 global_batch=None)  # --epochs: the benchmark iterations (Horovod's --num-iters)
    parser.add_argument("--fp16-allreduce", action="store_true", help="use fp16 compression during allreduce")
    parser.add_argument("--model", default="small", help="'small' (a conv net on 32x32) or a keras.applications name")
    parser.add_argument("--batch-size", type=int, default=32, help="input batch size (per device)")
    parser.add_argument("--num-warmup-batches", type=int, default=10)
    parser.add_argument("--num-batches-per-iter", type=int, default=10)
    args = parser.parse_args(argv)
    # Horovod: hvd.init(), the GPU pinning and hvd.Compression.fp16: one call
    backend = dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas,
                             compression="fp16" if args.fp16_allreduce else "none")
    import keras
    import numpy as np
    import tensorflow as tf

    size = 32 if args.model == "small" else 224
    with backend.scope():  # Horovod: nothing (one device per process)
        keras.utils.set_random_seed(0)
        if args.model == "small":
            model = keras.Sequential([
                keras.Input(shape=(size, size, 3)),
                keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
                keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(1000, activation="softmax"),
            ])
        else:
            model = getattr(keras.applications, args.model)(weights=None)
        opt = keras.optimizers.SGD(0.01)

    rng = np.random.default_rng(backend.rank)
    data = rng.uniform(size=(args.batch_size, size, size, 3)).astype("float32")
    target = rng.integers(0, 999, size=(args.batch_size, 1))
    # Every replica reads the whole fixed batch, forever: the per-replica batch is Horovod's --batch-size.
    dataset = dt.data.from_dataset(tf.data.Dataset.from_tensor_slices((data, target)).repeat(), sharding="off")

    def benchmark_step(ctx, batch):  # Horovod: @tf.function def benchmark_step(first_batch)
        images, labels = batch
        with tf.GradientTape() as tape:  # Horovod: hvd.DistributedGradientTape(tape, compression=...)
            probs = model(images, training=True)
            loss = ctx.average_loss(keras.losses.sparse_categorical_crossentropy(labels, probs))
        gradients = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(opt, gradients, model.trainable_variables)  # Horovod: opt.apply_gradients(zip(...))
        return loss  # Horovod: hvd.broadcast_variables after the first batch: done by the Trainer

    def log(s):
        if backend.is_chief:  # Horovod: hvd.rank() == 0
            print(s, flush=True)

    device = "CPU" if not tf.config.list_logical_devices("GPU") else "GPU"
    log(f"Model: {args.model}")
    log(f"Batch size: {args.batch_size}")
    log(f"Number of {device}s: {backend.num_replicas}")
    trainer = dt.Trainer(model=model, optimizer=opt, train_step=benchmark_step, backend=backend, verbose=0)
    global_batch = args.batch_size * backend.num_replicas
    log("Running warmup...")
    trainer.fit(dataset, global_batch_size=global_batch, steps_per_epoch=args.num_warmup_batches, epochs=1)
    log("Running benchmark...")
    history = trainer.fit(dataset, global_batch_size=global_batch, steps_per_epoch=args.num_batches_per_iter,
                          epochs=args.epochs)
    # examples_per_sec is global and leaves out calls that traced; per device as Horovod prints it
    img_secs = [v / backend.num_replicas for v in history["examples_per_sec"][-args.epochs:]]  # not the warm-up
    for x, img_sec in enumerate(img_secs):
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device}")
    img_sec_mean, img_sec_conf = np.mean(img_secs), 1.96 * np.std(img_secs)
    log(f"Img/sec per {device}: {img_sec_mean:.1f} +-{img_sec_conf:.1f}")
    log(f"Total img/sec on {backend.num_replicas} {device}(s): {backend.num_replicas * img_sec_mean:.1f} "
        f"+-{backend.num_replicas * img_sec_conf:.1f}")
    example_args.write_record(args, backend, {"history": history, "replicas": backend.num_replicas,
                                              "img_secs": img_secs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
