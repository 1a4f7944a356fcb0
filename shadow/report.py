"""The analyst report comparing a shadow model to the primary, from the Parquet records.

:func:`compute_report` reads the paired records in a time window (and every label),
and returns JSON-ready numbers per (primary model, version, shadow model, version)
pair: the same :class:`~riskwire.shadow.compare.PairStats` summary the server keeps
online, the decision flip matrix, latency quantiles, agreement over time and, where
labels have arrived, ROC AUC and average precision of both models on the same
labelled requests with paired bootstrap confidence intervals. :func:`render_html`
turns it into one self-contained HTML page with inline PNG plots (matplotlib, Agg).

ROC AUC and average precision are computed here with numpy from one sort per model:
both are sums over groups of tied scores, so a bootstrap replicate is the same sums
with per-row resampling counts as weights (no re-sorting). Ties count one half (ROC)
and share a threshold (AP), which is what scikit-learn does.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .compare import DECISIONS, SCORE_EDGES, PairStats, decision_codes, score_histogram
from .records import join_labels, read_labels, read_records, utc

PAIR_KEYS = ("primary_model", "primary_version", "shadow_model", "shadow_version")
LATENCY_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
TIME_BUCKETS = 20  # about this many buckets in the over-time series
NICE_BUCKET_SECONDS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
    86400, 172800, 604800,
)  # fmt: skip
BOOTSTRAP_CELLS = 4_000_000  # replicates × rows resampled at once (memory bound)
SCATTER_POINTS = 50_000
FEW_POSITIVES = 30
FIGURE_IDS = ("scatter", "histograms", "flips", "over-time", "latency", "roc", "pr")


# --- columns ------------------------------------------------------------------------


@dataclass
class _Columns:
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
    def from_table(cls, table: pa.Table) -> _Columns:
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

    def take(self, rows: np.ndarray) -> _Columns:
        return _Columns(**{name: value[rows] for name, value in vars(self).items()})

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


# --- ranking metrics ----------------------------------------------------------------


class RankedScores:
    """One model's scores sorted once, for ROC AUC and average precision under weights.

    Rows with equal scores form a group (one threshold). Both metrics are sums over
    groups of the positives and negatives in each, so weighting or resampling rows only
    changes those per-group counts.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.asarray(scores, np.float64)
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        positive = np.asarray(labels, bool)
        self.positive = positive[self.order].astype(np.float64)
        first = np.r_[True, ordered[1:] != ordered[:-1]][: len(ordered)]
        self.starts = np.flatnonzero(first)
        self.groups = len(self.starts)
        # per row, in the caller's order: its group, + groups if positive (for bincount)
        self.keys = np.empty(len(scores), np.int64)
        self.keys[self.order] = np.cumsum(first) - 1
        self.keys += positive * self.groups

    def group_sums(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per group (one row per row of ``weights``)."""
        ordered = np.atleast_2d(weights).astype(np.float64, copy=False)[:, self.order]
        positives = np.add.reduceat(ordered * self.positive, self.starts, axis=1)
        return positives, np.add.reduceat(ordered, self.starts, axis=1) - positives

    def metrics(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ROC AUC, average precision) per row of ``weights`` (default: all ones)."""
        if weights is None:
            weights = np.ones((1, len(self.order)))
        if not self.groups:
            return _nan_metrics(len(np.atleast_2d(weights)))
        return _group_metrics(*self.group_sums(weights))

    def resampled_metrics(self, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ROC AUC, average precision) of each row of ``draws`` (row indices, with repeats)."""
        b = len(draws)
        if not self.groups:
            return _nan_metrics(b)
        keys = self.keys[draws] + (np.arange(b, dtype=np.int64) * 2 * self.groups)[:, None]
        counts = np.bincount(keys.reshape(-1), minlength=b * 2 * self.groups)
        counts = counts.reshape(b, 2, self.groups).astype(np.float64)
        return _group_metrics(counts[:, 1], counts[:, 0])

    def curves(self) -> dict[str, np.ndarray]:
        """ROC (fpr, tpr) and precision/recall points, one per distinct score."""
        gp, gn = self.group_sums(np.ones(len(self.order)))
        tp = np.cumsum(gp[0, ::-1])  # thresholds from the highest score down
        fp = np.cumsum(gn[0, ::-1])
        p, n = max(tp[-1], 1.0), max(fp[-1], 1.0)
        return {
            "fpr": np.r_[0.0, fp / n],
            "tpr": np.r_[0.0, tp / p],
            "recall": np.r_[0.0, tp / p],
            "precision": np.r_[1.0, tp / np.maximum(tp + fp, 1.0)],
        }


def _group_metrics(gp: np.ndarray, gn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and AP from positives/negatives per group (rows × groups, ascending score).

    ROC AUC = Σ_g gp·(negatives below g + gn/2) / (P·N); AP = Σ_g gp/P · precision at
    the threshold of group g. Written with in-place steps: bootstraps call it on
    replicates × groups arrays.
    """
    cum_p = np.cumsum(gp, axis=1)
    cum_n = np.cumsum(gn, axis=1)
    total_p, total_n = cum_p[:, -1].copy(), cum_n[:, -1].copy()
    roc = np.einsum("ij,ij->i", gp, cum_n) - 0.5 * np.einsum("ij,ij->i", gp, gn)
    tp = np.subtract(total_p[:, None], cum_p, out=cum_p)  # positives scored >= group
    tp += gp
    flagged = np.subtract(total_n[:, None], cum_n, out=cum_n)
    flagged += gn
    flagged += tp
    np.maximum(flagged, np.finfo(np.float64).tiny, out=flagged)  # 0 only where gp is 0
    ap = np.einsum("ij,ij->i", gp, np.divide(tp, flagged, out=tp))
    with np.errstate(invalid="ignore", divide="ignore"):
        roc /= total_p * total_n
        ap /= total_p
    roc[(total_p == 0) | (total_n == 0)] = math.nan
    ap[total_p == 0] = math.nan
    return roc, ap


def _nan_metrics(rows: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(rows, math.nan), np.full(rows, math.nan)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    return float(RankedScores(scores, labels).metrics()[0][0])


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (the PR AUC scikit-learn reports); NaN without positives."""
    return float(RankedScores(scores, labels).metrics()[1][0])


def bootstrap_metrics(
    score_sets: Sequence[np.ndarray], labels: np.ndarray, *, replicates: int, seed: int = 0
) -> np.ndarray:
    """Paired bootstrap of (ROC AUC, AP) for each score set: shape (sets, 2, replicates).

    Every replicate resamples the same rows for all score sets, so differences between
    sets are paired. Replicates without both classes are NaN.
    """
    n = len(labels)
    ranked = [RankedScores(scores, labels) for scores in score_sets]
    out = np.full((len(ranked), 2, replicates), math.nan)
    if not n or replicates <= 0:
        return out
    rng = np.random.default_rng(seed)
    step = max(1, min(replicates, BOOTSTRAP_CELLS // n))
    for start in range(0, replicates, step):
        b = min(step, replicates - start)
        draws = rng.integers(0, n, size=(b, n))
        for i, model in enumerate(ranked):
            roc, ap = model.resampled_metrics(draws)
            out[i, 0, start : start + b] = roc
            out[i, 1, start : start + b] = ap
    return out


def _interval(values: np.ndarray) -> list[float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [math.nan, math.nan]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


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
    columns = _Columns.from_table(joined)
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


def _pair_report(key: tuple[str, ...], c: _Columns, *, bootstrap: int, seed: int) -> dict:
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


def _over_time(c: _Columns) -> dict[str, Any]:
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


def _quality(c: _Columns, *, bootstrap: int, seed: int) -> dict[str, Any] | None:
    """Label-based quality of both models on the labelled rows both scored."""
    use = ~np.isnan(c.label) & c.scored
    if not np.any(~np.isnan(c.label)):
        return None
    y = c.label[use] > 0
    scores = (c.primary[use], c.shadow[use])
    point = [RankedScores(s, y).metrics() for s in scores]
    boot = bootstrap_metrics(scores, y, replicates=bootstrap, seed=seed)
    models = {}
    for i, name in enumerate(("primary", "shadow")):
        codes = decision_codes((c.primary_decision, c.shadow_decision)[i][use])
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


# --- HTML ---------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:2px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%}.note{color:#8a5a00;background:#fff7e0;padding:.5em}
.meta{color:#666}.better{color:#176c1f}.worse{color:#b00020}
"""


def render_html(report: dict[str, Any], records: pa.Table) -> str:
    """One self-contained HTML page of ``report`` with plots drawn from ``records``.

    ``records`` are the rows the report was computed from (:func:`load_window`); the
    ROC and precision/recall curves need their ``label`` column. Figures have the ids
    in :data:`FIGURE_IDS` for the first pair and ``<id>-<n>`` for pair n > 1.
    """
    e = html.escape
    window = report.get("window") or {}
    head = (
        "<h1>Shadow comparison report</h1>"
        f"<p class='meta'>directory {e(str(report.get('directory')))}"
        f" · records from {e(str(window.get('since') or 'the first'))} until "
        f"{e(str(window.get('until') or 'the last'))}"
        f" · generated {e(str(report.get('generated_at')))}"
        f" · {report.get('records', 0)} records, {report.get('labelled', 0)} labelled</p>"
    )
    if not report.get("pairs"):
        body = "<p class='note'>Nothing to report: no shadow records in this window.</p>"
    else:
        columns = _Columns.from_table(records)
        groups = dict(pair_groups(records))
        sections = []
        for n, pair in enumerate(report["pairs"], start=1):
            rows = groups.get(tuple(pair[k] for k in PAIR_KEYS), np.empty(0, np.int64))
            sections.append(_pair_section(n, pair, columns.take(rows)))
        body = _summary_table(report["pairs"]) + "".join(sections)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>riskwire shadow report</title><style>{_CSS}</style></head>"
        f"<body>{head}{body}</body></html>\n"
    )


def _pair_name(pair: dict[str, Any]) -> str:
    return (
        f"{pair['primary_model']} v{pair['primary_version']} → "
        f"{pair['shadow_model']} v{pair['shadow_version']} (shadow)"
    )


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return html.escape(str(value))


def _ci(pair_ci: list | None) -> str:
    if not pair_ci or None in pair_ci:
        return ""
    return f" [{pair_ci[0]:.4f}, {pair_ci[1]:.4f}]"


def _cell(text: str) -> str:
    numeric = text[:1].isdigit() or text[:1] in "+-–" or text.endswith("%")
    return f"<td class='n'>{text}</td>" if numeric else f"<td>{text}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; header and cells must already be escaped."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(map(_cell, r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_table(pairs: list[dict[str, Any]]) -> str:
    rows = []
    for pair in pairs:
        s, q = pair["summary"], pair["quality"] or {}
        d = q.get("difference", {})
        rows.append([
            html.escape(_pair_name(pair)), _fmt(s["mirrored"]), _fmt(s["failed"]),
            _fmt(s["agreement_rate"], ".2%"), _fmt(s["mean_abs_delta"]), _fmt(s["correlation"]),
            _fmt(s["psi"]), _fmt(pair["labelled"]),
            _fmt(q.get("primary", {}).get("roc_auc")), _fmt(q.get("shadow", {}).get("roc_auc")),
            _fmt(d.get("roc_auc"), "+.4f") + _ci(d.get("roc_auc_ci")),
            _short_verdict(q),
        ])  # fmt: skip
    header = [
        "pair", "mirrored", "shadow failed", "agreement", "mean |Δp|", "correlation", "PSI",
        "labelled", "ROC AUC primary", "ROC AUC shadow", "Δ ROC AUC [95% CI]", "verdict",
    ]  # fmt: skip
    return f"<section id='summary'><h2>Summary</h2>{_table(header, rows)}</section>"


def _short_verdict(quality: dict[str, Any]) -> str:
    if not quality:
        return "no labels yet"
    short = {
        "better": "<b class='better'>shadow better</b>",
        "worse": "<b class='worse'>shadow worse</b>",
        "no_difference": "no significant difference",
        "no_interval": "no confidence interval",
    }.get(quality["verdict"], "not enough labels")
    few = 0 < quality["positives"] < FEW_POSITIVES
    return short + (f" (only {quality['positives']} fraud labels)" if few else "")


def _pair_section(n: int, pair: dict[str, Any], c: _Columns) -> str:
    suffix = "" if n == 1 else f"-{n}"
    s = pair["summary"]
    facts = _table(
        ["first record", "last record", "mirrored", "scored", "shadow failed", "max |Δp|"],
        [[_fmt(pair["time_range"]["first"]), _fmt(pair["time_range"]["last"]), _fmt(s["mirrored"]),
          _fmt(s["scored"]), _fmt(s["failed"]), _fmt(s["max_abs_delta"])]],
    )  # fmt: skip
    errors = ""
    if pair["shadow_errors"]:
        error_rows = [[html.escape(x["error"]), _fmt(x["count"])] for x in pair["shadow_errors"]]
        errors = "<h3>Shadow errors</h3>" + _table(["error", "count"], error_rows)
    figures = [
        ("scatter", "Primary vs shadow probability", _scatter_html(c)),
        ("histograms", "Score distributions", _histograms_html(pair)),
        ("flips", "Decision flips", _flips_html(pair)),
        ("over-time", "Agreement and |Δp| over time", _over_time_html(pair)),
        ("latency", "Latency", _latency_html(pair, c)),
        *_quality_figures(pair, c),
    ]
    blocks = "".join(
        f"<figure id='{name}{suffix}'><h3>{title}</h3>{content}</figure>"
        for name, title, content in figures
    )
    return (
        f"<section class='pair' id='pair-{n}'><h2>{html.escape(_pair_name(pair))}</h2>"
        f"{facts}{errors}{blocks}</section>"
    )


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    return Figure(figsize=(width, height), dpi=96, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fig.clear()
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


_PROB_TICKS = (1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _probability_axis(axis: Any) -> None:
    """Label a log-odds axis with probabilities (only ticks inside the current limits)."""
    low, high = sorted(axis.get_view_interval())
    ticks = [t for t in _PROB_TICKS if low <= _logit(np.array(t)) <= high]
    axis.set_ticks(_logit(np.array(ticks)), [f"{t:g}" for t in ticks])


def _scatter_html(c: _Columns) -> str:
    ok = np.flatnonzero(c.scored)
    if not len(ok):
        return "<p class='note'>The shadow scored none of these requests.</p>"
    if len(ok) > SCATTER_POINTS:
        ok = np.sort(np.random.default_rng(0).choice(ok, SCATTER_POINTS, replace=False))
    x, y = _logit(c.primary[ok]), _logit(c.shadow[ok])
    flip = decision_codes(c.primary_decision[ok]) != decision_codes(c.shadow_decision[ok])
    fig = _figure(6.0, 5.6)
    ax = fig.add_subplot()
    ax.scatter(x[~flip], y[~flip], s=3, alpha=0.3, color="#4c72b0", label="same decision")
    ax.scatter(x[flip], y[flip], s=6, alpha=0.7, color="#d62728", label="decision flip")
    low, high = min(x.min(), y.min()) - 0.5, max(x.max(), y.max()) + 0.5
    ax.plot([low, high], [low, high], color="#555", lw=0.8, ls="--")
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="primary probability (log-odds axis)")
    ax.set_ylabel("shadow probability (log-odds axis)")
    _probability_axis(ax.xaxis)
    _probability_axis(ax.yaxis)
    ax.legend(loc="upper left")
    note = f"<figcaption>{len(ok)} of {int(c.scored.sum())} scored pairs shown.</figcaption>"
    return _png(fig, "scatter of primary vs shadow probability") + note


def _histograms_html(pair: dict[str, Any]) -> str:
    hist = pair["histograms"]
    inner = _logit(np.asarray(hist["edges"][1:-1]))
    edges = np.r_[inner[0] - 1.0, inner, inner[-1] + 1.0]
    fig = _figure()
    ax = fig.add_subplot()
    for name, color in (("primary", "#4c72b0"), ("shadow", "#dd8452")):
        counts = np.asarray(hist[name], np.float64)
        ax.stairs(counts / max(counts.sum(), 1.0), edges, label=name, color=color, lw=1.6)
    ax.set(xlabel="probability (log-odds axis)", ylabel="fraction of scored requests")
    ax.set_title(f"PSI {_fmt(pair['summary']['psi'])}")
    _probability_axis(ax.xaxis)
    ax.legend()
    return _png(fig, "score histograms")


def _flips_html(pair: dict[str, Any]) -> str:
    counts = np.asarray(pair["flip_matrix"]["counts"])
    fig = _figure(4.8, 4.0)
    ax = fig.add_subplot()
    image = ax.imshow(np.log1p(counts), cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        dark = image.norm(np.log1p(value)) > 0.6
        ax.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(3), DECISIONS)
    ax.set_yticks(range(3), DECISIONS)
    ax.set(xlabel="shadow decision", ylabel="primary decision")
    rows = [[f"<b>{d}</b>", *map(str, row)] for d, row in zip(DECISIONS, counts, strict=True)]
    table = _table(["primary ↓ / shadow →", *DECISIONS], rows)
    return _png(fig, "decision flip matrix") + table


def _over_time_html(pair: dict[str, Any]) -> str:
    series = pair["over_time"]
    times = [datetime.fromtimestamp(ms / 1000, UTC) for ms in series["start_ms"]]

    def values(name: str) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in series[name]], np.float64)

    fig = _figure(7.0, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(times, 100 * values("agreement_rate"), marker="o", ms=3)
    top.set_ylabel("agreement (%)")
    bottom.plot(times, values("mean_abs_delta"), marker="o", ms=3, color="#dd8452")
    bottom.set_ylabel("mean |Δp|")
    bottom.set_xlabel(f"time (UTC), {_duration(series['bucket_seconds'])} buckets")
    fig.autofmt_xdate()
    return _png(fig, "agreement and mean absolute delta over time")


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _latency_html(pair: dict[str, Any], c: _Columns) -> str:
    quantiles = pair["latency_us"]
    rows = [
        [name, *(_fmt(quantiles[name][q], ".0f") for q in (*LATENCY_QUANTILES, "mean"))]
        for name in ("primary", "shadow")
    ]
    table = _table(["model", *(f"{q} (µs)" for q in LATENCY_QUANTILES), "mean (µs)"], rows)
    series = {
        name: v[np.isfinite(v) & (v > 0)]
        for name, v in (("primary", c.primary_latency_us), ("shadow", c.shadow_latency_us))
    }
    present = [v for v in series.values() if len(v)]
    if not present:
        return "<p class='note'>No latencies recorded.</p>" + table
    low, high = min(v.min() for v in present), max(v.max() for v in present)
    bins = np.geomspace(low, high * 1.0001 if high > low else low * 2, 60)
    fig = _figure()
    ax = fig.add_subplot()
    for (name, v), color in zip(series.items(), ("#4c72b0", "#dd8452"), strict=True):
        if len(v):
            ax.hist(v, bins=bins, histtype="step", lw=1.6, color=color, label=name)
            ax.axvline(np.quantile(v, 0.99), color=color, ls=":", lw=1)
    ax.set(xscale="log", xlabel="latency per request (µs, dotted: p99)", ylabel="requests")
    ax.legend()
    return _png(fig, "latency histograms") + table


def _quality_figures(pair: dict[str, Any], c: _Columns) -> list[tuple[str, str, str]]:
    q = pair["quality"]
    titles = ("ROC curve", "Precision / recall")
    if q is None:
        note = (
            "<p class='note'>No labels in this window yet: ROC and precision/recall need "
            "ground truth (labels arrive through the Feedback RPC).</p>"
        )
        return [("roc", titles[0], note), ("pr", titles[1], note)]
    use = ~np.isnan(c.label) & c.scored
    y = c.label[use] > 0
    if not y.any() or y.all():
        note = f"<p class='note'>{html.escape(q['verdict_text'])}.</p>"
        return [("roc", titles[0], note), ("pr", titles[1], note)]
    curves = {
        "primary": RankedScores(c.primary[use], y).curves(),
        "shadow": RankedScores(c.shadow[use], y).curves(),
    }
    return [
        ("roc", titles[0], _curve_png(q, curves, "roc") + _quality_table(q)),
        ("pr", titles[1], _curve_png(q, curves, "pr")),
    ]


def _curve_png(q: dict[str, Any], curves: dict[str, dict], kind: str) -> str:
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    metric, x, y = ("roc_auc", "fpr", "tpr") if kind == "roc" else ("pr_auc", "recall", "precision")
    for name, color in (("primary", "#4c72b0"), ("shadow", "#dd8452")):
        title = "ROC AUC" if kind == "roc" else "AP"
        label = f"{name} {title} {_fmt(q[name][metric])}{_ci(q[name][metric + '_ci'])}"
        style = "default" if kind == "roc" else "steps-pre"  # precision holds up to each recall
        xs, ys = _thin(curves[name][x], curves[name][y])
        ax.plot(xs, ys, color=color, lw=1.6, label=label, drawstyle=style)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
    else:
        ax.axhline(q["positives"] / q["rows"], color="#999", lw=0.8, ls="--")
        ax.set(xlabel="recall", ylabel="precision")
    ax.set_title(f"{q['rows']} labelled requests ({q['positives']} fraud)")
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    return _png(fig, f"{kind} curves")


def _thin(x: np.ndarray, y: np.ndarray, points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= points:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, len(x) - 1, points).astype(np.int64), len(x) - 1])
    return x[keep], y[keep]


def _quality_table(q: dict[str, Any]) -> str:
    rows = []
    for name in ("primary", "shadow"):
        m = q[name]
        at = [
            m[k][v] for k in ("at_decline", "at_review_or_decline") for v in ("precision", "recall")
        ]
        rows.append([
            name, _fmt(m["roc_auc"]) + _ci(m["roc_auc_ci"]),
            _fmt(m["pr_auc"]) + _ci(m["pr_auc_ci"]), *(_fmt(x, ".3f") for x in at),
        ])  # fmt: skip
    d = q["difference"]
    rows.append([
        "shadow − primary", _fmt(d["roc_auc"], "+.4f") + _ci(d["roc_auc_ci"]),
        _fmt(d["pr_auc"], "+.4f") + _ci(d["pr_auc_ci"]), "", "", "", "",
    ])  # fmt: skip
    header = [
        "model", "ROC AUC [95% CI]", "PR AUC (AP) [95% CI]", "precision @decline",
        "recall @decline", "precision @review+", "recall @review+",
    ]  # fmt: skip
    css = q["verdict"] if q["verdict"] in ("better", "worse") else ""
    verdict_line = f"<p class='{css}'><b>Verdict:</b> {html.escape(q['verdict_text'])}</p>"
    return _table(header, rows) + verdict_line
