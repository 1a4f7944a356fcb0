"""Tests for the synthetic fraud-traffic generator."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from riskwire.kernels.schema import (
    CHANNELS,
    COUNTRIES,
    CURRENCIES,
    LABEL_COLUMN,
    MCC_MAX,
    RAW_COLUMNS,
)
from riskwire.pipeline.synth import DEFAULT_START, SCHEMA, generate, write

ROWS = 50_000
HIGH_RISK_MCCS = (5732, 5944, 4829, 7995)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate(ROWS, seed=11)


@pytest.fixture(scope="module")
def cols(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


def test_schema_is_exact(table: pa.Table) -> None:
    expected = pa.schema(
        [
            ("transaction_id", pa.string()),
            ("card_id", pa.string()),
            ("merchant_id", pa.string()),
            ("mcc", pa.int32()),
            ("amount", pa.float64()),
            ("currency", pa.string()),
            ("country", pa.string()),
            ("card_country", pa.string()),
            ("channel", pa.string()),
            ("event_time", pa.timestamp("ms", tz="UTC")),
            ("label", pa.int8()),
        ]
    )
    assert table.schema.equals(expected, check_metadata=True)
    assert SCHEMA.equals(expected)
    assert table.column_names == [*RAW_COLUMNS, LABEL_COLUMN]
    assert table.num_rows == ROWS
    assert all(table.column(name).null_count == 0 for name in table.column_names)


def test_values_are_in_vocabularies(cols: dict[str, np.ndarray]) -> None:
    assert set(cols["channel"]) == set(CHANNELS)
    assert set(cols["country"]) <= set(COUNTRIES)
    assert set(cols["card_country"]) <= set(COUNTRIES)
    assert set(cols["currency"]) <= set(CURRENCIES)
    assert ((cols["mcc"] >= 0) & (cols["mcc"] <= MCC_MAX)).all()
    assert set(np.unique(cols["label"])) == {0, 1}


def test_amounts_are_positive_and_rounded_to_cents(cols: dict[str, np.ndarray]) -> None:
    amount = cols["amount"]
    assert (amount >= 0.01).all()
    np.testing.assert_allclose(np.round(amount * 100), amount * 100, rtol=0, atol=1e-6)


def test_sorted_by_time_within_default_period(table: pa.Table, cols) -> None:
    t = cols["event_time"].astype(np.int64)
    assert (np.diff(t) >= 0).all()
    first, last = table.column("event_time")[0].as_py(), table.column("event_time")[-1].as_py()
    assert first >= DEFAULT_START and last < DEFAULT_START + timedelta(days=60)
    assert last - first > timedelta(days=30)


def test_start_and_days_bound_the_period() -> None:
    start = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)
    tb = generate(5_000, seed=1, start=start, days=2.5)
    t = tb.column("event_time")
    assert pc.min(t).as_py() >= start
    assert pc.max(t).as_py() < start + timedelta(days=2.5)
    naive = generate(5_000, seed=1, start=start.replace(tzinfo=None), days=2.5)
    assert naive.equals(tb)


def test_ids_are_unique_and_well_formed(cols: dict[str, np.ndarray]) -> None:
    assert len(np.unique(cols["transaction_id"])) == ROWS
    assert all(re.fullmatch(r"tx-[0-9a-f]{12}", v) for v in cols["transaction_id"][:1000])
    assert all(re.fullmatch(r"card-\d{6}", v) for v in np.unique(cols["card_id"]))
    assert all(re.fullmatch(r"m-\d{5}", v) for v in np.unique(cols["merchant_id"]))
    assert len(np.unique(cols["card_id"])) > 1000  # many cards, each with a history


def test_entities_have_fixed_attributes(cols: dict[str, np.ndarray]) -> None:
    pairs = (("card_id", "card_country"), ("merchant_id", "mcc"), ("merchant_id", "country"))
    for key, attr in pairs:
        seen = dict(zip(cols[key].tolist(), cols[attr].tolist(), strict=True))
        assert all(seen[k] == v for k, v in zip(cols[key], cols[attr], strict=True)), attr


def test_same_seed_is_byte_identical(tmp_path) -> None:
    a, b = generate(20_000, seed=5), generate(20_000, seed=5)
    assert a.equals(b)
    write(a, tmp_path / "a.parquet")
    write(b, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert not generate(20_000, seed=6).equals(a)


def test_parquet_round_trip_leaves_no_temp_files(table: pa.Table, tmp_path) -> None:
    path = write(table, tmp_path / "traffic.parquet")
    assert pq.read_table(path).equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traffic.parquet"]


def test_csv_round_trip(tmp_path) -> None:
    tb = generate(5_000, seed=2)
    path = write(tb, tmp_path / "traffic.csv")
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", path.read_text().splitlines()[1])
    types = {field.name: field.type for field in SCHEMA}
    back = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    assert back.equals(tb)


def test_bad_arguments_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="rows"):
        generate(-1)
    with pytest.raises(ValueError, match="days"):
        generate(10, days=0)
    with pytest.raises(ValueError, match="format"):
        write(generate(10), tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []
    assert generate(0).schema.equals(SCHEMA) and generate(0).num_rows == 0


def test_fraud_rate_is_realistic(cols: dict[str, np.ndarray]) -> None:
    assert 0.005 <= cols["label"].mean() <= 0.02
    assert 0.005 <= generate(50_000, seed=99).column("label").to_numpy().mean() <= 0.02


def test_card_testing_bursts_exist(cols: dict[str, np.ndarray]) -> None:
    small = (cols["label"] == 1) & (cols["channel"] == "ecommerce") & (cols["amount"] < 6)
    small &= np.isin(cols["currency"], ("EUR", "USD", "GBP", "CHF"))
    t_s = cols["event_time"].astype(np.int64)[small] / 1000
    cards = cols["card_id"][small]
    bursts = 0
    for card in np.unique(cards):
        t = t_s[cards == card]
        bursts += bool(len(t) >= 5 and (t[4:] - t[:-4] <= 900).any())  # 5 within 15 minutes
    assert bursts >= 5


def test_account_takeover_signature(cols: dict[str, np.ndarray]) -> None:
    fraud, legit = cols["label"] == 1, cols["label"] == 0
    foreign = cols["country"] != cols["card_country"]
    assert foreign[fraud].mean() > 3 * foreign[legit].mean()
    risky = np.isin(cols["mcc"], HIGH_RISK_MCCS)
    assert risky[fraud].mean() > 3 * risky[legit].mean()
    eur = cols["currency"] == "EUR"
    assert np.median(cols["amount"][fraud & risky & eur]) > 2 * np.median(
        cols["amount"][legit & risky & eur]
    )


def test_compromised_merchants_exist(cols: dict[str, np.ndarray]) -> None:
    fraud = cols["label"] == 1
    moto = cols["channel"] == "moto"
    assert moto[fraud].mean() > 3 * moto[~fraud].mean()
    merchants, counts = np.unique(cols["merchant_id"][fraud], return_counts=True)
    hot = merchants[counts >= 15]
    assert len(hot) >= 1
    t = cols["event_time"].astype(np.int64) // 1000
    for merchant in hot:
        rows = fraud & (cols["merchant_id"] == merchant)
        if np.ptp(t[rows]) <= 8 * 86_400 and len(np.unique(cols["card_id"][rows])) >= 10:
            break  # a merchant that ran many cards within days
    else:
        pytest.fail("no compromised-merchant window found")


def test_stateless_features_carry_signal(cols: dict[str, np.ndarray]) -> None:
    t_ms = cols["event_time"].astype(np.int64)
    hour = (t_ms // 3_600_000) % 24
    channel = np.searchsorted(np.array(CHANNELS), cols["channel"], sorter=np.argsort(CHANNELS))
    x = np.column_stack(
        [
            cols["amount"],
            np.sin(2 * np.pi * hour / 24),
            np.cos(2 * np.pi * hour / 24),
            cols["country"] != cols["card_country"],
            channel,
        ]
    ).astype(np.float64)
    y = cols["label"]
    cut = int(len(y) * 0.7)  # rows are time-ordered: train on the past, test on the future
    params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "verbose": -1}
    params |= {"seed": 0, "deterministic": True, "num_threads": 1}
    model = lgb.train(params, lgb.Dataset(x[:cut], y[:cut]), num_boost_round=150)
    assert roc_auc_score(y[cut:], model.predict(x[cut:])) > 0.75
