"""Faults below the loop on 2 processes (MultiWorker and Horovod gloo), from one shared launch each
(tests/workers/ckpt_damage.py): a deleted index falls back, a full disk on the chief stops every rank
naming rank 0, a directory that is not the same on every rank is found before the first step."""

import json

import numpy as np
import pytest

from shared_launches import TEST_TIMEOUT, job

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)
BACKENDS = ["multiworker", "horovod-gloo"]


def _results(backend, tmp_path_factory):
    found = job(backend, "ckpt_damage", tmp_path_factory)
    return found, [json.loads((found.out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_index_falls_back_on_every_rank_and_loses_nothing(backend, tmp_path_factory):
    found, ranks = _results(backend, tmp_path_factory)
    chief = ranks[0]["fallback"]
    assert "error" not in chief and "error" not in ranks[1]["fallback"], (chief, ranks[1]["fallback"])
    assert "WARNING: checkpoint " in chief["stderr"] and "/fallback/ckpt-4 does not load: its index file " \
           "ckpt-4.index is missing" in chief["stderr"], chief["stderr"]
    assert "the newest checkpoint that loads, instead of" in chief["stderr"]
    assert "WARNING" not in ranks[1]["fallback"]["stderr"]  # said once, by the chief
    # rotation kept the newest 3 (all written after the fallback), the damaged data is kept aside
    assert [f for f in chief["files"] if f.endswith(".index")] == ["ckpt-5.index", "ckpt-6.index", "ckpt-7.index"]
    assert "damaged" in chief["files"] and ".disttrain-directory-check" not in chief["files"]  # the token is gone
    got, want = np.load(found.out / "fallback_weights.npz"), np.load(found.out / "reference_weights.npz")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])  # same backend, same steps: bitwise
    assert chief["seconds"] < 120


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_on_the_chief_stops_every_rank_naming_it(backend, tmp_path_factory):
    _, ranks = _results(backend, tmp_path_factory)
    if "skipped" in ranks[0]["disk_full"]:
        pytest.skip(ranks[0]["disk_full"]["skipped"])
    chief, other = ranks[0]["disk_full"], ranks[1]["disk_full"]
    assert chief["error"].startswith("CheckpointError: rank 0 could not write checkpoint ckpt-2 to ") and \
        "the disk is full (a checkpoint takes about" in chief["error"] and "free space there or give " \
        "Checkpointing a directory on a larger disk; the partial files were removed and the previous " \
        "checkpoint " in chief["error"], chief
    if backend == "horovod-gloo":  # only the chief writes: the other rank names it
        assert other["error"] == ("CheckpointError: rank(s) 0 could not write their part of the checkpoint to "
                                  f"{chief['error'].split(' to ')[1].split(':')[0]!r} (their message says why: "
                                  "disk full, not writable); every process stops; the previous checkpoint is "
                                  "intact"), other
    else:  # every MultiWorker worker writes (the others into workertemp_<rank> on the same full disk)
        assert other["error"].startswith("CheckpointError: rank 1 could not write checkpoint ckpt-2 to ") or \
            other["error"].startswith("CheckpointError: rank(s) 0 could not"), other
    assert chief["seconds"] < 60 and other["seconds"] < 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_directory_that_is_not_shared_is_found_before_the_first_step(backend, tmp_path_factory):
    found, ranks = _results(backend, tmp_path_factory)
    for rank, results in enumerate(ranks):
        error = results["not_shared"]["error"]
        assert error.startswith(f"CheckpointError: checkpoint directory '{found.out}/own-rank{rank}' cannot be used "
                                f"by every process (this is rank {rank} on "), error
        assert "\n  rank 0: sees the chief's token: the same directory\n  rank 1: does not see the chief's token " \
               "file\nput it on a filesystem that every process shares" in error, error
        assert results["not_shared"]["seconds"] < 30
