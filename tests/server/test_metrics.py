"""Metrics: per-worker aggregation, merging, Prometheus exposition (parsed with
prometheus_client's own parser) and the live endpoint of a 2-worker server."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import Histogram, Sum
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.server.monitoring.metrics import (
    LATENCY_BOUNDS_S,
    CallMetrics,
    MergedMetrics,
    PrometheusCollector,
    counter,
    gauge,
    merge_series,
    metrics_data,
    prometheus_name,
)


def _exposition(merged: MergedMetrics) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(merged))
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_call_metrics_count_and_bucket_every_call(tmp_path: Path) -> None:
    metrics = CallMetrics(0, tmp_path / "worker-0-1.json")
    keys = [("Score", "OK", "fraud", "3")] * 3 + [("Score", "INVALID_ARGUMENT", "", "")]
    metrics.add_calls(keys, [0.00005, 0.0003, 0.02, 20.0])
    metrics.add_calls([("ScoreBatch", "OK", "fraud", "3")], [0.001])
    series = {(s["name"], s["attributes"].get("rpc.method"), s["attributes"].get(
        "rpc.grpc.status_code")): s for s in metrics.series()}  # fmt: skip
    histogram = series[("rpc.server.call.duration", "Score", 0)]
    assert histogram["count"] == 3 and histogram["sum"] == pytest.approx(0.02035)
    buckets = histogram["buckets"]
    assert len(buckets) == len(LATENCY_BOUNDS_S) + 1
    assert buckets[0] == 1 and buckets[LATENCY_BOUNDS_S.index(0.0005)] == 1
    assert buckets[LATENCY_BOUNDS_S.index(0.025)] == 1
    failed = series[("rpc.server.call.duration", "Score", 3)]
    assert failed["buckets"][-1] == 1  # 20 s: above every bound, the +Inf bucket
    assert series[("riskwire.requests", "ScoreBatch", 0)]["value"] == 1
    assert series[("riskwire.rpc.in_flight", None, None)]["value"] == 0
    metrics.publish()
    payload = json.loads((tmp_path / "worker-0-1.json").read_text())
    assert payload["series"] == json.loads(json.dumps(metrics.series()))


def test_merge_sums_counters_everywhere_and_gauges_of_live_workers() -> None:
    labels = {"rpc.method": "Score"}

    def histogram(count: int) -> dict:
        return {"name": "d", "kind": "histogram", "unit": "s", "description": "",
                "attributes": labels, "count": count, "sum": count * 0.001,
                "bounds": [0.001], "buckets": [count, 0]}  # fmt: skip

    live = [counter("c", 5, labels), gauge("g", 2, {}), histogram(5)]
    dead = [counter("c", 7, labels), gauge("g", 9, {}), histogram(7)]
    merged = {s["name"]: s for s in merge_series([(True, live), (False, dead)])}
    assert merged["c"]["value"] == 12
    assert merged["g"]["value"] == 2  # the dead worker's in-flight count is gone
    assert merged["d"]["count"] == 12 and merged["d"]["buckets"] == [12, 0]
    assert live[2]["buckets"] == [5, 0]  # inputs untouched


def test_prometheus_text_parses_and_matches_the_merged_counts(tmp_path: Path) -> None:
    for worker, pid in ((0, 101), (1, 102)):
        metrics = CallMetrics(worker, tmp_path / f"worker-{worker}-{pid}.json")
        metrics.add_calls([("Score", "OK", "fraud", "3")] * (worker + 2), [0.001] * (worker + 2))
        metrics.publish()
        payload = json.loads(metrics.path.read_text())
        payload["pid"] = pid
        metrics.path.write_text(json.dumps(payload))
    merged = MergedMetrics(
        tmp_path, extra=lambda: [gauge("riskwire.workers.ready", 2, {})], alive=lambda pid: True
    )
    samples = _samples(_exposition(merged))
    (total,) = samples["riskwire_requests_total"]
    assert total.value == 5 and total.labels["rpc_method"] == "Score"
    assert total.labels["riskwire_model_version"] == "3"
    (count,) = samples["rpc_server_call_duration_seconds_count"]
    assert count.value == 5
    infinity = [s for s in samples["rpc_server_call_duration_seconds_bucket"]
                if s.labels["le"] == "+Inf"]  # fmt: skip
    assert infinity[0].value == 5
    assert samples["riskwire_workers_ready"][0].value == 2


def test_metrics_data_is_the_sdk_model() -> None:
    series = [
        counter("riskwire.requests", 4, {"rpc.method": "Score"}),
        {
            "name": "rpc.server.call.duration",
            "kind": "histogram",
            "unit": "s",
            "description": "",
            "attributes": {"rpc.method": "Score"},
            "count": 4,
            "sum": 0.1,
            "bounds": [0.05],
            "buckets": [3, 1],
        },  # fmt: skip
        gauge("riskwire.drift", float("nan"), {"column": "amount"}),
    ]
    data = metrics_data(series, Resource.create({}), 1, 2)
    metrics = {m.name: m for m in data.resource_metrics[0].scope_metrics[0].metrics}
    assert isinstance(metrics["riskwire.requests"].data, Sum)
    assert metrics["riskwire.requests"].data.is_monotonic
    assert isinstance(metrics["rpc.server.call.duration"].data, Histogram)
    assert list(metrics["rpc.server.call.duration"].data.data_points[0].bucket_counts) == [3, 1]
    assert not metrics["riskwire.drift"].data.data_points  # NaN is left out
    json.loads(data.to_json())  # serialisable by the SDK


def test_prometheus_names() -> None:
    assert prometheus_name("rpc.server.call.duration", "s") == "rpc_server_call_duration_seconds"
    assert prometheus_name("riskwire.requests", "{request}") == "riskwire_requests"


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return _samples(response.read().decode())


def _requests(samples: dict[str, list], method: str, code: str) -> float:
    return sum(
        s.value
        for s in samples.get("riskwire_requests_total", [])
        if s.labels["rpc_method"] == method and s.labels["rpc_grpc_status_code"] == code
    )


def test_the_endpoint_merges_both_workers(start_server, models_dir) -> None:
    server = start_server(models_dir)
    channels = server.connect_each_worker()  # one probe Score per worker
    card = f"card-{uuid.uuid4().hex}"
    sent = 0
    try:
        for channel in channels.values():
            stub = scoring_pb2_grpc.ScoringStub(channel)
            for i in range(7):  # ScoreBatch: the probes above only call Score
                transaction = scoring_pb2.Transaction(
                    card_id=card, merchant_id="m-1", mcc=5411, amount=5.0 + i,
                    currency="EUR", country="DE", card_country="DE", channel="pos",
                )  # fmt: skip
                request = scoring_pb2.ScoreBatchRequest(transactions=[transaction])
                stub.ScoreBatch(request, timeout=10)
                sent += 1
            with pytest.raises(Exception):  # noqa: B017 - any RpcError; the count matters
                stub.Score(scoring_pb2.ScoreRequest(), timeout=10)
            items = [scoring_pb2.ScoreRequest(transaction=transaction)] * 3
            items.append(scoring_pb2.ScoreRequest())  # no transaction: an item error
            assert len(list(stub.ScoreStream(iter(items), timeout=10))) == 4
    finally:
        for channel in channels.values():
            channel.close()
    deadline = time.monotonic() + 20
    samples = _scrape(server.metrics_port)
    while _requests(samples, "ScoreBatch", "0") < sent and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = _scrape(server.metrics_port)
    assert _requests(samples, "ScoreBatch", "0") == sent
    assert _requests(samples, "Score", "3") == 2  # one INVALID_ARGUMENT per worker
    while _requests(samples, "ScoreStream", "3") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = _scrape(server.metrics_port)
    assert _requests(samples, "ScoreStream", "0") == 6  # stream items count one by one
    assert _requests(samples, "ScoreStream", "3") == 2
    counts = [
        s
        for s in samples["rpc_server_call_duration_seconds_count"]
        if s.labels["rpc_method"] == "ScoreBatch"
    ]
    assert sum(s.value for s in counts) == sent  # fmt: skip
    assert samples["riskwire_workers_ready"][0].value == 2
    assert samples["riskwire_rpc_in_flight"][0].value >= 0
    validated = [s for s in samples["riskwire_validation_rows_total"]
                 if s.labels["outcome"] == "validated"]  # fmt: skip
    assert validated and validated[0].value >= sent
    assert samples["riskwire_admission_refused_total"][0].value == 0  # nothing shed here
    restarts = samples["riskwire_worker_restarts_total"]
    assert len(restarts) == 2 and all(s.value == 0 for s in restarts)
    helpers = samples["riskwire_helper_restarts_total"]
    assert {s.labels["process"] for s in helpers} >= {"prediction_log_writer"}
    assert all(s.value == 0 for s in helpers)
    assert card not in json.dumps([[s.labels for s in v] for v in samples.values()])
