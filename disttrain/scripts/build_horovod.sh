#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 from its PyPI source into a Python environment that has TensorFlow.
#
#   disttrain install-horovod            # the installed package runs this script for its own Python
#   scripts/build_horovod.sh [VENV]      # in a checkout (scripts/build_horovod.sh links here)
#
# This is the one copy of the recipe: the checkout's set-up, `disttrain install-horovod` and the Docker
# images (docker/) all run this file.
#
# Horovod 0.28.1 is the last release and ships as source only. Against TensorFlow >= 2.16 its
# horovod/tensorflow/xla_mpi_ops.cc no longer compiles (TF moved the XLA headers), so this script drops
# that one file from the build; the only loss is Horovod collectives inside jit_compile=True functions.
#
# The wheel is cached under $DISTTRAIN_CACHE/horovod/<python>-tf<version>-<ops>/ and re-used, so only
# the first build pays the ~8 minutes of compilation.
#
# Python: the virtualenv VENV (argument), else DISTTRAIN_PYTHON (an interpreter), else DISTTRAIN_VENV,
# else python3 on PATH.
# Environment: DISTTRAIN_CACHE (default ~/.cache/disttrain); DISTTRAIN_GPU=1 adds NCCL GPU operations
# (see "GPU build" below); HOROVOD_* build variables you set yourself are passed through. With OpenMPI's
# compiler wrappers (mpicxx) present, Horovod is built with MPI too; without them, with Gloo only.
#
# GPU build (DISTTRAIN_GPU=1; the versions are those of disttrain/gpu_versions.py): HOROVOD_GPU_OPERATIONS=NCCL
# against the environment's tensorflow[and-cuda] wheels. NCCL is the pip nvidia-nccl-cu12 that TensorFlow
# loads, linked as a shared library (HOROVOD_NCCL_LINK=SHARED; the wheel has no static one, and one NCCL per
# process is safer) and found at run time through an RPATH into site-packages/nvidia/nccl/lib. The CUDA 12
# compiler: HOROVOD_CUDA_HOME if set, else the nvcc on PATH or in /usr/local/cuda if it is CUDA 12 (a CUDA 13
# one is refused: TensorFlow 2.21 runs CUDA 12), else Debian's nvidia-cuda-toolkit 12.5 unpacked into the
# cache (PyPI has no CUDA 12 nvcc: nvidia-cuda-nvcc-cu12 ships only ptxas). HOROVOD_BUILD_CUDA_CC_LIST
# defaults to gpu_versions.CUDA_ARCHITECTURES. The wheel is cached apart from the CPU one (key ...-nccl).
# Build tools: a C++ compiler and make must be installed (apt-get install g++ make); a cmake 3.x is
# installed from PyPI into the environment when the system has none (Horovod's bundled gloo needs < 4).
set -euo pipefail

if [ -n "${1:-}" ]; then VPY="$1/bin/python"
elif [ -n "${DISTTRAIN_PYTHON:-}" ]; then VPY=$DISTTRAIN_PYTHON
elif [ -n "${DISTTRAIN_VENV:-}" ]; then VPY="$DISTTRAIN_VENV/bin/python"
else VPY=$(command -v python3)
fi
CACHE=${DISTTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/disttrain}
VERSION=0.28.1
BIN=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
WITH_MPI=0; command -v mpicxx >/dev/null 2>&1 && WITH_MPI=1
GPU=${DISTTRAIN_GPU:-0}
VERSIONS="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)/gpu_versions.py"

log() { printf '[horovod] %s\n' "$*" >&2; }

check_build() {
  # Usable when horovod.tensorflow loads and was built with its controllers (Gloo, and MPI when wanted);
  # the same facts `horovodrun --check-build` reports, without its slow per-framework probes.
  WITH_MPI=$WITH_MPI GPU=$GPU "$VPY" - <<'PY' >/dev/null 2>&1
import os
import horovod.tensorflow as hvd
assert hvd.gloo_built() and (hvd.mpi_built() or os.environ["WITH_MPI"] == "0")
assert hvd.nccl_built() or os.environ["GPU"] != "1"
PY
}

# -- GPU build helpers ---------------------------------------------------------------------------
version_of() { "$VPY" "$VERSIONS" "$1"; }   # a constant of disttrain/gpu_versions.py

