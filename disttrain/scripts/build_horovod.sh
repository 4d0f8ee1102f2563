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
# (HOROVOD_GPU_OPERATIONS=NCCL; needs CUDA and NCCL, e.g. from tensorflow[and-cuda]); HOROVOD_* build
# variables you set yourself are passed through. With OpenMPI's compiler wrappers (mpicxx) present,
# Horovod is built with MPI too; without them, with Gloo only.
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

log() { printf '[horovod] %s\n' "$*" >&2; }

check_build() {
  # Usable when horovod.tensorflow loads and was built with its controllers (Gloo, and MPI when wanted);
  # the same facts `horovodrun --check-build` reports, without its slow per-framework probes.
  WITH_MPI=$WITH_MPI "$VPY" - <<'PY' >/dev/null 2>&1
import os
import horovod.tensorflow as hvd
assert hvd.gloo_built() and (hvd.mpi_built() or os.environ["WITH_MPI"] == "0")
PY
}

if [ -x "$BIN/horovodrun" ] && check_build; then
  log "Horovod $VERSION already installed for $VPY"
  exit 0
fi

TF_VER=$("$VPY" -c 'import tensorflow as tf; print(tf.__version__)')
PY_TAG=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
OPS=cpu; [ "${DISTTRAIN_GPU:-0}" = 1 ] && OPS=nccl
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
  "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "horovod==$VERSION"
  tar -xzf "$WORK"/horovod-$VERSION.tar.gz -C "$WORK"
  SRC="$WORK/horovod-$VERSION"
  # The one source file that no longer compiles against TF >= 2.16 (see header).
  sed -i '/xla_mpi_ops\.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
  grep -q xla_mpi_ops "$SRC/horovod/tensorflow/CMakeLists.txt" && { log "patch failed"; exit 1; }
  "$VPY" -m pip install -q packaging cloudpickle psutil pyyaml
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  if [ "$WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
  if [ "$OPS" = nccl ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  export MAKEFLAGS="-j$(nproc)"
  (cd "$SRC" && "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
  cp "$WORK"/dist/horovod-$VERSION-*.whl "$WHEEL_DIR"/
  WHEEL=$(ls "$WHEEL_DIR"/horovod-$VERSION-*.whl | head -n1)
  log "cached $WHEEL"
fi

"$VPY" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$VPY" -m pip install -q packaging cloudpickle psutil pyyaml
check_build || { log "Horovod installed but --check-build lacks TensorFlow/Gloo/MPI:"; "$BIN/horovodrun" --check-build; exit 1; }
log "Horovod $VERSION installed from $WHEEL"
