"""TensorFlow's tutorial "Custom training with tf.distribute.Strategy", ported to disttrain.

https://www.tensorflow.org/tutorials/distribute/custom_training trains this conv net on Fashion-MNIST
with MirroredStrategy. Fashion-MNIST is downloaded at run time, which is impossible here, so this port
trains on the 8x8 handwritten digits of examples/data (1,797 real images, no download); with 8x8
inputs the convolutions use ``padding="same"`` (the tutorial's 28x28 need none). Everything else is the
tutorial's code; each changed line says what it was (``# tutorial: ...``): docs/porting.md has the
side-by-side table. The same file runs on one device, Mirrored, MultiWorker and Horovod.

    python examples/custom_training.py --backend mirrored --cpu-replicas 2
    horovodrun -np 2 python examples/custom_training.py
"""

from __future__ import annotations

import sys

import disttrain as dt
import example_args


def create_model(keras):
    """The tutorial's model, with ``padding="same"`` for 8x8 images."""
    regularizer = keras.regularizers.L2(1e-5)
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1)),  # tutorial: (28, 28, 1) inferred on the first call
        keras.layers.Conv2D(32, 3, activation="relu", padding="same", kernel_regularizer=regularizer),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu", padding="same", kernel_regularizer=regularizer),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu", kernel_regularizer=regularizer),
        keras.layers.Dense(10, kernel_regularizer=regularizer),
    ])


def datasets(tf, validation: int = 360):
    """(train, test) datasets of unbatched (8x8x1 image in [0, 1], label) examples: a fixed split."""
    import numpy as np
    from digits_data import load_digits

    images, labels = load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    x = (images[order] / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    y = labels[order].astype("int64")
    return (tf.data.Dataset.from_tensor_slices((x[validation:], y[validation:])),
            tf.data.Dataset.from_tensor_slices((x[:validation], y[:validation])))


def main(argv=None) -> int:
    parser = example_args.parser("disttrain port of TF's custom training tutorial", epochs=3, global_batch=None)
    parser.add_argument("--batch-per-replica", type=int, default=64)
    parser.add_argument("--checkpoint-dir", default=None, help="save a checkpoint every 2 epochs here")
    args = parser.parse_args(argv)
    backend = example_args.backend_of(args)  # tutorial: strategy = tf.distribute.MirroredStrategy()
    import keras
    import tensorflow as tf

    train_dataset, test_dataset = datasets(tf)  # tutorial: .shuffle(BUFFER_SIZE).batch(GLOBAL_BATCH_SIZE), distributed
    GLOBAL_BATCH_SIZE = args.batch_per_replica * backend.num_replicas  # tutorial: strategy.num_replicas_in_sync

    with backend.scope():  # tutorial: with strategy.scope():
        loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

        def compute_loss(ctx, labels, predictions, model_losses):  # tutorial: compute_loss(labels, ...)
            per_example_loss = loss_object(labels, predictions)
            loss = ctx.average_loss(per_example_loss)  # tutorial: tf.nn.compute_average_loss(per_example_loss)
            if model_losses:
                loss += ctx.scale_regularization_loss(tf.add_n(model_losses))  # tutorial: tf.nn.scale_...
            return loss

        test_loss = keras.metrics.Mean(name="test_loss")
        train_accuracy = keras.metrics.SparseCategoricalAccuracy(name="train_accuracy")
        test_accuracy = keras.metrics.SparseCategoricalAccuracy(name="test_accuracy")
        keras.utils.set_random_seed(0)
        model = create_model(keras)
        optimizer = keras.optimizers.Adam(learning_rate=0.001)

    def train_step(ctx, inputs):  # tutorial: def train_step(inputs):
        images, labels = inputs
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = compute_loss(ctx, labels, predictions, model.losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, gradients, model.trainable_variables)  # tutorial: optimizer.apply_gradients
        train_accuracy.update_state(labels, predictions)
        return loss

    def test_step(ctx, inputs):
        images, labels, mask = inputs  # tutorial: images, labels = inputs (disttrain pads the last batch: mask)
        predictions = model(images, training=False)
        t_loss = loss_object(labels, predictions)
        test_loss.update_state(t_loss, sample_weight=mask)
        test_accuracy.update_state(labels, predictions, sample_weight=mask)

    # tutorial: distributed_train_step / distributed_test_step (strategy.run + strategy.reduce), the epoch
    # loop, the metrics' reset_states and checkpoint.save every 2 epochs: all done by the trainer.
    checkpointing = None
    if args.checkpoint_dir:
        steps_per_epoch = (1797 - 360) // GLOBAL_BATCH_SIZE
        checkpointing = dt.Checkpointing(args.checkpoint_dir, every_steps=2 * steps_per_epoch)
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=test_step,
                         backend=backend, metrics=[train_accuracy], eval_metrics=[test_loss, test_accuracy],
                         checkpointing=checkpointing)
    history = trainer.fit(train_dataset, global_batch_size=GLOBAL_BATCH_SIZE, epochs=args.epochs, shuffle_seed=0,
                          validation_data=test_dataset)
    if backend.is_chief:
        for epoch in range(len(history["loss"])):  # the tutorial's report, from the global numbers
            print(f"Epoch {epoch + 1}, Loss: {history['loss'][epoch]}, Accuracy: "
                  f"{history['train_accuracy'][epoch] * 100}, Test Loss: {history['val_test_loss'][epoch]}, "
                  f"Test Accuracy: {history['val_test_accuracy'][epoch] * 100}", flush=True)
    example_args.write_record(args, backend, {"history": history, "replicas": backend.num_replicas,
                                              "global_batch_size": GLOBAL_BATCH_SIZE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
