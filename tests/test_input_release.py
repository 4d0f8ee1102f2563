"""Finished epochs' iterators are torn down on the release thread, not by the Trainer's own thread (see
disttrain/input/release.py for the wait this avoids)."""

import threading

import keras
import numpy as np
import tensorflow as tf

import disttrain as dt
from disttrain.input import release


class Recorder:
    def __init__(self, seen):
        self.seen = seen

    def __del__(self):
        self.seen.append(threading.current_thread().name)


def test_release_drops_the_object_on_the_release_thread():
    seen = []
    release.release(Recorder(seen))  # the only reference goes to the release thread
    assert release.wait_idle(timeout=30)
    assert seen == ["disttrain-release"]


def test_fit_hands_over_each_epochs_iterator(monkeypatch):
    handed = []
    real = release.release
    monkeypatch.setattr(release, "release", lambda obj: (handed.append(type(obj).__name__), real(obj)))
    backend = dt.get_backend("single")
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.square(y[:, 0] - model(x)[:, 0]))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    x = np.ones((32, 4), np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, x[:, :1]))
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0)
    trainer.fit(data, global_batch_size=8, epochs=2)
    assert handed == ["OwnedIterator", "OwnedIterator"]
    assert release.wait_idle(timeout=60)
