"""One process, several devices: ``tf.distribute.MirroredStrategy``."""

from __future__ import annotations

import tensorflow as tf

from disttrain.backends.devices import gpu_names, mirrored_cross_device_ops, mirrored_devices
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
            devices = mirrored_devices(cpu_replicas=cpu_replicas, gpus=[] if cpu_replicas else gpu_names())
        # NCCL all-reduce over GPUs; on the host when any replica is a CPU device (NCCL needs GPUs).
        cross = mirrored_cross_device_ops(devices)
        super().__init__(strategy=tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross))
