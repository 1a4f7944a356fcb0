"""Map domain errors to gRPC status codes, in one place, for every RPC.

Unary handlers are wrapped with :func:`unary`; it also refuses work whose deadline has
already passed. Unknown exceptions become INTERNAL with a generic message; the
traceback goes to the log, never to the client.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..admission import ServiceTime
from ..auth import Principal
from ..errors import (
    DeadlineExpiredError,
    ErrorCode,
    InvalidInputError,
    RateLimitedError,
    ServingError,
    clip,
)
from ..request_log import CALL, RequestLog, traceparent_of
from ..security import Gate

log = logging.getLogger(__name__)

GRPC_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}
# google.rpc.Code numbers, for per-item errors inside batch and stream responses.
RPC_CODE_NUMBERS: dict[ErrorCode, int] = {code: GRPC_CODES[code].value[0] for code in ErrorCode}

MAX_MESSAGE_CHARS = 2048
# Trailers are capped at 16 KiB (grpc-message + base64 grpc-status-details-bin).
MAX_VIOLATIONS = 16
MAX_DESCRIPTION_CHARS = 300
Handler = TypeVar("Handler", bound=Callable[..., Any])


def check_deadline(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExpiredError when the caller's deadline has passed, or (with
    admission control) is closer than the mean service time: no work is spent on a call
    whose answer would come too late."""
    remaining = context.time_remaining()
    if remaining is None:
        return
    if remaining <= 0:
        raise DeadlineExpiredError("the call's deadline passed before it was processed")
    service = _service
    if service is not None and remaining < service.mean_s:
        raise DeadlineExpiredError(
            f"the call's deadline ({remaining * 1000:.2f} ms left) is shorter than the "
            f"server's mean service time ({service.mean_s * 1000:.2f} ms)"
        )


_service: ServiceTime | None = None


def configure_admission(service: ServiceTime | None) -> None:
    """Feed handler latencies to ``service`` and refuse calls whose deadline it cannot
    meet (None: off)."""
    global _service
    _service = service


_request_log: RequestLog | None = None
_gate: Gate | None = None


def configure_request_log(request_log: RequestLog | None) -> None:
    """Log every unary call of this process to ``request_log`` (None: off)."""
    global _request_log
    _request_log = request_log


def unary(method: Handler) -> Handler:
    """Decorator for unary servicer methods: deadline check, error mapping and the
    request log."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        request_log = _request_log
        if request_log is None:
            return _handle(method, self, request, context)
        started, t0 = time.time(), time.perf_counter()
        response, status = None, "OK"
        in_flight = request_log.in_flight
        in_flight.append(None)
        lines, tracing = request_log.lines, request_log.tracing
        CALL.model = None
        if tracing is not None:  # for the span: its caller and the dataplane's stages
            CALL.stages = CALL.ids = None
            CALL.traceparent = traceparent = traceparent_of(context.invocation_metadata())
        try:
            response = _handle(method, self, request, context)
            return response
        except BaseException:
            code = context.code()
            status = code.name if code is not None else "UNKNOWN"
            raise
        finally:
            latency = time.perf_counter() - t0
            in_flight.pop()
            service = _service
            if service is not None and status == "OK":
                service.observe(latency)
            if not lines:  # metrics only: no line, no span
                request_log.count(name, status, latency, _subject(response))
            else:
                if tracing is None:
                    traceparent = traceparent_of(context.invocation_metadata())
                    marks = ids = None
                else:  # ids: chosen by the dataplane when it mirrored the call
                    marks, ids = CALL.stages, CALL.ids
                client = CALL.client if _gate is not None else ""
                subject = _subject(response)
                request_log.add(
                    traceparent, name, status, started, latency, subject, t0, marks, client,
                    ids,
                )  # fmt: skip

    return wrapper  # type: ignore[return-value]


def _subject(response: Any) -> Any:
    """What the call's metrics and log line name the model by: its response message, or
    the version it was routed to (a failed call, or a response sent as bytes)."""
    return CALL.model if response is None or response.__class__ is bytes else response


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def count_item(method: str, t0: float, subject: Any, code: int = 0) -> None:
    """Count one item of a stream (its google.rpc ``code``, 0 = OK) in the metrics, as
    the unary wrapper counts a call; ``subject`` is its response (or None)."""
    request_log = _request_log
    if request_log is not None:
        subject = subject if subject is not None else CALL.model
        request_log.count(method, _CODE_NAMES.get(code, "UNKNOWN"), time.perf_counter() - t0,
                          subject)  # fmt: skip


def configure_gate(gate: Gate | None) -> None:
    """Authenticate, authorise and rate-limit every call of this process (None: off)."""
    global _gate
    _gate = gate


def caller(context: grpc.ServicerContext, method: str) -> Principal | None:
    """Start of a stream: the authorised caller (None without a gate), or abort."""
    gate = _gate
    if gate is None:
        return None
    try:
        principal = gate.authorize(method, context)
    except ServingError as exc:
        context.abort(GRPC_CODES[exc.code], _capped(str(exc)))
    CALL.client = principal.client_id
    return principal


def throttle(principal: Principal | None, method: str) -> None:
    """One stream item against the caller's rate limit (raises RateLimitedError)."""
    if principal is not None and _gate is not None:
        _gate.throttle(principal, method)


