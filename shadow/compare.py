"""Primary-vs-shadow comparison numbers, as mergeable accumulators.

Each worker keeps one :class:`PairStats` per (primary, shadow) pair; the supervisor
merges the workers' stats by adding them. The analyst report computes the same numbers
from the Parquet records with :meth:`PairStats.from_arrays`, so the online summary and
a recomputation from the files agree (up to floating-point summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DECISIONS = ("approve", "review", "decline")
DECISION_CODES = {name: code for code, name in enumerate(DECISIONS)}
# Score histogram bins, even in log-odds so the crowded low end is resolved:
# [0, σ(-10)), [σ(-10), σ(-9.5)), …, [σ(6), 1].
SCORE_EDGES = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-10.0, 6.0, 33))), [1.0]])
SCORE_BINS = len(SCORE_EDGES) - 1
PSI_EPSILON = 1e-4  # proportion used for an empty bin, so PSI stays finite


def score_histogram(probabilities: np.ndarray) -> np.ndarray:
    """Counts of ``probabilities`` in :data:`SCORE_EDGES` bins (1.0 falls in the last)."""
    index = np.searchsorted(SCORE_EDGES, probabilities, side="right") - 1
    return np.bincount(np.clip(index, 0, SCORE_BINS - 1), minlength=SCORE_BINS).astype(np.int64)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms over the same bins (0 = identical)."""
    e_total, a_total = float(expected.sum()), float(actual.sum())
    if not e_total or not a_total:
        return 0.0
    e = np.maximum(expected / e_total, PSI_EPSILON)
    a = np.maximum(actual / a_total, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def decision_codes(decisions: Any) -> np.ndarray:
    """approve/review/decline strings → 0/1/2 (anything else → -1)."""
    return np.array([DECISION_CODES.get(d, -1) for d in decisions], dtype=np.int64)


@dataclass
class PairStats:
    """Mergeable comparison of one primary/shadow pair."""

    mirrored: int = 0  # requests handed to the shadow scorer
    dropped: int = 0  # requests not mirrored because the queue was full
    failed: int = 0  # mirrored requests the shadow could not score
    scored: int = 0  # requests with both scores
    agree: int = 0  # scored requests with the same decision
    flips: np.ndarray = field(default_factory=lambda: np.zeros((3, 3), np.int64))
    sum_abs_delta: float = 0.0
    max_abs_delta: float = 0.0
    sum_p: float = 0.0
    sum_s: float = 0.0
    sum_pp: float = 0.0
    sum_ss: float = 0.0
    sum_ps: float = 0.0
    primary_hist: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))
    shadow_hist: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))

    def add_scored(
        self,
        primary: np.ndarray,
        shadow: np.ndarray,
        primary_codes: np.ndarray,
        shadow_codes: np.ndarray,
    ) -> None:
        """Account for requests both models scored (probabilities and decision codes)."""
        if not len(primary):
            return
        primary = np.asarray(primary, np.float64)
        shadow = np.asarray(shadow, np.float64)
        delta = np.abs(shadow - primary)
        self.scored += len(primary)
        self.agree += int(np.count_nonzero(primary_codes == shadow_codes))
        valid = (primary_codes >= 0) & (shadow_codes >= 0)
        np.add.at(self.flips, (primary_codes[valid], shadow_codes[valid]), 1)
        self.sum_abs_delta += float(delta.sum())
        self.max_abs_delta = max(self.max_abs_delta, float(delta.max()))
        self.sum_p += float(primary.sum())
        self.sum_s += float(shadow.sum())
        self.sum_pp += float(primary @ primary)
        self.sum_ss += float(shadow @ shadow)
        self.sum_ps += float(primary @ shadow)
        self.primary_hist += score_histogram(primary)
        self.shadow_hist += score_histogram(shadow)

    @classmethod
    def from_arrays(
        cls,
        primary: np.ndarray,
        shadow: np.ndarray,
        primary_decisions: Any,
        shadow_decisions: Any,
    ) -> PairStats:
        """Stats of recorded pairs; rows whose shadow probability is NaN count as failed."""
        primary = np.asarray(primary, np.float64)
        shadow = np.asarray(shadow, np.float64)
        ok = ~np.isnan(shadow)
        stats = cls(mirrored=len(primary), failed=int((~ok).sum()))
        stats.add_scored(
            primary[ok],
            shadow[ok],
            decision_codes(np.asarray(primary_decisions, dtype=object)[ok]),
            decision_codes(np.asarray(shadow_decisions, dtype=object)[ok]),
        )
        return stats

    def merge(self, other: PairStats) -> None:
        """Add ``other`` into this (another worker's stats of the same pair)."""
        for name in ("mirrored", "dropped", "failed", "scored", "agree"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("sum_abs_delta", "sum_p", "sum_s", "sum_pp", "sum_ss", "sum_ps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs_delta = max(self.max_abs_delta, other.max_abs_delta)
        self.flips = self.flips + other.flips
        self.primary_hist = self.primary_hist + other.primary_hist
        self.shadow_hist = self.shadow_hist + other.shadow_hist

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready raw accumulators (for the worker → supervisor hand-off)."""
        raw: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "mirrored", "dropped", "failed", "scored", "agree", "sum_abs_delta",
                "max_abs_delta", "sum_p", "sum_s", "sum_pp", "sum_ss", "sum_ps",
            )
        }  # fmt: skip
        raw["flips"] = self.flips.tolist()
        raw["primary_hist"] = self.primary_hist.tolist()
        raw["shadow_hist"] = self.shadow_hist.tolist()
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PairStats:
        """Inverse of :meth:`to_dict`."""
        values = dict(raw)
        values["flips"] = np.asarray(values["flips"], np.int64).reshape(3, 3)
        values["primary_hist"] = np.asarray(values["primary_hist"], np.int64)
        values["shadow_hist"] = np.asarray(values["shadow_hist"], np.int64)
        return cls(**values)

    def correlation(self) -> float:
        """Pearson correlation of the two scores (NaN with fewer than 2 pairs or no spread)."""
        n = self.scored
        if n < 2:
            return math.nan
        cov = self.sum_ps - self.sum_p * self.sum_s / n
        var_p = self.sum_pp - self.sum_p**2 / n
        var_s = self.sum_ss - self.sum_s**2 / n
        if var_p <= 0.0 or var_s <= 0.0:
            return math.nan
        return cov / math.sqrt(var_p * var_s)

    def summary(self) -> dict[str, Any]:
        """The numbers analysts look at (rates are fractions; NaN where undefined)."""
        n = self.scored
        flips = {
            f"{DECISIONS[i]}->{DECISIONS[j]}": int(self.flips[i, j])
            for i in range(3)
            for j in range(3)
            if i != j
        }
        return {
            "mirrored": self.mirrored,
            "dropped": self.dropped,
            "failed": self.failed,
            "scored": n,
            "agreement_rate": self.agree / n if n else math.nan,
            "flips": flips,
            "mean_abs_delta": self.sum_abs_delta / n if n else math.nan,
            "max_abs_delta": self.max_abs_delta if n else math.nan,
            "correlation": self.correlation(),
            "psi": psi(self.primary_hist, self.shadow_hist),
        }
