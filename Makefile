# disttrain: two commands do everything on a fresh machine.
#   make demo   set up (idempotent), then train the digits demo with Horovod (2 ranks) and Mirrored (2 devices)
#   make test   set up (idempotent), then run the whole test suite
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export DISTTRAIN_VENV := $(VENV)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export DISTTRAIN_THREADS ?= 1

.PHONY: setup demo test bench info docs clean gpu-build

setup:
	@bash scripts/setup.sh

demo: setup
	@echo "== disttrain demo 1/2: Horovod, 2 ranks (horovodrun -np 2 --gloo, under disttrain run: one exit code)"
	$(VENV)/bin/disttrain run -- $(VENV)/bin/horovodrun -np 2 -H localhost:2 --gloo $(PY) examples/digits.py --backend horovod
	@echo "== disttrain demo 2/2: MirroredStrategy on 2 logical CPU devices"
	$(PY) examples/digits.py --backend mirrored --cpu-replicas 2
	@echo "== TensorBoard logs of both runs are under runs/: $(VENV)/bin/tensorboard --logdir runs"

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	$(PY) bench/run.py --out docs/benchmarks.md

docs:  # docs/api.md from the docstrings (no TensorFlow needed: the sources are read, not imported)
	python3 scripts/gen_api.py

# Horovod with NCCL GPU operations, in its own virtualenv (GPU_VENV) with tensorflow[and-cuda]: compiles on a
# machine without a GPU (docs/gpu.md). About 20 minutes on 2 cores the first time (plus ~4 GB of CUDA wheels
# and, without a CUDA 12 nvcc, 1 GB of Debian's CUDA 12.5 compiler packages); the wheel is cached.
GPU_VENV ?= $(CURDIR)/.gpuvenv
gpu-build:
	DISTTRAIN_VENV=$(GPU_VENV) DISTTRAIN_EXTRA=gpu DISTTRAIN_GPU=1 bash scripts/setup.sh
	$(GPU_VENV)/bin/horovodrun --check-build
	$(GPU_VENV)/bin/disttrain doctor

info: setup
	$(VENV)/bin/disttrain info

clean:
	rm -rf runs .pytest_cache build *.egg-info
