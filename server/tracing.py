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

import json
import os
import random
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from riskwire import __version__

EXPORTERS = ("console", "jsonl", "otlp-grpc", "otlp-http")
_SERVICES = {
    "Score": "riskwire.v1.Scoring", "ScoreBatch": "riskwire.v1.Scoring",
    "Feedback": "riskwire.v1.Scoring",
}  # fmt: skip
_GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip


class JsonLinesSpanExporter(SpanExporter):
    """Appends every span as one JSON object per line (for tests and air-gapped sites)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.context
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": f"{context.trace_id:032x}",
                        "span_id": f"{context.span_id:016x}",
                        "parent_span_id": f"{parent.span_id:016x}" if parent else "",
                        "start_time_unix_nano": span.start_time,
                        "end_time_unix_nano": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                        "resource": dict(span.resource.attributes),
                    },
                    separators=(",", ":"),
                )
            )
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
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


class Tracing:
    """Builds and samples the server spans of one worker."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        worker: int,
        address: tuple[str, int],
        sample_ratio: float = 0.01,
        slow_ms: float = 50.0,
    ) -> None:
        resource = Resource.create(
            {
                "service.name": "riskwire",
                "service.version": __version__,
                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-w{worker}",
            }
        )
        self.provider = TracerProvider(resource=resource)
        # A large queue: at 100% sampling a worker makes ~10k spans/s, and the default
        # 2048 drops spans between exports.
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=1 << 16, max_export_batch_size=2048)
        )
        self._tracer = self.provider.get_tracer("riskwire.server", __version__)
        self.worker = worker
        self.address = address
        self.sample_ratio = sample_ratio
        self.slow_s = slow_ms / 1000.0
        self._random = random.random
        self.last_trace_id = ""  # of the last span (read by the same thread)

    def keep(self, parent: tuple[str, str, bool] | None, status: str, latency_s: float) -> bool:
        """Sampling: caller sampled, failed, slow, or the ratio coin."""
        if parent is not None and parent[2]:
            return True
        if status != "OK" or latency_s >= self.slow_s:
            return True
        return self._random() < self.sample_ratio

    def span(
        self,
        parent: tuple[str, str, bool] | None,
        method: str,
        status: str,
        started: float,
        latency_s: float,
        attributes: dict[str, Any],
    ) -> str:
        """Record one finished call as a SERVER span; returns its span id (hex)."""
        context = None
        if parent is not None:
            remote = SpanContext(
                trace_id=int(parent[0], 16),
                span_id=int(parent[1], 16),
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        service = _SERVICES.get(method, "inference.GRPCInferenceService")
        start_ns = int(started * 1e9)
        span = self._tracer.start_span(
            f"{service}/{method}",
            context=context,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "rpc.grpc.status_code": _GRPC_CODES.get(status, 2),
                "server.address": self.address[0],
                "server.port": self.address[1],
                "riskwire.worker": self.worker,
                **attributes,
            },
        )
        if status != "OK":
            span.set_status(Status(StatusCode.ERROR, status))
        span.end(end_time=start_ns + int(latency_s * 1e9))
        context = span.get_span_context()
        self.last_trace_id = f"{context.trace_id:032x}"
        return f"{context.span_id:016x}"

    def shutdown(self) -> None:
        """Export what is buffered."""
        self.provider.shutdown()
