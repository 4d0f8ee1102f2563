"""`disttrain launch` with real TensorFlow workers and checkpoints:

* --max-restarts: a worker killed with kill -9 mid-run; the launcher restarts every worker, they resume
  from the last checkpoint and end with the weights of the run nobody interrupted (bitwise: CPU, same
  number of workers).
* SIGTERM to the launcher mid-run: forwarded, every worker stops at the same step, saves and exits 42,
  and the launcher exits 42; the workers print none of TensorFlow's start-up notices. (That the same command then resumes is tests/test_checkpoint_resume.py's,
  whose multiworker runs use disttrain launch.)
"""

import re
import signal
import subprocess
import time

import numpy as np

from launchers import BIN, TEST_ONLY_ENV, WORKERS, _kill_tree, base_env, startup_notices


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def launch(args, *, env=None, **popen):
    return subprocess.Popen([str(BIN / "disttrain"), "launch", "-n", "2", *args], env=env or base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"no end within {timeout} s\n{out[-2000:]}\n{err[-4000:]}") from None


def test_kill_9_of_a_worker_restarts_all_and_the_run_ends_with_the_uninterrupted_weights(tmp_path):
    proc = launch(["--max-restarts", "1", "--stop-timeout", "3", str(WORKERS / "restart.py"), "--backend", "auto",
                   "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt"), "--kill-rank", "1", "--kill-step", "7"])
    out, err = finish(proc, timeout=400)
    assert proc.returncode == 0, out[-2000:] + err[-6000:]
    assert (tmp_path / "killed").exists()
    assert "worker 1 on localhost failed with exit code 137 (SIGKILL); stopping the other workers" in err
    assert "restarting all 2 workers (restart 1 of 1); they resume from their last checkpoint" in err
    assert re.search(rf"resuming from {re.escape(str(tmp_path / 'ckpt'))}/ckpt-\d+ at epoch 2, step 2 \(global step 6\)",
                     out + err), err[-4000:]
    for rank in range(2):
        for got, want in zip(weights(tmp_path / f"final_rank{rank}.npz"), weights(tmp_path / f"reference_rank{rank}.npz")):
            assert np.array_equal(got, want), f"rank {rank}: the restarted run differs from the uninterrupted one"


def _sigterm_midrun(out, after_step):
    """Runs tests/workers/long_run.py under disttrain launch, in a user's environment (no TEST_ONLY_ENV), and
    SIGTERMs the launcher after ``after_step``."""
    env = {k: v for k, v in base_env().items() if k not in TEST_ONLY_ENV}
    proc = launch([str(WORKERS / "long_run.py"), "--backend", "auto", "--out", str(out)], env=env)
    step_file = out / "step"
    deadline = time.monotonic() + 200
    try:
        while not (step_file.exists() and int(step_file.read_text() or 0) > after_step):
            assert proc.poll() is None, f"the run ended before the signal:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"rank 0 did not pass step {after_step} in 200 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
    except BaseException:
        _kill_tree(proc.pid)
        raise
    output = "".join(finish(proc, timeout=120))
    return proc.returncode, output


def test_sigterm_to_the_launcher_saves_on_every_worker_and_exits_42(tmp_path):
    code, output = _sigterm_midrun(tmp_path, after_step=10)
    assert code == 42, output[-4000:]
    assert "disttrain launch: SIGTERM received: forwarded SIGTERM to 2 worker(s)" in output
    assert "SIGTERM on rank 0" in output and "SIGTERM on rank 1" in output, output[-4000:]
    saved = re.search(r"preempted after global step (\d+) .*saved (\S+); exiting with code 42", output)
    assert saved and (tmp_path / "ckpt" / "checkpoint").read_text().startswith(
        f'model_checkpoint_path: "{saved.group(2).rsplit("/", 1)[1]}"'), output[-4000:]
    assert not startup_notices(output), output[-4000:]
