"""A data-plane worker process: loads models, attaches to shared state, serves gRPC.

Workers are started with the ``spawn`` method by the supervisor, so nothing gRPC-related
exists in the process before :func:`run_worker` creates its server. All workers bind
the same port with SO_REUSEPORT and the kernel spreads connections across them.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
SERVICE_NAMES = ("riskwire.v1.Scoring", "inference.GRPCInferenceService")
MODELS_STATUS_DIR = "models"  # under the run dir: each worker's loaded versions


@dataclass(frozen=True)
class WorkerReady:
    """Worker → supervisor: serving on the port (message sent through the events queue)."""

    worker_id: int
    pid: int
    models: tuple[str, ...]


@dataclass(frozen=True)
class WorkerFailed:
    """Worker → supervisor: could not start; the supervisor stops instead of looping."""

    worker_id: int
    pid: int
    error: str  # "module.Class: message"


def configure_logging(level: str, tag: str) -> None:
    """Plain structured-enough stderr logging, one line per record, tagged by process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {tag} %(name)s: %(message)s",
    )


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments shared by every worker's server."""
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def grpc_environment(settings: Settings) -> None:
    """Set grpc's process-wide knobs for worker processes spawned after this call (a
    variable the operator set wins)."""
    if settings.grpc_experiments:
        os.environ.setdefault("GRPC_EXPERIMENTS", settings.grpc_experiments)


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, grpc, the loaded models) out of the
    garbage collector's reach: it lives as long as the process and holds no garbage.

    Unfrozen, each full collection scanned that whole heap with the GIL held: ~60 ms on
    the 2-core VM, every 10-20 s under load, which put every request of the worker
    behind it (59-88 ms maximum latencies at 60% load). Frozen, a full collection takes
    ~0.5 ms.
    """
    gc.collect()
    gc.freeze()


def _die_with_parent() -> None:
    """Get SIGTERM when the supervisor dies (even by SIGKILL), so no orphan keeps the port."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: fall back to polling the parent
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def run_worker(
    worker_id: int,
    settings: Settings,
    state_name: str,
    events: Queue,
    cpu: int | None,
    limiter_name: str = "",
) -> None:
    """Entry point of a worker process (the supervisor's spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor coordinates shutdown
    _die_with_parent()
    configure_logging(settings.log_level, f"worker-{worker_id}[{os.getpid()}]")
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        server, health, state, (mirror, recorder, predictions, request_log, review) = _build_server(
            worker_id, settings, state_name, events, limiter_name
        )
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, then exit non-zero
        log.exception("worker %d failed to start", worker_id)
        events.put(
            WorkerFailed(
                worker_id, os.getpid(), f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
            )
        )
        raise SystemExit(3) from exc
    freeze_startup_heap()

    stopping = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        health.enter_graceful_shutdown()
        log.info("draining (grace %.1fs)", settings.grace_period_s)
        server.stop(settings.grace_period_s)

    signal.signal(signal.SIGTERM, on_sigterm)
    server.wait_for_termination()
    mirror.stop(timeout_s=settings.grace_period_s)
    if recorder is not None:
        recorder.stop()
    if predictions is not None:
        predictions.stop()
    if request_log is not None:
        request_log.stop()
    if review is not None:
        review.close()
    state.close()
    log.info("stopped")
    logging.shutdown()
    # Leave without interpreter teardown: numpy views of the shared memory may still be
    # referenced by gRPC threads, and SharedMemory.__del__ would complain about them.
    os._exit(0)


def _build_server(worker_id, settings, state_name, events, limiter_name):  # noqa: ANN001, ANN202
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from riskwire.kernels import features
    from riskwire.protos import scoring_pb2_grpc
    from riskwire.shadow.labels import LabelStore

    from .dataplane import DataPlane
    from .grpc import infer_wire
    from .grpc.inference import InferenceServicer
    from .grpc.inference import add_to_server as add_inference_service
    from .grpc.reflection import enable_reflection
    from .grpc.scoring import RequestIds, ScoringServicer
    from .registry import ModelRegistry
    from .traffic import open_traffic_store

    registry = ModelRegistry(
        Path(settings.models),
        settings.default_model,
        range_tolerance=settings.range_tolerance,
        store=open_traffic_store(settings),
    )
    runtimes = registry.load_all()
    if not runtimes:
        raise RuntimeError(f"no loadable model package under {settings.models}")
    state = _open_card_state(settings, state_name)
    features.warmup()
    infer_wire.warmup()
    for runtime in runtimes:
        runtime.warmup()
    from riskwire.shadow.records import warm_up as warm_up_segments

    warm_up_segments()
    mirror = _start_mirror(worker_id, settings, registry)
    policy = _validation_policy(settings)
    recorder = _start_recorder(worker_id, settings, runtimes, policy)
    if recorder is not None:  # versions loaded later (promote, canary) are sketched too
        registry.on_load = lambda r: recorder.add_model(r.name, r.version, r.package.profile)
    from .registry import TrafficWatcher

    watcher = TrafficWatcher(
        registry,
        worker_id,
        Path(settings.run_dir) / MODELS_STATUS_DIR / f"worker-{worker_id}-{os.getpid()}.json",
    )
    watcher.start()
    predictions = _start_prediction_log(worker_id, settings)
    shed: dict = {}  # the admission interceptor, once the server is built
    review = _start_review_sink(settings)
    request_log = _start_request_log(
        worker_id, settings, _observer(mirror, predictions, policy, shed, state, review)
    )
    dataplane = DataPlane(
        registry,
        state,
        default_top_reasons=settings.default_top_reasons,
        max_batch_rows=settings.max_batch_rows,
        mirror=mirror,
        policy=policy,
        monitor=recorder,
        predictions=predictions,
        review=review,
    )
    dataplane.trace_stages = request_log is not None and request_log.tracing is not None
    if dataplane.trace_stages and settings.shadow_scorer == "thread":
        mirror.recorder.tracing = request_log.tracing  # the scorer process has its own
    labels = LabelStore(settings.shadow_path, worker_id)

    from .security import listen, make_gate

    gate = make_gate(settings, limiter_name)
    interceptors = []
    if gate is not None:
        from .grpc.status import configure_gate
        from .security import OpenServicesInterceptor

        configure_gate(gate)
        if settings.auth and not settings.auth_open_health:
            interceptors.append(OpenServicesInterceptor(gate))
    polling_thread_dispatch(settings)
    executor = futures.ThreadPoolExecutor(
        max_workers=settings.threads_per_worker, thread_name_prefix=f"w{worker_id}"
    )
    if settings.queue_budget_ms > 0:
        from .admission import AdmissionInterceptor, ServiceTime
        from .grpc.status import configure_admission

        service = ServiceTime()
        configure_admission(service)
        admission = AdmissionInterceptor(
            executor, settings.threads_per_worker, settings.queue_budget_ms / 1000, service
        )
        interceptors.insert(0, admission)  # first: a refused call costs nothing else
        shed["admission"] = admission
    server = grpc.server(
        executor,
        options=grpc_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        interceptors=interceptors,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    serving = threading.Event()
    ids = RequestIds()
    scoring_pb2_grpc.add_ScoringServicer_to_server(ScoringServicer(dataplane, labels, ids), server)
    add_inference_service(InferenceServicer(dataplane, serving.is_set, ids), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([*SERVICE_NAMES, health.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    port = listen(server, address, settings)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    if settings.balance_connections:
        balance_connections(port, settings.worker_count)
    # Models are loaded and every kernel compiled and warmed: report SERVING.
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    serving.set()
    events.put(WorkerReady(worker_id, os.getpid(), tuple(registry.names())))
    log.info("serving %s on %s", ", ".join(r.name + " v" + r.version for r in runtimes), address)
    return (
        server,
        health_servicer,
        state,
        (mirror, recorder, predictions, request_log, dataplane.review),
    )


def balance_connections(port: int, workers: int) -> None:
    """Hand this port's new connections to the ``workers`` listeners in turn
    (server/balance.py); where that is not possible the kernel's hash stays."""
    from .balance import BalanceUnavailable, spread_connections

    if workers < 2:
        return
    try:
        attached = spread_connections(port, workers)
    except BalanceUnavailable as exc:
        log.info("new connections spread by the kernel's hash: %s", exc)
        return
    log.debug("new connections handed out in turn (attached to %d listening sockets)", attached)


