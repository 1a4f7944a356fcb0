"""The round-robin of new connections over a reuseport group (server/balance.py)."""

from __future__ import annotations

import collections
import socket
import struct

import grpc
import pytest

from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.server import balance

LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def _group(listeners: int, family: socket.AddressFamily = socket.AF_INET) -> list[socket.socket]:
    """``listeners`` TCP listeners sharing one loopback port with SO_REUSEPORT."""
    group: list[socket.socket] = []
    for _ in range(listeners):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            listener.bind((LOOPBACK[family], group[0].getsockname()[1] if group else 0))
        except OSError as exc:
            listener.close()
            pytest.skip(f"no {family.name} loopback here: {exc}")
        listener.listen(64)
        listener.setblocking(False)
        group.append(listener)
    return group


def _accepted(listener: socket.socket) -> int:
    """Accept (and close) every connection waiting on ``listener``; how many there were."""
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


def _attach_or_skip(port: int, listeners: int) -> int:
    try:
        return balance.spread_connections(port, listeners)
    except balance.BalanceUnavailable as exc:
        pytest.skip(f"eBPF round-robin unavailable here: {exc}")


def test_program_is_whole_instructions_ending_in_exit() -> None:
    code = balance.round_robin_instructions(map_fd=3, listeners=4)
    assert len(code) % 8 == 0
    instructions = [struct.unpack("<BBhi", code[i : i + 8]) for i in range(0, len(code), 8)]
    assert instructions[-1][0] == 0x95  # exit
    assert (0x94, 0, 0, 4) in instructions  # r0 %= 4
    with pytest.raises(ValueError, match="listeners"):
        balance.load_round_robin(0)


def test_listening_sockets_finds_listeners_on_the_port_only() -> None:
    group = _group(2)
    port = group[0].getsockname()[1]
    other = _group(1)
    client = socket.create_connection(("127.0.0.1", port))
    try:
        assert sorted(balance.listening_sockets(port)) == sorted(s.fileno() for s in group)
        assert balance.listening_sockets(other[0].getsockname()[1]) == [other[0].fileno()]
    finally:
        for s in (*group, *other, client):
            s.close()


@pytest.mark.parametrize(
    ("listeners", "family"),
    [(2, socket.AF_INET), (3, socket.AF_INET), (2, socket.AF_INET6)],
)
def test_new_connections_take_turns(listeners: int, family: socket.AddressFamily) -> None:
    group = _group(listeners, family)
    port = group[0].getsockname()[1]
    clients: list[socket.socket] = []
    try:
        # every listener of the group is this process's, so attaching once suffices
        assert _attach_or_skip(port, listeners) == listeners
        address = (LOOPBACK[family], port)
        clients = [socket.create_connection(address) for _ in range(4 * listeners)]
        assert [_accepted(listener) for listener in group] == [4] * listeners
    finally:
        for s in (*group, *clients):
            s.close()


def test_a_turn_naming_a_missing_listener_falls_back_to_the_hash() -> None:
    """Told of 3 listeners while the group holds 2 (one being replaced): no connection
    is refused or lost."""
    group = _group(2)
    port = group[0].getsockname()[1]
    clients: list[socket.socket] = []
    try:
        _attach_or_skip(port, 3)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(9)]
        counts = [_accepted(listener) for listener in group]
        assert sum(counts) == 9 and min(counts) >= 3, counts  # 3 each by turn, 3 by hash
    finally:
        for s in (*group, *clients):
            s.close()


def test_server_hands_connections_to_workers_in_turn(server) -> None:  # noqa: ANN001
    """Eight new connections to the 2-worker server: four reach each worker (with the
    kernel's hash alone, four and four happens about a quarter of the time)."""
    if "spread by the kernel's hash" in server.log():
        pytest.skip("the workers could not attach the round-robin here (no CAP_BPF)")
    channels = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8)
    ]
    try:
        workers = collections.Counter()
        for i, channel in enumerate(channels):
            request = scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(
                    card_id=f"balance-{i}", merchant_id="m-1", amount=1.0, mcc=5411
                )
            )
            response = scoring_pb2_grpc.ScoringStub(channel).Score(request, timeout=10)
            workers[server.worker_of(response.request_id)] += 1
    finally:
        for channel in channels:
            channel.close()
    assert sorted(workers.values()) == [4, 4], workers
