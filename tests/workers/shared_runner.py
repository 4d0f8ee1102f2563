"""Runs several test workers one after another in ONE process (one TensorFlow start-up, one backend),
for tests/shared_launches.py.

    python tests/workers/shared_runner.py --backend B [--cpu-replicas N] --plan PLAN.json

PLAN is ``{"dir": D, "jobs": [{"name": ..., "script": ..., "argv": [...]}, ...]}``. Each job runs its
script's ``__main__`` exactly as ``python SCRIPT --backend B [--cpu-replicas N] ARGV`` would (its
``dt.get_backend`` call returns the backend created here), after ``keras.backend.clear_session()`` (fresh
layer names and dtype policy, as in a new process), in this process's working directory. While a job
runs, this rank's stdout (file descriptor 1) goes to ``D/<name>.stdout.rank<r>``, so a test sees
exactly what each rank printed in each job; ``D/<name>.done.rank<r>`` marks a job that returned (it
holds the seconds the job took). A job that raises ends the process with its traceback on stderr (the
later jobs don't run).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--cpu-replicas", type=int, default=None)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    import disttrain as dt

    backend = dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)
    import keras

    common = ["--backend", args.backend] + (["--cpu-replicas", str(args.cpu_replicas)] if args.cpu_replicas else [])
    cwd = os.getcwd()
    for job in plan["jobs"]:
        keras.backend.clear_session()
        path = os.path.join(plan["dir"], f"{job['name']}.%s.rank{backend.rank}")
        sys.argv = [job["script"]] + common + job["argv"]
        started = time.perf_counter()
        sys.stdout.flush()
        saved = os.dup(1)
        with open(path % "stdout", "w") as captured:
            os.dup2(captured.fileno(), 1)
        try:
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit as end:
            if end.code not in (None, 0):
                raise
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            os.chdir(cwd)
        with open(path % "done", "w") as done:
            done.write(f"{time.perf_counter() - started:.1f}\n")  # seconds the job took


if __name__ == "__main__":
    main()
