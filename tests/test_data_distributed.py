"""Real multi-process runs: every example exactly once per epoch, and uneven shards never hang.

Each backend runs tests/workers/data_epoch.py once (all cases, 2 epochs each, in one job of its shared
launch: tests/shared_launches.py, which also writes the shard files); the worker records the example ids
each rank consumed, and the ids merged over all ranks through the backend.
"""

import json

import numpy as np
import pytest

from shared_launches import TEST_TIMEOUT, job

GB = 8
BACKENDS = ["horovod-gloo", "multiworker", "mirrored"]


def launch(backend, tmp_path_factory):
    out = job(backend, "data", tmp_path_factory).out
    ranks = 1 if backend == "mirrored" else 2
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert all(r["replicas"] == 2 for r in results), results
    return results


def exactly_once(counts, n):
    counts = np.asarray(counts)
    return counts[:n].tolist() == [1] * n and not counts[n:].any()


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_example_once_per_epoch_and_uneven_shards_end_together(backend, tmp_path_factory):
    results = launch(backend, tmp_path_factory)
    ranks = len(results)
    for epoch in range(2):
        case = lambda name: [r[f"{name}/{epoch}"] for r in results]  # noqa: E731
        for name, n, steps in [("elements_pad", 45, 6), ("files_pad", 37, None), ("uneven_pad", 36, 5)]:
            got = case(name)
            assert len({g["steps"] for g in got}) == 1, (name, got)
            if steps:
                assert got[0]["steps"] == steps, (name, got[0]["steps"])
            for g in got:  # the merged counts are the same everywhere and count every id exactly once
                assert exactly_once(g["global"], n), (name, epoch, g["global"])
            local = np.sum([g["local"] for g in got], axis=0)  # ...and so do the ranks' own counts
            assert exactly_once(local, n), (name, epoch, [g["local"] for g in got])
            if ranks == 2:
                assert all(sum(g["local"]) > 0 for g in got), name
        # Drop: every rank runs the same steps; each example at most once. File sharding balances the
        # pipelines (18 + 18 of 36 examples), so drop loses fewer than one global batch: 4 of 36 here (dealt
        # whole, "three" would give rank 0 24 examples and rank 1 12: 3 steps, 12 lost).
        for name, steps in [("uneven_drop", 4), ("three_drop", 4), ("uneven_fn_unknown", 4),
                            ("uneven_fn_repeat", 6), ("elements_repeat", 7)]:
            got = case(name)
            assert [g["steps"] for g in got] == [steps] * ranks, (name, got)
            assert sum(got[0]["global"]) == steps * GB, (name, got[0]["global"])
            if "repeat" not in name:
                assert max(got[0]["global"]) == 1, (name, got[0]["global"])
                assert 36 - sum(got[0]["global"]) < GB, (name, got[0]["global"])
        if ranks == 2:  # file sharding: rank 0 read only "a" files (ids < 20); rank 1 the "b" files and, to
            # balance 20 against 16, the last 2 records of the second "a" file (ids 17 and 19)
            for name in ("uneven_pad", "uneven_drop"):
                first, second = (np.nonzero(g["local"])[0] for g in case(name))
                assert first.max() < 20 and second[second < 20].tolist() == [17, 19], (name, first, second)
