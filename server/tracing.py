"""OpenTelemetry server spans, built after the fact off the hot path.

Handlers only take two clock readings and append a tuple (see ``request_log``); the
request-log thread turns each finished call into a SERVER span with its real start and
end times, the caller's W3C parent, and the RPC semantic-convention attributes, then
hands it to a batch span processor. So tracing costs the hot path nothing, and the
sampling decision can see the outcome: a call is kept when its caller sampled it, when
it failed, when it was slower than ``slow_ms``, or by the ``sample_ratio`` coin.

Exporters: ``console``, ``jsonl`` (one OTLP-JSON-like span per line in a file),
``otlp-grpc`` and ``otlp-http`` (need ``opentelemetry-exporter-otlp``).
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from riskwire import __version__

from .monitoring.metrics import GRPC_CODES, grpc_service

MAX_LINKS = 128  # the SDK's default link limit per span
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)

EXPORTERS = ("console", "jsonl", "otlp-grpc", "otlp-http")


class JsonLinesSpanExporter(SpanExporter):
    """Appends every span as one JSON object per line (for tests and air-gapped sites).

    Encoded with orjson: at 100% sampling the standard library's encoder alone cost
    about 10 µs of every ~110 µs call (it runs on a thread of the worker, under its GIL).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._resources: dict[int, tuple[Resource, dict]] = {}

    def _resource(self, resource: Resource) -> dict:
        """The resource's attributes as a dict (the same few on every span: made once)."""
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            cached = self._resources[id(resource)] = (resource, dict(resource.attributes))
        return cached[1]

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.context
            parent = span.parent
            lines.append(
                orjson.dumps(
                    {
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": f"{context.trace_id:032x}",
                        "span_id": f"{context.span_id:016x}",
                        "parent_span_id": f"{parent.span_id:016x}" if parent else "",
                        "start_time_unix_nano": span.start_time,
                        "end_time_unix_nano": span.end_time,
                        "status": span.status.status_code.name,
                        "links": [
                            {
                                "trace_id": f"{link.context.trace_id:032x}",
                                "span_id": f"{link.context.span_id:016x}",
                            }
                            for link in span.links
                        ],  # fmt: skip
                        "events": [
                            {
                                "name": e.name,
                                "time_unix_nano": e.timestamp,
                                "attributes": dict(e.attributes or {}),
                            }
                            for e in span.events
                        ],  # fmt: skip
                        "attributes": dict(span.attributes or {}),
                        "resource": self._resource(span.resource),
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
        with self._lock, open(self.path, "ab") as handle:
            handle.write(b"".join(lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


def make_exporter(kind: str, *, endpoint: str = "", path: str = "") -> SpanExporter:
    """The span exporter named in the settings."""
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "jsonl":
        return JsonLinesSpanExporter(path or "spans.jsonl")
    if kind in ("otlp-grpc", "otlp-http"):
        try:
            if kind == "otlp-grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
        except ImportError as exc:
            raise ValueError(
                f"tracing exporter {kind} needs the opentelemetry-exporter-otlp package"
            ) from exc
        return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    raise ValueError(f"tracing exporter {kind!r} is not one of {', '.join(EXPORTERS)}")


# (trace id, span id, the caller's parsed traceparent or None)
CallIds = tuple[int, int, "tuple[str, str, bool] | None"]


def worker_resource(worker: int) -> Resource:
    """The OpenTelemetry resource of one worker process (its own service.instance.id)."""
    return Resource.create(
        {
            "service.name": "riskwire",
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-w{worker}",
        }
    )


class Tracing:
    """Builds and samples the spans of one worker.

    Spans are built directly as the SDK's finished ``ReadableSpan`` and handed to its
    batch span processor: the call is over, its ids were chosen when it started and the
    sampling decision is ours, so the tracer's live-span machinery (locks, sampler, id
    generator, one object per event) would only add cost — about 57 µs per span with
    its seven stage events through ``Tracer.start_span``/``add_event``, 4 µs this way.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        worker: int,
        address: tuple[str, int],
        sample_ratio: float = 0.01,
        slow_ms: float = 50.0,
    ) -> None:
        self.resource = worker_resource(worker)
        # A large queue: at 100% sampling a worker makes ~10k spans/s, and the default
        # 2048 drops spans between exports.
        self._processor = BatchSpanProcessor(
            exporter, max_queue_size=1 << 16, max_export_batch_size=2048
        )
        self._scope = InstrumentationScope("riskwire.server", __version__)
        self.worker = worker
        self.address = address
        self.sample_ratio = sample_ratio
        self.slow_s = slow_ms / 1000.0
        self._ratio_bound = int(sample_ratio * (1 << 64))

    def ratio_keeps(self, trace_id: int) -> bool:
        """The ratio part of sampling, decided by the trace id (like TraceIdRatioBased),
        so the server span and the shadow span of one trace agree."""
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self._ratio_bound

    def keep(
        self,
        parent: tuple[str, str, bool] | None,
        status: str,
        latency_s: float,
        trace_id: int | None = None,
    ) -> bool:
        """Sampling: caller sampled, failed, slow, or the ratio (by trace id)."""
        if parent is not None and parent[2]:
            return True
        if status != "OK" or latency_s >= self.slow_s:
            return True
        if trace_id is None:
            return random.random() < self.sample_ratio
        return self.ratio_keeps(trace_id)

    def span(
        self,
        parent: tuple[str, str, bool] | None,
        method: str,
        status: str,
        started: float,
        latency_s: float,
        attributes: dict[str, Any],
        stages: Sequence[tuple[str, float, float]] = (),
        ids: CallIds | None = None,
    ) -> str:
        """Record one finished call as a SERVER span, with one event per stage
        ((name, offset, duration) in seconds from the call's start); returns its span id
        (hex)."""
        if ids is None:  # a caller that chose none: a new span of the caller's trace
            ids = (int(parent[0], 16) if parent else random.getrandbits(128) or 1,
                   random.getrandbits(64) or 1, parent)  # fmt: skip
        remote = None
        if parent is not None:
            remote = SpanContext(int(parent[0], 16), int(parent[1], 16), True, _SAMPLED)
        service = grpc_service(method)
        start_ns = int(started * 1e9)
        events = tuple(
            Event(stage, {"riskwire.duration_us": round(duration_s * 1e6, 1)},
                  start_ns + int(offset_s * 1e9))
            for stage, offset_s, duration_s in stages
        )  # fmt: skip
        self._processor.on_end(
            ReadableSpan(
                name=f"{service}/{method}",
                context=SpanContext(ids[0], ids[1], False, _SAMPLED),
                parent=remote,
                resource=self.resource,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "rpc.grpc.status_code": GRPC_CODES.get(status, 2),
                    "server.address": self.address[0],
                    "server.port": self.address[1],
                    "riskwire.worker": self.worker,
                    **attributes,
                },
                events=events,
                kind=SpanKind.SERVER,
                status=_OK if status == "OK" else Status(StatusCode.ERROR, status),
                start_time=start_ns,
                end_time=start_ns + int(latency_s * 1e9),
                instrumentation_scope=self._scope,
            )
        )
        return f"{ids[1]:016x}"

    def shadow_span(
        self,
        calls: Sequence[CallIds],
        started_ns: int,
        ended_ns: int,
        attributes: dict[str, Any],
        error: str | None = None,
    ) -> None:
        """One INTERNAL span for a shadow-scored batch, linked to the server span of each
        mirrored call; kept when any of those calls' traces is kept by the ratio or was
        sampled by its caller, or when the shadow failed."""
        kept = [c for c in calls if (c[2] is not None and c[2][2]) or self.ratio_keeps(c[0])]
        if not kept and error is None:
            return
        links = tuple(
            Link(SpanContext(t, s, False, _SAMPLED)) for t, s, _ in (kept or calls)[:MAX_LINKS]
        )
        self._processor.on_end(
            ReadableSpan(
                name="riskwire.shadow/score",
                context=SpanContext(
                    random.getrandbits(128) or 1, random.getrandbits(64) or 1, False, _SAMPLED
                ),
                resource=self.resource,
                attributes={
                    "riskwire.worker": self.worker,
                    "riskwire.shadow.calls": len(calls),
                    **attributes,
                },
                links=links,
                kind=SpanKind.INTERNAL,
                status=_OK if error is None else Status(StatusCode.ERROR, error[:200]),
                start_time=started_ns,
                end_time=ended_ns,
                instrumentation_scope=self._scope,
            )
        )

    def shutdown(self) -> None:
        """Export what is buffered."""
        self._processor.shutdown()


LOG_EXPORTERS = ("console", "otlp-grpc", "otlp-http")


def make_log_exporter(kind: str, endpoint: str = "") -> Any:
    """The log-record exporter named in the settings."""
    if kind == "console":
        from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

        return ConsoleLogRecordExporter()
    if kind == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    elif kind == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    else:
        raise ValueError(f"log exporter {kind!r} is not one of {', '.join(LOG_EXPORTERS)}")
    return OTLPLogExporter(endpoint=endpoint) if endpoint else OTLPLogExporter()


class LogRecords:
    """The request log as OpenTelemetry log records: one per call, its body the same
    JSON object as the file line, its trace and span ids those of the line (so a
    backend links it to the trace), batched and exported like spans."""

    def __init__(self, exporter: Any, *, worker: int) -> None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        self.provider = LoggerProvider(resource=worker_resource(worker))
        self.provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter, max_queue_size=1 << 16, max_export_batch_size=2048)
        )
        self._logger = self.provider.get_logger("riskwire.requests", __version__)

    def emit(self, record: dict[str, Any], started: float, ok: bool) -> None:
        """Emit one request-log line."""
        from opentelemetry._logs import LogRecord, SeverityNumber

        trace_id, span_id = int(record["trace_id"], 16), int(record["span_id"], 16)
        self._logger.emit(
            LogRecord(
                timestamp=int(started * 1e9),
                trace_id=trace_id,
                span_id=span_id,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                severity_text="INFO" if ok else "WARN",
                severity_number=SeverityNumber.INFO if ok else SeverityNumber.WARN,
                body=record,
                attributes={"rpc.method": record["method"], "rpc.grpc.status": record["status"]},
                event_name="riskwire.request",
            )
        )

    def shutdown(self) -> None:
        """Export what is buffered."""
        self.provider.shutdown()


def make_tracing(options: dict[str, Any]) -> Tracing:
    """A tracer from ``options``: an exporter kind, endpoint and path, and
    :class:`Tracing` keyword arguments (picklable: a worker's scorer process gets them)."""
    options = dict(options)
    exporter = make_exporter(
        options.pop("exporter"), endpoint=options.pop("endpoint"), path=options.pop("path")
    )
    return Tracing(exporter, **options)
