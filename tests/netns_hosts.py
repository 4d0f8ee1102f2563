"""Two network namespaces joined by a veth pair, standing in for two hosts (tests/test_multihost.py,
tests/test_network_faults.py).

Each namespace gets an address of its own and an /etc/hosts of its own (``ip netns exec`` mounts
/etc/netns/<name>/hosts over /etc/hosts), in which this machine's name resolves to that address, as it
would on a real host. The launcher runs in the first and reaches the second through tests/netns_ssh, an
ssh stand-in. Only these addresses (and loopback) are ever used. Where namespaces cannot be created the
caller skips, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from launchers import ROOT

NETNS_SSH = ROOT / "tests" / "netns_ssh"


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@dataclasses.dataclass(frozen=True)
class Hosts:
    """``spaces[i]`` holds ``addresses[i]`` on its end ``links[i]`` of the veth pair."""

    addresses: tuple[str, str]
    spaces: tuple[str, str]
    links: tuple[str, str]

    @property
    def by_address(self) -> dict[str, str]:
        return dict(zip(self.addresses, self.spaces))

    def netns_env(self) -> str:
        """The value of DISTTRAIN_TEST_NETNS that tells tests/netns_ssh which namespace holds which address."""
        return ",".join(f"{a}={ns}" for a, ns in zip(self.addresses, self.spaces))

    def set_link(self, state: str) -> None:
        """Takes the first namespace's end of the link ``down`` (a network partition) or ``up``."""
        result = ip("-n", self.spaces[0], "link", "set", self.links[0], state)
        assert result.returncode == 0, f"ip link set {state}: {result.stderr}"


@contextlib.contextmanager
def two_hosts(addresses: tuple[str, str]) -> Iterator[Hosts]:
    """Creates the two namespaces (removed afterwards); skips the test where that is not possible."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed; scripts/setup.sh installs it")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:6]
    spaces = tuple(f"dt{tag}{side}" for side in "ab")
    links = tuple(f"dtv{tag}{side}" for side in "ab")
    created, made_etc = [], not Path("/etc/netns").exists()
    try:
        for ns, address in zip(spaces, addresses):
            result = ip("netns", "add", ns)
            if result.returncode != 0:
                pytest.skip(f"network namespaces are not permitted here: ip netns add: {result.stderr.strip()}")
            created.append(ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n")
        steps = [("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for ns, link, address in zip(spaces, links, addresses):
            steps += [("link", "set", link, "netns", ns), ("-n", ns, "addr", "add", f"{address}/24", "dev", link),
                      ("-n", ns, "link", "set", link, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot build the two-namespace network: ip {' '.join(step)}: {result.stderr.strip()}")
        yield Hosts(addresses=tuple(addresses), spaces=spaces, links=links)
    finally:
        for ns in created:
            ip("netns", "del", ns)  # also removes the veth pair
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        if made_etc and Path("/etc/netns").exists() and not any(Path("/etc/netns").iterdir()):
            Path("/etc/netns").rmdir()
