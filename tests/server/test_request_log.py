"""Request-level log: one JSON line per call, joined to the caller's W3C trace."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from riskwire.clients.client import RiskwireClient, trace_metadata
from riskwire.server.request_log import RequestLog, parse_traceparent

pytestmark = pytest.mark.timeout(300)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def tx(card_id: str) -> dict[str, object]:
    return {
        "card_id": card_id, "merchant_id": "m-1", "mcc": 5411, "amount": 12.5,
        "currency": "EUR", "country": "DE", "card_country": "DE", "channel": "pos",
        "event_time_ms": 1_767_225_600_000,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE_ID}-{PARENT}-01", (TRACE_ID, PARENT, True)),
        (f"00-{TRACE_ID.upper()}-{PARENT}-00", (TRACE_ID, PARENT, False)),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"ff-{TRACE_ID}-{PARENT}-01", None),
        ("garbage", None),
    ],
)
def test_parse_traceparent(value: str, expected) -> None:  # noqa: ANN001
    assert parse_traceparent(value) == expected


def read_lines(directory: Path) -> list[dict]:
    lines = []
    for path in sorted(directory.glob("requests-w*.jsonl*")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_every_call_is_logged_with_the_callers_trace(start_server, models_dir, tmp_path):
    logs = tmp_path / "requests"
    server = start_server(models_dir, env={"RISKWIRE_REQUEST_LOG_DIR": str(logs)})
    card = f"card-{uuid.uuid4().hex}"
    traceparent = f"00-{TRACE_ID}-{PARENT}-01"
    with RiskwireClient(server.target) as client:
        scored = client.score(tx(card), metadata=[("traceparent", traceparent)])
        with pytest.raises(grpc.RpcError):
            client.score({**tx(card), "amount": -1.0})
        trace.set_tracer_provider(TracerProvider())
        with trace.get_tracer("test").start_as_current_span("checkout") as span:
            injected = trace_metadata()
            client.score(tx(card))
        caller = span.get_span_context()
    assert injected[0][1].startswith(f"00-{caller.trace_id:032x}-{caller.span_id:016x}-")

    def written() -> list[dict]:
        return [line for line in read_lines(logs) if line["method"] == "Score"]

    deadline = time.monotonic() + 20
    while len(written()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = written()
    assert len(lines) == 3
    ok, bad, joined = sorted(lines, key=lambda line: line["time"])
    assert (ok["trace_id"], ok["parent_span_id"]) == (TRACE_ID, PARENT)
    assert ok["status"] == "OK" and ok["decision"] == scored.decision
    assert ok["model"] == "fraud" and ok["model_version"] == scored.model_version
    assert len(ok["span_id"]) == 16 and ok["latency_ms"] > 0
    assert bad["status"] == "INVALID_ARGUMENT" and "decision" not in bad
    assert bad["trace_id"] != TRACE_ID and len(bad["trace_id"]) == 32  # a fresh trace
    assert joined["trace_id"] == f"{caller.trace_id:032x}"
    assert joined["parent_span_id"] == f"{caller.span_id:016x}"
    assert card not in "".join(p.read_text() for p in logs.glob("*"))  # no card ids


def test_log_rotates_by_size(tmp_path) -> None:
    request_log = RequestLog(tmp_path / "r.jsonl", worker=0, max_bytes=2000, backups=2)
    for round_ in range(6):
        for _ in range(10):
            request_log.add("", "Score", "OK", time.time(), 0.001, None)
        request_log.stop()  # writes what is pending
        assert round_ < 1 or (tmp_path / "r.jsonl.1").exists()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]  # at most `backups` old files
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2000
        assert all(json.loads(line)["method"] == "Score" for line in path.read_text().splitlines())


def read_spans(directory: Path) -> list[dict]:
    spans = []
    for path in sorted(directory.glob("spans-w*.jsonl")):
        spans += [json.loads(line) for line in path.read_text().splitlines()]
    return spans


def test_server_spans_join_the_callers_trace_and_sample_by_outcome(
    start_server, models_dir, tmp_path
) -> None:
    spans_dir = tmp_path / "spans"
    server = start_server(
        models_dir,
        env={
            "RISKWIRE_TRACING_EXPORTER": "jsonl",
            "RISKWIRE_TRACING_DIR": str(spans_dir),
            "RISKWIRE_TRACING_SAMPLE_RATIO": "0",  # only sampled parents, errors, slow calls
            "RISKWIRE_TRACING_SLOW_MS": "10000",
        },
    )
    card = f"card-{uuid.uuid4().hex}"
    sampled = f"00-{TRACE_ID}-{PARENT}-01"
    unsampled = f"00-{'1' * 32}-{PARENT}-00"
    with RiskwireClient(server.target) as client:
        client.score(tx(card), metadata=[("traceparent", sampled)])
        for _ in range(5):
            client.score(tx(card), metadata=[("traceparent", unsampled)])  # not kept
            client.score(tx(card))  # no parent, ratio 0: not kept
        with pytest.raises(grpc.RpcError):
            client.score({**tx(card), "mcc": 12000})  # an error: always kept

    deadline = time.monotonic() + 20
    while len(read_spans(spans_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # nothing else may arrive
    spans = read_spans(spans_dir)
    assert len(spans) == 2, spans
    ok, error = sorted(spans, key=lambda s: s["start_time_unix_nano"])
    assert ok["name"] == "riskwire.v1.Scoring/Score" and ok["kind"] == "SERVER"
    assert (ok["trace_id"], ok["parent_span_id"]) == (TRACE_ID, PARENT)
    attributes = ok["attributes"]
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "Score"
    assert attributes["rpc.service"] == "riskwire.v1.Scoring"
    assert attributes["rpc.grpc.status_code"] == 0 and attributes["server.port"] == server.port
    assert attributes["riskwire.model"] == "fraud" and "riskwire.decision" in attributes
    assert ok["resource"]["service.name"] == "riskwire"
    assert ok["resource"]["service.instance.id"].endswith(("-w0", "-w1"))
    assert ok["end_time_unix_nano"] > ok["start_time_unix_nano"]
    assert error["status"] == "ERROR" and error["attributes"]["rpc.grpc.status_code"] == 3
    assert card not in json.dumps(spans)  # no card id in any exported attribute
