"""The review queue: leases are exclusive across threads and processes, verdicts survive
restarts and reach the label store, the request-path sink never blocks, and the
``riskwire review`` CLI drives it end to end."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskwire.clients.cli import main
from riskwire.kernels.encoding import hash64
from riskwire.server.review import (
    REVIEW_LABEL_WORKER,
    SCHEMA_VERSION,
    CaseConflictError,
    CaseNotFoundError,
    NewCase,
    ReviewQueue,
    ReviewSink,
    card_hash,
    queue_path,
    sync_labels,
)
from riskwire.shadow.labels import LabelStore
from riskwire.shadow.records import latest_labels, read_labels

pytestmark = pytest.mark.timeout(60)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NAMES = ("amount", "card_count_1h", "secs_since_prev")


class Clock:
    """A settable clock in epoch milliseconds."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def new_case(i: int, *, decision: str = "review", card: str = "c1", at: int = 0) -> NewCase:
    """A case ``req-i`` / ``tx-i`` of card ``card`` at ``T0 + i`` minutes (or ``at``)."""
    return NewCase(
        request_id=f"req-{i}",
        transaction_id=f"tx-{i}",
        event_time_ms=at or T0 + i * 60_000,
        model="fraud",
        version="3",
        probability=0.5 + i / 1000,
        decision=decision,
        reason="review" if decision == "review" else "sample",
        inclusion_probability=1.0 if decision == "review" else 0.1,
        card_hash=card_hash(hash64(card)),
        features={"amount": 10.0 + i, "card_count_1h": float(i), "secs_since_prev": None},
        top_reasons=[("amount", 0.25, 10.0 + i)],
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock) -> ReviewQueue:
    return ReviewQueue(tmp_path / "shadow" / "review.sqlite", clock_ms=clock)


# ---------------------------------------------------------------------- queue
def test_round_trip_review_decisions_first_then_oldest(queue: ReviewQueue, clock: Clock) -> None:
    sampled = queue.enqueue_many([new_case(0, decision="approve")])
    clock.now += 1
    first, second = queue.enqueue_many([new_case(1), new_case(2, decision="review")])
    assert queue.stats()["by_status"] == {"pending": 3, "leased": 0, "labelled": 0}

    case = queue.lease_next("alice", lease_s=60)
    assert case is not None and case.case_id == first and case.status == "leased"
    assert (case.lease_owner, case.lease_until_ms) == ("alice", clock.now + 60_000)
    assert case.features == {"amount": 11.0, "card_count_1h": 1.0, "secs_since_prev": None}
    assert case.top_reasons == [("amount", 0.25, 11.0)]
    assert (case.reason, case.inclusion_probability, case.enqueued_at_ms) == ("review", 1.0, T0 + 1)
    assert [queue.lease_next(r).case_id for r in ("bob", "carol")] == [second, sampled[0]]
    assert queue.lease_next("dave") is None

    labelled = queue.label(first, 1, "alice", "card reported stolen")
    assert (labelled.status, labelled.label, labelled.labelled_by) == ("labelled", 1, "alice")
    assert (labelled.note, labelled.lease_owner, labelled.exported) == (
        "card reported stolen", None, False,
    )  # fmt: skip
    assert queue.get(first) == labelled
    stats = queue.stats()
    assert stats["by_status"] == {"pending": 0, "leased": 2, "labelled": 1}
    assert stats["by_reason"] == {"review": 2, "sample": 1}
    assert (stats["unexported"], stats["fraud"], stats["legit"]) == (1, 1, 0)
    assert [c.case_id for c in queue.cases("labelled")] == [first]
    assert [c.case_id for c in queue.cases("leased")] == [second, sampled[0]]


def test_a_reviewer_asking_again_gets_the_case_it_holds(queue: ReviewQueue, clock: Clock) -> None:
    queue.enqueue_many([new_case(1), new_case(2)])
    held = queue.lease_next("alice", lease_s=10)
    clock.now += 5_000
    again = queue.lease_next("alice", lease_s=10)
    assert again.case_id == held.case_id and again.lease_until_ms == clock.now + 10_000
    assert queue.lease_next("bob").case_id != held.case_id


