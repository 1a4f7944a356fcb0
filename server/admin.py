"""The control plane: riskwire.v1.Admin, served by the supervisor on its own port.

    admin client ──gRPC──▶ supervisor: AdminServicer
                               │ writes   <run_dir>/shadow.json          (ShadowConfig)
                               │ reads    <run_dir>/shadow-stats/*.json  (per worker)
                               ▼
                 every worker's shadow scorer polls shadow.json (≤ 0.25 s)

Loopback only by default (``admin_host``); with ``auth`` on, reads need the ``read`` role
and changes the ``admin`` role, and every change is appended to the hash-chained audit
log (``riskwire audit verify``).
"""

from __future__ import annotations

import json
import logging
import math
from concurrent import futures
from pathlib import Path

import grpc

from riskwire.protos import admin_pb2, admin_pb2_grpc
from riskwire.shadow.compare import DECISIONS, PairStats
from riskwire.shadow.config import ShadowConfig, ShadowConfigError, read_control, write_control

from .audit import AuditLog
from .config import Settings
from .errors import InvalidInputError, ModelNotFoundError, NotReadyError
from .grpc.reflection import enable_reflection
from .grpc.status import unary
from .lifecycle import Lifecycle
from .monitoring.alerts import Measurement
from .monitoring.drift import DriftMonitor, pid_alive
from .request_log import CALL
from .security import peer_host
from .traffic import Traffic

log = logging.getLogger(__name__)

ADMIN_SERVICE = "riskwire.v1.Admin"
CONTROL_FILE = "shadow.json"
STATS_DIR = "shadow-stats"
DRIFT_DIR = "drift"


def shadow_config_from_settings(settings: Settings) -> ShadowConfig:
    """The start-up shadow configuration (``shadow_model`` is "version" or "name:version")."""
    name, _, version = settings.shadow_model.rpartition(":")
    enabled = bool(settings.shadow_model or settings.shadow_endpoint)
    return ShadowConfig(
        enabled=enabled,
        model=name,
        version=version,
        endpoint=settings.shadow_endpoint,
        rate_percent=settings.shadow_rate,
        filter=settings.shadow_filter,
        timeout_s=settings.shadow_timeout_s,
    ).validate()


def check_local_target(models_dir: Path, config: ShadowConfig, default_model: str) -> None:
    """Refuse a local shadow whose package does not exist (before any worker tries it)."""
    if not config.enabled or config.endpoint:
        return
    name = config.model or config.primary or default_model
    if not (models_dir / name / config.version / "MANIFEST.sha256").is_file():
        raise ModelNotFoundError(
            f"shadow model {name} version {config.version} has no package under {models_dir}"
        )


