"""Learning-rate rules decided on globally reduced values, so every rank takes the same decision."""

from __future__ import annotations

import keras
import tensorflow as tf

from disttrain.trainer import Callback


def set_learning_rate(optimizer: keras.optimizers.Optimizer, value: float) -> None:
    """Sets a float-valued learning rate.

    Raises:
      TypeError: If the optimizer's learning rate is a schedule (Keras cannot assign those).
    """
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        raise TypeError(f"the optimizer's learning rate is a schedule "
                        f"({type(optimizer._learning_rate).__name__}) and cannot be set; use a float "
                        "learning rate with LR rules")
    optimizer.learning_rate.assign(value)


class LossThresholdCut(Callback):
    """The seed rule: once the global epoch loss falls below ``threshold``, set the LR to
    ``factor`` times the initial LR.

    The decision reads ``logs[monitor]``, which the trainer has already reduced over all replicas and
    processes, so it is identical everywhere. Whether the cut happened is kept in a variable
    (``self.cut``) so it can be checkpointed.

    Args:
      threshold: Cut when the monitored value is strictly below this.
      factor: New LR = factor x the LR at the start of training.
      monitor: Name of the logged value to watch.
    """

    def __init__(self, *, threshold: float = 0.01, factor: float = 0.1, monitor: str = "loss"):
        if not 0 < factor:
            raise ValueError(f"factor={factor} must be > 0")
        self.threshold, self.factor, self.monitor = threshold, factor, monitor
        self.cut = tf.Variable(False, trainable=False, name="lr_cut_done")
        self.initial_lr = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="lr_initial")

    def on_train_begin(self, trainer) -> None:
        if self.initial_lr.numpy() < 0:
            self.initial_lr.assign(float(trainer.optimizer.learning_rate.numpy()))

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        if self.monitor not in logs:
            raise KeyError(f"LossThresholdCut monitors {self.monitor!r}, which is not logged; logged: "
                           f"{sorted(logs)}")
        if not bool(self.cut.numpy()) and logs[self.monitor] < self.threshold:
            set_learning_rate(trainer.optimizer, float(self.initial_lr.numpy()) * self.factor)
            self.cut.assign(True)
