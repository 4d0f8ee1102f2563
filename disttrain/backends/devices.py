"""Device helpers: logical CPU devices (to emulate several GPUs) and thread limits."""

from __future__ import annotations

import tensorflow as tf


def split_cpu(count: int) -> None:
    """Splits the first physical CPU into ``count`` logical devices, without starting the runtime.

    Args:
      count: Number of logical CPU devices, >= 1.

    Raises:
      ValueError: If ``count`` < 1.
      RuntimeError: If TensorFlow's runtime is already initialised with a different split.
    """
    if count < 1:
        raise ValueError(f"cpu_replicas={count} must be >= 1")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        raise RuntimeError(
            f"cannot split the CPU into {count} logical devices: TensorFlow is already initialised "
            f"with {have}. Create the backend (disttrain.get_backend) before any other TensorFlow "
            "op runs, or set DISTTRAIN_CPU_REPLICAS in the environment") from err


def logical_cpus(count: int) -> list[str]:
    """Splits the CPU into ``count`` logical devices (see :func:`split_cpu`) and returns their names."""
    split_cpu(count)
    return [d.name for d in tf.config.list_logical_devices("CPU")][:count]


def limit_threads(threads: int | None) -> None:
    """Caps TensorFlow's intra- and inter-op thread pools (before the runtime starts; else a no-op)."""
    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass
