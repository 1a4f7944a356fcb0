"""Validation policies, drift monitoring and alerting against a real 2-worker server."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from riskwire.clients.client import RiskwireClient
from riskwire.pipeline import synth
from riskwire.protos import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from riskwire.server.monitoring.alerts import read_incidents

pytestmark = pytest.mark.timeout(300)
T0 = 1_767_225_600_000 + 12 * 3_600_000


def tx(**fields: object) -> dict[str, object]:
    values: dict[str, object] = {
        "transaction_id": f"tx-{uuid.uuid4().hex[:10]}",
        "card_id": f"card-{uuid.uuid4().hex}",
        "merchant_id": "m-1",
        "mcc": 5411,
        "amount": 42.5,
        "currency": "EUR",
        "country": "DE",
        "card_country": "DE",
        "channel": "pos",
        "event_time_ms": T0,
    }
    return values | fields


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """google.rpc.BadRequest field → description, from the call's status details."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    found = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found |= {v.field: v.description for v in bad.field_violations}
    return found


def drift_status(target: str, **request: str) -> admin_pb2.DriftStatusResponse:
    with grpc.insecure_channel(target) as channel:
        return admin_pb2_grpc.AdminStub(channel).DriftStatus(
            admin_pb2.DriftStatusRequest(**request), timeout=10
        )


def test_flag_and_reject_policies(server) -> None:
    with RiskwireClient(server.target) as client:
        clean = client.score(tx())
        assert clean.error is None
        unknown = client.score(tx(country="ZZ", channel="telepathy"))
        assert math.isfinite(unknown.probability)  # flagged, still scored
        huge = client.score(tx(amount=1e13))
        with pytest.raises(grpc.RpcError) as caught:
            client.score(tx(mcc=12000))  # outside the schema: rejected
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transaction.mcc" in field_violations(caught.value)
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        flagged = stub.Score(
            scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(**tx(country="ZZ", channel="telepathy"))
            ),
            timeout=10,
        )
        assert set(flagged.flags) == {"category:country", "category:channel"}
        huge = stub.Score(
            scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(**tx(amount=1e13))),
            timeout=10,
        )
        assert list(huge.flags) == ["range:amount"]
        batch = stub.ScoreBatch(
            scoring_pb2.ScoreBatchRequest(
                transactions=[
                    scoring_pb2.Transaction(**tx()),
                    scoring_pb2.Transaction(**tx(mcc=-3)),
                    scoring_pb2.Transaction(**tx(currency="XXX")),
                ]
            ),
            timeout=10,
        )
    first, rejected, odd = batch.results
    assert not first.flags and not first.HasField("error")
    assert rejected.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "mcc" in rejected.error.message
    assert list(odd.flags) == ["category:currency"] and odd.probability > 0


