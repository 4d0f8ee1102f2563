"""In-process tests of disttrain.data: sharding, padding, shard files, errors (no launchers needed).

Several input pipelines are simulated by building the pipeline of every ``InputContext`` in one process.
"""

import collections
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from disttrain import data as D  # noqa: E402
from disttrain.input import pipelines as P  # noqa: E402
from disttrain import shards as S  # noqa: E402
from disttrain.backends.base import InputContext  # noqa: E402


def context(pipelines, pipeline, local=1, global_batch=8):
    return InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                        num_replicas_in_sync=pipelines * local, replicas_per_pipeline=local,
                        global_batch_size=global_batch)


def examples(n, features=3):
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices(
        {"id": np.arange(n, dtype=np.int64), "x": rng.normal(size=(n, features)).astype("float32")})


def steps_of(dataset, local):
    """Groups a pipeline's per-replica batches into steps: lists of ``local`` batches."""
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) % local == 0
    return [batches[i:i + local] for i in range(0, len(batches), local)]


def real_ids(batch):
    return [int(i) for i, m in zip(batch["id"], batch.get("mask", np.ones(len(batch["id"])))) if m > 0]


def consumed(source, pipelines, local, global_batch, *, seed=1, epoch=0, remainder="pad"):
    """Every real example id each pipeline yields in one epoch, plus each pipeline's step count."""
    ids, steps = [], []
    for p in range(pipelines):
        built = source.build(context(pipelines, p, local, global_batch), seed=seed, epoch=epoch, remainder=remainder)
        s = steps_of(built, local)
        steps.append(len(s))
        ids += [i for step in s for b in step for i in real_ids(b)]
    return ids, steps


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    files = S.write_shards(examples(45), directory, num_shards=4)
    return directory, files


# -- shard files ----------------------------------------------------------------------------------
def test_write_shards_round_robin_and_read_back(shard_dir):
    directory, files = shard_dir
    assert [os.path.basename(f) for f in files] == [f"shard-0000{i}-of-00004.tfrecord" for i in range(4)]
    spec, counts = S.shard_info(files)
    assert counts == [12, 11, 11, 11]
    assert spec["x"].shape == (3,) and spec["id"].dtype == tf.int64
    back = list(S.read_shards(directory).as_numpy_iterator())
    original = list(examples(45).as_numpy_iterator())
    assert [e["id"] for e in back] == list(range(45))  # interleaving the shards restores the order
    np.testing.assert_array_equal(np.stack([e["x"] for e in back]), np.stack([e["x"] for e in original]))
    first = list(tf.data.TFRecordDataset(files[1]))
    assert len(first) == 11


def test_write_shards_keeps_tuples_and_dtypes(tmp_path):
    ds = tf.data.Dataset.from_tensor_slices((np.ones((5, 2), "float64"), np.arange(5, dtype="int32"),
                                             np.array([b"a", b"b", b"c", b"d", b"e"])))
    S.write_shards(ds, tmp_path, num_shards=2)
    back = S.read_shards(tmp_path)
    assert isinstance(back.element_spec, tuple)
    assert [s.dtype for s in back.element_spec] == [tf.float64, tf.int32, tf.string]
    assert sorted(int(e[1]) for e in back.as_numpy_iterator()) == list(range(5))


def test_write_shards_rejects_variable_shapes_and_infinite(tmp_path):
    ragged = tf.data.Dataset.range(3).map(lambda i: tf.range(i))
    with pytest.raises(ValueError, match="fixed shapes"):
        S.write_shards(ragged, tmp_path, num_shards=2)
    with pytest.raises(ValueError, match="infinite"):
        S.write_shards(tf.data.Dataset.range(3).repeat(), tmp_path, num_shards=2)
    with pytest.raises(ValueError, match="num_shards=0"):
        S.write_shards(tf.data.Dataset.range(3), tmp_path, num_shards=0)


