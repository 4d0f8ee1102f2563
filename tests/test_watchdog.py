"""The stall watchdog: a rank that really stalls (sleeps in its step or in a callback) makes every rank
say where it was, dump its Python stacks and exit with code 124, within a bounded time.

Multi-process: one launch per (backend, place of the stall), DISTTRAIN_STEP_TIMEOUT=8, rank 1 sleeps
600 s at step 3. In-process: the messages and the eager-collective phase with a thread-backed fake.
"""

import re
import threading
import time

import pytest

from disttrain import watchdog
from fake_ranks import ThreadRankBackend, _Group
from launchers import WORKERS, run

SCRIPT = WORKERS / "stall.py"
TIMEOUT = 8  # the first call (tracing) gets watchdog.FIRST_CALL_FACTOR times as long
# horovodrun ends with 1 and reports the worker's status; mpirun and disttrain launch pass it on. The
# horovodrun case runs under `disttrain run`, which returns the code the first failing rank recorded.
STATUS = {"horovod-gloo": 124, "horovod-mpi": 124, "multiworker": 124}
UNDER_RUN = ("horovod-gloo",)
CASES = [("horovod-gloo", "step"), ("multiworker", "step"), ("multiworker", "callback"), ("horovod-mpi", "callback")]


def _stalled_run(backend, where, tmp_path):
    proc = run(backend, SCRIPT, ["--out", str(tmp_path), "--stall-rank", "1", "--stall-step", "3", "--where", where],
               timeout=240, extra_env={"DISTTRAIN_STEP_TIMEOUT": str(TIMEOUT)}, returncode=STATUS[backend],
               under_run=backend in UNDER_RUN)
    ended = time.time()
    output = proc.stdout + proc.stderr
    assert (tmp_path / "stall_time").exists(), f"{backend}: the watchdog fired before the stall:\n{output[-5000:]}"
    return output, ended - float((tmp_path / "stall_time").read_text())


