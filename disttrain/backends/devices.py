"""Device helpers: logical CPU devices (to emulate several GPUs), thread limits, and the GPU choices of the
backends (which devices, which all-reduce, which GPU a Horovod process pins)."""

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


# -- GPUs: the choices every backend makes from the devices it sees (pure functions, tested with fake lists) ---
def is_gpu(device: str) -> bool:
    """Whether a device name such as ``/job:localhost/replica:0/task:0/device:GPU:1`` or ``/gpu:0`` is a GPU."""
    return tf.DeviceSpec.from_string(device).device_type.upper() == "GPU" if device else False


def gpu_names() -> list[str]:
    """The logical GPUs TensorFlow sees in this process (initialises its runtime)."""
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def single_device(gpus: list[str]) -> str:
    """The device of the single backend: the first GPU, else the CPU."""
    return "/gpu:0" if gpus else "/cpu:0"


def mirrored_devices(*, cpu_replicas: int | None, gpus: list[str]) -> list[str]:
    """What MirroredStrategy replicates over: ``cpu_replicas`` logical CPU devices when asked for, else every
    local GPU, else the one CPU."""
    if cpu_replicas:
        return logical_cpus(cpu_replicas)
    return list(gpus) or ["/cpu:0"]


def mirrored_cross_device_ops(devices: list[str]) -> tf.distribute.CrossDeviceOps:
    """NCCL all-reduce when every replica is a GPU; else the sum is taken on the host (NCCL needs GPUs)."""
    if devices and all(is_gpu(d) for d in devices):
        return tf.distribute.NcclAllReduce(num_packs=1)
    return tf.distribute.ReductionToOneDevice(reduce_to_device="/cpu:0")


def collective_implementation(communication: str, *, num_gpus: int):
    """MultiWorkerMirroredStrategy's all-reduce: ``auto`` is NCCL where the worker has GPUs, ring over gRPC
    where it has none.

    Raises:
      ValueError: For an unknown name, or ``nccl`` on a worker without GPUs.
    """
    impl = tf.distribute.experimental.CommunicationImplementation
    if communication not in ("auto", "ring", "nccl"):
        raise ValueError(f"communication={communication!r} is not one of 'auto', 'ring', 'nccl'")
    if communication == "nccl" and not num_gpus:
        raise ValueError("communication='nccl' needs GPUs, and this worker sees none; use 'auto' (ring on CPUs) "
                         "or 'ring'")
    if communication == "ring" or (communication == "auto" and not num_gpus):
        return impl.RING
    return impl.NCCL


def local_gpu_index(*, local_rank: int, num_gpus: int) -> int:
    """The GPU a Horovod process pins (one GPU per process, by local rank).

    A process that sees one GPU (``CUDA_VISIBLE_DEVICES`` set per local rank, as SLURM's ``--gpus-per-task``
    does) takes it; one that sees several takes the one at its local rank.

    Raises:
      ValueError: If the process sees several GPUs but fewer than its local rank + 1 (more processes than GPUs
        on the host: two would share a GPU).
    """
    if num_gpus <= 1:
        return 0
    if local_rank >= num_gpus:
        raise ValueError(f"local rank {local_rank} but this host has only {num_gpus} GPUs: start at most {num_gpus} "
                         f"processes per host (horovodrun -np N -H host:{num_gpus},...), one per GPU")
    return local_rank


def horovod_gpu_operations(*, num_gpus: int, nccl_built: bool) -> tuple[str, str | None]:
    """``(how GPU tensors are reduced, warning or None)`` for a Horovod process: NCCL when Horovod was built
    with it; without it, Horovod copies GPU tensors to the host and reduces them with Gloo/MPI (slow)."""
    if not num_gpus:
        return "none (no GPU: CPU tensors, Gloo/MPI)", None
    if nccl_built:
        return "NCCL", None
    return "host copies (Gloo/MPI)", ("Horovod was built without NCCL, so every GPU gradient is copied to the host "
                                      "and reduced with Gloo/MPI; rebuild it with `disttrain install-horovod --gpu`")