def test_reject_policy_names_every_field(start_server, models_dir) -> None:
    strict = start_server(
        models_dir,
        env={"RISKWIRE_VALIDATE_CATEGORY": "reject", "RISKWIRE_VALIDATE_RANGE": "reject"},
    )
    with RiskwireClient(strict.target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.score(tx(country="ZZ", currency="XXX", amount=1e13))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert set(violations) == {
            "transaction.country",
            "transaction.currency",
            "transaction.amount",
        }
        assert "seen in training" in violations["transaction.country"]
        assert client.score(tx()).error is None
    counters = drift_status(strict.admin_target).validation
    deadline = time.monotonic() + 20
    while counters.get("rejected", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        counters = drift_status(strict.admin_target).validation
    assert counters["rejected"] >= 1 and counters["validated"] >= 2


BAD_VALUES = [
    {"amount": float("nan")},
    {"amount": float("inf")},
    {"amount": float("-inf")},
    {"amount": -5.0},
    {"amount": 1e300},
    {"card_id": ""},
    {"merchant_id": ""},
    {"country": ""},
    {"currency": "€€€"},
    {"channel": "x" * 5000},
    {"mcc": -1},
    {"mcc": 2**31 - 1},
    {"card_country": "??"},
    {"event_time_ms": -1},
]


def test_fuzzed_values_never_pass_silently(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        for bad in BAD_VALUES:
            request = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(**tx(**bad)))
            try:
                response = stub.Score(request, timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, exc.details())
                assert field_violations(exc), bad
                continue
            assert response.flags, f"{bad} was scored without a flag"
    assert server.health() == 1  # SERVING: nothing crashed


class WebhookReceiver:
    """A real local HTTP endpoint that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        events = self.events = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def send_traffic(target: str, rows, amount_scale: float = 1.0) -> None:  # noqa: ANN001
    """Synthetic transactions as ScoreBatch calls of 500 rows."""
    table = rows.to_pylist()
    with RiskwireClient(target, timeout_s=30) as client:
        for start in range(0, len(table), 500):
            chunk = []
            for row in table[start : start + 500]:
                chunk.append(
                    {
                        **{k: row[k] for k in ("transaction_id", "card_id", "merchant_id")},
                        **{k: row[k] for k in ("mcc", "currency", "country", "card_country")},
                        "channel": row["channel"],
                        "amount": row["amount"] * amount_scale,
                        "event_time_ms": int(row["event_time"].timestamp() * 1000),
                    }
                )
            results = client.score_batch(chunk)
            assert all(r.error is None for r in results)


def wait_for(predicate, timeout_s: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def test_shifted_traffic_fires_one_alert_that_resolves(start_server, models_dir, tmp_path):
    receiver = WebhookReceiver()
    rules = tmp_path / "alerts.toml"
    rules.write_text(
        """
[[rule]]
name = "amount_shift"
measure = "psi"
column = "amount"
window = "6s"
threshold = 1.0
for_s = 1
resolve_threshold = 0.5
resolve_for_s = 1
severity = "critical"
"""
    )
    models = tmp_path / "models"
    shutil.copytree(models_dir, models, ignore=shutil.ignore_patterns(".*"))
    server = start_server(
        models,
        env={
            "RISKWIRE_DRIFT_WINDOWS": "6s",
            "RISKWIRE_DRIFT_BUCKET_S": "1",
            "RISKWIRE_DRIFT_PUBLISH_S": "0.25",
            "RISKWIRE_DRIFT_EVAL_S": "0.25",
            "RISKWIRE_DRIFT_MIN_COUNT": "300",
            "RISKWIRE_ALERT_RULES": str(rules),
            "RISKWIRE_ALERT_WEBHOOK": receiver.url,
        },
    )
    try:
        normal = synth.generate(12_000, seed=11)

        def amount_psi() -> float:
            values = drift_status(server.admin_target, window="6s").values
            found = [v.value for v in values if v.column == "amount" and v.measure == "psi"]
            return found[0] if found and not math.isnan(found[0]) else None

        # traffic like the training data: no alert
        send_traffic(server.target, normal.slice(0, 3000))
        psi_normal = wait_for(amount_psi, 20, "a drift value")
        assert psi_normal < 0.5
        time.sleep(1.5)
        assert receiver.events == []

        # amounts 30x larger: amount (only) drifts, one alert fires through the webhook
        def fired():  # noqa: ANN202 - keeps the window full of shifted traffic meanwhile
            part = int(time.monotonic() * 4) % 3
            send_traffic(server.target, normal.slice(3000 + part * 1000, 1000), amount_scale=30)
            return receiver.events

        wait_for(fired, 60, "the webhook to be called")
        status = drift_status(server.admin_target, window="6s")
        psi = {v.column: v.value for v in status.values if v.measure == "psi"}
        assert psi["amount"] > 1.0
        assert psi["channel"] < 0.5 and psi["country"] < 0.5  # the right feature drifts
        assert [a.rule for a in status.alerts] == ["amount_shift"]
        for part in range(2):  # still shifted: no second firing
            send_traffic(server.target, normal.slice(6000 + part * 500, 500), amount_scale=30)
            time.sleep(0.5)
        firing = [e for e in receiver.events if e["state"] == "firing"]
        assert len(firing) == 1 and firing[0]["severity"] == "critical"
        assert firing[0]["column"] == "amount" and firing[0]["rule"] == "amount_shift"

        # back to normal: the window refills with normal traffic, the alert resolves once
        def resolved():  # noqa: ANN202
            send_traffic(server.target, normal.slice(7000 + (int(time.time()) % 4) * 1000, 1000))
            return [e for e in receiver.events if e["state"] == "resolved"]

        done = wait_for(resolved, 60, "the alert to resolve")
        assert len(done) == 1 and done[0]["id"] == firing[0]["id"]
        assert len([e for e in receiver.events if e["state"] == "firing"]) == 1
        incidents = read_incidents(models / ".alerts" / "incidents.jsonl")
        assert [(i["rule"], i["state"]) for i in incidents] == [("amount_shift", "resolved")]
        history = (models / ".drift" / "history.jsonl").read_text().splitlines()
        assert history and json.loads(history[-1])["values"]
    finally:
        receiver.close()


def test_batch_validation_is_one_kernel_pass_with_the_same_verdicts(server) -> None:
    """The batch kernel and the single-row kernel agree on every row."""
    rows = [
        tx(),
        tx(country="ZZ"),
        tx(amount=1e13),
        tx(channel="telepathy", currency="XXX"),
        tx(mcc=9998),
    ]
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        singles = [
            sorted(
                stub.Score(
                    scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(**row)),
                    timeout=10,
                ).flags
            )
            for row in rows
        ]
        batch = stub.ScoreBatch(
            scoring_pb2.ScoreBatchRequest(
                transactions=[scoring_pb2.Transaction(**r) for r in rows]
            ),
            timeout=10,
        )
    assert [sorted(r.flags) for r in batch.results] == singles
    assert np.count_nonzero([bool(f) for f in singles]) >= 3


def test_live_performance_from_delayed_labels_detects_concept_drift(
    start_server, models_dir, tmp_path
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(
        '[[rule]]\nname = "auc"\nmeasure = "auc_drop"\nwindow = "1h"\nthreshold = 0.3\n'
        'for_s = 0\nresolve_for_s = 0\nseverity = "critical"\n'
    )
    server = start_server(
        models_dir,
        env={
            "RISKWIRE_SHADOW_DIR": str(tmp_path / "logs"),
            "RISKWIRE_PREDICTION_LOG_RATE": "100",  # every answer: labels join them all
            "RISKWIRE_DRIFT_EVAL_S": "0.5",
            "RISKWIRE_PERFORMANCE_EVAL_S": "0.5",
            "RISKWIRE_PERFORMANCE_MIN_LABELS": "50",
            "RISKWIRE_ALERT_RULES": str(rules),
        },
    )
    traffic = synth.generate(6000, seed=21)
    true_labels = traffic.column("label").to_pylist()
    tids = traffic.column("transaction_id").to_pylist()

    def performance() -> dict[str, float]:
        values = drift_status(server.admin_target, window="1h").values
        return {v.measure: v.value for v in values if v.column == "performance"}

    def label(start: int, stop: int, flip: bool) -> None:
        with RiskwireClient(server.target, timeout_s=30) as client:
            outcomes = [
                {"transaction_id": tids[i], "label": true_labels[i] ^ flip}
                for i in range(start, stop)
            ]
            assert client.feedback(outcomes) == stop - start

    send_traffic(server.target, traffic.slice(0, 3000))
    label(0, 3000, flip=False)  # the truth, days later
    live = wait_for(
        lambda: (p := performance()) and not math.isnan(p.get("auc", math.nan)) and p,
        30,
        "live performance",
    )
    assert live["auc"] > 0.75 and live["auc_drop"] < 0.25  # far better than chance
    assert 0 < live["label_rate"] < 0.1

    # the world changes: what the model calls safe is now fraud and vice versa
    send_traffic(server.target, traffic.slice(3000, 6000))
    label(3000, 6000, flip=True)
    alert = wait_for(
        lambda: [a for a in drift_status(server.admin_target).alerts if a.rule == "auc"],
        30,
        "the concept-drift alert",
    )
    assert alert[0].measure == "auc_drop" and alert[0].value > 0.3


def test_live_performance_without_labels_reads_only_the_served_versions(tmp_path) -> None:
    """No label stored yet: one NaN row per served version, window and measure (read
    from three narrow columns of the log)."""
    from datetime import UTC, datetime

    from riskwire.server.monitoring.performance import MEASURES, live_performance
    from riskwire.shadow.records import STAMP_FORMAT

    now = time.time()
    folder = tmp_path / "predictions"
    folder.mkdir()
    stamp = datetime.fromtimestamp(now, UTC).strftime(STAMP_FORMAT)
    _prediction_segment(
        folder / f"part-{stamp}-w0-1-000001.parquet",
        [(60, "fraud", "1"), (60, "fraud", "2"), (60, "fraud", "1")],
    )
    rows = live_performance(tmp_path, tmp_path, {"5m": 300.0, "1h": 3600.0}, now=now)
    assert {(r["version"], r["window"]) for r in rows} == {
        (v, w) for v in ("1", "2") for w in ("5m", "1h")
    }
    assert len(rows) == 4 * len(MEASURES)
    assert all(math.isnan(r["value"]) and r["count"] == 0 for r in rows)


def _prediction_segment(path, rows: list[tuple], **options) -> None:  # noqa: ANN001
    """A prediction-log segment of (seconds ago, model, version) rows."""
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from riskwire.shadow.records import PREDICTION_SCHEMA

    now = time.time()
    values = {name: [None] * len(rows) for name in PREDICTION_SCHEMA.names}
    values["time"] = [datetime.fromtimestamp(now - ago, UTC) for ago, _, _ in rows]
    values["model"] = [model for _, model, _ in rows]
    values["version"] = [version for _, _, version in rows]
    pq.write_table(pa.table(values, schema=PREDICTION_SCHEMA), path, **options)


def _served_from_rows(path) -> tuple:  # noqa: ANN001
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["time", "model", "version"])
    pairs = set(zip(table["model"].to_pylist(), table["version"].to_pylist(), strict=True))
    return pc.max(table["time"]).as_py(), frozenset(pairs)


@pytest.mark.parametrize(
    ("rows", "options", "from_footer"),
    [
        ([(60, "fraud", "1"), (5, "fraud", "1"), (30, "fraud", "1")], {}, True),
        # several row groups of one version: the newest time over all of them
        (
            [(50, "fraud", "2"), (40, "fraud", "2"), (3, "fraud", "2"), (70, "fraud", "2")],
            {"row_group_size": 2},
            True,
        ),
        ([(60, "fraud", "1"), (5, "fraud", "2")], {}, False),  # two versions: rows read
        ([(60, "fraud", "1"), (5, "other", "1")], {}, False),
        ([(60, "fraud", "1"), (5, None, None)], {}, False),  # a null: rows read
        ([(60, "fraud", "1")], {"write_statistics": False}, False),
    ],
)
def test_a_segment_of_one_version_is_summed_up_from_its_footer(
    tmp_path, monkeypatch, rows, options, from_footer
) -> None:
    """The supervisor's summary of a segment (newest time, versions served) is the same
    from the footer's statistics as from the rows; rows are read only when the footer
    cannot tell."""
    import pyarrow.parquet as pq

    from riskwire.server.monitoring import performance

    path = tmp_path / "segment.parquet"
    _prediction_segment(path, rows, **options)
    expected = _served_from_rows(path)
    reads = []
    read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: reads.append(a) or read_table(*a, **k))
    assert performance._segment_served.__wrapped__(path) == expected
    assert (not reads) is from_footer