nvcc_release() {  # "12.5" for the nvcc $1, nothing if it does not run
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1
}

find_cuda() {  # prints the home of a CUDA toolkit whose nvcc has the major version $1
  local cand rel
  for cand in "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /none/bin/nvcc)")")" /usr/local/cuda \
              /usr/local/cuda-"$1".* "$CACHE/cuda-$(version_of CUDA_COMPILER)-debian"; do
    [ -x "$cand/bin/nvcc" ] || continue
    rel=$(nvcc_release "$cand/bin/nvcc")
    [ "${rel%%.*}" = "$1" ] && { echo "$cand"; return 0; }
    log "not using $cand/bin/nvcc: CUDA ${rel:-?}, but TensorFlow $TF_VER runs CUDA $1"
  done
  return 1
}

debian_cuda() {
  # PyPI has no CUDA 12 nvcc (nvidia-cuda-nvcc-cu12 ships ptxas only). Debian packages NVIDIA's CUDA 12.5
  # compiler (non-free, experimental; 12.5 is TensorFlow 2.21's own build CUDA): its packages are downloaded
  # with a private apt state and unpacked into $1 laid out as a CUDA toolkit. Nothing is installed.
  local dest=$1 keyring=/usr/share/keyrings/debian-archive-keyring.gpg tmp deb
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1 || [ ! -f "$keyring" ]; then
    return 1
  fi
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/root" "$tmp/cuda/bin" "$tmp/cuda/nvvm/bin" \
           "$tmp/cuda/lib64"
  printf 'deb [signed-by=%s] http://deb.debian.org/debian %s main non-free\n' "$keyring" experimental \
         "$keyring" unstable > "$tmp/sources.list"
  local apt=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache" -o Debug::NoLocking=1)
  # as root, apt would hand the download to its _apt user, who cannot write into the private directory
  [ "$(id -u)" = 0 ] && apt+=(-o APT::Sandbox::User=root)
  log "no CUDA 12 nvcc here: fetching Debian's CUDA $(version_of CUDA_COMPILER) compiler (about 1 GB) into $dest"
  if ! { apt-get "${apt[@]}" -qq update && (cd "$tmp" && apt-get "${apt[@]}" -qq download \
           "nvidia-cuda-toolkit=$(version_of DEBIAN_CUDA_TOOLKIT)" "nvidia-cuda-dev=$(version_of DEBIAN_CUDA_DEV)" \
           "libcudart12=$(version_of DEBIAN_CUDA_DEV)" libcu++-dev); }; then
    rm -rf "$tmp"; return 1
  fi
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
  local r="$tmp/root" c="$tmp/cuda"
  cp -a "$r"/usr/lib/nvidia-cuda-toolkit/bin/nvcc "$r"/usr/lib/nvidia-cuda-toolkit/bin/crt "$c/bin/"
  for tool in ptxas cudafe++ fatbinary nvlink bin2c nvprune cuobjdump cu++filt; do cp -a "$r/usr/bin/$tool" "$c/bin/"; done
  cp -a "$r"/usr/lib/nvidia-cuda-toolkit/bin/cicc "$c/nvvm/bin/"
  cp -a "$r"/usr/lib/nvidia-cuda-toolkit/libdevice "$c/nvvm/libdevice"
  cp -a "$r"/usr/include "$c/include"
  cp -a "$r"/usr/lib/x86_64-linux-gnu/libcudart* "$r"/usr/lib/x86_64-linux-gnu/libcudadevrt.a \
        "$r"/usr/lib/x86_64-linux-gnu/libculibos.a "$r"/usr/lib/x86_64-linux-gnu/stubs "$c/lib64/"
  # Debian's nvcc.profile points into /usr; this one into the unpacked tree (as NVIDIA's own toolkit's).
  cat > "$c/bin/nvcc.profile" <<'PROFILE'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
PROFILE
  mkdir -p "$(dirname "$dest")"
  rm -rf "$dest"; mv "$c" "$dest"; rm -rf "$tmp"
  [ "$(nvcc_release "$dest/bin/nvcc")" = "$(version_of CUDA_COMPILER)" ]
}

