#!/usr/bin/env bash
# Run a disttrain script as N processes on this machine.
#
#   launch/local.sh horovod   N script.py [args...]   # horovodrun -np N --gloo
#   launch/local.sh mpi       N script.py [args...]   # mpirun -np N (Horovod's MPI controller)
#   launch/local.sh tf-config N script.py [args...]   # N MultiWorkerMirrored workers with TF_CONFIG
#
# The script should call disttrain.get_backend("auto"): each launcher's environment selects its backend.
# horovodrun and mpirun run under `disttrain run`: the exit code is 42 when every rank was preempted and
# saved, else the first failing rank's (they would say 1).
# Uses the project's virtualenv (DISTTRAIN_VENV, default <repo>/.venv) when it exists. Each process is
# limited to DISTTRAIN_THREADS threads (default 1 per process here, so N processes share the cores).
set -euo pipefail
usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
mode=$1 n=$2; shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: N must be a positive integer, got '$n'" >&2; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DISTTRAIN_VENV:-$ROOT/.venv}
[ -x "$VENV/bin/python" ] && export PATH="$VENV/bin:$PATH"
export DISTTRAIN_THREADS=${DISTTRAIN_THREADS:-1} TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
case "$1" in *.py) set -- python "$@";; esac
case "$mode" in
  horovod)   exec disttrain run -- horovodrun -np "$n" -H "localhost:$n" --gloo "$@" ;;
  mpi)       [ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
             exec disttrain run -- mpirun -np "$n" --oversubscribe --bind-to none -x PATH -x PYTHONPATH -x DISTTRAIN_THREADS \
               -x TF_CPP_MIN_LOG_LEVEL "$@" ;;
  tf-config) exec disttrain launch --tf-config -n "$n" -- "$@" ;;
  *) echo "launch/local.sh: unknown mode '$mode'; use horovod, mpi or tf-config" >&2; exit 2 ;;
esac
