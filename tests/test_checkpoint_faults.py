"""Checkpoints survive real faults: kill -9 in the middle of a save, a launcher that gets SIGTERM, bad resumes."""

import glob
import os
import re
import signal
import subprocess
import time

from launchers import WORKERS, _kill_tree, command_for, run

BIG = WORKERS / "big_checkpoints.py"


def _latest(directory) -> int:
    state = (directory / "checkpoint").read_text()
    return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state, re.M).group(1))


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    cmd, env = command_for("single", BIG, ["--out", str(tmp_path)])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = tmp_path / "ckpt"
    killed_during = None
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # a save under way after a complete one: TF writes into ckpt-<n>_temp/ before renaming
            temps = glob.glob(str(ckpt / "*_temp")) if (ckpt / "checkpoint").exists() else []
            if temps:
                os.kill(proc.pid, signal.SIGKILL)
                killed_during = temps[0]
                break
            time.sleep(0.0005)
    finally:
        if killed_during is None and proc.poll() is None:
            _kill_tree(proc.pid)
        proc.communicate()
    assert killed_during, "no save was seen in progress; the run ended or timed out first"
    assert proc.returncode == -signal.SIGKILL
    unfinished = int(re.search(r"ckpt-(\d+)_temp", killed_during).group(1))
    latest = _latest(ckpt)
    assert latest == unfinished - 1, (latest, unfinished)  # the state file still names the previous one
    assert os.path.isdir(killed_during), "the killed save left nothing behind: it was not mid-save"

    # The same command resumes from the previous checkpoint, removes the leftover and finishes.
    started = time.monotonic()
    proc = run("single", BIG, ["--out", str(tmp_path)], timeout=120)
    assert f"disttrain: resuming from {ckpt}/ckpt-{latest} " in proc.stderr, proc.stderr
    assert (tmp_path / "steps").read_text() == "8"
    assert not glob.glob(str(ckpt / "*_temp"))
    assert _latest(ckpt) > latest
    assert time.monotonic() - started < 120


LONG = WORKERS / "long_run.py"
# What each launcher exits with when its workers exit 42 after its own SIGTERM: horovodrun raises (1);
# mpirun, signalled itself, exits 1 too; both print the workers' status.
LAUNCHERS = {"horovod-gloo": "Exit code: 42", "horovod-mpi": "preempted after global step"}
MPI_GRACE = 10  # seconds: mpirun signals the ranks after it and kills them after it again


def _sigterm_launcher_midrun(backend, out, *, after_step):
    """Starts the long run under ``backend``'s launcher, SIGTERMs the LAUNCHER once rank 0 passed
    ``after_step``; returns (output, seconds from the signal to the launcher's exit, its exit status)."""
    cmd, env = command_for(backend, LONG, ["--out", str(out)])
    if backend == "horovod-mpi":  # mpirun's default is SIGTERM after 1 s, SIGKILL 1 s later: too short to save
        cmd[1:1] = ["--mca", "odls_base_sigkill_timeout", str(MPI_GRACE)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    step_file = out / "step"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if step_file.exists() and int(step_file.read_text() or 0) > after_step:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{backend}: rank 0 did not pass step {after_step} in 150 s"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        return output, time.monotonic() - signalled, proc.returncode
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.communicate()


def test_sigterm_to_the_launcher_stops_every_worker_with_a_checkpoint(tmp_path):
    """(That running the same command again resumes from that checkpoint is tests/test_checkpoint_resume.py's,
    on every launcher.)"""
    for backend, status in LAUNCHERS.items():
        out = tmp_path / backend
        out.mkdir()
        output, seconds, code = _sigterm_launcher_midrun(backend, out, after_step=5)
        assert "SIGTERM on rank 0" in output and "SIGTERM on rank 1" in output, output
        saved = re.search(r"preempted after global step (\d+) .*saved (\S+); exiting with code 42", output)
        # horovodrun 0.28.1 sometimes (1 in 12 here) loses its workers' status and exits 0 saying nothing;
        # the workers have saved all the same (docs/checkpoints.md)
        lost = backend == "horovod-gloo" and code == 0 and "Exit code" not in output
        assert saved and (status in output or lost), (code, output)
        assert seconds < 20 + MPI_GRACE, f"{backend}: {seconds:.1f}s from SIGTERM to the launcher's exit"
        assert saved.group(2) == f"{out / 'ckpt'}/ckpt-{_latest(out / 'ckpt')}"