def test_label_rules(queue: ReviewQueue, clock: Clock) -> None:
    a, b, c = queue.enqueue_many([new_case(1), new_case(2), new_case(3)])
    queue.lease_next("alice", lease_s=30)  # a
    with pytest.raises(CaseConflictError, match="leased by alice"):
        queue.label(a, 1, "bob")
    assert queue.label(c, 0, "bob").label == 0  # a pending case needs no lease
    with pytest.raises(CaseConflictError, match="already labelled legit by bob"):
        queue.label(c, 1, "alice")
    relabelled = queue.label(c, 1, "alice", force=True)
    assert (relabelled.label, relabelled.labelled_by, relabelled.label_revision) == (1, "alice", 2)
    clock.now += 30_000  # alice's lease on a expires: anyone may label it
    assert queue.label(a, 1, "bob").labelled_by == "bob"
    with pytest.raises(CaseNotFoundError):
        queue.label(999, 1, "bob")
    with pytest.raises(ValueError, match="label must be 0"):
        queue.label(b, 2, "bob")
    with pytest.raises(ValueError, match="reviewer"):
        queue.lease_next("")


def test_release(queue: ReviewQueue) -> None:
    (a,) = queue.enqueue_many([new_case(1)])
    queue.lease_next("alice")
    with pytest.raises(CaseConflictError, match="leased by alice"):
        queue.release(a, "bob")
    assert queue.release(a, "alice").status == "pending"
    with pytest.raises(CaseConflictError, match="pending, not leased"):
        queue.release(a, "alice")
    assert queue.lease_next("bob").case_id == a


def test_expired_lease_is_handed_out_again(queue: ReviewQueue, clock: Clock) -> None:
    (a,) = queue.enqueue_many([new_case(1)])
    assert queue.lease_next("alice", lease_s=5).case_id == a
    clock.now += 4_999
    assert queue.lease_next("bob") is None
    clock.now += 1
    assert queue.stats()["expired_leases"] == 1
    assert [c.case_id for c in queue.cases("expired")] == [a]
    again = queue.lease_next("bob", lease_s=5)
    assert (again.case_id, again.lease_owner) == (a, "bob")
    with pytest.raises(CaseConflictError, match="leased by bob"):
        queue.label(a, 1, "alice")


