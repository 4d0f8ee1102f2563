"""Communication threads at SCHED_IDLE (disttrain/backends/thread_priority.py); a real Horovod launch's
threads are checked in tests/test_collectives.py."""

import os
import threading

import pytest

from disttrain.backends import thread_priority as tp


def _thread(name: str | None = None):
    """Starts a thread that waits; returns (its native id, the event that ends it, the thread)."""
    ready, stop = threading.Event(), threading.Event()
    box = {}

    def body():
        box["tid"] = threading.get_native_id()
        if name:  # the kernel's name, what /proc/self/task/<tid>/comm shows (TensorFlow names its pools so)
            with open(f"/proc/self/task/{box['tid']}/comm", "w") as f:
                f.write(name)
        ready.set()
        stop.wait(30)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    ready.wait(10)
    return box["tid"], stop, thread


def test_started_threads_finds_the_threads_started_inside_and_skips_tensorflow_pools():
    old, stop_old, _ = _thread()
    with tp.started_threads() as started:
        new, stop_new, _ = _thread()
        pool, stop_pool, _ = _thread("tf_Compute")
    try:
        assert started == [new], (started, old, pool)
        assert threading.get_native_id() not in started
    finally:
        for stop in (stop_old, stop_new, stop_pool):
            stop.set()


def test_set_idle_gives_the_thread_sched_idle_and_leaves_the_caller_alone():
    tid, stop, thread = _thread()
    try:
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        assert tp.set_idle([tid]) == []
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        stop.set()
        thread.join(10)
    assert tp.set_idle([tid]) == []  # a thread that ended meanwhile is no error


def test_set_idle_reports_what_the_kernel_refused():
    def refuse(tid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    assert tp.set_idle([123, 456], setscheduler=refuse) == [
        "thread 123: [Errno 1] Operation not permitted", "thread 456: [Errno 1] Operation not permitted"]


def test_resolve_reads_the_argument_then_the_environment():
    assert tp.resolve(None, environ={}) == "auto"
    assert tp.resolve(None, environ={tp.PRIORITY_ENV: "normal"}) == "normal"
    assert tp.resolve("idle", environ={tp.PRIORITY_ENV: "normal"}) == "idle"
    with pytest.raises(ValueError, match=r"DISTTRAIN_COMM_PRIORITY='low' is not a communication priority; "
                                         r"use one of auto, normal, idle"):
        tp.resolve(None, environ={tp.PRIORITY_ENV: "low"})
    with pytest.raises(ValueError, match=r"communication_priority='high'"):
        tp.resolve("high", environ={})


@pytest.mark.parametrize("num_gpus,size,local_size,gloo,idle", [
    (0, 2, 2, True, True),     # every Gloo rank on this CPU-only host: the transfer is CPU work on the same cores
    (0, 4, 2, True, False),    # ranks on other hosts: a NIC can move bytes while the cores compute
    (1, 2, 2, True, False),    # a GPU computes; the cores are free for Horovod
    (0, 1, 1, True, False),    # one rank: nothing to communicate
    (0, 2, 2, False, False),   # the MPI controller (mpirun): measured slower at idle
])
def test_auto_is_idle_only_for_gloo_cpu_ranks_all_on_one_host(num_gpus, size, local_size, gloo, idle):
    assert tp.auto_idle(num_gpus=num_gpus, size=size, local_size=local_size, gloo=gloo) is idle


#: What horovodrun --gloo gives each of 2 ranks on one host (and ``disttrain launch --backend horovod``).
GLOO_ONE_HOST = {"HOROVOD_SIZE": "2", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CONTROLLER": "gloo"}
GLOO_TWO_HOSTS = {"HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CONTROLLER": "gloo"}


@pytest.mark.parametrize("environ,num_gpus,idle", [
    (GLOO_ONE_HOST, 0, True),
    (GLOO_TWO_HOSTS, 0, False),
    (GLOO_ONE_HOST, 1, False),  # a GPU
    ({"HOROVOD_SIZE": "2", "HOROVOD_LOCAL_SIZE": "2"}, 0, False),  # no Gloo controller named
    ({"OMPI_COMM_WORLD_SIZE": "2"}, 0, False),                      # mpirun: nothing to read before init
    ({"HOROVOD_SIZE": "two", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CONTROLLER": "gloo"}, 0, False),
])
def test_auto_idle_before_init_reads_what_horovodrun_gives_each_rank(environ, num_gpus, idle):
    assert tp.auto_idle_before_init(num_gpus=num_gpus, environ=environ) is idle


def _fake_horovod(monkeypatch, environ: dict[str, str]):
    """Prepares a HorovodBackend on a fake hvd (CPU only, 2 ranks on this host) in this environment.

    Returns:
      ``(the horovod backend module, seen)``: after each ``HorovodBackend()``, ``seen["cycle"]`` is the
      HOROVOD_CYCLE_TIME its ``hvd.init()`` read (None: unset).
    """
    import types

    import tensorflow as tf

    from disttrain.backends import horovod

    seen = {}
    fake = types.SimpleNamespace(
        init=lambda: seen.update(cycle=os.environ.get("HOROVOD_CYCLE_TIME")), is_initialized=lambda: False,
        rank=lambda: 0, local_rank=lambda: 0, size=lambda: 2, local_size=lambda: 2, gloo_enabled=lambda: 1,
        Sum=0, Max=1, Min=2)
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "unset")  # restored (deleted) when the test ends
    monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    for name, value in {"HOROVOD_RANK": "0", **environ}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(horovod, "import_horovod", lambda: fake)
    monkeypatch.setattr(horovod, "wait_for_horovod_peers", lambda timeout: None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    return horovod, seen


def test_idle_threads_get_the_shorter_cycle_unless_one_was_set(monkeypatch):
    horovod, seen = _fake_horovod(monkeypatch, GLOO_ONE_HOST)
    backend = horovod.HorovodBackend()
    assert backend.communication_priority == "idle" and seen["cycle"] == str(tp.IDLE_CYCLE_TIME_MS)
    horovod.HorovodBackend(cycle_time_ms=2)
    assert seen["cycle"] == "2.0"  # the argument wins
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "3")  # as horovodrun --cycle-time-ms 3 sets it
    horovod.HorovodBackend()
    assert seen["cycle"] == "3"


@pytest.mark.parametrize("environ,priority", [
    (GLOO_ONE_HOST, "normal"),                                                          # asked for normal
    (GLOO_TWO_HOSTS, None),
    ({}, None),                                                                           # mpirun
])
def test_threads_at_normal_priority_keep_horovods_cycle(monkeypatch, environ, priority):
    horovod, seen = _fake_horovod(monkeypatch, environ)
    horovod.HorovodBackend(communication_priority=priority)
    assert seen["cycle"] is None
