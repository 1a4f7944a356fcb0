"""Ranking metrics for the shadow report: ROC AUC, average precision and a paired bootstrap.

Both are computed with numpy from one sort per model. Each is a sum over groups of tied
scores, so a bootstrap replicate is the same sums with per-row resampling counts as
weights (no re-sorting). Ties count one half (ROC) and share a threshold (AP), which is
what scikit-learn does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_CELLS = 4_000_000  # replicates × rows resampled at once (memory bound)


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
