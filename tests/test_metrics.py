"""Exact metric merging across ranks (fast, in-process: ranks are threads with real collectives)."""

import warnings

import keras
import numpy as np
import pytest

from disttrain import metrics as metrics_lib
from fake_ranks import run_ranks


def rank_data(rank: int):
    """Rank 0: 24 examples around 0, all weighted; rank 1: 6 examples around 10, half masked out."""
    rng = np.random.default_rng(rank)
    n = 24 if rank == 0 else 6
    y = (rng.normal(size=(n, 1)) + 10.0 * rank).astype("float32")
    pred = (y + rng.normal(scale=1.0 + rank, size=(n, 1))).astype("float32")
    w = np.ones(n, "float32") if rank == 0 else (np.arange(n) % 2 == 0).astype("float32")
    labels = (rng.integers(0, 3, size=n)).astype("int32")
    logits = rng.normal(size=(n, 3)).astype("float32")
    binary = (rng.random(n) < 0.5).astype("float32")
    scores = np.clip(binary * 0.3 + rng.random(n) * 0.7, 0, 1).astype("float32")
    return dict(y=y, pred=pred, w=w, labels=labels, logits=logits, binary=binary, scores=scores)


def make_metrics():
    return [keras.metrics.Mean(name="mean_y"), keras.metrics.MeanSquaredError(name="mse"),
            keras.metrics.SparseCategoricalAccuracy(name="acc"), keras.metrics.Precision(name="precision"),
            keras.metrics.AUC(name="auc", num_thresholds=50),
            keras.metrics.Precision(thresholds=[0.3, 0.6], name="precision_at")]


def update(metrics, d):
    mean_y, mse, acc, precision, auc, precision_at = metrics
    mean_y.update_state(d["y"], sample_weight=d["w"])
    mse.update_state(d["y"], d["pred"], sample_weight=d["w"])
    acc.update_state(d["labels"], d["logits"], sample_weight=d["w"])
    precision.update_state(d["binary"], d["scores"], sample_weight=d["w"])
    auc.update_state(d["binary"], d["scores"], sample_weight=d["w"])
    precision_at.update_state(d["binary"], d["scores"], sample_weight=d["w"])


def results(metrics):
    out = {}
    for m in metrics:
        out.update(metrics_lib.result_items(m.name, m.result()))
    return out


