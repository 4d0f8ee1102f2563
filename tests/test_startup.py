"""Start-up never hangs silently: a missing peer is named within the start-up timeout, SIGTERM ends the
wait at once, and Horovod without a launcher says it runs one process. Real processes, real signals."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

from launchers import BIN, WORKERS, _kill_tree, base_env
from disttrain.launcher.hosts import free_ports

SCRIPT = WORKERS / "startup.py"


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_multiworker_names_the_worker_that_never_started():
    ports = free_ports(2)
    env = dict(base_env(), TF_CONFIG=tf_config(ports, 0), DISTTRAIN_STARTUP_TIMEOUT="3")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", "multiworker"], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert (f"TimeoutError: MultiWorker start-up: worker 0 (localhost:{ports[0]}) waited 3s for its peers; missing: "
            f"worker 1 at localhost:{ports[1]} (not started: nothing listens there). Start every worker listed in "
            "TF_CONFIG, or raise the limit with DISTTRAIN_STARTUP_TIMEOUT=<seconds>") in proc.stderr


def test_multiworker_waiting_for_a_peer_ends_at_once_on_sigterm():
    ports = free_ports(2)
    env = dict(base_env(), TF_CONFIG=tf_config(ports, 1))  # default timeout: 300 s
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--backend", "multiworker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not listening(ports[1]):  # it waits on its own port once TensorFlow is imported
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "disttrain: SIGTERM while worker 1 waited for its MultiWorker peers; exiting" in err


def test_horovod_names_the_rank_that_never_arrived_and_the_launcher_stops_the_rest():
    cmd = [str(BIN / "disttrain"), "launch", "--backend", "horovod", "-n", "2", "--startup-timeout", "3",
           str(SCRIPT), "--backend", "horovod", "--late-rank", "1"]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    server = re.search(r"HOROVOD_GLOO_RENDEZVOUS_ADDR=(\S+) HOROVOD_GLOO_RENDEZVOUS_PORT=(\d+)", proc.stderr)
    assert (f"TimeoutError: Horovod start-up: rank 0 waited 3s; rank(s) 1 of 2 did not reach the rendezvous server at "
            f"{server.group(1)}:{server.group(2)}") in proc.stderr
    assert "disttrain launch: worker 0 on localhost failed with exit code 1; stopping the other workers" in proc.stderr


def test_horovod_under_plain_python_warns_that_it_runs_one_process():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", "horovod"], env=base_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert ("disttrain: warning: the horovod backend was started without horovodrun, mpirun or `disttrain launch "
            "--backend horovod`, so it runs ONE process (rank 0 of 1)") in proc.stderr
    assert "ready horovod rank 0 of 1" in proc.stdout
