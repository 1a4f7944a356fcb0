"""The drift report: one self-contained HTML page with inline PNG plots (matplotlib, Agg).

It reads what :class:`~riskwire.server.monitoring.drift.DriftMonitor` leaves under
``<models>/.drift/``: ``latest.json`` (the merged live counts per model version and
window, in the :class:`~riskwire.kernels.sketch.SketchLayout` slot layout) and
``history.jsonl`` (the measures of every evaluation), plus the package's
``profile.json`` (the training fractions). The page shows, for one model version and
window: the latest measures per column, training vs live distributions per column
(``id="dist-<column>"``, columns by PSI descending) and the measures over time
(``id="over-time"``).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from riskwire.kernels.sketch import (
    CATEGORICAL,
    FLAGGED_SLOT,
    REQUESTS_SLOT,
    ColumnSpec,
    SketchLayout,
)
from riskwire.shadow.report_html import figure, png_img

from .drift import FLAGGED_COLUMN, LATEST_FILE, column_measures

DRIFT_DIR = ".drift"
HISTORY_FILE = "history.jsonl"
DEFAULT_MIN_COUNT = 200  # as the server's drift_min_count: fewer values, no measure (–)
PSI_WARN = 0.1  # PSI above this: moderate shift (amber)
PSI_ALERT = 0.25  # PSI above this: significant shift (red)
TOP_CATEGORIES = 12  # categorical plots: the rest is summed into "other"
OVER_TIME_COLUMNS = 8  # columns with the highest PSI in the history
_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:2px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%}.note{color:#8a5a00;background:#fff7e0;padding:.5em}
.meta{color:#666}td.warn{background:#fff3cd}td.alert{background:#f8d7da;font-weight:bold}
"""


class DriftReportError(Exception):
    """Nothing to report: no drift files, no profile, or no data for the selection."""


def drift_dir(models_dir: Path) -> Path:
    """Where the server writes drift files: ``<models>/.drift``."""
    return Path(models_dir) / DRIFT_DIR


def history_key(model: str, version: str, window: str) -> str:
    """The key of one model version and window in ``history.jsonl``."""
    return f"{model}|{version}|{window}"


def load_latest(path: Path) -> dict[str, Any] | None:
    """``latest.json`` as written by the monitor; None when the file does not exist."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DriftReportError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list):
        raise DriftReportError(f"{path}: no 'models' list")
    return payload


def load_history(path: Path, key: str | None = None) -> list[dict[str, Any]]:
    """The evaluations of ``history.jsonl``, oldest first: ``{"at", "values"}`` each.

    With ``key`` (:func:`history_key`), only evaluations that have it, and ``values`` is
    that key's ``{column: {measure: value}}``. A missing file is an empty history;
    unreadable lines (one being written) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                at, values = float(record["at"]), record["values"]
            except (ValueError, KeyError, TypeError):
                continue
            if key is None:
                records.append({"at": at, "values": values})
            elif isinstance(values, dict) and key in values:
                records.append({"at": at, "values": values[key]})
    records.sort(key=lambda r: r["at"])
    return records


def window_seconds(window: str) -> float:
    """``"5m"`` → 300.0; NaN when the name is not a number with a unit s/m/h/d."""
    try:
        return float(window[:-1]) * _UNITS_S[window[-1]]
    except (ValueError, KeyError, IndexError):
        return math.nan


def _window_order(window: str) -> tuple[float, str]:
    """Shortest first; names that are no duration before all others."""
    seconds = window_seconds(window)
    return (-1.0 if math.isnan(seconds) else seconds, window)


@dataclass(frozen=True, eq=False)
class Candidate:
    """One model version and window with data (live counts and/or history)."""

    model: str
    version: str
    window: str
    counts: np.ndarray | None  # merged live counts of the window (latest.json)

    @property
    def requests(self) -> int:
        return 0 if self.counts is None or not self.counts.size else int(self.counts[REQUESTS_SLOT])


def _counts_row(counts: Any) -> np.ndarray | None:
    try:
        return np.asarray(counts, dtype=np.int64).ravel()
    except (ValueError, TypeError):
        return None  # malformed: reported as "no live counts"


