"""The CUDA stack of disttrain's GPU path, in one place (the one source of truth for its versions).

Read by ``disttrain/scripts/build_horovod.sh`` (which CUDA compiler it accepts for Horovod's NCCL build, which
GPU architectures it compiles), by ``scripts/setup.sh`` and ``docker/Dockerfile.gpu`` (the exact CUDA wheels
they install: ``python3 disttrain/gpu_versions.py`` prints them as pip constraints), by ``disttrain doctor``
(what a GPU host should load) and by ``tests/test_gpu_versions.py`` (which checks the Dockerfile's tag and the
pip metadata against these numbers). Plain constants, no imports: the build script runs this file with any
Python, before disttrain or TensorFlow are installed.

Why these numbers:

- TensorFlow 2.21 is built with CUDA 12.5.1 and cuDNN 9 (``tf.sysconfig.get_build_info()``) and its
  ``and-cuda`` extra asks for the CUDA 12 wheels below (any 12.x >= 12.5.82, cuDNN >= 9.3 < 10, NCCL
  >= 2.27.7 < 3). The pins are what pip resolved on 2026-12-03 and what Horovod's NCCL build was compiled
  and linked against here.
- Horovod's CUDA kernels are compiled by a CUDA 12.5 nvcc (TensorFlow's own build CUDA). PyPI has no CUDA
  12 nvcc (``nvidia-cuda-nvcc-cu12`` ships ``ptxas`` and libdevice only), so the compiler comes from a
  system CUDA 12 toolkit, the ``nvidia/cuda:<CUDA_IMAGE>-devel`` image, or Debian's ``nvidia-cuda-toolkit``
  package (unpacked, not installed, by ``build_horovod.sh``). Kernels built with 12.5 run on the 12.9
  runtime (CUDA minor-version compatibility); Horovod links its CUDA runtime statically.
- NCCL: Horovod links the pip ``nvidia-nccl-cu12`` shared library (``HOROVOD_NCCL_LINK=SHARED``), the same
  copy TensorFlow loads, so one process holds one NCCL.
"""

TENSORFLOW = "2.21.0"

#: CUDA major.minor of the nvcc that compiles Horovod's kernels (TensorFlow 2.21's own build CUDA).
CUDA_COMPILER = "12.5"

#: The ``nvidia/cuda`` image tag of docker/Dockerfile.gpu's build and final stages (starts with CUDA_COMPILER).
CUDA_IMAGE = "12.5.1"

#: Debian's packages of NVIDIA's CUDA 12.5 compiler (non-free, suite ``experimental``: nvcc and its tools, and
#: the headers and static runtime), fetched by build_horovod.sh when a machine has no CUDA 12 nvcc;
#: ``libcu++-dev`` (the CCCL headers) comes from ``unstable``.
DEBIAN_CUDA_TOOLKIT = "12.5.40~12.5.0-2+b1"
DEBIAN_CUDA_DEV = "12.5.39~12.5.0-2+b1"

#: GPU architectures Horovod's kernels are compiled for (HOROVOD_BUILD_CUDA_CC_LIST): native code for
#: Volta (7.x, also runs on Turing 7.5), Ampere/Ada (8.x) and Hopper (9.0), plus PTX for 9.0, which the
#: driver compiles for newer GPUs (Blackwell).
CUDA_ARCHITECTURES = "70,80,90"

#: The CUDA wheels of ``tensorflow[and-cuda]==2.21.0``, pinned: the libraries every process loads.
WHEELS = {
    "nvidia-cublas-cu12": "12.9.3.13",
    "nvidia-cuda-cupti-cu12": "12.9.79",
    "nvidia-cuda-nvcc-cu12": "12.9.86",
    "nvidia-cuda-nvrtc-cu12": "12.9.86",
    "nvidia-cuda-runtime-cu12": "12.9.79",
    "nvidia-cudnn-cu12": "9.28.0.42",
    "nvidia-cufft-cu12": "11.4.1.4",
    "nvidia-curand-cu12": "10.3.10.19",
    "nvidia-cusolver-cu12": "11.7.5.82",
    "nvidia-cusparse-cu12": "12.5.10.65",
    "nvidia-nccl-cu12": "2.32.3",
    "nvidia-nvjitlink-cu12": "12.9.86",
}

#: CUDA runtime, cuDNN and NCCL as a person names them (docs/gpu.md, ``disttrain doctor``).
CUDA_RUNTIME = "12.9"
CUDNN = "9.28"
NCCL = "2.32.3"

#: NVIDIA driver: CUDA 12 minor-version compatibility needs >= 525.60.13; the 12.9 runtime's own features
#: (and PTX from a 12.9 toolchain, which XLA may emit) need >= 575.51.03.
DRIVER_MINIMUM = "525.60.13"
DRIVER_RECOMMENDED = "575.51.03"


def constraints() -> str:
    """The pins as a pip constraints file (``pip install -c``)."""
    return "".join(f"{name}=={version}\n" for name, version in WHEELS.items())


if __name__ == "__main__":
    import sys

    # python3 gpu_versions.py            -> pip constraints
    # python3 gpu_versions.py NAME       -> one constant (e.g. CUDA_COMPILER), for shell scripts
    if len(sys.argv) > 1:
        value = globals().get(sys.argv[1])
        if not isinstance(value, str):
            sys.exit(f"gpu_versions.py: no string constant {sys.argv[1]!r}")
        print(value)
    else:
        sys.stdout.write(constraints())
