"""Champion vs challenger on the same labelled rows: metrics, paired bootstrap CIs, verdict.

:func:`compare_models` takes labels, both models' scores and decline decisions (or the
decline thresholds that make them), and optional sample weights, and returns JSON-ready
numbers; :func:`format_comparison` lays them out for a terminal. ``riskwire compare``
(``clients/compare_cli.py``) and the shadow report (primary = champion, shadow =
challenger) both use them.

Per model:

- **ROC AUC** and **PR AUC** (average precision), weighted when weights are given.
- **Recall at the serving FPR.** The serving false-positive rate is the share of
  legitimate rows the *champion* declines at its own decline threshold (the one in its
  package) on these rows: the false-decline rate production runs at today. Each model's
  recall is the largest it reaches at any threshold whose false-positive rate is within
  that budget, so both are judged at the champion's operating point. (For the champion
  this is at least its recall at its own threshold.)
- **Cost per row** = (cost_missed_fraud × missed frauds + cost_false_decline × false
  declines) / rows, at each model's *own* decline decisions (weighted: sums of weights).

Each metric and each difference challenger − champion has a 95% percentile interval from
a paired bootstrap: every replicate resamples the rows with replacement, the same rows for
both models, and recomputes everything, the serving FPR included. Replicates where a
metric is undefined (no fraud, or no legitimate row, drawn) are left out of its interval.

Verdict, from the intervals of the differences:

- ``challenger better``: the cost difference interval lies entirely below 0 *and* the
  ROC AUC difference interval does not lie entirely below 0;
- ``champion better``: the cost difference interval lies entirely above 0 and the ROC
  AUC difference interval does not lie entirely above 0;
- ``no significant difference`` otherwise (also when there is no interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .evaluate import average_precision, recall_at_fpr, roc_auc
from .ranking import RankedScores, rank_metrics, resample_draws

DEFAULT_COST_MISSED_FRAUD = 10.0
DEFAULT_COST_FALSE_DECLINE = 1.0
DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95
FEW_POSITIVES = 30  # below this many fraud rows the verdict carries a warning
ROLES = ("champion", "challenger")
METRICS = ("roc_auc", "pr_auc", "recall_at_serving_fpr", "cost")
METRIC_TITLES = {
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (AP)",
    "recall_at_serving_fpr": "recall @ serving FPR",
    "cost": "cost per row",
}
CHALLENGER_BETTER = "challenger better"
CHAMPION_BETTER = "champion better"
NO_DIFFERENCE = "no significant difference"
# Rounding slack when matching a false-positive budget computed by another summation.
_FPR_SLACK = 1e-9


def compare_models(
    labels: np.ndarray,
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    *,
    thresholds: Sequence[float] | None = None,
    declined: Sequence[np.ndarray] | None = None,
    cost_missed_fraud: float = DEFAULT_COST_MISSED_FRAUD,
    cost_false_decline: float = DEFAULT_COST_FALSE_DECLINE,
    weights: np.ndarray | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare two models on the same rows; see the module docstring.

    Decline decisions come from ``thresholds`` (champion's, challenger's: declined when
    score >= threshold) or directly from ``declined`` (two boolean arrays), exactly one of
    the two. ``weights`` are non-negative sample weights. Returns plain JSON types (NaN
    as None).
    """
    y = _labels(labels)
    scores = tuple(
        _scores(s, len(y), role)
        for s, role in zip((champion_scores, challenger_scores), ROLES, strict=True)
    )
    flags = _declines(scores, thresholds, declined)
    w = _weights(weights, len(y))
    costs = (
        _cost(cost_missed_fraud, "cost_missed_fraud"),
        _cost(cost_false_decline, "cost_false_decline"),
    )
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    point, details, serving_fpr = _point(y, scores, flags, w, costs)
    boot = _bootstrap(y, scores, flags, w, costs, n_boot, seed)
    result: dict[str, Any] = {
        "rows": len(y),
        "positives": int(y.sum()),
        "negatives": int(len(y) - y.sum()),
        "weighted": w is not None,
        "total_weight": float(len(y) if w is None else w.sum()),
        "positive_weight": float(y.sum() if w is None else w[y].sum()),
        "costs": {"missed_fraud": costs[0], "false_decline": costs[1]},
        "serving_fpr": serving_fpr,
        "bootstrap": {"resamples": n_boot, "seed": seed, "confidence": CONFIDENCE},
    }
    for i, role in enumerate(ROLES):
        entry: dict[str, Any] = {}
        if thresholds is not None:
            entry["decline_threshold"] = float(thresholds[i])
        for k, metric in enumerate(METRICS):
            entry[metric] = point[i][k]
            entry[f"{metric}_ci"] = _interval(boot[i, k])
        result[role] = {**entry, **details[i]}
    difference: dict[str, Any] = {}
    for k, metric in enumerate(METRICS):
        difference[metric] = point[1][k] - point[0][k]
        difference[f"{metric}_ci"] = _interval(boot[1, k] - boot[0, k])
    result["difference"] = difference
    result["verdict"], result["verdict_text"] = verdict(difference, positives=result["positives"])
    return _plain(result)


