"""The prediction log: every primary answer (or a sample), for live performance once
delayed labels arrive.

Handlers append a tuple to a deque (no lock, no I/O); a background thread moves what
accumulated into Parquet segments under ``<shadow_dir>/predictions/`` (the same
atomic segment writer as the shadow records, next to the labels it is joined with).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from riskwire.shadow.records import PREDICTION_SCHEMA, PREDICTIONS, SegmentWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Batch:
    """The scored rows of one batch call, as the handler had them."""

    request_id: str
    transaction_ids: Sequence[str] | None
    rows: np.ndarray
    time_ms: np.ndarray
    model: str
    version: str
    probabilities: np.ndarray
    decisions: np.ndarray


class PredictionLog:
    """One worker's prediction log."""

    def __init__(
        self,
        directory: Path,
        worker: int,
        *,
        rate_percent: float = 100.0,
        flush_rows: int = 10_000,
        flush_seconds: float = 5.0,
        drain_s: float = 0.5,
    ) -> None:
        self.worker = worker
        self.rate_percent = rate_percent
        self._pending: deque = deque()
        self._random = random.random
        self._writer = SegmentWriter(
            directory / PREDICTIONS,
            PREDICTION_SCHEMA,
            worker=worker,
            flush_rows=flush_rows,
            flush_seconds=flush_seconds,
        )
        self._drain_s = drain_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def add_one(
        self,
        request_id: str,
        transaction_id: str,
        time_ms: int,
        model: str,
        version: str,
        probability: float,
        decision: str,
    ) -> None:
        """Log one answer (sampled at ``rate_percent``)."""
        if self.rate_percent < 100.0 and self._random() * 100.0 >= self.rate_percent:
            return
        self._pending.append(
            (request_id, transaction_id, time_ms, model, version, probability, decision)
        )

    def add_many(
        self,
        request_id: str,
        transaction_ids: Sequence[str] | None,
        rows: np.ndarray,
        time_ms: np.ndarray,
        model: str,
        version: str,
        probabilities: np.ndarray,
        decisions: np.ndarray,
    ) -> None:
        """Log the scored rows of a batch call (ids ``<request_id>/<row>``); the strings
        are built by the background thread, not here."""
        if self.rate_percent < 100.0:
            keep = np.random.random(len(rows)) * 100.0 < self.rate_percent
            rows, time_ms = rows[keep], time_ms[keep]
            probabilities, decisions = probabilities[keep], decisions[keep]
        if len(rows):
            self._pending.append(
                _Batch(request_id, transaction_ids, rows, time_ms, model, version,
                       probabilities, decisions)
            )  # fmt: skip

    @property
    def pending(self) -> int:
        """Calls waiting for the writer thread."""
        return len(self._pending)

    def start(self) -> None:
        """Start the background writer."""
        self._thread.start()

    def stop(self) -> None:
        """Write everything pending."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._drain()
        self._writer.flush()

    def _drain(self) -> None:
        pending = self._pending
        items = [pending.popleft() for _ in range(len(pending))]
        singles = [item for item in items if not isinstance(item, _Batch)]
        columns = []
        if singles:
            ids, transactions, times, models, versions, probabilities, decisions = zip(
                *singles, strict=True
            )
            columns.append(
                [
                    list(ids), list(transactions), list(times), [self.worker] * len(singles),
                    list(models), list(versions), list(probabilities), list(decisions),
                ]
            )  # fmt: skip
        for batch in (item for item in items if isinstance(item, _Batch)):
            rows = batch.rows.tolist()
            n, tids = len(rows), batch.transaction_ids
            columns.append(
                [
                    [f"{batch.request_id}/{i}" for i in rows],
                    [tids[i] for i in rows] if tids else [""] * n,
                    batch.time_ms.tolist(), [self.worker] * n, [batch.model] * n,
                    [batch.version] * n, batch.probabilities.tolist(), list(batch.decisions),
                ]
            )  # fmt: skip
        try:
            for chunk in columns:
                self._writer.add_rows(chunk)
        except OSError as exc:
            log.error("prediction log could not be written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self._drain_s):
            self._drain()
            try:
                self._writer.maybe_flush()
            except OSError as exc:
                log.error("prediction log could not be written: %s", exc)
