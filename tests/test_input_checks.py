"""Faults that must fail fast with a message that says what is wrong and the fix, on every rank alike:
element specs that differ between ranks, a variable changed on one replica only (the drift check), an
empty dataset, integer labels against float predictions.

Multi-process: tests/workers/checks.py runs every case in one job of each backend's shared launch
(tests/shared_launches.py) (Horovod gloo, MultiWorker, Mirrored on 2 logical devices). In-process: the single-device cases and the pieces.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import disttrain as dt
from disttrain.input import data_checks
from disttrain.backends.single import SingleBackend
from fake_ranks import run_ranks
from shared_launches import TEST_TIMEOUT, job

BACKENDS = ["horovod-gloo", "multiworker", "mirrored"]
_results: dict = {}


def results(backend, tmp_path_factory):
    """Every rank's ``{case: {"error": ..., "seconds": ...}}`` of ``backend``'s one launch."""
    if backend not in _results:
        out = job(backend, "checks", tmp_path_factory).out
        ranks = 1 if backend == "mirrored" else 2
        _results[backend] = [json.loads((out / f"checks_rank{r}.json").read_text()) for r in range(ranks)]
    return _results[backend]


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rank_fails_fast_with_the_same_explanation(backend, tmp_path_factory):
    ranks = results(backend, tmp_path_factory)
    for case in ("drift", "empty", "int_labels") + (("spec_mismatch",) if len(ranks) > 1 else ()):
        errors = {r[case]["error"] for r in ranks}
        assert len(errors) == 1 and None not in errors, (case, errors)  # the same error on every rank
    first = ranks[0]
    if len(ranks) > 1:
        assert first["spec_mismatch"]["error"].startswith(
            "ValueError: the input pipelines give per-replica batches of different shapes or dtypes on different "
            "ranks:\n  rank 0: (float32[4, 3], float32[4, 1])\n  rank 1: (float32[4, 3], float32[4])\nevery rank "
            "must feed the same element spec"), first["spec_mismatch"]
        assert all(r["spec_mismatch"]["seconds"] < 30 for r in ranks)  # before the first step
    drift = first["drift"]["error"]
    assert drift.startswith("DriftError: replicas out of sync after global step 4: variable "), drift
    assert "/dense" in drift and "/kernel' differs between replicas (checksum of its bits rank 0: " in drift, drift
    assert "1 of the 8 compared variables differs" in drift and "outside ctx.apply_gradients" in drift, drift
    if len(ranks) > 1:
        assert ", rank 1: " in drift, drift
    else:  # Mirrored: one process whose two device copies differ
        assert "this rank's 2 device copies: [" in drift, drift
    # changed after step 3, checked (every 2 steps) after step 4
    print(f"{backend}: spec mismatch raised after {max(r.get('spec_mismatch', {}).get('seconds', 0) for r in ranks):.2f} s, "
          f"drift {max(r['drift']['seconds_after_update'] for r in ranks):.2f} s after the update, "
          f"int labels {max(r['int_labels']['seconds'] for r in ranks):.2f} s, empty {max(r['empty']['seconds'] for r in ranks):.2f} s")
    assert all(r["drift"]["seconds_after_update"] < 30 for r in ranks), [r["drift"] for r in ranks]
    assert first["empty"]["error"] == (
        "ValueError: the dataset is empty (0 examples); there is nothing to train or evaluate on: check the data "
        "source (e.g. a filter that drops everything, or files without records)")
    assert first["int_labels"]["error"].startswith(
        "ValueError: the step combines the labels (element 1 of the examples, int64) with the model's output "
        "(float32) in one 'Sub' op, and TensorFlow does not convert dtypes implicitly. Cast the labels in the "
        "dataset: dataset.map(lambda x, y: (x, tf.cast(y, tf.float32)))"), first["int_labels"]
    assert all(r["in_sync"]["error"] is None for r in ranks)  # checking every step raises nothing when in sync


# -- in-process -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    return SingleBackend(device="/cpu:0")


def test_spec_text_is_canonical():
    spec = {"y": tf.TensorSpec([None], tf.int64), "x": tf.TensorSpec([4, 3], tf.float32)}
    assert data_checks.spec_text(spec) == "{'x': float32[4, 3], 'y': int64[?]}"
    assert data_checks.spec_text((tf.TensorSpec(None, tf.float32),)) == "(float32?,)"
    assert data_checks.spec_hash(spec) == data_checks.spec_hash(dict(reversed(list(spec.items()))))
    assert data_checks.spec_hash(spec) != data_checks.spec_hash({**spec, "y": tf.TensorSpec([None], tf.int32)})


def test_gather_texts_returns_every_ranks_text_in_rank_order():
    texts = run_ranks(3, lambda b: data_checks.gather_texts(b, "é" * b.rank + f"rank {b.rank}"))
    assert texts == [["rank 0", "érank 1", "éérank 2"]] * 3


def test_sparse_integer_labels_with_a_crossentropy_are_not_reported(backend):
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(4)])
        optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def step(ctx, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(loss_fn(y, model(x)))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(32, dtype=np.int64) % 4))
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0)
    assert np.isfinite(trainer.fit(data, global_batch_size=8)["loss"][0])


def test_a_type_error_that_is_not_about_labels_is_left_alone():
    error = TypeError("Input 'y' of 'AddV2' Op has type int32 that does not match type float16 of argument 'x'.")
    spec = (tf.TensorSpec([3], tf.float32), tf.TensorSpec([1], tf.int64))
    model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(1)])
    assert data_checks.explain_dtype_mismatch(error, element_spec=spec, model=model) is None
    eager = TypeError("cannot compute Sub as input #1(zero-based) was expected to be a int64 tensor but is a float "
                      "tensor")
    explained = data_checks.explain_dtype_mismatch(eager, element_spec=spec, model=model)
    assert "the labels (element 1 of the examples, int64) with the model's output (float32) in one 'Sub' op" \
        in str(explained)


def test_an_empty_dataset_fn_says_the_input_is_empty(backend):
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=lambda ctx, b: tf.constant(0.0),
                         backend=backend, verbose=0)
    empty = lambda ctx: tf.data.Dataset.from_tensor_slices((tf.zeros([0, 3]), tf.zeros([0, 1]))).batch(4)  # noqa: E731
    with pytest.raises(ValueError, match=r"the input is empty: every rank's pipeline gives 0 batches of global "
                                         r"batch 4 \(no examples, or fewer than one per-replica batch\)"):
        trainer.fit(empty, global_batch_size=4)
