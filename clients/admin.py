"""Client of the control plane (riskwire.v1.Admin on the supervisor's admin port)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from riskwire.protos import admin_pb2, admin_pb2_grpc

from .client import auth_metadata

DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"
_CONFIG_FIELDS = (
    "enabled", "primary", "model", "version", "endpoint", "rate_percent", "filter",
    "timeout_s", "endpoint_input", "generation",
)  # fmt: skip
_VERSION_FIELDS = (
    "name", "version", "state", "traffic_percent", "risk_category", "owner", "load_error",
)  # fmt: skip
_TRAFFIC_FIELDS = (
    "name", "primary", "previous", "canary", "canary_weight", "steps", "step_interval_s",
    "generation", "halted_reason", "loaded",
)  # fmt: skip
_TRAFFIC_LISTS = frozenset({"previous", "steps", "loaded"})
# Loading verifies, compiles and warms a version in every worker: tens of seconds.
LIFECYCLE_TIMEOUT_S = 120.0


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def config_dict(message: admin_pb2.ShadowConfig) -> dict[str, Any]:
    """A ShadowConfig message as a plain dict."""
    return {name: getattr(message, name) for name in _CONFIG_FIELDS}


def traffic_dict(message: admin_pb2.TrafficState) -> dict[str, Any]:
    """A TrafficState message as a plain dict (repeated fields as lists)."""
    return {
        name: list(getattr(message, name)) if name in _TRAFFIC_LISTS else getattr(message, name)
        for name in _TRAFFIC_FIELDS
    }


def version_dict(message: admin_pb2.ModelVersionInfo) -> dict[str, Any]:
    """A ModelVersionInfo message as a plain dict (metrics as a dict, workers as a list)."""
    out = {name: getattr(message, name) for name in _VERSION_FIELDS}
    out["metrics"] = dict(sorted(message.metrics.items()))
    out["loaded_in_workers"] = list(message.loaded_in_workers)
    return out


def change_dict(message: admin_pb2.ModelsChange) -> dict[str, Any]:
    """A ModelsChange message as ``{"traffic": traffic dict, "message": str}``."""
    return {"traffic": traffic_dict(message.traffic), "message": message.message}


class AdminClient:
    """Shadow configuration and status, and the model lifecycle, of a running server.

    The lifecycle calls that change something wait up to ``timeout_s``, by default
    ``max(self.timeout_s, LIFECYCLE_TIMEOUT_S)``: the server answers once every worker
    has loaded (and warmed) the version.
    """

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

    def list_models(self, name: str = "", *, timeout_s: float | None = None) -> dict[str, Any]:
        """Every version of ``name`` (empty: of every model) and each model's traffic."""
        response = self._stub.ListModels(
            admin_pb2.ListModelsRequest(name=name),
            timeout=self.timeout_s if timeout_s is None else timeout_s,
        )
        return {
            "versions": [version_dict(v) for v in response.versions],
            "traffic": [traffic_dict(t) for t in response.traffic],
        }

    def load_model(
        self, name: str, version: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Load (verify, compile, warm) a version in every worker; serving is untouched."""
        request = admin_pb2.ModelVersionRequest(name=name, version=version)
        return self._change(self._stub.LoadModel, request, timeout_s)

    def unload_model(
        self, name: str, version: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Unload a version that takes no traffic."""
        request = admin_pb2.ModelVersionRequest(name=name, version=version)
        return self._change(self._stub.UnloadModel, request, timeout_s)

    def promote(
        self, name: str, version: str, *, force: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Make a version the primary in every worker; ``force`` skips the governance gate."""
        request = admin_pb2.PromoteRequest(name=name, version=version, force=force)
        return self._change(self._stub.Promote, request, timeout_s)

    def rollback(self, name: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Back to the previous primary."""
        return self._change(self._stub.Rollback, admin_pb2.ModelRequest(name=name), timeout_s)

    def set_canary(
        self,
        name: str,
        version: str,
        weight_percent: float,
        *,
        steps: Sequence[float] = (),
        step_interval_s: float = 0.0,
        force: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send ``weight_percent`` of cards to ``version`` (0 ends the canary), then, with
        ``steps``, raise the weight to each step every ``step_interval_s``."""
        request = admin_pb2.CanaryRequest(
            name=name,
            version=version,
            weight_percent=weight_percent,
            steps=steps,
            step_interval_s=step_interval_s,
            force=force,
        )
        return self._change(self._stub.SetCanary, request, timeout_s)

    def _change(
        self,
        method: Callable[..., admin_pb2.ModelsChange],
        request: Message,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        if timeout_s is None:
            timeout_s = max(self.timeout_s, LIFECYCLE_TIMEOUT_S)
        return change_dict(method(request, timeout=timeout_s))

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
