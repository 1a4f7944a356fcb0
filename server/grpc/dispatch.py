"""Polling-thread dispatch: small unary calls run where grpc received them.

grpcio's synchronous server hands every call from its polling thread to the thread
pool, and the pool thread then asks the polling thread for the request message and
waits for it: two cross-thread wake-ups per call, each a context switch and a GIL
hand-off. For a scoring call whose own work is tens of microseconds, those hops cost
more than the work (measured with ``perf stat``: ~10 context switches per call).

With :func:`install`, a unary-unary handler marked with :func:`inline` is served
differently: the polling thread asks for the request message at once, and when it
arrives — and its serialised size is at most the configured limit — runs the handler
right there, with grpc's own ``_unary_response_in_pool`` (the same deadline, abort,
error, serialisation and status path as the pool). A larger request (a big
``ScoreBatch``), or any call while the limit is 0, goes to the thread pool as before,
so a long batch never holds up the polling thread.

Only handlers that never block may be marked: they run one at a time on the thread
that also reads every connection of this worker process. A worker is pinned to one
core and its handlers hold the GIL anyway, so serving them in turn loses no
parallelism. The Redis card-state backend (a network round trip per call) turns this
off (see ``server/worker.py``).

This replaces one private function of ``grpc._server``; :func:`install` checks that the
names it relies on exist and otherwise leaves grpc untouched (calls then use the pool).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

log = logging.getLogger(__name__)

INLINE_ATTRIBUTE = "riskwire_inline"
_GRPC_NAMES = (
    "_handle_unary_unary",
    "_receive_message",
    "_unary_response_in_pool",
    "_is_rpc_state_active",
    "_serialized_request",
    "_abort",
    "_CLOSED",
    "_EMPTY_FLAGS",
    "_RECEIVE_MESSAGE_TOKEN",
    "_RECEIVE_CLOSE_ON_SERVER_TOKEN",
)
CLOSE_WAIT_S = 5.0  # a message-less call: how long a pool thread waits to learn why
Handler = TypeVar("Handler", bound=Callable[..., Any])

_max_request_bytes = 0
_installed = False
_install_lock = threading.Lock()
_waiting = 0  # calls whose request message the polling thread has yet to handle


def inline(handler: Handler) -> Handler:
    """Mark a unary handler as safe to run on grpc's polling thread: short, CPU-bound,
    never waiting on another call or on the network."""
    setattr(handler, INLINE_ATTRIBUTE, True)
    return handler


def configure(max_request_bytes: int) -> None:
    """Run marked handlers on the polling thread for requests up to this many bytes
    (0: every call goes to the thread pool)."""
    global _max_request_bytes
    _max_request_bytes = max(0, int(max_request_bytes))


def pending() -> int:
    """Calls taken by polling-thread dispatch whose request message has not been handled
    yet: the polling thread's own backlog, for admission control. (Only the polling
    thread changes the count, so a plain integer is exact.)"""
    return _waiting


def install() -> bool:
    """Patch grpc's synchronous server once per process; False when this grpcio lacks
    a name the patch needs (then nothing is changed)."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        from grpc import _server

        missing = [name for name in _GRPC_NAMES if not hasattr(_server, name)]
        if missing:
            log.warning("polling-thread dispatch off: grpc._server lacks %s", ", ".join(missing))
            return False
        _server._handle_unary_unary = _dispatching(_server, _server._handle_unary_unary)
        _installed = True
        return True


class CallDone:
    """The one thing grpc's server does with the future a method handler returns: call
    ``add_done_callback`` (to count the call finished). A ``concurrent.futures.Future``
    builds a Condition for it and notifies it when set, ~2 µs a call; this needs a
    plain lock only because the call may finish on a pool thread while grpc adds its
    callback."""

    __slots__ = ("_lock", "_callbacks", "_done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[CallDone], object]] = []
        self._done = False

    def add_done_callback(self, callback: Callable[[CallDone], object]) -> None:
        """Call ``callback`` when the call is done (now, if it is)."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def set_result(self, result: object) -> None:
        """The call is done: run the callbacks (``result`` is ignored, as grpc's is)."""
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def done(self) -> bool:
        """Whether the call has finished."""
        return self._done


def _dispatching(server: Any, pooled: Callable[..., futures.Future]) -> Callable[..., Any]:
    """grpc's ``_handle_unary_unary`` with the polling-thread path in front of it."""
    from grpc._cython import cygrpc

    receive_message = cygrpc.ReceiveMessageOperation
    no_flags = server._EMPTY_FLAGS

    def handle_unary_unary(rpc_event, state, method_handler, thread_pool):  # noqa: ANN001, ANN202
        behavior = method_handler.unary_unary
        if not _max_request_bytes or not getattr(behavior, INLINE_ATTRIBUTE, False):
            return pooled(rpc_event, state, method_handler, thread_pool)
        done = CallDone()  # grpc counts the call active until it is set
        if not server._is_rpc_state_active(state):
            done.set_result(None)
            return done
        deserializer = method_handler.request_deserializer
        receive = server._receive_message(state, rpc_event.call, deserializer)

        def take_request() -> Any:
            # What grpc's own unary_request returns once the message event is handled.
            with state.condition:
                request = state.request
                if request is not None:
                    state.request = None
                    return request
                if not server._is_rpc_state_active(state):
                    return None  # cancelled, or aborted: the request did not deserialise
                # No message: a cancelled call (its deadline passed, the client left)
                # or a client that half-closed without one. Only the close event tells
                # which; it follows soon (this runs on a pool thread, see on_message).
                state.condition.wait_for(
                    lambda: server._RECEIVE_CLOSE_ON_SERVER_TOKEN not in state.due, CLOSE_WAIT_S
                )
                if state.client is server._CLOSED:
                    server._abort(
                        state,
                        rpc_event.call,
                        cygrpc.StatusCode.unimplemented,
                        b"a unary call requires exactly one request message",
                    )
                return None

        def respond() -> None:
            try:
                state.context.run(
                    server._unary_response_in_pool, rpc_event, state, behavior, take_request,
                    deserializer, method_handler.response_serializer,
                )  # fmt: skip
            finally:
                done.set_result(None)

        def on_message(event):  # noqa: ANN001, ANN202 - runs on the polling thread
            global _waiting
            _waiting -= 1
            message = server._serialized_request(event)
            finished, callbacks = receive(event)
            if message is None or len(message) > _max_request_bytes:
                try:
                    thread_pool.submit(respond)  # big, or no message: see take_request
                    return finished, callbacks
                except RuntimeError:  # the pool is shut down (server stopping): answer here
                    pass
            return finished, (*callbacks, respond)

        global _waiting
        _waiting += 1
        # A new operation per call: it holds the message it receives.
        rpc_event.call.start_server_batch((receive_message(no_flags),), on_message)
        state.due.add(server._RECEIVE_MESSAGE_TOKEN)
        return done

    return handle_unary_unary
