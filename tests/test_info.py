"""`disttrain info` and the Horovod build made by the set-up."""

import subprocess

from launchers import BIN, base_env


def test_info_lists_versions_devices_and_backends():
    out = subprocess.run([str(BIN / "disttrain"), "info"], env=base_env(), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    import keras
    import tensorflow as tf

    assert f"tensorflow  {tf.__version__}" in out and f"keras       {keras.__version__}" in out
    assert "horovod     0.28.1" in out
    assert "devices     " in out and "CPU" in out
    for name in ("single", "mirrored", "multiworker", "horovod"):
        assert f"  {name}" in out
    assert "controllers: MPI, Gloo" in out  # horovod.tensorflow imported: built with TensorFlow, MPI and Gloo
    assert "auto picks  single" in out
