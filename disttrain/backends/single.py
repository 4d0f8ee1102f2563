"""One process, one device: the reference every other backend must match."""

from __future__ import annotations

import tensorflow as tf

from disttrain.backends.devices import gpu_names, single_device
from disttrain.backends.strategy import StrategyBackend


class SingleBackend(StrategyBackend):
    """Runs on one device through ``tf.distribute.OneDeviceStrategy``.

    Using a real strategy (instead of none) makes the same mistakes fail on a laptop that would fail on
    a cluster, e.g. an optimizer created outside ``backend.scope()``.

    Args:
      device: Device to run on; default the first GPU if any, else the CPU.
    """

    name = "single"

    def __init__(self, *, device: str | None = None):
        if device is None:
            device = single_device(gpu_names())
        super().__init__(strategy=tf.distribute.OneDeviceStrategy(device),
                         on_cpu="CPU" in tf.DeviceSpec.from_string(device).device_type.upper())