def test_queue_survives_reopen(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "review.sqlite"
    first = ReviewQueue(path, clock_ms=clock)
    a, b = first.enqueue_many([new_case(1), new_case(2)])
    first.lease_next("alice", lease_s=60)
    first.label(b, 0, "bob", "known customer")
    first.close()

    reopened = ReviewQueue(path, clock_ms=clock)
    assert reopened.get(a).lease_owner == "alice"
    assert (reopened.get(b).label, reopened.get(b).note) == (0, "known customer")
    assert reopened.lease_next("carol") is None  # alice's lease is still live
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "review.sqlite"
    ReviewQueue(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        ReviewQueue(path)


def test_card_history_is_the_cards_earlier_queued_cases(queue: ReviewQueue) -> None:
    ids = queue.enqueue_many(
        [new_case(i, card="c1" if i % 2 else "c2", decision="approve") for i in range(1, 8)]
    )
    case = queue.get(ids[4])  # i = 5, card c1
    history = queue.card_history(case.card_hash, case.event_time_ms, limit=5)
    assert [c.request_id for c in history] == ["req-3", "req-1"]
    assert len(queue.card_history(case.card_hash, case.event_time_ms, limit=1)) == 1


def test_purge_keeps_open_and_unexported_cases(queue: ReviewQueue, clock: Clock) -> None:
    a, b, _ = queue.enqueue_many([new_case(1), new_case(2), new_case(3)])
    queue.label(a, 1, "alice")
    queue.label(b, 0, "alice")
    queue.mark_exported([(a, 1)])
    clock.now += 1
    assert queue.purge(clock.now) == 1
    with pytest.raises(CaseNotFoundError):
        queue.get(a)
    assert queue.stats()["total"] == 2


# ---------------------------------------------------------------------- concurrency
# Run here and, through exec, in spawned processes (a function of this module could not be
# unpickled there: the test folders are not importable packages).
LEASE_ALL = '''
import threading
from concurrent.futures import ThreadPoolExecutor

from riskwire.server.review import ReviewQueue


def lease_all(path, name, threads):
    """Lease until the queue is empty from ``threads`` threads (every call a new reviewer
    id, so no lease is ever resumed); returns the case ids received."""
    got = []
    seen = threading.Lock()

    def drain(t):
        queue = ReviewQueue(path)
        n = 0
        while (case := queue.lease_next(f"{name}-t{t}-{n}", lease_s=600)) is not None:
            n += 1
            with seen:
                got.append(case.case_id)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(drain, range(threads)))
    return got
'''
LEASER = """
env["ready"].put(True)
env["go"].wait(60)
env["results"].put(lease_all(env["path"], env["name"], 3))
"""
_namespace: dict = {}
exec(LEASE_ALL, _namespace)
lease_all: Callable[[str, str, int], list[int]] = _namespace["lease_all"]


def test_processes_and_threads_never_share_a_live_lease(tmp_path: Path) -> None:
    path = tmp_path / "review.sqlite"
    ids = ReviewQueue(path).enqueue_many([new_case(i) for i in range(240)])
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shared = {"ready": ready, "results": results, "go": go, "path": str(path)}
    workers = [
        ctx.Process(target=exec, args=(LEASE_ALL + LEASER, {"env": {**shared, "name": f"p{p}"}}))
        for p in range(2)
    ]
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=60)
        go.set()
        here = lease_all(str(path), "main", 4)
        received = here + [i for _ in workers for i in results.get(timeout=60)]
        for worker in workers:
            worker.join(30)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    assert len(received) == len(set(received))  # nobody got a case another one holds
    assert sorted(received) == ids  # and every case was handed out
    assert ReviewQueue(path).stats()["by_status"]["leased"] == len(ids)


def test_threads_lease_and_label_each_case_once(tmp_path: Path) -> None:
    path = tmp_path / "review.sqlite"
    ids = ReviewQueue(path).enqueue_many([new_case(i) for i in range(60)])
    labelled: list[tuple[int, str]] = []

    def review(reviewer: str) -> None:
        queue = ReviewQueue(path)
        while (case := queue.lease_next(reviewer)) is not None:
            labelled.append((queue.label(case.case_id, 1, reviewer).case_id, reviewer))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(review, [f"r{i}" for i in range(6)]))
    assert sorted(case_id for case_id, _ in labelled) == ids
    queue = ReviewQueue(path)
    assert all(queue.get(case_id).labelled_by == who for case_id, who in labelled)


# ---------------------------------------------------------------------- label store
class FailingStore:
    """A label store whose disk is gone."""

    def store(self, outcomes: list) -> int:
        raise OSError("No space left on device")


