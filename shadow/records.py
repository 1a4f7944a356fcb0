"""Paired shadow records and delayed labels as rolling Parquet segments.

Layout under the shadow directory (``Settings.shadow_dir``, default
``<models>/.shadow``)::

    records/part-<utc time>-w<worker>-<pid>-<seq>.parquet   one per flush, per worker
    labels/part-<utc time>-w<worker>-<pid>-<seq>.parquet    Feedback RPC labels
    predictions/part-…parquet                               the primary's predictions

Each segment is written under a temporary dot-name, fsynced, renamed into place and
the directory fsynced, so a reader never sees a half-written file and a crash loses
only what was still buffered: at most ``flush_rows`` records or ``flush_seconds`` of
them (whichever comes first) per worker. Any Parquet reader takes the folder as is::

    duckdb:  SELECT * FROM read_parquet('models/.shadow/records/*.parquet')
    pandas:  pd.read_parquet('models/.shadow/records')
    polars:  pl.read_parquet('models/.shadow/records/*.parquet')

Records never hold raw card ids: ``entity_hash`` is the keyed 64-bit hash the feature
kernels use for the card.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from riskwire.pipeline.data import SERVED_FEATURE_COLUMNS

RECORDS = "records"
LABELS = "labels"
PREDICTIONS = "predictions"
COMPRESSION = "snappy"  # cheap to write on the server; every Parquet reader knows it

_TIME = pa.timestamp("ms", tz="UTC")
STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # segment names: part-<UTC write time>-w<worker>-…
CLOCK_SLACK = timedelta(minutes=5)  # reading from ``since``: older segments are kept this long
_CORE_FIELDS = [
    pa.field("request_id", pa.string()),
    pa.field("transaction_id", pa.string()),
    pa.field("time", _TIME),
    pa.field("entity_hash", pa.uint64()),
    pa.field("worker", pa.int16()),
    pa.field("primary_model", pa.string()),
    pa.field("primary_version", pa.string()),
    pa.field("shadow_model", pa.string()),
    pa.field("shadow_version", pa.string()),
    pa.field("primary_probability", pa.float64()),
    pa.field("shadow_probability", pa.float64()),  # null when the shadow failed
    pa.field("primary_decision", pa.string()),
    pa.field("shadow_decision", pa.string()),  # null when the shadow failed
    pa.field("primary_latency_us", pa.float64()),
    pa.field("shadow_latency_us", pa.float64()),  # its batch's time / rows in the batch
    pa.field("shadow_error", pa.string()),  # null unless the shadow failed
    pa.field("client_id", pa.string()),  # the authenticated caller (null without auth)
]
RECORD_COLUMNS = tuple(f.name for f in _CORE_FIELDS)
FEATURE_COLUMNS = SERVED_FEATURE_COLUMNS
RECORD_SCHEMA = pa.schema(_CORE_FIELDS + [pa.field(c, pa.float64()) for c in FEATURE_COLUMNS])
RECORD_SCHEMA_NO_FEATURES = pa.schema(_CORE_FIELDS)

LABEL_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("transaction_id", pa.string()),
        pa.field("label", pa.int8()),  # 1 = fraud, 0 = legitimate
        pa.field("labelled_at", _TIME),  # when the truth became known (e.g. chargeback)
        pa.field("received_at", _TIME),  # when the server stored it
        pa.field("worker", pa.int16()),
    ]
)


# The prediction log: what was answered, and the inputs as received and features as
# served at decision time (the training data of the next model: riskwire data export).
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("transaction_id", pa.string()),
        pa.field("time", _TIME),  # when the answer was given
        pa.field("worker", pa.int16()),
        pa.field("model", pa.string()),
        pa.field("version", pa.string()),
        pa.field("probability", pa.float64()),
        pa.field("decision", pa.string()),
        pa.field("entity_hash", pa.uint64()),  # the card's keyed hash (as in the records)
        pa.field("card_id", pa.string()),  # the raw card id: null unless allowed by config
        pa.field("merchant_id", pa.string()),
        pa.field("mcc", pa.int32()),
        pa.field("amount", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("country", pa.string()),
        pa.field("card_country", pa.string()),
        pa.field("channel", pa.string()),
        pa.field("event_time", _TIME),  # as scored (the server's clock when none was sent)
        pa.field("log_rate", pa.float64()),  # fraction of answers logged at the time
        pa.field("flags", pa.string()),  # response flags, ";"-joined; null when none
        *(pa.field(c, pa.float64()) for c in FEATURE_COLUMNS),
    ]
)
RAW_COLUMNS = (
    "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country",
    "channel", "event_time",
)  # fmt: skip


class SegmentWriter:
    """Buffers rows of one stream and writes them as atomic Parquet segments.

    ``add_rows`` may be called from any thread; ``maybe_flush`` (from one background
    thread) writes a segment once the oldest buffered row is ``flush_seconds`` old, and
    ``add_rows`` itself writes one when ``flush_rows`` rows are buffered.
    ``flush_through`` is a group commit: it returns once the given rows are on disk,
    writing them together with whatever other threads buffered meanwhile.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: pa.Schema,
        *,
        worker: int,
        flush_rows: int = 10_000,
        flush_seconds: float = 5.0,
        pid: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.worker = worker
        self.pid = pid or os.getpid()  # in segment names: the worker whose records these are
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._chunks: list[list[Sequence]] = [[] for _ in schema]
        self._rows = 0
        self._appended = 0
        self._oldest = 0.0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._sequence = itertools.count(1)
        self.segments_written = 0
        self.rows_written = 0

    def add_rows(self, columns: Sequence[Sequence]) -> int:
        """Append rows given column-wise in schema order (lists or numpy arrays of equal
        length); returns a mark for :meth:`flush_through`."""
        with self._lock:
            if not self._rows:
                self._oldest = time.monotonic()
            for chunks, values in zip(self._chunks, columns, strict=True):
                chunks.append(values)
            self._rows += len(columns[0])
            self._appended += len(columns[0])
            mark, full = self._appended, self._rows >= self.flush_rows
        if full:
            self.flush()
        return mark

    def buffered(self) -> int:
        """Rows not yet written."""
        return self._rows

    def maybe_flush(self, now: float | None = None) -> Path | None:
        """Write a segment if the buffer is old enough; returns its path."""
        now = time.monotonic() if now is None else now
        if self._rows and now - self._oldest >= self.flush_seconds:
            return self.flush()
        return None

    def flush_through(self, mark: int) -> None:
        """Return once every row up to ``mark`` (from :meth:`add_rows`) is on disk."""
        with self._write_lock:
            if self.rows_written < mark:
                self._flush_locked()

    def flush(self) -> Path | None:
        """Write every buffered row as one segment (atomic); None if nothing was buffered."""
        with self._write_lock:
            return self._flush_locked()

    def _flush_locked(self) -> Path | None:
        with self._lock:
            if not self._rows:
                return None
            chunks, self._chunks = self._chunks, [[] for _ in self.schema]
            rows, self._rows = self._rows, 0
        arrays = []
        for column, field in zip(chunks, self.schema, strict=True):
            arrays.append(_column(column, field.type))
            time.sleep(0)  # a request thread waiting for the GIL goes first
        path = self._write(pa.Table.from_arrays(arrays, schema=self.schema))
        self.segments_written += 1
        self.rows_written += rows
        return path

    def _write(self, table: pa.Table) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime(STAMP_FORMAT)
        name = f"part-{stamp}-w{self.worker}-{self.pid}-{next(self._sequence):06d}.parquet"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            pq.write_table(table, tmp, compression=COMPRESSION)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final


