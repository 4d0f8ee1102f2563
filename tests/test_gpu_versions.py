"""One source of truth for the GPU stack (disttrain/gpu_versions.py): the GPU image, the set-up, the build
script and TensorFlow's own requirements agree with it; the build script refuses a CUDA that TensorFlow does not
run, and keeps the NCCL wheel apart from the CPU one in its cache."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

from packaging.requirements import Requirement

from disttrain import gpu_versions
from launchers import ROOT, base_env

DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
SCRIPT = ROOT / "disttrain" / "scripts" / "build_horovod.sh"


def test_gpu_image_uses_the_versions_it_was_compiled_against():
    text = DOCKERFILE.read_text()
    assert re.findall(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M) == [gpu_versions.CUDA_IMAGE]
    assert gpu_versions.CUDA_IMAGE.startswith(gpu_versions.CUDA_COMPILER + ".")
    assert re.findall(r"^FROM nvidia/cuda:\$\{CUDA_IMAGE\}-(\w+)-\$\{UBUNTU\}", text, re.M) == ["devel", "base"]
    assert not re.search(r"nvidia/cuda:\d", text), "a CUDA version written into a FROM line instead of CUDA_IMAGE"
    build = re.search(r"^RUN python3 -m venv /opt/venv(?:.*\n)+?(?=\n)", text, re.M).group(0)
    assert "python3 disttrain/gpu_versions.py > gpu-constraints.txt" in build
    assert "--constraint gpu-constraints.txt" in build
    assert "DISTTRAIN_GPU=1 DISTTRAIN_CACHE=/tmp/disttrain-cache scripts/build_horovod.sh /opt/venv" in build
    for stale in ("12.6", "cudnn-devel", "CUDA_TAG"):
        assert stale not in text, stale


def test_the_pins_are_what_tensorflow_asks_for():
    """Every CUDA wheel of tensorflow[and-cuda]==2.21.0 is pinned, each pin within TensorFlow's range."""
    dist = next(d for d in ("tensorflow", "tensorflow-cpu") if _installed(d))
    assert importlib.metadata.version(dist) == gpu_versions.TENSORFLOW
    wanted = [Requirement(r) for r in importlib.metadata.requires(dist) if 'extra == "and-cuda"' in r]
    assert sorted(r.name for r in wanted) == sorted(gpu_versions.WHEELS)
    for requirement in wanted:
        assert requirement.specifier.contains(gpu_versions.WHEELS[requirement.name]), requirement
    assert gpu_versions.WHEELS["nvidia-nccl-cu12"] == gpu_versions.NCCL
    assert gpu_versions.WHEELS["nvidia-cudnn-cu12"].startswith(gpu_versions.CUDNN + ".")
    assert gpu_versions.WHEELS["nvidia-cuda-runtime-cu12"].startswith(gpu_versions.CUDA_RUNTIME + ".")
    # TensorFlow 2.21's own build CUDA is the compiler's major.minor (tf.sysconfig.get_build_info() of the GPU
    # wheel says 12.5.1; the CPU wheel has no CUDA); the pip pins give the same constraints file to everyone
    proc = subprocess.run([sys.executable, str(ROOT / "disttrain" / "gpu_versions.py")], capture_output=True,
                          text=True, timeout=60, check=True)
    assert proc.stdout == gpu_versions.constraints() and proc.stdout.count("==") == len(gpu_versions.WHEELS)
    one = subprocess.run([sys.executable, str(ROOT / "disttrain" / "gpu_versions.py"), "CUDA_ARCHITECTURES"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert one.stdout == gpu_versions.CUDA_ARCHITECTURES + "\n"


def test_setup_pins_the_cuda_wheels():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '"$VENV/bin/python" "$ROOT/disttrain/gpu_versions.py" > "$VENV/gpu-constraints.txt"' in setup
    makefile = (ROOT / "Makefile").read_text()
    assert "DISTTRAIN_EXTRA=gpu DISTTRAIN_GPU=1 bash scripts/setup.sh" in makefile.split("gpu-build:")[1]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_build_script_refuses_cuda_13_and_keeps_the_nccl_wheel_apart(tmp_path):
    """This environment's Horovod has no NCCL, so DISTTRAIN_GPU=1 must build: it ignores the cached CPU wheel
    (another cache key), and fails before downloading anything because the only nvcc given is CUDA 13."""
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}-tf{gpu_versions.TENSORFLOW}"
    mpi = "" if shutil.which("mpicxx") else "-nompi"
    cpu_dir = tmp_path / "cache" / "horovod" / f"{tag}-cpu{mpi}"
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_text("not a wheel: must not be installed")
    cuda = tmp_path / "cuda13"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    (cuda / "bin" / "nvcc").chmod(0o755)
    env = dict(base_env(), DISTTRAIN_GPU="1", DISTTRAIN_CACHE=str(tmp_path / "cache"), DISTTRAIN_PYTHON=sys.executable,
               HOROVOD_CUDA_HOME=str(cuda), HOROVOD_NCCL_HOME=str(tmp_path / "nccl"))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert f"building Horovod 0.28.1 for TensorFlow 2.21.0 (nccl{mpi})" in proc.stderr, proc.stderr
    assert (f"HOROVOD_CUDA_HOME={cuda}: its bin/nvcc is CUDA 13.0, but TensorFlow 2.21.0 runs\n[horovod] CUDA 12: point "
            "HOROVOD_CUDA_HOME to a CUDA 12.5 toolkit") in proc.stderr, proc.stderr
    nccl_dir = tmp_path / "cache" / "horovod" / f"{tag}-nccl{mpi}"
    assert nccl_dir.is_dir() and not os.listdir(nccl_dir)
    assert "pip" not in proc.stderr.split(f"(nccl{mpi})")[1], "it downloaded before checking the compiler"
