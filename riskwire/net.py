"""Loopback helpers shared by the benchmarks, the demo and the tests."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now and that this process has not handed out.

    The kernel may give the same ephemeral port to two probes in a row (the first probe
    is closed by then), so two listeners asked for at once could collide; remembering
    the ports handed out rules that out.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