def _column(chunks: list[Sequence], kind: pa.DataType) -> pa.Array:
    """One Arrow array from chunks that are all Arrow arrays, all numpy arrays or all
    Python sequences."""
    if all(isinstance(c, pa.Array) for c in chunks):
        return pa.concat_arrays([c.cast(kind) for c in chunks])
    if all(isinstance(c, np.ndarray) for c in chunks):
        return pa.array(chunks[0] if len(chunks) == 1 else np.concatenate(chunks), type=kind)
    if len(chunks) == 1:
        return pa.array(chunks[0], type=kind)
    return pa.array(list(itertools.chain.from_iterable(chunks)), type=kind)


def warm_up() -> None:
    """Import and run every Arrow/Parquet code path a segment write takes, so the first
    flush in a serving process does not stall it with lazy imports."""
    import io

    table = pa.Table.from_arrays(
        [_column([["x"]], pa.string()), _column([np.zeros(1)], pa.float64())], names=["s", "f"]
    )
    pq.write_table(table, io.BytesIO(), compression=COMPRESSION)


def segment_files(directory: str | os.PathLike[str], stream: str) -> list[Path]:
    """Finished segments of one stream (``records`` or ``labels``), oldest name first."""
    folder = Path(directory) / stream
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.parquet"))


def _written_before(paths: list[Path], moment: datetime) -> list[bool]:
    """Whether each segment was written before ``moment`` (the write time is in its name,
    and it is later than the time of every row in the segment)."""
    cutoff = moment.astimezone(UTC).strftime(STAMP_FORMAT)
    return [path.name.split("-", 2)[1] < cutoff for path in paths]