patch_for_gpu() {
  # Horovod 0.28.1's TensorFlow GPU code against TensorFlow 2.21 (it predates TF 2.16); applied to $1 (the
  # unpacked source), each checked.
  local ops="$1/horovod/tensorflow/mpi_ops.cc"
  # 1. TF >= 2.16 ships the XLA headers as xla/..., no longer tensorflow/compiler/xla/... .
  sed -i 's#"tensorflow/compiler/xla/stream_executor/stream.h"#"xla/stream_executor/stream.h"#' "$ops"
  # 2. XLA removed stream_executor::gpu::AsGpuStreamValue(), which Horovod declares and calls (12 times) for
  #    the CUDA stream of a TF Stream: drop the declaration and define it after stream.h, through the
  #    Stream's platform_specific_handle().stream (else mpi_lib.so fails to load: undefined symbol).
  sed -i '/^GpuStreamHandle AsGpuStreamValue(Stream\* stream);$/d' "$ops"
  sed -i 's@^#include "xla/stream_executor/stream.h"$@&\nnamespace stream_executor {\nnamespace gpu {\ninline GpuStreamHandle AsGpuStreamValue(Stream* stream) {\n  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n}\n}  // namespace gpu\n}  // namespace stream_executor@' "$ops"
  # 3. The CUDA kernels are compiled as C++11, which GCC >= 14's libstdc++ rejects under nvcc (Debian 13,
  #    Ubuntu 24.10+; horovod PR #4313): C++14, which every CUDA 12 nvcc supports.
  sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 14)/' "$1/horovod/common/ops/cuda/CMakeLists.txt"
  if grep -q 'compiler/xla/stream_executor\|^GpuStreamHandle AsGpuStreamValue(Stream' "$ops" \
     || ! grep -q 'platform_specific_handle().stream' "$ops" \
     || grep -q 'CMAKE_CUDA_STANDARD 11' "$1/horovod/common/ops/cuda/CMakeLists.txt"; then
    log "GPU patch failed"; exit 1
  fi
}

setup_gpu_build() {
  # Exports what Horovod's CMake needs for HOROVOD_GPU_OPERATIONS=NCCL (see "GPU build" above).
  local site nccl major cuda
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  nccl=${HOROVOD_NCCL_HOME:-$site/nvidia/nccl}
  if [ -z "${HOROVOD_NCCL_HOME:-}" ] && { [ ! -f "$nccl/include/nccl.h" ] || [ ! -f "$nccl/lib/libnccl.so.2" ]; }; then
    log "no NCCL wheel in $nccl: install TensorFlow with its CUDA wheels first: pip install \"disttrain[gpu]\""
    log "(tensorflow[and-cuda]==$TF_VER; the exact versions: python3 $VERSIONS)"; exit 1
  fi
  major=$(version_of CUDA_COMPILER); major=${major%%.*}
  if [ -n "${HOROVOD_CUDA_HOME:-}" ]; then
    cuda=$(nvcc_release "$HOROVOD_CUDA_HOME/bin/nvcc")
    if [ "${cuda%%.*}" != "$major" ]; then
      log "HOROVOD_CUDA_HOME=$HOROVOD_CUDA_HOME: its bin/nvcc is CUDA ${cuda:-missing}, but TensorFlow $TF_VER runs"
      log "CUDA $major: point HOROVOD_CUDA_HOME to a CUDA $(version_of CUDA_COMPILER) toolkit (or unset it)"
      exit 1
    fi
    cuda=$HOROVOD_CUDA_HOME
  elif ! cuda=$(find_cuda "$major"); then
    cuda="$CACHE/cuda-$(version_of CUDA_COMPILER)-debian"
    if ! debian_cuda "$cuda"; then
      log "no CUDA $major compiler: install a CUDA $(version_of CUDA_COMPILER) toolkit (NVIDIA's, or build in the"
      log "nvidia/cuda:$(version_of CUDA_IMAGE)-devel image: docker/Dockerfile.gpu) and set HOROVOD_CUDA_HOME to it"
      exit 1
    fi
  fi
  log "CUDA compiler: $cuda/bin/nvcc (CUDA $(nvcc_release "$cuda/bin/nvcc")); NCCL: $nccl"
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda"
  # Horovod's build_utils.get_nvcc_bin() tries the nvcc on PATH before $HOROVOD_CUDA_HOME/bin.
  export PATH="$cuda/bin:$PATH"
  export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$(version_of CUDA_ARCHITECTURES)}
  if [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
    # FindNCCL wants include/ and lib/libnccl.so; the wheel has lib/libnccl.so.2 only. The shim lives in the
    # cache, not in /tmp: CMake writes its lib/ into mpi_lib.so's RUNPATH (after $ORIGIN's), and a RUNPATH
    # into a world-writable directory would let anyone plant a library there.
    local shim="$CACHE/nccl-shim"
    rm -rf "$shim"; mkdir -p "$shim/lib"
    ln -s "$nccl/include" "$shim/include"
    ln -s "$nccl/lib/libnccl.so.2" "$shim/lib/libnccl.so"
    export HOROVOD_NCCL_HOME="$shim" HOROVOD_NCCL_LINK=${HOROVOD_NCCL_LINK:-SHARED}
    # horovod/tensorflow/mpi_lib.so needs libnccl.so.2 when imported, before TensorFlow (or on a CPU machine,
    # never) loads it: look for it in site-packages/nvidia/nccl/lib.
    export LDFLAGS="${LDFLAGS:-} -Wl,-rpath,\$ORIGIN/../../nvidia/nccl/lib"
  fi
}

