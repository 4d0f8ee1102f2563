"""Launchers: launch/local.sh, and `disttrain launch` watching, stopping and restarting real processes.

The `disttrain launch` cases use tests/workers/launch_probe.py, a worker without TensorFlow, so each
launch takes about a second; every one runs under a hard timeout and asserts the launcher's messages.
The end-to-end restart of a checkpointed TensorFlow run is in tests/test_restart.py.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launchers import BIN, ROOT, WORKERS, _kill_tree, base_env

PROBE = WORKERS / "launch_probe.py"


@pytest.mark.parametrize("mode,backend", [("mpi", "horovod"), ("tf-config", "multiworker")])
def test_local_launcher(mode, backend, tmp_path):
    env = base_env()
    env.pop("DISTTRAIN_THREADS")
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), mode, "2", str(WORKERS / "collectives.py"),
                           "--backend", "auto", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["backend"], r["rank"], r["size"]) for r in results] == [(backend, 0, 2), (backend, 1, 2)]
    assert all(r["sum_int"] == 3 for r in results)


def test_local_launcher_rejects_bad_arguments():
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "slurm", "2", "x.py"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown mode 'slurm'; use horovod, mpi or tf-config" in proc.stderr
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "mpi", "two", "x.py"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "N must be a positive integer, got 'two'" in proc.stderr


# -- disttrain launch ---------------------------------------------------------------------------------
def start(tmp_path, *options, mode="sleep", probe=()):
    """Starts `disttrain launch OPTIONS launch_probe.py --out tmp_path --mode MODE PROBE...`."""
    cmd = [str(BIN / "disttrain"), "launch", *options, str(PROBE), "--out", str(tmp_path), "--mode", mode, *probe]
    return subprocess.Popen(cmd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout):
    """The launcher's (returncode, stdout, stderr); kills its whole tree and fails on a timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"disttrain launch did not finish in {timeout}s\n{out[-2000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


def wait_for(paths, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, f"not written within {timeout}s: {[str(p) for p in paths]}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids(tmp_path, n):
    return [int((tmp_path / f"pid{r}").read_text()) for r in range(n)]


def test_a_failed_worker_stops_the_others_and_its_code_is_returned(tmp_path):
    # workers 0 and 2 ignore SIGTERM, as a peer stuck in a collective would: only SIGKILL ends them
    proc = start(tmp_path, "-n", "3", "--stop-timeout", "2", mode="fail", probe=["--rank-fails", "1", "--code", "3"])
    code, out, err = finish(proc, timeout=60)
    assert code == 3, err
    assert "disttrain launch: worker 1 on localhost failed with exit code 3; stopping the other workers" in err
    assert "worker 0 on localhost has not exited 2s after the stop request; SIGKILL" in err
    assert "exit codes: worker 0: 137 (SIGKILL), worker 1: 3, worker 2: 137 (SIGKILL)" in err
    assert not any(alive(pid) for pid in pids(tmp_path, 3))
    # the exact command of each worker is printed, with its TF_CONFIG
    config = json.loads((tmp_path / "env2.0.json").read_text())["TF_CONFIG"]
    assert f"worker 2 on localhost: TF_CONFIG='{config}' {BIN / 'python'} -m disttrain.launcher.guard" in err


@pytest.mark.parametrize("sig,backend", [(signal.SIGTERM, "multiworker"), (signal.SIGINT, "multiworker"),
                                         (signal.SIGTERM, "horovod")])
def test_signals_are_forwarded_and_preempted_workers_return_42(sig, backend, tmp_path):
    proc = start(tmp_path, "-n", "2", "--backend", backend, probe=["--save-seconds", "1"])
    wait_for([tmp_path / "pid0", tmp_path / "pid1"])
    proc.send_signal(sig)
    code, out, err = finish(proc, timeout=60)
    assert code == 42, err
    assert (f"disttrain launch: {sig.name} received: forwarded {sig.name} to 2 worker(s); SIGKILL in 60s if they "
            "have not exited (--grace-period)") in err
    assert all((tmp_path / f"signal{r}").read_text().startswith(sig.name) for r in range(2))
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()
    assert "[0] probe rank 0: " + sig.name + ", saving" in out
    assert not any(alive(pid) for pid in pids(tmp_path, 2))


def test_workers_that_outlast_the_grace_period_are_killed(tmp_path):
    proc = start(tmp_path, "-n", "2", "--grace-period", "2", probe=["--save-seconds", "600"])
    wait_for([tmp_path / "pid0", tmp_path / "pid1"])
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=60)
    assert code == 137, err
    assert "worker 0 on localhost has not exited 2s after the stop request; SIGKILL" in err
    assert "exit codes: worker 0: 137 (SIGKILL), worker 1: 137 (SIGKILL)" in err
    assert not any(alive(pid) for pid in pids(tmp_path, 2)) and not (tmp_path / "saved0").exists()


