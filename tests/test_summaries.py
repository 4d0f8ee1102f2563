"""TensorBoard / progress / JSON-lines / step logs, in-process on the single backend (fast).

The backend object is created directly (not through get_backend) so this module does not fix the
process-wide backend for other in-process tests.
"""

import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import disttrain as dt
from disttrain.loop import step_logs
from disttrain.backends.single import SingleBackend
from fake_ranks import run_ranks

GLOBAL_BATCH, EXAMPLES = 16, 128  # 8 steps an epoch


@pytest.fixture(scope="module")
def backend():
    return SingleBackend(device="/cpu:0")


class NotChief(SingleBackend):
    """The single backend pretending to be a non-chief process: callbacks must stay silent."""

    is_chief = property(lambda self: False)


class Recorder(dt.Callback):
    def __init__(self):
        self.steps, self.histograms, self.epochs = [], [], []

    def on_step_logs(self, trainer, step, logs):
        self.steps.append((step, trainer.epoch, trainer.epoch_step, trainer.epoch_steps, dict(logs)))

    def on_histograms(self, trainer, step, gradients):
        self.histograms.append((step, {k: np.array(v) for k, v in gradients.items()}))

    def on_epoch_end(self, trainer, epoch, logs):
        self.epochs.append(dict(logs))


def make_trainer(backend, **kwargs):
    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(4, activation="tanh", name="dense"),
                                  keras.layers.Dense(1, name="dense_1")], name="tiny")
        optimizer = keras.optimizers.SGD(0.05)
        mae = keras.metrics.MeanAbsoluteError(name="mae")
        val_mae = keras.metrics.MeanAbsoluteError(name="mae")

    def train_step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = model(x, training=True)
            loss = ctx.average_loss(tf.reduce_mean(tf.square(y - prediction), axis=-1))
        grads = tape.gradient(loss, model.trainable_variables)
        ctx.apply_gradients(optimizer, grads, model.trainable_variables)
        mae.update_state(y, prediction)
        return loss

    def eval_step(ctx, batch):
        x, y, mask = batch  # evaluation pads the last batch; the mask weighs padding 0
        prediction = model(x, training=False)
        val_mae.update_state(y, prediction, sample_weight=mask)
        return ctx.average_loss(tf.reduce_mean(tf.square(y - prediction), axis=-1), sample_weight=mask)

    kwargs.setdefault("verbose", 0)
    return dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=eval_step,
                      backend=backend, metrics=[mae], eval_metrics=[val_mae], **kwargs)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True)))