def verdict(difference: dict[str, Any], *, positives: int | None = None) -> tuple[str, str]:
    """(verdict, one-line explanation) from the challenger − champion differences."""
    cost, (cost_low, cost_high) = difference["cost"], difference["cost_ci"]
    auc, (auc_low, auc_high) = difference["roc_auc"], difference["roc_auc_ci"]
    shown = (
        f"cost per row {_signed(cost)} ({_range(cost_low, cost_high)}), "
        f"ROC AUC {_signed(auc)} ({_range(auc_low, auc_high)})"
    )
    if _below(cost_high) and not _below(auc_high):
        code = CHALLENGER_BETTER
    elif _above(cost_low) and not _above(auc_low):
        code = CHAMPION_BETTER
    else:
        code = NO_DIFFERENCE
    if _missing(cost_low) or _missing(cost_high):
        shown += ", no confidence interval"
    text = f"{code}: challenger − champion {shown}"
    if positives is not None and positives < FEW_POSITIVES:
        text += f" (only {positives} fraud rows: treat with care)"
    return code, text


def format_comparison(result: dict[str, Any], *, names: Sequence[str] = ROLES) -> str:
    """The comparison as a fixed-width table for a terminal.

    ``names`` label the champion and challenger in the header (for example ``fraud v3``).
    """
    weighted = f", weights sum {result['total_weight']:.6g}" if result["weighted"] else ""
    costs, boot = result["costs"], result["bootstrap"]
    lines = [
        f"champion {names[0]} vs challenger {names[1]}: {result['rows']} rows, "
        f"{result['positives']} fraud{weighted}",
        f"costs: missed fraud {costs['missed_fraud']:g}, false decline "
        f"{costs['false_decline']:g}; serving FPR {_num(result['serving_fpr'])} (the "
        "champion's decline threshold on these rows)",
        f"paired bootstrap: {boot['resamples']} resamples, seed {boot['seed']}, "
        f"{boot['confidence']:.0%} intervals in brackets",
        "",
        f"{'':<22} {'champion':<27} {'challenger':<27} challenger − champion",
    ]
    for metric in METRICS:
        cells = [
            _num(result[role][metric]) + " " + _bracket(result[role][f"{metric}_ci"])
            for role in ROLES
        ]
        d = result["difference"]
        change = _signed(d[metric]) + " " + _bracket(d[f"{metric}_ci"], signed=True)
        lines.append(f"{METRIC_TITLES[metric]:<22} {cells[0]:<27} {cells[1]:<27} {change}")
    if "decline_threshold" in result["champion"]:
        cut = [_num(result[role]["decline_threshold"], ".6f") for role in ROLES]
        lines.append(f"{'decline threshold':<22} {cut[0]:<27} {cut[1]}")
    at = [
        f"{_num(result[role]['recall_at_decline'])} / {_num(result[role]['fpr_at_decline'])}"
        for role in ROLES
    ]
    lines.append(f"{'recall / FPR @decline':<22} {at[0]:<27} {at[1]}")
    lines += ["", f"verdict: {result['verdict_text']}"]
    return "\n".join(lines)


# --- inputs -------------------------------------------------------------------------


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not len(y):
        raise ValueError("labels must be a non-empty 1-D array")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0 or 1")
        y = y == 1
    return y


def _scores(scores: np.ndarray, n: int, role: str) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.shape != (n,):
        raise ValueError(f"{role} scores have shape {s.shape}, expected ({n},) like the labels")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{role} scores must be finite")
    return s


def _declines(
    scores: tuple[np.ndarray, ...],
    thresholds: Sequence[float] | None,
    declined: Sequence[np.ndarray] | None,
) -> tuple[np.ndarray, ...]:
    if (thresholds is None) == (declined is None):
        raise ValueError("give exactly one of thresholds and declined")
    if thresholds is not None:
        return tuple(s >= float(t) for s, t in zip(scores, thresholds, strict=True))
    flags = tuple(np.asarray(d, bool) for d in declined)  # type: ignore[union-attr]
    if len(flags) != 2 or any(f.shape != scores[0].shape for f in flags):
        raise ValueError("declined must be two boolean arrays shaped like the labels")
    return flags


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights have shape {w.shape}, expected ({n},) like the labels")
    if not np.all(np.isfinite(w) & (w >= 0)) or not w.sum() > 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w