def test_kill_9_of_the_launcher_leaves_no_worker_running(tmp_path):
    proc = start(tmp_path, "-n", "2", "--grace-period", "3", probe=["--save-seconds", "1"])
    wait_for([tmp_path / "pid0", tmp_path / "pid1"])
    workers = pids(tmp_path, 2)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker outlived its launcher"
    # they were asked to stop first (SIGTERM), so they could save
    assert all((tmp_path / f"signal{r}").read_text().startswith("SIGTERM") for r in range(2))
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()


@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_max_restarts_relaunches_every_worker_after_a_failure(backend, tmp_path):
    proc = start(tmp_path, "-n", "2", "--backend", backend, "--max-restarts", "2", mode="fail-once",
                 probe=["--rank-fails", "1", "--code", "5"])
    code, out, err = finish(proc, timeout=120)
    assert code == 0, err
    assert "worker 1 on localhost failed with exit code 5; stopping the other workers" in err
    assert "restarting all 2 workers (restart 1 of 2); they resume from their last checkpoint" in err
    assert "restart 2 of 2" not in err
    assert sorted(p.name for p in tmp_path.glob("done*")) == ["done0.1", "done1.1"]
    first, second = (json.loads((tmp_path / f"env0.{a}.json").read_text()) for a in (0, 1))
    if backend == "horovod":
        assert first["HOROVOD_RANK"] == "0" and first["HOROVOD_SIZE"] == "2"
        assert first["HOROVOD_CONTROLLER"] == "gloo" and first["HOROVOD_GLOO_IFACE"] == "lo"
        key = "HOROVOD_GLOO_RENDEZVOUS_PORT"  # a new rendezvous server for the restart
    else:
        key = "TF_CONFIG"  # new ports for the restart
    assert first[key] != second[key]


def test_without_restarts_left_the_launcher_gives_up(tmp_path):
    proc = start(tmp_path, "-n", "2", "--max-restarts", "1", "--stop-timeout", "1", mode="fail",
                 probe=["--rank-fails", "0", "--code", "7"])
    code, out, err = finish(proc, timeout=120)
    assert code == 7, err
    assert err.count("worker 0 on localhost failed with exit code 7") == 2
    assert "giving up after 1 restart(s) (--max-restarts 1)" in err


def test_host_lists_and_host_files_fill_slots_in_order(tmp_path):
    from disttrain.launcher.hosts import Host, assign_slots, parse_hosts, read_hostfile

    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1 slots=2\nnode2:2\n\nnode3\n")
    assert read_hostfile(str(hostfile)) == [Host("node1", 2), Host("node2", 2), Host("node3", 1)]
    assert parse_hosts("node1:2,node2:2,node3") == read_hostfile(str(hostfile))
    slots = assign_slots(parse_hosts("a:2,b:2"), num_workers=3)
    assert [(s.rank, s.host, s.local_rank, s.local_size, s.cross_rank, s.cross_size) for s in slots] == [
        (0, "a", 0, 2, 0, 2), (1, "a", 1, 2, 0, 1), (2, "b", 0, 1, 1, 2)]  # as horovodrun assigns them
    with pytest.raises(ValueError, match=r"5 workers do not fit on 4 slots \(a:2, b:2\); add hosts or slots, or use -n 4"):
        assign_slots(parse_hosts("a:2,b:2"), num_workers=5)
    hostfile.write_text("node1 slots=two\n")
    with pytest.raises(ValueError, match=r"hosts:1: cannot read 'node1 slots=two'; write 'host slots=N' or 'host:N'"):
        read_hostfile(str(hostfile))
    with pytest.raises(ValueError, match="host 'a' appears twice"):
        parse_hosts("a:1,a:2")