# -- element sharding: the union of the replicas' batches is the single-device batch ---------------
@pytest.mark.parametrize("pipelines,local", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_element_sharding_matches_single_device_batches(pipelines, local, remainder):
    ds = examples(45)
    single = steps_of(P.element_sharded(ds, context(1, 0, 1), seed=5, epoch=3, remainder=remainder), 1)
    per_pipeline = [steps_of(P.element_sharded(ds, context(pipelines, p, local), seed=5, epoch=3,
                                               remainder=remainder), local) for p in range(pipelines)]
    assert all(len(s) == len(single) for s in per_pipeline)
    assert len(single) == (6 if remainder == "pad" else 5)
    for k, (reference,) in enumerate(single):
        union = [b for s in per_pipeline for b in s[k]]  # replica order: pipeline, then local replica
        assert np.concatenate([b["id"] for b in union]).tolist() == reference["id"].tolist(), f"step {k}"
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in union]), reference["x"])
        if remainder == "pad":
            assert np.concatenate([b["mask"] for b in union]).tolist() == reference["mask"].tolist()


def test_shuffle_depends_on_seed_and_epoch_only():
    ds = examples(40)
    order = lambda seed, epoch: [i for b in P.element_sharded(ds, context(1, 0), seed=seed, epoch=epoch)
                                 .as_numpy_iterator() for i in b["id"]]  # noqa: E731
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 0)) == list(range(40))


@pytest.mark.parametrize("pipelines,local", [(2, 1), (1, 2), (2, 2), (3, 1)])
def test_element_sharding_pads_every_example_exactly_once(pipelines, local):
    source = D.from_dataset(examples(45))
    ids, steps = consumed(source, pipelines, local, global_batch=12)
    assert len(set(steps)) == 1
    assert collections.Counter(ids) == collections.Counter(range(45))


# -- file sharding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pipelines,local", [(2, 1), (2, 2), (4, 1)])
def test_file_sharding_every_example_exactly_once(shard_dir, pipelines, local):
    _, files = shard_dir
    source = D.from_files(files)
    ids, _ = consumed(source, pipelines, local, global_batch=4 * pipelines * local)
    assert collections.Counter(ids) == collections.Counter(range(45))


def test_file_sharding_reads_disjoint_files_that_change_with_the_epoch(shard_dir):
    _, files = shard_dir
    source = D.from_files(files)
    for epoch in range(3):
        sets = [set(consumed_ids) for consumed_ids in
                (consumed_one(source, 2, p, epoch) for p in range(2))]
        assert not sets[0] & sets[1]
        assert consumed_one(source, 2, 0, epoch) == consumed_one(source, 2, 0, epoch)  # deterministic
    orders = [consumed_one(source, 2, 0, e) for e in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]


@pytest.mark.parametrize("pipelines,local", [(2, 1), (3, 2)])
def test_file_sharding_balances_uneven_files_so_drop_loses_less_than_one_global_batch(tmp_path, pipelines, local):
    # 1003 examples in 3 shards (335, 334, 334) on 2 pipelines: dealt whole, pipeline 0 would get 669 and
    # pipeline 1 334, and remainder="drop" would use 2 x 6 batches of 50 (600 examples, 403 lost).
    files = S.write_shards(examples(1003), tmp_path, num_shards=3)
    source = D.from_files(files)
    global_batch = 100 * local * pipelines // 2
    for epoch in range(3):
        ids, steps = consumed(source, pipelines, local, global_batch, epoch=epoch, remainder="drop")
        assert len(set(steps)) == 1 and len(ids) == len(set(ids))  # never an example twice
        lost = 1003 - steps[0] * global_batch
        assert 0 <= lost < global_batch and len(ids) == 1003 - lost, (epoch, steps, lost)
        shares = [sum(t for _, _, t in P.file_ranges([335, 334, 334], context(pipelines, p), seed=1, epoch=epoch))
                  for p in range(pipelines)]
        assert max(shares) - min(shares) <= 1 and sum(shares) == 1003, shares


