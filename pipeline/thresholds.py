"""Decision thresholds (approve / review / decline), chosen on the validation split."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import ThresholdConfig


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, config: ThresholdConfig
) -> dict[str, Any]:
    """Score cut-offs so that the given shares of legitimate traffic are reviewed/declined.

    The decision is ``decline`` when score >= decline, ``review`` when score >= review,
    otherwise ``approve``.
    """
    legit = np.sort(scores[labels == 0])
    if len(legit) == 0:
        raise ValueError("validation split has no legitimate rows to set thresholds on")

    def cut(fpr: float) -> float:
        # Just above the score of the (k+1)-th highest legitimate row: at most k lie above.
        allowed = int(np.floor(fpr * len(legit)))
        return float(np.nextafter(legit[len(legit) - allowed - 1], np.inf))

    review, decline = cut(config.review_fpr), cut(config.decline_fpr)
    decline = max(decline, review)
    return {
        "review": review,
        "decline": decline,
        "chosen_on": "validation",
        "review_fpr_target": config.review_fpr,
        "decline_fpr_target": config.decline_fpr,
        "validation": {
            "review_or_worse": decision_rates(labels, scores >= review),
            "decline": decision_rates(labels, scores >= decline),
        },
    }


def decision_rates(labels: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """Recall, false-positive rate and precision of the flagged rows."""
    positives = max(int(np.sum(labels == 1)), 1)
    negatives = max(int(np.sum(labels == 0)), 1)
    hits = int(np.sum(flagged & (labels == 1)))
    return {
        "recall": hits / positives,
        "false_positive_rate": int(np.sum(flagged & (labels == 0))) / negatives,
        "precision": hits / max(int(np.sum(flagged)), 1),
    }


def decide(score: float, thresholds: dict[str, Any]) -> str:
    """The decision for one probability."""
    if score >= thresholds["decline"]:
        return "decline"
    if score >= thresholds["review"]:
        return "review"
    return "approve"
