"""A run stopped by a real SIGTERM resumes exactly, on its own backend and on the others.

Each backend's "stop" launch trains the uninterrupted reference, then the same run with checkpoints,
and one rank sends itself SIGTERM after global step 13: every rank stops after step 14 (mid-epoch 3 of
6, after LossThresholdCut and ReduceOnPlateau changed the LR), saves and exits with code 42. Each
backend's "resume" launch then runs the same command again: the final weights must be bitwise the
reference's. The same launch also resumes checkpoints written by other backends (Horovod's on one
device, Mirrored and MultiWorker; theirs under Horovod), which must end within 1e-5 of the writer's
uninterrupted run. Ten launches in all.
"""

import json

import numpy as np
import pytest

from resume_runs import BACKENDS, CROSS, PROCESSES, SIGNALLED_RANK, LAUNCHER_STATUS, STOP_TIMEOUT, stopped
from shared_launches import TEST_TIMEOUT, job


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.timeout(STOP_TIMEOUT + 60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_on_one_rank_stops_every_rank_after_the_next_step(backend, tmp_path_factory):
    out, proc, end = stopped(backend, tmp_path_factory)
    output = proc.stdout + proc.stderr
    rank = SIGNALLED_RANK.get(backend, 1)
    assert f"disttrain: SIGTERM on rank {rank}: every process stops after its next step" in output, output
    assert "preempted after global step 14 (epoch 3, step 4/5)" in output, output
    assert "exiting with code 42; run the same command to resume" in output, output
    if backend in LAUNCHER_STATUS:
        assert "Exit code: 42" in output, output
    seconds = end - float((out / "signal_time").read_text())
    assert seconds < 60, f"{seconds:.1f}s from the signal to the end of every process"
    files = sorted(p.name for p in (out / "pristine").iterdir())  # ckpt as the stop left it (resumes go on in it)
    # at steps 3, 6, 9, 12 (ckpt-1..4) and at the stop (ckpt-5); keep=2; no temporary directory of a worker or
    # of TF is left
    assert files == ["checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index", "ckpt-5.data-00000-of-00001",
                     "ckpt-5.index"], files
    reference = json.loads((out / "reference_rank0.json").read_text())
    lr = reference["history"]["lr"]
    # both rules changed the LR before the stop (in epoch 3): the threshold cut after epoch 1 (x0.5),
    # the second threshold and the plateau rule after epoch 2 (x0.25)
    assert lr[1] == pytest.approx(0.05) and lr[2] == pytest.approx(lr[1] / 4), lr


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_command_resumes_bitwise_and_other_backends_resume_its_checkpoints(backend, tmp_path_factory):
    own, _, _ = stopped(backend, tmp_path_factory)
    for writer in CROSS[backend]:
        stopped(writer, tmp_path_factory)
    resumed = job(backend, "resume", tmp_path_factory)
    out = resumed.out
    output = "".join(resumed.stdout) + resumed.launch.stderr
    assert output.count("ckpt-5 at epoch 3, step 4 (global step 14)") == 1 + len(CROSS[backend]), output[-6000:]
    for rank in range(PROCESSES.get(backend, 2)):
        expected = weights(own / f"reference_rank{rank}.npz")
        got = weights(out / f"final_own_rank{rank}.npz")
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), f"{backend} rank {rank}: not bitwise"
        info = json.loads((out / f"final_own_rank{rank}.json").read_text())
        reference = json.loads((own / f"reference_rank{rank}.json").read_text())
        assert info["steps"] == reference["steps"] == 30
        assert info["history"]["lr"] == reference["history"]["lr"]
        np.testing.assert_allclose(info["history"]["loss"], reference["history"]["loss"], rtol=1e-6)
        np.testing.assert_allclose(info["history"]["mae"], reference["history"]["mae"], rtol=1e-6)
    for writer in CROSS[backend]:
        directory, _, _ = stopped(writer, tmp_path_factory)
        expected = weights(directory / "reference_rank0.npz")
        for rank in range(PROCESSES.get(backend, 2)):
            got = weights(out / f"final_{writer}_rank{rank}.npz")
            for a, b in zip(got, expected):
                rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
                assert rel <= 1e-5, f"{writer} checkpoint resumed on {backend}: relative difference {rel:.2e}"
        info = json.loads((out / f"final_{writer}_rank0.json").read_text())
        reference = json.loads((directory / "reference_rank0.json").read_text())
        np.testing.assert_allclose(info["history"]["lr"], reference["history"]["lr"], rtol=1e-7)
