"""Alert rules, the fire-once/resolve-once engine, the incident log, sinks, routing and the CLI.

Time is driven through ``evaluate(now=…)``; nothing sleeps for a hold duration. Webhooks go
to a real HTTP server on 127.0.0.1 port 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from riskwire.clients.alerts_cli import register
from riskwire.server.monitoring.alerts import (
    DEFAULT_RULES,
    AlertConfigError,
    AlertEngine,
    AlertEvent,
    AlertRule,
    InMemoryAlertSink,
    LogSink,
    Measurement,
    OTelSink,
    Router,
    WebhookSink,
    engine_from_config,
    incident_log_path,
    read_incidents,
    routes_from_config,
    rules_from_config,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NAN = math.nan


def psi(value: float, column: str = "amount", *, model: str = "fraud", version: int = 3,
        window: str = "1h", count: int | None = None) -> Measurement:  # fmt: skip
    return Measurement(model, version, window, "psi", column, value, count)


def amount_rule(**overrides: object) -> AlertRule:
    fields = dict(name="amount_psi", measure="psi", column="amount", threshold=0.25)
    return AlertRule(**{**fields, **overrides})


@pytest.fixture
def sink() -> InMemoryAlertSink:
    return InMemoryAlertSink()


def make_engine(tmp_path: Path, sink: InMemoryAlertSink, *rules: AlertRule) -> AlertEngine:
    router = Router([("*", "*", sink)])
    return AlertEngine(rules or [amount_rule()], router, tmp_path / "alerts" / "incidents.jsonl")


def run(engine: AlertEngine, values: list[tuple[float, float]]) -> list[AlertEvent]:
    """Evaluate ``(seconds after T0, amount PSI)`` in order; all events emitted."""
    return [e for at, value in values for e in engine.evaluate([psi(value)], now=T0 + at)]


def fire(engine: AlertEngine) -> AlertEvent:
    (event,) = run(engine, [(0, 0.4), (600, 0.41)])
    return event


# ---------------------------------------------------------------------------- engine


def test_fires_once_after_for_s_and_not_before(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    assert run(engine, [(0, 0.4), (300, 0.5), (599, 0.45)]) == []
    assert engine.active() == []
    (event,) = engine.evaluate([psi(0.41)], now=T0 + 600)
    assert (event.state, event.rule, event.severity) == ("firing", "amount_psi", "warning")
    assert (event.model, event.version, event.window, event.column) == ("fraud", 3, "1h", "amount")
    assert (event.value, event.op, event.threshold) == (0.41, ">", 0.25)
    assert (event.started_at, event.at) == (T0, T0 + 600)
    assert event.message == "PSI of amount on the 1h window is 0.41 > 0.25 for 10 min (fraud v3)"
    assert len(event.id) == 32
    assert sink.events == [event]
    [active] = engine.active()
    assert (active["id"], active["state"], active["resolving"]) == (event.id, "firing", False)


def test_never_refires_while_firing(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    fire(engine)
    assert run(engine, [(600 + 5 * i, 0.3 + i / 1000) for i in range(1, 2000)]) == []
    assert len(sink.events) == 1
    assert len(engine.active()) == 1


def test_blip_shorter_than_for_s_never_fires(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    assert run(engine, [(0, 0.9), (590, 0.9), (595, 0.1), (700, 0.9), (1299, 0.9)]) == []
    (event,) = run(engine, [(1300, 0.9)])
    assert event.started_at == T0 + 700  # the pending clock restarted after the blip


def test_resolves_once_after_resolve_for_s(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    fired = fire(engine)
    # good at 1000, bad again at 1150 (resets), good from 1200: resolves at 1500, not before
    assert run(engine, [(1000, 0.1), (1150, 0.3), (1200, 0.1), (1499, 0.1)]) == []
    assert engine.active()[0]["resolving"] is True
    (resolved,) = run(engine, [(1500, 0.12)])
    assert (resolved.id, resolved.state, resolved.started_at) == (fired.id, "resolved", T0)
    assert (resolved.at, resolved.op, resolved.threshold) == (T0 + 1500, "<=", 0.25)
    assert resolved.message == (
        "resolved: PSI of amount on the 1h window is 0.12 <= 0.25 for 5 min (fraud v3)"
    )
    assert run(engine, [(1500 + 10 * i, 0.1) for i in range(1, 500)]) == []
    assert engine.active() == []
    # a new breach is a new incident
    (again,) = run(engine, [(10_000, 0.5), (10_600, 0.5)])
    assert again.state == "firing" and again.id != fired.id
    assert [e.state for e in sink.events] == ["firing", "resolved", "firing"]


def test_hysteresis_needs_resolve_threshold(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink, amount_rule(resolve_threshold=0.2))
    fire(engine)
    # below the firing threshold but above the resolve threshold: still firing
    assert run(engine, [(700 + 60 * i, 0.22) for i in range(60)]) == []
    (resolved,) = run(engine, [(5000, 0.19), (5300, 0.18)])
    assert (resolved.state, resolved.op, resolved.threshold) == ("resolved", "<=", 0.2)


def test_nan_neither_fires_nor_resolves(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    assert run(engine, [(0, NAN), (10_000, NAN)]) == []
    assert run(engine, [(20_000, 0.5), (20_300, NAN)]) == []  # NaN keeps the pending clock
    (fired,) = run(engine, [(20_600, 0.5)])
    assert fired.started_at == T0 + 20_000
    assert run(engine, [(20_600 + 60 * i, NAN) for i in range(1, 200)]) == []
    assert engine.evaluate([], now=T0 + 90_000) == []  # an absent key is not a recovery
    assert len(engine.active()) == 1
    assert run(engine, [(100_000, 0.1), (100_200, NAN)]) == []
    (resolved,) = run(engine, [(100_300, 0.1)])
    assert resolved.id == fired.id


def test_min_count_treats_small_samples_as_no_data(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink, amount_rule(for_s=0, min_count=100))
    assert engine.evaluate([psi(0.9, count=99)], now=T0) == []
    assert [e.state for e in engine.evaluate([psi(0.9, count=100)], now=T0)] == ["firing"]


def test_op_less_than(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    rule = AlertRule(name="low", measure="psi", threshold=0.1, op="<", resolve_threshold=0.2,
                     for_s=60, resolve_for_s=60)  # fmt: skip
    engine = make_engine(tmp_path, sink, rule)
    events = run(engine, [(0, 0.05), (60, 0.05), (120, 0.15), (180, 0.15), (240, 0.25)])
    assert [e.state for e in events] == ["firing"]
    (resolved,) = run(engine, [(300, 0.3)])
    assert (resolved.op, resolved.threshold) == (">=", 0.2)


def test_rule_patterns_select_model_column_and_window(
    tmp_path: Path, sink: InMemoryAlertSink
) -> None:
    rule = AlertRule(name="p", measure="psi", column="amount*", exclude_columns=("amount_raw",),
                     model="fraud-*", window="5m", threshold=0.1, for_s=0)  # fmt: skip
    engine = make_engine(tmp_path, sink, rule)
    events = engine.evaluate(
        [
            psi(0.5, "amount", model="fraud-eu", window="5m"),
            psi(0.5, "amount_log", model="fraud-eu", window="5m"),
            psi(0.5, "amount", model="fraud-eu", version=4, window="5m"),
            psi(0.5, "amount_raw", model="fraud-eu", window="5m"),
            psi(0.5, "country", model="fraud-eu", window="5m"),
            psi(0.5, "amount", model="churn", window="5m"),
            psi(0.5, "amount", model="fraud-eu", window="1h"),
            Measurement("fraud-eu", 3, "5m", "js", "amount", 0.5),
        ],
        now=T0,
    )
    assert sorted((e.column, e.version) for e in events) == [
        ("amount", 3), ("amount", 4), ("amount_log", 3),
    ]  # fmt: skip


def test_default_rules_split_output_and_input_drift(
    tmp_path: Path, sink: InMemoryAlertSink
) -> None:
    engine = make_engine(tmp_path, sink, *DEFAULT_RULES)
    measurements = [psi(0.3, "score"), psi(0.3, "amount"), psi(0.22, "country")]
    assert engine.evaluate(measurements, now=T0) == []
    events = engine.evaluate(measurements, now=T0 + 600)
    assert sorted((e.rule, e.column, e.severity) for e in events) == [
        ("input_psi", "amount", "warning"),
        ("score_psi", "score", "critical"),
    ]


def test_active_can_be_read_while_evaluating(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink, amount_rule(column="c*", for_s=0, resolve_for_s=0))
    done, errors = threading.Event(), []

    def reader() -> None:
        while not done.is_set():
            try:
                engine.active()
            except Exception as exc:  # pragma: no cover - the failure being tested for
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(100):
            engine.evaluate([psi(0.5 if i % 2 else 0.1, f"c{j}") for j in range(10)], now=T0 + i)
    finally:
        done.set()
        thread.join(10)
    assert errors == []
    assert len(sink.events) == 99 * 10  # odd rounds fire, even rounds resolve


# ---------------------------------------------------------------------------- config


RULE_A = {"name": "a", "measure": "psi", "threshold": 1}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([{**RULE_A, "treshold": 2}], "'a': unknown key 'treshold'"),
        ([{"name": "a", "measure": "psi"}], "'a': missing required key 'threshold'"),
        ([{"measure": "psi", "threshold": 1}], "rule #1: missing required key 'name'"),
        ([{**RULE_A, "measure": "kl"}], "'a': measure: expected one of"),
        ([{**RULE_A, "threshold": "x"}], "'a': threshold: must be a finite number"),
        ([{**RULE_A, "threshold": math.inf}], "'a': threshold: must be a finite number"),
        ([{**RULE_A, "op": ">="}], "'a': op: expected"),
        ([{**RULE_A, "for_s": -1}], "'a': for_s: must be a number of seconds"),
        ([{**RULE_A, "window": "1 hour"}], "'a': window: expected a duration"),
        ([{**RULE_A, "severity": "page"}], "'a': severity: expected one of"),
        ([{**RULE_A, "min_count": 1.5}], "'a': min_count: must be an integer"),
        ([{**RULE_A, "column": ""}], "'a': column: must be a non-empty"),
        ([{**RULE_A, "resolve_threshold": 2}], "'a': resolve_threshold: must be <= threshold"),
        ([RULE_A, RULE_A], "'a': name: duplicate"),
        ([["name", "a"]], "rule #1: expected a table"),
        (RULE_A, "expected a list of tables"),
    ],
)
def test_rule_config_errors_name_rule_and_key(raw: object, expected: str) -> None:
    with pytest.raises(AlertConfigError) as info:
        rules_from_config(raw)  # type: ignore[arg-type]
    assert expected in str(info.value)


def test_rules_from_config_fills_defaults() -> None:
    (rule,) = rules_from_config(
        [{"name": "a", "measure": "linf", "threshold": 0.3, "exclude_columns": "score"}]
    )
    assert (rule.column, rule.window, rule.op, rule.for_s) == ("*", "1h", ">", 600.0)
    assert (rule.resolve_threshold, rule.resolve_for_s, rule.severity) == (0.3, 300.0, "warning")
    assert rule.exclude_columns == ("score",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([{"sink": "pager"}], "route #1: sink: expected one of"),
        ([{"sink": "log"}, {"sink": "webhook"}], "route #2 (webhook): url: expected an http"),
        ([{"sink": "webhook", "url": "ftp://x"}], "route #1 (webhook): url:"),
        ([{"sink": "log", "url": "http://x"}], "route #1 (log): unknown key 'url'"),
        ([{"sink": "log", "severity": "critcal"}], "route #1 (log): severity:"),
        ([{"sink": "webhook", "url": "http://x", "retries": -1}], "(webhook): retries:"),
        ([{"sink": "webhook", "url": "http://x", "timeout_s": 0}], "(webhook): timeout_s:"),
        ([{"sink": "webhook", "url": "http://x", "headers": {"a": 1}}], "(webhook): headers:"),
    ],
)
def test_route_config_errors(raw: list[dict], expected: str) -> None:
    with pytest.raises(AlertConfigError) as info:
        routes_from_config(raw)
    assert expected in str(info.value)


def test_engine_from_config(tmp_path: Path) -> None:
    log = tmp_path / "incidents.jsonl"
    default = engine_from_config(None, incident_log=log)
    assert default.rules == DEFAULT_RULES
    assert [(s, m, type(k)) for s, m, k in default.router.routes] == [("*", "*", LogSink)]
    engine = engine_from_config(
        {
            "rules": [{"name": "a", "measure": "psi", "threshold": 0.3}],
            "routes": [{"sink": "otel", "severity": ["warning", "critical"]}, {"sink": "log"}],
        },
        incident_log=log,
    )
    assert [r.name for r in engine.rules] == ["a"]
    assert [(s, type(k)) for s, _, k in engine.router.routes] == [
        ("warning", OTelSink), ("critical", OTelSink), ("*", LogSink),
    ]  # fmt: skip
    with pytest.raises(AlertConfigError, match="alerts: unknown key 'rule'"):
        engine_from_config({"rule": []}, incident_log=log)


# ---------------------------------------------------------------------------- incident log


def test_incident_log_is_append_only(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink)
    fired = fire(engine)
    path = engine.incident_log
    first = path.read_bytes()
    assert first.count(b"\n") == 1 and json.loads(first)["id"] == fired.id
    run(engine, [(1000, 0.1), (1300, 0.1)])
    after = path.read_bytes()
    assert after.startswith(first) and after.count(b"\n") == 2

    (incident,) = read_incidents(path)
    assert (incident["id"], incident["state"], incident["value"]) == (fired.id, "resolved", 0.41)
    assert (incident["fired_at"], incident["resolved_at"]) == (T0 + 600, T0 + 1300)
    assert [e["state"] for e in incident["events"]] == ["firing", "resolved"]
    assert read_incidents(path, open_only=True) == []


def test_read_incidents_open_only_and_torn_lines(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    engine = make_engine(tmp_path, sink, amount_rule(for_s=0, resolve_for_s=0))
    engine.evaluate([psi(0.5, version=1), psi(0.5, version=2)], now=T0)
    engine.evaluate([psi(0.1, version=1)], now=T0 + 60)
    with engine.incident_log.open("a") as f:
        f.write('{"id": "torn", "sta')  # a crash mid-write
    incidents = read_incidents(engine.incident_log)
    assert [(i["version"], i["state"]) for i in incidents] == [(1, "resolved"), (2, "firing")]
    (open_incident,) = read_incidents(engine.incident_log, open_only=True)
    assert open_incident["version"] == 2 and open_incident["resolved_at"] is None
    assert read_incidents(tmp_path / "missing.jsonl") == []


def test_restart_reopens_firing_incidents(tmp_path: Path, sink: InMemoryAlertSink) -> None:
    fired = fire(make_engine(tmp_path, InMemoryAlertSink()))
    engine = make_engine(tmp_path, sink)  # same incident log: a restarted supervisor
    assert [a["id"] for a in engine.active()] == [fired.id]
    assert run(engine, [(5000, 0.5), (6000, 0.5)]) == []  # no second firing
    (resolved,) = run(engine, [(7000, 0.1), (7300, 0.1)])
    assert (resolved.id, resolved.started_at) == (fired.id, T0)
    assert read_incidents(engine.incident_log, open_only=True) == []


# ---------------------------------------------------------------------------- sinks, routing


def event(severity: str = "warning", model: str = "fraud", state: str = "firing") -> AlertEvent:
    return AlertEvent(
        id="0123456789abcdef0123456789abcdef", state=state, rule="r", severity=severity,
        model=model, version=3, window="1h", measure="psi", column="amount", value=0.4,
        op=">", threshold=0.25, started_at=T0, at=T0 + 600, message="PSI of amount is high",
    )  # fmt: skip


def test_router_by_severity_and_model() -> None:
    pager, everything, churn_only = InMemoryAlertSink(), InMemoryAlertSink(), InMemoryAlertSink()

    class Broken:
        def send(self, event: AlertEvent) -> None:
            raise RuntimeError("sink down")

    router = Router(
        [
            ("*", "*", Broken()),
            ("critical", "*", pager),
            ("*", "*", everything),
            ("warning", "*", everything),  # a sink gets an event once even if two routes match
            ("*", "churn*", churn_only),
        ]
    )
    for e in (event("warning"), event("critical"), event("info", model="churn-v2")):
        router.send(e)
    assert [e.severity for e in pager.events] == ["critical"]
    assert [e.severity for e in everything.events] == ["warning", "critical", "info"]
    assert [e.model for e in churn_only.events] == ["churn-v2"]


def test_log_sink_levels(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="riskwire.alerts"):
        LogSink().send(event())
        LogSink().send(event(state="resolved"))
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert "PSI of amount is high" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_otel_sink_emits_log_record() -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs import export as otel_export

    exporter_class = getattr(otel_export, "InMemoryLogRecordExporter", None)
    exporter = (exporter_class or otel_export.InMemoryLogExporter)()
    provider = LoggerProvider()
    provider.add_log_record_processor(otel_export.SimpleLogRecordProcessor(exporter))
    OTelSink(provider).send(event("critical"))
    (finished,) = exporter.get_finished_logs()
    record = finished.log_record
    assert record.body == "PSI of amount is high"
    assert record.severity_text == "ERROR"
    assert record.attributes["alert.rule"] == "r" and record.attributes["alert.version"] == 3


def test_otel_sink_falls_back_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry._logs import NoOpLoggerProvider

    with caplog.at_level(logging.INFO, logger="riskwire.alerts.otel"):
        OTelSink(NoOpLoggerProvider()).send(event())
    (record,) = caplog.records
    assert record.name == "riskwire.alerts.otel" and "PSI of amount is high" in record.message


# ---------------------------------------------------------------------------- webhook


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A real HTTP server: answers POSTs with the queued ``statuses`` (then 200)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    state = SimpleNamespace(received=[], statuses=[], entered=None, release=None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if state.entered is not None and not state.entered.is_set():
                state.entered.set()
                state.release.wait(10)
            status = state.statuses.pop(0) if state.statuses else 200
            state.received.append((status, body, dict(self.headers)))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_webhook_posts_event_json(hook: SimpleNamespace) -> None:
    sink = WebhookSink(hook.url, headers={"Authorization": "Bearer t0ken"})
    sink.send(event("critical"))
    assert sink.close(10)
    ((status, body, headers),) = hook.received
    assert status == 200 and body == event("critical").to_dict()
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer t0ken"
    assert (sink.delivered, sink.failed, sink.dropped) == (1, 0, 0)


def test_webhook_retries_5xx_and_delivers_once(hook: SimpleNamespace) -> None:
    hook.statuses.extend([500, 500])
    sink = WebhookSink(hook.url, backoff_s=0.01)
    sink.send(event())
    assert sink.close(10)
    assert [status for status, _, _ in hook.received] == [500, 500, 200]
    assert [body["id"] for status, body, _ in hook.received if status == 200] == [event().id]
    assert (sink.delivered, sink.failed) == (1, 0)


def test_webhook_does_not_retry_400(hook: SimpleNamespace) -> None:
    hook.statuses.append(400)
    sink = WebhookSink(hook.url, backoff_s=0.01)
    sink.send(event())
    assert sink.close(10)
    assert [status for status, _, _ in hook.received] == [400]
    assert (sink.delivered, sink.failed) == (0, 1)


def test_webhook_gives_up_on_connection_errors(hook: SimpleNamespace) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"  # nothing listens there
    sink = WebhookSink(url, retries=2, backoff_s=0.001, timeout_s=2)
    sink.send(event())
    assert sink.close(10)
    assert (sink.delivered, sink.failed) == (0, 1)


def test_webhook_queue_full_drops_without_blocking(hook: SimpleNamespace) -> None:
    hook.entered, hook.release = threading.Event(), threading.Event()
    sink = WebhookSink(hook.url, queue_size=1)
    try:
        sink.send(event())
        assert hook.entered.wait(10)  # the sender thread is stuck in the first POST
        sink.send(event("critical"))  # queued
        sink.send(event("info"))  # queue full: dropped, send() returns at once
        assert sink.dropped == 1
    finally:
        hook.release.set()
    assert sink.close(10)
    assert [body["severity"] for _, body, _ in hook.received] == ["warning", "critical"]


def test_engine_routes_critical_to_webhook(tmp_path: Path, hook: SimpleNamespace) -> None:
    engine = engine_from_config(
        {"routes": [{"sink": "webhook", "url": hook.url, "severity": "critical"}, {"sink": "log"}]},
        incident_log=tmp_path / "incidents.jsonl",
    )
    measurements = [psi(0.5, "score"), psi(0.5, "amount")]
    engine.evaluate(measurements, now=T0)
    events = engine.evaluate(measurements, now=T0 + 600)
    engine.close(10)
    assert sorted(e.severity for e in events) == ["critical", "warning"]
    assert [(body["rule"], body["state"]) for _, body, _ in hook.received] == [
        ("score_psi", "firing")
    ]


# ---------------------------------------------------------------------------- CLI


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["alerts", "list", *argv])
    return args.handler(args)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A models directory whose incident log holds one resolved and one open incident."""
    rules = [amount_rule(), AlertRule(name="score_psi", measure="psi", column="score",
                                      threshold=0.2, severity="critical")]  # fmt: skip
    engine = AlertEngine(rules, Router([("*", "*", InMemoryAlertSink())]),
                         incident_log_path(tmp_path / "models"))  # fmt: skip
    engine.evaluate([psi(0.41), psi(0.3, "score")], now=T0)
    engine.evaluate([psi(0.41), psi(0.3, "score")], now=T0 + 600)
    engine.evaluate([psi(0.1), psi(0.3, "score")], now=T0 + 3600)
    engine.evaluate([psi(0.1), psi(0.3, "score")], now=T0 + 3900)
    return tmp_path / "models"


