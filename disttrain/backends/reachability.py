"""A quick TCP probe of peers' addresses: after a collective failed, is a peer's host reachable from here?

One ``connect`` per address, all at once, each bounded by ``timeout`` seconds. What the answer tells:

  * connected: the host is reachable and a process listens on the port (the peer's own server, e.g. its
    TensorFlow gRPC port: the process is alive, though it may be stopped or hung);
  * refused: the host is reachable but nothing listens on the port (for a peer's own port: it has died);
  * no route, network unreachable, or no answer within the timeout: the host is unreachable from here
    (a network partition, a host that went down, or a firewall that drops the probe).
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import threading
import time
from typing import Sequence

#: Seconds one probe may take.
PROBE_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one probe of ``host:port`` found.

    Attributes:
      host, port: The address probed.
      reachable: The host answered (a connection or a refusal).
      listening: A process accepted the connection.
      detail: How it ended, e.g. ``"no answer within 2 s"`` or ``"Network is unreachable"``.
    """

    host: str
    port: int
    reachable: bool
    listening: bool
    detail: str

    def describe(self) -> str:
        if self.listening:
            return (f"{self.host}:{self.port} still accepts connections (its process is alive: stopped, hung or "
                    "overloaded, or the network is back)")
        if self.reachable:
            return f"{self.host} answers, but nothing listens on port {self.port}"
        return f"{self.host}:{self.port} is unreachable from here ({self.detail})"


def _probe(host: str, port: int, timeout: float) -> Verdict:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Verdict(host, port, True, True, "connected")
    except ConnectionRefusedError:
        return Verdict(host, port, True, False, "connection refused")
    except (socket.timeout, TimeoutError):
        return Verdict(host, port, False, False, f"no answer within {timeout:g} s")
    except socket.gaierror as err:
        return Verdict(host, port, False, False, f"host name not resolved: {err.strerror or err}")
    except OSError as err:
        if err.errno == errno.ECONNRESET:
            return Verdict(host, port, True, False, "connection reset")
        took = time.monotonic() - started
        return Verdict(host, port, False, False, f"{err.strerror or err} after {took:.1f} s")


def probe(addresses: Sequence[tuple[str, int]], *, timeout: float = PROBE_TIMEOUT) -> list[Verdict]:
    """Probes every ``(host, port)`` at once; returns one :class:`Verdict` each, in order, within about
    ``timeout`` seconds."""
    verdicts: list[Verdict | None] = [None] * len(addresses)

    def run(i: int, host: str, port: int) -> None:
        verdicts[i] = _probe(host, port, timeout)

    threads = [threading.Thread(target=run, args=(i, h, p), daemon=True, name="disttrain-probe")
               for i, (h, p) in enumerate(addresses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)
    return [v if v is not None else Verdict(h, p, False, False, f"no answer within {timeout:g} s")
            for v, (h, p) in zip(verdicts, addresses)]