def purge_segments(directory: str | os.PathLike[str], stream: str, older_than: datetime) -> int:
    """Delete the stream's segments written before ``older_than`` (every row in such a
    segment is older); returns how many."""
    files = segment_files(directory, stream)
    removed = 0
    for path, old in zip(files, _written_before(files, older_than), strict=True):
        if old:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def segments_since(directory: str | os.PathLike[str], stream: str, since: datetime) -> list[Path]:
    """The stream's segments that may hold rows at or after ``since``: a segment written
    before it (less ``CLOCK_SLACK``) holds only older rows."""
    files = segment_files(directory, stream)
    old = _written_before(files, since - CLOCK_SLACK)
    return [path for path, before in zip(files, old, strict=True) if not before]


def _read_stream(
    directory: str | os.PathLike[str],
    stream: str,
    schema: pa.Schema,
    time_column: str,
    since: datetime | None,
    until: datetime | None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    files = segment_files(directory, stream) if since is None else segments_since(
        directory, stream, since
    )  # fmt: skip
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    if not files:
        return schema.empty_table()
    wanted = list(columns) if columns is not None else None
    tables = [pq.read_table(f, columns=wanted) for f in files]
    table = pa.concat_tables(tables, promote_options="default")
    if since is not None:
        table = table.filter(pc.greater_equal(table[time_column], pa.scalar(since, _TIME)))
    if until is not None:
        table = table.filter(pc.less(table[time_column], pa.scalar(until, _TIME)))
    return table


def read_records(
    directory: str | os.PathLike[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pa.Table:
    """Every paired record with ``since <= time < until`` (features only if recorded)."""
    return _read_stream(directory, RECORDS, RECORD_SCHEMA, "time", since, until)


def read_predictions(
    directory: str | os.PathLike[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Logged primary predictions with ``since <= time < until`` (only ``columns``, which
    must include ``time``, when given)."""
    return _read_stream(directory, PREDICTIONS, PREDICTION_SCHEMA, "time", since, until, columns)


def read_labels(directory: str | os.PathLike[str]) -> pa.Table:
    """Every stored label (all of them: a label may arrive long after its request)."""
    return _read_stream(directory, LABELS, LABEL_SCHEMA, "labelled_at", None, None)


def latest_labels(labels: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """Label per request id and per transaction id; the latest ``labelled_at`` wins."""
    by_request: dict[str, int] = {}
    by_transaction: dict[str, int] = {}
    if not labels.num_rows:
        return by_request, by_transaction
    order = pc.sort_indices(labels, [("labelled_at", "ascending"), ("received_at", "ascending")])
    ordered = labels.take(order)
    for request_id, transaction_id, label in zip(
        ordered["request_id"].to_pylist(),
        ordered["transaction_id"].to_pylist(),
        ordered["label"].to_pylist(),
        strict=True,
    ):
        if request_id:
            by_request[request_id] = label
        if transaction_id:
            by_transaction[transaction_id] = label
    return by_request, by_transaction


def join_labels(records: pa.Table, labels: pa.Table) -> pa.Table:
    """``records`` with a nullable int8 ``label`` column (by request id, else transaction id)."""
    by_request, by_transaction = latest_labels(labels)
    joined: list[int | None] = []
    for request_id, transaction_id in zip(
        records["request_id"].to_pylist(), records["transaction_id"].to_pylist(), strict=True
    ):
        label = by_request.get(request_id) if request_id else None
        if label is None and transaction_id:
            label = by_transaction.get(transaction_id)
        joined.append(label)
    return records.append_column("label", pa.array(joined, type=pa.int8()))


def utc(text: str) -> datetime:
    """Parse ``2026-11-26``, ``2026-11-26T10:00`` or epoch milliseconds as a UTC time."""
    text = text.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def write_joined(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a joined table to one Parquet file atomically."""
    from riskwire.pipeline.data import write_table

    return write_table(table, path)
