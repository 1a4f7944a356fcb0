"""Feature kernel: online == offline, a plain-Python reference, hand-checked values."""

from __future__ import annotations

import math
import statistics
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import (
    compute_features,
    compute_features_offline,
    peek_features,
    warmup,
)
from riskwire.kernels.schema import FEATURE_NAMES, NUM_FEATURES
from riskwire.kernels.state import CardStateTable

COL = {name: j for j, name in enumerate(FEATURE_NAMES)}
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def make_tx(rows: list[dict]) -> TransactionArrays:
    """A batch from dicts; fields left out get harmless defaults."""
    defaults = dict(card=1, merchant=1, t=T0, amount=10.0, mcc=5411, country=0, card_country=0)
    rows = [{**defaults, "currency": 0, "channel": 0, **r} for r in rows]
    return TransactionArrays(
        card_key=np.array([r["card"] for r in rows], dtype=np.uint64),
        merchant_key=np.array([r["merchant"] for r in rows], dtype=np.uint64),
        event_time_ms=np.array([r["t"] for r in rows], dtype=np.int64),
        amount=np.array([r["amount"] for r in rows], dtype=np.float64),
        mcc=np.array([r["mcc"] for r in rows], dtype=np.int32),
        country=np.array([r["country"] for r in rows], dtype=np.int32),
        card_country=np.array([r["card_country"] for r in rows], dtype=np.int32),
        currency=np.array([r["currency"] for r in rows], dtype=np.int32),
        channel=np.array([r["channel"] for r in rows], dtype=np.int32),
    )


