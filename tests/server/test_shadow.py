"""Shadow deployment against a real 2-worker server: mirroring, records, admin API, faults.

The server serves ``fraud`` v2 (the highest version) and mirrors to v1 in the same
server, or to a remote Open Inference Protocol endpoint that fails or hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from riskwire.clients.admin import AdminClient
from riskwire.clients.client import RiskwireClient, to_transaction
from riskwire.clients.local import LocalScorer
from riskwire.pipeline.build import build
from riskwire.pipeline.package import load_package
from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.shadow.compare import PairStats
from riskwire.shadow.records import FEATURE_COLUMNS, read_labels, read_records

pytestmark = pytest.mark.timeout(300)

T0 = 1_767_225_600_000 + 12 * 3_600_000  # 2026-01-01T12:00Z
CHANNELS = ("pos", "ecommerce", "contactless", "atm")


@pytest.fixture(scope="module")
def two_versions(synth_data_file, small_config, tmp_path_factory) -> Path:
    """A models directory holding fraud v1 and a different fraud v2."""
    models = tmp_path_factory.mktemp("shadow-models")
    build(synth_data_file, name="fraud", models=models, config=small_config())
    second = small_config()
    second.lightgbm["num_leaves"] = 7
    build(synth_data_file, name="fraud", models=models, config=second)
    return models


def traffic(n: int, seed: int) -> list[dict[str, object]]:
    """Transactions over a few cards, some in fast bursts, mixed channels; explicit times."""
    rng = np.random.default_rng(seed)
    cards = [f"card-{uuid.uuid4().hex}" for _ in range(12)]
    out, now = [], T0
    for i in range(n):
        now += int(rng.choice([800, 30_000, 600_000]))
        out.append(
            {
                "transaction_id": f"tx-{seed}-{i}",
                "card_id": cards[int(rng.integers(len(cards)))],
                "merchant_id": f"m-{int(rng.integers(40))}",
                "mcc": int(rng.choice([5411, 5999, 6011, 7995])),
                "amount": float(np.round(rng.lognormal(3.5, 1.2), 2)),
                "currency": "EUR",
                "country": str(rng.choice(["DE", "FR", "NG"])),
                "card_country": "DE",
                "channel": CHANNELS[i % len(CHANNELS)],
                "event_time_ms": now,
            }
        )
    return out


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_applied(admin_target: str) -> None:
    """Wait until every worker runs the stored shadow configuration."""

    def applied() -> bool:
        status = AdminClient(admin_target).shadow_status()
        generation = status["config"]["generation"]
        return len(status["workers"]) == 2 and all(
            w["generation"] == generation for w in status["workers"]
        )

    wait_until(applied, timeout_s=5, what="workers to apply the configuration")


def shadow_dir(models: Path) -> Path:
    return models / ".shadow"


def records_with_ids(models: Path, ids: set[str]):  # noqa: ANN201
    table = read_records(shadow_dir(models))
    return table.filter(np.isin(np.array(table["request_id"].to_pylist(), dtype=object), list(ids)))


@pytest.fixture(scope="module")
def shadow_server(module_start_server, two_versions):  # noqa: ANN001, ANN201
    """2 workers serving fraud v2, mirroring 100% to v1."""
    return module_start_server(two_versions, env={"RISKWIRE_SHADOW_MODEL": "fraud:1"})


def test_every_request_is_mirrored_exactly_once_and_scored_exactly(
    shadow_server, two_versions
) -> None:
    sent: set[str] = set()
    channels = shadow_server.connect_each_worker()
    try:
        stubs = [scoring_pb2_grpc.ScoringStub(c) for c in channels.values()]
        for i, t in enumerate(traffic(300, seed=1)):
            request_id = f"req-{uuid.uuid4().hex}"
            request = scoring_pb2.ScoreRequest(transaction=to_transaction(t), request_id=request_id)
            assert stubs[i % len(stubs)].Score(request, timeout=10).model_version == "2"
            sent.add(request_id)
    finally:
        for channel in channels.values():
            channel.close()
    with RiskwireClient(shadow_server.target) as client:
        batch = client.score_batch(traffic(20, seed=2), request_id="batch-1")
    assert all(r.error is None for r in batch)
    sent |= {f"batch-1/{i}" for i in range(20)}

    table = wait_until(
        lambda: (t := records_with_ids(two_versions, sent)).num_rows >= len(sent) and t,
        what="all records on disk",
    )
    ids = table["request_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(sent)
    assert set(ids) == sent
    assert set(table["worker"].to_pylist()) == {0, 1}  # both workers mirrored
    assert set(table["primary_version"].to_pylist()) == {"2"}
    assert set(table["shadow_version"].to_pylist()) == {"1"}
    assert table["shadow_error"].null_count == table.num_rows

    # Both scores are exactly what each model gives on the recorded feature vector.
    features = np.column_stack([table[c].to_numpy() for c in FEATURE_COLUMNS])
    v1 = load_package(two_versions / "fraud" / "1").forest
    v2 = load_package(two_versions / "fraud" / "2").forest
    np.testing.assert_array_equal(table["shadow_probability"].to_numpy(), v1.predict(features))
    np.testing.assert_array_equal(table["primary_probability"].to_numpy(), v2.predict(features))
    assert (table["primary_latency_us"].to_numpy() > 0).all()
    assert not set(table.column_names) & {"card_id"}

    # The merged online summary equals a recomputation from every record on disk.
    def settled():  # noqa: ANN202
        status = AdminClient(shadow_server.admin_target).shadow_status()
        everything = read_records(shadow_dir(two_versions))
        pair = status["pairs"][0] if status["pairs"] else None
        if pair and pair["mirrored"] == everything.num_rows:
            return status, everything
        return None

    status, everything = wait_until(settled, what="stats and records to agree")
    assert len(status["pairs"]) == 1
    pair = status["pairs"][0]
    expected = PairStats.from_arrays(
        everything["primary_probability"].to_numpy(),
        everything["shadow_probability"].to_numpy(zero_copy_only=False),
        everything["primary_decision"].to_pylist(),
        everything["shadow_decision"].to_pylist(),
    ).summary()
    assert pair["mirrored"] == expected["mirrored"] and pair["failed"] == 0
    assert pair["dropped"] == 0
    assert pair["agreement_rate"] == pytest.approx(expected["agreement_rate"])
    assert pair["flips"] == expected["flips"]
    for name in ("mean_abs_delta", "max_abs_delta", "correlation", "psi"):
        assert pair[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    assert {w["worker"] for w in status["workers"]} == {0, 1}


def test_feedback_labels_are_stored_durably(shadow_server, two_versions) -> None:
    with RiskwireClient(shadow_server.target) as client:
        result = client.score(traffic(1, seed=3)[0])
        stored = client.feedback(
            [
                {"request_id": result.request_id, "label": "fraud", "labelled_at_ms": T0},
                {"transaction_id": "tx-3-0", "label": 0},
            ]
        )
        assert stored == 2
        with pytest.raises(grpc.RpcError) as caught:
            client.feedback([{"label": "fraud"}])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id or transaction_id" in caught.value.details()
    labels = read_labels(shadow_dir(two_versions))  # on disk as soon as the call returned
    rows = {(r["request_id"], r["transaction_id"], r["label"]) for r in labels.to_pylist()}
    assert (result.request_id, "", 1) in rows and ("", "tx-3-0", 0) in rows


def test_runtime_changes_reach_all_workers_without_restart(shadow_server, two_versions) -> None:
    admin = AdminClient(shadow_server.admin_target)
    try:
        stored = admin.set_shadow(enabled=True, version="1", rate_percent=100, filter="channel=atm")
        assert stored["filter"] == "channel=atm"

        wait_applied(shadow_server.admin_target)
        ids = {}
        with RiskwireClient(shadow_server.target) as client:
            for t in traffic(40, seed=4):
                request_id = f"filtered-{uuid.uuid4().hex}"
                client.score(t, request_id=request_id)
                ids[request_id] = t["channel"]
        mirrored = wait_until(
            lambda: (t := records_with_ids(two_versions, set(ids))).num_rows >= 10 and t,
            what="filtered records",
        )
        time.sleep(1.0)  # anything else would have been flushed by now
        mirrored = records_with_ids(two_versions, set(ids))
        assert {ids[i] for i in mirrored["request_id"].to_pylist()} == {"atm"}
        assert mirrored.num_rows == sum(c == "atm" for c in ids.values())

        with pytest.raises(grpc.RpcError) as caught:
            admin.set_shadow(enabled=True, version="9")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            admin.set_shadow(enabled=True, version="1", filter="colour=red")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "colour" in caught.value.details()
    finally:
        admin.set_shadow(enabled=True, version="1", rate_percent=100)
        admin.close()


class FakeShadow:
    """An Open Inference Protocol endpoint whose ModelInfer fails or hangs on every call."""

    def __init__(self, oip_pb, mode: str) -> None:  # noqa: ANN001
        self.mode = mode
        self.calls = 0
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    self.infer,
                    request_deserializer=oip_pb.ModelInferRequest.FromString,
                    response_serializer=oip_pb.ModelInferResponse.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def infer(self, request, context):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.mode == "hang":
            self.release.wait(30)
        context.abort(grpc.StatusCode.INTERNAL, "shadow model exploded")

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


def primary_answers(target: str, transactions: list[dict]) -> list[tuple]:
    """(probability, decision) or the error of each call, in order."""
    answers = []
    with RiskwireClient(target) as client:
        for t in transactions:
            try:
                r = client.score(t)
                answers.append((r.probability, r.decision, r.model_version))
            except grpc.RpcError as exc:
                answers.append((exc.code(), exc.details()))
    return answers


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failing_or_hanging_shadow_leaves_the_primary_unchanged(
    mode, start_server, two_versions, oip_pb, tmp_path
) -> None:
    fake = FakeShadow(oip_pb, mode)
    try:
        server = start_server(
            two_versions,
            env={
                "RISKWIRE_SHADOW_ENDPOINT": f"127.0.0.1:{fake.port}",
                "RISKWIRE_SHADOW_TIMEOUT_S": "0.3",
                "RISKWIRE_SHADOW_QUEUE_SIZE": "64",
                "RISKWIRE_SHADOW_BATCH_ROWS": "8",
                "RISKWIRE_SHADOW_DIR": str(tmp_path),
            },
        )
        transactions = traffic(150, seed=5)
        transactions[7] = {**transactions[7], "amount": -1.0}  # an error stays an error
        answers = primary_answers(server.target, transactions)
        local = LocalScorer(two_versions)
        expected = []
        for t in transactions:
            try:
                r = local.score(t)
                expected.append((r.probability, r.decision, r.model_version))
            except Exception as exc:  # noqa: BLE001 - compare with the server's status
                expected.append((grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        assert answers == expected
        wait_until(lambda: fake.calls > 0, what="the shadow to be called")
        status = wait_until(
            lambda: (
                (s := AdminClient(server.admin_target).shadow_status())["pairs"]
                and s["pairs"][0]["failed"] + s["pairs"][0]["dropped"] >= 100
                and s
            ),
            what="shadow failures to be counted",
        )
        pair = status["pairs"][0]
        assert pair["scored"] == 0
        if mode == "hang":  # the queue filled while the shadow hung: drops, never blocking
            assert pair["dropped"] > 0
        records = wait_until(
            lambda: (
                (t := read_records(tmp_path))
                .filter(
                    np.array([e is not None for e in t["shadow_error"].to_pylist()], dtype=bool)
                )
                .num_rows
                and t
            ),
            what="records with the shadow's error",
        )
        errors = {e for e in records["shadow_error"].to_pylist() if e}
        word = "exploded" if mode == "fail" else "DEADLINE_EXCEEDED"
        assert any(word in e for e in errors), errors
        server.stop()
    finally:
        fake.stop()


@pytest.mark.parametrize("scorer", ["process", "thread"])
def test_sigkill_loses_at_most_the_unflushed_buffer(
    scorer, start_server, two_versions, tmp_path
) -> None:
    """SIGKILL of a worker: its scorer process still scores and writes every row of the
    ring, even those not taken yet; an in-worker scorer thread loses at most the
    unflushed buffer."""
    flush_rows = 50
    records_dir = tmp_path / "shadow"
    server = start_server(
        two_versions,
        env={
            "RISKWIRE_SHADOW_SCORER": scorer,
            "RISKWIRE_SHADOW_MODEL": "1",
            "RISKWIRE_SHADOW_DIR": str(records_dir),
            "RISKWIRE_SHADOW_FLUSH_ROWS": str(flush_rows),
            "RISKWIRE_SHADOW_FLUSH_SECONDS": "3600",
        },
    )
    channels = server.connect_each_worker()
    try:
        pid, channel = next(iter(channels.items()))
        stub = scoring_pb2_grpc.ScoringStub(channel)
        sent = []
        for i, t in enumerate(traffic(130, seed=6)):
            request = scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(**t), request_id=f"kill-{i}"
            )
            stub.Score(request, timeout=10)
            sent.append(f"kill-{i}")
    finally:
        for c in channels.values():
            c.close()

    def drained():  # noqa: ANN202
        status = AdminClient(server.admin_target).shadow_status()
        mine = [w for w in status["workers"] if w["pid"] == pid]
        # A segment is written whenever flush_rows are buffered: once the queue is empty,
        # fewer than flush_rows of the 131 records (130 + the probe) remain unwritten.
        return mine and mine[0]["queued"] == 0 and mine[0]["records_written"] > 131 - flush_rows

    if scorer == "thread":
        wait_until(drained, what="the worker to score its queue")
        written = next(
            w["records_written"]
            for w in AdminClient(server.admin_target).shadow_status()["workers"]
            if w["pid"] == pid
        )
    os.kill(pid, signal.SIGKILL)  # the process: rows may still wait in the ring
    wait_until(lambda: pid not in server.worker_pids(), what="the worker to die")

    def killed_ids() -> list[str]:
        on_disk = read_records(records_dir)
        return [i for i in on_disk["request_id"].to_pylist() if i.startswith("kill-")]

    segments = list((records_dir / "records").glob(f"part-*-{pid}-*.parquet"))
    if scorer == "process":  # the ring outlives the worker in its scorer process
        ids = wait_until(lambda: set(sent) <= set(i := killed_ids()) and i, what="all records")
    else:
        ids = killed_ids()
        assert len(set(sent) - set(ids)) <= flush_rows  # the bound: one unflushed segment
        assert sum(pq.read_metadata(p).num_rows for p in segments) == written  # all reported
    assert len(ids) == len(set(ids))
    # every finished segment is readable; no temporary file is mistaken for one
    for path in (records_dir / "records").glob("part-*.parquet"):
        pq.read_metadata(path)
    server.wait_serving(workers=2)  # replaced, and serving again


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``riskwire …`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_status_set_feedback_report_and_readers(shadow_server, two_versions, tmp_path) -> None:
    admin = ["--admin", shadow_server.admin_target]
    changed = run_cli("shadow", "set", "--version", "1", "--rate", "50", *admin)
    assert changed.returncode == 0, changed.stderr
    status = run_cli("shadow", "status", "--json", *admin)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["config"]["rate_percent"] == 50
    refused = run_cli("shadow", "set", "--version", "1", "--rate", "150", *admin)
    assert refused.returncode == 2 and "rate_percent" in refused.stderr
    assert run_cli("shadow", "set", "--version", "1", *admin).returncode == 0
    wait_applied(shadow_server.admin_target)

    with RiskwireClient(shadow_server.target) as client:
        results = [client.score(t) for t in traffic(30, seed=7)]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "request_id,label\n" + "".join(f"{r.request_id},{i % 2}\n" for i, r in enumerate(results))
    )
    human = wait_until(
        lambda: "agreement" in (out := run_cli("shadow", "status", *admin).stdout) and out,
        what="pairs in the status",
    )
    assert "at 100%" in human and "flips:" in human
    sent = run_cli("feedback", str(labels), "--target", shadow_server.target)
    assert sent.returncode == 0 and "stored 30 labels" in sent.stdout, sent.stderr

    ids = {r.request_id for r in results}
    wait_until(lambda: records_with_ids(two_versions, ids).num_rows == 30, what="records")
    report = run_cli(
        "shadow", "report", "--models", str(two_versions), "--format", "json", "--bootstrap", "20"
    )
    assert report.returncode == 0, report.stderr
    numbers = json.loads(report.stdout)
    assert numbers["labelled"] >= 30 and numbers["pairs"][0]["quality"] is not None
    page = tmp_path / "report.html"
    html = run_cli("shadow", "report", "--models", str(two_versions), "--out", str(page))
    assert html.returncode == 0, html.stderr
    assert page.read_text().count("data:image/png;base64,") >= 7

    # The segments are plain Parquet: DuckDB, pandas and polars read the folder directly.
    import duckdb
    import pandas as pd
    import polars as pl

    folder = shadow_dir(two_versions) / "records"
    rows = read_records(shadow_dir(two_versions)).num_rows
    assert len(pd.read_parquet(folder)) == rows
    assert pl.read_parquet(str(folder / "*.parquet")).height == rows
    sql = f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')"
    assert duckdb.sql(sql).fetchall()[0][0] == rows


def test_shadow_scoring_is_linked_to_each_requests_trace(
    start_server, two_versions, tmp_path
) -> None:
    """With tracing on, every shadow-scored batch is a span linked to the server spans of
    the calls it scored (the caller's trace, when one came with the call)."""
    spans_dir = tmp_path / "spans"
    server = start_server(
        two_versions,
        env={
            "RISKWIRE_SHADOW_MODEL": "fraud:1",
            "RISKWIRE_SHADOW_DIR": str(tmp_path / "shadow"),
            "RISKWIRE_TRACING_EXPORTER": "jsonl",
            "RISKWIRE_TRACING_DIR": str(spans_dir),
            "RISKWIRE_TRACING_SAMPLE_RATIO": "1.0",
        },
    )
    trace_id = uuid.uuid4().hex
    with RiskwireClient(server.target) as client:
        for i, t in enumerate(traffic(5, seed=11)):
            parent = f"00-{trace_id}-{i + 1:016x}-01"
            client.score(t, metadata=[("traceparent", parent)])

    def spans() -> list[dict]:
        return [json.loads(line) for path in spans_dir.glob("spans-w*.jsonl")
                for line in path.read_text().splitlines()]  # fmt: skip

    def linked() -> set[tuple[str, str]]:
        return {(link["trace_id"], link["span_id"]) for s in spans()
                if s["name"] == "riskwire.shadow/score" for link in s["links"]}  # fmt: skip

    def served() -> set[tuple[str, str]]:
        return {(s["trace_id"], s["span_id"]) for s in spans()
                if s["name"].endswith("/Score") and s["trace_id"] == trace_id}  # fmt: skip

    wait_until(lambda: len(served()) == 5 and served() <= linked(), timeout_s=30,
               what="shadow spans linked to the five server spans")  # fmt: skip
    shadow = [s for s in spans() if s["name"] == "riskwire.shadow/score"]
    assert all(s["kind"] == "INTERNAL" for s in shadow)
    assert all(s["attributes"]["riskwire.shadow.version"] == "1" for s in shadow)
