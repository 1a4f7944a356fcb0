"""Load raw transactions from Parquet or CSV and validate them against the schema.

Every problem is reported as a :class:`DataValidationError` that names the column
and how many rows are affected, so a user can fix the file without a debugger.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from riskwire.kernels.schema import (
    FEATURE_NAMES,
    LABEL_COLUMN,
    RAW_COLUMNS,
    RAW_FLOAT_COLUMNS,
    RAW_INT_COLUMNS,
    RAW_STRING_COLUMNS,
    TIME_COLUMN,
)

from .errors import DataValidationError

_HASH_CHUNK_BYTES = 1 << 20
# Optional column of non-negative sample weights (training and evaluation); a row of
# weight 2 counts as two copies of it. Not a model input: the server never sees it.
WEIGHT_COLUMN = "weight"
# Features as the server served them, one column each (``f_<feature name>``), as
# ``riskwire data export`` writes them. When a file carries all of them the build uses
# them as they are: they are what the model saw at decision time, and a sampled log
# misses transactions, so card history recomputed from its rows would differ.
FEATURE_PREFIX = "f_"
SERVED_FEATURE_COLUMNS = tuple(FEATURE_PREFIX + name for name in FEATURE_NAMES)


@dataclass(frozen=True)
class RawData:
    """Validated raw transactions, sorted by event time, as numpy columns."""

    columns: dict[str, np.ndarray]  # strings as object arrays, event_time int64 ms
    labels: np.ndarray | None  # int8, or None when the file has no label column
    weights: np.ndarray | None = None  # float64 sample weights, None without a weight column
    served_features: np.ndarray | None = None  # (rows, features) as served, when the file has them

    def __len__(self) -> int:
        return len(self.columns[TIME_COLUMN])


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` atomically as Parquet (``.parquet``) or CSV (``.csv``).

    In CSV an ``event_time`` timestamp column, if present, is ISO-8601 UTC text. The
    file is written next to ``path`` under a temporary name and renamed into place.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"unsupported output format {path.suffix!r}: use .parquet or .csv")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            i = table.schema.get_field_index(TIME_COLUMN)
            if i >= 0 and pa.types.is_timestamp(table.schema.field(i).type):
                iso = pc.strftime(table.column(i), format="%Y-%m-%dT%H:%M:%SZ")
                table = table.set_column(i, TIME_COLUMN, iso)
            pacsv.write_csv(table, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | Path) -> pa.Table:
    """Read a Parquet or CSV file into an Arrow table (strings stay strings)."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix == ".csv":
            # Read every column as text; typing happens in validation with clear errors.
            with open(path, "rb") as handle:
                header = handle.readline().decode("utf-8", "replace").strip()
            if not header:
                raise DataValidationError(f"{path}: the file is empty (no header row)")
            names = [name.strip() for name in header.split(",")]
            options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
            return pacsv.read_csv(path, convert_options=options)
    except DataValidationError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise DataValidationError(f"{path}: unsupported file type {suffix!r} (use .parquet or .csv)")


def validate_table(table: pa.Table, *, require_label: bool = True) -> RawData:
    """Check columns, types and values; return the rows sorted by event time."""
    if table.num_rows == 0:
        raise DataValidationError("the data has no rows (0 transactions)")
    wanted = list(RAW_COLUMNS) + ([LABEL_COLUMN] if require_label else [])
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise DataValidationError(
            f"missing column(s) {', '.join(missing)}: all {table.num_rows} rows lack them; "
            f"expected columns {', '.join(wanted)}"
        )
    n = table.num_rows
    columns: dict[str, np.ndarray] = {}
    for name in RAW_STRING_COLUMNS:
        columns[name] = _string_column(table, name, n)
    for name in RAW_INT_COLUMNS:
        columns[name] = _numeric_column(table, name, n, pa.int64()).astype(np.int32)
    for name in RAW_FLOAT_COLUMNS:
        values = _numeric_column(table, name, n, pa.float64())
        bad = int(np.count_nonzero(~np.isfinite(values) | (values < 0)))
        if bad:
            raise DataValidationError(
                f"column {name!r}: {bad} of {n} rows are negative, NaN or infinite"
            )
        columns[name] = values
    columns[TIME_COLUMN] = _time_column(table, n)
    labels = _label_column(table, n) if LABEL_COLUMN in table.column_names else None
    weights = _weight_column(table, n) if WEIGHT_COLUMN in table.column_names else None
    served = _served_features(table, n)
    if require_label and labels is not None and labels.min() == labels.max():
        raise DataValidationError(
            f"column {LABEL_COLUMN!r}: all {n} rows have label {int(labels[0])}; "
            "training needs both fraud (1) and legitimate (0) rows"
        )
    order = np.argsort(columns[TIME_COLUMN], kind="stable")
    if not np.all(order[1:] > order[:-1]):
        columns = {name: values[order] for name, values in columns.items()}
        labels = labels[order] if labels is not None else None
        weights = weights[order] if weights is not None else None
        served = served[order] if served is not None else None
    return RawData(columns=columns, labels=labels, weights=weights, served_features=served)


def load_raw(path: str | Path, *, require_label: bool = True) -> RawData:
    """Read and validate a raw transaction file."""
    table = read_table(path)
    try:
        return validate_table(table, require_label=require_label)
    except DataValidationError as exc:
        raise DataValidationError(f"{path}: {exc}") from None


def _null_count(array: pa.ChunkedArray) -> int:
    return int(array.null_count)


