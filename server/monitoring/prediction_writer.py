"""The prediction log's segment writer, in a process of its own at low priority.

    worker: request threads ── tuples ──▶ deque ──▶ drain thread (512 at a time, pickled)
                                                        │ socket pair
                                                        ▼
    writer process (nice 19): columns ──▶ SegmentWriter ──▶ <shadow_dir>/predictions/

Turning the logged rows into columns and Arrow arrays, and writing a Parquet segment,
takes ~2.5 µs of CPU per row. In the worker, that ran on the one core the worker is
pinned to, in bursts (a segment: ~15 ms), holding its GIL or at the priority of the
thread that answers requests. Here it runs on any core at nice 19, so a request thread
that wakes up takes the core back at once, and it shares no GIL with the worker. The
worker only pickles the rows it queued (~0.3 µs each, ~280 bytes).

The worker's side, :class:`SegmentProcess`, has the methods of
:class:`~riskwire.shadow.records.SegmentWriter` the prediction log uses. Segments keep the
worker's number and pid in their names, as if the worker had written them.

The process ignores SIGTERM and SIGINT and ends when the worker closes the socket or
dies (end of file): it then writes what it received. A process that dies is restarted
(at most once per second) and the batch being sent is sent again; the rows it had
received for its next segment are lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from riskwire.shadow import child_process
from riskwire.shadow.records import PREDICTION_SCHEMA, PREDICTIONS, SegmentWriter

log = logging.getLogger(__name__)

FLUSHED = "flushed"
REPLY_TIMEOUT_S = 30.0  # a flush (or the final one, at close) must finish within this
RESTART_INTERVAL_S = 1.0  # at most one restart of a dead process per interval
SEND_ATTEMPTS = 3  # a batch is sent to at most this many processes before it is dropped
POLL_S = 0.25  # the process's check for segments due by age


def singles_columns(
    singles: Sequence[tuple], worker: int, rate_percent: float, card_ids: bool
) -> list[Sequence]:
    """Columns in :data:`PREDICTION_SCHEMA` order of single-row answers, each as
    :meth:`PredictionLog.add_one` queued it."""
    (ids, transactions, times, models, versions, probabilities, decisions, card_keys,
     raws, features, flags) = zip(*singles, strict=True)  # fmt: skip
    n = len(singles)
    raw_columns = list(zip(*raws, strict=True))
    if not card_ids:
        raw_columns[0] = (None,) * n
    matrix = np.frombuffer(b"".join(features), "<f8").reshape(n, -1)
    return [
        ids, transactions, times, (worker,) * n, models, versions, probabilities,
        decisions, card_keys, *raw_columns, (rate_percent / 100.0,) * n,
        [";".join(f) if f else None for f in flags], *matrix.T,
    ]  # fmt: skip


class SegmentProcess:
    """The worker's side of its prediction-log writer process (its methods may be called
    from any thread)."""

    def __init__(
        self,
        directory: Path,
        worker: int,
        *,
        rate_percent: float,
        card_ids: bool,
        flush_rows: int,
        flush_seconds: float,
    ) -> None:
        self.worker = worker
        self._start = {
            "directory": str(directory / PREDICTIONS),
            "worker": worker,
            "pid": os.getpid(),
            "rate_percent": rate_percent,
            "card_ids": card_ids,
            "flush_rows": flush_rows,
            "flush_seconds": flush_seconds,
        }
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()  # one message at a time on the socket
        self.restarts = 0

    @property
    def process_pid(self) -> int | None:
        """The writer process's pid (None before it starts)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process (raises OSError when it cannot be started)."""
        self._process, self._conn = child_process.spawn(__name__)
        self._started_at = time.monotonic()
        self._conn.send(("start", self._start))

    def add_singles(self, singles: list[tuple]) -> None:
        """Send single-row answers as :class:`PredictionLog` queued them; blocks while
        the process is behind."""
        self._send(("singles", singles))

    def add_rows(self, columns: Sequence[Sequence]) -> None:
        """Send rows given column-wise in :data:`PREDICTION_SCHEMA` order."""
        self._send(("rows", columns))

    def maybe_flush(self, now: float | None = None) -> None:
        """Restart the process if it died, at most once per ``RESTART_INTERVAL_S`` (the
        process writes segments by itself)."""
        with self._lock:
            process = self._process
            if time.monotonic() - self._started_at < RESTART_INTERVAL_S:
                return
            if process is not None and process.poll() is not None:
                log.error(
                    "prediction log writer of worker %d exited (%s)",
                    self.worker,
                    process.returncode,
                )
                self._restart()

    def flush(self) -> None:
        """Return once every row sent so far is in a segment on disk."""
        with self._lock:
            self._send_locked(("flush",))
            conn = self._conn
            if conn is None or not conn.poll(REPLY_TIMEOUT_S):
                raise OSError("prediction log writer did not confirm the flush")
            reply = conn.recv()
        if reply != FLUSHED:
            raise OSError(f"prediction log writer: {reply}")

    def close(self) -> None:
        """Let the process write what it received and exit (within a timeout)."""
        with self._lock:
            name = "prediction log writer"
            child_process.finish(self._conn, self._process, REPLY_TIMEOUT_S, name)
            self._conn = None

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple) -> None:
        """Send, restarting a dead process and sending again; OSError when it cannot."""
        for attempt in range(SEND_ATTEMPTS):
            conn = self._conn
            try:
                if conn is None:
                    raise BrokenPipeError("no writer process")
                conn.send(message)
                return
            except OSError as exc:
                log.error("prediction log writer of worker %d is gone: %s", self.worker, exc)
                if attempt == SEND_ATTEMPTS - 1:
                    raise
                time.sleep(max(0.0, self._started_at + RESTART_INTERVAL_S - time.monotonic()))
                self._restart()

    def _restart(self) -> None:
        child_process.kill(self._conn, self._process)
        self._conn = None
        self.restarts += 1
        self.start()


