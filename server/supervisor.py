"""The supervisor: owns shared state, starts N workers, restarts the dead, drains on SIGTERM.

    supervisor ──spawn──▶ worker 0 … worker N-1   (SO_REUSEPORT on one port)
        │ shared memory: per-card state table (its spinlock in its header)
        │ events queue: WorkerReady / WorkerFailed
        │ run dir: shadow control file (written here), workers' shadow stats
        │ admin API (control plane) on its own port
        └ periodic and final state snapshots

A worker that dies is replaced after ``restart_backoff_s``; a worker that reports a
start-up failure (bad config, no model) stops the whole server instead of looping.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from riskwire.shadow.config import ShadowConfigError, write_control

from .admin import (
    CONTROL_FILE,
    DRIFT_DIR,
    STATS_DIR,
    check_local_target,
    read_worker_stats,
    shadow_config_from_settings,
    start_admin_server,
)
from .audit import AuditLog
from .config import Settings, SettingsError, replace
from .errors import ModelNotFoundError
from .lifecycle import CanaryGuards, Lifecycle, new_alert_id
from .monitoring.alerts import AlertEvent, append_incident, engine_from_config
from .monitoring.drift import DriftMonitor, alert_config
from .monitoring.metrics import (
    METRICS_DIR,
    MergedMetrics,
    MetricsPusher,
    counter,
    gauge,
    make_metric_exporter,
    start_prometheus_endpoint,
)
from .monitoring.recorder import parse_windows
from .ratelimit import SharedRateLimiter, parse_rate_limits
from .state import SharedCardState
from .traffic import open_traffic_store
from .worker import (
    MODELS_STATUS_DIR,
    WorkerFailed,
    WorkerReady,
    configure_logging,
    grpc_environment,
    run_worker,
)

log = logging.getLogger("riskwire.supervisor")
RETENTION_CHECK_S = 3600.0  # how often retention is applied (and once at start)
SHADOW_PAIR_LABELS = (
    "riskwire.model", "riskwire.model_version", "riskwire.shadow_model",
    "riskwire.shadow_model_version",
)  # fmt: skip


@dataclass
class _WorkerSlot:
    worker_id: int
    process: BaseProcess | None = None
    ready: bool = False
    restarts: int = 0
    restart_at: float | None = None


def _resolve_port(host: str, port: int) -> int:
    """Pick a concrete free port for ``port == 0`` so every worker binds the same one."""
    if port:
        return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _cpu_plan(workers: int) -> list[int | None]:
    """Core for each worker when there are enough cores to give each its own."""
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        return [None] * workers
    return cores[:workers]


class Supervisor:
    """Runs the data-plane workers until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        # Workers get the concrete port and count (a pinned worker sees one core).
        self.settings = replace(
            settings,
            port=_resolve_port(settings.host, settings.port),
            workers=settings.worker_count,
        )
        self._context = multiprocessing.get_context("spawn")
        self._events = self._context.Queue()
        self._stopping = False
        self._failed: str | None = None
        self._slots = [_WorkerSlot(i) for i in range(self.settings.worker_count)]
        cpus = _cpu_plan(len(self._slots)) if self.settings.pin_workers else None
        self._cpus = cpus or [None] * len(self._slots)
        self._state: SharedCardState | None = None
        self._limiter: SharedRateLimiter | None = None
        self._own_run_dir = False
        self.admin_port: int | None = None
        self.metrics_port: int | None = None
        self.merged: MergedMetrics | None = None
        self.lifecycle: Lifecycle | None = None
        self.drift: DriftMonitor | None = None

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit status."""
        settings = self.settings
        configure_logging(settings.log_level, f"supervisor[{os.getpid()}]")
        for warning in settings.warnings():
            log.warning("%s", warning)
        # One Numba thread per worker: parallelism comes from the processes.
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")
        grpc_environment(settings)
        if settings.state_backend == "local":  # with Redis, the workers hold no card state
            self._state = SharedCardState.create(
                settings.state_capacity, snapshot=settings.snapshot_path
            )
        if settings.rate_limits and settings.state_backend == "local":
            self._limiter = SharedRateLimiter.create(
                settings.rate_limit_slots, limits=parse_rate_limits(settings.rate_limits)
            )
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        admin = metrics_endpoint = pusher = None
        try:
            run_dir = self._prepare_run_dir()
            self.drift = self._drift_monitor(run_dir)
            metrics_endpoint, pusher = self._start_metrics(run_dir)
            self.lifecycle = self._lifecycle(run_dir)
            admin, self.admin_port = start_admin_server(
                self.settings, run_dir, self.drift, self.lifecycle
            )
            log.info("admin API on %s:%d", settings.admin_host, self.admin_port)
            for slot in self._slots:
                self._start(slot)
            self._loop()
        finally:
            self._shutdown()
            if admin is not None:
                admin.stop(1.0)
            if pusher is not None:
                pusher.stop()
            if metrics_endpoint is not None:
                metrics_endpoint.shutdown()
                metrics_endpoint.server_close()
            if self.drift is not None:
                self.drift.engine.close(5.0)
            if self._own_run_dir:
                shutil.rmtree(self.settings.run_dir, ignore_errors=True)
        return 1 if self._failed else 0

    def _drift_monitor(self, run_dir: Path) -> DriftMonitor | None:
        """The drift monitor and its alert engine (None when drift monitoring is off)."""
        settings = self.settings
        if not settings.drift:
            return None
        try:
            config = alert_config(settings.alert_rules, settings.alert_webhook)
            engine = engine_from_config(config, incident_log=settings.incident_log)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"alerts: {exc}") from None
        return DriftMonitor(
            Path(settings.models),
            run_dir / DRIFT_DIR,
            engine,
            history_path=settings.drift_history,
            min_count=settings.drift_min_count,
            history_every_s=max(settings.drift_eval_s, 60.0 if settings.profile != "test" else 0),
            predictions_dir=settings.shadow_path if settings.prediction_log_rate > 0 else None,
            windows=parse_windows(settings.drift_windows),
            performance_every_s=settings.performance_eval_s,
            min_labels=settings.performance_min_labels,
        )

    def _lifecycle(self, run_dir: Path) -> Lifecycle:
        """Model lifecycle changes, with the guards of automatic canaries."""
        settings = self.settings
        drift = self.drift

        def alert(model: str, version: str, rule: str, value: float, message: str) -> None:
            if drift is None:
                return
            now = time.time()
            event = AlertEvent(
                id=new_alert_id(), state="firing", rule=rule, severity="critical",
                model=model, version=version, window="", measure="canary_guard", column="",
                value=value, op=">", threshold=0.0, started_at=now, at=now, message=message,
            )  # fmt: skip
            append_incident(drift.engine.incident_log, event)
            drift.engine.router.send(event)

        return Lifecycle(
            Path(settings.models),
            run_dir / MODELS_STATUS_DIR,
            live_pids=lambda: {
                s.process.pid for s in self._slots if s.process is not None and s.ready
            },
            audit=AuditLog(settings.audit_path),
            environment={"auth": settings.auth, "tls": bool(settings.tls_cert)},
            guards=CanaryGuards(
                max_error_rate=settings.canary_max_error_rate,
                max_p99_ratio=settings.canary_max_p99_ratio,
                max_score_psi=settings.canary_max_score_psi,
                max_disagreement=settings.canary_max_disagreement,
                min_calls=settings.canary_min_calls,
            ),
            metrics=self.merged.collect if self.merged is not None else None,
            drift_rows=(lambda: drift.latest()[0]) if drift is not None else None,
            shadow_pairs=lambda: read_worker_stats(run_dir / STATS_DIR)[1],
            alert=alert,
            store=open_traffic_store(settings),
        )

    def _start_metrics(self, run_dir: Path):  # noqa: ANN202
        """The merged metrics' Prometheus endpoint and OTLP pusher (either may be None)."""
        settings = self.settings
        if not settings.metrics:
            return None, None
        merged = self.merged = MergedMetrics(run_dir / METRICS_DIR, extra=self._metric_series)
        endpoint = pusher = None
        try:
            endpoint, self.metrics_port = start_prometheus_endpoint(
                merged,
                settings.metrics_host,
                settings.metrics_port,
                certfile=settings.tls_cert,
                keyfile=settings.tls_key,
                client_cafile=settings.tls_client_ca,
            )
            scheme = "https" if settings.tls_cert else "http"
            log.info(
                "metrics on %s://%s:%d/metrics", scheme, settings.metrics_host, self.metrics_port
            )
        except OSError as exc:  # the data plane matters more than its dashboard
            log.error(
                "metrics endpoint %s:%d not started: %s",
                settings.metrics_host, settings.metrics_port, exc,
            )  # fmt: skip
        if settings.metrics_exporter:
            from opentelemetry.sdk.resources import Resource

            from riskwire import __version__

            resource = Resource.create(
                {
                    "service.name": "riskwire",
                    "service.version": __version__,
                    "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
                }
            )
            exporter = make_metric_exporter(settings.metrics_exporter, settings.metrics_endpoint)
            pusher = MetricsPusher(merged, exporter, resource, settings.metrics_export_s)
            pusher.start()
        return endpoint, pusher

    def _metric_series(self) -> list[dict]:
        """The control plane's own series: workers, shadow pairs, drift measures."""
        series = [
            gauge(
                "riskwire.workers.ready",
                sum(s.ready for s in self._slots),
                {},
                unit="{worker}",
                description="Workers serving",
            )  # fmt: skip
        ]
        series.extend(
            counter(
                "riskwire.worker.restarts",
                slot.restarts,
                {"riskwire.worker": slot.worker_id},
                unit="{restart}",
                description="Worker processes restarted",
            )  # fmt: skip
            for slot in self._slots
        )
        if self._limiter is not None and self._limiter.table is not None:
            series.append(
                counter("riskwire.ratelimit.fail_open", self._limiter.table.fail_open, {},
                        unit="{request}", description="Calls let through unchecked: the "
                        "rate-limit table had no free slot for their client")
            )  # fmt: skip
        _, pairs = read_worker_stats(Path(self.settings.run_dir) / STATS_DIR)
        for key, stats in pairs.items():
            attributes = dict(zip(SHADOW_PAIR_LABELS, key, strict=True))
            for name in ("mirrored", "dropped", "scored", "failed", "agree"):
                series.append(
                    counter(
                        f"riskwire.shadow.{name}",
                        getattr(stats, name),
                        attributes,
                        unit="{request}",
                        description=f"Shadow requests {name}",
                    )  # fmt: skip
                )
        if self.drift is not None:
            rows, _, _ = self.drift.latest()
            for row in rows:
                attributes = {
                    "riskwire.model": row["model"], "riskwire.model_version": str(row["version"]),
                    "window": row["window"], "column": row["column"], "measure": row["measure"],
                }  # fmt: skip
                series.append(
                    gauge("riskwire.drift", float(row["value"]), attributes,
                          description="Drift and live-quality measures (last evaluation)")
                )  # fmt: skip
        return series

    def _prepare_run_dir(self) -> Path:
        """Create the run directory and write the start-up shadow configuration."""
        if self.settings.run_dir:
            run_dir = Path(self.settings.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="riskwire-run-"))
            self._own_run_dir = True
            self.settings = replace(self.settings, run_dir=str(run_dir))
        for folder in (STATS_DIR, DRIFT_DIR, METRICS_DIR, MODELS_STATUS_DIR):
            for stale in (run_dir / folder).glob("*.json"):
                stale.unlink()
        settings = self.settings
        try:
            config = shadow_config_from_settings(settings)
            check_local_target(Path(settings.models), config, settings.default_model)
        except (ShadowConfigError, ModelNotFoundError) as exc:
            raise SettingsError(f"shadow: {exc}") from None
        write_control(run_dir / CONTROL_FILE, config)
        return run_dir

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("received %s: draining", signal.Signals(signum).name)
        self._stopping = True

    def _start(self, slot: _WorkerSlot) -> None:
        slot.process = self._context.Process(
            target=run_worker,
            args=(
                slot.worker_id,
                self.settings,
                self._state.name if self._state is not None else "",
                self._events,
                self._cpus[slot.worker_id],
                self._limiter.name if self._limiter is not None else "",
            ),
            name=f"riskwire-worker-{slot.worker_id}",
        )
        slot.process.start()
        slot.ready, slot.restart_at = False, None

    def _loop(self) -> None:
        settings = self.settings
        next_snapshot = time.monotonic() + settings.snapshot_interval_s
        next_drift = time.monotonic() + settings.drift_eval_s
        next_canary = time.monotonic() + settings.canary_eval_s
        next_retention = time.monotonic()
        announced = False
        while not self._stopping and self._failed is None:
            sentinels = [s.process.sentinel for s in self._slots if s.process is not None]
            wait(sentinels, timeout=0.2)
            self._drain_events()
            if not announced and all(s.ready for s in self._slots):
                announced = True
                log.info(
                    "serving on %s:%d with %d workers",
                    settings.host,
                    settings.port,
                    len(self._slots),
                )
            now = time.monotonic()
            for slot in self._slots:
                self._reap(slot, now)
            if self.drift is not None and now >= next_drift:
                next_drift = now + settings.drift_eval_s
                try:
                    self.drift.evaluate()
                except Exception:  # noqa: BLE001 - monitoring must never stop serving
                    log.exception("drift evaluation failed")
            if self.lifecycle is not None and now >= next_canary:
                next_canary = now + settings.canary_eval_s
                try:
                    self.lifecycle.tick()
                except Exception:  # noqa: BLE001 - a guard failure must never stop serving
                    log.exception("canary evaluation failed")
            if settings.snapshot_interval_s > 0 and now >= next_snapshot:
                self._snapshot()
                next_snapshot = now + settings.snapshot_interval_s
            if now >= next_retention:
                next_retention = now + RETENTION_CHECK_S
                self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete prediction-log segments and reviewed cases past their retention."""
        settings = self.settings
        try:
            if settings.prediction_log_retention_days > 0:
                from riskwire.shadow.records import PREDICTIONS, purge_segments

                cutoff = datetime.now(UTC) - timedelta(days=settings.prediction_log_retention_days)
                removed = purge_segments(settings.shadow_path, PREDICTIONS, cutoff)
                if removed:
                    log.info("retention: removed %d prediction-log segment(s)", removed)
            if settings.review_retention_days > 0 and settings.review_queue_file.exists():
                from .review import ReviewQueue

                queue = ReviewQueue(settings.review_queue_file)
                try:
                    cutoff_ms = time.time() * 1000 - settings.review_retention_days * 86_400_000
                    removed = queue.purge(int(cutoff_ms))
                finally:
                    queue.close()
                if removed:
                    log.info("retention: removed %d reviewed case(s)", removed)
        except Exception:  # noqa: BLE001 - housekeeping must never stop serving
            log.exception("retention failed")

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, WorkerReady):
                self._slots[event.worker_id].ready = True
            elif isinstance(event, WorkerFailed):
                log.error("worker %d could not start: %s", event.worker_id, event.error)
                self._failed = event.error

    def _reap(self, slot: _WorkerSlot, now: float) -> None:
        process = slot.process
        if process is not None and not process.is_alive():
            log.warning(
                "worker %d (pid %s) exited with %s; restarting",
                slot.worker_id,
                process.pid,
                process.exitcode,
            )
            process.join()
            slot.process, slot.ready = None, False
            slot.restart_at = now + self.settings.restart_backoff_s
            if self._state is not None and self._state.break_lock_of(process.pid):
                log.warning(
                    "worker %d died holding the card state lock; released it", slot.worker_id
                )
            if self._limiter is not None and self._limiter.break_lock_of(process.pid):
                log.warning(
                    "worker %d died holding the rate-limit lock; released it", slot.worker_id
                )
        if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
            slot.restarts += 1
            self._start(slot)

    def _snapshot(self) -> None:
        if self._state is None:
            return
        path = self.settings.snapshot_path
        try:
            self._state.snapshot(path)
            log.debug("card state snapshot written to %s", path)
        except OSError as exc:
            log.error("card state snapshot to %s failed: %s", path, exc)

    def _shutdown(self) -> None:
        settings = self.settings
        alive = [s.process for s in self._slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            process.terminate()  # SIGTERM: the worker drains within the grace period
        deadline = time.monotonic() + settings.grace_period_s + 5.0
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
        if self._state is not None:
            self._snapshot()
            self._state.close()
        if self._limiter is not None:
            self._limiter.close()
        log.info("stopped")
