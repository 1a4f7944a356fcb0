"""Delayed ground truth (Feedback RPC) stored durably as Parquet label segments."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .records import LABEL_SCHEMA, LABELS, SegmentWriter

MAX_ID_CHARS = 256


class LabelStore:
    """One worker's label sink: :meth:`store` returns once the labels are on disk.

    Concurrent calls share one segment write (group commit), so a burst of single-label
    calls does not become a burst of fsyncs and files.
    """

    def __init__(self, directory: str | os.PathLike[str], worker: int) -> None:
        self.worker = worker
        self._writer = SegmentWriter(
            Path(directory) / LABELS,
            LABEL_SCHEMA,
            worker=worker,
            flush_rows=1 << 30,  # every store() flushes; these never trigger on their own
            flush_seconds=float("inf"),
        )

    def store(self, outcomes: Sequence[tuple[str, str, int, int]]) -> int:
        """Write (request_id, transaction_id, label 0/1, labelled_at_ms) rows durably;
        ``labelled_at_ms`` 0 means now. Returns the number stored."""
        if not outcomes:
            return 0
        now = time.time_ns() // 1_000_000
        request_ids, transaction_ids, labels, labelled_at = zip(*outcomes, strict=True)
        rows = len(outcomes)
        mark = self._writer.add_rows(
            [
                list(request_ids),
                list(transaction_ids),
                list(labels),
                [t or now for t in labelled_at],
                [now] * rows,
                [self.worker] * rows,
            ]
        )
        self._writer.flush_through(mark)
        return rows