if [ -x "$BIN/horovodrun" ] && check_build; then
  log "Horovod $VERSION already installed for $VPY"
  exit 0
fi

# TensorFlow's version from its metadata (importing TensorFlow costs seconds); an import if neither wheel is named.
TF_VER=$("$VPY" -c '
import importlib.metadata as m
for name in ("tensorflow", "tensorflow-cpu"):
    try:
        print(m.version(name)); break
    except m.PackageNotFoundError:
        pass
else:
    import tensorflow as tf; print(tf.__version__)')
PY_TAG=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
OPS=cpu; [ "$GPU" = 1 ] && OPS=nccl
[ "$WITH_MPI" = 1 ] || OPS="$OPS-nompi"
WHEEL_DIR="$CACHE/horovod/$PY_TAG-tf$TF_VER-$OPS"
mkdir -p "$WHEEL_DIR"
WHEEL=$(ls "$WHEEL_DIR"/horovod-$VERSION-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$WHEEL" ]; then
  log "building Horovod $VERSION for TensorFlow $TF_VER ($OPS); this takes several minutes"
  for tool in c++ make; do
    command -v "$tool" >/dev/null 2>&1 || { log "$tool is missing: apt-get install g++ make (or run scripts/setup.sh as root)"; exit 1; }
  done
  case "$( (cmake --version 2>/dev/null || true) | head -n1 | awk '{print $3}')" in
    3.*) ;;
    *) log "no cmake 3.x on PATH (Horovod's bundled gloo needs cmake < 4): installing cmake<4 from PyPI"
       "$VPY" -m pip install -q "cmake>=3.13,<4"
       export PATH="$BIN:$PATH";;
  esac
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  if [ "$GPU" = 1 ]; then setup_gpu_build; fi  # before any download: fails fast without CUDA 12
  "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "horovod==$VERSION"
  tar -xzf "$WORK"/horovod-$VERSION.tar.gz -C "$WORK"
  SRC="$WORK/horovod-$VERSION"
  # The one source file that no longer compiles against TF >= 2.16 (see header).
  sed -i '/xla_mpi_ops\.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
  grep -q xla_mpi_ops "$SRC/horovod/tensorflow/CMakeLists.txt" && { log "patch failed"; exit 1; }
  if [ "$GPU" = 1 ]; then patch_for_gpu "$SRC"; fi
  "$VPY" -m pip install -q packaging cloudpickle psutil pyyaml
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  if [ "$WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  (cd "$SRC" && "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
  cp "$WORK"/dist/horovod-$VERSION-*.whl "$WHEEL_DIR"/
  WHEEL=$(ls "$WHEEL_DIR"/horovod-$VERSION-*.whl | head -n1)
  log "cached $WHEEL"
fi

"$VPY" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$VPY" -m pip install -q packaging cloudpickle psutil pyyaml
check_build || { log "Horovod installed but --check-build lacks TensorFlow/Gloo/MPI$([ "$OPS" = "${OPS#nccl}" ] || echo /NCCL):"; "$BIN/horovodrun" --check-build; exit 1; }
log "Horovod $VERSION installed from $WHEEL"
