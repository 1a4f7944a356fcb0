"""Human-in-the-loop review queue: cases to label, persisted in SQLite (WAL mode).

    request path ── ReviewSink.wants(decision) → p ── offer(…) ──▶ deque (bounded; full →
                                                                    dropped, counted)
                                                          │ drain thread, every flush_s
                                                          ▼
                       ReviewQueue.enqueue_many  ──▶  <shadow dir>/review.sqlite
                                                          │ riskwire review next / label
                                                          ▼
          label in SQLite ──▶ sync_labels ──▶ LabelStore (Parquet, worker REVIEW_LABEL_WORKER)

A case is a scored request whose decision was ``review`` (inclusion probability 1) or,
so the labelled set is not only the grey zone, a random sample of the other decisions
(inclusion probability ``sample_rate``; a data export weights a case by ``1 / p``). A
case holds what the model saw and said (features as served, score, decision, top
reasons) and the keyed hash of its card (``card_hash``, the 64-bit key the feature
kernels use, as hex): never a raw card id.

Reviewers lease cases (``lease_next``): one ``BEGIN IMMEDIATE`` transaction picks the
oldest pending case (``review`` decisions first) or one whose lease has expired, so two
reviewers, threads or processes never hold the same case while its lease is live.
Every thread and process opens its own connection (SQLite connections are not shared).

Verdicts reach the label store at least once: the verdict is committed in SQLite with
``exported = 0`` first, written to the label store, then marked exported. A crash in
between leaves it unexported, and the next :func:`sync_labels` (``riskwire review sync``
or any ``review label``) writes it again; a duplicate label row is harmless (readers take
the latest ``labelled_at`` per request).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ErrorCode, FailedPreconditionError, ServingError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
QUEUE_FILE = "review.sqlite"  # under the shadow directory, beside records/ and labels/
# ``worker`` of the label segments written for review verdicts (LABEL_SCHEMA: int16).
# Server workers number 0..N-1; 1000 keeps review labels apart from Feedback RPC ones.
REVIEW_LABEL_WORKER = 1000
REVIEW, SAMPLE = "review", "sample"  # why a case was queued
STATUSES = ("pending", "leased", "labelled")
MAX_NOTE_CHARS = 2000
MAX_REVIEWER_CHARS = 256
_DEFAULT_BUSY_TIMEOUT_MS = 10_000
_DEFAULT_LEASE_S = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    enqueued_at_ms INTEGER NOT NULL,
    event_time_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    probability REAL NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL CHECK (reason IN ('review', 'sample')),
    priority INTEGER NOT NULL,                 -- 0 for 'review', 1 for 'sample'
    inclusion_probability REAL NOT NULL,
    card_hash TEXT NOT NULL,
    features TEXT NOT NULL,                    -- JSON object: feature name -> value
    top_reasons TEXT NOT NULL,                 -- JSON list of [feature, contribution, value]
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'leased', 'labelled')),
    lease_owner TEXT,
    lease_until_ms INTEGER,
    label INTEGER CHECK (label IN (0, 1)),
    labelled_by TEXT,
    labelled_at_ms INTEGER,
    note TEXT,
    label_revision INTEGER NOT NULL DEFAULT 0, -- bumped by every verdict (relabels too)
    exported INTEGER NOT NULL DEFAULT 0        -- verdict written to the label store
);
CREATE INDEX IF NOT EXISTS cases_open ON cases (priority, enqueued_at_ms, case_id)
    WHERE status <> 'labelled';
CREATE INDEX IF NOT EXISTS cases_card ON cases (card_hash, event_time_ms);
CREATE INDEX IF NOT EXISTS cases_unexported ON cases (case_id)
    WHERE status = 'labelled' AND exported = 0;
CREATE INDEX IF NOT EXISTS cases_labelled ON cases (labelled_at_ms) WHERE status = 'labelled';
"""


class CaseNotFoundError(ServingError):
    """No case with that id is in the queue."""

    code = ErrorCode.NOT_FOUND


class CaseConflictError(FailedPreconditionError):
    """The case cannot change now: leased by another reviewer, or already labelled."""


def now_ms() -> int:
    """Wall-clock epoch milliseconds."""
    return time.time_ns() // 1_000_000


def queue_path(shadow_dir: str | os.PathLike[str]) -> Path:
    """Where the review queue of a shadow directory lives."""
    return Path(shadow_dir) / QUEUE_FILE


