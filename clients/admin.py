"""Client of the control plane (riskwire.v1.Admin on the supervisor's admin port)."""

from __future__ import annotations

import math
from typing import Any

import grpc

from riskwire.protos import admin_pb2, admin_pb2_grpc

from .client import auth_metadata

DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"
_CONFIG_FIELDS = (
    "enabled", "primary", "model", "version", "endpoint", "rate_percent", "filter",
    "timeout_s", "endpoint_input", "generation",
)  # fmt: skip


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def config_dict(message: admin_pb2.ShadowConfig) -> dict[str, Any]:
    """A ShadowConfig message as a plain dict."""
    return {name: getattr(message, name) for name in _CONFIG_FIELDS}


class AdminClient:
    """Shadow configuration and status of a running server."""

    def __init__(
        self,
        target: str = DEFAULT_ADMIN_TARGET,
        *,
        timeout_s: float = 5.0,
        api_key: str = "",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if credentials is None:
            self.channel = grpc.insecure_channel(target)
        else:
            self.channel = grpc.secure_channel(target, credentials)
        self.channel = grpc.intercept_channel(self.channel, *_metadata_interceptors(api_key))
        self._stub = admin_pb2_grpc.AdminStub(self.channel)
        self.timeout_s = timeout_s

    def get_shadow(self) -> dict[str, Any]:
        """The current shadow configuration."""
        return config_dict(
            self._stub.GetShadow(admin_pb2.GetShadowRequest(), timeout=self.timeout_s)
        )

    def set_shadow(self, **config: Any) -> dict[str, Any]:
        """Replace the shadow configuration (keys of ShadowConfig); returns what was stored."""
        message = admin_pb2.ShadowConfig(**config)
        return config_dict(self._stub.SetShadow(message, timeout=self.timeout_s))

    def clear_shadow(self) -> dict[str, Any]:
        """Turn mirroring off."""
        return self.set_shadow(enabled=False)

    def shadow_status(self) -> dict[str, Any]:
        """Configuration, per-pair comparison (merged across workers) and per-worker state."""
        response = self._stub.ShadowStatus(admin_pb2.ShadowStatusRequest(), timeout=self.timeout_s)
        pairs = []
        for pair in response.pairs:
            pairs.append(
                {
                    "primary_model": pair.primary_model,
                    "primary_version": pair.primary_version,
                    "shadow_model": pair.shadow_model,
                    "shadow_version": pair.shadow_version,
                    "mirrored": pair.mirrored,
                    "dropped": pair.dropped,
                    "failed": pair.failed,
                    "scored": pair.scored,
                    "agreement_rate": _number(pair.agreement_rate),
                    "flips": {f"{f.from_decision}->{f.to_decision}": f.count for f in pair.flips},
                    "mean_abs_delta": _number(pair.mean_abs_delta),
                    "max_abs_delta": _number(pair.max_abs_delta),
                    "correlation": _number(pair.correlation),
                    "psi": _number(pair.psi),
                }
            )
        workers = [
            {
                "worker": w.worker,
                "pid": w.pid,
                "generation": w.generation,
                "active": w.active,
                "target_error": w.target_error,
                "queued": w.queued,
                "records_written": w.records_written,
            }
            for w in response.workers
        ]
        return {
            "config": config_dict(response.config),
            "pairs": pairs,
            "workers": workers,
            "records_dir": response.records_dir,
        }

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AddMetadata(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the API key) to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        details = client_call_details._replace(
            metadata=tuple(client_call_details.metadata or ()) + self.metadata
        )
        return continuation(details, request)


def _metadata_interceptors(api_key: str) -> list[grpc.UnaryUnaryClientInterceptor]:
    metadata = auth_metadata(api_key)
    return [_AddMetadata(metadata)] if metadata else []
