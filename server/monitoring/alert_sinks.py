"""Where alert events go: LogSink, WebhookSink, OTelSink, and the Router that picks them.

Every sink's ``send`` returns quickly and never raises into the engine; failures are logged.
``routes_from_config`` builds routes from tables like ``{"sink": "webhook", "url": …,
"severity": "critical", "model": "fraud*"}``, ``{"sink": "log"}`` or ``{"sink": "otel"}``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from .alert_rules import SEVERITIES, AlertConfigError, AlertEvent, is_number

logger = logging.getLogger("riskwire.alerts")

SINK_KINDS = ("log", "webhook", "otel")


class AlertSink(Protocol):
    """Receives events; must not block for long and must not raise."""

    def send(self, event: AlertEvent) -> None: ...


class LogSink:
    """One python-logging line per event: WARNING when firing, INFO when resolved."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self._log = log or logger

    def send(self, event: AlertEvent) -> None:
        level = logging.WARNING if event.state == "firing" else logging.INFO
        self._log.log(
            level, "alert %s: %s [%s] %s (incident %s)",
            event.state, event.rule, event.severity, event.message, event.id,
        )  # fmt: skip


class InMemoryAlertSink:
    """Keeps every event it is sent (tests, and an admin view of recent events)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[AlertEvent] = []

    def send(self, event: AlertEvent) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[AlertEvent]:
        with self._lock:
            return list(self._events)


_STOP = object()


class WebhookSink:
    """POSTs ``event.to_dict()`` as JSON from one background daemon thread.

    ``send`` only enqueues (bounded; a full queue drops and logs). Connection errors,
    timeouts, 5xx and 429 are retried ``retries`` times with exponential backoff from
    ``backoff_s`` (429 honours a numeric Retry-After); any other 4xx/3xx is dropped at once.
    Counters ``delivered``, ``failed`` and ``dropped`` are read without a lock.
    """

    MAX_BACKOFF_S = 60.0

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        headers: Mapping[str, str] | None = None,
        queue_size: int = 1000,
    ) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"webhook url must be http(s)://…, got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = {
            "Content-Type": "application/json",
            "User-Agent": "riskwire-alerts",
            **(headers or {}),
        }
        self.delivered = self.failed = self.dropped = 0
        self._opener = urllib.request.build_opener()  # reads proxy settings now, not globally
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._abort = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="riskwire-webhook", daemon=True)
        self._thread.start()

    def send(self, event: AlertEvent) -> None:
        if self._closed:
            self.dropped += 1
            logger.warning("webhook %s closed: dropped alert %s", self.url, event.id)
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            logger.warning("webhook %s queue full: dropped alert %s", self.url, event.id)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Deliver what is queued within ``timeout_s``, then stop; True if drained in time."""
        deadline = time.monotonic() + timeout_s
        if not self._closed:
            self._closed = True
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=max(0.0, timeout_s))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()  # stop any retry still waiting
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._abort.is_set():
                return
            try:
                self._deliver(item)
            except Exception:  # never let the thread die
                self.failed += 1
                logger.exception("webhook %s: unexpected error for alert %s", self.url, item.id)

    def _deliver(self, event: AlertEvent) -> None:
        body = json.dumps(event.to_dict(), sort_keys=True).encode()
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                self._post(body)
                self.delivered += 1
                return
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code != 429 and exc.code < 500:
                    self.failed += 1
                    logger.error(
                        "webhook %s rejected alert %s: HTTP %d", self.url, event.id, exc.code
                    )
                    return
                error = f"HTTP {exc.code}"
                retry_after = (
                    _retry_after_s(exc.headers.get("Retry-After")) if exc.code == 429 else None
                )
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
                error = f"{type(exc).__name__}: {exc}"
            if attempt == self.retries:
                break
            delay = retry_after if retry_after is not None else self.backoff_s * 2**attempt
            logger.info("webhook %s: %s for alert %s; retrying", self.url, error, event.id)
            if self._abort.wait(min(delay, self.MAX_BACKOFF_S)):
                break
        self.failed += 1
        logger.error("webhook %s: giving up on alert %s after %s", self.url, event.id, error)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with self._opener.open(request, timeout=self.timeout_s) as response:
            response.read()


def _retry_after_s(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


class OTelSink:
    """An OpenTelemetry log record per event when a LoggerProvider is configured, else a
    python log line on ``riskwire.alerts.otel``."""

    _SEVERITY = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}

    def __init__(self, logger_provider: Any = None, *, name: str = "riskwire.alerts") -> None:
        self._provider = logger_provider
        self._name = name
        self._fallback = logging.getLogger("riskwire.alerts.otel")

    def send(self, event: AlertEvent) -> None:
        try:
            otel = self._otel_logger()
            if otel is None:
                level = logging.WARNING if event.state == "firing" else logging.INFO
                self._fallback.log(
                    level, "alert %s: %s (incident %s)", event.state, event.message, event.id
                )
                return
            from opentelemetry._logs import LogRecord, SeverityNumber

            text = self._SEVERITY[event.severity] if event.state == "firing" else "INFO"
            attributes = {f"alert.{k}": v for k, v in event.to_dict().items() if k != "message"}
            attributes["event.name"] = "riskwire.alert"
            otel.emit(
                LogRecord(
                    timestamp=int(event.at * 1e9),
                    severity_text=text,
                    severity_number=SeverityNumber[text],
                    body=event.message,
                    attributes=attributes,
                )
            )
        except Exception:
            logger.exception("OTel alert sink failed for alert %s", event.id)

    def _otel_logger(self) -> Any:
        try:
            from opentelemetry import _logs
        except ImportError:
            return None
        provider = self._provider or _logs.get_logger_provider()
        unset = tuple(
            cls
            for cls in (
                getattr(_logs, "NoOpLoggerProvider", None),
                getattr(getattr(_logs, "_internal", None), "ProxyLoggerProvider", None),
            )
            if cls is not None
        )
        if isinstance(provider, unset):
            return None
        return provider.get_logger(self._name)