def test_cli_list_human(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--models", str(models)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    amount = next(line for line in lines if "amount_psi" in line)
    score = next(line for line in lines if "score_psi" in line)
    for part in ("resolved", "warning", "fraud v3", "amount/1h", "0.41 > 0.25",
                 "started 2026-01-01T00:00:00Z", "resolved 2026-01-01T01:05:00Z"):  # fmt: skip
        assert part in amount, (part, amount)
    for part in ("firing", "critical", "score/1h", "0.3 > 0.2", "open"):
        assert part in score, (part, score)
    (incident,) = read_incidents(incident_log_path(models), open_only=True)
    assert score.startswith(incident["id"][:8])

    assert cli("--models", str(models), "--open") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "score_psi" in line


def test_cli_list_json_and_paths(
    models: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("--incidents", str(incident_log_path(models)), "--json") == 0
    incidents = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(i["rule"], i["state"]) for i in incidents] == [
        ("amount_psi", "resolved"), ("score_psi", "firing"),
    ]  # fmt: skip
    assert incidents[0]["resolved_at"] == T0 + 3900

    monkeypatch.setenv("RISKWIRE_MODELS", str(models))
    assert cli("--open", "--json") == 0
    (only,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert only["rule"] == "score_psi"

    assert cli("--models", str(models / "elsewhere")) == 0
    assert capsys.readouterr().out.startswith("no incidents in ")
