"""Live model performance from the prediction log joined with delayed labels.

Labels (Feedback RPC) arrive days after the prediction: verification latency. Per model
version and window (by prediction time) the labelled predictions give the live ROC AUC,
precision and recall at the serving decisions, and calibration (expected calibration
error over 10 equal-count score bins, Brier score), compared with the package's test
metrics: ``auc_drop`` = test AUC − live AUC is the concept-drift signal the alert
rules watch. Fewer than ``min_labels`` labelled predictions (or only one class) → NaN.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from riskwire.shadow.metrics import roc_auc
from riskwire.shadow.records import (
    PREDICTION_SCHEMA,
    PREDICTIONS,
    join_labels,
    read_labels,
    read_predictions,
    segments_since,
)

PERFORMANCE_COLUMN = "performance"
# what the live measures read of the prediction log (not the features or raw inputs)
PREDICTION_COLUMNS = (
    "request_id", "transaction_id", "time", "model", "version", "probability", "decision",
)  # fmt: skip
SERVED_COLUMNS = ("time", "model", "version")
_NO_LABELLED = pa.schema(
    [PREDICTION_SCHEMA.field(name) for name in PREDICTION_COLUMNS] + [pa.field("label", pa.int8())]
).empty_table()
MEASURES = (
    "auc", "auc_drop", "precision_decline", "recall_decline", "precision_review",
    "recall_review", "ece", "brier", "label_rate",
)  # fmt: skip
CALIBRATION_BINS = 10


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray) -> float:
    """|mean predicted − observed rate| averaged over equal-count bins, weighted by size."""
    order = np.argsort(scores, kind="stable")
    error = 0.0
    for chunk in np.array_split(order, min(CALIBRATION_BINS, len(order))):
        if len(chunk):
            error += len(chunk) * abs(scores[chunk].mean() - labels[chunk].mean())
    return error / len(scores)


def _precision_recall(flagged: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    hits = float(np.sum(flagged & (labels == 1)))
    precision = hits / flagged.sum() if flagged.sum() else math.nan
    recall = hits / labels.sum() if labels.sum() else math.nan
    return precision, recall


def measure(
    scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, test_auc: float, min_labels: int
) -> dict[str, float]:
    """The measures of one window's labelled predictions (NaN where undefined)."""
    values = dict.fromkeys(MEASURES, math.nan)
    n = len(labels)
    if n < min_labels:
        return values
    positives = int(labels.sum())
    values["label_rate"] = positives / n
    values["brier"] = float(np.mean((scores - labels) ** 2))
    values["ece"] = expected_calibration_error(scores, labels)
    declined = decisions == "decline"
    reviewed = declined | (decisions == "review")
    values["precision_decline"], values["recall_decline"] = _precision_recall(declined, labels)
    values["precision_review"], values["recall_review"] = _precision_recall(reviewed, labels)
    if 0 < positives < n:
        values["auc"] = roc_auc(scores, labels)
        if math.isfinite(test_auc):
            values["auc_drop"] = test_auc - values["auc"]
    return values


def package_test_auc(models_dir: Path, name: str, version: str) -> float:
    """The package's held-out ROC AUC (NaN if unreadable)."""
    try:
        metrics = json.loads((models_dir / name / version / "metrics.json").read_text())
        return float(metrics["test"]["roc_auc"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def _served(predictions: pa.Table) -> set[tuple[str, str]]:
    """The (model, version) pairs of a table of logged predictions."""
    pairs = predictions.group_by(["model", "version"]).aggregate([])
    return set(zip(pairs["model"].to_pylist(), pairs["version"].to_pylist(), strict=True))


SegmentSummary = tuple[datetime | None, frozenset[tuple[str, str]]]


@functools.lru_cache(maxsize=1 << 16)
def _segment_served(path: Path) -> SegmentSummary:
    """Latest row time and served versions of one prediction segment (segments never
    change once written, so each is read once per process). A segment of one version
    is summed up by its footer's column statistics, without reading its rows: after a
    restart the supervisor meets a whole window of segments at once."""
    summary = _summary_from_statistics(pq.read_metadata(path))
    if summary is not None:
        return summary
    table = pq.read_table(path, columns=list(SERVED_COLUMNS))
    latest = pc.max(table["time"]).as_py() if table.num_rows else None
    return latest, frozenset(_served(table))


def _summary_from_statistics(metadata: pq.FileMetaData) -> SegmentSummary | None:
    """What :func:`_segment_served` returns, from the row groups' min/max statistics;
    None when they cannot tell (a row group of several versions, a null, a missing or
    inexact statistic): then the rows are read."""
    names = metadata.schema.names
    if any(name not in names for name in SERVED_COLUMNS):
        return None
    latest: datetime | None = None
    pairs: set[tuple[str, str]] = set()
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        if row_group.num_rows == 0:
            continue
        stats = [row_group.column(names.index(name)).statistics for name in SERVED_COLUMNS]
        if not all(_exact(s) for s in stats):
            return None
        time_stats, model, version = stats
        if model.min != model.max or version.min != version.max:
            return None
        newest = time_stats.max
        if not isinstance(newest, datetime) or newest.tzinfo is None:
            return None
        pairs.add((model.min, version.min))
        latest = newest if latest is None else max(latest, newest)
    return latest, frozenset(pairs)


def _exact(stats: pq.Statistics | None) -> bool:
    """Whether a column chunk's statistics give its true min and max and it has no null."""
    return (
        stats is not None
        and stats.has_min_max
        and stats.has_null_count
        and stats.null_count == 0
        and getattr(stats, "is_min_value_exact", True) is not False
        and getattr(stats, "is_max_value_exact", True) is not False
    )


def served_since(predictions_dir: Path, since: datetime) -> set[tuple[str, str]]:
    """The (model, version) pairs that answered at or after ``since``."""
    served: set[tuple[str, str]] = set()
    for path in segments_since(predictions_dir, PREDICTIONS, since):
        latest, pairs = _segment_served(path)
        if latest is not None and latest >= since:
            served |= pairs
    return served


def live_performance(
    predictions_dir: Path,
    models_dir: Path,
    windows: Mapping[str, float],
    *,
    now: float | None = None,
    min_labels: int = 100,
) -> list[dict[str, Any]]:
    """Rows (model, version, window, column "performance", measure, value, count)."""
    now = time.time() if now is None else now
    since = datetime.fromtimestamp(now - max(windows.values()), UTC)
    stored_labels = read_labels(predictions_dir)
    if stored_labels.num_rows:
        predictions = read_predictions(predictions_dir, since=since, columns=PREDICTION_COLUMNS)
        served = _served(predictions)
        joined = join_labels(predictions, stored_labels)
        labelled = joined.filter(joined["label"].is_valid())
    else:  # no label yet: only which versions served, known per segment once read
        served, labelled = served_since(predictions_dir, since), _NO_LABELLED
    if not served:
        return []
    times = labelled["time"].cast("int64").to_numpy() / 1000.0
    models = np.array(labelled["model"].to_pylist(), dtype=object)
    versions = np.array(labelled["version"].to_pylist(), dtype=object)
    scores = labelled["probability"].to_numpy()
    decisions = np.array(labelled["decision"].to_pylist(), dtype=object)
    labels = labelled["label"].to_numpy().astype(np.int64)
    rows = []
    for name, version in sorted(served):
        reference = package_test_auc(models_dir, name, version)
        mine = (models == name) & (versions == version)
        for window, seconds in windows.items():
            inside = mine & (times >= now - seconds)
            values = measure(
                scores[inside], decisions[inside], labels[inside], reference, min_labels
            )
            for measure_name, value in values.items():
                rows.append(
                    {
                        "model": name, "version": version, "window": window,
                        "column": PERFORMANCE_COLUMN, "measure": measure_name,
                        "value": float(value), "count": float(inside.sum()),
                    }
                )  # fmt: skip
    return rows
