"""MultiWorker under mpirun (TF_CONFIG from mpi4py), and `disttrain launch -H` across two network
namespaces standing in for two hosts; every launch must match the single-device weights
(tests/workers/launch_equivalence.py: within 1e-5 relative, bitwise equal across ranks).

The two "hosts" are network namespaces joined by a veth pair with addresses of their own (10.213.0.1
and 10.213.0.2); the launcher runs in the first and reaches the second through tests/netns_ssh, an
ssh stand-in that runs the remote command in that namespace with a bare environment. Only those
addresses (and loopback) are ever used. Where namespaces cannot be created the test says why and skips.

On real hosts each machine's name resolves to its own address; the namespaces share this machine's name,
so each gets an /etc/hosts of its own (``ip netns exec`` mounts /etc/netns/<name>/hosts over /etc/hosts).
Horovod 0.28.1 needs that: its process-set Gloo contexts are built from the host name, not from
HOROVOD_GLOO_IFACE (horovod/common/gloo/gloo_context.cc, InitializeForProcessSet).
"""

import json
import os
import re
import subprocess

import numpy as np
import pytest

import netns_hosts
from launchers import BIN, WORKERS, base_env, run
from netns_hosts import NETNS_SSH
ADDRESSES = ("10.213.0.1", "10.213.0.2")
SCRIPT = WORKERS / "launch_equivalence.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-device")
    run("single", SCRIPT, ["--out", str(out)], timeout=180)
    return out


def check(case, out, reference, *, backend):
    """Two processes, one replica each: weights bitwise equal across ranks, within 1e-5 of one device."""
    infos = [json.loads((out / f"info_rank{r}.json").read_text()) for r in range(2)]
    assert [(i["backend"], i["rank"], i["size"], i["replicas"]) for i in infos] == [(backend, r, 2, 2) for r in range(2)]
    for label in ("momentum", "adam"):
        assert all(i[f"{label}_steps"] == 24 for i in infos), infos
        with np.load(reference / f"{label}_rank0.npz") as f:
            want = [f[k] for k in sorted(f.files)]
        ranks = []
        for r in range(2):
            with np.load(out / f"{label}_rank{r}.npz") as f:
                ranks.append([f[k] for k in sorted(f.files)])
        assert all(np.array_equal(a, b) for a, b in zip(*ranks)), f"{case}/{label}: ranks differ"
        for got, expected in zip(ranks[0], want):
            rel = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
            assert rel <= 1e-5, f"{case}/{label}: relative difference {rel:.2e} > 1e-5"
    return infos


def test_multiworker_under_mpirun_forms_tf_config_with_mpi4py(reference, tmp_path):
    run("multiworker-mpi", SCRIPT, ["--out", str(tmp_path)], timeout=300)
    check("multiworker-mpi", tmp_path, reference, backend="multiworker")


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces joined by a veth pair: ``{address: namespace}``."""
    with netns_hosts.two_hosts(ADDRESSES) as hosts:
        yield hosts.by_address


@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_launch_on_two_hosts_matches_one_device(backend, two_hosts, reference, tmp_path):
    first, second = ADDRESSES
    env = dict(base_env(), DISTTRAIN_TEST_NETNS=",".join(f"{a}={ns}" for a, ns in two_hosts.items()))
    cmd = ["ip", "netns", "exec", two_hosts[first], str(BIN / "disttrain"), "launch", "--backend", backend,
           "-H", f"{first}:1,{second}:1", "--ssh", str(NETNS_SSH), "--startup-timeout", "120",
           str(SCRIPT), "--backend", "auto", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    infos = check(f"{backend}-2-hosts", tmp_path, reference, backend=backend)
    # the raw commands: worker 0 runs here, worker 1 through the remote shell with its variables inline
    assert re.search(rf"worker 0 on {first}: \S+=.* {BIN / 'python'} -m disttrain.launcher.guard ", proc.stderr)
    remote = re.search(rf"worker 1 on {second}: {NETNS_SSH} {second} '(.*)'\n", proc.stderr)
    assert remote and remote.group(1).startswith(f"cd {os.getcwd()} && exec env "), proc.stderr
    if backend == "horovod":
        assert "HOROVOD_RANK=1 " in remote.group(1) and f"--iface-for {second}" in remote.group(1)
        assert all(i["controllers"] == {"gloo": True, "mpi": False} for i in infos), infos
    else:
        assert f'"worker": ["{first}:' in remote.group(1) and f'"{second}:' in remote.group(1)