def serve(conn: Connection, writer: SegmentWriter, start: dict) -> None:
    """Write the worker's rows into segments until it closes the socket."""
    try:
        while True:
            try:
                message = conn.recv() if conn.poll(POLL_S) else None
            except (EOFError, OSError):  # the worker closed the socket or died
                return
            try:
                if message is not None:
                    _handle(message, conn, writer, start)
                writer.maybe_flush()
            except OSError as exc:  # a segment could not be written: its rows are lost
                log.error("prediction log could not be written: %s", exc)
                if message is not None and message[0] == "flush":
                    with contextlib.suppress(OSError):
                        conn.send(f"flush failed: {exc}")
    finally:
        writer.flush()


def _handle(message: tuple, conn: Connection, writer: SegmentWriter, start: dict) -> None:
    kind = message[0]
    if kind == "singles":
        worker, rate, card_ids = start["worker"], start["rate_percent"], start["card_ids"]
        writer.add_rows(singles_columns(message[1], worker, rate, card_ids))
    elif kind == "rows":
        writer.add_rows(message[1])
    elif kind == "flush":
        writer.flush()
        conn.send(FLUSHED)
    else:
        log.error("prediction log writer: unknown message %r", kind)


def main(argv: list[str] | None = None) -> int:
    """``python -m riskwire.server.monitoring.prediction_writer FD``: write the batches
    that come on the socket ``FD``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker's end of file stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int((argv if argv is not None else sys.argv[1:])[0]))
    kind, start = conn.recv()
    if kind != "start":
        raise SystemExit(f"prediction log writer: expected 'start', got {kind!r}")
    child_process.run_anywhere()  # not only the worker's core
    with contextlib.suppress(OSError):
        os.nice(19)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s prediction-log w{start['worker']} %(levelname)s %(message)s",
    )
    writer = SegmentWriter(
        start["directory"],
        PREDICTION_SCHEMA,
        worker=start["worker"],
        pid=start["pid"],
        flush_rows=start["flush_rows"],
        flush_seconds=start["flush_seconds"],
    )
    serve(conn, writer, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
