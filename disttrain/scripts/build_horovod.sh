#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 from its PyPI source into a virtualenv that has TensorFlow.
#
#   scripts/build_horovod.sh [VENV]
#
# Horovod 0.28.1 is the last release and ships as source only. Against TensorFlow >= 2.16 its
# horovod/tensorflow/xla_mpi_ops.cc no longer compiles (TF moved the XLA headers), so this script drops
# that one file from the build; the only loss is Horovod collectives inside jit_compile=True functions.
#
# The wheel is cached under $DISTTRAIN_CACHE/horovod/<python>-tf<version>-<ops>/ and re-used, so only
# the first build pays the ~8 minutes of compilation.
#
# Environment: DISTTRAIN_CACHE (default ~/.cache/disttrain); DISTTRAIN_GPU=1 adds NCCL GPU operations
# (HOROVOD_GPU_OPERATIONS=NCCL; needs CUDA and NCCL, e.g. from tensorflow[and-cuda]); HOROVOD_* build
# variables you set yourself are passed through.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-${DISTTRAIN_VENV:-$ROOT/.venv}}
CACHE=${DISTTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/disttrain}
VERSION=0.28.1
VPY="$VENV/bin/python"

log() { printf '[horovod] %s\n' "$*" >&2; }

check_build() {
  # Usable when horovod.tensorflow loads and was built with both controllers (MPI and Gloo); the same
  # facts `horovodrun --check-build` reports, without its slow per-framework probes.
  "$VPY" - <<'PY' >/dev/null 2>&1
import horovod.tensorflow as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PY
}

if [ -x "$VENV/bin/horovodrun" ] && check_build; then
  log "Horovod $VERSION already installed in $VENV"
  exit 0
fi

TF_VER=$("$VPY" -c 'import tensorflow as tf; print(tf.__version__)')
PY_TAG=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
OPS=cpu; [ "${DISTTRAIN_GPU:-0}" = 1 ] && OPS=nccl
WHEEL_DIR="$CACHE/horovod/$PY_TAG-tf$TF_VER-$OPS"
mkdir -p "$WHEEL_DIR"
WHEEL=$(ls "$WHEEL_DIR"/horovod-$VERSION-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$WHEEL" ]; then
  log "building Horovod $VERSION for TensorFlow $TF_VER ($OPS); this takes several minutes"
  command -v cmake >/dev/null 2>&1 || { log "cmake is missing: apt-get install cmake"; exit 1; }
  case "$(cmake --version | head -n1 | awk '{print $3}')" in
    4.*) log "cmake 4.x cannot configure Horovod's bundled gloo; install cmake 3.x (apt-get install cmake)"; exit 1;;
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
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  if [ "$OPS" = nccl ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  export MAKEFLAGS="-j$(nproc)"
  (cd "$SRC" && "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
  cp "$WORK"/dist/horovod-$VERSION-*.whl "$WHEEL_DIR"/
  WHEEL=$(ls "$WHEEL_DIR"/horovod-$VERSION-*.whl | head -n1)
  log "cached $WHEEL"
fi

"$VPY" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$VPY" -m pip install -q packaging cloudpickle psutil pyyaml
check_build || { log "Horovod installed but --check-build lacks TensorFlow/MPI/Gloo:"; "$VENV/bin/horovodrun" --check-build; exit 1; }
log "Horovod $VERSION installed from $WHEEL"