def _candidates(latest: dict[str, Any] | None, history: list[dict[str, Any]]) -> list[Candidate]:
    found: dict[tuple[str, str, str], Candidate] = {}
    for entry in (latest or {}).get("models", []):
        windows = entry.get("windows") if isinstance(entry, dict) else None
        for window, counts in (windows if isinstance(windows, dict) else {}).items():
            key = (str(entry.get("name")), str(entry.get("version")), str(window))
            found[key] = Candidate(*key, _counts_row(counts))
    for record in history:
        for text in record["values"] if isinstance(record["values"], dict) else ():
            parts = tuple(str(text).split("|"))
            if len(parts) == 3 and parts not in found:
                found[parts] = Candidate(*parts, None)
    return list(found.values())


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _select(
    candidates: list[Candidate], model: str | None, version: str | None, window: str | None
) -> Candidate:
    """The requested model version and window; by default the model version with the
    most live requests and its longest window."""
    chosen = [
        c
        for c in candidates
        if (model is None or c.model == model)
        and (version is None or c.version == str(version))
        and (window is None or c.window == window)
    ]
    if not chosen:
        wanted = " ".join(
            f"{label} {value}"
            for label, value in (("model", model), ("version", version), ("window", window))
            if value is not None
        )
        raise DriftReportError(f"no drift data for {wanted}; available: {_available(candidates)}")
    # max keeps the first of equals: ties go to the model name first in order
    chosen.sort(key=lambda c: c.model)
    busiest = max(chosen, key=lambda c: (c.requests, _version_order(c.version)))
    same = [c for c in chosen if (c.model, c.version) == (busiest.model, busiest.version)]
    return max(same, key=lambda c: _window_order(c.window))