def test_file_ranges_split_at_most_the_boundary_files():
    counts = [10, 10, 8, 8]  # in this order (no seed), pipeline 0 is dealt files 0 and 2 (18), 1 files 1, 3 (18)
    assert [P.file_ranges(counts, context(2, p), seed=None, epoch=0) for p in range(2)] == [
        [(0, 0, 10), (2, 0, 8)], [(1, 0, 10), (3, 0, 8)]]
    counts = [10, 8, 10, 8]  # pipeline 0 is dealt 20, pipeline 1 16: pipeline 1 takes the last 2 of file 2
    assert [P.file_ranges(counts, context(2, p), seed=None, epoch=0) for p in range(2)] == [
        [(0, 0, 10), (2, 0, 8)], [(2, 8, 2), (1, 0, 8), (3, 0, 8)]]


def consumed_one(source, pipelines, pipeline, epoch):
    built = source.build(context(pipelines, pipeline, 1, 4), seed=9, epoch=epoch, remainder="pad")
    return [i for b in built.as_numpy_iterator() for i in real_ids(b)]


def test_file_sharding_lengths_are_known_without_reading(shard_dir):
    _, files = shard_dir
    source = D.from_files(files)  # manifest counts: 12, 11, 11, 11
    drop = [int(source.build(context(2, p, 1, 4), remainder="drop").cardinality()) for p in range(2)]
    pad = [int(source.build(context(2, p, 1, 4), remainder="pad").cardinality()) for p in range(2)]
    assert drop == [11, 11] and pad == [12, 11]  # files 0+2: 23 examples, files 1+3: 22
    padded = source.build(context(2, 0, 1, 4), remainder="pad", pad_to_steps=15)
    batches = list(padded.as_numpy_iterator())
    assert len(batches) == 15 and all(b["mask"].sum() == 0 for b in batches[12:])


