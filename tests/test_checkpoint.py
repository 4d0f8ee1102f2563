"""In-process checks of Checkpointing on the single-device backend (multi-process: test_checkpoint_resume.py)."""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import disttrain as dt
from disttrain.backends.single import SingleBackend

X = np.random.default_rng(0).normal(size=(48, 3)).astype("float32")
DATA = tf.data.Dataset.from_tensor_slices((X, X @ np.array([[1.0], [-2.0], [0.5]], "float32")))


@pytest.fixture(scope="module")
def backend():
    return SingleBackend(device="/cpu:0")


class SignalAt(dt.Callback):
    """Sends this process a real SIGTERM after global step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_logs(self, trainer, step, logs):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def make(backend, directory=None, *, callbacks=(), **checkpointing):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)
        metric = keras.metrics.Mean(name="mean_prediction")

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = model(x)
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - prediction), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        metric.update_state(prediction)
        return loss

    controller = dt.lr.LRController(policies=[dt.lr.LossThresholdCut(thresholds=[3.0, 2.0, 1.5], factor=0.5)])
    ckpt = dt.Checkpointing(directory, exit_on_preemption=False, **checkpointing) if directory else None
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                         metrics=[metric], callbacks=[controller, *callbacks], checkpointing=ckpt,
                         log_every_steps=1 if callbacks else None)
    return trainer, model


def fit(trainer, **overrides):
    return trainer.fit(DATA, **{"global_batch_size": 16, "epochs": 4, "shuffle_seed": 5, **overrides})


@pytest.mark.parametrize("stop_after", [2, 5])  # mid-epoch 1; the last step of epoch 2 (3 steps an epoch)
def test_preempted_in_process_resumes_bitwise_with_the_same_history(backend, tmp_path, stop_after):
    reference, reference_model = make(backend)
    expected = fit(reference)
    trainer, _ = make(backend, tmp_path, callbacks=[SignalAt(stop_after)])
    with pytest.raises(SystemExit) as stopped:
        fit(trainer)
    assert isinstance(stopped.value, dt.Preempted) and stopped.value.code == dt.PREEMPTION_EXIT_CODE == 42
    assert stopped.value.step == stop_after + 1  # after the step that followed the signal
    assert stopped.value.checkpoint == tf.train.latest_checkpoint(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # fit restored the handler

    resumed, model = make(backend, tmp_path)
    history = fit(resumed)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.variables, reference_model.variables))
    assert history["lr"] == expected["lr"] and len(set(expected["lr"])) > 1  # the threshold cuts fired
    for name in ("loss", "mean_prediction"):
        np.testing.assert_allclose(history[name], expected[name], rtol=1e-6)


@pytest.mark.parametrize("every_steps,final", [(None, 1), (4, 4)])  # (4: the last step's save, then the end's)
def test_a_finished_run_started_again_does_nothing(backend, tmp_path, capsys, every_steps, final):
    trainer, model = make(backend, tmp_path, every_steps=every_steps)
    expected = fit(trainer)
    again, again_model = make(backend, tmp_path, every_steps=every_steps)
    history = fit(again)
    assert history == expected
    assert int(again.optimizer.iterations.numpy()) == 12
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.variables, again_model.variables))
    assert (f"resuming from {tmp_path}/ckpt-{final} at the start of epoch 5 (global step 12)"
            in capsys.readouterr().err)


def test_keeps_the_last_checkpoints_and_saves_on_a_timer(backend, tmp_path):
    trainer, _ = make(backend, tmp_path, every_seconds=1e-6, keep=2, save_at_end=False)
    fit(trainer, epochs=2)
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".index")) == ["ckpt-5.index", "ckpt-6.index"]


@pytest.mark.parametrize("change,message", [
    ({"global_batch_size": 8}, "was saved by a run with global_batch_size=16, this run has global_batch_size=8: "
                               "resume with global_batch_size=16"),
    ({"shuffle_seed": 6}, "with shuffle_seed=5, this run has shuffle_seed=6"),
    ({"steps_per_epoch": 2}, "with steps_per_epoch=None, this run has steps_per_epoch=2"),
])
def test_refuses_to_resume_with_other_data_order(backend, tmp_path, change, message):
    trainer, _ = make(backend, tmp_path)
    fit(trainer, epochs=1)
    other, _ = make(backend, tmp_path)
    with pytest.raises(ValueError) as err:
        fit(other, **change)
    assert message in str(err.value), err.value


def test_refuses_a_checkpoint_of_another_model(backend, tmp_path):
    trainer, _ = make(backend, tmp_path)
    fit(trainer, epochs=1)
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(7), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.05)

    def step(ctx, batch):
        return tf.constant(0.0)

    other = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0,
                       checkpointing=dt.Checkpointing(tmp_path))
    with pytest.raises(ValueError, match="does not match this trainer's models, optimizers or callbacks"):
        fit(other)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"every_steps=0 must be > 0 \(or None for never\)"):
        dt.Checkpointing("x", every_steps=0)
    with pytest.raises(ValueError, match=r"keep=0 must be an int >= 1"):
        dt.Checkpointing("x", keep=0)
    with pytest.raises(ValueError, match=r"extra names \['models'\] are taken by disttrain; rename them"):
        dt.Checkpointing("x", extra={"models": tf.Variable(1.0)})


def test_linear_scaling_is_reapplied_for_another_replica_count(backend, tmp_path, capsys):
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build([tf.Variable(1.0)])
    saved = dt.lr.LRController(policies=[dt.lr.LinearScaling(replicas=True)])
    saved.install(optimizer, backend=backend, num_replicas=4)
    path = tf.train.Checkpoint(lr=saved).save(str(tmp_path / "lr"))
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build([tf.Variable(1.0)])
    resumed = dt.lr.LRController(policies=[dt.lr.LinearScaling(replicas=True)])
    tf.train.Checkpoint(lr=resumed).restore(path).assert_existing_objects_matched()
    resumed.install(optimizer, backend=backend, num_replicas=2)
    assert resumed.learning_rate == pytest.approx(0.2)
    assert ("the state was saved with 4 replicas, this run has 2: LinearScaling is re-applied (scale 4 -> 2)"
            in capsys.readouterr().out)
