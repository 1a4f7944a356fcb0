"""Mergeable streaming sketches of live traffic on the training profile's bins.

A :class:`SketchLayout`, compiled from a package's ``profile.json``, lists the monitored
columns: the 23 model features, the issuer country (the one raw input that is not a
feature) and the output score. Each column owns a run of counter slots in one flat
vector: numeric columns one slot per profile histogram bin (bin ``searchsorted(edges,
v, "left")``, as the profile counted) plus a missing slot; categorical columns one slot
per profiled category, one for every other value and one for missing. Two more slots
count requests and flagged requests.

Counts live in time buckets (a ring of ``buckets`` rows of ``bucket_s`` seconds each),
so a sliding window is the sum of its last rows. Sketches merge by adding counts of
aligned buckets: the sketch of two workers' streams equals the sum of their sketches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numba import njit

from .encoding import COUNTRY_CODES
from .schema import FEATURE_NAMES, NUM_FEATURES

NUMERIC: Final = 0
CATEGORICAL: Final = 1
CARD_COUNTRY: Final = "card_country"
SCORE: Final = "score"
# monitored value columns: the features, then the issuer country code, then the score
COLUMNS: Final = (*FEATURE_NAMES, CARD_COUNTRY, SCORE)
NUM_COLUMNS: Final = len(COLUMNS)
REQUESTS_SLOT: Final = -2  # from the end of a bucket row
FLAGGED_SLOT: Final = -1


@njit(cache=True, nogil=True)
def sketch_add(
    values: np.ndarray,  # (rows, NUM_COLUMNS) float64; NaN = missing
    flagged: np.ndarray,  # (rows,) bool
    kinds: np.ndarray,
    slot_offsets: np.ndarray,
    edges: np.ndarray,
    edge_offsets: np.ndarray,
    lookup: np.ndarray,
    lookup_offsets: np.ndarray,
    counts: np.ndarray,  # one bucket row (total slots,) int64
) -> None:
    """Count ``values`` into one bucket row."""
    total = counts.shape[0]
    for i in range(values.shape[0]):
        counts[total - 2] += 1
        if flagged[i]:
            counts[total - 1] += 1
        for c in range(values.shape[1]):
            start, end = slot_offsets[c], slot_offsets[c + 1]
            v = values[i, c]
            if np.isnan(v):
                counts[end - 1] += 1  # the missing slot
            elif kinds[c] == NUMERIC:
                lo, hi = edge_offsets[c], edge_offsets[c + 1]
                # searchsorted(edges, v, side="left") over this column's edges
                k = lo
                while k < hi and edges[k] < v:
                    k += 1
                counts[start + k - lo] += 1
            else:
                lo, hi = lookup_offsets[c], lookup_offsets[c + 1]
                code = int(v)
                if 0 <= code < hi - lo:
                    counts[start + lookup[lo + code]] += 1
                else:
                    counts[end - 2] += 1  # "other"


@dataclass(frozen=True)
class ColumnSpec:
    """One monitored column: its kind, bins or categories and the training fractions."""

    name: str
    kind: int
    slots: int  # counter slots, including "other" (categorical) and missing
    edges: np.ndarray  # numeric bin edges
    categories: tuple[str, ...]  # categorical: profiled categories, slot order
    lookup: np.ndarray  # categorical: code → slot (len(categories) = "other")
    expected: np.ndarray  # training fractions over the non-missing slots
    expected_missing: float


def _column_spec(name: str, profile: Mapping[str, Any], codes: Mapping[str, int] | None):
    if profile.get("kind") == "categorical":
        categories = tuple(profile.get("frequencies", {}))
        code_of = (lambda c: codes.get(c, -1)) if codes is not None else (lambda c: int(c))
        known = [code_of(c) for c in categories]
        size = max([k for k in known if k >= 0], default=-1) + 1
        lookup = np.full(max(size, 1), len(categories), dtype=np.int64)
        for slot, code in enumerate(known):
            if code >= 0:
                lookup[code] = slot
        expected = np.array(
            [*profile["frequencies"].values(), profile.get("other_fraction", 0.0)], np.float64
        )
        return ColumnSpec(
            name, CATEGORICAL, len(categories) + 2, np.zeros(0), categories, lookup,
            expected, float(profile.get("missing_rate", 0.0)),
        )  # fmt: skip
    edges = np.asarray(profile.get("bin_edges", []), dtype=np.float64)
    fractions = np.asarray(profile.get("bin_fractions", [1.0]), dtype=np.float64)
    if len(fractions) != len(edges) + 1:
        fractions = np.full(len(edges) + 1, 1.0 / (len(edges) + 1))
    return ColumnSpec(
        name, NUMERIC, len(edges) + 2, edges, (), np.zeros(1, np.int64), fractions,
        float(profile.get("missing_rate", 0.0)),
    )  # fmt: skip


class SketchLayout:
    """The monitored columns of one model version and their slots."""

    def __init__(self, profile: Mapping[str, Any]) -> None:
        specs = [_column_spec(n, profile["features"].get(n, {}), None) for n in FEATURE_NAMES]
        specs.append(
            _column_spec(CARD_COUNTRY, profile["inputs"].get(CARD_COUNTRY, {}), COUNTRY_CODES)
        )
        specs.append(_column_spec(SCORE, profile.get("score", {}), None))
        self.columns: tuple[ColumnSpec, ...] = tuple(specs)
        slots = np.array([c.slots for c in specs], dtype=np.int64)
        self.slot_offsets = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
        self.total_slots = int(self.slot_offsets[-1]) + 2  # + requests, flagged
        self.kinds = np.array([c.kind for c in specs], dtype=np.int64)
        self.edges = np.concatenate([c.edges for c in specs]).astype(np.float64)
        self.edge_offsets = np.concatenate([[0], np.cumsum([len(c.edges) for c in specs])]).astype(
            np.int64
        )
        lookups = [c.lookup if c.kind == CATEGORICAL else np.zeros(0, np.int64) for c in specs]
        self.lookup = np.concatenate(lookups).astype(np.int64)
        self.lookup_offsets = np.concatenate([[0], np.cumsum([len(x) for x in lookups])]).astype(
            np.int64
        )

    def add(self, values: np.ndarray, flagged: np.ndarray, counts: np.ndarray) -> None:
        """Count rows of ``values`` (rows, NUM_COLUMNS) into the bucket row ``counts``."""
        sketch_add(
            values, flagged, self.kinds, self.slot_offsets, self.edges, self.edge_offsets,
            self.lookup, self.lookup_offsets, counts,
        )  # fmt: skip

    def warmup(self) -> None:
        """Compile (or load from cache) and run the counting kernel on scratch counts."""
        scratch = np.zeros(self.total_slots, dtype=np.int64)
        self.add(np.zeros((1, NUM_COLUMNS)), np.zeros(1, dtype=np.bool_), scratch)

    def column_counts(self, counts: np.ndarray, index: int) -> np.ndarray:
        """The slots of column ``index`` in a summed bucket row."""
        return counts[self.slot_offsets[index] : self.slot_offsets[index + 1]]


PENDING_ROWS = 64  # single requests counted together (one kernel call per 64)


class Sketch:
    """Time-bucketed counts of one model version in one worker (not thread-safe: the
    caller holds a lock or owns it).

    Single requests are buffered and counted together, 64 at a time, when their time
    bucket changes, or before a window is read: a kernel call per request cost more
    than the counting (readers always see every request added before)."""

    def __init__(self, layout: SketchLayout, *, bucket_s: int, buckets: int) -> None:
        self.layout = layout
        self.bucket_s = bucket_s
        self.counts = np.zeros((buckets, layout.total_slots), dtype=np.int64)
        self.bucket_ids = np.full(buckets, -1, dtype=np.int64)  # absolute bucket numbers
        self._pending = np.zeros((PENDING_ROWS, NUM_COLUMNS), dtype=np.float64)
        self._pending_flags = np.zeros(PENDING_ROWS, dtype=np.bool_)
        self._pending_rows = 0
        self._pending_bucket = -1

    def _row(self, bucket: int) -> np.ndarray:
        index = bucket % len(self.bucket_ids)
        if self.bucket_ids[index] != bucket:
            self.counts[index] = 0
            self.bucket_ids[index] = bucket
        return self.counts[index]

    def add_one(
        self, features: np.ndarray, card_country: int, score: float, flagged: bool, now_s: float
    ) -> None:
        """Count one scored request."""
        bucket = int(now_s // self.bucket_s)
        rows = self._pending_rows
        if rows and bucket != self._pending_bucket:
            self._count_pending()
            rows = 0
        values = self._pending
        values[rows, :NUM_FEATURES] = features
        values[rows, NUM_FEATURES] = card_country if card_country >= 0 else -1.0
        values[rows, NUM_FEATURES + 1] = score
        self._pending_flags[rows] = flagged
        self._pending_rows = rows + 1
        self._pending_bucket = bucket
        if rows + 1 == PENDING_ROWS:
            self._count_pending()

    def _count_pending(self) -> None:
        rows = self._pending_rows
        if rows:
            self._pending_rows = 0
            self.layout.add(
                self._pending[:rows], self._pending_flags[:rows], self._row(self._pending_bucket)
            )

    def add_many(
        self,
        features: np.ndarray,
        card_country: np.ndarray,
        scores: np.ndarray,
        flagged: np.ndarray,
        now_s: float,
    ) -> None:
        """Count a batch of scored requests."""
        values = np.empty((len(scores), NUM_COLUMNS), dtype=np.float64)
        values[:, :NUM_FEATURES] = features
        values[:, NUM_FEATURES] = card_country
        values[:, NUM_FEATURES + 1] = scores
        bucket = int(now_s // self.bucket_s)
        self.layout.add(values, np.asarray(flagged, dtype=np.bool_), self._row(bucket))

    def window(self, now_s: float, seconds: float) -> np.ndarray:
        """Counts summed over the buckets of the last ``seconds`` (current one included)."""
        self._count_pending()
        return window_counts(self.counts, self.bucket_ids, self.bucket_s, now_s, seconds)


def window_counts(
    counts: np.ndarray, bucket_ids: np.ndarray, bucket_s: int, now_s: float, seconds: float
) -> np.ndarray:
    """Sum of the bucket rows whose bucket lies in the window ending now."""
    current = int(now_s // bucket_s)
    first = current - max(1, int(np.ceil(seconds / bucket_s))) + 1
    inside = (bucket_ids >= first) & (bucket_ids <= current)
    return counts[inside].sum(axis=0)
