"""Same model, data, seed and 20 steps: every backend ends with the single-device weights."""

import json

import numpy as np
import pytest

from launchers import BACKENDS, WORKERS, run

SCRIPT = WORKERS / "equivalence.py"


def load(directory, optimizer, rank):
    with np.load(directory / f"{optimizer}_rank{rank}.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run("single", SCRIPT, ["--out", str(out)], timeout=180)
    return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "single"])
def test_backend_matches_single_device(backend, reference, tmp_path):
    run(backend, SCRIPT, ["--out", str(tmp_path)], timeout=240)
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text())
             for r in range(2 if backend != "mirrored" else 1)]
    assert all(i["replicas"] == 2 for i in infos), infos
    if backend == "horovod-mpi":
        assert all(i["mpi"] and not i["gloo"] for i in infos), infos
    if backend == "horovod-gloo":
        assert all(i["gloo"] for i in infos), infos
    for optimizer in ("sgd", "adam"):
        assert all(i[f"{optimizer}_steps"] == 20 for i in infos), infos
        expected = load(reference, optimizer, 0)
        ranks = [load(tmp_path, optimizer, r) for r in range(len(infos))]
        for rank_weights in ranks[1:]:  # bitwise identical across ranks
            for a, b in zip(ranks[0], rank_weights):
                assert np.array_equal(a, b), f"{backend}/{optimizer}: ranks differ"
        for got, want in zip(ranks[0], expected):
            rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert rel <= 1e-5, f"{backend}/{optimizer}: relative difference {rel:.2e} > 1e-5"