def test_fewer_files_than_pipelines_warns_and_shards_by_element(shard_dir):
    _, files = shard_dir
    source = D.from_files(files[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, steps = consumed(source, 2, 1, global_batch=4)
    assert any("falls back to element sharding" in str(w.message) for w in caught)
    assert len(set(steps)) == 1
    assert collections.Counter(ids) == collections.Counter(range(0, 45, 4))


def test_other_files_with_a_reader(tmp_path):
    files = []
    for f in range(3):
        path = tmp_path / f"part{f}.txt"
        path.write_text("".join(f"{f * 100 + i}\n" for i in range(5 + f)))
        files.append(str(path))
    reader = lambda p: tf.data.TextLineDataset(p).map(lambda s: {"id": tf.strings.to_number(s, tf.int64)})  # noqa
    source = D.from_files(files, reader=reader)
    ids, steps = consumed(source, 2, 1, global_batch=4)
    assert sorted(ids) == sorted(f * 100 + i for f in range(3) for i in range(5 + f))
    with pytest.raises(ValueError, match="no write_shards manifest"):
        D.from_files(files)


def test_sharding_off_gives_every_pipeline_everything():
    source = D.from_dataset(examples(20), sharding="off")
    for p in range(2):
        built = source.build(context(2, p, 1, 4), seed=3, remainder="drop")
        assert sorted(i for b in built.as_numpy_iterator() for i in b["id"]) == list(range(20))


# -- masks -----------------------------------------------------------------------------------------
def test_mask_positions_for_tuples_dicts_and_tensors():
    ctx = context(1, 0, 1, 4)
    pair = tf.data.Dataset.from_tensor_slices((np.zeros((5, 2), "f"), np.ones(5, "f")))
    x, y, mask = next(iter(P.element_sharded(pair, ctx, remainder="pad")))
    assert mask.dtype == tf.float32 and x.shape == (4, 2)
    lone = tf.data.Dataset.from_tensor_slices(np.zeros((5, 2), "f"))
    last = list(P.element_sharded(lone, ctx, remainder="pad"))[-1]
    assert isinstance(last, tuple) and last[1].numpy().tolist() == [1, 0, 0, 0]
    clash = tf.data.Dataset.from_tensor_slices({"mask": np.zeros(5, "f")})
    with pytest.raises(ValueError, match="already have a 'mask' key"):
        list(P.element_sharded(clash, ctx, remainder="pad"))


# -- bad input ---------------------------------------------------------------------------------------
def test_already_batched_dataset_is_rejected_with_the_fix():
    for batched in (examples(20).batch(4), examples(20).batch(4, drop_remainder=True).prefetch(2),
                    examples(20).padded_batch(4).map(lambda b: b)):
        with pytest.raises(ValueError, match=r"already batched \(batch size 4.*remove the \.batch"):
            D.check_data(batched)
    D.check_data(examples(20).batch(4).unbatch())  # fine after unbatch


def test_batched_by_knows_this_tf_version():
    """batched_by reads tf.data internals (Dataset._inputs() and class names): if a TensorFlow upgrade
    changes them, this fails and names what changed, instead of batched datasets silently passing."""
    from disttrain.input.data_checks import _BATCH_TYPES, _UNBATCH_TYPES, batched_by

    base = examples(20)
    made = {"batch": base.batch(4), "parallel batch": base.batch(4, num_parallel_calls=2),
            "padded_batch": base.padded_batch(4), "unbatch": base.batch(4).unbatch(),
            "rebatch": base.batch(4).rebatch(2)}
    for name, ds in made.items():
        kind = type(ds).__name__
        known = _UNBATCH_TYPES if name in ("unbatch", "rebatch") else _BATCH_TYPES
        assert kind in known, f"tf.data's {name} dataset is now class {kind!r}: update disttrain/input/data_checks.py"
        assert callable(getattr(ds.map(lambda e: e), "_inputs", None)), "tf.data datasets lost _inputs()"
    assert all(batched_by(made[n]) == 4 for n in ("batch", "parallel batch", "padded_batch"))
    assert batched_by(made["unbatch"]) is None and batched_by(made["rebatch"]) is None
    long_chain = base.batch(3).map(lambda e: e).prefetch(1).cache().repeat(2).shuffle(4).take(5).skip(1)
    assert batched_by(long_chain) == 3  # found through the private walk, 7 transformations deep
    assert batched_by(base.map(lambda e: e).prefetch(1)) is None


def test_global_batch_larger_than_dataset_names_both_numbers():
    with pytest.raises(ValueError, match="global batch 64 is larger than the dataset \\(20 examples\\)"):
        P.element_sharded(examples(20), context(2, 0, 1, 64))


def test_examples_that_do_not_fit_the_model():
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"expects examples of shape \[4\].*got \[3\]"):
        D.check_data(examples(10).map(lambda e: (e["x"], e["id"])), model=model)
    D.check_data(tf.data.Dataset.from_tensor_slices((np.zeros((3, 4), "f"), np.zeros(3))), model=model)
    with pytest.raises(ValueError, match="one tensor"):
        a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
        two = keras.Model([a, b], keras.layers.Concatenate()([a, b]))
        D.check_data(tf.data.Dataset.from_tensor_slices((np.zeros((3, 2), "f"), np.zeros(3))), model=two)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="remainder='keep' is not supported"):
        P.element_sharded(examples(20), context(1, 0), remainder="keep")
    with pytest.raises(ValueError, match="sharding='files' is not supported"):
        D.from_dataset(examples(20), sharding="files")
    with pytest.raises(TypeError, match="got int"):
        D.as_source(3)


# -- the trainer on one device (multi-process runs: test_data_distributed.py) ------------------------
@pytest.fixture(scope="module")
def single():
    from disttrain.backends.single import SingleBackend

    return SingleBackend()


def linear_trainer(backend, **kwargs):
    import disttrain as dt

    with backend.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)
        mse = keras.metrics.Mean(name="mse")

    def train_step(ctx, batch):
        x, y = batch[0], batch[1]
        weight = batch[2] if len(batch) == 3 else None
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.square(y - model(x)[:, 0]), sample_weight=weight)
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def eval_step(ctx, batch):
        x, y, mask = batch
        per_example = tf.square(y - model(x)[:, 0])
        mse.update_state(per_example, sample_weight=mask)
        return ctx.average_loss(per_example, sample_weight=mask)

    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=train_step, eval_step=eval_step,
                         eval_metrics=[mse], backend=backend, verbose=0, **kwargs)
    return trainer, model


def regression(n):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, (x @ np.array([1.0, -2.0, 0.5], "float32") + 0.3).astype("float32")


