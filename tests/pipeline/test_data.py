"""Raw data loading: every kind of bad file gets an error naming column and rows."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from riskwire.pipeline.data import load_raw, validate_table
from riskwire.pipeline.errors import DataValidationError


def good_table(rows: int = 6) -> pa.Table:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return pa.table(
        {
            "transaction_id": [f"tx-{i}" for i in range(rows)],
            "card_id": [f"card-{i % 2}" for i in range(rows)],
            "merchant_id": [f"m-{i % 3}" for i in range(rows)],
            "mcc": pa.array([5411] * rows, pa.int32()),
            "amount": [10.0 + i for i in range(rows)],
            "currency": ["EUR"] * rows,
            "country": ["DE"] * rows,
            "card_country": ["DE"] * rows,
            "channel": ["pos"] * rows,
            # deliberately not sorted: the loader sorts by time
            "event_time": pa.array(
                [base.replace(hour=(rows - i) % 24) for i in range(rows)],
                pa.timestamp("ms", tz="UTC"),
            ),
            "label": pa.array([i % 2 for i in range(rows)], pa.int8()),
        }
    )


def test_good_table_is_sorted_and_typed() -> None:
    raw = validate_table(good_table())
    times = raw.columns["event_time"]
    assert times.dtype == np.int64 and np.all(np.diff(times) >= 0)
    assert raw.columns["amount"].dtype == np.float64
    assert raw.labels.dtype == np.int8 and set(raw.labels) == {0, 1}
    # rows stay aligned with their labels after sorting
    original = good_table().to_pydict()
    by_id = dict(zip(original["transaction_id"], original["label"], strict=True))
    assert [by_id[t] for t in raw.columns["transaction_id"]] == raw.labels.tolist()


def test_weight_column_is_optional_and_sorted_with_the_rows() -> None:
    assert validate_table(good_table()).weights is None
    weights = [float(i) for i in range(6)]
    raw = validate_table(good_table().append_column("weight", pa.array(weights)))
    by_id = {f"tx-{i}": w for i, w in enumerate(weights)}
    assert [by_id[t] for t in raw.columns["transaction_id"]] == raw.weights.tolist()


def test_served_features_are_used_as_they_are_and_sorted_with_the_rows() -> None:
    """An export's f_<feature> columns become the build's features (NaN kept); a file
    with only some of them is refused."""
    from riskwire.pipeline.build import offline_features
    from riskwire.pipeline.data import SERVED_FEATURE_COLUMNS

    table = good_table()
    assert validate_table(table).served_features is None
    values = np.arange(6 * len(SERVED_FEATURE_COLUMNS), dtype=np.float64).reshape(6, -1)
    values[2, 3] = np.nan
    for j, name in enumerate(SERVED_FEATURE_COLUMNS):
        table = table.append_column(name, pa.array(values[:, j]))
    raw = validate_table(table)
    rows = [int(t.split("-")[1]) for t in raw.columns["transaction_id"]]
    assert np.array_equal(raw.served_features, values[rows], equal_nan=True)
    assert offline_features(raw) is raw.served_features
    with pytest.raises(DataValidationError, match="served features: 1 of"):
        validate_table(table.drop_columns([SERVED_FEATURE_COLUMNS[0]]))


def replace(table: pa.Table, name: str, values: pa.Array | list) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda t: t.drop_columns(["amount"]), r"missing column\(s\) amount: all 6 rows"),
        (lambda t: t.drop_columns(["label"]), r"missing column\(s\) label"),
        (lambda t: t.slice(0, 0), r"no rows"),
        (lambda t: replace(t, "amount", ["x"] * 6), r"'amount': 6 of 6 rows are not numbers"),
        (
            lambda t: replace(t, "amount", [1.0, -2, 3, 4, float("nan"), 6]),
            r"'amount': 2 of 6 rows are negative, NaN or infinite",
        ),
        (lambda t: replace(t, "card_id", [1, 2, 3, 4, 5, 6]), r"'card_id' has type int64"),
        (
            lambda t: replace(t, "merchant_id", ["m", None, "", "m", "m", "m"]),
            r"'merchant_id': 2 of 6 rows are empty or null",
        ),
        (
            lambda t: replace(
                t,
                "event_time",
                [
                    "2026-01-01T00:00:00Z",
                    "yesterday",
                    "x",
                    "2026-01-02",
                    "2026-01-03",
                    "2026-01-04",
                ],
            ),
            r"'event_time': 2 of 6 rows are not parsable timestamps",
        ),
        (
            lambda t: replace(t, "label", [0, 1, 2, 0, -1, 1]),
            r"'label': 2 of 6 rows are not 0 or 1",
        ),
        (lambda t: replace(t, "label", [0] * 6), r"all 6 rows have label 0"),
        (
            lambda t: replace(t, "mcc", [5411.0, 5411.5, 1, 2, 3, 4]),
            r"'mcc': 1 of 6 rows are not integers",
        ),
        (
            lambda t: t.append_column("weight", pa.array([1.0, -1, 1, float("inf"), 1, 1])),
            r"'weight': 2 of 6 rows are negative, NaN or infinite",
        ),
        (
            lambda t: t.append_column("weight", pa.array([0.0] * 6)),
            r"'weight': all 6 rows have weight 0",
        ),
    ],
)
def test_bad_tables_name_column_and_rows(mutate, pattern: str) -> None:
    with pytest.raises(DataValidationError, match=pattern):
        validate_table(mutate(good_table()))


def test_csv_round_trip_and_bad_csv(tmp_path) -> None:
    table = good_table()
    csv_table = table.set_column(
        table.column_names.index("event_time"),
        "event_time",
        pa.array([t.isoformat() for t in table.column("event_time").to_pylist()]),
    )
    path = tmp_path / "tx.csv"
    pacsv.write_csv(csv_table, path)
    from_csv = load_raw(path)
    from_table = validate_table(table)
    for name, values in from_table.columns.items():
        assert list(from_csv.columns[name]) == list(values), name

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataValidationError, match="empty"):
        load_raw(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",".join(table.column_names) + "\n")
    with pytest.raises(DataValidationError, match="no rows"):
        load_raw(tmp_path / "header.csv")
    bad = csv_table.set_column(
        csv_table.column_names.index("amount"), "amount", pa.array(["1", "2", "3", "x", "", "6"])
    )
    pacsv.write_csv(bad, tmp_path / "bad.csv")
    with pytest.raises(DataValidationError, match=r"bad.csv: .*'amount': 2 of 6 rows"):
        load_raw(tmp_path / "bad.csv")


def test_unreadable_and_missing_files(tmp_path) -> None:
    with pytest.raises(DataValidationError, match="does not exist"):
        load_raw(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match="cannot be read as parquet"):
        load_raw(tmp_path / "junk.parquet")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataValidationError, match="unsupported file type"):
        load_raw(tmp_path / "x.json")


def test_naive_timestamps_are_utc_and_ints_are_epoch_ms(tmp_path) -> None:
    table = good_table()
    naive = table.column("event_time").cast(pa.timestamp("us"))
    as_naive = table.set_column(table.column_names.index("event_time"), "event_time", naive)
    epoch = pa.compute.cast(table.column("event_time"), pa.int64())
    as_int = table.set_column(table.column_names.index("event_time"), "event_time", epoch)
    expected = validate_table(table).columns["event_time"]
    assert np.array_equal(validate_table(as_naive).columns["event_time"], expected)
    assert np.array_equal(validate_table(as_int).columns["event_time"], expected)
    pq.write_table(table, tmp_path / "ok.parquet")
    assert len(load_raw(tmp_path / "ok.parquet")) == 6
