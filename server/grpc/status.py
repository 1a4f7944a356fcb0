"""Map domain errors to gRPC status codes, in one place, for every RPC.

Unary handlers are wrapped with :func:`unary`; it also refuses work whose deadline has
already passed. Unknown exceptions become INTERNAL with a generic message; the
traceback goes to the log, never to the client.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import DeadlineExpiredError, ErrorCode, InvalidInputError, ServingError, clip
from ..request_log import RequestLog, traceparent_of

log = logging.getLogger(__name__)

GRPC_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
# google.rpc.Code numbers, for per-item errors inside batch and stream responses.
RPC_CODE_NUMBERS: dict[ErrorCode, int] = {code: GRPC_CODES[code].value[0] for code in ErrorCode}

MAX_MESSAGE_CHARS = 2048
# Trailers are capped at 16 KiB (grpc-message + base64 grpc-status-details-bin).
MAX_VIOLATIONS = 16
MAX_DESCRIPTION_CHARS = 300
Handler = TypeVar("Handler", bound=Callable[..., Any])


def check_deadline(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExpiredError when the caller's deadline has already passed."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExpiredError("the call's deadline passed before it was processed")


_request_log: RequestLog | None = None


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
        try:
            response = _handle(method, self, request, context)
            return response
        except BaseException:
            code = context.code()
            status = code.name if code is not None else "UNKNOWN"
            raise
        finally:
            traceparent = traceparent_of(context.invocation_metadata())
            request_log.add(traceparent, name, status, started, time.perf_counter() - t0, response)

    return wrapper  # type: ignore[return-value]


def _handle(method: Callable[..., Any], self: Any, request: Any, context: Any) -> Any:
    try:
        check_deadline(context)
        return method(self, request, context)
    except InvalidInputError as exc:
        abort_invalid(context, exc)
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


def _capped(message: str) -> str:
    # Trailers have a 16 KiB hard limit; a longer message would change the status.
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def item_error(exc: Exception) -> tuple[int, str]:
    """(google.rpc code number, message) for an error inside a batch or stream item."""
    if isinstance(exc, ServingError):
        return RPC_CODE_NUMBERS[exc.code], _capped(str(exc))
    log.exception("unexpected error in a stream item", exc_info=exc)
    return RPC_CODE_NUMBERS[ErrorCode.INTERNAL], "internal server error (logged)"
