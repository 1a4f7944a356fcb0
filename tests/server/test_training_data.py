"""Training data from production: the prediction log (inputs as received, features as
served), the review queue fed by the server, labels arriving late, and
``riskwire data export`` joining them point-in-time correctly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from riskwire.kernels.encoding import encode_columns, hash64
from riskwire.kernels.features import compute_features_offline
from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.server.review import ReviewQueue
from riskwire.server.training_export import export_training_data
from riskwire.shadow.records import FEATURE_COLUMNS, read_predictions

pytestmark = pytest.mark.timeout(300)

T0 = 1_767_225_600_000 + 9 * 3_600_000  # 2026-01-01T09:00Z
DAY_MS = 86_400_000


def history(card_id: str, n: int) -> list[scoring_pb2.Transaction]:
    """``n`` payments of one card, an hour or so apart, at explicit event times."""
    out, t, prefix = [], T0, uuid.uuid4().hex[:12]
    for i in range(n):
        t += 3_600_000 + 61_000 * (i % 7)
        out.append(
            scoring_pb2.Transaction(
                transaction_id=f"tx-{prefix}-{i}",
                card_id=card_id,
                merchant_id=f"m-{i % 4}",
                mcc=(5411, 5812, 7995)[i % 3],
                amount=round(12.5 + 31.0 * ((i * 5) % 9), 2),
                currency="EUR",
                country=("DE", "FR", "US")[i % 3],
                card_country="DE",
                channel=("pos", "ecommerce")[i % 2],
                event_time_ms=t,
            )
        )
    return out


def offline_features(transactions: list[scoring_pb2.Transaction]) -> np.ndarray:
    names = (
        "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country",
        "channel",
    )  # fmt: skip
    columns = {name: [getattr(t, name) for t in transactions] for name in names}
    columns["event_time"] = [t.event_time_ms for t in transactions]
    return compute_features_offline(encode_columns(columns))[0]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    return subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_log_review_late_labels_and_export(start_server, models_dir, tmp_path) -> None:
    shadow = tmp_path / "shadow"
    server = start_server(
        models_dir,
        env={
            "RISKWIRE_SHADOW_DIR": str(shadow),
            "RISKWIRE_PREDICTION_LOG_RATE": "100",
            "RISKWIRE_REVIEW_SAMPLE_PERCENT": "50",
            "RISKWIRE_SHADOW_FLUSH_SECONDS": "0.5",
        },
    )
    card = f"card-{uuid.uuid4().hex}"
    stream = history(card, 24)
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        answers = []
        for transaction in stream[:16]:
            request = scoring_pb2.ScoreRequest(transaction=transaction)
            answers.append(stub.Score(request, timeout=10))
        batch = stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(transactions=stream[16:]))
        # Labels arrive a month later (chargebacks), for the first ten transactions.
        late = T0 + 30 * DAY_MS
        labels = [
            scoring_pb2.LabelledOutcome(
                transaction_id=t.transaction_id,
                label=scoring_pb2.LABEL_FRAUD if i % 4 == 0 else scoring_pb2.LABEL_LEGITIMATE,
                labelled_at_ms=late + i,
            )
            for i, t in enumerate(stream[:10])
        ]
        assert stub.Feedback(scoring_pb2.FeedbackRequest(outcomes=labels), timeout=10).stored == 10
    assert server.stop() == 0  # drains the prediction log and the review sink

    # The prediction log: every answer, inputs as received, features as served.
    logged = read_predictions(shadow)
    logged = logged.take(np.argsort(logged["event_time"].to_numpy()))
    assert logged.num_rows == len(stream)
    assert logged["transaction_id"].to_pylist() == [t.transaction_id for t in stream]
    assert logged["card_id"].null_count == logged.num_rows  # no raw card ids by default
    assert set(logged["entity_hash"].to_pylist()) == {hash64(card)}
    for name in ("merchant_id", "mcc", "amount", "currency", "country", "channel"):
        assert logged[name].to_pylist() == [getattr(t, name) for t in stream], name
    served = np.column_stack([logged[c].to_numpy() for c in FEATURE_COLUMNS])
    assert np.array_equal(served, offline_features(stream), equal_nan=True)
    answered = [a.request_id for a in answers] + [
        f"{batch.request_id}/{i}" for i in range(len(stream) - 16)
    ]
    assert logged["request_id"].to_pylist() == answered
    assert set(logged["log_rate"].to_pylist()) == {1.0}

    # The review queue holds every "review" decision and about half of the others.
    queue = ReviewQueue(shadow / "review.sqlite")
    cases = queue.cases(limit=100)
    decisions = dict(zip(answered, logged["decision"].to_pylist(), strict=True))
    assert all(case.request_id in decisions for case in cases)
    reviewed = {r for r, d in decisions.items() if d == "review"}
    assert reviewed <= {case.request_id for case in cases}
    for case in cases:
        assert case.inclusion_probability == (1.0 if case.decision == "review" else 0.5)
        assert card not in json.dumps(case.to_dict())  # never the raw card id
    queue.close()

    # A reviewer labels one case the chargebacks do not cover.
    env = {"RISKWIRE_SHADOW_DIR": str(shadow), "RISKWIRE_REVIEWER": "ana"}
    charged = {t.transaction_id for t in stream[:10]}
    picked = next((c for c in cases if c.transaction_id not in charged), None)
    if picked is not None:
        result = run_cli("review", "label", str(picked.case_id), "--fraud", **env)
        assert result.returncode == 0, result.stderr

    # Export: labelled rows only, features as served, late labels with their latency.
    out = tmp_path / "train.parquet"
    result = run_cli("data", "export", "--out", str(out), "--json", **env)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    train = pq.read_table(out)
    expected_rows = 10 + (picked is not None)
    assert facts["rows"] == train.num_rows == expected_rows
    by_tid = {t.transaction_id: i for i, t in enumerate(stream)}
    rows = [by_tid[t] for t in train["transaction_id"].to_pylist()]
    exported = np.column_stack([train[c].to_numpy() for c in FEATURE_COLUMNS])
    assert np.array_equal(exported, offline_features(stream)[rows], equal_nan=True)
    assert train["card_id"].to_pylist() == [f"h:{hash64(card):016x}"] * expected_rows
    sources = train["label_source"].to_pylist()
    latency = train["label_latency_s"].to_numpy()
    for i, row in enumerate(rows):
        if row < 10:
            assert sources[i] == "feedback"
            assert train["label"][i].as_py() == (1 if row % 4 == 0 else 0)
            assert latency[i] > 25 * 86_400  # a month after the (2026-01) decision time
            assert train["weight"][i].as_py() == 1.0
        else:
            assert sources[i] == "review" and train["label"][i].as_py() == 1
            assert train["weight"][i].as_py() == 1.0 / picked.inclusion_probability
    assert train["event_time"].to_pylist() == sorted(train["event_time"].to_pylist())

    # Nothing from outside the window; unlabelled rows kept when asked.
    future = export_training_data(shadow, since=_utc(time.time() + 3600))
    assert future.num_rows == 0
    marked = export_training_data(shadow, unlabelled="mark")
    assert marked.num_rows == len(stream)
    assert marked["labelled"].to_pylist().count(True) == expected_rows


def _utc(seconds: float):  # noqa: ANN202
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC)


def test_raw_card_ids_only_when_allowed_and_old_segments_expire(
    start_server, models_dir, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow"
    old = shadow / "predictions" / "part-20250101T000000000000Z-w0-1-000001.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"a segment from long ago")
    server = start_server(
        models_dir,
        env={
            "RISKWIRE_SHADOW_DIR": str(shadow),
            "RISKWIRE_PREDICTION_LOG_CARD_IDS": "true",
            "RISKWIRE_PREDICTION_LOG_RATE": "100",
            "RISKWIRE_PREDICTION_LOG_RETENTION_DAYS": "30",
        },
    )
    assert not old.exists()  # retention runs at start, then hourly
    card = f"card-{uuid.uuid4().hex}"
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        stub.Score(scoring_pb2.ScoreRequest(transaction=history(card, 1)[0]), timeout=10)
    assert server.stop() == 0
    assert read_predictions(shadow)["card_id"].to_pylist() == [card]
    marked = export_training_data(shadow, unlabelled="mark")
    assert marked["card_id"].to_pylist() == [card]


def test_purge_segments_by_their_write_time(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from riskwire.shadow.records import purge_segments, segment_files

    folder = tmp_path / "predictions"
    folder.mkdir()
    for stamp in ("20260101T000000000000Z", "20260301T120000000000Z", "20260302T000000000000Z"):
        (folder / f"part-{stamp}-w0-1-000001.parquet").write_bytes(b"")
    assert purge_segments(tmp_path, "predictions", datetime(2026, 3, 1, 12, tzinfo=UTC)) == 1
    assert [p.name[5:13] for p in segment_files(tmp_path, "predictions")] == [
        "20260301", "20260302",
    ]  # fmt: skip


def test_reading_since_a_time_skips_segments_written_before_it(tmp_path: Path) -> None:
    """Only segments written after ``since`` (less a clock slack) are opened: the live
    performance evaluation reads the last day of a log that may hold months."""
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa
    import pyarrow.parquet as pq

    from riskwire.shadow.records import CLOCK_SLACK, PREDICTION_SCHEMA, STAMP_FORMAT

    since = datetime(2026, 3, 1, 12, tzinfo=UTC)
    folder = tmp_path / "predictions"
    folder.mkdir()

    def segment(written: datetime, row_time: datetime, request_id: str) -> None:
        values = {name: [None] for name in PREDICTION_SCHEMA.names}
        values.update(request_id=[request_id], time=[row_time], model=["fraud"], version=["1"])
        path = folder / f"part-{written.strftime(STAMP_FORMAT)}-w0-1-{request_id}.parquet"
        pq.write_table(pa.table(values, schema=PREDICTION_SCHEMA), path)

    segment(since - timedelta(days=30), since - timedelta(days=30), "month-old")
    two_days_before = (since - timedelta(days=2)).strftime(STAMP_FORMAT)
    (folder / f"part-{two_days_before}-w0-1-x.parquet").write_bytes(b"not parquet: never read")
    segment(since - CLOCK_SLACK / 2, since + timedelta(seconds=1), "written-in-the-slack")
    segment(since + timedelta(hours=1), since + timedelta(minutes=59), "recent")
    read = read_predictions(tmp_path, since=since, columns=("request_id", "time", "model"))
    assert sorted(read["request_id"].to_pylist()) == ["recent", "written-in-the-slack"]
    assert read.column_names == ["request_id", "time", "model"]
    assert read_predictions(tmp_path, since=since + timedelta(days=1)).num_rows == 0
