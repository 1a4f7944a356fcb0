"""grpc's per-call scopes replaced by lighter ones (server/grpc/call_scopes.py).

A real in-process grpc server with the replacements installed must behave as grpc does:
answers, aborts, handler errors, status set without abort, trailing metadata, streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from grpc import _observability

from riskwire.server.grpc import call_scopes


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _abort(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused")
    return b""


def _raise(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise RuntimeError("handler bug")


def _status_only(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-why", "absent"),))
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("nothing here")
    return b""


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    assert call_scopes.install()
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Abort": grpc.unary_unary_rpc_method_handler(_abort),
        "Raise": grpc.unary_unary_rpc_method_handler(_raise),
        "StatusOnly": grpc.unary_unary_rpc_method_handler(_status_only),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as open_channel:
        yield open_channel
    server.stop(None)


def test_installed_once_in_place_of_grpcs_own() -> None:
    assert call_scopes.install() and call_scopes.install()
    assert grpc._create_servicer_context is call_scopes.ServicerContextScope
    with _observability.get_plugin() as plugin:
        assert plugin is _observability._OBSERVABILITY_PLUGIN


def test_calls_answer_as_grpc_does(channel: grpc.Channel) -> None:
    assert channel.unary_unary("/t.T/Echo")(b"hello") == b"hello"
    assert list(channel.unary_stream("/t.T/Count")(b"3")) == [b"0", b"1", b"2"]


def test_abort_error_and_status_reach_the_client(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as aborted:
        channel.unary_unary("/t.T/Abort")(b"")
    assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert aborted.value.details() == "refused"
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/t.T/Raise")(b"")
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError) as not_found:
        channel.unary_unary("/t.T/StatusOnly")(b"")
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert not_found.value.details() == "nothing here"
    assert ("x-why", "absent") in tuple(not_found.value.trailing_metadata())
    assert channel.unary_unary("/t.T/Echo")(b"still serving") == b"still serving"


def test_latency_recorded_only_with_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert call_scopes.install()
    recorded = []
    plugin = SimpleNamespace(  # tracing off: a call elsewhere meanwhile records nothing
        stats_enabled=True, tracing_enabled=False, observability_enabled=True,
        record_rpc_latency=lambda *args: recorded.append(args),
    )  # fmt: skip
    state = SimpleNamespace(
        method="/t.T/Echo", target="here", rpc_start_time=1.0, rpc_end_time=1.5, code="OK"
    )
    _observability.maybe_record_rpc_latency(None)  # no plugin: returns before reading state
    monkeypatch.setattr(_observability, "_OBSERVABILITY_PLUGIN", plugin)
    with _observability.get_plugin() as found:
        assert found is plugin
    _observability.maybe_record_rpc_latency(state)
    assert recorded == [("/t.T/Echo", "here", 500.0, "OK")]
