"""Admission control: say no at once when saturated, instead of letting latency grow.

Three layers, cheapest first:

1. ``max_concurrent_rpcs`` (grpc's own cap, per worker): past it, grpc's poller answers
   RESOURCE_EXHAUSTED without queueing the call at all. It bounds memory and the worst
   queue.
2. The queue-time budget (this interceptor, per worker): on arrival, the wait a call
   would have is estimated as ``(queued calls / handler threads + calls waiting for
   the polling thread) × mean service time`` (see ``server/grpc/dispatch.py``);
   above ``queue_budget_ms`` it gets a pre-built handler that answers
   RESOURCE_EXHAUSTED ("server saturated") in a few microseconds, so the queue drains
   fast and admitted calls keep their latency. The estimate only reads two queue lengths
   and a float, so an admitted call pays well under a microsecond.
3. Deadlines (``check_deadline`` in the unary wrapper): a call whose remaining deadline
   is shorter than the mean service time is refused with DEADLINE_EXCEEDED before any
   work is spent on it.

The mean service time is an exponentially weighted average of handler latencies fed by
the unary wrapper; races between handler threads only blur it slightly.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from .grpc import dispatch

SATURATED = "server saturated: its queue is over the time budget; retry with backoff"
_WEIGHT = 0.02  # of the newest latency in the running mean
EXEMPT = ("/grpc.health.v1.Health/",)


class ServiceTime:
    """Running mean of handler latencies (seconds)."""

    def __init__(self, initial_s: float = 0.0002) -> None:
        self.mean_s = initial_s

    def observe(self, latency_s: float) -> None:
        """Fold in one finished call."""
        self.mean_s += (latency_s - self.mean_s) * _WEIGHT


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Refuses calls on arrival when the handler queue is over the time budget."""

    def __init__(
        self, executor: ThreadPoolExecutor, threads: int, budget_s: float, service: ServiceTime
    ) -> None:
        self._queue: Any = executor._work_queue  # noqa: SLF001 - its length is the signal
        self.threads = threads
        self.budget_s = budget_s
        self.service = service
        self._refused = itertools.count()
        self._refusers: dict[str, grpc.RpcMethodHandler] = {}

    @property
    def refused(self) -> int:
        """Calls refused so far (reads without counting)."""
        return int(repr(self._refused)[6:-1])

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        queued, inline = self._queue.qsize(), dispatch.pending()
        if not (queued or inline) or (
            (queued / self.threads + inline) * self.service.mean_s <= self.budget_s
        ):
            return continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(EXEMPT):  # health checks must see a live server
            return continuation(handler_call_details)
        refuser = self._refusers.get(method)
        if refuser is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            refuser = self._refusers[method] = _refusing(handler)
        next(self._refused)
        return refuser


def _abort(context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SATURATED)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape (same deserialisers) that only refuses."""

    def unary(request, context):  # noqa: ANN001, ANN202
        _abort(context)

    def streaming(request, context):  # noqa: ANN001, ANN202
        _abort(context)
        yield  # pragma: no cover - never reached; makes this a generator

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming)
    return handler._replace(stream_stream=streaming)
