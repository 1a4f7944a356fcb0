"""Ranking metrics under row weights, and the paired bootstrap behind every confidence interval.

ROC AUC, average precision and recall at a false-positive budget are computed with numpy
from one sort per model. Each is a sum over groups of tied scores, so a bootstrap
replicate is the same sums with per-row resampling counts (times the row weights) as
weights: no re-sorting. Ties count one half (ROC) and share a threshold (AP), which is
what scikit-learn does. Used by the champion/challenger comparison
(:mod:`riskwire.pipeline.compare`) and the shadow report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

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
        return group_metrics(*self.group_sums(weights))

    def resampled_sums(
        self, draws: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positives and negatives per group of each row of ``draws`` (row indices, with
        repeats), each drawn row counting its weight (default 1)."""
        b = len(draws)
        keys = self.keys[draws] + (np.arange(b, dtype=np.int64) * 2 * self.groups)[:, None]
        drawn = None if weights is None else weights[draws].reshape(-1)
        counts = np.bincount(keys.reshape(-1), weights=drawn, minlength=b * 2 * self.groups)
        counts = counts.reshape(b, 2, self.groups).astype(np.float64, copy=False)
        return counts[:, 1], counts[:, 0]

    def resampled_metrics(
        self, draws: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ROC AUC, average precision) of each row of ``draws`` (row indices, with repeats)."""
        if not self.groups:
            return _nan_metrics(len(draws))
        return group_metrics(*self.resampled_sums(draws, weights))

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


def group_metrics(gp: np.ndarray, gn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and AP from positives/negatives per group (rows × groups, ascending score)."""
    roc, ap, _ = rank_metrics(gp, gn)
    return roc, ap


def rank_metrics(
    gp: np.ndarray, gn: np.ndarray, fp_limit: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC AUC, AP and recall within a false-positive budget, per row of group sums.

    ``gp``/``gn`` are positives/negatives per group (rows × groups, ascending score), as
    :meth:`RankedScores.group_sums` returns them. ROC AUC = Σ_g gp·(negatives below g +
    gn/2) / (P·N); AP = Σ_g gp/P · precision at the threshold of group g. The recall is
    the largest reachable while the (weighted) false positives stay <= ``fp_limit`` (one
    per row; all NaN when not given): flagging groups from the top down, true and false
    positives only grow, so the best threshold is the lowest within the budget; a
    relative slack of 1e-9 absorbs summation rounding. Written with in-place steps:
    bootstraps call it on replicates × groups arrays.
    """
    rows, groups = gp.shape
    if not groups:
        return _nan_metrics(rows) + (np.full(rows, math.nan),)
    cum_p = np.cumsum(gp, axis=1)
    cum_n = np.cumsum(gn, axis=1)
    total_p, total_n = cum_p[:, -1].copy(), cum_n[:, -1].copy()
    roc = np.einsum("ij,ij->i", gp, cum_n) - 0.5 * np.einsum("ij,ij->i", gp, gn)
    tp = np.subtract(total_p[:, None], cum_p, out=cum_p)  # positives scored >= group
    tp += gp
    flagged = np.subtract(total_n[:, None], cum_n, out=cum_n)  # negatives scored >= group
    flagged += gn
    recall = np.full(rows, math.nan)
    if fp_limit is not None:
        limit = np.asarray(fp_limit, np.float64).reshape(-1, 1)
        within = np.count_nonzero(flagged <= limit + 1e-9 * np.abs(limit), axis=1)
        lowest = np.minimum(groups - within, groups - 1)  # lowest group within the budget
        recall = tp[np.arange(rows), lowest] * (within > 0)
    flagged += tp
    np.maximum(flagged, np.finfo(np.float64).tiny, out=flagged)  # 0 only where gp is 0
    ap = np.einsum("ij,ij->i", gp, np.divide(tp, flagged, out=tp))
    with np.errstate(invalid="ignore", divide="ignore"):
        roc /= total_p * total_n
        ap /= total_p
        recall /= total_p
    roc[(total_p == 0) | (total_n == 0)] = math.nan
    ap[total_p == 0] = math.nan
    recall[total_p == 0] = math.nan
    return roc, ap, recall


def resample_draws(n: int, replicates: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first replicate, row indices) blocks of a seeded bootstrap: ``replicates`` rows of
    ``n`` indices drawn with replacement, at most :data:`BOOTSTRAP_CELLS` at a time. Every
    caller with the same (n, replicates, seed) gets the same resamples."""
    if not n or replicates <= 0:
        return
    rng = np.random.default_rng(seed)
    step = max(1, min(replicates, BOOTSTRAP_CELLS // n))
    for start in range(0, replicates, step):
        yield start, rng.integers(0, n, size=(min(step, replicates - start), n))


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
    ranked = [RankedScores(scores, labels) for scores in score_sets]
    out = np.full((len(ranked), 2, max(replicates, 0)), math.nan)
    for start, draws in resample_draws(len(labels), replicates, seed):
        b = len(draws)
        for i, model in enumerate(ranked):
            roc, ap = model.resampled_metrics(draws)
            out[i, 0, start : start + b] = roc
            out[i, 1, start : start + b] = ap
    return out
