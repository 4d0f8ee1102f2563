"""The backend protocol's collectives give the right, identical answers on every rank (a job of each
backend's shared launch: tests/shared_launches.py)."""

import json

import pytest

from shared_launches import TEST_TIMEOUT, job


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("launcher,backend,size", [
    ("single", "single", 1), ("mirrored", "mirrored", 1),
    ("multiworker", "multiworker", 2), ("horovod-gloo", "horovod", 2)])
def test_collectives(launcher, backend, size, tmp_path_factory):
    tmp_path = job(launcher, "collectives", tmp_path_factory).out
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(size)]
    ranks = range(size)
    for r, res in zip(ranks, results):
        assert res["backend"] == backend and res["rank"] == r and res["size"] == size
        assert res["is_chief"] == (r == 0)
        assert res["sum_int"] == sum(k + 1 for k in ranks)
        assert res["mean_float"] == pytest.approx(sum(k * 2.5 for k in ranks) / size)
        assert res["max_int"] == 10
        assert res["min_float"] == 1.5
        assert res["sum_tensor"] == [sum(ranks), 10 * sum(ranks)]
        assert res["max_array"] == [size - 1, 0]
        assert res["broadcast_float"] == 100.0
        assert res["broadcast_tensor"] == [7.0, 7.0, 7.0]
        assert res["broadcast_from_last"] == 3 * (size - 1)
        assert res["types"]["sum_int"] == "int" and res["types"]["mean_float"] == "float"
        assert res["markers_after_barrier"] == [f"marker{k}" for k in ranks if k != 0]
        assert "median" in res["bad_op"] and "sum, mean, max, min" in res["bad_op"]
        assert res["main_thread_idle"] is False
        if backend == "horovod":  # its background thread and Gloo's yield the 2 cores to compute
            assert res["communication_priority"] == "idle" and res["idle_threads"] >= 2
            assert res["horovod_cycle_time"] == "0.5"  # idle threads: the shorter cycle, none being set
        else:
            assert res["communication_priority"] is None and res["idle_threads"] == 0
    assert results[0]["replicas"] == (2 if launcher == "mirrored" else size)
