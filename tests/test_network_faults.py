"""Network loss named: a real network partition between two processes ends every process, in bounded
time, with disttrain's CollectiveError naming the backend, the step, the unreachable peer and the fix.

Multi-process: the two "hosts" are network namespaces joined by a veth pair (tests/netns_hosts.py, as in
tests/test_multihost.py); a MultiWorker run and a Horovod (Gloo) run, both started by ``disttrain launch
-H`` across the two namespaces, train side by side (one slow step after another, tests/workers/partition.py);
once every rank of both has finished a few steps, the test takes the veth link down (a partition: both
processes stay alive, neither can reach the other) and times how long each takes to end, and with what.
One cut serves both runs, so the test costs one start-up and the longer of the two backends' timeouts.

In-process: the backends' readings of their errors (TensorFlow's and Horovod's own texts, with a probe
that is told what to answer) and the eager collectives' translation.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
import tensorflow as tf

import netns_hosts
from disttrain.backends import failures, reachability
from disttrain.backends.horovod import describe_horovod_failure
from disttrain.backends.multiworker import _task_list, describe_tf_failure
from fake_ranks import ThreadRankBackend, _Group
from launchers import BIN, WORKERS, _kill_tree, base_env
from netns_hosts import NETNS_SSH

ADDRESSES = ("10.214.0.1", "10.214.0.2")
SCRIPT = WORKERS / "partition.py"
BACKENDS = ("multiworker", "horovod")
CUT_AFTER_STEP = 4  # every rank of both runs has finished this many steps when the link goes down
GLOO_TIMEOUT = 10  # HOROVOD_GLOO_TIMEOUT_SECONDS for the test (default 30)
HEARTBEAT_TIMEOUT = 10  # TensorFlow's coordination service (MultiWorkerMirroredStrategy's default)
#: The most seconds from the cut to each rank's CollectiveError, and to the end of its launcher: the
#: backend's timeout, a 2 s probe and slack for this loaded 2-core machine.
BOUND = {"multiworker": HEARTBEAT_TIMEOUT + 15, "horovod": GLOO_TIMEOUT + 15}
LAUNCHER_SLACK = 20  # a worker may take seconds to exit after its error; the launcher stops the rest in 5 s
STEP = re.compile(r"a collective failed (?:in|after) global step (\d+) \(epoch 1, step (\d+)/512\)")


def _steps(out, rank):
    path = out / f"steps_rank{rank}"
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.timeout(400)
def test_a_network_partition_ends_every_process_naming_the_unreachable_peer(tmp_path):
    with netns_hosts.two_hosts(ADDRESSES) as hosts:
        first, second = ADDRESSES
        env = dict(base_env(), DISTTRAIN_TEST_NETNS=hosts.netns_env(), HOROVOD_GLOO_TIMEOUT_SECONDS=str(GLOO_TIMEOUT))
        runs = {}
        for backend in BACKENDS:
            out = tmp_path / backend
            out.mkdir()
            cmd = ["ip", "netns", "exec", hosts.spaces[0], str(BIN / "disttrain"), "launch", "--backend", backend,
                   "-H", f"{first}:1,{second}:1", "--ssh", str(NETNS_SSH), "--startup-timeout", "120",
                   str(SCRIPT), "--backend", "auto", "--out", str(out), "--examples", "8192"]
            log = open(out / "launch.log", "w")
            runs[backend] = (out, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                        start_new_session=True))
        ended: dict[str, float] = {}
        try:
            deadline = time.monotonic() + 240
            while not all(_steps(out, r) >= CUT_AFTER_STEP for out, _, _ in runs.values() for r in range(2)):
                early = [b for b, (_, _, p) in runs.items() if p.poll() is not None]
                assert not early and time.monotonic() < deadline, \
                    f"{early or 'a run'} did not reach step {CUT_AFTER_STEP}:\n" + "\n".join(
                        (out / "launch.log").read_text()[-3000:] for out, _, _ in runs.values())
                time.sleep(0.2)
            hosts.set_link("down")  # the partition: both processes stay alive, neither reaches the other
            cut = time.time()

            def wait(backend, proc):
                proc.wait(timeout=BOUND[backend] + LAUNCHER_SLACK + 30)
                ended[backend] = time.time()

            waiters = [threading.Thread(target=wait, args=(b, p)) for b, (_, _, p) in runs.items()]
            for waiter in waiters:
                waiter.start()
            for waiter in waiters:
                waiter.join()
        finally:
            for _, log, proc in runs.values():
                if proc.poll() is None:
                    _kill_tree(proc.pid)  # the launcher and every worker it started
                    proc.wait()
                log.close()
    for backend, (out, _, proc) in runs.items():
        output = (out / "launch.log").read_text()
        assert backend in ended, f"{backend}: the launcher did not end after the cut (a hang):\n{output[-5000:]}"
        assert proc.returncode == 1, f"{backend}: exit {proc.returncode}\n{output[-5000:]}"
        named = [r for r in range(2) if (out / f"error_rank{r}.json").exists()]
        assert named, f"{backend}: no rank ended with a CollectiveError:\n{output[-6000:]}"
        for rank in range(2):
            path = out / f"error_rank{rank}.json"
            if not path.exists():  # the launcher stopped it once the other rank had failed (before its own timeout)
                assert f"worker {rank}: 143 (SIGTERM)" in output, \
                    f"{backend} rank {rank} did not end with a CollectiveError:\n{output[-6000:]}"
                continue
            error = json.loads(path.read_text())
            message, peer = error["message"], ADDRESSES[1 - rank]
            print(f"{backend} rank {rank}: {error['time'] - cut:.1f} s after the cut: {message[:700]}")
            assert error["backend"] == backend and message.startswith(f"disttrain: {backend}: rank {rank} of 2: ")
            step = STEP.search(message)
            assert step and int(step.group(1)) == int(step.group(2)) == error["global_step"] == error["epoch_step"] \
                and error["epoch"] == 1 and error["global_step"] > CUT_AFTER_STEP, message
            assert len(error["peers"]) == 1 and error["peers"][0].startswith(f"rank {1 - rank} ") \
                and f"{peer}" in error["peers"][0] and "unreachable from here" in error["peers"][0], error["peers"]
            assert f"Lost peer: rank {1 - rank} " in message, message
            assert f"Next: check the network between {ADDRESSES[rank]} and {peer}" in message, message
            assert "then rerun the same command" in message, message
            assert 0 < error["time"] - cut < BOUND[backend], f"{backend} rank {rank}: {error['time'] - cut:.1f} s"
            if backend == "horovod":  # Gloo's timeout, not sooner
                assert error["time"] - cut > GLOO_TIMEOUT - 1, f"rank {rank}: {error['time'] - cut:.1f} s"
                assert f"HOROVOD_GLOO_TIMEOUT_SECONDS={GLOO_TIMEOUT} s" in message, message
        if backend == "multiworker":
            if 0 in named:
                assert "coordination service stopped hearing the heartbeats of worker 1" in \
                    json.loads((out / "error_rank0.json").read_text())["message"]
            if 1 in named:
                assert f"heartbeats to TensorFlow's coordination service (in worker 0 at {first}:" in \
                    json.loads((out / "error_rank1.json").read_text())["message"]
        else:
            assert f"Timed out waiting {GLOO_TIMEOUT * 1000}ms" in output, output[-4000:]
        print(f"{backend}: launcher ended {ended[backend] - cut:.1f} s after the cut")
        assert ended[backend] - cut < BOUND[backend] + LAUNCHER_SLACK, f"{backend}: {ended[backend] - cut:.1f} s"


# -- in-process: the backends' readings of their errors ------------------------------------------------
TASKS = _task_list({"worker": ["10.0.0.1:4000", "10.0.0.2:4001", "10.0.0.3:4002"]})


def _answers(**by_host):
    """A probe that answers per host: "down" (unreachable), "refused" or "listening"."""
    kinds = {"down": (False, False, "no answer within 2 s"), "refused": (True, False, "connection refused"),
             "listening": (True, True, "connected")}
    asked = []

    def probe(addresses, timeout=2.0):
        asked.extend(addresses)
        return [reachability.Verdict(h, p, *kinds[by_host.get(h, "refused")]) for h, p in addresses]

    probe.asked = asked
    return probe


def test_tensorflow_unhealthy_tasks_are_named_and_probed():
    err = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: Error reported from /job:worker/task:2: The following tasks are unhealthy "
        "(stopped sending heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed. Check the task logs"))
    probe = _answers(**{"10.0.0.3": "down"})
    failure = describe_tf_failure(err, rank=0, tasks=TASKS, probe=probe)
    assert probe.asked == [("10.0.0.3", 4002)]  # only the task TensorFlow named
    assert failure.summary.startswith("TensorFlow's coordination service stopped hearing the heartbeats of worker 2")
    assert failure.peers == ("rank 2 (worker 2 at 10.0.0.3:4002): 10.0.0.3:4002 is unreachable from here "
                             "(no answer within 2 s)",)
    assert failure.next_step.startswith("check the network between 10.0.0.1 and 10.0.0.3")


def test_tensorflow_heartbeat_timeout_names_the_coordination_leader():
    err = tf.errors.DeadlineExceededError(None, None, "Collective ops is aborted by: Deadline Exceeded\nRPC: "
                                                      "/tensorflow.CoordinationService/Heartbeat")
    failure = describe_tf_failure(err, rank=1, tasks=TASKS, probe=_answers(**{"10.0.0.1": "down"}))
    assert "coordination service (in worker 0 at 10.0.0.1:4000) got no answer" in failure.summary
    assert failure.peers[0].startswith("rank 0 (worker 0 at 10.0.0.1:4000): 10.0.0.1:4000 is unreachable")


def test_tensorflow_error_naming_no_peer_probes_all_and_says_unknown_when_all_answer():
    err = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed")
    probe = _answers()  # every host refuses: reachable
    failure = describe_tf_failure(err, rank=0, tasks=TASKS, probe=probe)
    assert sorted(probe.asked) == [("10.0.0.2", 4001), ("10.0.0.3", 4002)] and failure.peers == ()
    error = failures.CollectiveError(backend="multiworker", rank=0, size=3, failure=failure, phase="x", cause=err)
    assert "Lost peer: unknown (TensorFlow's error names no task and every peer's port answers a probe)" in str(error)


def test_errors_that_are_not_lost_peers_are_left_alone():
    assert describe_tf_failure(tf.errors.InvalidArgumentError(None, None, "shapes differ"), rank=0, tasks=TASKS,
                               probe=_answers()) is None
    assert describe_tf_failure(ValueError("Socket closed"), rank=0, tasks=TASKS, probe=_answers()) is None
    assert describe_horovod_failure(ValueError("bad shape"), rank=0, size=2, hosts={}, controller="Gloo",
                                    probe_port=None) is None


def test_horovod_shutdown_names_the_unreachable_host_or_the_only_other_rank():
    err = tf.errors.UnknownError(None, None, "Horovod has been shut down. This was caused by an exception")
    hosts = {0: "a", 1: "b", 2: "b", 3: "c"}
    failure = describe_horovod_failure(err, rank=0, size=4, hosts=hosts, controller="Gloo", probe_port=9,
                                       probe=_answers(b="down"))
    assert failure.peers == ("ranks 1, 2 on b: b:9 is unreachable from here (no answer within 2 s)",)
    assert failure.next_step.startswith("check the network between a and b")
    assert "HOROVOD_GLOO_TIMEOUT_SECONDS=30 s" in failure.summary
    same_host = describe_horovod_failure(err, rank=1, size=2, hosts={0: "localhost", 1: "localhost"},
                                         controller="Gloo", probe_port=9, probe=_answers())
    assert same_host.peers == ("rank 0 on localhost (the only other rank; it runs on this host, so its process "
                               "died, stopped or hung)",)
    unknown = describe_horovod_failure(err, rank=0, size=3, hosts={}, controller="MPI", probe_port=None)
    assert unknown.peers == () and "not known under mpirun" in unknown.unknown_why


def test_an_eager_collective_that_fails_raises_collective_error_located_by_the_loop():
    group = _Group(2)
    backend = ThreadRankBackend(group, 0)
    lost = tf.errors.UnavailableError(None, None, "peer gone")
    backend._all_reduce_tensor = lambda value, op: (_ for _ in ()).throw(lost)
    backend.describe_collective_failure = lambda err: (
        failures.CollectiveFailure(summary="the peer went away", peers=("rank 1 (on b)",), next_step="check b")
        if err is lost else None)
    position = failures.Position(global_step=7, epoch=2, epoch_step=3, epoch_steps=4, running=False)

    def epoch_end():
        with failures.translating(backend, phase="the training loop", position=lambda: position,
                                  resume=failures.resume_hint("runs/ckpt")):
            backend.all_reduce(1.0, "sum")

    with pytest.raises(failures.CollectiveError) as caught:
        epoch_end()
    err = caught.value
    assert isinstance(err, RuntimeError) and err.__cause__ is lost
    assert (err.backend, err.rank, err.global_step, err.epoch, err.epoch_step, err.peers) == (
        "threads", 0, 7, 2, 3, ("rank 1 (on b)",))
    assert str(err).startswith(
        "disttrain: threads: rank 0 of 2: a collective failed after global step 7 (epoch 2, step 3/4) (all_reduce(sum) "
        "called from test_an_eager_collective_that_fails_raises_collective_error_located_by_the_loop.<locals>."
        "epoch_end (test_network_faults.py)): the peer went away. Lost peer: rank 1 (on b). Next: check b; then "
        "rerun the same command: it resumes from the last checkpoint in 'runs/ckpt'."), str(err)
    other = ValueError("not a collective")
    backend._all_reduce_tensor = lambda value, op: (_ for _ in ()).throw(other)
    with pytest.raises(ValueError) as caught:
        epoch_end()
    assert caught.value is other  # anything else passes unchanged


def test_the_probe_tells_listening_refused_and_unreachable_apart():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port, closed_port = server.getsockname()[1], closed.getsockname()[1]
    closed.close()
    started = time.monotonic()
    listening, refused = reachability.probe([("127.0.0.1", port), ("127.0.0.1", closed_port)], timeout=1)
    server.close()
    assert (listening.reachable, listening.listening) == (True, True)
    assert (refused.reachable, refused.listening) == (True, False) and "nothing listens" in refused.describe()
    assert time.monotonic() - started < 2