def read_events(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"]}


def test_tensorboard_jsonl_and_progress_hold_the_reported_values(backend, tmp_path):
    recorder, out = Recorder(), io.StringIO()
    tb = dt.TensorBoard(logdir=str(tmp_path / "tb"), histogram_every_steps=4, config={"lr_policy": "none"})
    trainer = make_trainer(backend, log_every_steps=3, verbose=1, print_fn=out.write,
                           callbacks=[recorder, tb, dt.JsonLinesLogger(str(tmp_path / "log" / "m.jsonl")),
                                      dt.ProgressBar(stream=out)])
    history = trainer.fit(data(), global_batch_size=GLOBAL_BATCH, epochs=2, validation_data=data())

    # step logs at global steps 3, 6, 9, ... (the interval runs across epochs)
    assert [s[0] for s in recorder.steps] == [3, 6, 9, 12, 15]
    assert [(s[1], s[2], s[3]) for s in recorder.steps] == [(0, 3, 8), (0, 6, 8), (1, 1, 8), (1, 4, 8), (1, 7, 8)]
    assert all(set(s[4]) == {"loss", "mae", "lr", "examples_per_sec", "step_time"} for s in recorder.steps)
    assert set(history) == {"loss", "mae", "lr", "examples_per_sec", "step_time", "val_loss", "val_mae"}

    tensors = read_events(tmp_path / "tb")
    for name in ("loss", "mae", "lr", "examples_per_sec", "step_time"):
        assert {k: float(v) for k, v in tensors[f"step/{name}"].items()} == \
            pytest.approx({s[0]: s[4][name] for s in recorder.steps}, rel=1e-6), name
    for name, values in history.items():
        assert [float(tensors[f"epoch/{name}"][e]) for e in range(2)] == pytest.approx(values, rel=1e-6), name
    for var in ("tiny/dense/kernel", "tiny/dense/bias", "tiny/dense_1/kernel", "tiny/dense_1/bias"):
        assert sorted(tensors[f"weights/{var}"]) == [4, 8, 12, 16]
        assert sorted(tensors[f"gradients/{var}"]) == [4, 8, 12, 16]
    assert [h[0] for h in recorder.histograms] == [4, 8, 12, 16]
    kernel = tensors["weights/tiny/dense/kernel"][16]
    assert kernel[:, 2].sum() == 12  # bucket counts: every element of the 3x4 kernel
    config = tensors["config"][0].item().decode()
    assert "| lr_policy | none |" in config and "| global_batch_size | 16 |" in config
    assert {k: float(v) for k, v in tensors["run/world_size"].items()} == {0: 1.0}  # processes, at the first step

    lines = [json.loads(line) for line in (tmp_path / "log" / "m.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["config", "step", "step", "epoch", "step", "step", "step", "epoch"]
    assert [line["loss"] for line in lines if line["event"] == "epoch"] == history["loss"]
    assert [line["mae"] for line in lines if line["event"] == "step"] == [s[4]["mae"] for s in recorder.steps]

    printed = out.getvalue()
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in printed
    assert "epoch 1/2 3/8 - loss" in printed and "epoch 2/2 8/8 - loss" in printed and "val_mae" in printed
    assert "\r" not in printed  # not a terminal: plain lines


def test_gradient_histograms_are_the_applied_gradients(backend):
    """On the histogram step, the gradient handed over is what SGD applied: w_before - w_after = lr * g."""

    class Snap(Recorder):
        def __init__(self):
            super().__init__()
            self.weights = {}

        def on_step_logs(self, trainer, step, logs):
            self.weights[step] = [v.numpy().copy() for v in trainer.model.trainable_variables]

    snap = Snap()
    snap.histogram_every_steps, snap.wants_gradients = 2, True
    trainer = make_trainer(backend, log_every_steps=1, callbacks=[snap])
    trainer.fit(data(), global_batch_size=GLOBAL_BATCH, epochs=1)
    step, grads = snap.histograms[0]
    assert step == 2 and list(grads) == [v.path for v in trainer.model.trainable_variables]
    for var, before, after in zip(trainer.model.trainable_variables, snap.weights[1], snap.weights[2]):
        np.testing.assert_allclose(before - after, 0.05 * grads[var.path], rtol=1e-4, atol=1e-7)


def test_step_value_at_epoch_end_is_the_epoch_value(backend):
    recorder = Recorder()
    history = make_trainer(backend, log_every_steps=4, callbacks=[recorder]).fit(
        data(), global_batch_size=GLOBAL_BATCH, epochs=2)
    ends = [s for s in recorder.steps if s[2] == s[3]]
    assert [s[0] for s in ends] == [8, 16]
    for (_, epoch, _, _, logs) in ends:
        assert logs["loss"] == pytest.approx(history["loss"][epoch], rel=1e-12)
        assert logs["mae"] == pytest.approx(history["mae"][epoch], rel=1e-12)


def test_off_means_no_extra_collectives(backend):
    """Without step-log consumers nothing happens per step; with them, one all-reduce per logging step."""

    def count(trainer):
        calls = []
        original = trainer.backend.all_reduce
        trainer.backend.all_reduce = lambda value, op="mean": calls.append(op) or original(value, op)
        try:
            trainer.fit(data(), global_batch_size=GLOBAL_BATCH, epochs=2)
        finally:
            del trainer.backend.all_reduce
        return len(calls)

    plain = make_trainer(backend, callbacks=[])
    assert plain.fit_config == {} and count(plain) == count(make_trainer(backend, callbacks=[dt.Callback()]))
    base = count(plain)
    recorder = Recorder()
    assert count(make_trainer(backend, log_every_steps=4, callbacks=[recorder])) == base + 4
    assert len(recorder.steps) == 4
    assert plain.fit_config["log_every_steps"] == 0


def test_default_interval_depends_on_consumers():
    assert step_logs.requested_intervals(log_every_steps=None, callbacks=[dt.Callback()]) == (0, 0, False, None)
    assert step_logs.requested_intervals(log_every_steps=None, callbacks=[dt.ProgressBar()])[0] == \
        step_logs.DEFAULT_LOG_EVERY_STEPS
    tb = dt.TensorBoard(logdir="unused", histogram_every_steps=6, histograms=["weights"])
    assert step_logs.requested_intervals(log_every_steps=5, callbacks=[tb]) == (5, 6, False, None)
    profiled = [dt.TensorBoard(logdir="unused", profile_steps=(4, 6)), dt.TensorBoard(logdir="other", profile_steps=(2, 3))]
    assert step_logs.requested_intervals(log_every_steps=0, callbacks=profiled) == (0, 0, False, (2, 6))
    with pytest.raises(ValueError, match="log_every_steps=-1"):
        step_logs.requested_intervals(log_every_steps=-1, callbacks=[])


def test_processes_agree_on_the_largest_interval():
    """A rank whose callbacks ask for nothing (TensorBoard made on the chief only) still joins in."""
    asks = {0: (10, 6, True, None), 1: (0, 0, False, None)}
    got = run_ranks(2, lambda b: step_logs.agree(b, asks[b.rank]))
    assert got[0] == got[1] == step_logs.Intervals(log_every_steps=10, histogram_every_steps=6, gradients=True)


def test_non_chief_writes_and_prints_nothing(tmp_path, capsys):
    out = io.StringIO()
    callbacks = [dt.TensorBoard(logdir=str(tmp_path / "tb"), histogram_every_steps=2),
                 dt.JsonLinesLogger(str(tmp_path / "m.jsonl")), dt.ProgressBar(stream=out)]
    trainer = make_trainer(NotChief(device="/cpu:0"), log_every_steps=2, verbose=2, print_fn=out.write,
                           callbacks=callbacks)
    trainer.fit(data(), global_batch_size=GLOBAL_BATCH, epochs=1, validation_data=data())
    assert list(tmp_path.iterdir()) == []
    assert out.getvalue() == ""
    captured = capsys.readouterr()
    assert captured.out == ""


def test_progress_bar_redraws_on_a_terminal_and_quiet_prints_nothing(backend, capsys):
    out = io.StringIO()
    make_trainer(backend, log_every_steps=2, callbacks=[dt.ProgressBar(stream=out, dynamic=True)]).fit(
        data(), global_batch_size=GLOBAL_BATCH, epochs=1)
    text = out.getvalue()  # keras.utils.Progbar under an "Epoch 1/1" header: 3 redraws + the final line
    assert text.startswith("Epoch 1/1\n") and text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 2
    assert "8/8" in text and "━" in text and "mae:" in text
    make_trainer(backend, verbose=0).fit(data(), global_batch_size=GLOBAL_BATCH, epochs=1)
    assert capsys.readouterr().out == ""


def test_bad_arguments():
    with pytest.raises(ValueError, match="histogram_every_steps"):
        dt.TensorBoard(logdir="x", histogram_every_steps=-1)
    with pytest.raises(ValueError, match="unknown histogram kinds"):
        dt.TensorBoard(logdir="x", histograms=["activations"])
    with pytest.raises(ValueError, match=r"profile_steps=\(5, 2\) must be \(first, last\) train steps"):
        dt.TensorBoard(logdir="x", profile_steps=(5, 2))


def test_profile_steps_write_a_trace_on_the_chief_only(backend, tmp_path):
    """The profiler runs from just before step 3 to just after step 5 (a window across the epoch end)."""

    class Steps(dt.Callback):  # records the global step at which the profiler was started/stopped
        def __init__(self, tb):
            self.tb, self.seen = tb, []

        def on_step_logs(self, trainer, step, logs):
            self.seen.append((step, self.tb._profiling))

    tb = dt.TensorBoard(logdir=str(tmp_path / "chief"), profile_steps=(3, 10), announce=False)
    steps = Steps(tb)
    make_trainer(backend, log_every_steps=1, callbacks=[tb, steps]).fit(data(), global_batch_size=GLOBAL_BATCH, epochs=2)
    assert [s for s, on in steps.seen if on] == list(range(3, 11))  # on during steps 3..10, off after
    traces = list((tmp_path / "chief" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    quiet = dt.TensorBoard(logdir=str(tmp_path / "other"), profile_steps=(1, 2), announce=False)
    make_trainer(NotChief(device="/cpu:0"), callbacks=[quiet]).fit(data(), global_batch_size=GLOBAL_BATCH, epochs=1)
    assert not (tmp_path / "other").exists()
    ended = dt.TensorBoard(logdir=str(tmp_path / "ended"), profile_steps=(7, 100), announce=False)
    make_trainer(backend, callbacks=[ended]).fit(data(), global_batch_size=GLOBAL_BATCH, epochs=1)
    assert not ended._profiling and list((tmp_path / "ended" / "plugins" / "profile").glob("*/*.xplane.pb"))


@pytest.mark.parametrize("data", [np.random.default_rng(0).normal(size=(7, 9)), np.full(5, 2.5), np.zeros(0),
                                  np.array([1.0, 2.0])])
def test_histograms_bucket_like_tensorboard(data):
    from tensorboard.plugins.histogram import summary_v2

    from disttrain.summaries import histogram_buckets, histogram_value

    reference = summary_v2.histogram_pb("h", data).value[0]
    mine = histogram_value("h", data)
    np.testing.assert_allclose(tensor_util.make_ndarray(mine.tensor), tensor_util.make_ndarray(reference.tensor))
    assert mine.metadata.plugin_data.plugin_name == reference.metadata.plugin_data.plugin_name
    assert histogram_buckets(data).shape == (30, 3)