def read_worker_stats(stats_dir: Path) -> tuple[list[dict], dict[tuple, PairStats]]:
    """Every worker's published stats and the pairs merged across workers.

    Stats files of workers that died stay and keep counting, so a restart loses no counts.
    """
    workers, merged = [], {}
    for path in sorted(stats_dir.glob("worker-*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now; the next read sees it
        workers.append(payload)
        for pair in payload["pairs"]:
            key = tuple(pair[k] for k in ("primary_model", "primary_version"))
            key += (pair["shadow_model"], pair["shadow_version"])
            stats = PairStats.from_dict(pair["stats"])
            if key in merged:
                merged[key].merge(stats)
            else:
                merged[key] = stats
    return workers, merged


def _to_proto(config: ShadowConfig) -> admin_pb2.ShadowConfig:
    return admin_pb2.ShadowConfig(
        enabled=config.enabled,
        primary=config.primary,
        model=config.model,
        version=config.version,
        endpoint=config.endpoint,
        rate_percent=config.rate_percent,
        filter=config.filter,
        timeout_s=config.timeout_s,
        endpoint_input=config.endpoint_input,
        generation=config.generation,
    )


def _from_proto(message: admin_pb2.ShadowConfig) -> ShadowConfig:
    try:
        return ShadowConfig(
            enabled=message.enabled,
            primary=message.primary,
            model=message.model,
            version=message.version,
            endpoint=message.endpoint,
            endpoint_input=message.endpoint_input or "features",
            rate_percent=message.rate_percent,
            filter=message.filter,
            timeout_s=message.timeout_s or 1.0,
        ).validate()
    except ShadowConfigError as exc:
        raise InvalidInputError(str(exc)) from None


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Shadow configuration and status for the whole server."""

    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        drift: DriftMonitor | None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._settings = settings
        self._control = run_dir / CONTROL_FILE
        self._stats_dir = run_dir / STATS_DIR
        self._drift = drift
        self._audit_log = AuditLog(settings.audit_path)

    @unary
    def GetShadow(self, request, context):
        return _to_proto(read_control(self._control) or ShadowConfig())

    @unary
    def SetShadow(self, request, context):
        config = _from_proto(request)
        client = _client(context)
        try:
            check_local_target(Path(self._settings.models), config, self._settings.default_model)
            stored = write_control(self._control, config)
        except Exception as exc:
            self._audit("shadow.set", client, config.to_json(), f"error: {exc}")
            raise
        self._audit("shadow.set", client, stored.to_json(), "ok")
        log.info("shadow configuration %d: %s", stored.generation, stored.to_json())
        return _to_proto(stored)

    # ------------------------------------------------------------------ lifecycle
    def _models(self) -> Lifecycle:
        if self._lifecycle is None:
            raise NotReadyError("model lifecycle is not available on this server")
        return self._lifecycle

    @unary
    def ListModels(self, request, context):
        versions, traffics = self._models().list_models(request.name)
        response = admin_pb2.ListModelsResponse(traffic=[_traffic_proto(t) for t in traffics])
        for v in versions:
            response.versions.add(**v)
        return response

    @unary
    def LoadModel(self, request, context):
        return _change(*self._models().load(request.name, request.version, _client(context)))

    @unary
    def UnloadModel(self, request, context):
        return _change(*self._models().unload(request.name, request.version, _client(context)))

    @unary
    def Promote(self, request, context):
        change = self._models().promote(
            request.name, request.version, _client(context), force=request.force
        )
        return _change(*change)

    @unary
    def Rollback(self, request, context):
        return _change(*self._models().rollback(request.name, _client(context)))

    @unary
    def SetCanary(self, request, context):
        change = self._models().set_canary(
            request.name, request.version, request.weight_percent, _client(context),
            steps=tuple(request.steps), step_interval_s=request.step_interval_s,
            force=request.force,
        )  # fmt: skip
        return _change(*change)

    def _audit(self, action: str, client: str, arguments: str, result: str) -> None:
        try:
            self._audit_log.append(client, action, json.loads(arguments), result)
        except OSError as exc:  # the change is made; losing its record must be loud
            log.error("audit log %s: %s", self._audit_log.path, exc)

    @unary
    def DriftStatus(self, request, context):
        return _drift_status(self._drift, request.model, request.window)

    @unary
    def ShadowStatus(self, request, context):
        workers, merged = read_worker_stats(self._stats_dir)
        response = admin_pb2.ShadowStatusResponse(
            config=_to_proto(read_control(self._control) or ShadowConfig()),
            records_dir=str(self._settings.shadow_path / "records"),
        )
        for key, stats in sorted(merged.items()):
            summary = stats.summary()
            pair = response.pairs.add(
                primary_model=key[0],
                primary_version=key[1],
                shadow_model=key[2],
                shadow_version=key[3],
                **{
                    name: summary[name]
                    for name in ("mirrored", "dropped", "failed", "scored", "agreement_rate")
                },
                mean_abs_delta=summary["mean_abs_delta"],
                max_abs_delta=summary["max_abs_delta"],
                correlation=summary["correlation"],
                psi=summary["psi"],
            )
            for i, source in enumerate(DECISIONS):
                for j, target in enumerate(DECISIONS):
                    if i != j:
                        pair.flips.add(
                            from_decision=source, to_decision=target, count=int(stats.flips[i, j])
                        )
        for payload in workers:
            if not pid_alive(payload["pid"]):
                continue
            response.workers.add(
                worker=payload["worker"],
                pid=payload["pid"],
                generation=payload["generation"],
                active=payload["active"],
                target_error=payload["target_error"] or "",
                queued=payload["queued"],
                records_written=payload["records_written"],
            )
        return response


def _client(context: grpc.ServicerContext) -> str:
    """The admitted client id (with auth), else the peer's address."""
    return getattr(CALL, "client", "") or peer_host(context.peer())


def _traffic_proto(traffic: Traffic) -> admin_pb2.TrafficState:
    return admin_pb2.TrafficState(
        name=traffic.name, primary=traffic.primary, previous=list(traffic.previous),
        canary=traffic.canary, canary_weight=traffic.canary_weight, steps=list(traffic.steps),
        step_interval_s=traffic.step_interval_s, generation=traffic.generation,
        halted_reason=traffic.halted_reason, loaded=list(traffic.loaded),
    )  # fmt: skip


def _change(traffic: Traffic, message: str) -> admin_pb2.ModelsChange:
    return admin_pb2.ModelsChange(traffic=_traffic_proto(traffic), message=message)


def _drift_status(
    drift: DriftMonitor | None, model: str, window: str
) -> admin_pb2.DriftStatusResponse:
    if drift is None:
        return admin_pb2.DriftStatusResponse()
    rows, validation, evaluated_at = drift.latest()
    firing = drift.engine.active()
    alerting = {
        (a["rule"], a["model"], str(a["version"]), a["window"], a["column"]) for a in firing
    }
    response = admin_pb2.DriftStatusResponse(evaluated_at=evaluated_at, validation=validation)
    rules = drift.engine.rules
    for row in rows:
        if (model and row["model"] != model) or (window and row["window"] != window):
            continue
        measurement = Measurement(
            row["model"], row["version"], row["window"], row["measure"], row["column"], row["value"]
        )
        rule = next((r for r in rules if r.matches(measurement)), None)
        response.values.add(
            model=row["model"],
            version=row["version"],
            window=row["window"],
            column=row["column"],
            measure=row["measure"],
            value=row["value"],
            count=int(row["count"]),
            threshold=rule.threshold if rule else math.nan,
            alerting=rule is not None
            and (rule.name, row["model"], row["version"], row["window"], row["column"]) in alerting,
        )
    for a in firing:
        response.alerts.add(
            id=a["id"], rule=a["rule"], severity=a["severity"], model=a["model"],
            version=str(a["version"]), window=a["window"], column=a["column"],
            measure=a["measure"], value=a["value"], threshold=a["threshold"],
            started_at=a["started_at"], message=a["message"],
        )  # fmt: skip
    return response


def start_admin_server(
    settings: Settings,
    run_dir: Path,
    drift: DriftMonitor | None = None,
    lifecycle: Lifecycle | None = None,
) -> tuple[grpc.Server, int]:
    """Serve the Admin API (plus health and reflection); returns the server and its port."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from .grpc.status import configure_gate
    from .security import listen, make_gate

    configure_gate(make_gate(settings))  # keys and roles; the admin plane has no rate limit
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin"),
        options=[("grpc.so_reuseport", 0)],  # a second server must not share this port
    )
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(settings, run_dir, drift, lifecycle), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([ADMIN_SERVICE, health.SERVICE_NAME], server)
    address = f"{settings.admin_host}:{settings.admin_port}"
    port = listen(server, address, settings)
    if port == 0:
        raise RuntimeError(f"admin API cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, port