def card_hash(card_key: int) -> str:
    """The card's keyed 64-bit hash (``encoding.hash64``) as 16 hex digits."""
    return f"{int(card_key) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


@dataclass(frozen=True, slots=True)
class NewCase:
    """A scored request to queue (``enqueued_at_ms`` 0: the queue's clock)."""

    request_id: str
    transaction_id: str
    event_time_ms: int
    model: str
    version: str
    probability: float
    decision: str
    reason: str  # REVIEW or SAMPLE
    inclusion_probability: float
    card_hash: str
    features: dict[str, float | None]
    top_reasons: list[tuple[str, float, float]]
    enqueued_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Case:
    """A queued case as stored."""

    case_id: int
    request_id: str
    transaction_id: str
    enqueued_at_ms: int
    event_time_ms: int
    model: str
    version: str
    probability: float
    decision: str
    reason: str
    inclusion_probability: float
    card_hash: str
    features: dict[str, float | None]
    top_reasons: list[tuple[str, float, float]]
    status: str
    lease_owner: str | None
    lease_until_ms: int | None
    label: int | None
    labelled_by: str | None
    labelled_at_ms: int | None
    note: str | None
    label_revision: int
    exported: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


_CASE_COLUMNS = ", ".join(Case.__dataclass_fields__)


def _case(row: sqlite3.Row) -> Case:
    values = dict(row)
    values["features"] = json.loads(values["features"])
    values["top_reasons"] = [tuple(r) for r in json.loads(values["top_reasons"])]
    values["exported"] = bool(values["exported"])
    return Case(**values)