def _available(candidates: Sequence[Candidate]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for c in candidates:
        groups.setdefault((c.model, c.version), []).append(c.window)
    return (
        "; ".join(
            f"{m} v{v} ({', '.join(sorted(w, key=_window_order))})"
            for (m, v), w in sorted(groups.items())
        )
        or "nothing"
    )


def _load_layout(models_dir: Path, model: str, version: str) -> tuple[SketchLayout, dict]:
    path = Path(models_dir) / model / version / "profile.json"
    try:
        profile = json.loads(path.read_text())
        return SketchLayout(profile), profile
    except FileNotFoundError:
        raise DriftReportError(f"no profile for {model} v{version}: {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DriftReportError(f"{path}: not a usable profile ({exc})") from exc


def render_drift_report(
    models_dir: Path,
    *,
    model: str | None = None,
    version: str | None = None,
    window: str | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    data_dir: Path | None = None,
) -> str:
    """One self-contained HTML page of drift for one model version and window
    (``data_dir``: where the server writes ``.drift``, default ``models_dir``).

    Without ``model``/``version`` the model version with the most live requests is
    shown, without ``window`` its longest window. Raises :class:`DriftReportError` when
    ``<models>/.drift`` holds neither ``latest.json`` nor ``history.jsonl``, when the
    selection has no data or when the package's ``profile.json`` is missing.
    """
    directory = drift_dir(data_dir or models_dir)
    latest = load_latest(directory / LATEST_FILE)
    history_path = directory / HISTORY_FILE
    if latest is None and not history_path.exists():
        raise DriftReportError(
            f"no drift data in {directory}: neither {LATEST_FILE} nor {HISTORY_FILE} "
            "(the server writes them when drift monitoring is on)"
        )
    history = load_history(history_path)
    candidates = _candidates(latest, history)
    chosen = _select(candidates, model, version, window)
    layout, profile = _load_layout(models_dir, chosen.model, chosen.version)
    key = history_key(chosen.model, chosen.version, chosen.window)
    series = [
        {"at": r["at"], "values": r["values"][key]}
        for r in history
        if isinstance(r["values"], dict) and key in r["values"]
    ]
    counts, problem = _live_counts(chosen, layout)
    measures = _measures(layout, counts, series, min_count)
    order = _by_psi(layout, measures)
    context = _Context(chosen, layout, profile, counts, measures, order, series, latest)
    body = (
        _header(context, candidates)
        + _summary(context)
        + _distributions(context, problem)
        + _over_time(context)
    )
    title = html.escape(f"riskwire drift report: {chosen.model} v{chosen.version}")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _live_counts(chosen: Candidate, layout: SketchLayout) -> tuple[np.ndarray | None, str | None]:
    """The chosen window's counts if they fit the profile's layout, else why not."""
    counts = chosen.counts
    if counts is None or counts.shape == (layout.total_slots,):
        return counts, None
    return None, (
        f"The live counts have {counts.size} slots but this profile's layout has "
        f"{layout.total_slots}: they were counted for another package."
    )


@dataclass(frozen=True)
class _Context:
    chosen: Candidate
    layout: SketchLayout
    profile: dict[str, Any]
    counts: np.ndarray | None
    measures: dict[str, dict[str, float]]
    order: list[int]  # column indexes, PSI descending
    series: list[dict[str, Any]]  # history of the chosen key
    latest: dict[str, Any] | None


def _measures(
    layout: SketchLayout, counts: np.ndarray | None, series: list[dict], min_count: int
) -> dict[str, dict[str, float]]:
    """From the live counts when there are some, else the last history entry."""
    if counts is not None:
        return column_measures(layout, counts, min_count)
    last = series[-1]["values"] if series else {}
    return {
        name: {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        for name, values in last.items()
        if isinstance(values, dict)
    }


def _by_psi(layout: SketchLayout, measures: dict[str, dict[str, float]]) -> list[int]:
    def key(index: int) -> tuple[bool, float, int]:
        value = measures.get(layout.columns[index].name, {}).get("psi", math.nan)
        return (math.isnan(value), -value if not math.isnan(value) else 0.0, index)

    return sorted(range(len(layout.columns)), key=key)


def _iso(epoch_s: float | None) -> str:
    if epoch_s is None:
        return "–"
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _header(c: _Context, candidates: list[Candidate]) -> str:
    e = html.escape
    chosen = c.chosen
    facts = [f"window {e(chosen.window)}"]
    if c.counts is not None:
        flagged = c.measures.get(FLAGGED_COLUMN, {}).get("flagged_share", math.nan)
        facts.append(
            f"live counts of {_iso((c.latest or {}).get('at'))}: "
            f"{int(c.counts[REQUESTS_SLOT])} requests, {int(c.counts[FLAGGED_SLOT])} flagged by "
            f"validation ({_fmt(flagged, '.2%')})"
        )
    else:
        facts.append("no live counts")
    if c.series:
        facts.append(
            f"history: {len(c.series)} evaluations from {_iso(c.series[0]['at'])} "
            f"to {_iso(c.series[-1]['at'])}"
        )
    reference = c.profile.get("reference") or {}
    if reference:
        facts.append(
            "training reference: "
            + ", ".join(f"{e(str(k))} from {e(str(v))}" for k, v in reference.items())
        )
    facts.append(f"generated {_iso(datetime.now(UTC).timestamp())}")
    others = [x for x in candidates if x is not chosen]
    also = (
        f"<p class='meta'>Also available: {e(_available(others))} "
        "(riskwire drift report --model/--version/--window).</p>"
        if others
        else ""
    )
    return (
        f"<h1>Drift report: {e(chosen.model)} v{e(chosen.version)}</h1>"
        "<p>Live traffic compared with the training profile, per monitored column "
        "(PSI: population stability index; JS: Jensen–Shannon distance; L∞: largest "
        "category-fraction difference).</p>"
        f"<p class='meta'>{' · '.join(facts)}</p>{also}"
    )


def _psi_cell(value: float) -> str:
    css = ""
    if value > PSI_ALERT:  # False for NaN
        css = " alert"
    elif value > PSI_WARN:
        css = " warn"
    return f"<td class='n{css}'>{_fmt(value)}</td>"


def _summary(c: _Context) -> str:
    rows = []
    for index in c.order:
        spec = c.layout.columns[index]
        m = c.measures.get(spec.name, {})
        name = html.escape(spec.name)
        count = m.get("count")
        rows.append(
            f"<tr><td><a href='#{html.escape('dist-' + spec.name, quote=True)}'>{name}</a></td>"
            f"<td>{'categorical' if spec.kind == CATEGORICAL else 'numeric'}</td>"
            + _psi_cell(m.get("psi", math.nan))
            + "".join(
                f"<td class='n'>{_fmt(m.get(k, math.nan), spec_)}</td>"
                for k, spec_ in (("js", ".4f"), ("linf", ".4f"), ("missing_rate_change", "+.4f"))
            )
            + f"<td class='n'>{_fmt(count, '.0f') if count is not None else '–'}</td></tr>"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in ("column", "kind", "PSI", "JS", "L∞", "missing-rate change", "count")
    )
    legend = (
        f"<p class='meta'>PSI above {PSI_WARN:g} is highlighted amber, above {PSI_ALERT:g} "
        "red; – : too few values for a measure.</p>"
    )
    return (
        "<section id='summary'><h2>Latest measures</h2>"
        f"<table><tr>{header}</tr>{''.join(rows)}</table>{legend}</section>"
    )


def _distributions(c: _Context, problem: str | None) -> str:
    head = "<section id='distributions'><h2>Training vs live distributions</h2>"
    if c.counts is None:
        note = problem or (
            f"No live counts for this model version and window ({LATEST_FILE} has none): "
            "distribution plots need the server's merged counts."
        )
        return f"{head}<p class='note'>{html.escape(note)}</p></section>"
    figures = []
    for index in c.order:
        spec = c.layout.columns[index]
        slots = c.layout.column_counts(c.counts, index).astype(np.float64)
        m = c.measures.get(spec.name, {})
        title = f"{spec.name}: PSI {_fmt(m.get('psi', math.nan))}"
        missing = slots[-1] / slots.sum() if slots.sum() else math.nan
        caption = (
            f"{int(slots[:-1].sum())} live values; missing: training "
            f"{spec.expected_missing:.2%}, live {_fmt(missing, '.2%')}"
        )
        figures.append(
            f"<figure id='{html.escape('dist-' + spec.name, quote=True)}'>"
            f"<h3>{html.escape(title)}</h3>{_distributionpng_img(spec, slots[:-1])}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return head + "".join(figures) + "</section>"


def _plain(text: str) -> str:
    """Text for matplotlib that never turns into mathtext."""
    return text.replace("$", r"\$")


def _bin_labels(edges: np.ndarray) -> list[str]:
    """Labels of the ``len(edges) + 1`` bins of ``searchsorted(edges, v, "left")``."""
    if not len(edges):
        return ["all"]
    e = [format(x, ".3g") for x in edges]
    return [f"≤{e[0]}", *(f"({a}, {b}]" for a, b in zip(e, e[1:], strict=False)), f">{e[-1]}"]


def _categorical_bars(
    spec: ColumnSpec, expected: np.ndarray, live: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The top categories by max(training, live) fraction, then "other" (the rest)."""
    known = len(spec.categories)
    order = np.argsort(-np.maximum(expected[:known], live[:known]), kind="stable")
    top = np.sort(order[:TOP_CATEGORIES])
    rest = np.setdiff1d(np.arange(len(expected)), top)
    labels = [_plain(spec.categories[i]) for i in top] + ["other"]
    return labels, np.r_[expected[top], expected[rest].sum()], np.r_[live[top], live[rest].sum()]


def _distributionpng_img(spec: ColumnSpec, present: np.ndarray) -> str:
    expected = spec.expected / spec.expected.sum() if spec.expected.sum() else spec.expected
    live = present / present.sum() if present.sum() else np.zeros_like(present)
    if spec.kind == CATEGORICAL:
        labels, expected, live = _categorical_bars(spec, expected, live)
    else:
        labels = _bin_labels(spec.edges)
    x = np.arange(len(labels))
    fig = figure(7.0, 3.4)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, expected, width=0.4, color="#4c72b0", label="training")
    ax.bar(x + 0.2, live, width=0.4, color="#dd8452", label="live")
    rotation = 0 if len(labels) <= 6 else 60
    ax.set_xticks(x, labels, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
    ax.set_ylabel("fraction of non-missing values")
    ax.set_xlabel("category" if spec.kind == CATEGORICAL else "bin (training profile edges)")
    ax.legend()
    return png_img(fig, f"training vs live distribution of {spec.name}")


def _over_time(c: _Context) -> str:
    head = "<section><h2>Over time</h2><figure id='over-time'><h3>Drift over time</h3>"
    if not c.series:
        note = (
            f"No drift history for {c.chosen.model} v{c.chosen.version}, window "
            f"{c.chosen.window} yet ({HISTORY_FILE} has no evaluations of it)."
        )
        return f"{head}<p class='note'>{html.escape(note)}</p></figure></section>"
    times = [datetime.fromtimestamp(r["at"], UTC) for r in c.series]

    def values(column: str, measure: str) -> np.ndarray:
        raw = [_measure(r["values"], column, measure) for r in c.series]
        return np.array(raw, np.float64)

    psi = {spec.name: values(spec.name, "psi") for spec in c.layout.columns}
    peaks = {n: np.nanmax(v) for n, v in psi.items() if np.isfinite(v).any()}
    top = sorted(peaks, key=lambda n: -peaks[n])[:OVER_TIME_COLUMNS]
    fig = figure(7.6, 5.4)
    upper, lower = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for name in top:
        upper.plot(times, psi[name], marker="o", ms=3, lw=1.2, label=_plain(name))
    for level, color in ((PSI_WARN, "#e0a800"), (PSI_ALERT, "#c82333")):
        upper.axhline(level, color=color, lw=0.8, ls="--")
    upper.set_ylim(bottom=0)
    upper.set_ylabel("PSI")
    if top:
        upper.legend(fontsize=7, ncols=2, loc="upper left")
    lower.plot(times, 100 * values(FLAGGED_COLUMN, "flagged_share"), marker="o", ms=3)
    lower.set_ylim(bottom=0)
    lower.set_ylabel("flagged (%)")
    lower.set_xlabel("time (UTC)")
    fig.autofmt_xdate()
    caption = (
        f"PSI of the {len(top)} columns with the highest PSI in the history (dashed: "
        f"{PSI_WARN:g} and {PSI_ALERT:g}) and the share of requests validation flagged."
    )
    return (
        f"{head}{png_img(fig, 'drift measures over time')}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure></section>"
    )


def _measure(values: Any, column: str, measure: str) -> float:
    """One history value; NaN where the entry lacks it or is malformed."""
    column_values = values.get(column) if isinstance(values, dict) else None
    value = column_values.get(measure) if isinstance(column_values, dict) else None
    return float(value) if isinstance(value, int | float) else math.nan
