"""The numbers of the analyst report comparing a shadow model to the primary.

:func:`compute_report` reads the paired Parquet records in a time window (and every
label), and returns JSON-ready numbers per (primary model, version, shadow model,
version) pair: the same :class:`~riskwire.shadow.compare.PairStats` summary the server
keeps online, the decision flip matrix, latency quantiles, agreement over time and,
where labels have arrived, ROC AUC and average precision of both models on the same
labelled requests with paired bootstrap confidence intervals (:mod:`.metrics`), and the
champion (primary) vs challenger (shadow) comparison of ``riskwire compare``
(:func:`riskwire.pipeline.compare.compare_models`: recall at the serving FPR and the cost
of each model's own decline decisions, with intervals and a verdict) under
``quality.comparison``. :mod:`.report_html` turns them into an HTML page.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from riskwire.pipeline.compare import compare_models

from .compare import DECISIONS, SCORE_EDGES, PairStats, decision_codes, score_histogram
from .metrics import RankedScores, bootstrap_metrics
from .records import join_labels, read_labels, read_records, utc

PAIR_KEYS = ("primary_model", "primary_version", "shadow_model", "shadow_version")
LATENCY_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
TIME_BUCKETS = 20  # about this many buckets in the over-time series
NICE_BUCKET_SECONDS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
    86400, 172800, 604800,
)  # fmt: skip
FEW_POSITIVES = 30


# --- columns ------------------------------------------------------------------------


@dataclass
class RecordColumns:
    """The record columns the report uses, as numpy arrays (NaN/None for nulls)."""

    time_ms: np.ndarray
    primary: np.ndarray
    shadow: np.ndarray
    primary_decision: np.ndarray
    shadow_decision: np.ndarray
    primary_latency_us: np.ndarray
    shadow_latency_us: np.ndarray
    shadow_error: np.ndarray
    label: np.ndarray  # float: 0/1, NaN when unlabelled

    @classmethod
    def from_table(cls, table: pa.Table) -> RecordColumns:
        return cls(
            time_ms=table["time"].cast(pa.int64()).to_numpy(),
            primary=_floats(table, "primary_probability"),
            shadow=_floats(table, "shadow_probability"),
            primary_decision=_objects(table, "primary_decision"),
            shadow_decision=_objects(table, "shadow_decision"),
            primary_latency_us=_floats(table, "primary_latency_us"),
            shadow_latency_us=_floats(table, "shadow_latency_us"),
            shadow_error=_objects(table, "shadow_error"),
            label=_floats(table, "label"),
        )

    def take(self, rows: np.ndarray) -> RecordColumns:
        return RecordColumns(**{name: value[rows] for name, value in vars(self).items()})

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.shadow) & ~np.isnan(self.primary)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(pc.fill_null(table[name].cast(pa.float64()), math.nan).to_numpy())


def _objects(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, None, dtype=object)
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=object)


def pair_groups(table: pa.Table) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """(pair key, row indices) for each model pair in ``table``, sorted by key."""
    if not table.num_rows:
        return []
    codes, dictionaries = [], []
    for name in PAIR_KEYS:
        encoded = pc.fill_null(table[name], "").combine_chunks().dictionary_encode()
        codes.append(encoded.indices.to_numpy())
        dictionaries.append(encoded.dictionary.to_pylist())
    unique, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = [
        (tuple(d[i] for d, i in zip(dictionaries, row, strict=True)), np.flatnonzero(inverse == g))
        for g, row in enumerate(unique)
    ]
    return sorted(groups, key=lambda group: group[0])


# --- the report ---------------------------------------------------------------------


def load_window(
    directory: str | os.PathLike[str],
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
) -> pa.Table:
    """Records with ``since <= time < until`` joined with every label (``label`` column)."""
    since = utc(since) if isinstance(since, str) else since
    until = utc(until) if isinstance(until, str) else until
    records = read_records(directory, since=since, until=until)
    return join_labels(records, read_labels(directory))


def compute_report(
    directory: str | os.PathLike[str],
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """JSON-ready comparison numbers per model pair of the records in the window."""
    joined = load_window(directory, since=since, until=until)
    return report_from_table(
        joined, directory=directory, since=since, until=until, bootstrap=bootstrap, seed=seed
    )


def report_from_table(
    joined: pa.Table,
    *,
    directory: str | os.PathLike[str] | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`compute_report` of records already read (with or without a ``label`` column)."""
    columns = RecordColumns.from_table(joined)
    pairs = [
        _pair_report(key, columns.take(rows), bootstrap=bootstrap, seed=seed)
        for key, rows in pair_groups(joined)
    ]
    report = {
        "generated_at": _iso(datetime.now(UTC)),
        "directory": None if directory is None else str(directory),
        "window": {"since": _iso_or_none(since), "until": _iso_or_none(until)},
        "records": joined.num_rows,
        "labelled": int(np.count_nonzero(~np.isnan(columns.label))),
        "bootstrap": bootstrap,
        "seed": seed,
        "pairs": pairs,
    }
    return _jsonable(report)


