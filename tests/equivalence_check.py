"""The equivalence check shared by every launcher: tests/workers/equivalence.py's weights against one device.

Four trainings per launch (SGD, Adam, two models with two optimizers, clipping by the global norm); each
must end bitwise identical across ranks and within 1e-5 relative of the single-device run.
"""

import json

import numpy as np

from launchers import WORKERS

SCRIPT = WORKERS / "equivalence.py"
TRAININGS = ("sgd", "adam", "two", "clip")


def load(directory, optimizer, rank):
    with np.load(directory / f"{optimizer}_rank{rank}.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def check(case, out, reference, *, processes, backend, replicas):
    """Asserts the launch in ``out`` matches ``reference``; returns each rank's info."""
    infos = [json.loads((out / f"info_rank{r}.json").read_text()) for r in range(processes)]
    assert [i["rank"] for i in infos] == list(range(processes))
    assert all(i["backend"] == backend and i["replicas"] == replicas for i in infos), infos
    assert all(i["clipped_fraction"][0] == 1.0 for i in infos), infos  # the clipping did act
    for optimizer in TRAININGS:
        assert all(i[f"{optimizer}_steps"] == 20 for i in infos), infos
        expected = load(reference, optimizer, 0)
        ranks = [load(out, optimizer, r) for r in range(processes)]
        for rank_weights in ranks[1:]:  # bitwise identical across ranks
            for a, b in zip(ranks[0], rank_weights):
                assert np.array_equal(a, b), f"{case}/{optimizer}: ranks differ"
        for got, want in zip(ranks[0], expected):
            rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert rel <= 1e-5, f"{case}/{optimizer}: relative difference {rel:.2e} > 1e-5"
    return infos