class ReviewQueue:
    """The persistent review queue in one SQLite file; safe across threads and processes.

    Each thread (and each process: a forked or spawned child reconnects) gets its own
    connection. Writers serialise on SQLite's lock and wait up to ``busy_timeout_ms``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = _DEFAULT_BUSY_TIMEOUT_MS,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be >= 0, got {busy_timeout_ms}")
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.clock_ms = clock_ms
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_schema()

    # ------------------------------------------------------------------ plumbing
    def _connection(self) -> sqlite3.Connection:
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # a verdict is human work: fsync it
        self._local.held = (os.getpid(), conn)
        return conn

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction (the write lock up front, so
        a read-then-update cannot race another writer)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full, …)
                conn.execute("ROLLBACK")
            raise
        return result

    def _create_schema(self) -> None:
        """Create the tables once (``PRAGMA user_version`` holds the schema version).

        Statement by statement inside one transaction: ``executescript`` would commit
        first, letting two processes opening a new file race each other."""

        def create(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: review queue schema {version} is newer than this "
                    f"riskwire's ({SCHEMA_VERSION}); upgrade riskwire"
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        self._write(create)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's data goes)."""
        held = getattr(self._local, "held", None)
        if held is not None:
            self._local.held = None
            if held[0] == os.getpid():
                held[1].close()

    def _fetch(self, conn: sqlite3.Connection, case_id: int) -> Case:
        row = conn.execute(
            f"SELECT {_CASE_COLUMNS} FROM cases WHERE case_id = ?", (case_id,)
        ).fetchone()
        if row is None:
            raise CaseNotFoundError(f"no case {case_id} in the review queue {self.path}")
        return _case(row)

    # ------------------------------------------------------------------ writers
    def enqueue_many(self, cases: Iterable[NewCase]) -> list[int]:
        """Queue ``cases`` in one transaction; returns their case ids in order."""
        now = self.clock_ms()
        rows = [
            (
                c.request_id, c.transaction_id, c.enqueued_at_ms or now, c.event_time_ms,
                c.model, c.version, float(c.probability), c.decision, c.reason,
                0 if c.reason == REVIEW else 1, float(c.inclusion_probability), c.card_hash,
                json.dumps(c.features, allow_nan=False),
                json.dumps([list(r) for r in c.top_reasons], allow_nan=False),
            )
            for c in cases
        ]  # fmt: skip
        if not rows:
            return []

        def insert(conn: sqlite3.Connection) -> list[int]:
            ids = []
            for row in rows:
                cursor = conn.execute(
                    "INSERT INTO cases (request_id, transaction_id, enqueued_at_ms, "
                    "event_time_ms, model, version, probability, decision, reason, priority, "
                    "inclusion_probability, card_hash, features, top_reasons) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                ids.append(cursor.lastrowid)
            return ids

        return self._write(insert)

    def lease_next(self, reviewer: str, lease_s: float = _DEFAULT_LEASE_S) -> Case | None:
        """Lease the next case to ``reviewer`` for ``lease_s`` seconds; None when none is left.

        A reviewer who already holds a live lease gets that case again (lease renewed), so
        calling ``next`` twice does not strand a case. Otherwise the oldest pending case,
        or one whose lease expired, is taken: ``review`` decisions before sampled ones.
        """
        _check_reviewer(reviewer)
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")

        def take(conn: sqlite3.Connection) -> Case | None:
            now = self.clock_ms()
            held = conn.execute(
                "SELECT case_id FROM cases WHERE status = 'leased' AND lease_owner = ? "
                "AND lease_until_ms > ? ORDER BY case_id LIMIT 1",
                (reviewer, now),
            ).fetchone()
            if held is None:
                held = conn.execute(
                    "SELECT case_id FROM cases WHERE status <> 'labelled' "
                    "AND (status = 'pending' OR lease_until_ms <= ?) "
                    "ORDER BY priority, enqueued_at_ms, case_id LIMIT 1",
                    (now,),
                ).fetchone()
            if held is None:
                return None
            conn.execute(
                "UPDATE cases SET status = 'leased', lease_owner = ?, lease_until_ms = ? "
                "WHERE case_id = ?",
                (reviewer, now + math.ceil(lease_s * 1000), held[0]),
            )
            return self._fetch(conn, held[0])

        return self._write(take)

    def label(
        self, case_id: int, label: int, reviewer: str, note: str = "", *, force: bool = False
    ) -> Case:
        """Record ``reviewer``'s verdict (1 fraud, 0 legitimate) on a case.

        Allowed on a pending case, on one leased by ``reviewer``, or on one whose lease
        (by anyone) has expired. A labelled case is refused unless ``force`` (a relabel:
        the new verdict is exported again and wins, being later).
        """
        _check_reviewer(reviewer)
        if label not in (0, 1):
            raise ValueError(f"label must be 0 (legitimate) or 1 (fraud), got {label!r}")
        if len(note) > MAX_NOTE_CHARS:
            raise ValueError(f"note: at most {MAX_NOTE_CHARS} characters, got {len(note)}")

        def record(conn: sqlite3.Connection) -> Case:
            now = self.clock_ms()
            case = self._fetch(conn, case_id)
            if case.status == "labelled" and not force:
                raise CaseConflictError(
                    f"case {case_id} is already labelled {_verdict(case.label)} by "
                    f"{case.labelled_by} (force a relabel: --force)"
                )
            if _leased_by_other(case, reviewer, now) and not force:
                raise CaseConflictError(
                    f"case {case_id} is leased by {case.lease_owner} for another "
                    f"{(case.lease_until_ms - now) / 1000:.0f} s"
                )
            conn.execute(
                "UPDATE cases SET status = 'labelled', label = ?, labelled_by = ?, "
                "labelled_at_ms = ?, note = ?, lease_owner = NULL, lease_until_ms = NULL, "
                "label_revision = label_revision + 1, exported = 0 WHERE case_id = ?",
                (label, reviewer, now, note or None, case_id),
            )
            return self._fetch(conn, case_id)

        return self._write(record)

    def release(self, case_id: int, reviewer: str, *, force: bool = False) -> Case:
        """Give a leased case back to the queue (only its lease holder, unless ``force``)."""

        def give_back(conn: sqlite3.Connection) -> Case:
            case = self._fetch(conn, case_id)
            if case.status != "leased":
                raise CaseConflictError(f"case {case_id} is {case.status}, not leased")
            if case.lease_owner != reviewer and not force:
                raise CaseConflictError(f"case {case_id} is leased by {case.lease_owner}")
            conn.execute(
                "UPDATE cases SET status = 'pending', lease_owner = NULL, "
                "lease_until_ms = NULL WHERE case_id = ?",
                (case_id,),
            )
            return self._fetch(conn, case_id)

        return self._write(give_back)

    def mark_exported(self, revisions: Iterable[tuple[int, int]]) -> int:
        """Mark verdicts as written to the label store; ``revisions`` are (case_id,
        label_revision) as read, so a relabel made meanwhile stays unexported."""
        pairs = list(revisions)

        def mark(conn: sqlite3.Connection) -> int:
            cursor = conn.executemany(
                "UPDATE cases SET exported = 1 WHERE case_id = ? AND label_revision = ?",
                pairs,
            )
            return cursor.rowcount

        return self._write(mark) if pairs else 0

    def purge(self, older_than_ms: int) -> int:
        """Delete labelled, exported cases labelled before ``older_than_ms`` (retention);
        returns how many. Unexported verdicts and open cases are kept."""

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM cases WHERE status = 'labelled' AND exported = 1 "
                "AND labelled_at_ms < ?",
                (older_than_ms,),
            ).rowcount

        return self._write(delete)

    # ------------------------------------------------------------------ readers
    def get(self, case_id: int) -> Case:
        """One case; :class:`CaseNotFoundError` if it is not (or no longer) queued."""
        return self._fetch(self._connection(), case_id)

    def cases(self, status: str | None = None, *, limit: int = 50) -> list[Case]:
        """Cases with ``status`` (pending/leased/labelled, or ``expired``: leased with an
        expired lease), in lease order for open cases, latest verdict first for labelled
        ones and newest first for all; at most ``limit``."""
        where, order, args = "", "case_id DESC", []
        if status == "expired":
            where, args = "WHERE status = 'leased' AND lease_until_ms <= ?", [self.clock_ms()]
        elif status == "labelled":
            where, order = "WHERE status = 'labelled'", "labelled_at_ms DESC, case_id DESC"
        elif status in STATUSES:
            where, args = "WHERE status = ?", [status]
        elif status is not None:
            raise ValueError(f"status: expected one of {(*STATUSES, 'expired')}, got {status!r}")
        if status in ("pending", "leased", "expired"):
            order = "priority, enqueued_at_ms, case_id"
        rows = self._connection().execute(
            f"SELECT {_CASE_COLUMNS} FROM cases {where} ORDER BY {order} LIMIT ?",
            [*args, limit],
        )
        return [_case(row) for row in rows]

    def card_history(self, card_hash: str, before_ms: int, limit: int = 5) -> list[Case]:
        """The card's cases with ``event_time_ms < before_ms``, latest first.

        Only what the queue holds: the card's queued (review or sampled) requests that
        are not yet purged, not every transaction the card made.
        """
        rows = self._connection().execute(
            f"SELECT {_CASE_COLUMNS} FROM cases WHERE card_hash = ? AND event_time_ms < ? "
            "ORDER BY event_time_ms DESC, case_id DESC LIMIT ?",
            (card_hash, before_ms, limit),
        )
        return [_case(row) for row in rows]

    def inclusion_probabilities(self) -> dict[str, float]:
        """Request id -> the probability its case was queued with (1.0 for ``review``
        decisions, the sample rate for the others), for every case held: the data
        export's sample weights."""
        rows = self._connection().execute("SELECT request_id, inclusion_probability FROM cases")
        return {request_id: float(p) for request_id, p in rows}

    def unexported(self, limit: int = 1000) -> list[tuple[int, int, str, str, int, int]]:
        """Verdicts not yet in the label store: (case_id, label_revision, request_id,
        transaction_id, label, labelled_at_ms), oldest case first."""
        rows = self._connection().execute(
            "SELECT case_id, label_revision, request_id, transaction_id, label, labelled_at_ms "
            "FROM cases WHERE status = 'labelled' AND exported = 0 ORDER BY case_id LIMIT ?",
            (limit,),
        )
        return [tuple(row) for row in rows]

    def stats(self) -> dict[str, Any]:
        """Counts: ``total``, ``by_status``, ``by_reason``, ``by_status_reason``
        (``"status/reason"``), ``expired_leases``, ``unexported`` and ``fraud``/``legit``."""
        conn = self._connection()
        by_status = dict.fromkeys(STATUSES, 0)
        by_reason = dict.fromkeys((REVIEW, SAMPLE), 0)
        by_both: dict[str, int] = {}
        for status, reason, count in conn.execute(
            "SELECT status, reason, COUNT(*) FROM cases GROUP BY status, reason"
        ):
            by_status[status] += count
            by_reason[reason] += count
            by_both[f"{status}/{reason}"] = count
        (expired,) = conn.execute(
            "SELECT COUNT(*) FROM cases WHERE status = 'leased' AND lease_until_ms <= ?",
            (self.clock_ms(),),
        ).fetchone()
        (unexported,) = conn.execute(
            "SELECT COUNT(*) FROM cases WHERE status = 'labelled' AND exported = 0"
        ).fetchone()
        fraud, legit = conn.execute(
            "SELECT COALESCE(SUM(label = 1), 0), COALESCE(SUM(label = 0), 0) FROM cases "
            "WHERE status = 'labelled'"
        ).fetchone()
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_reason": by_reason,
            "by_status_reason": by_both,
            "expired_leases": expired,
            "unexported": unexported,
            "fraud": fraud,
            "legit": legit,
        }


