"""Alert rules over drift measurements: fire once, resolve once, log the incident, route it.

    Measurement ─▶ AlertEngine.evaluate ─▶ AlertEvent ─▶ incident log (JSON lines, fsync)
                                                     └─▶ Router ─▶ LogSink | WebhookSink | OTelSink

One alert instance per (rule, model, version, window, column)::

    ok ─bad─▶ pending ─bad for for_s─▶ firing ─good─▶ resolving ─good for resolve_for_s─▶ ok
     ▲           │ not bad               ▲               │ not good
     └───────────┘                       └───────────────┘

"firing" is emitted on entering firing and "resolved" on leaving resolving, once each per
incident. With op ">", bad is ``value > threshold`` and good is ``value <= resolve_threshold``
(hysteresis when resolve_threshold < threshold); "<" mirrors it. NaN (not enough data), a
measurement from fewer than ``min_count`` samples and a key absent from an evaluation leave
the state as it is: missing data is neither a breach nor a recovery. On start the engine
re-opens the incidents the log still shows firing, so a restart neither forgets nor repeats.

Config (e.g. an ``alerts`` table in the server TOML), see ``engine_from_config``::

    {"rules": [{"name": "amount_psi", "measure": "psi", "column": "amount",
                "threshold": 0.3, "for_s": 900}],             # absent: DEFAULT_RULES
     "routes": [{"sink": "webhook", "url": "https://…", "severity": "critical"},
                {"sink": "log"}]}                              # absent: everything to the log
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .alert_rules import (
    DEFAULT_RULES,
    MEASURES,
    OPS,
    SEVERITIES,
    AlertConfigError,
    AlertEvent,
    AlertRule,
    Measurement,
    rules_from_config,
)
from .alert_sinks import (
    SINK_KINDS,
    AlertSink,
    InMemoryAlertSink,
    LogSink,
    OTelSink,
    Route,
    Router,
    WebhookSink,
    routes_from_config,
)

__all__ = [
    "DEFAULT_RULES", "INCIDENT_LOG_RELPATH", "MEASURES", "OPS", "SEVERITIES", "SINK_KINDS",
    "AlertConfigError", "AlertEngine", "AlertEvent", "AlertRule", "AlertSink", "InMemoryAlertSink",
    "LogSink", "Measurement", "OTelSink", "Route", "Router", "WebhookSink", "append_incident",
    "engine_from_config", "incident_log_path", "read_incidents", "routes_from_config",
    "rules_from_config",
]  # fmt: skip

logger = logging.getLogger("riskwire.alerts")

INCIDENT_LOG_RELPATH = Path(".alerts") / "incidents.jsonl"

_COMPLEMENT = {">": "<=", "<": ">="}
_MEASURE_LABELS = {
    "psi": "PSI",
    "js": "JS distance",
    "linf": "L-inf distance",
    "missing_rate_change": "missing-rate change",
    "flagged_share": "flagged share",
}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _message(rule: AlertRule, m: Measurement, op: str, threshold: float, held_s: float) -> str:
    label = _MEASURE_LABELS.get(m.measure, m.measure)
    subject = label if m.measure == "flagged_share" else f"{label} of {m.column}"
    held = f" for {_duration(held_s)}" if held_s > 0 else ""
    return (
        f"{subject} on the {m.window} window is {m.value:.3g} {op} {threshold:g}{held} "
        f"({m.model} v{m.version})"
    )


# ---------------------------------------------------------------------------- incident log


def incident_log_path(models: str | Path) -> Path:
    """The default incident log of a models directory: ``<models>/.alerts/incidents.jsonl``."""
    return Path(models) / INCIDENT_LOG_RELPATH


def append_incident(path: Path, event: AlertEvent) -> None:
    """Append ``event`` as one JSON line and fsync; the file is never rewritten."""
    line = json.dumps(event.to_dict(), sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_incidents(path: str | Path, *, open_only: bool = False) -> list[dict[str, Any]]:
    """Incidents in log order: the first event's fields plus ``state`` (of the last event),
    ``fired_at``, ``resolved_at`` (None while open), ``resolved_value`` and ``events``.

    ``open_only`` keeps incidents whose last event is "firing". Malformed lines (a crash
    mid-write) are skipped with a warning; a missing file has no incidents.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    incidents: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            ident, state = str(event["id"]), event["state"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: skipping a malformed incident line", path, lineno)
            continue
        incident = incidents.get(ident)
        if incident is None:
            incident = {k: v for k, v in event.items() if k != "at"}
            incident.update(fired_at=None, resolved_at=None, resolved_value=None, events=[])
            incidents[ident] = incident
        incident["events"].append(event)
        incident["state"] = state
        if state == "firing":
            incident["fired_at"] = event.get("at")
        elif state == "resolved":
            incident["resolved_at"] = event.get("at")
            incident["resolved_value"] = event.get("value")
    found = list(incidents.values())
    return [i for i in found if i["state"] == "firing"] if open_only else found


# ---------------------------------------------------------------------------- engine


@dataclasses.dataclass(slots=True)
class _Instance:
    rule: AlertRule
    last: Measurement
    phase: str  # "pending" | "firing" | "resolving"
    since: float
    id: str = ""
    fired_at: float = 0.0
    good_since: float = 0.0
    message: str = ""


class AlertEngine:
    """Evaluates rules over measurements; emits each incident's firing/resolved event once.

    Events are appended to ``incident_log`` first, then routed. Thread-safe: the supervisor
    evaluates while an admin RPC may call ``active()``.
    """

    def __init__(
        self,
        rules: Iterable[AlertRule],
        router: Router,
        incident_log: str | Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = tuple(rules)
        self.router = router
        self.incident_log = Path(incident_log)
        self._clock = clock
        self._lock = threading.Lock()
        self._by_measure: dict[str, list[AlertRule]] = {}
        for rule in self.rules:
            self._by_measure.setdefault(rule.measure, []).append(rule)
        self._alerts: dict[tuple[Any, ...], _Instance] = {}
        self._restore()

    def evaluate(
        self, measurements: Iterable[Measurement], now: float | None = None
    ) -> list[AlertEvent]:
        """Advance every matching alert instance to ``now``; return the events emitted."""
        now = self._clock() if now is None else float(now)
        events: list[AlertEvent] = []
        with self._lock:
            for m in measurements:
                for rule in self._by_measure.get(m.measure, ()):
                    if rule.matches(m):
                        event = self._step(rule, m, now)
                        if event is not None:
                            events.append(event)
            for event in events:
                try:
                    append_incident(self.incident_log, event)
                except OSError:
                    logger.exception(
                        "could not append incident %s to %s", event.id, self.incident_log
                    )
        for event in events:
            self.router.send(event)
        return events

    def active(self) -> list[dict[str, Any]]:
        """Firing alerts (including those waiting out resolve_for_s), most severe first."""
        with self._lock:
            found = [i for i in self._alerts.values() if i.phase != "pending"]
        found.sort(key=lambda i: (-SEVERITIES.index(i.rule.severity), i.since))
        return [
            {
                "id": i.id,
                "state": "firing",
                "resolving": i.phase == "resolving",
                "rule": i.rule.name,
                "severity": i.rule.severity,
                "model": i.last.model,
                "version": i.last.version,
                "window": i.last.window,
                "measure": i.last.measure,
                "column": i.last.column,
                "value": i.last.value,
                "op": i.rule.op,
                "threshold": i.rule.threshold,
                "started_at": i.since,
                "fired_at": i.fired_at,
                "message": i.message,
            }
            for i in found
        ]

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush and close the sinks (webhook queues drain for up to ``timeout_s``)."""
        self.router.close(timeout_s)

    def _step(self, rule: AlertRule, m: Measurement, now: float) -> AlertEvent | None:
        if math.isnan(m.value) or (m.count is not None and m.count < rule.min_count):
            return None
        key = (rule.name, m.model, m.version, m.window, m.column)
        inst = self._alerts.get(key)
        if inst is None:
            if not rule.breached(m.value):
                return None
            inst = self._alerts[key] = _Instance(rule=rule, last=m, phase="pending", since=now)
        inst.last = m
        if inst.phase == "pending":
            if not rule.breached(m.value):
                del self._alerts[key]
                return None
            if now - inst.since < rule.for_s:
                return None
            inst.phase, inst.id, inst.fired_at = "firing", uuid.uuid4().hex, now
            event = self._event(inst, "firing", now)
            inst.message = event.message
            return event
        if not rule.recovered(m.value):
            inst.phase = "firing"
            return None
        if inst.phase == "firing":
            inst.phase, inst.good_since = "resolving", now
        if now - inst.good_since < rule.resolve_for_s:
            return None
        del self._alerts[key]
        return self._event(inst, "resolved", now)

    def _event(self, inst: _Instance, state: str, now: float) -> AlertEvent:
        rule, m = inst.rule, inst.last
        if state == "firing":
            op, threshold, held_s, prefix = rule.op, rule.threshold, rule.for_s, ""
        else:
            op, threshold = _COMPLEMENT[rule.op], rule.resolve_limit
            held_s, prefix = rule.resolve_for_s, "resolved: "
        return AlertEvent(
            id=inst.id,
            state=state,
            rule=rule.name,
            severity=rule.severity,
            model=m.model,
            version=m.version,
            window=m.window,
            measure=m.measure,
            column=m.column,
            value=m.value,
            op=op,
            threshold=threshold,
            started_at=inst.since,
            at=now,
            message=prefix + _message(rule, m, op, threshold, held_s),
        )

    def _restore(self) -> None:
        rules = {rule.name: rule for rule in self.rules}
        for inc in read_incidents(self.incident_log, open_only=True):
            rule = rules.get(inc.get("rule"))
            if rule is None:
                logger.info(
                    "open incident %s: rule %r is no longer configured", inc["id"], inc.get("rule")
                )
                continue
            try:
                m = Measurement(
                    inc["model"], inc["version"], inc["window"], inc["measure"], inc["column"],
                    float(inc["value"]),
                )  # fmt: skip
                inst = _Instance(
                    rule=rule, last=m, phase="firing", since=float(inc["started_at"]),
                    id=inc["id"], fired_at=float(inc["fired_at"]), message=str(inc["message"]),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError):
                logger.warning("skipping unreadable open incident %s", inc.get("id"))
                continue
            self._alerts[(rule.name, m.model, m.version, m.window, m.column)] = inst


def engine_from_config(
    raw: Mapping[str, Any] | None,
    *,
    incident_log: str | Path,
    clock: Callable[[], float] = time.time,
    default_webhook_timeout_s: float = 5.0,
) -> AlertEngine:
    """An engine from ``{"rules": [...], "routes": [...]}``; either key may be absent
    (rules: DEFAULT_RULES; routes: everything to the log)."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise AlertConfigError(f"alerts: expected a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"rules", "routes"})
    if unknown:
        raise AlertConfigError(f"alerts: unknown key {unknown[0]!r} (expected: rules, routes)")
    rules = rules_from_config(raw["rules"]) if "rules" in raw else list(DEFAULT_RULES)
    routes = routes_from_config(
        raw.get("routes", []), default_webhook_timeout_s=default_webhook_timeout_s
    )
    return AlertEngine(rules, Router(routes), incident_log, clock=clock)
