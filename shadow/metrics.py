"""Ranking metrics for the shadow report; they live in :mod:`riskwire.pipeline.ranking`.

Kept as a re-export so ``riskwire.shadow.metrics`` imports keep working; the champion vs
challenger comparison (:mod:`riskwire.pipeline.compare`) uses the same code.
"""

from riskwire.pipeline.ranking import (
    BOOTSTRAP_CELLS,
    RankedScores,
    average_precision,
    bootstrap_metrics,
    roc_auc,
)

__all__ = ["BOOTSTRAP_CELLS", "RankedScores", "average_precision", "bootstrap_metrics", "roc_auc"]
