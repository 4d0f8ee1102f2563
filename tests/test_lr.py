"""In-process tests of disttrain.lr: the LR actually applied, warmup, Keras-equivalent plateau rule,
threshold cuts, user rules, schedule-valued optimizers, checkpoints and argument errors."""

from __future__ import annotations

import types

import numpy as np
import pytest

import disttrain as dt

backend = dt.get_backend("single", threads=1)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from disttrain import lr  # noqa: E402


def f32(x: float) -> float:
    return float(np.float32(x))


def unit_gradient_trainer(*, optimizer, callbacks=(), global_batch=4):
    """A one-weight model whose loss is mean(w * 1): the gradient is exactly 1, so SGD moves the weight
    by exactly -lr per step and the weight's trajectory reveals the LR actually applied."""
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(1,)),
                                  keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])

    def step(ctx, batch):
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reshape(model(batch, training=True), [-1]))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    data = tf.data.Dataset.from_tensor_slices(np.ones((global_batch, 1), "float32"))  # one step an epoch
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend,
                         callbacks=list(callbacks), verbose=0)
    return trainer, model, data


def fit_and_applied_lrs(trainer, model, data, *, epochs, global_batch=4):
    """Trains one step per epoch and returns (history, the LR each step applied, from the weights)."""
    weights = [0.0]
    history = None
    for _ in range(epochs):
        history = trainer.fit(data, global_batch_size=global_batch, epochs=1, initial_epoch=len(weights) - 1)
        weights.append(float(model.trainable_variables[0].numpy().ravel()[0]))
    return history, [a - b for a, b in zip(weights, weights[1:])]


def fake_trainer(optimizer, **extra):
    fields = dict(optimizer=optimizer, backend=backend, global_batch_size=None, metrics=[], eval_metrics=[])
    return types.SimpleNamespace(**{**fields, **extra})


# -- the LR that is applied ----------------------------------------------------------------------------
@pytest.mark.parametrize("start", [None, 0.0])
def test_warmup_with_scaling_matches_formula_and_is_applied(start):
    base, k, warm = 0.1, 4, 4  # global batch 64 / reference 16 -> k = 4
    with backend.scope():
        optimizer = keras.optimizers.SGD(base)
    controller = lr.LRController(policies=[lr.LinearScaling(reference_batch_size=16), lr.Warmup(steps=warm, start=start)])
    trainer, model, data = unit_gradient_trainer(optimizer=optimizer, callbacks=[controller], global_batch=64)
    history, applied = fit_and_applied_lrs(trainer, model, data, epochs=warm + 2, global_batch=64)
    s0 = 1.0 / k if start is None else start
    target = f32(base) * k
    expected = [f32(target * (s0 + (1 - s0) * min(t, warm) / warm)) for t in range(warm + 2)]
    # Goyal: from the base LR (or 0) at step 0, half-way at W/2, the scaled LR from step W on.
    assert expected[0] == pytest.approx(base if start is None else 0.0, rel=1e-6)
    assert expected[warm // 2] == pytest.approx((base + k * base) / 2 if start is None else k * base / 2, rel=1e-6)
    assert expected[warm] == expected[warm + 1] == pytest.approx(k * base, rel=1e-6)
    assert history["lr"] == expected  # the logged LR: what the step applied, bitwise
    assert [controller.lr_at(t) for t in range(warm + 2)] == expected
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=1e-7)  # what SGD really applied


