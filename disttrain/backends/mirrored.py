"""One process, several devices: ``tf.distribute.MirroredStrategy``."""

from __future__ import annotations

import tensorflow as tf

from disttrain.backends.devices import logical_cpus
from disttrain.backends.strategy import StrategyBackend


class MirroredBackend(StrategyBackend):
    """Replicates the model on every local GPU, or on ``cpu_replicas`` logical CPU devices.

    Args:
      cpu_replicas: When set, split the CPU into this many logical devices and replicate over them
        (emulates a multi-GPU node on a machine without GPUs). Must be used before TensorFlow has
        initialised its runtime.
      devices: Explicit device list; overrides the default (all GPUs, else the CPU).

    Raises:
      RuntimeError: If ``cpu_replicas`` is asked for after TensorFlow has initialised its devices.
    """

    name = "mirrored"

    def __init__(self, *, cpu_replicas: int | None = None, devices: list[str] | None = None):
        if devices is None:
            if cpu_replicas:
                devices = logical_cpus(cpu_replicas)
            else:
                gpus = tf.config.list_logical_devices("GPU")
                devices = [d.name for d in gpus] or ["/cpu:0"]
        # The default cross-device ops use NCCL, which needs GPUs; reduce on the host otherwise.
        cross = None
        if not any("GPU" in d.upper() for d in devices):
            cross = tf.distribute.ReductionToOneDevice(reduce_to_device="/cpu:0")
        super().__init__(strategy=tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross))