def random_stream(seed: int, n: int = 3000, n_cards: int = 300) -> TransactionArrays:
    """Time-ordered stream with popular cards, bursts, favourite merchants, foreign
    countries, unknown codes, zero/NaN amounts and a few late arrivals."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 2**63, n_cards, dtype=np.uint64)
    popularity = 1.0 / np.arange(1, n_cards + 1)
    card = rng.choice(n_cards, n, p=popularity / popularity.sum())
    burst = rng.random(n) < 0.3
    for i in range(1, n):
        if burst[i]:
            card[i] = card[i - 1]
    step = rng.exponential(60_000, n).astype(np.int64)
    step[rng.random(n) < 0.1] = 0
    step[rng.random(n) < 0.02] = DAY_MS * 3
    t = T0 + np.cumsum(step)
    late = rng.random(n) < 0.03
    t[late] -= rng.integers(1, HOUR_MS, late.sum())
    favourites = rng.integers(1, 2000, (n_cards, 3)).astype(np.uint64)
    merchant = np.where(
        rng.random(n) < 0.7,
        favourites[card, rng.integers(0, 3, n)],
        rng.integers(1, 2000, n).astype(np.uint64),
    )
    amount = rng.lognormal(3.0, 1.2, n)
    amount[rng.random(n) < 0.02] = 0.0
    amount[rng.random(n) < 0.005] = np.nan
    home = rng.integers(-1, 30, n_cards).astype(np.int32)
    country = np.where(rng.random(n) < 0.8, home[card], rng.integers(-1, 30, n))
    return TransactionArrays(
        card_key=keys[card],
        merchant_key=merchant.astype(np.uint64),
        event_time_ms=t.astype(np.int64),
        amount=amount,
        mcc=rng.integers(-1, 10_000, n).astype(np.int32),
        country=country.astype(np.int32),
        card_country=home[card],
        currency=rng.integers(-1, 43, n).astype(np.int32),
        channel=rng.integers(-1, 5, n).astype(np.int32),
    )


def reference_features(tx: TransactionArrays) -> np.ndarray:
    """Every feature straight from its definition, with dicts, lists and math."""
    out = np.empty((len(tx), NUM_FEATURES))
    history: dict[int, list] = {}  # card -> [L, [(T_j, amount_j)], merchants, countries]
    welford: dict[int, tuple[int, float, float]] = {}  # card -> (n, mean, M2)
    for i in range(len(tx)):
        t, a = int(tx.event_time_ms[i]), float(tx.amount[i])
        card, merchant = int(tx.card_key[i]), int(tx.merchant_key[i])
        country, card_country = int(tx.country[i]), int(tx.card_country[i])
        hour = (t % DAY_MS) / HOUR_MS
        dow = (t // DAY_MS + 3) % 7
        row = {
            "amount": a,
            "log_amount": math.log1p(max(a, 0.0)) if not math.isnan(a) else math.nan,
            "hour_sin": math.sin(2 * math.pi * hour / 24),
            "hour_cos": math.cos(2 * math.pi * hour / 24),
            "dow_sin": math.sin(2 * math.pi * dow / 7),
            "dow_cos": math.cos(2 * math.pi * dow / 7),
            "is_foreign": float(country != card_country) if min(country, card_country) >= 0
            else math.nan,
            "channel": float(tx.channel[i]),
            "mcc": float(tx.mcc[i]),
            "country": float(country),
            "currency": float(tx.currency[i]),
        }  # fmt: skip
        last, prev, merchants, countries = history.setdefault(
            card, [t, [], deque(maxlen=16), deque(maxlen=8)]
        )
        now = max(t, last)
        for tau, label in ((HOUR_MS, "1h"), (DAY_MS, "24h"), (7 * DAY_MS, "7d")):
            weights = [(math.exp(-(now - tj) / tau), aj) for tj, aj in prev]
            row[f"card_count_{label}"] = math.fsum(w for w, _ in weights)
            row[f"card_amount_{label}"] = math.fsum(
                w * aj for w, aj in weights if math.isfinite(aj)
            )
        n, mean, m2 = welford.get(card, (0, 0.0, 0.0))
        std = math.sqrt(m2 / (n - 1)) if n >= 2 else 0.0
        row["secs_since_prev"] = (now - last) / 1000 if prev else math.nan
        row["amount_to_mean"] = a / mean if n and mean != 0 else math.nan
        row["amount_zscore"] = (a - mean) / std if std > 0 else math.nan
        row["is_new_merchant"] = float(merchant not in merchants)
        row["is_new_country"] = float(country not in countries)
        row["card_txn_count"] = float(len(prev))
        out[i] = [row[name] for name in FEATURE_NAMES]
        # update the card's history
        history[card][0] = now
        prev.append((now, a))
        merchants.append(merchant)
        countries.append(country)
        if math.isfinite(a):  # Welford, the documented definition of mean and std
            n += 1
            delta = a - mean
            mean += delta / n
            welford[card] = (n, mean, m2 + delta * (a - mean))
    return out


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within 1e-12 relative (1e-12 absolute near zero); NaN matches NaN only."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = np.isclose(got, want, rtol=1e-12, atol=1e-12) | np.isnan(want)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise AssertionError(
            f"row {i} {FEATURE_NAMES[j]}: kernel {got[i, j]!r}, ref {want[i, j]!r}"
        )


def test_online_matches_offline_bit_for_bit() -> None:
    tx = random_stream(seed=7)
    offline, table = compute_features_offline(tx)
    assert table.evictions == 0 and np.isnan(offline).any()

    online_table = CardStateTable.create(table.capacity)
    out = np.empty((1, NUM_FEATURES))
    online = np.empty_like(offline)
    for i in range(len(tx)):
        online[i] = compute_features(online_table, tx.take(slice(i, i + 1)), out)[0]
    assert np.array_equal(online, offline, equal_nan=True)

    chunked_table = CardStateTable.create(table.capacity)
    rng = np.random.default_rng(1)
    bounds = np.unique(np.r_[0, rng.integers(0, len(tx), 40), len(tx)])
    chunks = [tx.take(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    chunked = np.vstack([compute_features(chunked_table, chunk) for chunk in chunks])
    assert np.array_equal(chunked, offline, equal_nan=True)
    assert np.array_equal(chunked_table.stats, table.stats, equal_nan=True)


def test_kernel_matches_reference_on_random_stream() -> None:
    tx = random_stream(seed=11, n=2000, n_cards=100)
    assert_close(compute_features_offline(tx)[0], reference_features(tx))


_rows = st.lists(
    st.tuples(
        st.integers(1, 4),  # card key
        st.sampled_from([0, 0, 1, 999, 60_000, HOUR_MS, DAY_MS, 8 * DAY_MS, -1_000, -HOUR_MS]),
        st.one_of(
            st.sampled_from([0.0, 0.01, 1.0, 99.99, 1e4, math.nan, math.inf]),
            st.floats(0.0, 1e6),
        ),
        st.integers(1, 20),  # merchant key
        st.integers(-1, 9),  # country
        st.integers(-1, 2),  # card country
        st.integers(-1, 4),  # channel / mcc / currency code
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(_rows)
def test_kernel_matches_reference_hypothesis(rows: list[tuple]) -> None:
    t = T0 + np.cumsum([r[1] for r in rows])
    tx = make_tx(
        [
            dict(card=c, t=int(ti), amount=a, merchant=m, country=co, card_country=cc,
                 channel=code, mcc=code, currency=code)
            for (c, _, a, m, co, cc, code), ti in zip(rows, t, strict=True)
        ]
    )  # fmt: skip
    features, table = compute_features_offline(tx)
    assert_close(features, reference_features(tx))
    one_by_one = CardStateTable.create(table.capacity)
    online = np.vstack(
        [compute_features(one_by_one, tx.take(slice(i, i + 1))) for i in range(len(tx))]
    )
    assert np.array_equal(online, features, equal_nan=True)


def test_first_transaction() -> None:
    f = compute_features_offline(make_tx([dict(amount=25.0, merchant=9, country=3)]))[0][0]
    for name in ("card_count_1h", "card_count_24h", "card_count_7d", "card_amount_1h",
                 "card_amount_24h", "card_amount_7d", "card_txn_count"):  # fmt: skip
        assert f[COL[name]] == 0.0, name
    for name in ("secs_since_prev", "amount_to_mean", "amount_zscore"):
        assert math.isnan(f[COL[name]]), name
    assert f[COL["is_new_merchant"]] == 1.0 and f[COL["is_new_country"]] == 1.0
    assert f[COL["amount"]] == 25.0 and f[COL["log_amount"]] == math.log1p(25.0)


def test_decay_after_exactly_one_hour() -> None:
    tx = make_tx([dict(t=T0, amount=40.0), dict(t=T0 + HOUR_MS, amount=5.0)])
    f = compute_features_offline(tx)[0][1]
    assert f[COL["card_count_1h"]] == math.exp(-1.0)
    assert f[COL["card_amount_1h"]] == 40.0 * math.exp(-1.0)
    assert f[COL["card_count_24h"]] == pytest.approx(math.exp(-1 / 24), rel=1e-15)
    assert f[COL["card_count_7d"]] == pytest.approx(math.exp(-1 / 168), rel=1e-15)
    assert f[COL["secs_since_prev"]] == 3600.0
    assert f[COL["card_txn_count"]] == 1.0
    assert f[COL["is_new_merchant"]] == 0.0 and f[COL["is_new_country"]] == 0.0


def test_out_of_order_arrival_never_moves_the_clock_back() -> None:
    tx = make_tx([dict(t=T0), dict(t=T0 - HOUR_MS), dict(t=T0 + HOUR_MS)])
    f = compute_features_offline(tx)[0]
    assert f[1, COL["secs_since_prev"]] == 0.0 and f[1, COL["card_count_1h"]] == 1.0
    assert f[2, COL["secs_since_prev"]] == 3600.0
    assert f[2, COL["card_count_1h"]] == 2.0 * math.exp(-1.0)


def test_is_foreign_and_codes() -> None:
    rows = [
        dict(country=1, card_country=1),
        dict(country=1, card_country=2),
        dict(country=-1, card_country=2),
        dict(country=2, card_country=-1, mcc=-1, channel=-1),
    ]
    f = compute_features_offline(make_tx(rows))[0]
    assert f[0, COL["is_foreign"]] == 0.0 and f[1, COL["is_foreign"]] == 1.0
    assert np.isnan(f[2:, COL["is_foreign"]]).all()
    assert f[3, COL["mcc"]] == -1.0 and f[3, COL["channel"]] == -1.0 and f[0, COL["mcc"]] == 5411.0


@pytest.mark.parametrize(
    ("t", "hour", "dow"),
    [
        (T0 + 6 * HOUR_MS + 30 * 60_000, 6.5, 0),  # Monday 2024-01-01 06:30 UTC
        (0, 0.0, 3),  # Thursday 1970-01-01 00:00
        (-HOUR_MS, 23.0, 2),  # Wednesday 1969-12-31 23:00
        (1_720_000_000_000, 9 + 46 / 60 + 40 / 3600, 2),  # Wednesday 2024-07-03 09:46:40
    ],
)
def test_hour_and_day_of_week(t: int, hour: float, dow: int) -> None:
    f = compute_features_offline(make_tx([dict(t=t)]))[0][0]
    assert f[COL["hour_sin"]] == pytest.approx(math.sin(2 * math.pi * hour / 24), abs=1e-12)
    assert f[COL["hour_cos"]] == pytest.approx(math.cos(2 * math.pi * hour / 24), abs=1e-12)
    assert f[COL["dow_sin"]] == pytest.approx(math.sin(2 * math.pi * dow / 7), abs=1e-15)
    assert f[COL["dow_cos"]] == pytest.approx(math.cos(2 * math.pi * dow / 7), abs=1e-15)


def test_amount_statistics_and_bad_amounts() -> None:
    amounts = [10.0, math.nan, 20.0, -5.0, 40.0]
    f = compute_features_offline(
        make_tx([dict(t=T0 + i, amount=a) for i, a in enumerate(amounts)])
    )[0]
    assert np.isnan(f[1, COL["log_amount"]]) and f[3, COL["log_amount"]] == 0.0
    assert f[2, COL["amount_to_mean"]] == 2.0  # NaN left out of the mean
    assert np.isnan(f[2, COL["amount_zscore"]])  # one finite previous amount
    assert f[3, COL["amount_zscore"]] == pytest.approx((-5 - 15) / statistics.stdev([10, 20]))
    prev = [10.0, 20.0, -5.0]
    z = (40 - statistics.mean(prev)) / statistics.stdev(prev)
    assert f[4, COL["amount_zscore"]] == pytest.approx(z, rel=1e-14)
    assert f[4, COL["card_amount_7d"]] == pytest.approx(25.0, rel=1e-6)  # rows 1 ms apart
    assert f[4, COL["card_txn_count"]] == 4.0


def test_merchant_and_country_rings() -> None:
    rows = [dict(t=T0 + i, merchant=100 + i, country=i % 9) for i in range(17)]
    f = compute_features_offline(make_tx(rows + [dict(t=T0 + 99, merchant=101, country=1)]))[0]
    assert f[:17, COL["is_new_merchant"]].tolist() == [1.0] * 17
    assert f[17, COL["is_new_merchant"]] == 0.0  # 101 is the 16th most recent
    assert f[17, COL["is_new_country"]] == 0.0  # country 1 seen 7 transactions ago
    g = compute_features_offline(make_tx(rows + [dict(t=T0 + 99, merchant=100, country=8)]))[0]
    assert g[17, COL["is_new_merchant"]] == 1.0  # 100 fell out of the 16-merchant ring
    assert g[17, COL["is_new_country"]] == 1.0  # country 8 was 9 transactions ago


def test_peek_does_not_mutate_state() -> None:
    tx = random_stream(seed=3, n=500, n_cards=50)
    table = compute_features_offline(tx.take(slice(0, 400)))[1]
    before = table._bytes.copy()
    peeked = peek_features(table, tx.take(slice(400, 500)))
    assert np.array_equal(table._bytes, before)
    # a single peeked row is exactly what the update path computes next
    assert np.array_equal(
        peek_features(table, tx.take(slice(400, 401)))[0], peeked[0], equal_nan=True
    )
    assert np.array_equal(
        compute_features(table, tx.take(slice(400, 401)))[0], peeked[0], equal_nan=True
    )
    unknown = peek_features(table, make_tx([dict(card=2**63 + 5), dict(card=2**63 + 5)]))
    assert np.array_equal(unknown[0], unknown[1], equal_nan=True)  # rows do not see each other
    assert unknown[0, COL["card_txn_count"]] == 0.0 and unknown[0, COL["is_new_merchant"]] == 1.0
    assert table.find(2**63 + 5) == -1


def test_readonly_inputs_and_preallocated_out() -> None:
    tx = random_stream(seed=5, n=50, n_cards=5)
    frozen = TransactionArrays(*(np.frombuffer(getattr(tx, f).tobytes(), getattr(tx, f).dtype)
                                 for f in TransactionArrays.__slots__))  # fmt: skip
    assert not frozen.amount.flags.writeable
    out = np.empty((50, NUM_FEATURES))
    got = compute_features(CardStateTable.create(1024), frozen, out)
    assert got is out
    assert np.array_equal(out, compute_features_offline(tx)[0], equal_nan=True)


def _replace(tx: TransactionArrays, **fields) -> TransactionArrays:
    return TransactionArrays(
        **{f: fields.get(f, getattr(tx, f)) for f in TransactionArrays.__slots__}
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(mcc=np.zeros(3, dtype=np.int64)), "tx.mcc must be a 1-D int32 array, got 1-D int64"),
        (dict(amount=np.zeros(3, dtype=np.float32)), "tx.amount must be a 1-D float64"),
        (dict(card_key=np.ones(3, dtype=np.int64)), "tx.card_key must be a 1-D uint64"),
        (dict(country=np.zeros(6, dtype=np.int32)[::2]), "tx.country must be C-contiguous"),
        (dict(channel=np.zeros(4, dtype=np.int32)), "tx.channel has 4 rows but tx.amount has 3"),
        (dict(event_time_ms=[1, 2, 3]), "tx.event_time_ms must be a numpy array"),
        (dict(card_key=np.array([1, 0, 2], dtype=np.uint64)), "card_key must be non-zero"),
    ],
)
def test_wrapper_rejects_bad_inputs(change: dict, message: str) -> None:
    tx = _replace(make_tx([dict(card=1), dict(card=2), dict(card=3)]), **change)
    table = CardStateTable.create(1024)
    with pytest.raises(ValueError, match=message):
        compute_features(table, tx)
    with pytest.raises(ValueError, match=message):
        peek_features(table, tx)
    assert table.occupied == 0


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (np.empty((2, NUM_FEATURES)), r"out has shape \(2, 23\), expected \(3, 23\)"),
        (np.empty((3, NUM_FEATURES - 1)), r"expected \(3, 23\)"),
        (np.empty((3, NUM_FEATURES), dtype=np.float32), "out must be a 2-D float64"),
        (np.empty((NUM_FEATURES, 3)).T, "out must be C-contiguous"),
        (np.frombuffer(bytes(3 * NUM_FEATURES * 8)).reshape(3, -1), "writable"),
    ],
)
def test_wrapper_rejects_bad_out(out: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_features(CardStateTable.create(1024), make_tx([{}, {}, {}]), out)


def test_warmup_and_empty_batch() -> None:
    warmup()
    assert compute_features(CardStateTable.create(1024), make_tx([{}]).take(slice(0, 0))).shape == (
        0,
        NUM_FEATURES,
    )
