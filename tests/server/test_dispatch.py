"""Polling-thread dispatch (server/grpc/dispatch.py) on a real in-process grpc server.

Handlers answer with the name of the thread they ran on, so each test sees which path
a call took: grpc's polling thread (inline) or the thread pool (``pool-*``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from riskwire.server.grpc import dispatch

LIMIT = 1024
POOL_PREFIX = "pool"
MAX_CALLS = 16


def _thread_name(request: bytes, context: grpc.ServicerContext) -> bytes:
    return threading.current_thread().name.encode()


def _abort(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused inline")
    return b""


def _raise(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise RuntimeError("handler bug")


def _trailers(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-path", threading.current_thread().name),))
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("nothing here")
    return b""


RELEASE = threading.Event()


def _blocked(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"released" if RELEASE.wait(10) else b"never released"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


INLINE = {
    "/t.T/Echo": _echo,
    "/t.T/Name": _thread_name,
    "/t.T/Abort": _abort,
    "/t.T/Raise": _raise,
    "/t.T/Trailers": _trailers,
}
POOLED = {"/t.T/PoolName": _thread_name, "/t.T/Blocked": _blocked}


def _strict_deserializer(request: bytes) -> bytes:
    if request.startswith(b"bad"):
        raise ValueError("undecodable")
    return request


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._handlers = {
            path: grpc.unary_unary_rpc_method_handler(
                dispatch.inline(_copy(function)), request_deserializer=_strict_deserializer
            )
            for path, function in INLINE.items()
        }
        self._handlers.update(
            (path, grpc.unary_unary_rpc_method_handler(function))
            for path, function in POOLED.items()
        )

    def service(self, handler_call_details):  # noqa: ANN001, ANN201
        return self._handlers.get(handler_call_details.method)


def _copy(function):  # noqa: ANN001, ANN202 - mark a wrapper, not the shared function
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        return function(request, context)

    return call


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """A served address: a pool of 4 threads, at most MAX_CALLS calls at once."""
    assert dispatch.install()
    dispatch.configure(LIMIT)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=POOL_PREFIX),
        maximum_concurrent_rpcs=MAX_CALLS,
    )
    server.add_generic_rpc_handlers((_Handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
        dispatch.configure(0)


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as channel:
        yield channel


def _call(channel: grpc.Channel, path: str, request: bytes = b"x", timeout_s: float = 10) -> bytes:
    return channel.unary_unary(path)(request, timeout=timeout_s)


def test_small_marked_calls_run_on_the_polling_thread(channel: grpc.Channel) -> None:
    names = {_call(channel, "/t.T/Name").decode() for _ in range(20)}
    assert len(names) == 1
    assert not names.pop().startswith(POOL_PREFIX)


def test_concurrent_calls_each_get_their_own_message(target: str) -> None:
    """Many connections at once, small and large requests: every answer is its own
    request's (a receive operation shared between calls would mix them up)."""

    def client(index: int) -> list[tuple[bytes, bytes]]:
        with grpc.insecure_channel(target) as own:
            echo = own.unary_unary("/t.T/Echo")
            sent = [f"{index}-{i}-".encode() * (1 + (i % 3) * LIMIT // 8) for i in range(150)]
            return [(body, echo(body, timeout=10)) for body in sent]

    with futures.ThreadPoolExecutor(8) as pool:
        pairs = [pair for result in pool.map(client, range(8)) for pair in result]
    assert len(pairs) == 8 * 150
    assert all(sent == answer for sent, answer in pairs)


def test_large_requests_and_unmarked_handlers_use_the_pool(channel: grpc.Channel) -> None:
    assert _call(channel, "/t.T/Name", b"x" * (LIMIT + 1)).decode().startswith(POOL_PREFIX)
    assert _call(channel, "/t.T/Name", b"x" * LIMIT).decode().startswith(POOL_PREFIX) is False
    assert _call(channel, "/t.T/PoolName").decode().startswith(POOL_PREFIX)


def test_limit_zero_sends_every_call_to_the_pool(channel: grpc.Channel) -> None:
    dispatch.configure(0)
    try:
        assert _call(channel, "/t.T/Name").decode().startswith(POOL_PREFIX)
    finally:
        dispatch.configure(LIMIT)


def test_abort_error_and_status_behave_as_in_the_pool(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as aborted:
        _call(channel, "/t.T/Abort")
    assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert aborted.value.details() == "refused inline"
    with pytest.raises(grpc.RpcError) as raised:
        _call(channel, "/t.T/Raise")
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError) as status:
        _call(channel, "/t.T/Trailers")
    assert status.value.code() == grpc.StatusCode.NOT_FOUND
    assert status.value.details() == "nothing here"
    trailers = dict(status.value.trailing_metadata())
    assert not trailers["x-path"].startswith(POOL_PREFIX)
    assert _call(channel, "/t.T/Name")  # still serving


def test_an_undecodable_request_fails_alone(channel: grpc.Channel) -> None:
    """grpc answers INTERNAL; the polling thread goes straight on to the next call."""
    with pytest.raises(grpc.RpcError) as bad:
        _call(channel, "/t.T/Echo", b"bad request")
    assert bad.value.code() == grpc.StatusCode.INTERNAL
    assert _call(channel, "/t.T/Echo", b"next", timeout_s=2) == b"next"


def test_inline_calls_release_their_concurrency_slot(channel: grpc.Channel) -> None:
    """A slot never given back would refuse calls once MAX_CALLS had been made."""
    for _ in range(4 * MAX_CALLS):
        assert _call(channel, "/t.T/Name")
    assert dispatch.pending() == 0


def test_inline_calls_are_served_while_a_pool_call_blocks(channel: grpc.Channel) -> None:
    """The pooled call is released only after the inline call has been answered."""
    RELEASE.clear()
    blocked = channel.unary_unary("/t.T/Blocked").future(b"", timeout=20)
    try:
        assert not _call(channel, "/t.T/Name").decode().startswith(POOL_PREFIX)
    finally:
        RELEASE.set()
    assert blocked.result() == b"released"


def test_install_is_idempotent() -> None:
    assert dispatch.install()
    assert dispatch.install()


def test_a_call_without_a_request_message_is_unimplemented(channel: grpc.Channel) -> None:
    """A client that half-closes without a message gets grpc's own answer, from the
    pool (the polling thread never waits for the close event)."""
    with pytest.raises(grpc.RpcError) as empty:
        channel.stream_unary("/t.T/Name")(iter(()), timeout=10)
    assert empty.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _call(channel, "/t.T/Name")


def test_workers_with_redis_card_state_keep_every_call_in_the_pool(
    channel: grpc.Channel,
) -> None:
    """A scoring call that waits on Redis must not hold up the polling thread."""
    from riskwire.server.config import Settings
    from riskwire.server.worker import polling_thread_dispatch

    try:
        polling_thread_dispatch(Settings(state_backend="redis"))
        assert _call(channel, "/t.T/Name").decode().startswith(POOL_PREFIX)
        polling_thread_dispatch(Settings())
        assert not _call(channel, "/t.T/Name").decode().startswith(POOL_PREFIX)
    finally:
        dispatch.configure(LIMIT)


def test_call_done_runs_each_callback_once_whoever_comes_first() -> None:
    """grpc adds its callback while the call may already be finishing on a pool thread:
    added before or after set_result, each callback runs exactly once."""
    early, late = [], []
    done = dispatch.CallDone()
    done.add_done_callback(early.append)
    assert not done.done() and early == []
    done.set_result(None)
    done.add_done_callback(late.append)
    assert done.done() and early == [done] and late == [done]
    for _ in range(200):  # the race itself
        calls: list[dispatch.CallDone] = []
        racing = dispatch.CallDone()
        setter = threading.Thread(target=racing.set_result, args=(None,))
        setter.start()
        racing.add_done_callback(calls.append)
        setter.join()
        assert calls == [racing]
