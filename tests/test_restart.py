"""`disttrain launch --max-restarts`: a worker killed with kill -9 mid-run; the launcher restarts every
worker, they resume from the last checkpoint and end with the weights of the run nobody interrupted
(bitwise: CPU, same number of workers)."""

import subprocess

import numpy as np

from launchers import BIN, WORKERS, _kill_tree, base_env


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_kill_9_of_a_worker_restarts_all_and_the_run_ends_with_the_uninterrupted_weights(tmp_path):
    cmd = [str(BIN / "disttrain"), "launch", "-n", "2", "--max-restarts", "1", "--stop-timeout", "3",
           str(WORKERS / "restart.py"), "--backend", "auto", "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt"),
           "--kill-rank", "1", "--kill-step", "7"]
    proc = subprocess.Popen(cmd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"no end within 400 s\n{out[-2000:]}\n{err[-4000:]}") from None
    assert proc.returncode == 0, out[-2000:] + err[-6000:]
    assert (tmp_path / "killed").exists()
    assert "worker 1 on localhost failed with exit code 137 (SIGKILL); stopping the other workers" in err
    assert "restarting all 2 workers (restart 1 of 1); they resume from their last checkpoint" in err
    assert f"resuming from {tmp_path / 'ckpt'}/ckpt-6 at epoch 2, step 2 (global step 6)" in out + err
    for rank in range(2):
        for got, want in zip(weights(tmp_path / f"final_rank{rank}.npz"), weights(tmp_path / f"reference_rank{rank}.npz")):
            assert np.array_equal(got, want), f"rank {rank}: the restarted run differs from the uninterrupted one"