def polling_thread_dispatch(settings: Settings) -> None:
    """Small unary calls on grpc's polling thread, unless a handler may block (Redis);
    grpc's per-call context managers replaced by lighter ones (``grpc/call_scopes.py``)."""
    from .grpc import call_scopes, dispatch

    call_scopes.install()
    limit = settings.inline_max_request_bytes
    if settings.state_backend == "redis":
        limit = 0  # a card-state round trip per call must not hold up the polling thread
    dispatch.configure(limit)
    if limit:
        dispatch.install()


_STATE_COUNTERS = {
    "calls": "Feature-state updates (one per scoring call)",
    "round_trips": "Round trips to the state store",
    "conflicts": "Card writes retried because another writer came first",
    "degraded": "Calls scored with stateless features: the state store was unavailable",
}


def _open_card_state(settings, state_name: str):  # noqa: ANN001, ANN202
    """The per-card feature state: the supervisor's shared-memory table, or Redis."""
    if settings.state_backend != "redis":
        from .state import SharedCardState

        return SharedCardState.attach(state_name)
    from redis.exceptions import RedisError

    from .redis_cards import RedisCardState

    state = RedisCardState(
        settings.redis_config(),
        ttl_s=settings.redis_card_ttl_days * 86_400,
        cache_size=settings.redis_card_cache,
    )
    try:
        state.warmup()
    except RedisError as exc:  # serve anyway: each call then follows redis_on_failure
        log.warning("card state: Redis unavailable at start-up: %s", exc)
    return state