def test_merged_results_equal_one_process_seeing_all_the_data():
    def rank_fn(backend):
        metrics = make_metrics()
        update(metrics, rank_data(backend.rank))
        before = backend.collectives
        merged = metrics_lib.merged_results(backend, metrics)
        return merged, backend.collectives - before, metrics_lib.local_results(backend, metrics), results(metrics)

    (merged0, calls0, local0, own0), (merged1, calls1, local1, own1) = run_ranks(2, rank_fn)
    assert calls0 == calls1 == 1  # all metrics, one all-reduce
    assert merged0 == merged1
    assert local0 == pytest.approx(own0) and local1 == pytest.approx(own1)  # local = the rank's own result

    reference = make_metrics()
    for rank in (0, 1):
        update(reference, rank_data(rank))
    expected = results(reference)
    assert sorted(merged0) == sorted(expected)
    assert set(expected) >= {"precision_at_0", "precision_at_1"}  # vector results are flattened
    for name, value in expected.items():
        assert merged0[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_weighted_mean_is_exact_and_not_the_mean_of_means():
    data = [rank_data(0), rank_data(1)]

    def rank_fn(backend):
        mean = keras.metrics.Mean(name="mean_y")
        mean.update_state(data[backend.rank]["y"], sample_weight=data[backend.rank]["w"])
        return metrics_lib.merged_results(backend, [mean])["mean_y"], float(mean.result())

    (global0, local0), (global1, local1) = run_ranks(2, rank_fn)
    y = np.concatenate([d["y"][:, 0] for d in data]).astype(np.float64)
    w = np.concatenate([d["w"] for d in data]).astype(np.float64)
    exact = float(np.sum(w * y) / np.sum(w))
    mean_of_means = (local0 + local1) / 2
    assert global0 == global1 == pytest.approx(exact, rel=1e-6)
    assert abs(exact - mean_of_means) > 2.0  # 24 vs 3 weighted examples: averaging the averages is far off
    assert not np.isclose(global0, mean_of_means, rtol=1e-3)


def test_a_rank_without_examples_contributes_nothing():
    def rank_fn(backend):
        mean = keras.metrics.Mean(name="m")
        if backend.rank == 0:
            mean.update_state([1.0, 2.0, 6.0])
        return metrics_lib.merged_results(backend, [mean])["m"]

    assert run_ranks(2, rank_fn) == [3.0, 3.0]


class LastValue(keras.metrics.Metric):
    """A metric whose state is replicated (aggregation none): the chief's value must win."""

    def __init__(self, name="last"):
        super().__init__(name=name)
        self.value = self.add_variable(shape=(), initializer="zeros", aggregation="none", name="value")
        self.count = self.add_variable(shape=(), initializer="zeros", aggregation="sum", name="count")

    def update_state(self, value):
        self.value.assign(value)
        self.count.assign_add(1.0)

    def result(self):
        return self.value * 100.0 + self.count

    def reset_state(self):
        self.value.assign(0.0)
        self.count.assign(0.0)


def test_replicated_state_takes_the_chiefs_value_in_the_same_all_reduce():
    def rank_fn(backend):
        metric = LastValue()
        for _ in range(backend.rank + 1):
            metric.update_state(5.0 + 2 * backend.rank)
        before = backend.collectives
        return metrics_lib.merged_results(backend, [metric])["last"], backend.collectives - before

    (r0, calls0), (r1, calls1) = run_ranks(2, rank_fn)
    assert calls0 == calls1 == 1
    assert r0 == r1 == 5.0 * 100 + 3  # chief's value 5, counts 1 + 2 summed


def test_result_items_flattens():
    assert metrics_lib.result_items("a", np.float32(2.5)) == {"a": 2.5}
    assert metrics_lib.result_items("f1", np.array([0.5, 0.25])) == {"f1_0": 0.5, "f1_1": 0.25}
    assert metrics_lib.result_items("m", {"x": 1.0, "y": [2.0, 3.0]}) == {"m_x": 1.0, "m_y_0": 2.0, "m_y_1": 3.0}


def test_layout_mismatch_is_an_error():
    def rank_fn(backend):
        mean = keras.metrics.Mean(name="m")
        _, layout = metrics_lib.pack_local_states(backend, [mean])
        with pytest.raises(ValueError, match="expects 2"):
            metrics_lib.results_from_vector(backend, layout, np.zeros(3))
        return layout.size

    assert run_ranks(1, rank_fn) == [2]


def mae(y_true, y_pred):
    """The seed program's metric: a plain function, one value per example."""
    return np.mean(np.abs(y_true - y_pred), axis=-1)


def test_plain_function_metric_is_merged_exactly_not_summed():
    """A plain function given as a metric becomes a Keras mean metric whose state merges exactly; the
    per-rank means summed (what a value returned from the step gets) would be far off."""
    data = [rank_data(0), rank_data(1)]

    def rank_fn(backend):
        scopes = []

        def scope():
            scopes.append(1)
            return backend.scope()

        (metric,) = metrics_lib.as_list([mae], scope=scope)
        metric.update_state(data[backend.rank]["y"], data[backend.rank]["pred"])
        merged = metrics_lib.merged_results(backend, [metric])
        return type(metric), metric.name, len(scopes), merged["mae"], float(metric.result())

    results = run_ranks(2, rank_fn)
    assert {r[:3] for r in results} == {(keras.metrics.MeanMetricWrapper, "mae", 1)}  # wrapped in the scope
    exact = float(np.mean(np.concatenate([mae(d["y"], d["pred"]) for d in data])))
    assert results[0][3] == results[1][3] == pytest.approx(exact, rel=1e-6)
    summed = results[0][4] + results[1][4]
    assert not np.isclose(summed, exact, rtol=0.1)


def test_plain_function_metrics_need_names_and_must_be_metrics_or_functions():
    with pytest.raises(ValueError, match="needs a name"):
        metrics_lib.as_list([lambda t, p: t - p])
    (named,) = metrics_lib.as_list({"err": lambda t, p: t - p})
    assert named.name == "err"
    with pytest.raises(ValueError, match=r"\['mae'\] repeat"):
        metrics_lib.as_list([mae, keras.metrics.MeanAbsoluteError(name="mae")])
    with pytest.raises(TypeError, match="got 'mae'"):
        metrics_lib.as_list(["mae"])


def test_a_function_metric_that_no_step_updated_warns_instead_of_reading_zero():
    def rank_fn(backend):
        updated, forgotten = metrics_lib.as_list({"updated": mae, "forgotten": mae})
        updated.update_state(np.ones((4, 1), "float32"), np.zeros((4, 1), "float32"))
        vector, layout = metrics_lib.pack_local_states(backend, [updated, forgotten])
        return metrics_lib.results_from_vector(backend, layout, backend.all_reduce(vector, "sum"))

    with warnings.catch_warnings(record=True) as caught:  # records the rank threads' warnings too
        warnings.simplefilter("always")
        results = run_ranks(2, rank_fn)
    assert results == [{"updated": 1.0, "forgotten": 0.0}] * 2
    messages = [str(w.message) for w in caught if "never updated" in str(w.message)]
    assert len(messages) == 1 and "'forgotten' (a plain function) was never updated" in messages[0]  # chief only


def test_trainer_wraps_function_metrics_in_its_scope_and_warns_when_the_step_forgets_them():
    import tensorflow as tf

    import disttrain as dt
    from disttrain.backends.single import SingleBackend

    backend = SingleBackend(device="/cpu:0")
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)

    def keras_mae(y_true, y_pred):
        return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)

    def step(ctx, batch, update=True):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = model(x, training=True)
            loss = ctx.average_loss(keras.ops.mean(keras.ops.square(y - prediction), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        if update:
            trainer.metrics[0].update_state(y, prediction)
        return loss

    x = np.linspace(-1, 1, 32, dtype="float32").reshape(-1, 1)
    data = tf.data.Dataset.from_tensor_slices((x, 3 * x))
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, metrics=[keras_mae],
                         verbose=0)
    assert isinstance(trainer.metrics[0], keras.metrics.MeanMetricWrapper)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(data, global_batch_size=8, epochs=1)
        assert history["keras_mae"][0] > 0 and not [w for w in caught if "never updated" in str(w.message)]
        forgetful = dt.Trainer(model=model, optimizer=optimizer, backend=backend, metrics=[keras_mae], verbose=0,
                               train_step=lambda ctx, batch: step(ctx, batch, update=False))
        assert forgetful.fit(data, global_batch_size=8, epochs=1)["keras_mae"] == [0.0]
    assert any("'keras_mae' (a plain function) was never updated" in str(w.message) for w in caught)