def test_evaluate_pads_so_the_metric_covers_every_example_exactly(single):
    trainer, model = linear_trainer(single)
    x, y = regression(45)
    logs = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)), global_batch_size=8)
    expected = float(np.mean((y - model(x).numpy()[:, 0]) ** 2))
    assert logs["mse"] == pytest.approx(expected, rel=1e-6)
    dropped = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (a, b, 1.0)),
                               global_batch_size=8, remainder="drop")
    assert dropped["mse"] == pytest.approx(float(np.mean((y[:40] - model(x[:40]).numpy()[:, 0]) ** 2)), rel=1e-6)


def test_fit_drop_and_pad_step_counts(single):
    trainer, _ = linear_trainer(single)
    x, y = regression(45)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    trainer.fit(ds, global_batch_size=8, epochs=1)
    assert int(trainer.optimizer.iterations) == 5
    trainer.fit(ds, global_batch_size=8, epochs=1, remainder="pad")
    assert int(trainer.optimizer.iterations) == 5 + 6


def test_infinite_dataset_needs_and_honours_steps_per_epoch(single):
    trainer, _ = linear_trainer(single)
    ds = tf.data.Dataset.from_tensor_slices(regression(20)).repeat()
    with pytest.raises(ValueError, match="infinite.*steps_per_epoch"):
        trainer.fit(ds, global_batch_size=8)
    trainer.fit(ds, global_batch_size=8, steps_per_epoch=7, epochs=2)
    assert int(trainer.optimizer.iterations) == 14


def test_unknown_length_is_agreed_step_by_step(single):
    trainer, _ = linear_trainer(single)
    ds = tf.data.Dataset.from_tensor_slices(regression(50)).enumerate().filter(
        lambda i, e: i % 2 == 0).map(lambda i, e: e)  # 25 examples, cardinality unknown
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    trainer.fit(ds, global_batch_size=8)
    assert int(trainer.optimizer.iterations) == 3
    trainer.fit(ds, global_batch_size=8, steps_per_epoch=2)
    assert int(trainer.optimizer.iterations) == 5


def test_fit_rejects_bad_input_before_running(single):
    trainer, _ = linear_trainer(single)
    ds = tf.data.Dataset.from_tensor_slices(regression(20))
    with pytest.raises(ValueError, match="already batched"):
        trainer.fit(ds.batch(4), global_batch_size=8)
    with pytest.raises(ValueError, match=r"expects examples of shape \[3\]"):
        trainer.fit(ds.map(lambda a, b: (a[:2], b)), global_batch_size=8)
    with pytest.raises(ValueError, match="global batch 32 is larger than the dataset \\(20 examples\\)"):
        trainer.fit(ds, global_batch_size=32)
    assert int(trainer.optimizer.iterations) == 0


def test_fit_on_shard_files(single, tmp_path):
    trainer, _ = linear_trainer(single)
    x, y = regression(40)
    files = S.write_shards(tf.data.Dataset.from_tensor_slices((x, y)), tmp_path, num_shards=3)
    trainer.fit(files, global_batch_size=8, shuffle_seed=1, epochs=2)
    assert int(trainer.optimizer.iterations) == 10


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_local_steps_without_building_match_the_built_pipelines(shard_dir, remainder):
    _, files = shard_dir
    sources = [D.from_files(files), D.from_files(files[:1]), D.from_dataset(examples(45)),
               D.from_dataset(examples(45), sharding="off"), D.from_files(files, sharding="off")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in sources:
            for pipelines, local in [(1, 1), (2, 1), (2, 2), (3, 1)]:
                for p in range(pipelines):
                    for epoch in range(2):  # the file order changes with the epoch
                        ctx = context(pipelines, p, local, 4 * pipelines * local)
                        try:
                            built = source.build(ctx, seed=2, epoch=epoch, remainder=remainder)
                        except ValueError as err:  # e.g. a global batch larger than the dataset
                            with pytest.raises(ValueError, match=str(err)[:30]):
                                source.local_steps(ctx, seed=2, epoch=epoch, remainder=remainder)
                            continue
                        want = int(built.cardinality()) // local
                        assert source.local_steps(ctx, seed=2, epoch=epoch, remainder=remainder) == want