def _cost(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


# --- point estimates and the bootstrap ----------------------------------------------


def _point(
    y: np.ndarray,
    scores: tuple[np.ndarray, ...],
    flags: tuple[np.ndarray, ...],
    w: np.ndarray | None,
    costs: tuple[float, float],
) -> tuple[list[list[float]], list[dict[str, float]], float]:
    """Per model [roc_auc, pr_auc, recall_at_serving_fpr, cost], decision details, and the
    serving FPR."""
    row_w = np.ones(len(y)) if w is None else w
    total = float(row_w.sum())
    positive_w = float(row_w[y].sum())
    negative_w = float(row_w[~y].sum())
    missed = [float(row_w[y & ~f].sum()) for f in flags]
    false_declines = [float(row_w[~y & f].sum()) for f in flags]
    serving_fpr = false_declines[0] / negative_w if negative_w > 0 else math.nan
    both = positive_w > 0 and negative_w > 0
    point, details = [], []
    for i, s in enumerate(scores):
        point.append(
            [
                roc_auc(y, s, w) if both else math.nan,
                average_precision(y, s, w) if positive_w > 0 else math.nan,
                recall_at_fpr(y, s, serving_fpr * (1 + _FPR_SLACK), w) if both else math.nan,
                (costs[0] * missed[i] + costs[1] * false_declines[i]) / total,
            ]
        )
        details.append(
            {
                "missed_frauds": missed[i],
                "false_declines": false_declines[i],
                "recall_at_decline": 1 - missed[i] / positive_w if positive_w > 0 else math.nan,
                "fpr_at_decline": false_declines[i] / negative_w if negative_w > 0 else math.nan,
            }
        )
    return point, details, serving_fpr


def _bootstrap(
    y: np.ndarray,
    scores: tuple[np.ndarray, ...],
    flags: tuple[np.ndarray, ...],
    w: np.ndarray | None,
    costs: tuple[float, float],
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Metrics per (model, metric, replicate) over paired resamples of the rows.

    Each row falls in one of 8 cells (label × champion declines × challenger declines);
    one weighted bincount of the drawn rows' cells per replicate gives every count the
    decisions need, and :class:`RankedScores` gives the ranking metrics without sorting
    again.
    """
    out = np.full((2, len(METRICS), n_boot), math.nan)
    ranked = [RankedScores(s, y) for s in scores]
    cells = y.astype(np.int64) + 2 * flags[0] + 4 * flags[1]
    for start, draws in resample_draws(len(y), n_boot, seed):
        b = len(draws)
        drawn_w = None if w is None else w[draws].reshape(-1)
        keys = (cells[draws] + 8 * np.arange(b, dtype=np.int64)[:, None]).reshape(-1)
        counts = np.bincount(keys, weights=drawn_w, minlength=8 * b).reshape(b, 2, 2, 2)
        # counts[b, challenger declines, champion declines, fraud]
        total = counts.sum(axis=(1, 2, 3))
        positives = counts[..., 1].sum(axis=(1, 2))
        negatives = total - positives
        missed = (counts[:, :, 0, 1].sum(axis=1), counts[:, 0, :, 1].sum(axis=1))
        false_declines = (counts[:, :, 1, 0].sum(axis=1), counts[:, 1, :, 0].sum(axis=1))
        block = slice(start, start + b)
        for i, model in enumerate(ranked):
            gp, gn = model.resampled_sums(draws, w)
            roc, ap, recall = rank_metrics(gp, gn, false_declines[0])
            recall[negatives <= 0] = math.nan
            out[i, 0, block], out[i, 1, block], out[i, 2, block] = roc, ap, recall
            with np.errstate(invalid="ignore", divide="ignore"):  # all drawn weights 0
                out[i, 3, block] = (costs[0] * missed[i] + costs[1] * false_declines[i]) / total
    return out


# --- output -------------------------------------------------------------------------


def _interval(values: np.ndarray) -> list[float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [math.nan, math.nan]
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _plain(value: Any) -> Any:
    """Plain JSON types: numpy → Python, NaN/inf → None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _below(value: float | None) -> bool:
    return not _missing(value) and value < 0  # type: ignore[operator]


def _above(value: float | None) -> bool:
    return not _missing(value) and value > 0  # type: ignore[operator]


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if _missing(value) else format(value, spec)


def _signed(value: float | None) -> str:
    return _num(value, "+.4f")


def _range(low: float | None, high: float | None) -> str:
    if _missing(low) or _missing(high):
        return f"{CONFIDENCE:.0%} CI n/a"
    return f"{CONFIDENCE:.0%} CI {low:+.4f} to {high:+.4f}"


def _bracket(interval: Sequence[float | None], *, signed: bool = False) -> str:
    low, high = interval
    if _missing(low) or _missing(high):
        return ""
    spec = "+.4f" if signed else ".4f"
    return f"[{format(low, spec)}, {format(high, spec)}]"
