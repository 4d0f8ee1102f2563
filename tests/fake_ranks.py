"""A test double: N "processes" as threads of one pytest process, with real (numpy) collectives.

Lets fast in-process tests exercise code that merges values across ranks (metrics, interval agreement)
with ranks holding different data, and count how many collectives it issues.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from disttrain.backends.base import Backend


class _Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size
        self.calls = [0] * size


class ThreadRankBackend(Backend):
    """Rank ``rank`` of a :class:`_Group`; one replica per rank; only the collectives are implemented."""

    name = "threads"

    def __init__(self, group: _Group, rank: int):
        self.group, self._rank = group, rank

    rank = property(lambda self: self._rank)
    size = property(lambda self: self.group.size)
    local_rank = property(lambda self: self._rank)
    local_replicas = property(lambda self: 1)

    @property
    def collectives(self) -> int:
        return self.group.calls[self._rank]

    def scope(self):
        return contextlib.nullcontext()

    def run(self, fn, args=()):
        return fn(*args)

    def local_values(self, per_replica):
        return (per_replica,)

    def _sum_gradients(self, tensors):
        raise NotImplementedError

    def distribute_dataset(self, dataset_fn, *, global_batch_size):
        raise NotImplementedError

    def _all_reduce_tensor(self, value, op):
        group = self.group
        group.calls[self._rank] += 1
        group.slots[self._rank] = np.asarray(value)
        group.barrier.wait()
        stacked = np.stack(group.slots)
        result = {"sum": stacked.sum(0), "max": stacked.max(0), "min": stacked.min(0)}[op]
        group.barrier.wait()  # nobody overwrites a slot before everyone has read
        return tf.constant(result.astype(stacked.dtype))


def run_ranks(size: int, fn):
    """Runs ``fn(backend)`` for ranks ``0..size-1`` in parallel threads; returns the results by rank."""
    group = _Group(size)
    backends = [ThreadRankBackend(group, r) for r in range(size)]
    with ThreadPoolExecutor(size) as pool:
        return [f.result(timeout=120) for f in [pool.submit(fn, b) for b in backends]]