Route = tuple[str, str, AlertSink]  # (severity pattern, model pattern, sink)


class Router:
    """Sends each event to every sink whose severity and model patterns match (fnmatch),
    each sink at most once per event. No routes: everything to a LogSink."""

    def __init__(self, routes: Iterable[Route] | None = None) -> None:
        self.routes: tuple[Route, ...] = tuple(routes or ()) or (("*", "*", LogSink()),)

    def send(self, event: AlertEvent) -> None:
        sent: set[int] = set()
        for severity, model, sink in self.routes:
            if id(sink) in sent:
                continue
            if fnmatch.fnmatchcase(event.severity, severity) and fnmatch.fnmatchcase(
                event.model, model
            ):
                sent.add(id(sink))
                try:
                    sink.send(event)
                except Exception:
                    logger.exception("alert sink %r failed for alert %s", sink, event.id)

    def close(self, timeout_s: float = 5.0) -> None:
        closed: set[int] = set()
        for _, _, sink in self.routes:
            close = getattr(sink, "close", None)
            if close is not None and id(sink) not in closed:
                closed.add(id(sink))
                close(timeout_s)


_ROUTE_KEYS = {
    "log": (),
    "otel": (),
    "webhook": ("url", "timeout_s", "retries", "backoff_s", "headers", "queue_size"),
}


def routes_from_config(
    raw: Sequence[Mapping[str, Any]], *, default_webhook_timeout_s: float = 5.0
) -> list[Route]:
    """Routes from tables like ``{"sink": "webhook", "url": …, "severity": "critical",
    "model": "*"}``, ``{"sink": "log"}``, ``{"sink": "otel"}``; ``severity`` may be a list.

    An empty list gives the default route: everything to the log. On an error, the sinks
    already built are closed before AlertConfigError is raised.
    """
    if not isinstance(raw, list | tuple):
        raise AlertConfigError(f"alert routes: expected a list of tables, got {type(raw).__name__}")
    routes: list[Route] = []
    try:
        for index, entry in enumerate(raw, 1):
            routes.extend(_routes_from_entry(index, entry, default_webhook_timeout_s))
    except AlertConfigError:
        Router(routes).close(0.0)
        raise
    return routes or [("*", "*", LogSink())]


def _routes_from_entry(index: int, entry: object, default_webhook_timeout_s: float) -> list[Route]:
    label = f"alert route #{index}"
    if not isinstance(entry, Mapping):
        raise AlertConfigError(f"{label}: expected a table, got {entry!r}")
    kind = entry.get("sink")
    if kind not in SINK_KINDS:
        raise AlertConfigError(
            f"{label}: sink: expected one of {', '.join(SINK_KINDS)}; got {kind!r}"
        )
    label = f"alert route #{index} ({kind})"
    allowed = ("sink", "severity", "model", *_ROUTE_KEYS[kind])
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise AlertConfigError(
            f"{label}: unknown key {unknown[0]!r} (expected: {', '.join(allowed)})"
        )
    severities = _severity_patterns(label, entry.get("severity", "*"))
    model = entry.get("model", "*")
    if not isinstance(model, str) or not model:
        raise AlertConfigError(
            f"{label}: model: must be a non-empty fnmatch pattern, got {model!r}"
        )
    if kind == "log":
        sink: AlertSink = LogSink()
    elif kind == "otel":
        sink = OTelSink()
    else:
        sink = _webhook_from_config(label, entry, default_webhook_timeout_s)
    return [(severity, model, sink) for severity in severities]


def _severity_patterns(label: str, value: object) -> list[str]:
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list | tuple) or not patterns:
        raise AlertConfigError(f"{label}: severity: expected a pattern or a list, got {value!r}")
    for p in patterns:
        literal = isinstance(p, str) and not any(c in p for c in "*?[")
        if not isinstance(p, str) or not p or (literal and p not in SEVERITIES):
            raise AlertConfigError(
                f"{label}: severity: expected {', '.join(SEVERITIES)} or a pattern; got {p!r}"
            )
    return list(patterns)


def _webhook_from_config(
    label: str, entry: Mapping[str, Any], default_timeout_s: float
) -> WebhookSink:
    def fail(key: str, why: str) -> AlertConfigError:
        return AlertConfigError(f"{label}: {key}: {why}, got {entry.get(key)!r}")

    url = entry.get("url")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise fail("url", "expected an http:// or https:// URL")
    timeout_s = entry.get("timeout_s", default_timeout_s)
    backoff_s = entry.get("backoff_s", 0.5)
    retries = entry.get("retries", 5)
    queue_size = entry.get("queue_size", 1000)
    headers = entry.get("headers", {})
    if not is_number(timeout_s) or timeout_s <= 0:
        raise fail("timeout_s", "expected seconds > 0")
    if not is_number(backoff_s) or backoff_s < 0:
        raise fail("backoff_s", "expected seconds >= 0")
    for key, value, low in (("retries", retries, 0), ("queue_size", queue_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise fail(key, f"expected an integer >= {low}")
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise fail("headers", "expected a table of strings")
    return WebhookSink(
        url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
        headers=dict(headers), queue_size=queue_size,
    )  # fmt: skip
