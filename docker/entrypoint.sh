#!/usr/bin/env bash
# Entry point of the disttrain images (docker/Dockerfile.cpu, docker/Dockerfile.gpu).
#
#   docker run IMAGE script.py [args ...]   disttrain run -- horovodrun -np N -H localhost:N python script.py ...
#                                           N: DISTTRAIN_NP, else the GPUs `nvidia-smi -L` lists, else 1;
#                                           `disttrain run` makes the container exit 42 when every rank was
#                                           preempted and saved, else the first failing rank's code
#   docker run IMAGE COMMAND [args ...]     runs COMMAND (disttrain info, disttrain launch ..., bash, ...)
set -euo pipefail
if [ $# -ge 1 ] && [[ "$1" == *.py ]]; then
  NP=${DISTTRAIN_NP:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
  [ "${NP:-0}" -ge 1 ] 2>/dev/null || NP=1
  echo "disttrain-entrypoint: disttrain run -- horovodrun -np $NP -H localhost:$NP python $*" >&2
  exec disttrain run -- horovodrun -np "$NP" -H "localhost:$NP" python "$@"
fi
exec "$@"