def _message(output, rank):
    output = "\n".join(line for line in output.splitlines() if not line.startswith("disttrain run:"))  # quotes one
    found = re.findall(rf"disttrain watchdog: \S+: rank {rank} of 2, [^\n]*", output)
    assert len(found) == 1, (rank, output[-6000:])
    return found[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,where", CASES)
def test_a_stalled_rank_aborts_every_rank_saying_where_each_was(backend, where, tmp_path):
    output, seconds = _stalled_run(backend, where, tmp_path)
    name = backend.split("-")[0]
    stalled, waiting = _message(output, 1), _message(output, 0)
    for message in (stalled, waiting):
        assert message.startswith(f"disttrain watchdog: {name}: rank "), message
        assert f"(timeout {TIMEOUT} s)" in message and "aborting with exit code 124" in message, message
    if where == "step":
        assert "after global step 2 (epoch 1, step 2/32): step phase 'train step 3' has not finished" in stalled
        assert "had its batch but had NOT passed its gradients of this step to ctx.apply_gradients: it is " \
               "inside its own step" in stalled, stalled
        assert "step phase 'train step 3'" in waiting, waiting
        assert "gradients of this step had reached ctx.apply_gradients: it WAITS in the step's collectives" \
               in waiting, waiting
    else:
        assert "after global step 3 (epoch 1, step 3/32): callback phase 'StallInCallback.on_step_logs' has " \
               "not finished" in stalled, stalled
        assert "This rank is running a callback (user code between steps)" in stalled
        assert "step phase 'train step 4'" in waiting, waiting
        # every backend here feeds each worker's own pipeline (MultiWorker without GPUs too), so the waiting
        # rank has its batch and waits in the gradient all-reduce
        assert "it WAITS in the step's collectives" in waiting, waiting
    # every rank dumped its Python stacks; the stalled one shows where it sleeps
    assert output.count("(most recent call first):") >= 4, output[-3000:]
    assert re.search(r"stall\.py\", line \d+ in stall_here", output), output[-3000:]
    if backend in UNDER_RUN:  # horovodrun itself said 1
        assert re.search(r"^disttrain run: rank [01] failed first, with exit code 124 \(disttrain watchdog: horovod: "
                         r"rank [01] of 2, .*; exit 124 \(horovodrun exited 1\)$", output, re.M), output[-3000:]
    if backend.startswith("horovod"):
        assert "Horovod 0.28.1 under Gloo (horovodrun --gloo) never prints it" in waiting
    if backend == "horovod-mpi":  # DISTTRAIN_STEP_TIMEOUT=8 set HOROVOD_STALL_CHECK_TIME_SECONDS=2
        assert re.search(r"Missing ranks:\s*\n\s*(\[\d+\]<stderr>:)?\s*1: \[", output), output[-4000:]
    # on by default (1800 s) only where nothing else bounds a lost peer: Horovod's MPI controller
    assert (tmp_path / "default_step_timeout").read_text() == ("1800.0" if backend == "horovod-mpi" else "None")
    print(f"{backend} {where}: {seconds:.1f} s from the stall to the end of every process")
    assert seconds < TIMEOUT + 30, f"{backend}: {seconds:.1f} s from the stall to the end of every process"


# -- in-process ---------------------------------------------------------------------------------------
def test_timeout_from_argument_and_environment():
    assert watchdog.timeout_from(None, {}) is None
    assert watchdog.timeout_from(None, {"DISTTRAIN_STEP_TIMEOUT": "90"}) == 90.0
    assert watchdog.timeout_from(0, {"DISTTRAIN_STEP_TIMEOUT": "90"}) is None
    assert watchdog.timeout_from(30, {}) == 30.0
    # a backend's default (Horovod's MPI controller: 1800 s) applies when neither the argument nor the variable is set
    assert watchdog.timeout_from(None, {}, default=1800.0) == 1800.0
    assert watchdog.timeout_from(None, {"DISTTRAIN_STEP_TIMEOUT": "0"}, default=1800.0) is None
    assert watchdog.timeout_from(0, {}, default=1800.0) is None
    with pytest.raises(ValueError, match=r"DISTTRAIN_STEP_TIMEOUT='ten' is not a number of seconds"):
        watchdog.timeout_from(None, {"DISTTRAIN_STEP_TIMEOUT": "ten"})
    with pytest.raises(ValueError, match=r"step_timeout=-1 must be a number of seconds >= 0"):
        watchdog.timeout_from(-1, {})


def test_a_rank_waiting_in_an_eager_collective_names_it_and_its_caller(capfd):
    group = _Group(2)
    rank0 = ThreadRankBackend(group, 0)
    exits = []

    def exit_(code):
        exits.append(code)
        group.barrier.abort()  # releases the waiting rank (a real process would end here)

    dog = watchdog.Watchdog(timeout=0.3, identity="threads: rank 0 of 2", where=lambda: "after global step 7",
                            exit=exit_)
    started = time.monotonic()

    def waiting_for_a_peer_that_never_comes():
        with dog:
            rank0.all_reduce(1.0, "sum")

    with pytest.raises(threading.BrokenBarrierError):
        waiting_for_a_peer_that_never_comes()
    assert exits == [watchdog.STALL_EXIT_CODE] and time.monotonic() - started < 5
    err = capfd.readouterr().err
    assert ("disttrain watchdog: threads: rank 0 of 2, after global step 7: collective phase 'all_reduce(sum) called "
            "from test_a_rank_waiting_in_an_eager_collective_names_it_and_its_caller.<locals>."
            "waiting_for_a_peer_that_never_comes (test_watchdog.py)' has not finished after") in err, err
    assert "a peer has not reached" in err and "(most recent call first):" in err


def test_phases_nest_and_only_the_arming_thread_is_watched(capfd):
    exits = []
    dog = watchdog.Watchdog(timeout=0.2, identity="x: rank 0 of 1", where=lambda: "here", exit=exits.append)
    with dog:
        with dog.phase("callback", "Slow.on_epoch_end"):
            time.sleep(0.3)  # before the first step has finished: three timeouts
        with dog.phase("step", "train step 1"):
            time.sleep(0.05)
        other = threading.Thread(target=lambda: dog.phase("step", "ignored").__enter__())
        other.start()
        other.join()
        with dog.phase("callback", "Slow.on_epoch_end"), dog.phase("checkpoint", "the checkpoint after a step",
                                                                    first=True):
            time.sleep(0.3)  # within 3 timeouts: the first call of a phase traces
        assert exits == []
        with dog.phase("callback", "Slow.on_epoch_end"), dog.phase("collective", "barrier"):
            deadline = time.monotonic() + 5
            while not exits and time.monotonic() < deadline:
                time.sleep(0.05)
    assert exits == [124]
    err = capfd.readouterr().err
    assert "collective phase 'barrier' (inside callback Slow.on_epoch_end) has not finished" in err, err


def test_horovod_stall_check_follows_the_watchdog_unless_set():
    from disttrain.backends.horovod import stall_check_env

    assert stall_check_env({"DISTTRAIN_STEP_TIMEOUT": "120"}) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "30"}
    assert stall_check_env({"DISTTRAIN_STEP_TIMEOUT": "2"}) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "1"}
    assert stall_check_env({"DISTTRAIN_STEP_TIMEOUT": "120", "HOROVOD_STALL_CHECK_TIME_SECONDS": "9"}) == {}
    assert stall_check_env({}) == {} and stall_check_env({"DISTTRAIN_STEP_TIMEOUT": "0"}) == {}
