"""Creates the backend, optionally after a long sleep on one rank (a peer that never comes), and reports.

    startup.py --backend NAME [--late-rank R]

The rank is read from the launcher's variables (TF_CONFIG, HOROVOD_RANK) before the backend exists.
Prints "ready <backend> rank <r> of <n>" once the backend is up.
"""

import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="auto")
parser.add_argument("--late-rank", type=int, default=None)
args = parser.parse_args()
if os.environ.get("TF_CONFIG"):
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
else:
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
if rank == args.late_rank:
    time.sleep(600)

import disttrain as dt  # noqa: E402

backend = dt.get_backend(args.backend)
print(f"ready {backend.name} rank {backend.rank} of {backend.size}", flush=True)
