"""Host lists for ``disttrain launch``: ``-H host1:2,host2:2``, host files, SLURM node lists, local checks.

Nothing here imports TensorFlow or Horovod: the launcher runs before either is needed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import re
import socket
import struct
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Host:
    """A machine and how many workers (slots) it runs."""

    name: str
    slots: int


@dataclasses.dataclass(frozen=True)
class Slot:
    """One worker's place in the run, with Horovod's vocabulary (rank, local and cross rank/size)."""

    rank: int
    size: int
    host: str
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


def parse_hosts(text: str) -> list[Host]:
    """Parses ``host1:2,host2:2`` (a host without ``:N`` has one slot), as horovodrun's ``-H``.

    Raises:
      ValueError: For an empty list, an empty host name or a slot count that is not a positive integer.
    """
    hosts = []
    for item in [part.strip() for part in text.split(",")]:
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        if not name or not re.fullmatch(r"[1-9][0-9]*", slots):
            raise ValueError(f"bad host {item!r} in {text!r}; write host:slots, e.g. host1:2,host2:2")
        hosts.append(Host(name, int(slots)))
    return _unique(hosts, text)


def read_hostfile(path: str) -> list[Host]:
    """Reads a host file: one host per line as ``host slots=N`` (mpirun, horovodrun) or ``host:N``.

    Blank lines and ``#`` comments are skipped.

    Raises:
      ValueError: For a line that is neither form (quoting the file, line and text).
      OSError: If the file cannot be read.
    """
    hosts = []
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"(\S+?)(?::([1-9][0-9]*)|\s+slots\s*=\s*([1-9][0-9]*))?", line)
            if not match:
                raise ValueError(f"{path}:{number}: cannot read {raw.strip()!r}; write 'host slots=N' or 'host:N'")
            hosts.append(Host(match.group(1), int(match.group(2) or match.group(3) or 1)))
    if not hosts:
        raise ValueError(f"host file {path} lists no hosts; write one 'host slots=N' line per host")
    return _unique(hosts, path)


def _unique(hosts: list[Host], where: str) -> list[Host]:
    names = [h.name for h in hosts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"host {repeated[0]!r} appears twice in {where!r}; give each host once with its slot count")
    return hosts


def assign_slots(hosts: Sequence[Host], *, num_workers: int) -> list[Slot]:
    """Fills the hosts in order (all slots of the first host, then the next), as horovodrun does.

    Raises:
      ValueError: If the hosts have fewer slots than ``num_workers``.
    """
    total = sum(h.slots for h in hosts)
    if num_workers > total:
        raise ValueError(f"{num_workers} workers do not fit on {total} slots "
                         f"({', '.join(f'{h.name}:{h.slots}' for h in hosts)}); add hosts or slots, or use -n {total}")
    placed: list[tuple[str, int]] = []
    for host in hosts:
        for local in range(host.slots):
            if len(placed) < num_workers:
                placed.append((host.name, local))
    slots = []
    for rank, (name, local) in enumerate(placed):
        peers = [n for n, lr in placed if lr == local]  # hosts with a worker of this local rank, in order
        slots.append(Slot(rank=rank, size=num_workers, host=name, local_rank=local,
                          local_size=sum(1 for n, _ in placed if n == name),
                          cross_rank=peers.index(name), cross_size=len(peers)))
    return slots


def expand_hostlist(text: str) -> list[str]:
    """Expands a SLURM host list such as ``node[01-03,7],gpu-a[1-2]x`` into host names.

    The same result as ``scontrol show hostnames``, for machines without SLURM's tools.

    Raises:
      ValueError: For unbalanced brackets or a bad range.
    """
    names: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
        if item.count("[") != item.count("]"):
            raise ValueError(f"unbalanced brackets in SLURM host list {text!r}")
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = [literal + value for value in _expand_ranges(ranges, text)]
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        names.extend(expanded)
    return names


def _expand_ranges(ranges: str, text: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"bad range {part!r} in SLURM host list {text!r}")
        width = len(low)
        values.extend(str(i).zfill(width) for i in range(int(low), int(high or low) + 1))
    return values


def expand_counts(text: str) -> list[int]:
    """Expands SLURM's per-node task counts, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``.

    Raises:
      ValueError: For text in another form.
    """
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]+)(?:\(x([0-9]+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot read SLURM task counts {text!r}; expected e.g. '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def local_addresses() -> set[str]:
    """The IPv4 addresses of this machine's interfaces (and of its host name), plus ``localhost``."""
    found = {"localhost", "127.0.0.1", socket.gethostname()}
    for _, name in socket.if_nameindex():
        address = interface_address(name)
        if address:
            found.add(address)
    try:
        found.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return found


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (Linux ioctl SIOCGIFADDR), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(address: str) -> str | None:
    """The name of the local interface that holds ``address`` (e.g. ``eth0``), or None."""
    try:
        address = socket.gethostbyname(address)
    except OSError:
        return None
    if ipaddress.ip_address(address).is_loopback:
        return "lo"
    return next((name for _, name in socket.if_nameindex() if interface_address(name) == address), None)


def is_local(host: str) -> bool:
    """True if ``host`` names this machine (no ssh needed to start a worker there)."""
    if host in local_addresses():
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    return ipaddress.ip_address(address).is_loopback or address in local_addresses()


def route_address(host: str) -> str:
    """This machine's address on the route to ``host``: where workers there can reach the launcher."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # UDP: no packet is sent
        return s.getsockname()[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on this machine right now."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports
