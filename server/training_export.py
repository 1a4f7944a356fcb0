"""Training data from production: the prediction log joined with the labels.

``riskwire data export --since … --until … --out train.parquet`` turns what the server
logged (:mod:`riskwire.server.monitoring.predictions`: inputs as received, features as
served, score, decision, version) and the labels that came back later (Feedback RPC
chargebacks and review verdicts, :mod:`riskwire.shadow.labels`) into a training set:

- one row per logged answer answered in ``[since, until)``, in the raw transaction
  schema (``transaction_id``, ``card_id``, …, ``event_time``, ``label``), time-ordered;
  ``card_id`` is the raw id only where the server was allowed to log it
  (``prediction_log_card_ids``), otherwise ``h:<keyed hash>`` — consistent per card,
  which is all the feature kernels need of it;
- the features exactly as served at decision time (``f_<feature>``): nothing computed
  after the decision, so no leakage from labels or later transactions. The build uses
  them as they are (a sampled log misses transactions, so recomputing card history from
  the exported rows would give other features than the model saw);
- ``label``, ``labelled_at``, ``label_latency_s`` (label time − transaction time: the
  verification latency) and ``label_source`` (``review`` or ``feedback``); the latest
  label of a request wins, whenever it arrived (labels are joined regardless of the
  window: a chargeback may come months later);
- ``weight``, the sample weight that undoes the sampling: ``1 / (log_rate ×
  inclusion)``, where ``log_rate`` is the fraction of answers the log kept and
  ``inclusion`` the probability the review queue took the case (1 for ``review``
  decisions, the sample rate for the others) for rows labelled by reviewers alone, and
  1 for rows with a Feedback RPC label, which is assumed to arrive whatever the
  decision was (a chargeback, or "legitimate" once a transaction has matured).

Rows without a label are left out, or kept with ``label`` null (``unlabelled="mark"``).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from riskwire.shadow.records import FEATURE_COLUMNS, read_labels, read_predictions

from .review import QUEUE_FILE, REVIEW_LABEL_WORKER, ReviewQueue

Unlabelled = Literal["exclude", "mark"]
TIME = pa.timestamp("ms", tz="UTC")
RAW_SCHEMA_COLUMNS = (
    "transaction_id", "card_id", "merchant_id", "mcc", "amount", "currency", "country",
    "card_country", "channel", "event_time", "label",
)  # fmt: skip
PROVENANCE_COLUMNS = (
    "request_id", "answered_at", "model", "version", "probability", "decision", "flags",
    "labelled_at", "label_latency_s", "label_source", "log_rate", "inclusion", "weight",
)  # fmt: skip


def export_training_data(
    shadow_dir: str | os.PathLike[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    unlabelled: Unlabelled = "exclude",
    queue: str | os.PathLike[str] | None = None,
) -> pa.Table:
    """The training table (see the module docstring) from a server's shadow directory;
    ``queue`` is the review queue's file (default ``<shadow_dir>/review.sqlite``)."""
    if unlabelled not in ("exclude", "mark"):
        raise ValueError(f"unlabelled must be 'exclude' or 'mark', got {unlabelled!r}")
    predictions = read_predictions(shadow_dir, since=since, until=until)
    if "entity_hash" not in predictions.column_names:  # only segments from before the log
        predictions = predictions.slice(0, 0)  # held inputs: nothing to export
    labels, fed = _latest_labels(read_labels(shadow_dir))
    inclusion = _inclusion(Path(queue) if queue else Path(shadow_dir) / QUEUE_FILE)
    rows = predictions.num_rows
    request_ids = predictions["request_id"].to_pylist()
    transaction_ids = predictions["transaction_id"].to_pylist()
    label = np.full(rows, -1, dtype=np.int8)
    labelled_at = np.zeros(rows, dtype=np.int64)
    source: list[str | None] = [None] * rows
    included = np.ones(rows)
    for i, ids in enumerate(zip(request_ids, transaction_ids, strict=True)):
        keys = [key for key in (("t", ids[1]), ("r", ids[0])) if key[1]]
        found = max((labels[k] for k in keys if k in labels), key=lambda e: e[1], default=None)
        if found is None:
            continue
        label[i], labelled_at[i], source[i] = found
        # A Feedback RPC label would be there whatever the review queue did: only rows
        # labelled by reviewers alone were picked with the queue's probability.
        if not any(key in fed for key in keys):
            included[i] = inclusion.get(ids[0], 1.0)
    has_label = label >= 0
    event_ms = _ms(predictions["event_time"])
    log_rate = predictions["log_rate"].to_numpy(zero_copy_only=False)
    table = pa.table(
        {
            "transaction_id": predictions["transaction_id"],
            "card_id": _card_ids(predictions),
            **{name: predictions[name] for name in RAW_SCHEMA_COLUMNS[2:-1]},
            "label": pa.array(label, mask=~has_label),
            **{name: predictions[name] for name in FEATURE_COLUMNS},
            "request_id": predictions["request_id"],
            "answered_at": predictions["time"],
            "model": predictions["model"],
            "version": predictions["version"],
            "probability": predictions["probability"],
            "decision": predictions["decision"],
            "flags": predictions["flags"],
            "labelled_at": pa.array(labelled_at, type=TIME, mask=~has_label),
            "label_latency_s": pa.array((labelled_at - event_ms) / 1000.0, mask=~has_label),
            "label_source": pa.array(source, type=pa.string()),
            "log_rate": predictions["log_rate"],
            "inclusion": pa.array(included, type=pa.float64()),
            "weight": pa.array(1.0 / (log_rate * included), type=pa.float64()),
        }
    )
    if unlabelled == "exclude":
        table = table.filter(pa.array(has_label))
    else:
        table = table.append_column("labelled", pa.array(has_label))
    order = pc.sort_indices(table, [("event_time", "ascending"), ("answered_at", "ascending")])
    return table.take(order)


