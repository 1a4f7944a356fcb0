"""The shadow report as one self-contained HTML page with inline PNG plots (matplotlib, Agg).

:func:`render_html` lays out the numbers of :func:`~riskwire.shadow.report.compute_report`
and draws its figures from the records they were computed from.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from riskwire.pipeline.compare import (
    CHALLENGER_BETTER,
    CHAMPION_BETTER,
    METRIC_TITLES,
    METRICS,
    ROLES,
)

from .compare import DECISIONS, decision_codes
from .metrics import RankedScores
from .report import FEW_POSITIVES, LATENCY_QUANTILES, PAIR_KEYS, RecordColumns, pair_groups

SCATTER_POINTS = 50_000
FIGURE_IDS = ("scatter", "histograms", "flips", "over-time", "latency", "roc", "pr")

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

    ``records`` are the rows the report was computed from
    (:func:`~riskwire.shadow.report.load_window`); the ROC and precision/recall curves
    need their ``label`` column. Figures have the ids in :data:`FIGURE_IDS` for the first
    pair and ``<id>-<n>`` for pair n > 1.
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
        columns = RecordColumns.from_table(records)
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


def _pair_section(n: int, pair: dict[str, Any], c: RecordColumns) -> str:
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
        f"{facts}{errors}{blocks}{_comparison_html(pair, suffix)}</section>"
    )


def _comparison_html(pair: dict[str, Any], suffix: str) -> str:
    """Champion (primary) vs challenger (shadow): the ``riskwire compare`` table."""
    comparison = (pair["quality"] or {}).get("comparison")
    if not comparison:
        return ""
    rows = []
    for metric in METRICS:
        cells = [
            _fmt(comparison[role][metric]) + _ci(comparison[role][f"{metric}_ci"]) for role in ROLES
        ]
        d = comparison["difference"]
        rows.append([
            html.escape(METRIC_TITLES[metric]), *cells,
            _fmt(d[metric], "+.4f") + _ci(d[f"{metric}_ci"]),
        ])  # fmt: skip
    header = ["metric", "champion (primary) [95% CI]", "challenger (shadow) [95% CI]",
              "challenger − champion [95% CI]"]  # fmt: skip
    costs = comparison["costs"]
    note = (
        f"<p class='meta'>Cost per request = ({costs['missed_fraud']:g} × missed frauds + "
        f"{costs['false_decline']:g} × false declines) / requests, at each model's own decline "
        f"decisions; recall at the serving FPR ({_fmt(comparison['serving_fpr'])}, the "
        "primary's false-decline rate on these requests). "
        f"{comparison['bootstrap']['resamples']} paired bootstrap resamples.</p>"
    )
    css = {CHALLENGER_BETTER: "better", CHAMPION_BETTER: "worse"}.get(comparison["verdict"], "")
    verdict_line = (
        f"<p class='{css}'><b>Champion vs challenger:</b> "
        f"{html.escape(comparison['verdict_text'])}</p>"
    )
    return (
        f"<div class='comparison' id='champion-challenger{suffix}'><h3>Champion vs "
        f"challenger: decisions and cost</h3>{_table(header, rows)}{note}{verdict_line}</div>"
    )


def figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    return Figure(figsize=(width, height), dpi=96, layout="constrained")


def png_img(fig: Any, alt: str) -> str:
    """``fig`` as an inline base64 PNG <img> (the figure is cleared)."""
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


def _scatter_html(c: RecordColumns) -> str:
    ok = np.flatnonzero(c.scored)
    if not len(ok):
        return "<p class='note'>The shadow scored none of these requests.</p>"
    if len(ok) > SCATTER_POINTS:
        ok = np.sort(np.random.default_rng(0).choice(ok, SCATTER_POINTS, replace=False))
    x, y = _logit(c.primary[ok]), _logit(c.shadow[ok])
    flip = decision_codes(c.primary_decision[ok]) != decision_codes(c.shadow_decision[ok])
    fig = figure(6.0, 5.6)
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
    return png_img(fig, "scatter of primary vs shadow probability") + note


def _histograms_html(pair: dict[str, Any]) -> str:
    hist = pair["histograms"]
    inner = _logit(np.asarray(hist["edges"][1:-1]))
    edges = np.r_[inner[0] - 1.0, inner, inner[-1] + 1.0]
    fig = figure()
    ax = fig.add_subplot()
    for name, color in (("primary", "#4c72b0"), ("shadow", "#dd8452")):
        counts = np.asarray(hist[name], np.float64)
        ax.stairs(counts / max(counts.sum(), 1.0), edges, label=name, color=color, lw=1.6)
    ax.set(xlabel="probability (log-odds axis)", ylabel="fraction of scored requests")
    ax.set_title(f"PSI {_fmt(pair['summary']['psi'])}")
    _probability_axis(ax.xaxis)
    ax.legend()
    return png_img(fig, "score histograms")


def _flips_html(pair: dict[str, Any]) -> str:
    counts = np.asarray(pair["flip_matrix"]["counts"])
    fig = figure(4.8, 4.0)
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
    return png_img(fig, "decision flip matrix") + table


def _over_time_html(pair: dict[str, Any]) -> str:
    series = pair["over_time"]
    times = [datetime.fromtimestamp(ms / 1000, UTC) for ms in series["start_ms"]]

    def values(name: str) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in series[name]], np.float64)

    fig = figure(7.0, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(times, 100 * values("agreement_rate"), marker="o", ms=3)
    top.set_ylabel("agreement (%)")
    bottom.plot(times, values("mean_abs_delta"), marker="o", ms=3, color="#dd8452")
    bottom.set_ylabel("mean |Δp|")
    bottom.set_xlabel(f"time (UTC), {_duration(series['bucket_seconds'])} buckets")
    fig.autofmt_xdate()
    return png_img(fig, "agreement and mean absolute delta over time")


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _latency_html(pair: dict[str, Any], c: RecordColumns) -> str:
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
    fig = figure()
    ax = fig.add_subplot()
    for (name, v), color in zip(series.items(), ("#4c72b0", "#dd8452"), strict=True):
        if len(v):
            ax.hist(v, bins=bins, histtype="step", lw=1.6, color=color, label=name)
            ax.axvline(np.quantile(v, 0.99), color=color, ls=":", lw=1)
    ax.set(xscale="log", xlabel="latency per request (µs, dotted: p99)", ylabel="requests")
    ax.legend()
    return png_img(fig, "latency histograms") + table


def _quality_figures(pair: dict[str, Any], c: RecordColumns) -> list[tuple[str, str, str]]:
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
        ("roc", titles[0], _curvepng_img(q, curves, "roc") + _quality_table(q)),
        ("pr", titles[1], _curvepng_img(q, curves, "pr")),
    ]


def _curvepng_img(q: dict[str, Any], curves: dict[str, dict], kind: str) -> str:
    fig = figure(5.6, 5.0)
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
    return png_img(fig, f"{kind} curves")


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
