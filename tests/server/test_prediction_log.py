"""The prediction log: every value a handler logs comes back from its Parquet segments,
whatever slices and segments they were cut into, written by the worker's thread or by
its writer process; the writer process restarts when it dies and writes what it has
when the worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from riskwire.server.monitoring import predictions
from riskwire.server.monitoring.predictions import PredictionLog
from riskwire.shadow.records import FEATURE_COLUMNS, read_predictions, segment_files

NUM_FEATURES = len(FEATURE_COLUMNS)
BATCH_COLUMNS = {
    "card_id": ["c0", "c1", "c2"],
    "merchant_id": ["m0", "m1", "m2"],
    "mcc": [5411, 5812, 7995],
    "amount": [1.5, 20.0, 300.25],
    "currency": ["EUR", "USD", "GBP"],
    "country": ["FR", "US", "GB"],
    "card_country": ["FR", "US", "DE"],
    "channel": ["web", "pos", "app"],
}


def _single(log: PredictionLog, i: int) -> None:
    log.add_one(
        f"req-{i}", f"tx-{i}", 1_700_000_000_000 + i, "fraud", "v2", i / 1000.0,
        ("approve", "review", "decline")[i % 3], 10_000 + i,
        (f"card-{i % 7}", f"m-{i % 5}", 5000 + i % 9, i * 0.5, "EUR", "FR", "DE", "web",
         1_699_000_000_000 + i),
        np.full(NUM_FEATURES, float(i)).tobytes(), ("state_unavailable",) if i % 4 == 0 else (),
    )  # fmt: skip


def _batch(log: PredictionLog, rows: int, offset: int) -> None:
    """A batch call of ``3 * rows`` request rows of which every third is scored."""
    columns = {name: values * rows for name, values in BATCH_COLUMNS.items()}
    columns["transaction_id"] = [f"btx-{j}" for j in range(3 * rows)]
    scored = np.arange(0, 3 * rows, 3)
    log.add_many(
        "batch", scored, 1_700_000_100_000, "fraud", "v2", scored / 10_000.0,
        np.array(["decline"] * rows, dtype=object), offset + scored.astype(np.uint64),
        1_699_000_100_000 + scored, columns, np.repeat(scored[:, None], NUM_FEATURES, 1)
        .astype(np.float64), [()] * (3 * rows),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("writer", "card_ids"), [("thread", False), ("thread", True), ("process", False)]
)
def test_every_logged_value_comes_back(tmp_path: Path, writer: str, card_ids: bool) -> None:
    singles, batch_rows = 3 * predictions._DRAIN_SLICE + 17, 2 * predictions._DRAIN_SLICE + 5
    log = PredictionLog(
        tmp_path, 3, card_ids=card_ids, flush_rows=700, flush_seconds=1e9, writer=writer
    )
    for i in range(singles // 2):
        _single(log, i)
    _batch(log, batch_rows, offset=50_000)
    for i in range(singles // 2, singles):
        _single(log, i)
    log.stop()

    table = read_predictions(tmp_path)
    assert table.num_rows == singles + batch_rows
    files = segment_files(tmp_path, "predictions")
    assert all(f"-w3-{os.getpid()}-" in f.name for f in files)  # the worker's name, pid
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert len(sizes) > 2 and min(sizes[:-1]) >= 700  # a segment once 700 rows are buffered
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in files)
    rows = {row["request_id"]: row for row in table.to_pylist()}
    for i in range(singles):
        row = rows[f"req-{i}"]
        assert row["transaction_id"] == f"tx-{i}"
        assert row["worker"] == 3 and row["model"] == "fraud" and row["version"] == "v2"
        assert row["probability"] == i / 1000.0
        assert row["decision"] == ("approve", "review", "decline")[i % 3]
        assert row["entity_hash"] == 10_000 + i
        assert row["card_id"] == (f"card-{i % 7}" if card_ids else None)
        assert row["merchant_id"] == f"m-{i % 5}" and row["mcc"] == 5000 + i % 9
        assert row["amount"] == i * 0.5
        assert (row["currency"], row["country"], row["card_country"], row["channel"]) == (
            "EUR", "FR", "DE", "web",
        )  # fmt: skip
        assert row["time"].timestamp() * 1000 == 1_700_000_000_000 + i
        assert row["event_time"].timestamp() * 1000 == 1_699_000_000_000 + i
        assert row["log_rate"] == 1.0
        assert row["flags"] == ("state_unavailable" if i % 4 == 0 else None)
        assert [row[name] for name in FEATURE_COLUMNS] == [float(i)] * NUM_FEATURES
    for k in range(batch_rows):
        j = 3 * k  # the request row
        row = rows[f"batch/{j}"]
        assert row["transaction_id"] == f"btx-{j}"
        assert row["probability"] == j / 10_000.0 and row["decision"] == "decline"
        assert row["entity_hash"] == 50_000 + j
        assert row["card_id"] == (BATCH_COLUMNS["card_id"][0] if card_ids else None)
        assert row["merchant_id"] == "m0" and row["mcc"] == 5411 and row["channel"] == "web"
        assert row["event_time"].timestamp() * 1000 == 1_699_000_100_000 + j
        assert row["flags"] is None
        assert [row[name] for name in FEATURE_COLUMNS] == [float(j)] * NUM_FEATURES


def test_sampled_batch_rows_keep_their_own_values(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, 0, rate_percent=50.0, flush_seconds=1e9)
    np.random.seed(7)
    _batch(log, 400, offset=0)
    log.stop()
    table = read_predictions(tmp_path)
    assert 100 < table.num_rows < 300
    for row in table.to_pylist():
        j = int(row["request_id"].split("/")[1])
        assert row["entity_hash"] == j and row["probability"] == j / 10_000.0
        assert row[FEATURE_COLUMNS[0]] == float(j) and row["log_rate"] == 0.5


def _wait_for(condition, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_writer_process_restarts_after_it_dies(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, 0, flush_seconds=1e9, drain_s=0.05, writer="process")
    log.start()
    try:
        first = log.writer_pid
        assert first is not None and first != os.getpid() and log.writer_restarts == 0
        for i in range(100):
            _single(log, i)
        log.flush()  # rows 0-99 on disk
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: log.writer_pid != first)  # restarted by the background thread
        assert log.writer_restarts == 1
        for i in range(100, 200):
            _single(log, i)
    finally:
        log.stop()
    ids = set(read_predictions(tmp_path)["request_id"].to_pylist())
    assert ids == {f"req-{i}" for i in range(200)}


_DYING_WORKER = """
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_prediction_log import _single
from riskwire.server.monitoring.predictions import PredictionLog
log = PredictionLog(__import__("pathlib").Path(sys.argv[1]), 5, flush_seconds=1e9,
                    writer="process")
log.start()
for i in range(300):
    _single(log, i)
log._drain()  # handed to the writer process, not yet in a segment
os.kill(os.getpid(), 9)
"""


def test_writer_process_writes_what_it_has_when_the_worker_dies(tmp_path: Path) -> None:
    worker = subprocess.run(
        [sys.executable, "-c", _DYING_WORKER, str(tmp_path), str(Path(__file__).parent)],
        timeout=60,
        check=False,
    )
    assert worker.returncode == -signal.SIGKILL
    _wait_for(lambda: read_predictions(tmp_path).num_rows == 300)
    assert read_predictions(tmp_path)["worker"].to_pylist() == [5] * 300
