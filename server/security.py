"""The gate every RPC passes first: who is calling, may they, and are they within limits.

    metadata "authorization: Bearer rw_…"  ─┐
    client certificate (mTLS) subject CN    ─┴▶ Principal ─▶ role of the method? ─▶ rate limit

Order follows DESIGN.md's interceptor chain (auth → rate limit → admission). It runs in
the handler thread, inside the unary wrapper (``grpc.status``) and at the start of each
stream, so a refused call costs one metadata scan and a dict lookup; health, reflection
and the Open Inference Protocol's liveness/readiness calls stay open unless
``auth_open_health`` is off.

Without authentication, rate limits apply per peer address (the only identity left).
No error message, log line or trace ever carries the key: only its client id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from .auth import KeyStore, Principal, client_id_from_certificate, parse_roles
from .errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from .ratelimit import SharedRateLimiter, parse_rate_limits

if TYPE_CHECKING:
    from .config import Settings
    from .redis_state import RedisRateLimiter

log = logging.getLogger(__name__)

OPEN = ""  # no role needed
# Handler name → role. Names are unique across our services (riskwire.v1.Scoring,
# inference.GRPCInferenceService, riskwire.v1.Admin).
METHOD_ROLES: dict[str, str] = {
    "Score": "score", "ScoreBatch": "score", "ScoreStream": "score",
    "ModelInfer": "score", "ModelStreamInfer": "score",
    "Feedback": "feedback",
    "ServerMetadata": "read", "ModelMetadata": "read", "ModelConfig": "read",
    "GetShadow": "read", "ShadowStatus": "read", "DriftStatus": "read", "ListModels": "read",
    "SetShadow": "admin", "LoadModel": "admin", "UnloadModel": "admin", "Promote": "admin",
    "Rollback": "admin", "SetCanary": "admin",
    "ServerLive": OPEN, "ServerReady": OPEN, "ModelReady": OPEN,
}  # fmt: skip
# Roles that also grant a "read" method: a scoring client may ask for model metadata
# (perf_analyzer and tritonclient do before inferring).
READ_ALSO = frozenset({"score", "admin"})
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ANONYMOUS = Principal("anonymous", frozenset())


@dataclass(frozen=True)
class GateConfig:
    """What the gate enforces (from the server settings)."""

    auth: bool = False
    open_health: bool = True
    certificate_roles: frozenset[str] = frozenset({"score"})  # mTLS clients without a key


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:127.0.0.1:5555" → "127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer or "unknown"


class Gate:
    """Authentication, authorisation and per-client rate limits for one process."""

    def __init__(
        self,
        config: GateConfig,
        keys: KeyStore | None = None,
        limiter: SharedRateLimiter | RedisRateLimiter | None = None,
    ) -> None:
        if config.auth and keys is None:
            raise ValueError("authentication needs a key store")
        self.config = config
        self.keys = keys
        self.limiter = limiter

    def admit(self, method: str, context: grpc.ServicerContext) -> Principal:
        """The caller of ``method``, within its rate limit; raises UnauthenticatedError,
        PermissionDeniedError or RateLimitedError."""
        principal = self.authorize(method, context)
        if principal is not ANONYMOUS:
            self.throttle(principal, method)
        return principal

    def throttle(self, principal: Principal, method: str) -> None:
        """Take one request from the client's bucket (admin calls are never limited)."""
        limiter = self.limiter
        if limiter is not None and METHOD_ROLES.get(method) != "admin":
            retry_after = limiter.check(principal.client_id)
            if retry_after:
                raise RateLimitedError(
                    f"client {principal.client_id!r} is over its rate limit; retry in "
                    f"{retry_after:.3f}s",
                    retry_after,
                )

    def authorize(self, method: str, context: grpc.ServicerContext) -> Principal:
        """The caller of ``method`` if it may call it (no rate limit)."""
        role = METHOD_ROLES.get(method, "admin")  # an unknown method needs the most
        if not role and self.config.open_health:
            return ANONYMOUS
        if self.config.auth:
            principal = self._authenticate(context)
            granted = not role or role in principal.roles
            if not granted and not (role == "read" and principal.roles & READ_ALSO):
                raise PermissionDeniedError(
                    f"client {principal.client_id!r} may not call {method}: it needs the "
                    f"{role!r} role (has {', '.join(sorted(principal.roles)) or 'none'})"
                )
        else:
            principal = Principal(peer_host(context.peer()), frozenset())
        return principal

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
                break
        if header is not None:
            assert self.keys is not None
            principal = self.keys.authenticate(header if isinstance(header, str) else None)
            if principal is None:
                raise UnauthenticatedError(
                    "the API key is not valid (unknown, revoked or malformed); send "
                    "'authorization: Bearer <key>'"
                )
            return principal
        subject = client_id_from_certificate(context.auth_context() or {})
        if subject:
            return Principal(subject, self.config.certificate_roles)
        raise UnauthenticatedError(
            "no credentials: send 'authorization: Bearer <key>' metadata or a client certificate"
        )