def _handle(method: Callable[..., Any], self: Any, request: Any, context: Any) -> Any:
    try:
        check_deadline(context)
        gate = _gate
        if gate is not None:
            CALL.client = ""  # until admitted (a refused call has no client id)
            CALL.client = gate.admit(method.__name__, context).client_id
        return method(self, request, context)
    except InvalidInputError as exc:
        abort_invalid(context, exc)
    except RateLimitedError as exc:
        abort_rate_limited(context, exc)
    except ServingError as exc:
        context.abort(GRPC_CODES[exc.code], _capped(str(exc)))
    except Exception:  # noqa: BLE001 - nothing a client sends may crash a worker
        log.exception("unexpected error in %s", method.__qualname__)
        context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged)")


def abort_invalid(context: grpc.ServicerContext, exc: InvalidInputError) -> None:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each violated field."""
    message = _capped(str(exc))
    if not exc.violations:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=clip(f), description=d[:MAX_DESCRIPTION_CHARS]
            )
            for f, d in exc.violations[:MAX_VIOLATIONS]
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


class _Status(NamedTuple):
    """A grpc.Status with our own trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def abort_rate_limited(context: grpc.ServicerContext, exc: RateLimitedError) -> None:
    """RESOURCE_EXHAUSTED with the retry hint twice: ``retry-after-ms`` trailing metadata
    (easy for any client) and a google.rpc.RetryInfo detail (for gRPC-aware clients)."""
    delay = duration_pb2.Duration()
    retry_s = min(exc.retry_after_s, 3600.0)  # inf: the cost exceeds the burst
    delay.FromNanoseconds(int(retry_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message=_capped(str(exc)), details=[detail]
    )
    context.abort_with_status(
        _Status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            status.message,
            (
                ("retry-after-ms", str(max(1, math.ceil(retry_s * 1000)))),
                ("grpc-status-details-bin", status.SerializeToString()),
            ),
        )
    )


def _capped(message: str) -> str:
    # Trailers have a 16 KiB hard limit; a longer message would change the status.
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def item_error(exc: Exception) -> tuple[int, str]:
    """(google.rpc code number, message) for an error inside a batch or stream item."""
    if isinstance(exc, ServingError):
        return RPC_CODE_NUMBERS[exc.code], _capped(str(exc))
    log.exception("unexpected error in a stream item", exc_info=exc)
    return RPC_CODE_NUMBERS[ErrorCode.INTERNAL], "internal server error (logged)"