def _check_reviewer(reviewer: str) -> None:
    if not reviewer or len(reviewer) > MAX_REVIEWER_CHARS:
        raise ValueError(f"reviewer: expected 1..{MAX_REVIEWER_CHARS} characters, got {reviewer!r}")


def _leased_by_other(case: Case, reviewer: str, now: int) -> bool:
    return (
        case.status == "leased"
        and case.lease_owner != reviewer
        and (case.lease_until_ms or 0) > now
    )


def _verdict(label: int | None) -> str:
    return {1: "fraud", 0: "legit"}.get(label, "-")  # type: ignore[arg-type]


class LabelSink(Protocol):
    """Where verdicts go (riskwire.shadow.labels.LabelStore)."""

    def store(self, outcomes: Sequence[tuple[str, str, int, int]]) -> int: ...


def sync_labels(queue: ReviewQueue, labels: LabelSink, *, batch: int = 1000) -> int:
    """Write every verdict not yet exported to ``labels``, then mark it exported; returns
    how many were written. At least once: safe to rerun after a crash at any point."""
    written = 0
    while True:
        pending = queue.unexported(batch)
        if not pending:
            return written
        labels.store([(r, t, label, at) for _, _, r, t, label, at in pending])
        queue.mark_exported((case_id, revision) for case_id, revision, *_ in pending)
        written += len(pending)
        if len(pending) < batch:
            return written


