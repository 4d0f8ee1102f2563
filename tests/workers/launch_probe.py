"""A worker for launcher tests that needs no TensorFlow: it records itself, then behaves as told.

    launch_probe.py --out DIR --mode MODE [--rank-fails R] [--code C] [--save-seconds S] [--report]
                    [--miss-first-term]

Its rank comes from TF_CONFIG (multiworker), HOROVOD_RANK (horovod) or OMPI_COMM_WORLD_RANK (mpirun). It writes DIR/pid<rank> (its
pid) and DIR/env<rank>.<attempt>.json (its launcher variables; attempt counts the earlier ones of that rank),
with --report prints the line an elastic launcher waits for (as a checkpointing disttrain chief), then
(recording its exit status for `disttrain run` as a disttrain process does):
  sleep      sleeps until signalled; SIGTERM/SIGINT: writes DIR/signal<rank> (signal name and time),
             sleeps --save-seconds (a checkpoint save), writes DIR/saved<rank>, exits 42 (as a preempted
             disttrain worker does); with --miss-first-term its first attempt drops the first SIGTERM
             (as a MultiWorker worker whose coordination service holds SIGTERM while it starts up)
  fail       rank --rank-fails exits with --code after 1 s; the others sleep, IGNORING SIGTERM (a peer
             stuck in a collective), so only SIGKILL ends them
  fail-once  rank --rank-fails exits with --code if DIR/failed-once does not exist yet (and creates
             it); then every rank writes DIR/done<rank>.<attempt> and exits 0
"""

import argparse
import json
import os
import signal
import sys
import time

from disttrain import exit_status

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--mode", choices=("sleep", "fail", "fail-once"), required=True)
parser.add_argument("--rank-fails", type=int, default=1)
parser.add_argument("--code", type=int, default=3)
parser.add_argument("--save-seconds", type=float, default=1.0)
parser.add_argument("--report", action="store_true")
parser.add_argument("--miss-first-term", action="store_true")
args = parser.parse_args()

if os.environ.get("TF_CONFIG"):
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    size = len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"])
elif "HOROVOD_RANK" in os.environ:
    rank, size = int(os.environ["HOROVOD_RANK"]), int(os.environ["HOROVOD_SIZE"])
else:
    rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
exit_status.start(rank=rank, size=size)  # as get_backend does: for `disttrain run` (DISTTRAIN_STATUS_DIR)
attempt = len([f for f in os.listdir(args.out) if f.startswith(f"env{rank}")])
with open(os.path.join(args.out, f"env{rank}.{attempt}.json"), "w") as f:
    json.dump({k: v for k, v in os.environ.items() if k.startswith(("TF_CONFIG", "HOROVOD_", "DISTTRAIN_"))}, f)
with open(os.path.join(args.out, f"pid{rank}"), "w") as f:
    f.write(str(os.getpid()))
print(f"probe rank {rank} attempt {attempt} ready", flush=True)
if args.report and rank == 0:
    print(f"disttrain elastic: checkpointing to {args.out} (every_steps=1)", file=sys.stderr, flush=True)


def preempted(signum, frame):
    global miss
    if miss and signum == signal.SIGTERM:
        miss = False
        with open(os.path.join(args.out, f"missed{rank}"), "w") as f:
            f.write(str(time.time()))
        return
    with open(os.path.join(args.out, f"signal{rank}"), "w") as f:
        f.write(f"{signal.Signals(signum).name} {time.time()}")
    print(f"probe rank {rank}: {signal.Signals(signum).name}, saving", flush=True)
    time.sleep(args.save_seconds)
    open(os.path.join(args.out, f"saved{rank}"), "w").close()
    exit_status.record(code=42, reason=f"probe rank {rank} saved")
    sys.exit(42)


miss = args.miss_first_term and attempt == 0
if args.mode == "sleep":
    signal.signal(signal.SIGTERM, preempted)
    signal.signal(signal.SIGINT, preempted)
    while True:
        time.sleep(1)
elif args.mode == "fail":
    if rank == args.rank_fails:
        time.sleep(1)
        print(f"probe rank {rank}: failing with {args.code}", flush=True)
        exit_status.record(code=args.code, reason=f"probe rank {rank} failed")
        sys.exit(args.code)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
else:
    marker = os.path.join(args.out, "failed-once")
    if rank == args.rank_fails and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(0.5)
        sys.exit(args.code)
    time.sleep(2)
    open(os.path.join(args.out, f"done{rank}.{attempt}"), "w").close()