def _observer(mirror, predictions, policy, shed, state, review):  # noqa: ANN001, ANN202
    """Series sampled when this worker publishes its metrics: queue depths, validation,
    helper-process restarts, calls refused by admission control, the Redis card state's
    round trips."""
    from .monitoring.metrics import counter, gauge

    def observe() -> list[dict]:
        depths = {"shadow": mirror.queued()}
        if predictions is not None:
            depths["prediction_log"] = predictions.pending
        if review is not None:
            depths["review"] = review.backlog
        out = [
            gauge(
                "riskwire.queue.depth",
                depth,
                {"queue": queue},
                unit="{item}",
                description="Items waiting in a background queue",
            )  # fmt: skip
            for queue, depth in depths.items()
        ]
        if policy is not None:
            out.extend(
                counter(
                    "riskwire.validation.rows",
                    value,
                    {"outcome": outcome},
                    unit="{row}",
                    description="Rows by validation outcome",
                )  # fmt: skip
                for outcome, value in policy.counts.items()
            )
        restarts = {"shadow_scorer": getattr(mirror.recorder, "restarts", None)}
        if predictions is not None:
            restarts["prediction_log_writer"] = predictions.writer_restarts
        out.extend(
            counter("riskwire.helper.restarts", value, {"process": name}, unit="{process}",
                    description="Restarts of a worker's helper processes after they died")
            for name, value in restarts.items()
            if value is not None
        )  # fmt: skip
        admission = shed.get("admission")
        if admission is not None:
            out.append(
                counter("riskwire.admission.refused", admission.refused, {}, unit="{request}",
                        description="Calls refused on arrival: the queue was over its budget")
            )  # fmt: skip
        counters = getattr(state, "counters", None)
        if counters is not None:  # Redis: round trips, lost compare-and-sets, degraded calls
            out.extend(
                counter(f"riskwire.state.{name}", value, {"backend": "redis"}, unit="{call}",
                        description=_STATE_COUNTERS[name])
                for name, value in counters().items()
            )  # fmt: skip
        return out

    return observe


def _tracing_options(settings: Settings, worker_id: int, suffix: str) -> dict | None:
    """How a process of this worker makes its tracer (``make_tracing`` arguments; spans go
    to ``spans-w<worker><suffix>.jsonl`` with the jsonl exporter); None when tracing is off."""
    if not settings.tracing_exporter:
        return None
    directory = Path(settings.tracing_dir or Path(settings.models) / ".traces")
    return {
        "exporter": settings.tracing_exporter,
        "endpoint": settings.tracing_endpoint,
        "path": str(directory / f"spans-w{worker_id}{suffix}.jsonl"),
        "worker": worker_id,
        "address": (settings.host, settings.port),
        "sample_ratio": settings.tracing_sample_ratio,
        "slow_ms": settings.tracing_slow_ms,
    }


def _start_request_log(worker_id, settings, observe):  # noqa: ANN001, ANN202
    """This worker's call recorder (request log, server spans and metrics), installed
    for every unary handler; None when all three are off."""
    if not (
        settings.request_log_dir
        or settings.request_log_exporter
        or settings.tracing_exporter
        or settings.metrics
    ):
        return None
    from .grpc.status import configure_request_log
    from .request_log import RequestLog

    tracing = None
    options = _tracing_options(settings, worker_id, "")
    if options is not None:
        from .tracing import make_tracing

        tracing = make_tracing(options)
    metrics = None
    if settings.metrics:
        from .monitoring.metrics import METRICS_DIR, CallMetrics

        metrics = CallMetrics(
            worker_id,
            Path(settings.run_dir) / METRICS_DIR / f"worker-{worker_id}-{os.getpid()}.json",
            publish_s=settings.metrics_publish_s,
            observe=observe,
        )
    log_records = None
    if settings.request_log_exporter:
        from .tracing import LogRecords, make_log_exporter

        exporter = make_log_exporter(settings.request_log_exporter, settings.request_log_endpoint)
        log_records = LogRecords(exporter, worker=worker_id)
    log_dir = settings.request_log_dir
    request_log = RequestLog(
        Path(log_dir) / f"requests-w{worker_id}.jsonl" if log_dir else None,
        worker=worker_id,
        max_bytes=int(settings.request_log_max_mb * 1024 * 1024),
        backups=settings.request_log_backups,
        tracing=tracing,
        metrics=metrics,
        log_records=log_records,
    )
    request_log.start()
    configure_request_log(request_log)
    return request_log


