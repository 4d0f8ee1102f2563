"""Exercises the backend protocol's collectives with rank-dependent values; writes one JSON per rank."""

import json
import os
import time

import worker_args

args, backend = worker_args.start()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

r = backend.rank
result = {
    "backend": backend.name, "rank": r, "size": backend.size, "local_rank": backend.local_rank,
    "is_chief": backend.is_chief, "replicas": backend.num_replicas,
    "sum_int": backend.all_reduce(r + 1, "sum"),
    "mean_float": backend.all_reduce(float(r) * 2.5, "mean"),
    "max_int": backend.all_reduce(10 - r, "max"),
    "min_float": backend.all_reduce(1.5 + r, "min"),
    "sum_tensor": backend.all_reduce(tf.constant([r, 10 * r], tf.float32), "sum").numpy().tolist(),
    "max_array": backend.all_reduce(np.array([r, -r], np.int64), "max").tolist(),
    "broadcast_float": backend.broadcast(100.0 + r),
    "broadcast_tensor": backend.broadcast(tf.fill([3], float(r + 7))).numpy().tolist(),
    "broadcast_from_last": backend.broadcast(r * 3, root=backend.size - 1),
}
types = {k: type(v).__name__ for k, v in result.items()}
# Horovod's threads run at SCHED_IDLE when every rank is on this CPU-only host (backends/thread_priority.py)
result["communication_priority"] = getattr(backend, "communication_priority", None)
tids = [int(t) for t in os.listdir("/proc/self/task")]
result["idle_threads"] = sum(os.sched_getscheduler(t) == os.SCHED_IDLE for t in tids if os.path.exists(f"/proc/self/task/{t}"))
result["horovod_cycle_time"] = os.environ.get("HOROVOD_CYCLE_TIME")  # what hvd.init() read
result["main_thread_idle"] = os.sched_getscheduler(0) == os.SCHED_IDLE
result["types"] = types
# barrier: every other rank writes its marker late; after the barrier rank 0 must see them all
if r != 0:
    time.sleep(1.0)
    open(os.path.join(args.out, f"marker{r}"), "w").close()
backend.barrier()
result["markers_after_barrier"] = sorted(f for f in os.listdir(args.out) if f.startswith("marker"))
try:
    backend.all_reduce(1, "median")
except ValueError as err:
    result["bad_op"] = str(err)
with open(os.path.join(args.out, f"rank{r}.json"), "w") as f:
    json.dump(result, f)
