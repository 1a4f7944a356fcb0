"""Server settings: one frozen dataclass, resolved once at start-up and passed down.

Resolution order, highest first: command-line flag > ``RISKWIRE_<FIELD>`` environment
variable > the config file (TOML, ``--config``) > the named profile's defaults >
the ``_DEFAULT`` values below. Only this module reads ``os.environ``.

Profiles: ``dev`` (the default; loopback, verbose; warns loudly without TLS or auth),
``test`` (small state, fast snapshots), ``staging`` and ``prod`` (all interfaces; prod
refuses to start without TLS and authentication).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from riskwire.shadow.config import ShadowConfigError, parse_filter

from .monitoring.recorder import parse_windows
from .ratelimit import parse_rate_limits
from .security import certificate_roles

if TYPE_CHECKING:
    from .redis_state import RedisConfig

ENV_PREFIX = "RISKWIRE_"
PROFILES = ("dev", "test", "staging", "prod")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Settings:
    """Every knob of ``riskwire serve``."""

    profile: str = "dev"
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 0  # 0 = one per available core
    threads_per_worker: int = 8  # gRPC handler threads per worker process
    # Unary scoring calls up to this size run on grpc's polling thread, without a hop to
    # the thread pool (server/grpc/dispatch.py); larger ones, and all calls with the
    # Redis backend, use the pool. 0 = always the pool.
    inline_max_request_bytes: int = 32 * 1024
    pin_workers: bool = True  # pin each worker to its own core when cores >= workers
    # Hand new connections to the workers in turn instead of by the kernel's hash
    # (server/balance.py: eBPF on the reuseport group; needs CAP_BPF, else the hash).
    balance_connections: bool = True
    # GRPC_EXPERIMENTS for the workers unless already set: grpc's older listener accepts
    # connections into the polling thread's own epoll set (one thread hop fewer per call).
    grpc_experiments: str = "-event_engine_listener"
    models: str = "models"  # models directory (RISKWIRE_MODELS)
    default_model: str = "fraud"  # model used when a request names none
    max_message_bytes: int = 16 * 1024 * 1024
    max_batch_rows: int = 100_000  # ScoreBatch / ModelInfer rows per call
    max_concurrent_rpcs: int = 1024  # per worker, queued + running; 0 = unlimited
    queue_budget_ms: float = 20.0  # refuse on arrival when the wait would exceed it; 0 = off
    state_capacity: int = 1 << 20  # per-card state slots (power of two)
    state_snapshot: str = ""  # snapshot file; "" = <models>/.state/cards.snapshot
    snapshot_interval_s: float = 60.0  # 0 disables periodic snapshots
    grace_period_s: float = 10.0  # SIGTERM: time for in-flight calls to finish
    restart_backoff_s: float = 0.5  # supervisor: wait before restarting a dead worker
    default_top_reasons: int = 3
    log_level: str = "INFO"
    # Validation against the package's schema and training profile.
    validation: bool = True
    validate_schema: str = "reject"  # reject | flag | ignore, per check kind
    validate_range: str = "flag"
    validate_category: str = "flag"
    range_tolerance: float = 0.1  # training range widened by this fraction of its span
    output_failsafe: str = ""  # invalid model output: "" = INTERNAL, else this decision
    # Drift monitoring and alerting (see server/monitoring/).
    drift: bool = True
    drift_windows: str = "5m,1h,24h"  # sliding windows measured against the profile
    drift_bucket_s: int = 60  # sketch time resolution
    drift_publish_s: float = 5.0  # workers publish their sketches this often
    drift_eval_s: float = 10.0  # the supervisor measures drift and evaluates alerts
    drift_min_count: int = 200  # fewer requests in a window: no drift verdict (NaN)
    # Percent of answers logged (0 = off) with their inputs as received and features as
    # served: live AUC once labels arrive, and the next model's training data (exports
    # weight rows by 1 / rate). 25 keeps the cost within 5% of throughput on the 2-core VM
    # (perf/bench_prediction_log.py; 100% cost 5.6-6.6%).
    prediction_log_rate: float = 25.0
    prediction_log_card_ids: bool = False  # also log raw card ids (else only their hash)
    # Where segments are built and written: "process" (a low-priority process per worker,
    # off the worker's core and GIL) or "thread" (the worker's own background thread).
    prediction_log_writer: str = "process"
    # Retention (0 = keep): prediction-log segments, and review cases once labelled and in
    # the label store. Labels and shadow records are kept (reports and exports join them).
    prediction_log_retention_days: float = 0.0
    review_retention_days: float = 0.0
    # Human review: "review" decisions, plus this percent of the others (so the labelled
    # set is not only the grey zone), queue as cases (riskwire review next / label).
    review_queue: bool = True
    review_sample_percent: float = 1.0
    review_max_cases_per_s: float = 20.0  # per worker; over it, review decisions are sampled
    review_queue_path: str = ""  # "" = <shadow_dir>/review.sqlite
    performance_eval_s: float = 300.0  # live performance from logged predictions + labels
    performance_min_labels: int = 100  # fewer labelled predictions in a window: NaN
    alert_rules: str = ""  # TOML file with [[rule]] and [[route]] tables; "" = defaults
    alert_webhook: str = ""  # also POST every alert to this URL
    # Request-level log: one JSON line per unary call, per worker file, size-rotated.
    request_log_dir: str = ""  # "" = off; else <dir>/requests-w<worker>.jsonl
    request_log_max_mb: float = 64.0  # a file is rotated before it would pass this size
    request_log_backups: int = 5
    # OpenTelemetry server spans, built off the hot path (see server/tracing.py).
    request_log_exporter: str = ""  # "" = off | console | otlp-grpc | otlp-http (log records)
    request_log_endpoint: str = ""  # OTLP collector ("" = the exporter's default)
    tracing_exporter: str = ""  # "" = off | console | jsonl | otlp-grpc | otlp-http
    tracing_endpoint: str = ""  # OTLP collector ("" = the exporter's default)
    tracing_dir: str = ""  # jsonl: <dir>/spans-w<worker>.jsonl ("" = <models>/.traces)
    tracing_sample_ratio: float = 0.01  # plus every error, slow call and sampled parent
    tracing_slow_ms: float = 50.0
    # Metrics: merged over workers on a Prometheus endpoint of the control plane, and OTLP.
    metrics: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # Prometheus /metrics; 0 = any free port (logged)
    metrics_publish_s: float = 1.0  # how often each worker publishes its counters
    metrics_exporter: str = ""  # "" = none | otlp-grpc | otlp-http (the merged metrics)
    metrics_endpoint: str = ""  # OTLP collector ("" = the exporter's default)
    metrics_export_s: float = 10.0
    # Security: API keys (see `riskwire keys`), TLS/mTLS for both planes, rate limits.
    auth: bool = False  # require a key (or client certificate) on every call
    auth_key_file: str = ""  # "" = <models>/.auth/keys.json
    api_keys: str = ""  # the key document inline (RISKWIRE_API_KEYS), instead of the file
    auth_open_health: bool = True  # health, reflection, ServerLive/Ready without a key
    tls_cert: str = ""  # PEM certificate chain of both planes; "" = plaintext
    tls_key: str = ""  # its PEM private key
    tls_client_ca: str = ""  # mutual TLS: client certificates must chain to this CA
    tls_client_roles: str = "score"  # roles of a client known by its certificate alone
    rate_limits: str = ""  # per client "default=1000/2000; payments=5000/10000" (rate/burst)
    rate_limit_slots: int = 16384  # clients tracked at once (shared by all workers)
    audit_log: str = ""  # hash-chained admin audit log; "" = <models>/.audit/audit.jsonl
    # Where state shared beyond one machine lives. "redis": per-card feature state,
    # rate-limit buckets and traffic configurations are shared by every replica through
    # Redis (see server/redis_cards.py and server/redis_state.py).
    state_backend: str = "local"  # local | redis
    redis_url: str = "redis://127.0.0.1:6379/0"  # rediss:// for TLS
    redis_key_prefix: str = "riskwire"
    redis_timeout_ms: float = 50.0  # one request-path command; never longer
    # closed: UNAVAILABLE; degrade: score with stateless features / unthrottled, flagged
    # ("state_unavailable") and counted
    redis_on_failure: str = "closed"
    redis_tls_ca: str = ""  # CA bundle verifying Redis (rediss:// only)
    redis_tls_cert: str = ""  # client certificate for mutual TLS with Redis
    redis_tls_key: str = ""  # its private key
    redis_card_ttl_days: float = 90.0  # a card idle this long is forgotten (0 = never)
    redis_card_cache: int = 1 << 16  # cards whose latest state each worker remembers
    # Automatic canary guards (over the calls since the current step began).
    canary_eval_s: float = 1.0
    canary_max_error_rate: float = 0.01  # server errors per call
    canary_max_p99_ratio: float = 3.0  # canary p99 / primary p99
    canary_max_score_psi: float = 0.25  # output-score drift of the canary
    canary_max_disagreement: float = 0.2  # decisions differing from the primary's (shadow)
    canary_min_calls: int = 20  # calls on the canary before a verdict or a step
    # Control plane (admin API, in the supervisor). 0 = any free port (logged).
    admin_host: str = "127.0.0.1"
    admin_port: int = 50052
    # Writable data of the control plane (drift history, alert incidents); "" = the models
    # directory. Set it when the models volume is read-only (deploy/kubernetes).
    data_dir: str = ""
    run_dir: str = ""  # runtime files (shadow control, worker stats); "" = a private temp dir
    # Shadow deployment (changeable at runtime through the admin API).
    shadow_model: str = ""  # local shadow: "version" or "name:version"; "" = off
    shadow_endpoint: str = ""  # remote OIP v2 shadow host:port (instead of a local version)
    shadow_rate: float = 100.0  # percent of the primary's requests to mirror
    shadow_filter: str = ""  # e.g. "channel=ecommerce; amount>=100"
    shadow_timeout_s: float = 1.0  # per remote shadow call
    shadow_dir: str = ""  # paired records and labels; "" = <models>/.shadow
    shadow_queue_size: int = 10_000  # per worker; a full queue drops (and counts) mirrors
    shadow_batch_rows: int = 256  # rows per shadow kernel/remote call
    shadow_flush_rows: int = 10_000  # a segment is written once this many records wait
    shadow_flush_seconds: float = 5.0  # records buffered for at most this long
    shadow_record_features: bool = True  # store the feature vector in each record
    shadow_scorer: str = "process"  # "process": a scorer process per worker; "thread": in it
    shadow_priority: str = "idle"  # the scorer process's CPU priority: "idle" or "normal"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SettingsError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is out of range 0..65535")
        if self.workers < 0 or self.threads_per_worker < 1:
            raise SettingsError("workers must be >= 0 and threads_per_worker >= 1")
        if self.inline_max_request_bytes < 0:
            raise SettingsError("inline_max_request_bytes must be >= 0 (0 = the thread pool)")
        if self.state_capacity < 8 or self.state_capacity & (self.state_capacity - 1):
            raise SettingsError(f"state_capacity {self.state_capacity} must be a power of two")
        if self.max_batch_rows < 1 or self.max_message_bytes < 1024:
            raise SettingsError("max_batch_rows must be >= 1 and max_message_bytes >= 1024")
        if not 0 <= self.default_top_reasons <= 10:
            raise SettingsError("default_top_reasons must be in 0..10")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"metrics_port {self.metrics_port} is out of range 0..65535")
        if self.metrics_publish_s <= 0 or self.metrics_export_s <= 0:
            raise SettingsError("metrics_publish_s and metrics_export_s must be > 0")
        if self.metrics_exporter not in ("", "otlp-grpc", "otlp-http"):
            raise SettingsError(
                f"metrics_exporter {self.metrics_exporter!r} is not one of otlp-grpc, "
                "otlp-http (or empty for none)"
            )
        if not 0 <= self.admin_port <= 65535:
            raise SettingsError(f"admin_port {self.admin_port} is out of range 0..65535")
        if not 0.0 <= self.shadow_rate <= 100.0:
            raise SettingsError(f"shadow_rate must be in 0..100, got {self.shadow_rate}")
        for name in ("shadow_queue_size", "shadow_batch_rows", "shadow_flush_rows"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shadow_timeout_s <= 0 or self.shadow_flush_seconds <= 0:
            raise SettingsError("shadow_timeout_s and shadow_flush_seconds must be > 0")
        if self.shadow_scorer not in ("process", "thread"):
            raise SettingsError(f"shadow_scorer {self.shadow_scorer!r} is not process or thread")
        if self.prediction_log_writer not in ("process", "thread"):
            raise SettingsError(
                f"prediction_log_writer {self.prediction_log_writer!r} is not process or thread"
            )
        if self.shadow_priority not in ("idle", "normal"):
            raise SettingsError(f"shadow_priority {self.shadow_priority!r} is not idle or normal")
        for name in (
            "grace_period_s",
            "restart_backoff_s",
            "snapshot_interval_s",
            "max_concurrent_rpcs",
            "queue_budget_ms",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tracing_exporter not in ("", "console", "jsonl", "otlp-grpc", "otlp-http"):
            raise SettingsError(
                f"tracing_exporter {self.tracing_exporter!r} is not one of console, jsonl, "
                "otlp-grpc, otlp-http (or empty for off)"
            )
        if self.request_log_exporter not in ("", "console", "otlp-grpc", "otlp-http"):
            raise SettingsError(
                f"request_log_exporter {self.request_log_exporter!r} is not one of console, "
                "otlp-grpc, otlp-http (or empty for off)"
            )
        if not 0.0 <= self.tracing_sample_ratio <= 1.0 or self.tracing_slow_ms < 0:
            raise SettingsError("tracing_sample_ratio must be in 0..1, tracing_slow_ms >= 0")
        if self.request_log_max_mb <= 0 or self.request_log_backups < 0:
            raise SettingsError("request_log_max_mb must be > 0 and request_log_backups >= 0")
        if not 0.0 <= self.prediction_log_rate <= 100.0 or self.performance_eval_s <= 0:
            raise SettingsError("prediction_log_rate must be in 0..100, performance_eval_s > 0")
        if self.drift_bucket_s < 1 or self.drift_publish_s <= 0 or self.drift_eval_s <= 0:
            raise SettingsError("drift_bucket_s must be >= 1, drift_publish/eval_s > 0")
        try:
            parse_windows(self.drift_windows)
        except ValueError as exc:
            raise SettingsError(f"drift_windows: {exc}") from None
        for name in ("validate_schema", "validate_range", "validate_category"):
            if getattr(self, name) not in ("reject", "flag", "ignore"):
                raise SettingsError(f"{name} must be reject, flag or ignore")
        if self.output_failsafe not in ("", "approve", "review", "decline"):
            raise SettingsError("output_failsafe must be '', approve, review or decline")
        if self.range_tolerance < 0:
            raise SettingsError(f"range_tolerance must be >= 0, got {self.range_tolerance}")
        try:
            parse_filter(self.shadow_filter)
        except ShadowConfigError as exc:
            raise SettingsError(f"shadow_filter: {exc}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{name}: no such file {path}")
        try:
            parse_rate_limits(self.rate_limits)
            certificate_roles(self.tls_client_roles)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.canary_eval_s <= 0 or self.canary_min_calls < 1:
            raise SettingsError("canary_eval_s must be > 0 and canary_min_calls >= 1")
        if self.state_backend not in ("local", "redis"):
            raise SettingsError(f"state_backend {self.state_backend!r} is not local or redis")
        if self.redis_on_failure not in ("closed", "degrade") or self.redis_timeout_ms <= 0:
            raise SettingsError("redis_on_failure must be closed or degrade, redis_timeout_ms > 0")
        if self.prediction_log_retention_days < 0 or self.review_retention_days < 0:
            raise SettingsError("retention days must be >= 0 (0 keeps everything)")
        if not 0.0 <= self.review_sample_percent <= 100.0 or self.review_max_cases_per_s < 0:
            raise SettingsError(
                "review_sample_percent must be in 0..100, review_max_cases_per_s >= 0"
            )
        if self.redis_card_ttl_days < 0 or self.redis_card_cache < 1:
            raise SettingsError("redis_card_ttl_days must be >= 0, redis_card_cache >= 1")
        if self.state_backend == "redis":
            try:
                self.redis_config()
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if self.rate_limit_slots < 8:
            raise SettingsError(f"rate_limit_slots must be >= 8, got {self.rate_limit_slots}")
        if self.profile == "prod" and not (self.tls_cert and self.auth):
            raise SettingsError(
                "profile prod refuses to start without TLS and authentication: set tls_cert, "
                "tls_key and auth = true (see `riskwire certs dev` and `riskwire keys create`)"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            raise SettingsError(
                f"log_level {self.log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
            )

    def redis_config(self) -> RedisConfig:
        """Connection settings of the Redis state backend."""
        from .redis_state import RedisConfig

        return RedisConfig(
            url=self.redis_url,
            key_prefix=self.redis_key_prefix,
            op_timeout_s=self.redis_timeout_ms / 1000,
            on_failure=self.redis_on_failure,  # type: ignore[arg-type]
            tls_ca_path=self.redis_tls_ca,
            tls_cert_path=self.redis_tls_cert,
            tls_key_path=self.redis_tls_key,
        )

    @property
    def worker_count(self) -> int:
        """Workers to start: the setting, or the number of cores this process may use."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def snapshot_path(self) -> Path:
        """Where per-card state is snapshotted and restored from."""
        return Path(self.state_snapshot or Path(self.models) / ".state" / "cards.snapshot")

    @property
    def incident_log(self) -> Path:
        """Append-only alert incident log."""
        return Path(self.data_dir or self.models) / ".alerts" / "incidents.jsonl"

    @property
    def drift_history(self) -> Path:
        """Drift measures over time (JSON lines), for the drift report."""
        return Path(self.data_dir or self.models) / ".drift" / "history.jsonl"

    @property
    def shadow_path(self) -> Path:
        """Where shadow records and labels are written."""
        return Path(self.shadow_dir or Path(self.models) / ".shadow")

    @property
    def review_queue_file(self) -> Path:
        """The review queue (SQLite)."""
        return Path(self.review_queue_path or self.shadow_path / "review.sqlite")

    @property
    def key_file(self) -> Path:
        """Where API keys are read from (unless ``api_keys`` holds them inline)."""
        return Path(self.auth_key_file or Path(self.models) / ".auth" / "keys.json")

    @property
    def audit_path(self) -> Path:
        """The admin audit log."""
        return Path(self.audit_log or Path(self.models) / ".audit" / "audit.jsonl")

    def warnings(self) -> list[str]:
        """Loud start-up warnings for risky combinations."""
        found = []
        missing = [name for name, on in (("TLS", self.tls_cert), ("authentication", self.auth))
                   if not on]  # fmt: skip
        if missing:
            found.append(
                f"{' and '.join(missing)} OFF: any process that can reach "
                f"{self.host}:{self.port} can score and change the server"
                + ("" if self.host in ("127.0.0.1", "localhost", "::1") else " (not loopback!)")
            )
        return found


_PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dev": {},
    "test": {
        "state_capacity": 1 << 16,
        "snapshot_interval_s": 5.0,
        "grace_period_s": 3.0,
        "shadow_flush_seconds": 0.5,
        "metrics_publish_s": 0.25,
    },
    "staging": {"host": "0.0.0.0"},
    "prod": {"host": "0.0.0.0", "log_level": "WARNING"},
}


def load_settings(
    *,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Resolve settings from flags (``overrides``), environment, file and profile."""
    environ = dict(os.environ if environ is None else environ)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = _read_file(config_file) if config_file else {}
    from_env = _from_environ(environ)
    profile = overrides.get("profile") or from_env.get("profile") or from_file.get("profile", "dev")
    if profile not in PROFILES:
        raise SettingsError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    values = {**_PROFILE_DEFAULTS[profile], **from_file, **from_env, **overrides}
    values["profile"] = profile
    try:
        return Settings(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from exc


def _field_types() -> dict[str, type]:
    hints = get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings)}


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _field_types()[name]
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    if isinstance(raw, str):
        try:
            if kind is bool:
                lowered = raw.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                return lowered in ("1", "true", "yes", "on")
            return kind(raw)
        except ValueError:
            pass
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    raise SettingsError(f"{source}: {name} must be {kind.__name__}, got {raw!r}")


def _read_file(path: str | Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc
    section = raw.get("server", raw)
    known = _field_types()
    unknown = sorted(k for k in section if k not in known)
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return {k: _coerce(k, v, str(path)) for k, v in section.items()}


def _from_environ(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for name in _field_types():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key], key)
    return values


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy of ``settings`` with some fields changed (validated again)."""
    return dataclasses.replace(settings, **changes)