def test_verdicts_reach_the_label_store_at_least_once(queue: ReviewQueue, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    a, b, _ = queue.enqueue_many([new_case(1), new_case(2), new_case(3)])
    queue.label(a, 1, "alice")
    queue.label(b, 0, "bob")
    with pytest.raises(OSError):
        sync_labels(queue, FailingStore())  # e.g. the CLI crashed after the SQLite commit
    assert queue.stats()["unexported"] == 2

    store = LabelStore(shadow, REVIEW_LABEL_WORKER)
    assert sync_labels(queue, store, batch=1) == 2
    assert sync_labels(queue, store) == 0
    labels = read_labels(shadow)
    assert sorted(labels["request_id"].to_pylist()) == ["req-1", "req-2"]
    assert set(labels["worker"].to_pylist()) == {REVIEW_LABEL_WORKER}
    by_request, by_transaction = latest_labels(labels)
    assert by_request == {"req-1": 1, "req-2": 0} and by_transaction["tx-2"] == 0

    queue.label(b, 1, "carol", force=True)  # a relabel is exported again and wins
    assert sync_labels(queue, store) == 1
    assert latest_labels(read_labels(shadow))[0]["req-2"] == 1


def test_a_relabel_during_export_stays_unexported(queue: ReviewQueue, tmp_path: Path) -> None:
    (a,) = queue.enqueue_many([new_case(1)])
    queue.label(a, 0, "alice")
    store = LabelStore(tmp_path / "shadow", REVIEW_LABEL_WORKER)

    class RelabellingStore:
        def store(self, outcomes: list) -> int:
            queue.label(a, 1, "bob", force=True)  # lands between the read and the mark
            return store.store(outcomes)

    assert sync_labels(queue, RelabellingStore()) == 1
    assert queue.stats()["unexported"] == 1
    assert sync_labels(queue, store) == 1
    assert latest_labels(read_labels(tmp_path / "shadow"))[0]["req-1"] == 1


# ---------------------------------------------------------------------- request-path sink
def offer(sink: ReviewSink, i: int, decision: str = "review", **extra: object) -> None:
    features = np.array([10.0 + i, float(i), math.nan])
    sink.offer(
        "fraud", "3", f"req-{i}", f"tx-{i}", T0 + i, 0xDEADBEEF00000000 + i, 0.9, decision,
        sink.wants(decision) or 0.5, features, NAMES, **extra,
    )  # fmt: skip


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_sink_drains_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "review.sqlite"
    sink = ReviewSink(path, sample_rate=0.0, flush_s=0.05)
    try:
        offer(sink, 1, reasons=[("amount", 0.4, 11.0)])
        offer(sink, 2, "approve", explain=lambda row, k: [(0, 0.3), (1, 0.1)][:k])
        wait_for(lambda: sink.enqueued == 2)
    finally:
        sink.close()
    first, second = ReviewQueue(path).cases("pending")
    assert first.card_hash == "deadbeef00000001" and first.reason == "review"
    assert first.features == {"amount": 11.0, "card_count_1h": 1.0, "secs_since_prev": None}
    assert first.top_reasons == [("amount", 0.4, 11.0)]
    assert (second.reason, second.inclusion_probability) == ("sample", 0.5)
    assert second.top_reasons == [("amount", 0.3, 12.0), ("card_count_1h", 0.1, 2.0)]


def test_sink_drops_and_counts_over_its_backlog(tmp_path: Path) -> None:
    path = tmp_path / "review.sqlite"
    sink = ReviewSink(path, max_backlog=3, start=False)
    for i in range(5):
        offer(sink, i)
    sink._backlog.append(("bad",) * 13)  # a malformed offer does not stop the others
    assert (sink.backlog, sink.dropped) == (4, 2)
    assert not path.exists()  # offer never touches the disk
    sink.close()
    assert (sink.enqueued, sink.failed, sink.backlog) == (3, 1, 0)
    assert ReviewQueue(path).stats()["total"] == 3


@given(
    decision=st.sampled_from(["review", "approve", "decline", "", "REVIEW"]),
    rate=st.floats(0.0, 1.0),
    draw=st.floats(0.0, 1.0, exclude_max=True),
)
def test_inclusion_probability_is_one_for_review_else_the_sample_rate(
    decision: str, rate: float, draw: float
) -> None:
    sink = ReviewSink("unused.sqlite", sample_rate=rate, start=False)
    sink._random = lambda: draw
    expected = 1.0 if decision == "review" else (rate if draw < rate else 0.0)
    assert sink.wants(decision) == expected
    many = sink.wants_many(np.array([decision] * 50, dtype=object))
    assert set(many.tolist()) <= ({1.0} if decision == "review" else {0.0, rate})


# ---------------------------------------------------------------------- CLI
def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``riskwire review …`` in a subprocess, without the caller's RISKWIRE_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    return subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", "review", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_cli_end_to_end(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shadow = models / ".shadow"
    queue = ReviewQueue(queue_path(shadow))
    queue.enqueue_many(
        [new_case(1, card="card-4711"), new_case(2, decision="decline", card="card-4711")]
    )
    queue.enqueue_many([new_case(3, card="card-4711")])
    where = ("--models", str(models))

    shown = run_cli("next", *where, RISKWIRE_REVIEWER="alice")
    assert shown.returncode == 0, shown.stderr
    assert "case 1 " in shown.stdout and "leased to alice" in shown.stdout
    assert "decision review" in shown.stdout and "amount" in shown.stdout

    taken = run_cli("next", *where, "--reviewer", "bob", "--json", "--history", "5")
    document = json.loads(taken.stdout)
    assert document["case"]["case_id"] == 3 and document["case"]["lease_owner"] == "bob"
    assert [c["request_id"] for c in document["card_history"]] == ["req-2", "req-1"]
    assert "card-4711" not in taken.stdout  # only the card's hash leaves the server

    refused = run_cli("label", "1", "--fraud", *where, "--reviewer", "bob")
    assert refused.returncode == 2 and "leased by alice" in refused.stderr
    done = run_cli("label", "1", "--fraud", "--note", "stolen", *where, "--reviewer", "alice")
    assert done.returncode == 0, done.stderr
    assert "case 1 labelled fraud by alice" in done.stdout
    assert latest_labels(read_labels(shadow))[0] == {"req-1": 1}
    assert run_cli("release", "3", *where, "--reviewer", "bob").returncode == 0

    listed = run_cli("list", "--status", "labelled", "--json", *where)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["case_id"], row["labelled_by"], row["note"]) == (1, "alice", "stolen")
    stats = json.loads(run_cli("stats", "--json", *where).stdout)
    assert stats["by_status"] == {"pending": 2, "leased": 0, "labelled": 1}
    assert stats["unexported"] == 0