def write_training_data(table: pa.Table, out: str | os.PathLike[str]) -> None:
    """Write the table as Parquet (atomically: a temporary name, then a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summary(table: pa.Table) -> dict[str, object]:
    """Row, label and weight counts of an exported table (for the CLI)."""
    label = table["label"].to_numpy(zero_copy_only=False)
    latency = table["label_latency_s"].drop_null().to_numpy()
    labelled = ~np.isnan(label.astype(float)) if table.num_rows else np.zeros(0, bool)
    return {
        "rows": table.num_rows,
        "labelled": int(labelled.sum()),
        "fraud": int(np.nansum(label.astype(float))),
        "from_review": int(pc.sum(pc.equal(table["label_source"], "review")).as_py() or 0),
        "weighted_rows": float(pc.sum(table["weight"]).as_py() or 0.0),
        "median_label_latency_s": float(np.median(latency)) if len(latency) else None,
    }


def _latest_labels(
    labels: pa.Table,
) -> tuple[dict[tuple[str, str], tuple[int, int, str]], set[tuple[str, str]]]:
    """("t", transaction_id) and ("r", request_id) -> (label, labelled_at ms, source) of
    the latest label (by ``labelled_at``, then ``received_at``), and the keys that have a
    label from the Feedback RPC."""
    fed: set[tuple[str, str]] = set()
    if not labels.num_rows:
        return {}, fed
    order = pc.sort_indices(labels, [("labelled_at", "ascending"), ("received_at", "ascending")])
    ordered = labels.take(order)
    latest: dict[tuple[str, str], tuple[int, int, str]] = {}
    for request_id, transaction_id, value, at, worker in zip(
        ordered["request_id"].to_pylist(),
        ordered["transaction_id"].to_pylist(),
        ordered["label"].to_pylist(),
        _ms(ordered["labelled_at"]).tolist(),
        ordered["worker"].to_pylist(),
        strict=True,
    ):
        source = "review" if worker == REVIEW_LABEL_WORKER else "feedback"
        keys = [key for key in (("r", request_id), ("t", transaction_id)) if key[1]]
        for key in keys:
            latest[key] = (int(value), at, source)
        if source == "feedback":
            fed.update(keys)
    return latest, fed


def _inclusion(path: Path) -> dict[str, float]:
    """Request id -> inclusion probability of its review case (none without a queue)."""
    if not path.is_file():
        return {}
    queue = ReviewQueue(path)
    try:
        return queue.inclusion_probabilities()
    finally:
        queue.close()


def _card_ids(predictions: pa.Table) -> pa.Array:
    """The raw card id where it was logged, else ``h:<hash as 16 hex digits>``."""
    hashed = [f"h:{h:016x}" for h in predictions["entity_hash"].to_pylist()]
    raw = predictions["card_id"].to_pylist()
    return pa.array([r if r is not None else h for r, h in zip(raw, hashed, strict=True)])


def _ms(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as int64 epoch milliseconds."""
    return column.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
