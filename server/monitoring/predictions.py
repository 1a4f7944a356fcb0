"""The prediction log: every primary answer (or a sample), for live performance once
delayed labels arrive.

Handlers append a tuple to a deque (no lock, no I/O). A background thread takes what
accumulated, a slice at a time, and hands it to the writer: by default a process of its
own at low priority (``server/monitoring/prediction_writer.py``) that turns the rows into
columns and writes Parquet segments under ``<shadow_dir>/predictions/`` (the same
atomic segment writer as the shadow records, next to the labels it is joined with);
with ``writer="thread"``, the thread does that itself, in the worker.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

from riskwire.shadow.records import (
    PREDICTION_SCHEMA,
    PREDICTIONS,
    RAW_COLUMNS,
    SegmentWriter,
)

from .prediction_writer import SegmentProcess, singles_columns

log = logging.getLogger(__name__)
_DRAIN_SLICE = 512  # queued calls handed to the writer at a time
WRITERS = ("process", "thread")


def _picker(rows: list[int]) -> Callable[[Sequence], tuple]:
    """A function taking the items at ``rows`` (in order) of a sequence, as a tuple."""
    if len(rows) == 1:
        row = rows[0]
        return lambda values: (values[row],)
    return itemgetter(*rows)


@dataclass(frozen=True, slots=True)
class _Batch:
    """The scored rows of one batch call, as the handler had them."""

    request_id: str
    rows: np.ndarray  # row numbers in the request
    time_ms: int
    model: str
    version: str
    probabilities: np.ndarray
    decisions: np.ndarray
    card_keys: np.ndarray
    event_times: np.ndarray  # as scored, ms
    columns: Mapping[str, Sequence]  # the request's columns, as received
    features: np.ndarray  # one row per scored row
    flags: Sequence[tuple[str, ...]]  # per request row


class PredictionLog:
    """One worker's prediction log: answers with their inputs as received and features
    as served. Raw card ids are left out (null) unless ``card_ids`` allows them.

    ``writer`` is where segments are built and written: ``"process"`` (a process of the
    worker's own, started by :meth:`start`; when it cannot be started, as with
    ``"thread"``) or ``"thread"`` (this worker's background thread)."""

    def __init__(
        self,
        directory: Path,
        worker: int,
        *,
        rate_percent: float = 100.0,
        card_ids: bool = False,
        flush_rows: int = 10_000,
        flush_seconds: float = 5.0,
        drain_s: float = 0.5,
        writer: str = "thread",
    ) -> None:
        if writer not in WRITERS:
            raise ValueError(f"prediction log writer {writer!r} is not one of {WRITERS}")
        self.worker = worker
        self.rate_percent = rate_percent
        self.card_ids = card_ids
        self._pending: deque = deque()
        self._random = random.random
        self._writer: SegmentWriter | SegmentProcess = SegmentWriter(
            directory / PREDICTIONS,
            PREDICTION_SCHEMA,
            worker=worker,
            flush_rows=flush_rows,
            flush_seconds=flush_seconds,
        )
        self._process: SegmentProcess | None = None
        if writer == "process":
            self._process = SegmentProcess(
                directory,
                worker,
                rate_percent=rate_percent,
                card_ids=card_ids,
                flush_rows=flush_rows,
                flush_seconds=flush_seconds,
            )
        self._drain_s = drain_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def sampled(self) -> bool:
        """Whether to log this answer (a ``rate_percent`` draw): ask before building the
        arguments of :meth:`add_one`."""
        return self.rate_percent >= 100.0 or self._random() * 100.0 < self.rate_percent

    def add_one(
        self,
        request_id: str,
        transaction_id: str,
        time_ms: int,
        model: str,
        version: str,
        probability: float,
        decision: str,
        card_key: int,
        raw: tuple,
        features: bytes,
        flags: tuple[str, ...],
    ) -> None:
        """Log one answer the caller chose with :meth:`sampled`. ``raw`` holds the inputs
        as received in :data:`RAW_COLUMNS` order (event time as scored, in ms);
        ``features`` is the served feature row as float64 bytes (``row.tobytes()``)."""
        self._pending.append(
            (request_id, transaction_id, time_ms, model, version, probability, decision,
             card_key, raw, features, flags)
        )  # fmt: skip

    def add_many(
        self,
        request_id: str,
        rows: np.ndarray,
        time_ms: int,
        model: str,
        version: str,
        probabilities: np.ndarray,
        decisions: np.ndarray,
        card_keys: np.ndarray,
        event_times: np.ndarray,
        columns: Mapping[str, Sequence],
        features: np.ndarray,
        flags: Sequence[tuple[str, ...]],
    ) -> None:
        """Log the scored rows of a batch call (ids ``<request_id>/<row>``): ``rows`` are
        their numbers in the request's ``columns``; the other arrays have one entry per
        scored row. The strings are built by the background thread, not here."""
        if self.rate_percent < 100.0:
            keep = np.random.random(len(rows)) * 100.0 < self.rate_percent
            rows, probabilities, decisions = rows[keep], probabilities[keep], decisions[keep]
            card_keys, event_times, features = card_keys[keep], event_times[keep], features[keep]
        if len(rows):
            self._pending.append(
                _Batch(request_id, rows, time_ms, model, version, probabilities, decisions,
                       card_keys, event_times, columns, features, flags)
            )  # fmt: skip

    @property
    def pending(self) -> int:
        """Calls waiting for the writer thread."""
        return len(self._pending)

    @property
    def writer_restarts(self) -> int:
        """Writer processes that died and were replaced (0 when written in-process)."""
        return self._process.restarts if self._process is not None else 0

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None when segments are written in this process)."""
        return self._writer.process_pid if isinstance(self._writer, SegmentProcess) else None

    def start(self) -> None:
        """Start the writer process (when asked for) and the background thread."""
        if self._process is not None:
            try:
                self._process.start()
                self._writer = self._process
            except OSError as exc:
                log.error("prediction log writer process not started, writing here: %s", exc)
        self._thread.start()

    def flush(self) -> None:
        """Return once every answer logged so far is in a segment on disk (for tests and
        tools; the background thread must not be draining at the same time)."""
        self._drain()
        self._writer.flush()

    def stop(self) -> None:
        """Write everything pending (and end the writer process)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._drain()
        if isinstance(self._writer, SegmentProcess):
            self._writer.close()  # it writes what it received, then exits
        else:
            self._writer.flush()

    def _drain(self) -> None:
        pending = self._pending
        try:
            while pending:
                # Slices, with the GIL offered between them: a request thread waits for
                # one slice's column building at most, not for the whole backlog's.
                items = [pending.popleft() for _ in range(min(len(pending), _DRAIN_SLICE))]
                singles = [item for item in items if not isinstance(item, _Batch)]
                if singles:
                    self._add_singles(singles)
                for item in items:
                    if isinstance(item, _Batch):
                        self._writer.add_rows(self._batch_columns(item))
                time.sleep(0)
        except OSError as exc:
            log.error("prediction log could not be written: %s", exc)

    def _add_singles(self, singles: list[tuple]) -> None:
        writer = self._writer
        if isinstance(writer, SegmentProcess):
            writer.add_singles(singles)  # the process builds their columns
        else:
            writer.add_rows(singles_columns(singles, self.worker, self.rate_percent, self.card_ids))

    def _batch_columns(self, batch: _Batch) -> list[Sequence]:
        rows = batch.rows.tolist()
        n, columns = len(rows), batch.columns
        pick = _picker(rows)  # the logged rows of a request column, in C
        tids = columns.get("transaction_id")
        return [
            [f"{batch.request_id}/{i}" for i in rows],
            pick(tids) if tids else ("",) * n,
            (batch.time_ms,) * n, (self.worker,) * n, (batch.model,) * n, (batch.version,) * n,
            batch.probabilities.tolist(), batch.decisions.tolist(), batch.card_keys.tolist(),
            pick(columns["card_id"]) if self.card_ids else (None,) * n,
            *(pick(columns[name]) for name in RAW_COLUMNS[1:-1]), batch.event_times.tolist(),
            (self.rate_percent / 100.0,) * n,
            [";".join(f) if f else None for f in pick(batch.flags)], *batch.features.T,
        ]  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self._drain_s):
            self._drain()
            try:
                self._writer.maybe_flush()
            except OSError as exc:
                log.error("prediction log could not be written: %s", exc)
