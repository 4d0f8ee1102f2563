"""Every choice disttrain makes from the GPUs it sees, with the device list faked (no GPU here):
which devices, which all-reduce (NCCL or on the host / ring), which GPU a Horovod process pins."""

import types

import pytest
import tensorflow as tf

from disttrain.backends import devices
from disttrain.backends.devices import (collective_implementation, horovod_gpu_operations, is_gpu, local_gpu_index,
                                        mirrored_cross_device_ops, mirrored_devices, single_device)

GPUS = ["/job:localhost/replica:0/task:0/device:GPU:0", "/job:localhost/replica:0/task:0/device:GPU:1"]
IMPL = tf.distribute.experimental.CommunicationImplementation


def test_device_names():
    assert [is_gpu(d) for d in GPUS + ["/gpu:3", "/cpu:0", "/job:localhost/device:CPU:1", ""]] == [
        True, True, True, False, False, False]


def test_single_device_is_the_first_gpu_else_the_cpu():
    assert single_device(GPUS) == "/gpu:0"
    assert single_device([]) == "/cpu:0"


def test_mirrored_devices_and_all_reduce():
    assert mirrored_devices(cpu_replicas=None, gpus=GPUS) == GPUS
    assert mirrored_devices(cpu_replicas=None, gpus=[]) == ["/cpu:0"]
    assert isinstance(mirrored_cross_device_ops(GPUS), tf.distribute.NcclAllReduce)
    for host in (["/cpu:0"], ["/cpu:0", "/cpu:1"], [GPUS[0], "/cpu:0"]):  # NCCL only when every replica is a GPU
        ops = mirrored_cross_device_ops(host)
        assert isinstance(ops, tf.distribute.ReductionToOneDevice) and ops.reduce_to_device == "/cpu:0", host


def test_multiworker_all_reduce():
    assert collective_implementation("auto", num_gpus=4) == IMPL.NCCL
    assert collective_implementation("auto", num_gpus=0) == IMPL.RING
    assert collective_implementation("ring", num_gpus=4) == IMPL.RING
    assert collective_implementation("nccl", num_gpus=1) == IMPL.NCCL
    with pytest.raises(ValueError, match="communication='nccl' needs GPUs, and this worker sees none; use 'auto'"):
        collective_implementation("nccl", num_gpus=0)
    with pytest.raises(ValueError, match="communication='gloo' is not one of 'auto', 'ring', 'nccl'"):
        collective_implementation("gloo", num_gpus=0)


def test_horovod_gpu_per_local_rank():
    assert [local_gpu_index(local_rank=r, num_gpus=4) for r in range(4)] == [0, 1, 2, 3]
    # CUDA_VISIBLE_DEVICES set per local rank (SLURM --gpus-per-task=1): each process sees its one GPU as GPU 0
    assert [local_gpu_index(local_rank=r, num_gpus=1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"local rank 2 but this host has only 2 GPUs: start at most 2 processes per "
                                         r"host \(horovodrun -np N -H host:2,...\)"):
        local_gpu_index(local_rank=2, num_gpus=2)


def test_horovod_nccl_or_host_reduction():
    assert horovod_gpu_operations(num_gpus=2, nccl_built=True) == ("NCCL", None)
    assert horovod_gpu_operations(num_gpus=0, nccl_built=False)[1] is None
    how, warning = horovod_gpu_operations(num_gpus=2, nccl_built=False)
    assert how == "host copies (Gloo/MPI)" and "rebuild it with `disttrain install-horovod --gpu`" in warning


# -- the backends take those choices (TensorFlow's device list and strategies faked) ---------------------------
class _Recorder:
    """Stands in for a tf.distribute strategy class; records what it was created with."""

    made: list = []

    def __init__(self, **kwargs):
        _Recorder.made.append(kwargs)
        self.num_replicas_in_sync = len(kwargs.get("devices") or [1])


def test_mirrored_backend_uses_every_gpu_with_nccl(monkeypatch):
    from disttrain.backends import mirrored

    monkeypatch.setattr(mirrored, "gpu_names", lambda: list(GPUS))
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", _Recorder)
    _Recorder.made = []
    backend = mirrored.MirroredBackend()
    made = _Recorder.made[-1]
    assert made["devices"] == GPUS and isinstance(made["cross_device_ops"], tf.distribute.NcclAllReduce)
    assert backend.local_replicas == 2
    monkeypatch.setattr(mirrored, "gpu_names", lambda: [])
    mirrored.MirroredBackend()
    assert _Recorder.made[-1]["devices"] == ["/cpu:0"]
    assert isinstance(_Recorder.made[-1]["cross_device_ops"], tf.distribute.ReductionToOneDevice)


def test_single_backend_takes_the_first_gpu(monkeypatch):
    from disttrain.backends import single

    placed = []
    monkeypatch.setattr(single, "gpu_names", lambda: list(GPUS))
    monkeypatch.setattr(tf.distribute, "OneDeviceStrategy", lambda device: placed.append(device) or _Recorder())
    single.SingleBackend()
    assert placed == ["/gpu:0"]


@pytest.mark.parametrize("local_rank,visible,pinned", [(1, 4, 1), (3, 1, 0)])
def test_horovod_backend_pins_the_gpu_of_its_local_rank(monkeypatch, capsys, local_rank, visible, pinned):
    from disttrain.backends import horovod

    gpus = [tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(visible)]
    fake = types.SimpleNamespace(init=lambda: None, is_initialized=lambda: False, local_rank=lambda: local_rank,
                                 rank=lambda: 0, size=lambda: 4, nccl_built=lambda: 0, Sum=0, Max=1, Min=2)
    calls = []
    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.setattr(horovod, "import_horovod", lambda: fake)
    monkeypatch.setattr(horovod, "wait_for_horovod_peers", lambda timeout: None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda device, kind: calls.append(("visible", device.name)))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda device, on: calls.append(("growth", device.name)))
    horovod.HorovodBackend()
    assert calls == [("visible", f"/physical_device:GPU:{pinned}"), ("growth", f"/physical_device:GPU:{pinned}")]
    # built without NCCL (nccl_built() == 0): rank 0 says GPU gradients go through the host
    assert "Horovod was built without NCCL" in capsys.readouterr().err


def test_horovod_backend_refuses_more_local_ranks_than_gpus(monkeypatch):
    from disttrain.backends import horovod

    gpus = [tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(2)]
    fake = types.SimpleNamespace(init=lambda: None, is_initialized=lambda: False, local_rank=lambda: 2, rank=lambda: 2,
                                 nccl_built=lambda: 1)
    monkeypatch.setenv("HOROVOD_RANK", "2")
    monkeypatch.setattr(horovod, "import_horovod", lambda: fake)
    monkeypatch.setattr(horovod, "wait_for_horovod_peers", lambda timeout: None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    with pytest.raises(ValueError, match="local rank 2 but this host has only 2 GPUs"):
        horovod.HorovodBackend()


def test_gpu_names_asks_tensorflow(monkeypatch):
    fake = [types.SimpleNamespace(name=n) for n in GPUS]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: fake if kind == "GPU" else [])
    assert devices.gpu_names() == GPUS
