"""In-process checks (single device) of what a user porting from Horovod or tf.distribute reaches for:
several optimizers built for them, a model saved for serving and loaded back, throughput without tracing."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import disttrain as dt
from disttrain.backends.single import SingleBackend


@pytest.fixture(scope="module")
def backend():
    return SingleBackend(device="/cpu:0")


def _dense(backend, name, inputs=2, units=1):
    with backend.scope():
        return keras.Sequential([keras.Input(shape=(inputs,)), keras.layers.Dense(units)], name=name)


def test_unbuilt_optimizers_are_built_each_on_its_own_model(backend):
    generator, discriminator = _dense(backend, "gen", 2, 3), _dense(backend, "disc", 3, 1)
    with backend.scope():
        g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
    assert not g_opt.built and not d_opt.built
    dt.Trainer(model=[generator, discriminator], optimizer=[g_opt, d_opt], train_step=lambda ctx, b: 0.0,
               backend=backend, verbose=0)
    assert g_opt.built and d_opt.built
    # Adam's slots have the shapes of the variables each optimizer updates: (2, 3) + (3,) and (3, 1) + (1,)
    slots = lambda opt: sorted(tuple(v.shape) for v in opt.variables if len(v.shape))  # noqa: E731
    assert slots(g_opt) == [(2, 3), (2, 3), (3,), (3,)], slots(g_opt)
    assert slots(d_opt) == [(1,), (1,), (3, 1), (3, 1)], slots(d_opt)


def test_optimizers_that_do_not_pair_with_the_models_are_refused(backend):
    models = [_dense(backend, f"m{i}") for i in range(3)]
    with backend.scope():
        optimizers = [keras.optimizers.Adam(), keras.optimizers.SGD()]
    with pytest.raises(ValueError, match=r"optimizer 'adam\w*' is not built, and 2 optimizers for 3 models do not "
                                         r"pair up .*optimizer\.build\(the_variables_it_updates\)"):
        dt.Trainer(model=models, optimizer=optimizers, train_step=lambda ctx, b: 0.0, backend=backend, verbose=0)


def _fit(backend, model, epochs=1, **trainer_args):
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, **trainer_args)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))), global_batch_size=16,
                epochs=epochs, shuffle_seed=0)
    return trainer, x


def test_save_model_writes_once_and_loads_back(backend, tmp_path):
    trainer, x = _fit(backend, _dense(backend, "regression"), verbose=0)
    expected = trainer.model(x).numpy()
    for name in ("model.keras", "serving"):
        path = str(tmp_path / "out" / name)
        assert trainer.save_model(path) == path
        if name.endswith(".keras"):
            served = keras.models.load_model(path)(x).numpy()
        else:
            loaded = tf.saved_model.load(path)  # keep it referenced while serve() runs (it holds the variables)
            served = loaded.serve(x).numpy()
        np.testing.assert_array_equal(served, expected)
        with pytest.raises(FileExistsError, match=r"save_model: '.*' exists; pass overwrite=True"):
            trainer.save_model(path)
        trainer.save_model(path, overwrite=True)


def test_save_model_with_several_models_needs_the_model(backend, tmp_path):
    a, b = _dense(backend, "a"), _dense(backend, "b")
    with backend.scope():
        optimizers = [keras.optimizers.SGD(), keras.optimizers.SGD()]
    trainer = dt.Trainer(model=[a, b], optimizer=optimizers, train_step=lambda ctx, b: 0.0, backend=backend, verbose=0)
    with pytest.raises(ValueError, match=r"the trainer has 2 models \(a, b\); pass model=the_one_to_save"):
        trainer.save_model(str(tmp_path / "m.keras"))


class _StepLogs(dt.Callback):
    def __init__(self):
        self.logs = []

    def on_step_logs(self, trainer, step, logs):
        self.logs.append((step, logs))


def test_throughput_leaves_out_the_calls_that_traced(backend):
    """The step sleeps 0.6 s while it is traced (Python runs only then): the epoch's and the step logs'
    step_time must not contain it, the printed line says how much was left out."""
    model = _dense(backend, "slow_trace")
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)

    def step(ctx, batch):
        time.sleep(0.6)  # at trace time only
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - model(x)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    printed, recorder = [], _StepLogs()
    x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, print_fn=printed.append,
                         callbacks=[recorder], log_every_steps=2)
    history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))), global_batch_size=16,
                          epochs=2)
    assert history["step_time"][0] < 0.3, history  # 4 steps, the first (traced) one not timed
    assert history["examples_per_sec"][0] == pytest.approx(16 / history["step_time"][0])
    assert [s for s, _ in recorder.logs] == [2, 4, 6, 8]
    assert all(logs["step_time"] < 0.3 for _, logs in recorder.logs), recorder.logs
    tracing = float(printed[0].split("without ")[1].split("s of tracing")[0])
    assert tracing >= 0.6, printed
    assert "of tracing" not in printed[1], printed  # nothing traced in epoch 2