def test_cli_sync_exports_what_a_failed_label_left(tmp_path: Path, capsys) -> None:
    path = tmp_path / "q" / "review.sqlite"
    queue = ReviewQueue(path)
    (a,) = queue.enqueue_many([new_case(1)])
    queue.label(a, 0, "alice")  # committed, never exported (as after a crash)
    assert main(["review", "stats", "--queue", str(path)]) == 0
    assert "not yet in the label store: 1" in capsys.readouterr().out
    assert main(["review", "sync", "--queue", str(path)]) == 0
    assert "1 label written" in capsys.readouterr().out
    assert latest_labels(read_labels(path.parent))[0] == {"req-1": 0}  # beside --queue


def test_cli_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as missing:
        main(["review", "next", "--shadow-dir", str(tmp_path / "none"), "--reviewer", "a"])
    assert missing.value.code == 2 and "no review queue" in capsys.readouterr().err
    path = tmp_path / "review.sqlite"
    ReviewQueue(path)
    with pytest.raises(SystemExit) as unknown:
        main(["review", "label", "7", "--legit", "--queue", str(path), "--reviewer", "a"])
    assert unknown.value.code == 2 and "no case 7" in capsys.readouterr().err
    assert main(["review", "next", "--queue", str(path), "--reviewer", "a"]) == 0
    assert "no case to review" in capsys.readouterr().out


def test_a_flood_of_review_decisions_is_sampled_with_its_probability(monkeypatch, tmp_path):
    """Over max_review_per_s, review decisions are taken with probability cap / rate (the
    previous second's, or this second's so far once it is over the cap), and that
    probability is what offer records (unbiased weights); under the cap, all are taken."""
    import riskwire.server.review as review_module

    clock = [100.0]
    monkeypatch.setattr(review_module.time, "monotonic", lambda: clock[0])
    sink = ReviewSink(tmp_path / "q.sqlite", max_review_per_s=50.0, start=False)
    first = [sink.wants("review") for _ in range(1000)]
    assert first[:50] == [1.0] * 50  # no history: all taken up to the cap
    assert set(first[50:]) <= {0.0} | {50 / n for n in range(51, 1001)}
    clock[0] += 1.0
    taken = [sink.wants("review") for _ in range(1000)]
    assert set(taken) == {0.0, 0.05}  # 50 / 1000 per second
    assert 20 <= taken.count(0.05) <= 90
    batch = sink.wants_many(np.array(["review"] * 400 + ["approve"] * 100, dtype=object))
    assert set(batch[:400]) <= {0.0, 50 / 1400} and set(batch[400:]) <= {0.0, 0.01}
    clock[0] += 1.0  # 1,400 in the last second: p = 50 / 1400, lower past 1,400 now
    third = [sink.wants("review") for _ in range(2000)]
    assert set(third[:1400]) <= {0.0, 50 / 1400}
    assert set(third[1400:]) <= {0.0} | {50 / n for n in range(1401, 2001)}
    clock[0] += 5.0  # a quiet spell: under the cap again
    sink.wants("review")
    clock[0] += 1.0
    assert sink.wants("review") == 1.0
    sink.close()