# ---------------------------------------------------------------------- server side
def _json_value(value: float) -> float | None:
    """A feature value for JSON: non-finite (NaN = missing) becomes null."""
    return value if math.isfinite(value) else None


class ReviewSink:
    """Queues scored requests for review from the request path without blocking it.

    The caller asks :meth:`wants` (``review`` decisions always, others with probability
    ``sample_rate``) and, when it returns p > 0, calls :meth:`offer`, which only appends
    a tuple to a deque: no lock, no I/O, no JSON. A daemon thread drains the deque every
    ``flush_s`` seconds into :meth:`ReviewQueue.enqueue_many`. Over ``max_backlog``
    queued offers, new ones are dropped and counted (``dropped``); offers whose write
    fails are counted in ``failed`` and logged. :meth:`close` drains what is left.

    ``max_review_per_s`` caps ``review`` decisions when they flood in (an attack, a bad
    model): people cannot review thousands of cases a second, and queueing them would
    cost the server. Over the cap in the previous second, a ``review`` decision is taken
    with probability ``cap / (last second's review decisions)`` (or ``cap / (this
    second's so far)`` once this second is over the cap, if lower), and that is its
    inclusion probability, so exported weights stay unbiased.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | ReviewQueue,
        *,
        sample_rate: float = 0.01,
        max_backlog: int = 10_000,
        flush_s: float = 0.5,
        top_reasons: int = 3,
        max_review_per_s: float = 0.0,
        start: bool = True,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        if not flush_s > 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self.path = path.path if isinstance(path, ReviewQueue) else Path(path)
        self._queue_given = path if isinstance(path, ReviewQueue) else None
        self.sample_rate = sample_rate
        self.max_review_per_s = max_review_per_s  # 0: no cap
        self._review_p = 1.0  # inclusion probability of a review decision this second
        self._reviews = 0  # review decisions seen this second
        self._window_end = 0.0
        self.max_backlog = max_backlog
        self.flush_s = flush_s
        self.top_reasons = top_reasons
        self.dropped = 0
        self.enqueued = 0
        self.failed = 0
        self._backlog: deque = deque()
        self._random = random.random
        self._drop_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="review-sink", daemon=True)
        self._queue: ReviewQueue | None = None
        if start:
            self._thread.start()

    # ------------------------------------------------------------------ hot path
    def wants(self, decision: str) -> float:
        """Inclusion probability of a request with ``decision``: 1.0 for ``review``,
        ``sample_rate`` for a sampled other one, 0.0 when it is not queued."""
        if decision == REVIEW:
            if not self.max_review_per_s:
                return 1.0
            p = self._review_probability(1)
            return p if p >= 1.0 or self._random() < p else 0.0
        rate = self.sample_rate
        return rate if rate and self._random() < rate else 0.0

    def _review_probability(self, reviews: int) -> float:
        """Count ``reviews`` review decisions; the inclusion probability of this second's
        (from the previous second's count; races between threads only shift a count)."""
        now = time.monotonic()
        if now >= self._window_end:
            seen, self._reviews = self._reviews, 0
            per_s = seen / max(1.0, now - self._window_end + 1.0) if self._window_end else 0.0
            self._review_p = min(1.0, self.max_review_per_s / per_s) if per_s else 1.0
            self._window_end = now + 1.0
        self._reviews += reviews
        if self._reviews > self.max_review_per_s:  # this second is over the cap already
            return min(self._review_p, self.max_review_per_s / self._reviews)
        return self._review_p

    def wants_many(self, decisions: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`wants` for a batch (float64 per row, 0.0: not queued)."""
        decisions = np.asarray(decisions)
        review = decisions == REVIEW
        rate = self.sample_rate
        draws = np.random.random(len(decisions))
        sampled = draws < rate if rate else np.zeros(len(review), bool)
        p = 1.0
        if self.max_review_per_s and review.any():
            p = self._review_probability(int(review.sum()))
            review &= draws < p  # the same draw: a row is either kind, never both
        return np.where(review, p, np.where(sampled & ~(decisions == REVIEW), rate, 0.0))

    def offer(
        self,
        model: str,
        version: str,
        request_id: str,
        transaction_id: str,
        event_time_ms: int,
        card_key: int,
        probability: float,
        decision: str,
        inclusion_probability: float,
        features: np.ndarray,
        feature_names: Sequence[str],
        reasons: Sequence[tuple[str, float, float]] | None = None,
        explain: Callable[[np.ndarray, int], list[tuple[int, float]]] | None = None,
    ) -> None:
        """Queue one scored request (never blocks, never raises on a full backlog).

        ``features`` is the served feature row, the caller's own copy (not a reused
        buffer); ``reasons`` the (feature, contribution, value) the request computed, if
        any; otherwise ``explain(row, k)`` (e.g. ``model.forest.top_reasons``) is called
        on the drain thread to find the top ``top_reasons``.
        """
        if len(self._backlog) >= self.max_backlog:
            with self._drop_lock:
                self.dropped += 1
            return
        self._backlog.append(
            (
                model, version, request_id, transaction_id, event_time_ms, card_key,
                probability, decision, inclusion_probability, features, feature_names,
                reasons, explain,
            )
        )  # fmt: skip

    # ------------------------------------------------------------------ drain side
    @property
    def backlog(self) -> int:
        """Offers not yet written."""
        return len(self._backlog)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def flush(self) -> int:
        """Write every queued offer now (on the calling thread); returns how many."""
        with self._flush_lock:
            items = []
            backlog = self._backlog
            for _ in range(len(backlog)):  # what is there now; later offers wait a round
                items.append(backlog.popleft())
            if not items:
                return 0
            cases = []
            for item in items:
                try:
                    cases.append(self._case(item))
                except Exception:  # a malformed offer must not stop the others
                    log.exception("review sink: cannot queue request %r", item[2])
                    self.failed += 1
            try:
                if self._queue is None:
                    self._queue = self._queue_given or ReviewQueue(self.path)
                self._queue.enqueue_many(cases)
            except Exception as exc:  # the drain thread must outlive a bad batch or disk
                log.warning("review sink: %d cases lost: %s", len(cases), exc)
                self.failed += len(cases)
                return 0
            self.enqueued += len(cases)
            return len(cases)

    def _case(self, item: tuple) -> NewCase:
        (model, version, request_id, transaction_id, event_time_ms, card_key, probability,
         decision, inclusion, features, names, reasons, explain) = item  # fmt: skip
        row = np.asarray(features, dtype=np.float64).reshape(-1)
        if len(names) != len(row):
            raise ValueError(f"{len(names)} feature names for {len(row)} values")
        if not reasons and explain is not None and self.top_reasons:
            reasons = [(names[j], c, float(row[j])) for j, c in explain(row, self.top_reasons)]
        return NewCase(
            request_id=request_id,
            transaction_id=transaction_id,
            event_time_ms=int(event_time_ms),
            model=model,
            version=version,
            probability=float(probability),
            decision=decision,
            reason=REVIEW if decision == REVIEW else SAMPLE,
            inclusion_probability=float(inclusion),
            card_hash=card_hash(card_key),
            features=dict(zip(names, map(_json_value, row.tolist()), strict=True)),
            top_reasons=[(str(f), float(c), _json_value(float(v))) for f, c, v in (reasons or ())],
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the drain thread and write what is still queued."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.flush()
