#!/usr/bin/env bash
# Idempotent set-up for disttrain on a fresh Debian machine (run as root, or with sudo available).
#
#   1. Debian's OpenMPI (mpirun + headers), when missing.
#   2. A virtualenv (default .venv) with disttrain and its dependencies (tensorflow-cpu, tensorboard,
#      numpy, mpi4py, pytest, scikit-learn) installed; re-installs only when pyproject.toml changes.
#   3. Horovod built from its PyPI source distribution with TensorFlow, Gloo and MPI, via
#      scripts/build_horovod.sh. The wheel is cached outside the repository, so a second set-up is fast.
#
# Environment:
#   DISTTRAIN_VENV      virtualenv path (default: <repo>/.venv)
#   DISTTRAIN_CACHE     wheel cache (default: ~/.cache/disttrain)
#   DISTTRAIN_EXTRA     pyproject extra for TensorFlow: cpu (default) or gpu
#   DISTTRAIN_GPU=1     build Horovod with NCCL GPU operations (GPU clusters; needs CUDA + NCCL)
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

# 1. OpenMPI ------------------------------------------------------------------------------------
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  log "installing Debian's OpenMPI (openmpi-bin libopenmpi-dev)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev >/dev/null
fi

# 2. virtualenv + python packages ---------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.disttrain-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)-$EXTRA"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "installing disttrain[$EXTRA,mpi,dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRA,mpi,dev]"
  echo "$WANT" > "$STAMP"
fi

# 3. Horovod ------------------------------------------------------------------------------------
"$ROOT/scripts/build_horovod.sh" "$VENV"

log "ready: $VENV ($("$VENV/bin/python" -c 'from importlib.metadata import version as v; print("tensorflow", v("tensorflow-cpu" if "'"$EXTRA"'" == "cpu" else "tensorflow"), "horovod", v("horovod"))'))"
