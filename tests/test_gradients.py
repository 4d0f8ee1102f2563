"""Gradient reduction options, buckets, Horovod's start-up settings and gradient accumulation
(in-process, single device, no launches).

The reductions themselves (compressed sums, single application, buckets) and accumulation run on every
backend in tests/test_equivalence.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import disttrain as dt
from disttrain.backends import gradients
from disttrain.backends.horovod import horovod_env
from disttrain.backends.single import SingleBackend


def test_buckets_run_last_tensor_first_and_close_at_the_size():
    tensors = [tf.zeros([256]), tf.zeros([10]), tf.zeros([512]), tf.zeros([64])]  # 1024, 40, 2048, 256 bytes
    assert gradients.buckets(tensors, 0) == [[0, 1, 2, 3]]
    assert gradients.buckets(tensors, 1024) == [[3, 2], [1, 0]]
    assert gradients.buckets(tensors, 100) == [[3], [2], [1, 0]]
    assert gradients.buckets([], 100) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="compression 'int8' is not supported; use one of 'none', 'fp16', 'bf16'"):
        dt.GradientOptions(compression="int8")
    with pytest.raises(ValueError, match=r"bucket_mb=-1 must be >= 0"):
        dt.GradientOptions(bucket_mb=-1)


def test_one_replica_sends_nothing_and_casts_nothing():
    grads = [tf.constant([1.0001, 2.0]), None]
    out = gradients.reduce_gradients(grads, options=dt.GradientOptions(compression="fp16"), num_replicas=1,
                                     sum_bucket=lambda bucket: pytest.fail("no collective with one replica"))
    assert out[1] is None and out[0] is grads[0]


def test_compressed_buckets_come_back_in_their_own_dtype_and_place():
    seen = []

    def fake_sum(bucket):  # records what goes on the wire; "sums" two identical replicas
        seen.append([t.dtype for t in bucket])
        return [t + t for t in bucket]

    grads = [tf.constant([1.0001, 3.0]), None, tf.constant([[0.1]], tf.float64), tf.constant([7], tf.int32)]
    out = gradients.reduce_gradients(grads, options=dt.GradientOptions(compression="fp16", bucket_mb=1e-6),
                                     num_replicas=2, sum_bucket=fake_sum)
    assert seen == [[tf.int32], [tf.float16], [tf.float16]]  # last first; one tensor per bucket here
    assert out[1] is None and [g.dtype for g in (out[0], out[2], out[3])] == [tf.float32, tf.float64, tf.int32]
    assert out[0].numpy().tolist() == [2.0, 6.0]  # 1.0001 does not survive fp16: 1.0 + 1.0
    assert out[3].numpy().tolist() == [14]


def test_horovod_settings_become_its_environment():
    assert horovod_env() == {}
    assert horovod_env(fusion_threshold_mb=64, cycle_time_ms=2.5) == {
        "HOROVOD_FUSION_THRESHOLD": str(64 << 20), "HOROVOD_CYCLE_TIME": "2.5"}
    assert horovod_env(fusion_threshold_mb=0) == {"HOROVOD_FUSION_THRESHOLD": "0"}
    with pytest.raises(ValueError, match="fusion_threshold_mb=-1 must be >= 0"):
        horovod_env(fusion_threshold_mb=-1)
    with pytest.raises(ValueError, match="cycle_time_ms=0 must be > 0"):
        horovod_env(cycle_time_ms=0)


class CountingBackend(SingleBackend):
    """Counts the gradient reductions traced into the step."""

    reductions = 0

    def reduce_gradients(self, grads):
        type(self).reductions += 1
        return super().reduce_gradients(grads)


def _accumulated_run(backend, accumulation_steps, *, step=None):
    with backend.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.01)

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True) ** 2))
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step or train_step, backend=backend, verbose=0,
                         accumulation_steps=accumulation_steps)
    history = trainer.fit(data, global_batch_size=16, epochs=2, shuffle_seed=1)
    return [v.numpy() for v in model.trainable_variables], history, int(optimizer.iterations.numpy())


def test_accumulated_micro_batches_give_the_batch_update_with_one_reduction():
    backend = CountingBackend(device="/cpu:0")
    whole, whole_history, whole_steps = _accumulated_run(backend, 1)
    CountingBackend.reductions = 0
    parts, parts_history, parts_steps = _accumulated_run(backend, 4)
    assert CountingBackend.reductions == 1  # traced once: one reduction for the 4 micro-batches
    assert parts_steps == whole_steps == 12  # one optimizer step per global batch
    for a, b in zip(parts, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert parts_history["loss"] == pytest.approx(whole_history["loss"], rel=1e-5)


def test_accumulation_errors_say_what_to_do():
    backend = SingleBackend(device="/cpu:0")
    with pytest.raises(ValueError, match="accumulation_steps=0 must be an integer >= 1"):
        _accumulated_run(backend, 0)
    with pytest.raises(ValueError, match="global batch 16 gives 16 examples a replica, which do not split into "
                                         "accumulation_steps=3 micro-batches; use a multiple of 3"):
        _accumulated_run(backend, 3)

    def clipping_step(ctx, batch):
        ctx.reduce_gradients([tf.ones([1])])

    with pytest.raises(ValueError, match="ctx.reduce_gradients is not available with accumulation_steps > 1"):
        _accumulated_run(backend, 2, step=clipping_step)


def test_loss_scale_optimizer_skips_nonfinite_steps_and_the_logs_count_them():
    """A real inf in one batch: that step is skipped (weights unchanged, loss scale halved), counted."""
    backend = SingleBackend(device="/cpu:0")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with backend.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="tanh"),
                                      keras.layers.Dense(1, dtype="float32")])
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    weights = []

    class Snap(dt.Callback):
        def on_step_logs(self, trainer, step, logs):
            weights.append((step, logs["skipped_fraction"], [v.numpy().copy() for v in model.trainable_variables]))

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1))
            scaled = optimizer.scale_loss(loss)
        ctx.apply_gradients(optimizer, tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
        return loss

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    x[37] = np.inf  # in the third batch of 16
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, backend=backend, verbose=0,
                         log_every_steps=1, callbacks=[Snap()])
    history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)), global_batch_size=16, epochs=1)
    assert history["skipped_fraction"] == [0.25]  # 1 of 4 steps
    assert [w[1] for w in weights] == [0.0, 0.0, 1 / 3, 0.25]  # running share after steps 1..4
    assert all(np.array_equal(a, b) for a, b in zip(weights[1][2], weights[2][2]))  # step 3 changed nothing
    assert not all(np.array_equal(a, b) for a, b in zip(weights[2][2], weights[3][2]))  # step 4 did
    assert int(optimizer.iterations.numpy()) == 3 and float(optimizer.dynamic_scale.numpy()) == 2.0 ** 14
