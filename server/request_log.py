"""Request-level log: one JSON line per RPC, joined to the caller's trace.

W3C trace context (``traceparent``) is read from the call's metadata, so each line
carries the caller's trace id and our own span id (the first step of issue 7's tracing;
the spans themselves come later). Handlers append one tuple to a deque; a background
thread formats the lines (reading model, decision and flags from the response there)
and writes them to a size-rotated file (``path``, ``path.1`` … ``path.<backups>``).
No request field is logged: card ids never reach the file.

    {"time": "2026-11-26T10:00:00.123Z", "trace_id": "4bf9…", "span_id": "00f0…",
     "parent_span_id": "b7ad…", "method": "Score", "status": "OK", "latency_ms": 0.41,
     "model": "fraud", "model_version": "3", "decision": "approve", "flags": []}
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .monitoring.metrics import CallMetrics
    from .tracing import CallIds, LogRecords, Tracing

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_DECISIONS = {1: "approve", 2: "review", 3: "decline"}


# Per-thread hand-off between the unary wrapper, the gate and the dataplane about the
# call being served (class attributes are the defaults of a fresh thread).
class _Call(threading.local):
    stages: tuple[float, ...] | None = None  # the dataplane's stage clock readings
    ids: tuple | None = None  # the span ids of the call (tracing on)
    client: str = ""  # the admitted client id (a gate configured)
    model: Any = None  # the version routed to (counts a failed call against it)
    traceparent: str = ""  # the caller's W3C traceparent (tracing on)


CALL = _Call()
# Span events: (name, index of the reading that starts it, index that ends it) in
# (call start, scoring start, validated, features, predicted, recorded, mirrored, end).
STAGES = (
    ("decode", 0, 1), ("validate", 1, 2), ("features", 2, 3), ("predict", 3, 4),
    ("record", 4, 5), ("shadow_enqueue", 5, 6), ("respond", 6, 7),
)  # fmt: skip


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None if invalid."""
    match = _TRACEPARENT.match(value.strip().lower())
    if not match:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def call_ids(traceparent: str) -> tuple[int, int, tuple[str, str, bool] | None]:
    """(trace id, span id, parsed caller context) of a call's server span: the caller's
    trace when it sent one, else a new trace."""
    parent = parse_traceparent(traceparent) if traceparent else None
    trace_id = int(parent[0], 16) if parent else random.getrandbits(128) or 1
    return trace_id, random.getrandbits(64) or 1, parent


def new_id(bits: int) -> str:
    """A random non-zero id as lowercase hex (64 bits: span id, 128 bits: trace id)."""
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


def traceparent_of(metadata: Any) -> str:
    """The ``traceparent`` value of gRPC invocation metadata ("" when absent)."""
    for key, value in metadata or ():
        if key == "traceparent":
            return value
    return ""