def test_schedule_valued_optimizer_gets_multiplier_not_crash():
    # step decay (x0.5 every 2 steps) is a Keras schedule: ExponentialDecay with staircase=True
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=2, decay_rate=0.5, staircase=True)
    with backend.scope():
        optimizer = keras.optimizers.SGD(learning_rate=schedule)
    cut = lr.FunctionRule(lambda *, epoch, logs, lr: lr / 4 if epoch == 2 else None, name="quarter")
    controller = lr.LRController(policies=[cut])
    trainer, model, data = unit_gradient_trainer(optimizer=optimizer, callbacks=[controller])
    history, applied = fit_and_applied_lrs(trainer, model, data, epochs=6)
    expected = [f32(0.2 * 0.5 ** (t // 2) * (0.25 if t >= 3 else 1.0)) for t in range(6)]
    np.testing.assert_allclose(history["lr"], expected, rtol=1e-6)
    np.testing.assert_allclose(applied, expected, rtol=1e-5)
    with pytest.raises(TypeError, match="schedule"):
        lr.set_learning_rate(optimizer, 0.3)


def test_keras_cosine_schedule_as_controller_base():
    with backend.scope():
        optimizer = keras.optimizers.SGD(1.0)  # replaced by the controller's schedule
    cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=5, alpha=0.2)
    controller = lr.LRController(schedule=cosine, policies=[lr.LinearScaling(replicas=True)])
    trainer, model, data = unit_gradient_trainer(optimizer=optimizer, callbacks=[controller])
    history, applied = fit_and_applied_lrs(trainer, model, data, epochs=5)
    expected = [float(cosine(t)) for t in range(5)]
    np.testing.assert_allclose(history["lr"], expected, rtol=1e-6)
    np.testing.assert_allclose(applied, expected, rtol=1e-5)
    assert expected[0] > expected[-1]


def test_controller_added_after_a_fit_retraces_the_step():
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
    trainer, model, data = unit_gradient_trainer(optimizer=optimizer)
    trainer.fit(data, global_batch_size=4, epochs=1)  # traced with the plain float LR
    trainer.callbacks.append(lr.LRController(policies=[lr.LinearScaling(reference_batch_size=2)]))
    before = float(model.trainable_variables[0].numpy().ravel()[0])
    trainer.fit(data, global_batch_size=4, epochs=1)
    after = float(model.trainable_variables[0].numpy().ravel()[0])
    assert before - after == pytest.approx(0.2, rel=1e-5)  # x2 scaling applied, not the stale 0.1


def test_set_learning_rate_sets_base_under_controller():
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
    controller = lr.LRController(policies=[lr.LinearScaling(replicas=True)])
    controller.install(optimizer, backend=backend, num_replicas=3)
    assert controller.learning_rate == pytest.approx(0.3, rel=1e-6)
    lr.set_learning_rate(optimizer, 0.2)
    assert controller.learning_rate == pytest.approx(0.6, rel=1e-6)
    assert lr.controller_of(optimizer) is controller
    with pytest.raises(ValueError, match="already has an LRController"):
        lr.LRController().install(optimizer, backend=backend)


def test_keras_learning_rate_internals(tmp_path):
    """replace_learning_rate sets Keras' private ``_learning_rate`` because the public setter breaks
    checkpoints of float-LR optimizers. If a Keras upgrade changes either, this fails: switch to the
    public setter (``optimizer.learning_rate = schedule``) once it keeps checkpoints working."""
    constant = keras.optimizers.schedules.ExponentialDecay(0.25, decay_steps=1, decay_rate=1.0)
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
        public = keras.optimizers.SGD(0.1)
    variable = optimizer.learning_rate
    assert lr.replace_learning_rate(optimizer, constant) is variable, "Keras no longer keeps the LR in _learning_rate"
    assert float(optimizer.learning_rate) == 0.25, "Keras no longer reads _learning_rate at every step"
    tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "replaced"))  # saves fine
    public.learning_rate = constant
    with pytest.raises(ValueError, match="list element was replaced"):  # Keras 3.15: the public setter breaks it
        tf.train.Checkpoint(optimizer=public).save(str(tmp_path / "public"))


# -- rules -----------------------------------------------------------------------------------------------
def keras_plateau_lrs(values, *, monitor, lr0, **kwargs):
    """The LR after each epoch with the real keras.callbacks.ReduceLROnPlateau on ``values``."""
    model = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr0), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(monitor=monitor, **kwargs)
    callback.set_model(model)
    callback.on_train_begin()
    out = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {monitor: value})
        out.append(float(np.asarray(model.optimizer.learning_rate)))
    return out


def our_lrs(values, *, monitor, lr0, policies_fn):
    with backend.scope():
        optimizer = keras.optimizers.SGD(lr0)
    controller = lr.LRController(policies=policies_fn())
    trainer = fake_trainer(optimizer)
    controller.on_train_begin(trainer)
    out = []
    for epoch, value in enumerate(values):
        controller.on_epoch_end(trainer, epoch, {monitor: value})
        out.append(controller.learning_rate)
    return out, controller


def changes(lrs, lr0):
    return [e for e, (a, b) in enumerate(zip([lr0] + lrs, lrs)) if a != b]


PLATEAU_CASES = [
    dict(mode="min", factor=0.5, patience=2, min_delta=0.0, cooldown=0, min_lr=0.0),
    dict(mode="min", factor=0.1, patience=1, min_delta=0.05, cooldown=2, min_lr=0.0),
    dict(mode="min", factor=0.5, patience=0, min_delta=1e-4, cooldown=1, min_lr=0.03),
    dict(mode="auto", factor=0.7, patience=3, min_delta=0.01, cooldown=0, min_lr=0.0),
    dict(mode="max", factor=0.5, patience=2, min_delta=0.02, cooldown=1, min_lr=0.01),
]


