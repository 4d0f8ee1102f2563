"""The LR configurations of tests/workers/lr_sync.py, shared with the test that replays them."""

import numpy as np

EPOCHS, STEPS, PER_REPLICA_BATCH = 12, 4, 16
NOISE = (0.05, 0.6)  # target noise of replica 0 and replica 1: very different local losses


def replica_data(replica: int):
    """The examples of global replica ``replica`` (the same on every backend): STEPS batches."""
    rng = np.random.default_rng(100 + replica)
    x = rng.normal(size=(STEPS * PER_REPLICA_BATCH, 1)).astype("float32")
    y = (2.0 * x + 1.0 + NOISE[replica % 2] * rng.normal(size=x.shape)).astype("float32")
    return x, y


def make_optimizer(name: str):
    import keras

    if name == "schedule":  # a schedule-valued LR (x0.5 every 5 epochs): the controller multiplies it
        return keras.optimizers.SGD(learning_rate=keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=5 * STEPS, decay_rate=0.5, staircase=True))
    return keras.optimizers.SGD(learning_rate=0.05)


def make_controller(name: str):
    import keras

    from disttrain import lr

    if name == "float":
        return lr.LRController(policies=[
            lr.LinearScaling(replicas=True),
            lr.Warmup(steps=2 * STEPS),
            lr.LossThresholdCut(thresholds=[1.0, 0.3], factor=0.5),
            lr.ReduceOnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=0.01, cooldown=1),
            lr.FunctionRule(lambda *, epoch, logs, lr: lr * 0.9 if logs["loss"] < 0.5 else None, name="user"),
        ])
    if name == "schedule":
        return lr.LRController(policies=[
            lr.Warmup(steps=STEPS, start=0.0),
            lr.ReduceOnPlateau(monitor="loss", factor=0.5, patience=2, min_delta=0.02, min_lr=0.01),
        ])
    if name == "cosine":
        return lr.LRController(
            schedule=keras.optimizers.schedules.CosineDecay(0.05, decay_steps=EPOCHS * STEPS, alpha=0.1),
            policies=[lr.LinearScaling(reference_batch_size=PER_REPLICA_BATCH),
                      lr.LossThresholdCut(thresholds=0.3, factor=0.1)])
    raise ValueError(name)