def _pair_report(key: tuple[str, ...], c: RecordColumns, *, bootstrap: int, seed: int) -> dict:
    stats = PairStats.from_arrays(c.primary, c.shadow, c.primary_decision, c.shadow_decision)
    ok = c.scored
    errors = Counter(e for e in c.shadow_error[~ok] if e)
    return {
        **dict(zip(PAIR_KEYS, key, strict=True)),
        "summary": stats.summary(),
        "flip_matrix": {"decisions": list(DECISIONS), "counts": stats.flips.tolist()},
        "histograms": {
            "edges": SCORE_EDGES.tolist(),
            "primary": score_histogram(c.primary[ok]).tolist(),
            "shadow": score_histogram(c.shadow[ok]).tolist(),
        },
        "time_range": {"first": _iso_ms(c.time_ms.min()), "last": _iso_ms(c.time_ms.max())},
        "labelled": int(np.count_nonzero(~np.isnan(c.label))),
        "latency_us": {
            "primary": _quantiles(c.primary_latency_us),
            "shadow": _quantiles(c.shadow_latency_us),
        },
        "shadow_errors": [{"error": e, "count": n} for e, n in errors.most_common(5)],
        "over_time": _over_time(c),
        "quality": _quality(c, bootstrap=bootstrap, seed=seed),
    }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return {name: math.nan for name in [*LATENCY_QUANTILES, "mean"]}
    found = np.quantile(values, list(LATENCY_QUANTILES.values()))
    return {**dict(zip(LATENCY_QUANTILES, map(float, found), strict=True)), "mean": values.mean()}


def bucket_seconds(span_ms: int, buckets: int = TIME_BUCKETS) -> int:
    """The smallest round bucket width giving at most about ``buckets`` buckets."""
    wanted = span_ms / 1000 / buckets
    for width in NICE_BUCKET_SECONDS:
        if width >= wanted:
            return width
    return int(math.ceil(wanted / 86400)) * 86400