@pytest.mark.parametrize("case", PLATEAU_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_plateau_changes_at_the_epochs_keras_picks(case):
    rng = np.random.default_rng(len(str(case)))
    steps = rng.choice([-0.1, -0.02, 0.0, 0.0, 0.01, 0.03], size=60)  # progress, stalls and relapses
    values = [float(v) for v in np.round(1.0 + np.cumsum(-steps if case["mode"] == "max" else steps), 3)]
    monitor = "accuracy" if case["mode"] == "max" else "loss"
    want = keras_plateau_lrs(values, monitor=monitor, lr0=0.1, **case)
    got, _ = our_lrs(values, monitor=monitor, lr0=0.1,
                     policies_fn=lambda: [lr.ReduceOnPlateau(monitor=monitor, **case)])
    assert changes(want, f32(0.1)), "the sequence must make Keras reduce at least once"
    assert changes(got, f32(0.1)) == changes(want, f32(0.1))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_plateau_on_handpicked_sequence():
    values = [1.0, 0.9, 0.9, 0.9, 0.85, 0.8499, 0.85, 0.86, 0.7, 0.7, 0.7, 0.7, 0.7]
    kwargs = dict(mode="min", factor=0.5, patience=2, min_delta=1e-3, cooldown=1, min_lr=0.0)
    want = keras_plateau_lrs(values, monitor="loss", lr0=0.1, **kwargs)
    got, controller = our_lrs(values, monitor="loss", lr0=0.1,
                              policies_fn=lambda: [lr.ReduceOnPlateau(monitor="loss", **kwargs)])
    assert changes(want, f32(0.1)) == changes(got, f32(0.1)) == [3, 6, 10, 12]
    assert [t["changes"] for t in controller.timeline][3] == ["reduce_on_plateau"]


def test_plateau_auto_mode_needs_a_known_direction():
    rule = lr.ReduceOnPlateau(monitor="psnr", mode="auto")
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        rule.setup(fake_trainer(None))
    rule.setup(fake_trainer(None, metrics=[keras.metrics.BinaryAccuracy(name="psnr")]))
    assert rule._direction == 1.0


def test_seed_loss_threshold_cut_once():
    values = [0.5, 0.02, 0.009, 0.005, 0.02, 0.001]
    got, controller = our_lrs(values, monitor="loss", lr0=0.01,
                              policies_fn=lambda: [lr.LossThresholdCut(thresholds=0.01, factor=0.1)])
    assert got == [f32(0.01)] * 2 + [f32(f32(0.01) / 10)] * 4  # loss < 0.01 -> LR = initial / 10, once
    assert int(controller.rules[0].cuts.numpy()) == 1


def test_loss_threshold_cut_each_lower_threshold():
    values = [0.5, 0.09, 0.05, 0.0009, 0.0005]  # crosses 0.1, then 0.01 and 0.001 in one epoch
    got, controller = our_lrs(values, monitor="loss", lr0=1.0,
                              policies_fn=lambda: [lr.LossThresholdCut(thresholds=[0.1, 0.01, 0.001], factor=0.5)])
    np.testing.assert_allclose(got, [1.0, 0.5, 0.5, 0.125, 0.125], rtol=1e-7)
    assert int(controller.rules[0].cuts.numpy()) == 3


def test_user_rule_receives_global_logs_and_composes():
    seen = []

    def rule(*, epoch, logs, lr):
        seen.append((epoch, dict(logs), lr))
        return lr * 2 if logs["val_acc"] > 0.5 else None

    got, _ = our_lrs([0.4, 0.6, 0.7], monitor="val_acc", lr0=0.1,
                     policies_fn=lambda: [lr.LinearScaling(replicas=True), lr.FunctionRule(rule, name="doubling")])
    np.testing.assert_allclose(got, [0.1, 0.2, 0.4], rtol=1e-6)
    assert seen[1][1] == {"val_acc": 0.6} and seen[1][2] == pytest.approx(0.1)


def test_missing_monitor_is_an_error_naming_the_logged_values():
    with pytest.raises(KeyError, match="val_loss.*logged values are \\['loss'\\]"):
        our_lrs([1.0], monitor="loss", lr0=0.1, policies_fn=lambda: [lr.ReduceOnPlateau(monitor="val_loss")])


# -- checkpoints -----------------------------------------------------------------------------------------
def make_full_controller():
    return lr.LRController(policies=[
        lr.LinearScaling(reference_batch_size=8, global_batch_size=32), lr.Warmup(steps=10),
        lr.LossThresholdCut(thresholds=[0.5, 0.2], factor=0.5),
        lr.ReduceOnPlateau(monitor="loss", factor=0.5, patience=1, cooldown=2, min_delta=0.01)])


def test_controller_state_round_trips_through_checkpoint(tmp_path):
    values = [1.0, 0.4, 0.4, 0.4, 0.39, 0.15, 0.15, 0.15, 0.15, 0.15]
    with backend.scope():
        opt_a = keras.optimizers.SGD(0.05)
        opt_b = keras.optimizers.SGD(0.05)
    a = make_full_controller()
    trainer_a = fake_trainer(opt_a)
    a.on_train_begin(trainer_a)
    opt_a.iterations.assign(6)
    for epoch, value in enumerate(values[:5]):
        a.on_epoch_end(trainer_a, epoch, {"loss": value})
    state = {v.name + str(i): v.numpy() for i, v in enumerate(a.variables)}
    path = tf.train.Checkpoint(lr=a, optimizer=opt_a).save(str(tmp_path / "ckpt"))
    assert int(a.rules[0].cuts.numpy()) == 1 and int(a.rules[1].cooldown_counter.numpy()) > 0

    b = make_full_controller()
    trainer_b = fake_trainer(opt_b)
    b.on_train_begin(trainer_b)
    assert b.learning_rate != a.learning_rate
    tf.train.Checkpoint(lr=b, optimizer=opt_b).restore(path).assert_existing_objects_matched()
    restored = {v.name + str(i): v.numpy() for i, v in enumerate(b.variables)}
    assert restored.keys() == state.keys()
    for key in state:
        assert np.array_equal(restored[key], state[key]), key
    assert int(opt_b.iterations.numpy()) == 6
    assert b.learning_rate == a.learning_rate
    for epoch, value in enumerate(values[5:], start=5):  # both continue with the same decisions
        a.on_epoch_end(trainer_a, epoch, {"loss": value})
        b.on_epoch_end(trainer_b, epoch, {"loss": value})
        assert b.learning_rate == a.learning_rate
    assert [t["changes"] for t in b.timeline] == [t["changes"] for t in a.timeline[5:]]
    assert any(t["changes"] for t in b.timeline)


# -- argument errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, pattern", [
    (lambda: lr.ReduceOnPlateau(factor=1.5), ValueError, "factor=1.5"),
    (lambda: lr.ReduceOnPlateau(mode="up"), ValueError, "mode='up'"),
    (lambda: lr.ReduceOnPlateau(patience=-1), ValueError, "patience=-1"),
    (lambda: lr.LossThresholdCut(thresholds=[0.1, 0.2]), ValueError, "strictly decrease"),
    (lambda: lr.LossThresholdCut(factor=0), ValueError, "factor=0"),
    (lambda: lr.Warmup(steps=0), ValueError, "steps=0"),
    (lambda: lr.Warmup(steps=5, start=2.0), ValueError, "start=2.0"),
    (lambda: lr.LinearScaling(), ValueError, "reference_batch_size"),
    (lambda: lr.LinearScaling(reference_batch_size=0), ValueError, "reference_batch_size=0"),
    (lambda: lr.LRController(policies=["cosine"]), TypeError, "unknown LR policy 'cosine'"),
    (lambda: lr.LRController(policies=[lr.Warmup(steps=1), lr.Warmup(steps=2)]), ValueError, "at most one"),
    (lambda: lr.FunctionRule(3), TypeError, "got 3"),
])
def test_bad_arguments_say_what_and_how(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_linear_scaling_by_batch_needs_a_batch():
    with backend.scope():
        optimizer = keras.optimizers.SGD(0.1)
    controller = lr.LRController(policies=[lr.LinearScaling(reference_batch_size=32)])
    with pytest.raises(ValueError, match="global_batch_size"):
        controller.install(optimizer, backend=backend)


def test_rule_returning_garbage_is_reported():
    with pytest.raises(ValueError, match="nan"):
        our_lrs([1.0], monitor="loss", lr0=0.1,
                policies_fn=lambda: [lr.FunctionRule(lambda **_: float("nan"), name="bad")])
