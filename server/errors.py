"""Domain errors of the server, independent of the transport.

    ServingError                   code
    ├── InvalidInputError          INVALID_ARGUMENT  (which field, expected, got)
    ├── ModelNotFoundError         NOT_FOUND
    ├── NotReadyError              UNAVAILABLE
    ├── OverloadedError            RESOURCE_EXHAUSTED
    │   └── RateLimitedError       RESOURCE_EXHAUSTED (+ retry-after hint)
    ├── UnauthenticatedError       UNAUTHENTICATED   (no valid key or certificate)
    ├── PermissionDeniedError      PERMISSION_DENIED (the caller lacks the role)
    ├── FailedPreconditionError    FAILED_PRECONDITION (a lifecycle change not possible now)
    ├── DeadlineExpiredError       DEADLINE_EXCEEDED
    └── OutputValidationError      INTERNAL          (a model produced a bad output)

``server/grpc/status.py`` maps them to gRPC status codes in one place; any other
exception becomes INTERNAL with a generic message (details go to the log only).
"""

from __future__ import annotations

from enum import Enum

MAX_ECHO_CHARS = 100


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """repr-like text of a client-supplied value, shortened for error messages.

    Error messages travel in HTTP/2 trailers (16 KiB hard limit): echoing a huge
    client value verbatim would turn the intended status into RESOURCE_EXHAUSTED.
    """
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


class ErrorCode(Enum):
    """Transport-neutral error codes (named like google.rpc.Code)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"


class ServingError(Exception):
    """Base of every error a client may see; ``code`` picks the status."""

    code = ErrorCode.INTERNAL


class InvalidInputError(ServingError):
    """The request is malformed: the message names the field, what was expected and got."""

    code = ErrorCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        violations: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        # (field, description) pairs for google.rpc.BadRequest; one per bad field
        self.violations = violations or ([(field, message)] if field else [])


class ModelNotFoundError(ServingError):
    """No model (or version) of that name is loaded."""

    code = ErrorCode.NOT_FOUND


class NotReadyError(ServingError):
    """The server or model is starting up or shutting down."""

    code = ErrorCode.UNAVAILABLE


class OverloadedError(ServingError):
    """Too much work in flight; retry later."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class RateLimitedError(OverloadedError):
    """The client is over its rate limit; ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthenticatedError(ServingError):
    """No valid API key or client certificate (the message never echoes the key)."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(ServingError):
    """The caller is known but lacks the role the method needs."""

    code = ErrorCode.PERMISSION_DENIED


class FailedPreconditionError(ServingError):
    """The change cannot be made in the current state (e.g. unload the primary, promote
    a package that fails its governance gate or does not load)."""

    code = ErrorCode.FAILED_PRECONDITION


class DeadlineExpiredError(ServingError):
    """The caller's deadline passed before the work started."""

    code = ErrorCode.DEADLINE_EXCEEDED


class OutputValidationError(ServingError):
    """The model produced a probability that is not finite or not in [0, 1]."""

    code = ErrorCode.INTERNAL
