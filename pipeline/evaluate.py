"""Evaluation metrics for a binary fraud model, in plain numpy (no scikit-learn at runtime).

Every ranking metric takes optional non-negative row ``weights`` (sample weights): a row
of weight 2 counts exactly as two copies of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (descending), ties merged."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order].astype(np.float64)
    distinct = np.flatnonzero(np.diff(sorted_scores)) if len(scores) > 1 else np.array([], int)
    ends = np.r_[distinct, len(scores) - 1]
    if weights is None:
        true_pos = np.cumsum(sorted_labels)[ends]
        false_pos = (ends + 1) - true_pos
    else:
        sorted_weights = np.asarray(weights, np.float64)[order]
        true_pos = np.cumsum(sorted_weights * sorted_labels)[ends]
        false_pos = np.cumsum(sorted_weights)[ends] - true_pos
    positives, negatives = true_pos[-1], false_pos[-1]
    tpr = np.r_[0.0, true_pos / positives] if positives else np.zeros(len(ends) + 1)
    fpr = np.r_[0.0, false_pos / negatives] if negatives else np.zeros(len(ends) + 1)
    return fpr, tpr, np.r_[np.inf, sorted_scores[ends]]


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (trapezoids; ties count half)."""
    fpr, tpr, _ = roc_curve(labels, scores, weights)
    return float(np.trapezoid(tpr, fpr))


def average_precision(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """PR AUC as average precision (step-wise, as scikit-learn computes it)."""
    fpr, tpr, _ = roc_curve(labels, scores, weights)
    if weights is None:
        positives = float(np.sum(labels))
        negatives = len(labels) - positives
    else:
        positives = float(np.sum(weights * labels))
        negatives = float(np.sum(weights)) - positives
    if positives == 0:
        return float("nan")
    true_pos = tpr[1:] * positives
    predicted = true_pos + fpr[1:] * negatives
    # zero-weight rows can make a leading group empty: it adds no recall, so no precision
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    return float(np.sum(np.diff(tpr) * precision))


def recall_at_fpr(
    labels: np.ndarray, scores: np.ndarray, max_fpr: float, weights: np.ndarray | None = None
) -> float:
    """Largest recall reachable while the false-positive rate stays <= max_fpr."""
    fpr, tpr, _ = roc_curve(labels, scores, weights)
    return float(np.max(tpr[fpr <= max_fpr]))


def brier_score(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean squared error of the probabilities."""
    return float(np.average((scores - labels) ** 2, weights=weights))


def calibration_table(labels: np.ndarray, scores: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Observed fraud rate against mean predicted probability per score-quantile bin."""
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
    table = []
    for b in range(max(len(edges) - 1, 1)):
        mask = which == b
        count = int(np.count_nonzero(mask))
        if not count:
            continue
        table.append(
            {
                "score_low": float(edges[b]),
                "score_high": float(edges[min(b + 1, len(edges) - 1)]),
                "count": count,
                "mean_predicted": float(np.mean(scores[mask])),
                "observed_rate": float(np.mean(labels[mask])),
            }
        )
    return table


def evaluate(labels: np.ndarray, scores: np.ndarray, *, calibration_bins: int = 10) -> dict:
    """All metrics of metrics.json for one split."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    return {
        "rows": len(labels),
        "fraud_rows": int(labels.sum()),
        "fraud_rate": float(labels.mean()),
        "roc_auc": roc_auc(labels, scores),
        "pr_auc": average_precision(labels, scores),
        "recall_at_1pct_fpr": recall_at_fpr(labels, scores, 0.01),
        "brier": brier_score(labels, scores),
        "calibration": calibration_table(labels, scores, calibration_bins),
    }
