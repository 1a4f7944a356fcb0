"""Validation and drift-sketch kernels against plain-Python references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.kernels import validate
from riskwire.kernels.encoding import CHANNEL_CODES, COUNTRY_CODES, CURRENCY_CODES, encode_columns
from riskwire.kernels.schema import NUM_FEATURES
from riskwire.kernels.sketch import NUM_COLUMNS, Sketch, SketchLayout, window_counts

COUNTRIES = ["DE", "FR", "ZZ", "NG", "US", ""]
CURRENCIES = ["EUR", "USD", "XXX", "NGN"]
CHANNELS = ["pos", "ecommerce", "telepathy"]


@pytest.fixture(scope="module")
def package(built_model):
    from riskwire.pipeline.package import load_package

    return load_package(built_model.path)


def reference_mask(spec: validate.ValidationSpec, row: dict) -> int:
    """The checks written out in Python."""
    mask = 0
    if not (spec.amount_lo <= row["amount"] <= spec.amount_hi):
        mask |= validate.AMOUNT_RANGE
    if not 0 <= row["mcc"] <= 9999:
        mask |= validate.MCC_RANGE
    elif not spec.mcc_seen[row["mcc"]]:
        mask |= validate.MCC_UNSEEN
    for field, codes, table, bit in (
        ("country", COUNTRY_CODES, spec.country_seen, validate.COUNTRY_UNSEEN),
        ("card_country", COUNTRY_CODES, spec.country_seen, validate.CARD_COUNTRY_UNSEEN),
        ("currency", CURRENCY_CODES, spec.currency_seen, validate.CURRENCY_UNSEEN),
        ("channel", CHANNEL_CODES, spec.channel_seen, validate.CHANNEL_UNSEEN),
    ):
        code = codes.get(row[field], -1)
        if code < 0 or not table[code]:
            mask |= bit
    return mask


rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "amount": st.one_of(
                st.floats(0, 1e9), st.just(float("nan")), st.just(float("inf")), st.just(-1.0)
            ),
            "mcc": st.integers(-5, 12000),
            "country": st.sampled_from(COUNTRIES),
            "card_country": st.sampled_from(COUNTRIES),
            "currency": st.sampled_from(CURRENCIES),
            "channel": st.sampled_from(CHANNELS),
        }
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy)
def test_kernels_match_the_reference(package, rows) -> None:
    spec = validate.ValidationSpec.from_schema(package.schema, tolerance=0.1)
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    n = len(rows)
    tx = encode_columns(
        {
            **columns,
            "card_id": ["c"] * n,
            "merchant_id": ["m"] * n,
            "event_time": np.zeros(n, np.int64),
        }
    )
    expected = [reference_mask(spec, r) for r in rows]
    assert spec.rows(tx, np.array(columns["mcc"])).tolist() == expected
    singles = [
        spec.row(r["amount"], r["mcc"], int(tx.country[i]), int(tx.card_country[i]),
                 int(tx.currency[i]), int(tx.channel[i]))
        for i, r in enumerate(rows)
    ]  # fmt: skip
    assert singles == expected


def test_spec_widens_the_training_range(package) -> None:
    schema = json.loads(json.dumps(package.schema))
    lo, hi = next(c for c in schema["inputs"] if c["name"] == "amount")["training_range"]
    spec = validate.ValidationSpec.from_schema(schema, tolerance=0.5)
    assert spec.amount_lo == max(0.0, lo - 0.5 * (hi - lo))
    assert spec.amount_hi == hi + 0.5 * (hi - lo)
    assert validate.violations(validate.AMOUNT_RANGE | validate.CHANNEL_UNSEEN) == [
        validate.CHECKS[validate.AMOUNT_RANGE],
        validate.CHECKS[validate.CHANNEL_UNSEEN],
    ]


def reference_counts(layout: SketchLayout, values: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    counts = np.zeros(layout.total_slots, np.int64)
    counts[-2] += len(values)
    counts[-1] += int(flagged.sum())
    for c, spec in enumerate(layout.columns):
        start, end = layout.slot_offsets[c], layout.slot_offsets[c + 1]
        for v in values[:, c]:
            if np.isnan(v):
                counts[end - 1] += 1
            elif spec.kind == 0:
                counts[start + int(np.searchsorted(spec.edges, v, side="left"))] += 1
            else:
                code = int(v)
                slot = spec.lookup[code] if 0 <= code < len(spec.lookup) else end - start - 2
                counts[start + slot] += 1
    return counts


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 300), split=st.floats(0, 1))
def test_sketch_counts_match_the_reference_and_merge_by_addition(package, seed, rows, split):
    layout = SketchLayout(package.profile)
    rng = np.random.default_rng(seed)
    values = rng.normal(5, 50, size=(rows, NUM_COLUMNS))
    values[:, 7] = rng.integers(-1, 6, rows)  # channel codes (incl. unknown)
    values[:, NUM_FEATURES] = rng.integers(-1, 60, rows)  # issuer country codes
    values[rng.random((rows, NUM_COLUMNS)) < 0.05] = np.nan
    flagged = rng.random(rows) < 0.1
    whole = np.zeros(layout.total_slots, np.int64)
    layout.add(values, flagged, whole)
    np.testing.assert_array_equal(whole, reference_counts(layout, values, flagged))
    cut = int(split * rows)  # two workers' streams, merged by adding their sketches
    first, second = (np.zeros(layout.total_slots, np.int64) for _ in range(2))
    layout.add(values[:cut], flagged[:cut], first)
    layout.add(values[cut:], flagged[cut:], second)
    np.testing.assert_array_equal(first + second, whole)


def test_time_buckets_slide_and_wrap(package) -> None:
    sketch = Sketch(SketchLayout(package.profile), bucket_s=10, buckets=7)
    features = np.ones(NUM_FEATURES)
    for t in (0, 5, 15, 25, 65):  # buckets 0, 0, 1, 2, 6
        sketch.add_one(features, 55, 0.01, False, now_s=t)

    def requests(now: float, seconds: float) -> int:
        return int(sketch.window(now, seconds)[-2])

    assert [requests(65, w) for w in (10, 50, 60, 70)] == [1, 2, 3, 5]
    sketch.add_one(features, 55, 0.01, True, now_s=75)  # bucket 7 reuses bucket 0's row
    assert requests(75, 1000) == 4
    total = window_counts(sketch.counts, sketch.bucket_ids, 10, 75, 1000)
    assert int(total[-1]) == 1  # the flagged one


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 200))
def test_buffered_single_rows_count_as_the_reference(package, seed, rows) -> None:
    """add_one buffers up to PENDING_ROWS rows per bucket; every window sees them all."""
    layout = SketchLayout(package.profile)
    sketch = Sketch(layout, bucket_s=10, buckets=50)
    rng = np.random.default_rng(seed)
    values = rng.normal(5, 50, size=(rows, NUM_COLUMNS))
    values[:, NUM_FEATURES] = rng.integers(0, 60, rows)
    flagged = rng.random(rows) < 0.1
    times = np.sort(rng.uniform(0, 300, rows))
    for row, flag, moment in zip(values, flagged, times, strict=True):
        sketch.add_one(row[:NUM_FEATURES], int(row[NUM_FEATURES]), row[-1], bool(flag), moment)
    np.testing.assert_array_equal(
        sketch.window(300, 400), reference_counts(layout, values, flagged)
    )
    late = times >= 200  # buckets 20..29: the last 100 s
    np.testing.assert_array_equal(
        sketch.window(299, 100), reference_counts(layout, values[late], flagged[late])
    )