def _string_column(table: pa.Table, name: str, n: int) -> np.ndarray:
    array = table.column(name)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise DataValidationError(
            f"column {name!r} has type {array.type}, expected string (all {n} rows)"
        )
    empty = _null_count(array) + int(pc.sum(pc.equal(pc.utf8_length(array), 0)).as_py() or 0)
    if empty:
        raise DataValidationError(f"column {name!r}: {empty} of {n} rows are empty or null")
    return np.asarray(array.to_pylist(), dtype=object)


def _numeric_column(table: pa.Table, name: str, n: int, target: pa.DataType) -> np.ndarray:
    array = table.column(name)
    if _null_count(array):
        raise DataValidationError(f"column {name!r}: {_null_count(array)} of {n} rows are null")
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        # CSV text: count the rows that do not parse before casting.
        parsed = [_parse_number(v, target) for v in array.to_pylist()]
        bad = sum(value is None for value in parsed)
        if bad:
            raise DataValidationError(
                f"column {name!r}: {bad} of {n} rows are not {_type_word(target)}s"
            )
        return np.asarray(parsed, dtype=target.to_pandas_dtype())
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise DataValidationError(
            f"column {name!r} has type {array.type}, expected {_type_word(target)} (all {n} rows)"
        )
    values = array.to_numpy()
    if pa.types.is_integer(target):
        if pa.types.is_floating(array.type):
            bad = int(np.count_nonzero(~np.isfinite(values) | (values != np.round(values))))
            if bad:
                raise DataValidationError(f"column {name!r}: {bad} of {n} rows are not integers")
        return values.astype(np.int64)
    return values.astype(np.float64)


def _parse_number(text: str, target: pa.DataType) -> float | int | None:
    try:
        return int(text) if pa.types.is_integer(target) else float(text)
    except ValueError:
        return None


def _type_word(target: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(target) else "number"


def _time_column(table: pa.Table, n: int) -> np.ndarray:
    """event_time as int64 epoch milliseconds UTC (timestamps, ISO strings or ints)."""
    array = table.column(TIME_COLUMN)
    nulls = _null_count(array)
    if nulls:
        raise DataValidationError(f"column {TIME_COLUMN!r}: {nulls} of {n} rows are null")
    if pa.types.is_timestamp(array.type):
        if array.type.tz is None:
            array = array.cast(pa.timestamp(array.type.unit, tz="UTC"))
        return pc.cast(array.cast(pa.timestamp("ms", tz="UTC")), pa.int64()).to_numpy()
    if pa.types.is_integer(array.type):
        return array.to_numpy().astype(np.int64)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        texts = array.to_pylist()
        millis = np.empty(n, dtype=np.int64)
        bad = 0
        for i, text in enumerate(texts):
            value = _parse_time_ms(text)
            if value is None:
                bad += 1
            else:
                millis[i] = value
        if bad:
            raise DataValidationError(
                f"column {TIME_COLUMN!r}: {bad} of {n} rows are not parsable timestamps "
                "(expected ISO-8601 such as 2026-01-31T12:00:00Z or epoch milliseconds)"
            )
        return millis
    raise DataValidationError(
        f"column {TIME_COLUMN!r} has type {array.type}, expected a timestamp (all {n} rows)"
    )


def _parse_time_ms(text: str) -> int | None:
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _served_features(table: pa.Table, n: int) -> np.ndarray | None:
    """The served feature matrix when every ``f_<feature>`` column is there (NaN stays:
    it is a missing value the model handles); None when none is; an error when some are."""
    present = [c for c in SERVED_FEATURE_COLUMNS if c in table.column_names]
    if not present:
        return None
    if len(present) != len(SERVED_FEATURE_COLUMNS):
        missing = sorted(set(SERVED_FEATURE_COLUMNS) - set(present))
        raise DataValidationError(
            f"served features: {len(missing)} of {len(SERVED_FEATURE_COLUMNS)} columns missing "
            f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); a file carries all "
            "of them (riskwire data export) or none"
        )
    matrix = np.empty((n, len(present)), dtype=np.float64)
    for j, name in enumerate(present):
        column = table.column(name)
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise DataValidationError(f"column {name!r} has type {column.type}, expected float")
        matrix[:, j] = column.cast(pa.float64()).fill_null(np.nan).to_numpy()
    return matrix


def _weight_column(table: pa.Table, n: int) -> np.ndarray:
    values = _numeric_column(table, WEIGHT_COLUMN, n, pa.float64())
    bad = int(np.count_nonzero(~np.isfinite(values) | (values < 0)))
    if bad:
        raise DataValidationError(
            f"column {WEIGHT_COLUMN!r}: {bad} of {n} rows are negative, NaN or infinite"
        )
    if not values.sum() > 0:
        raise DataValidationError(f"column {WEIGHT_COLUMN!r}: all {n} rows have weight 0")
    return values


def _label_column(table: pa.Table, n: int) -> np.ndarray:
    array = table.column(LABEL_COLUMN)
    nulls = _null_count(array)
    if nulls:
        raise DataValidationError(f"column {LABEL_COLUMN!r}: {nulls} of {n} rows are null")
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        texts = [t.strip() for t in array.to_pylist()]
        bad = sum(t not in ("0", "1") for t in texts)
        values = np.asarray([1 if t == "1" else 0 for t in texts], dtype=np.int8)
    elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        raw = array.to_numpy()
        bad = int(np.count_nonzero((raw != 0) & (raw != 1)))
        values = (raw == 1).astype(np.int8)
    elif pa.types.is_boolean(array.type):
        bad, values = 0, array.to_numpy(zero_copy_only=False).astype(np.int8)
    else:
        raise DataValidationError(
            f"column {LABEL_COLUMN!r} has type {array.type}, expected 0/1 (all {n} rows)"
        )
    if bad:
        raise DataValidationError(f"column {LABEL_COLUMN!r}: {bad} of {n} rows are not 0 or 1")
    return values