def _start_prediction_log(worker_id, settings):  # noqa: ANN001, ANN202
    """This worker's prediction log (None when the rate is 0)."""
    if settings.prediction_log_rate <= 0:
        return None
    from .monitoring.predictions import PredictionLog

    log_ = PredictionLog(
        settings.shadow_path,
        worker_id,
        rate_percent=settings.prediction_log_rate,
        card_ids=settings.prediction_log_card_ids,
        flush_seconds=settings.shadow_flush_seconds,
        flush_rows=settings.shadow_flush_rows,
        writer=settings.prediction_log_writer,
    )
    log_.start()
    return log_


def _start_review_sink(settings):  # noqa: ANN001, ANN202
    """Cases for human review from this worker (None when the queue is off)."""
    if not settings.review_queue:
        return None
    from .review import ReviewSink

    return ReviewSink(
        settings.review_queue_file,
        sample_rate=settings.review_sample_percent / 100.0,
        max_review_per_s=settings.review_max_cases_per_s,
    )


def _start_recorder(worker_id, settings, runtimes, policy):  # noqa: ANN001, ANN202
    """This worker's drift sketches (None when drift monitoring is off)."""
    if not settings.drift:
        return None
    from .admin import DRIFT_DIR
    from .monitoring.recorder import DriftRecorder, parse_windows

    recorder = DriftRecorder(
        worker_id,
        Path(settings.run_dir) / DRIFT_DIR / f"worker-{worker_id}-{os.getpid()}.json",
        windows=parse_windows(settings.drift_windows),
        bucket_s=settings.drift_bucket_s,
        publish_s=settings.drift_publish_s,
        counters=(lambda: dict(policy.counts)) if policy is not None else None,
    )
    for runtime in runtimes:
        recorder.add_model(runtime.name, runtime.version, runtime.package.profile)
    recorder.start()
    return recorder


def _validation_policy(settings: Settings):  # noqa: ANN202
    """The request/response validation policy, or None when validation is off."""
    if not settings.validation:
        return None
    from .validation import PolicyConfig, ValidationPolicy

    config = PolicyConfig(
        schema=settings.validate_schema,
        range=settings.validate_range,
        category=settings.validate_category,
    )
    return ValidationPolicy(config, settings.output_failsafe)


def _start_mirror(worker_id, settings, registry):  # noqa: ANN001, ANN202
    """This worker's shadow mirror, configured from the supervisor's control file."""
    from riskwire.shadow.mirror import MirrorSettings, PairRecorder, ShadowMirror
    from riskwire.shadow.records import RECORDS
    from riskwire.shadow.scorer_process import ScorerProcess
    from riskwire.shadow.targets import LocalTarget

    from .admin import CONTROL_FILE, STATS_DIR
    from .errors import ModelNotFoundError

    def resolve_local(name: str, version: str) -> LocalTarget:
        try:
            runtime = registry.get(name, version)
        except ModelNotFoundError:
            if not version:
                raise
            runtime = registry.load(Path(settings.models) / name / version)
            runtime.warmup()
        return LocalTarget(
            runtime.name,
            runtime.version,
            runtime.forest,
            runtime.review_threshold,
            runtime.decline_threshold,
            str(runtime.package.path),
        )

    run_dir = Path(settings.run_dir)
    mirror_settings = MirrorSettings(
        records_dir=settings.shadow_path / RECORDS,
        stats_path=run_dir / STATS_DIR / f"worker-{worker_id}-{os.getpid()}.json",
        control_path=run_dir / CONTROL_FILE,
        queue_size=settings.shadow_queue_size,
        batch_rows=settings.shadow_batch_rows,
        flush_rows=settings.shadow_flush_rows,
        flush_seconds=settings.shadow_flush_seconds,
        record_features=settings.shadow_record_features,
    )
    if settings.shadow_scorer == "process":
        recorder = ScorerProcess(
            worker_id,
            mirror_settings,
            idle_priority=settings.shadow_priority == "idle",
            tracing=_tracing_options(settings, worker_id, "-shadow"),
        )
    else:
        recorder = PairRecorder(worker_id, mirror_settings)
    mirror = ShadowMirror(
        worker_id, mirror_settings, resolve_local, settings.default_model, recorder=recorder
    )
    mirror.refresh()  # apply the current configuration before taking traffic
    mirror.start()
    return mirror