class OpenServicesInterceptor(grpc.ServerInterceptor):
    """Closes health and reflection (grpc's own servicers) when ``auth_open_health`` is
    off: those calls need any valid key or client certificate."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        method = handler_call_details.method
        if not method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        metadata: Mapping[str, str] = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization")
        assert self.gate.keys is not None
        if isinstance(header, str) and self.gate.keys.authenticate(header) is not None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _refusing_like(handler)


def _refusing_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED (client certificates are
    checked in the handler, where the auth context is available)."""

    def check(context: grpc.ServicerContext) -> None:
        if not client_id_from_certificate(context.auth_context() or {}):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "health and reflection need a key")

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary(request, context):  # noqa: ANN001, ANN202
            check(context)
            return inner(request, context)

        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        def unary_stream(request, context):  # noqa: ANN001, ANN202
            check(context)
            yield from inner_us(request, context)

        return handler._replace(unary_stream=unary_stream)
    inner_ss = handler.stream_stream

    def stream_stream(requests, context):  # noqa: ANN001, ANN202
        check(context)
        yield from inner_ss(requests, context)

    return handler._replace(stream_stream=stream_stream)


def certificate_roles(text: str) -> frozenset[str]:
    """Roles of clients authenticated by their certificate alone ("score,feedback")."""
    return parse_roles(text) if text.strip() else frozenset()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of both planes (None: plaintext); client certificates are required
    when ``tls_client_ca`` is set."""
    if not settings.tls_cert:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def make_gate(settings: Settings, limiter_name: str = "") -> Gate | None:
    """The auth/rate-limit gate of this process (None when both are off)."""
    redis_limits = settings.rate_limits and settings.state_backend == "redis"
    if not settings.auth and not limiter_name and not redis_limits:
        return None
    keys = None
    if settings.auth:
        keys = (
            KeyStore(document=settings.api_keys) if settings.api_keys
            else KeyStore(settings.key_file)
        )  # fmt: skip
    limiter = None
    if settings.rate_limits and settings.state_backend == "redis":
        from .redis_state import RedisRateLimiter

        limiter = RedisRateLimiter(
            settings.redis_config(), limits=parse_rate_limits(settings.rate_limits)
        )
    elif limiter_name:
        limiter = SharedRateLimiter.attach(
            limiter_name, limits=parse_rate_limits(settings.rate_limits)
        )
    config = GateConfig(
        auth=settings.auth,
        open_health=settings.auth_open_health,
        certificate_roles=certificate_roles(settings.tls_client_roles),
    )
    return Gate(config, keys, limiter)


def listen(server, address: str, settings: Settings) -> int:  # noqa: ANN001
    """Bind ``address`` with TLS when configured; returns the port (0: failed)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