class RequestLog:
    """Rotating JSON-lines request log, written by its own thread."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        worker: int,
        max_bytes: int = 64 * 1024 * 1024,
        backups: int = 5,
        flush_s: float = 0.5,
        tracing: Tracing | None = None,
        metrics: CallMetrics | None = None,
        log_records: LogRecords | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.tracing = tracing
        self.metrics = metrics
        self.log_records = log_records
        # Whether calls make lines or spans; without, they are only counted (cheaper).
        self.lines = path is not None or tracing is not None or log_records is not None
        self._counted: deque = deque(maxlen=1_000_000)
        self.worker = worker
        self.max_bytes = max_bytes
        self.backups = backups
        self._flush_s = flush_s
        self._pending: deque = deque(maxlen=1_000_000)  # bounded: oldest lines go first
        # Calls being served (the unary wrapper appends on entry, pops on exit).
        self.in_flight: deque = metrics.in_flight if metrics is not None else deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        traceparent: str,
        method: str,
        status: str,
        started: float,
        latency_s: float,
        response: Any,
        t0: float = 0.0,
        stages: tuple[float, ...] | None = None,
        client: str = "",
        ids: CallIds | None = None,
    ) -> None:
        """Record one finished call (hot path: one tuple append). ``t0`` is the call's
        perf_counter start, ``stages`` the dataplane's readings (tracing only), ``client``
        the authenticated client id (never the key), ``ids`` those of its span."""
        self._pending.append(
            (traceparent, method, status, started, latency_s, response, t0, stages, client, ids)
        )

    def count(self, method: str, status: str, latency_s: float, response: Any) -> None:
        """Record one finished call for the metrics only (hot path: one tuple append)."""
        self._counted.append((method, status, latency_s, response))

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def stop(self) -> None:
        """Write what is pending and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._write()
        if self.metrics is not None:
            self.metrics.publish()
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.log_records is not None:
            self.log_records.shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_s):
            self._write()

    def _trace(self, item: tuple) -> None:
        """Only the span of a call (when its sampling keeps it)."""
        traceparent, method, status, started, latency_s, response, t0, stages, client, ids = item
        tracing = self.tracing
        assert tracing is not None
        if ids is None:  # not mirrored: the span's ids are chosen now
            ids = call_ids(traceparent)
        context = ids[2]
        if tracing.keep(context, status, latency_s, ids[0]):
            outcome = _outcome(response, client)
            attributes = {f"riskwire.{k}": v for k, v in outcome.items()}
            events = _stage_events(t0, stages, latency_s)
            tracing.span(context, method, status, started, latency_s, attributes, events, ids)

    def _line(self, item: tuple) -> str:
        traceparent, method, status, started, latency_s, response, t0, stages, client, ids = item
        outcome = _outcome(response, client)
        tracing = self.tracing
        if tracing is not None:
            if ids is None:
                ids = call_ids(traceparent)
            context = ids[2]
            if tracing.keep(context, status, latency_s, ids[0]):
                attributes = {f"riskwire.{k}": v for k, v in outcome.items()}
                events = _stage_events(t0, stages, latency_s)
                tracing.span(context, method, status, started, latency_s, attributes, events, ids)
            trace_id, span_id = f"{ids[0]:032x}", f"{ids[1]:016x}"
        else:
            context = parse_traceparent(traceparent) if traceparent else None
            span_id = new_id(64)
            trace_id = context[0] if context else new_id(128)
        moment = datetime.fromtimestamp(started, UTC)
        record = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_span_id": context[1] if context else "",
            "method": method,
            "status": status,
            "latency_ms": round(latency_s * 1000, 3),
            "worker": self.worker,
            **outcome,
        }
        if self.log_records is not None:
            self.log_records.emit(record, started, status == "OK")
        return json.dumps(record, separators=(",", ":"))

    def _write(self) -> None:
        pending = self._pending
        items = [pending.popleft() for _ in range(len(pending))]
        metrics = self.metrics
        if metrics is not None:
            counted = self._counted
            calls = [counted.popleft() for _ in range(len(counted))]
            calls += [(item[1], item[2], item[4], item[5]) for item in items]
            if calls:
                metrics.add_calls(
                    [(method, status, *_model_of(subject)) for method, status, _, subject in calls],
                    [call[2] for call in calls],
                )
            metrics.maybe_publish()
        if not items:
            return
        if self.path is None and self.log_records is None:  # no lines to format
            if self.tracing is not None:
                for item in items:
                    self._trace(item)
            return
        text = "".join(self._line(item) + "\n" for item in items)
        if self.path is None:  # OpenTelemetry log records only
            return
        try:
            if self.path.exists() and self.path.stat().st_size + len(text) > self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            log.error("request log %s: %s", self.path, exc)

    def _rotate(self) -> None:
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)


def _model_of(subject: Any) -> tuple[str, str]:
    """(model, version) of a response, or of the ModelRuntime a failed call was routed
    to; ("", "") when neither is known."""
    name = getattr(subject, "model_name", None)
    if name is not None:
        return name, subject.model_version
    return getattr(subject, "name", ""), getattr(subject, "version", "")


def _stage_events(
    t0: float, stages: tuple[float, ...] | None, latency_s: float
) -> list[tuple[str, float, float]]:
    """(stage, offset from the call's start, duration) in seconds, from the readings."""
    if not stages:
        return []
    marks = (t0, *stages, t0 + latency_s)
    return [(name, marks[a] - t0, marks[b] - marks[a]) for name, a, b in STAGES]


def _outcome(response: Any, client: str = "") -> dict[str, Any]:
    """Client id, model, version, decision and flags of a Scoring response (other
    messages: model)."""
    out: dict[str, Any] = {"client_id": client} if client else {}
    if response is None:
        return out
    name, version = _model_of(response)  # a response message, or the routed version
    if name:
        out["model"] = name
    if version:
        out["model_version"] = version
    decision = getattr(response, "decision", None)
    if isinstance(decision, int) and decision in _DECISIONS:
        out["decision"] = _DECISIONS[decision]
    flags = getattr(response, "flags", None)
    if flags is not None:
        out["flags"] = list(flags)
    results = getattr(response, "results", None)
    if results is not None:
        out["rows"] = len(results)
    return out