def _over_time(c: RecordColumns) -> dict[str, Any]:
    width_ms = 1000 * bucket_seconds(int(c.time_ms.max() - c.time_ms.min()))
    origin = c.time_ms.min() // width_ms * width_ms
    index = (c.time_ms - origin) // width_ms
    size = int(index.max()) + 1
    ok = c.scored
    agree = decision_codes(c.primary_decision[ok]) == decision_codes(c.shadow_decision[ok])
    delta = np.abs(c.shadow[ok] - c.primary[ok])
    requests = np.bincount(index, minlength=size)
    scored = np.bincount(index[ok], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.bincount(index[ok], weights=agree, minlength=size) / scored
        mean_delta = np.bincount(index[ok], weights=delta, minlength=size) / scored
    return {
        "bucket_seconds": width_ms // 1000,
        "start_ms": (origin + width_ms * np.arange(size)).tolist(),
        "requests": requests.tolist(),
        "scored": scored.tolist(),
        "agreement_rate": agreement.tolist(),
        "mean_abs_delta": mean_delta.tolist(),
    }


def _quality(c: RecordColumns, *, bootstrap: int, seed: int) -> dict[str, Any] | None:
    """Label-based quality of both models on the labelled rows both scored."""
    use = ~np.isnan(c.label) & c.scored
    if not np.any(~np.isnan(c.label)):
        return None
    y = c.label[use] > 0
    scores = (c.primary[use], c.shadow[use])
    point = [RankedScores(s, y).metrics() for s in scores]
    boot = bootstrap_metrics(scores, y, replicates=bootstrap, seed=seed)
    models, declined = {}, []
    for i, name in enumerate(("primary", "shadow")):
        codes = decision_codes((c.primary_decision, c.shadow_decision)[i][use])
        declined.append(codes == DECISIONS.index("decline"))
        models[name] = {
            "roc_auc": float(point[i][0][0]),
            "roc_auc_ci": _interval(boot[i, 0]),
            "pr_auc": float(point[i][1][0]),
            "pr_auc_ci": _interval(boot[i, 1]),
            "at_decline": _at_decision(codes >= DECISIONS.index("decline"), y),
            "at_review_or_decline": _at_decision(codes >= DECISIONS.index("review"), y),
        }
    difference = {
        "roc_auc": models["shadow"]["roc_auc"] - models["primary"]["roc_auc"],
        "roc_auc_ci": _interval(boot[1, 0] - boot[0, 0]),
        "pr_auc": models["shadow"]["pr_auc"] - models["primary"]["pr_auc"],
        "pr_auc_ci": _interval(boot[1, 1] - boot[0, 1]),
    }
    code, text = verdict(difference["roc_auc"], *difference["roc_auc_ci"])
    # champion = primary, challenger = shadow; the same resamples as above (same rows,
    # replicates and seed), so its ROC AUC intervals are the ones above
    comparison = None
    if len(y):
        comparison = compare_models(y, *scores, declined=declined, n_boot=bootstrap, seed=seed)
    if 0 < int(y.sum()) < FEW_POSITIVES:
        text += f" (only {int(y.sum())} fraud labels: treat with care)"
    return {
        "rows": int(use.sum()),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "primary": models["primary"],
        "shadow": models["shadow"],
        "difference": difference,
        "verdict": code,
        "verdict_text": text,
        "comparison": comparison,
    }


def _at_decision(flagged: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    tp = int(np.count_nonzero(flagged & y))
    n_flagged, n_fraud = int(flagged.sum()), int(y.sum())
    return {
        "flagged": n_flagged,
        "true_positives": tp,
        "precision": tp / n_flagged if n_flagged else math.nan,
        "recall": tp / n_fraud if n_fraud else math.nan,
    }


def _interval(values: np.ndarray) -> list[float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [math.nan, math.nan]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def verdict(difference: float, low: float, high: float) -> tuple[str, str]:
    """(code, text) from the shadow − primary ROC AUC difference and its 95% CI."""
    if math.isnan(difference):
        return "insufficient", "not enough labels: need fraud and legitimate cases both scored"
    shown = f"ROC AUC {difference:+.4f}"
    if math.isnan(low) or math.isnan(high):
        return "no_interval", f"{shown}, no confidence interval (bootstrap off)"
    shown += f" (95% CI {low:+.4f} to {high:+.4f})"
    if low > 0:
        return "better", f"shadow better: {shown}"
    if high < 0:
        return "worse", f"shadow worse: {shown}"
    return "no_difference", f"no significant difference: {shown}"


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy → Python, NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_ms(ms: int) -> str:
    return _iso(datetime.fromtimestamp(int(ms) / 1000, UTC))


def _iso_or_none(moment: datetime | str | None) -> str | None:
    if moment is None:
        return None
    return _iso(utc(moment) if isinstance(moment, str) else moment)
