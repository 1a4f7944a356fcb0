"""Data profiles: what the model saw in training, for validation and drift later.

A numeric column's profile holds counts, missing rate, min/max, mean/std, quantiles and
a histogram on quantile bin edges. The histogram is meant for PSI: a value ``v`` falls
in bin ``numpy.searchsorted(bin_edges, v, side="left")`` (``len(bin_edges) + 1`` bins;
the outer bins are open-ended). A categorical column's profile holds the frequency of
each category (the most frequent ones, the rest summed as ``other_fraction``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
MAX_CATEGORIES = 200


def numeric_profile(values: np.ndarray, *, bins: int) -> dict[str, Any]:
    """Profile of a numeric column (NaN counts as missing, ±inf is kept out of stats)."""
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    missing = np.isnan(values)
    finite = values[np.isfinite(values)]
    profile: dict[str, Any] = {
        "kind": "numeric",
        "count": count,
        "missing_rate": float(missing.mean()) if count else 0.0,
        "infinite_count": int(np.count_nonzero(np.isinf(values))),
    }
    if len(finite) == 0:
        return profile | {"min": None, "max": None, "bin_edges": [], "bin_fractions": [1.0]}
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    present = values[~missing]
    counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=len(edges) + 1)
    quantiles = np.quantile(finite, QUANTILES)
    return profile | {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "quantiles": dict(zip(map(str, QUANTILES), quantiles.tolist(), strict=True)),
        "bin_edges": edges.tolist(),
        "bin_fractions": (counts / max(len(present), 1)).tolist(),
    }


def categorical_profile(values: np.ndarray) -> dict[str, Any]:
    """Profile of a categorical column (strings or integer codes)."""
    values = np.asarray(values)
    count = len(values)
    uniques, counts = np.unique(values.astype(str), return_counts=True)
    order = np.lexsort((uniques, -counts))  # by frequency, ties by name: deterministic
    top = order[:MAX_CATEGORIES]
    return {
        "kind": "categorical",
        "count": count,
        "missing_rate": 0.0,
        "distinct": len(uniques),
        "frequencies": {str(uniques[i]): float(counts[i] / count) for i in top},
        "other_fraction": float(counts[order[MAX_CATEGORIES:]].sum() / count) if count else 0.0,
    }


def identifier_profile(values: np.ndarray) -> dict[str, Any]:
    """Profile of an id column: counts only, never the ids themselves."""
    return {"kind": "identifier", "count": len(values), "distinct": len(np.unique(values))}