def test_a_request_to_a_guard_that_has_exited_is_dropped_and_closing_its_pipe_does_not_raise():
    """The supervisor asks a guard to stop its worker after the guard has exited: the write fails (the
    request stays in the pipe's buffer) and closing the pipe must not raise BrokenPipeError from that
    buffer (it once did, turning a worker's exit code 124 into the launcher's own traceback and exit 1)."""
    import types

    from disttrain.launcher.supervisor import _Worker

    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    proc.wait(timeout=60)
    worker = _Worker(types.SimpleNamespace(rank=1, host="localhost"), proc, [])
    worker.send("TERM")
    worker.send("KILL")
    worker.close()
    assert proc.stdin.closed


# -- disttrain run: an exit code a scheduler can use, around launchers that lose the workers' ---------
def _status(rank, code, *, size=2, at=0.0, reason="", ended=True):
    return {"rank": rank, "size": size, "code": code, "reason": reason, "ended": ended, "time": at}


def test_disttrain_run_decides_from_the_statuses_the_ranks_recorded():
    from disttrain.launcher.outcome import decide

    saved = [_status(0, 42, reason="preempted after global step 7; checkpoint c/ckpt-2"),
             _status(1, 42, reason="preempted after global step 7; checkpoint None")]
    # horovodrun 0.28.1 that lost its workers' status (exit 0), or that raised (1): 42 either way
    for launcher_code in (0, 1):
        assert decide(saved, launcher="horovodrun", launcher_code=launcher_code) == (
            42, "every rank (2 of 2) was preempted and saved (rank 0: preempted after global step 7; checkpoint "
                f"c/ckpt-2); exit 42 (horovodrun exited {launcher_code})")
    # a rank killed before it could record: not every rank is known to have saved
    code, line = decide([saved[0], _status(1, None, ended=False)], launcher="srun", launcher_code=137)
    assert code == 137 and line == ("no rank recorded a failure; exit 137, srun's own; rank(s) 1 of 2 left no final "
                                    "status (killed, or the status directory is not on a filesystem every host "
                                    "shares); 1 rank(s) recorded 42")
    # the first failure in time wins over a later one and over 42
    failed = [_status(0, 1, size=3, at=5.0, reason="RuntimeError: peer lost"), _status(1, 42, size=3),
              _status(2, 3, size=3, at=2.0, reason="ValueError: bad input")]
    assert decide(failed, launcher="mpirun", launcher_code=1) == (
        3, "rank 2 failed first, with exit code 3 (ValueError: bad input); also failed: 0; exit 3 (mpirun exited 1)")
    assert decide([_status(0, None), _status(1, None)], launcher="mpirun", launcher_code=0) == (
        0, "no rank recorded a failure; exit 0, mpirun's own")
    assert decide([], launcher="sh", launcher_code=5)[0] == 5


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun")
def test_disttrain_run_under_mpirun_returns_the_first_failing_rank_code(tmp_path):
    """Real mpirun, 3 ranks without TensorFlow: rank 1 fails with 3, the others ignore SIGTERM and are
    killed; `disttrain run` names rank 1 and returns its code, whatever mpirun returns."""
    env = dict(base_env(), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(BIN / "disttrain"), "run", "--", shutil.which("mpirun"), "-np", "3", "--oversubscribe", "--bind-to",
           "none", sys.executable, str(PROBE), "--out", str(tmp_path), "--mode", "fail", "--rank-fails", "1",
           "--code", "3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    code, out, err = finish(proc, timeout=60)
    assert code == 3, err
    assert re.search(r"^disttrain run: rank 1 failed first, with exit code 3 \(probe rank 1 failed\); rank\(s\) 0, 2 "
                     r"of 3 left no final status \(killed, .*\); exit 3 \(mpirun exited \d+\)$", err, re.M), err
    assert not any(alive(pid) for pid in pids(tmp_path, 3))
    # no launcher at all, or one whose processes record nothing: its own code, said so
    proc = subprocess.run([str(BIN / "disttrain"), "run", "--", "sh", "-c", "exit 5"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 5 and "disttrain run: no rank recorded an exit status; exit 5, sh's own" in proc.stderr
    proc = subprocess.run([str(BIN / "disttrain"), "run", "--", "no-such-launcher"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 127 and "launcher 'no-such-launcher' not found on PATH" in proc.stderr
