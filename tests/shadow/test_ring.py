"""The mirror ring: rows come out exactly as they went in, once, in order, bounded."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.shadow.ring import MirrorRing

FEATURES = 5
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
TRACES = st.one_of(
    st.none(),
    st.tuples(
        st.integers(1, (1 << 128) - 1),
        st.integers(1, (1 << 64) - 1),
        st.one_of(st.none(), st.tuples(st.just(""), st.just(""), st.booleans())),
    ),
)
ROW = st.tuples(
    TEXT,  # version
    TEXT,  # request id
    TEXT,  # transaction id
    TEXT,  # client
    st.integers(0, 1 << 62),  # time_ms
    st.integers(0, (1 << 64) - 1),  # card key
    st.floats(0, 1),
    st.sampled_from(["approve", "review", "decline", "failsafe"]),
    st.floats(0, 1e6),
    TRACES,
)


def put(ring: MirrorRing, row: tuple, features: np.ndarray) -> bool:
    version, request_id, transaction_id, client, time_ms, key, p, decision, latency, trace = row
    return ring.put_one(
        version, request_id, transaction_id, client, time_ms, key, p, decision, latency,
        features, trace,
    )  # fmt: skip


def taken_rows(ring: MirrorRing, limit: int) -> list[tuple]:
    """Take, check and release up to ``limit`` rows; returns them as put() tuples."""
    taken = ring.take(limit)
    if taken is None:
        return []
    ring.release(taken)
    rows = []
    for i in range(taken.count):
        decision = taken.decisions[i]
        rows.append(
            (
                taken.versions[i], taken.request_ids[i], taken.transaction_ids[i],
                taken.clients[i] or "", int(taken.time_ms[i]), int(taken.card_keys[i]),
                float(taken.probabilities[i]), decision if decision else "failsafe",
                float(taken.latency_us[i]), tuple(taken.features[i]),
            )
        )  # fmt: skip
    return rows


def expected(row: tuple, features: np.ndarray) -> tuple:
    return (*row[:9], tuple(features))


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 12),
    heap_bytes=st.integers(1, 400),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("put"), ROW),
            st.tuples(st.just("take"), st.integers(1, 12)),
        ),
        max_size=60,
    ),
)
def test_rows_come_out_once_in_order_and_the_ring_stays_bounded(
    capacity: int, heap_bytes: int, steps: list
) -> None:
    ring = MirrorRing.create(capacity, FEATURES, heap_bytes)
    model: deque[tuple] = deque()  # what a plain queue would hold
    rng = np.random.default_rng(0)
    try:
        for kind, value in steps:
            if kind == "put":
                features = rng.normal(size=FEATURES)
                size = sum(len(s.encode()) for s in value[:4])
                accepted = put(ring, value, features)
                if len(model) >= capacity or size > heap_bytes:
                    assert not accepted
                pending_bytes = sum(sum(len(s.encode()) for s in r[:4]) for r in model)
                if len(model) < capacity and 2 * (pending_bytes + size) <= heap_bytes:
                    assert accepted  # room even if the row had to wrap past the heap's end
                if accepted:
                    model.append(expected(value, features))
            else:
                got = taken_rows(ring, value)
                assert len(got) == min(value, len(model))
                assert got == [model.popleft() for _ in range(len(got))]
            assert ring.pending() == len(model)
        assert taken_rows(ring, capacity) == list(model)
    finally:
        ring.close()


def test_traces_and_batches_round_trip() -> None:
    ring = MirrorRing.create(8, FEATURES)
    features = np.arange(3 * FEATURES, dtype=np.float64).reshape(3, FEATURES)
    trace = ((7 << 90) | 3, 11, ("", "", True))
    try:
        assert ring.put_rows(
            "2", ["b/0", "b/1", "b/2"], ["t0", "", "t2"], "client-x",
            np.array([1, 2, 3]), np.array([4, 5, 6], np.uint64), np.array([0.1, 0.5, 0.9]),
            np.array(["approve", "review", "decline"], dtype=object), 12.5, features, trace,
        )  # fmt: skip
        assert ring.put_one("3", "s", "t", "", 9, 8, 0.2, "approve", 1.0, features[0], None)
        untraced = (5, 6, None)
        assert ring.put_one("3", "u", "", "", 9, 8, 0.2, "approve", 1.0, features[1], untraced)
        taken = ring.take(8)
        assert taken is not None and taken.count == 5
        assert taken.versions == ["2", "2", "2", "3", "3"]
        assert taken.request_ids == ["b/0", "b/1", "b/2", "s", "u"]
        assert taken.transaction_ids == ["t0", "", "t2", "t", ""]
        assert taken.clients == ["client-x"] * 3 + [None, None]
        assert taken.decisions.tolist() == ["approve", "review", "decline", "approve", "approve"]
        assert taken.latency_us.tolist() == [12.5] * 3 + [1.0, 1.0]
        np.testing.assert_array_equal(taken.features[:3], features)
        assert taken.traces == [trace, untraced]  # one per traced call, in order
    finally:
        ring.close()


def test_a_full_ring_refuses_whole_batches() -> None:
    ring = MirrorRing.create(4, FEATURES)
    row = np.zeros(FEATURES)
    try:
        rows = np.zeros((3, FEATURES))
        args = (np.zeros(3, np.int64), np.zeros(3, np.uint64), np.zeros(3),
                np.array(["approve"] * 3, dtype=object), 1.0, rows)  # fmt: skip
        assert ring.put_rows("1", ["a", "b", "c"], ["", "", ""], "", *args)
        assert not ring.put_rows("1", ["d", "e", "f"], ["", "", ""], "", *args)
        assert ring.put_one("1", "g", "", "", 0, 0, 0.0, "approve", 0.0, row)
        assert not ring.put_one("1", "h", "", "", 0, 0, 0.0, "approve", 0.0, row)
        assert [r[1] for r in taken_rows(ring, 10)] == ["a", "b", "c", "g"]
        assert ring.put_rows("1", ["d", "e", "f"], ["", "", ""], "", *args)  # wraps
        assert [r[1] for r in taken_rows(ring, 10)] == ["d", "e", "f"]
    finally:
        ring.close()


def test_concurrent_producers_lose_and_repeat_nothing() -> None:
    ring = MirrorRing.create(64, FEATURES)
    per_thread, threads = 3_000, 4
    seen: list[str] = []
    done = threading.Event()

    def produce(name: int) -> None:
        row = np.full(FEATURES, float(name))
        for i in range(per_thread):
            while not ring.put_one("1", f"{name}-{i}", "", "", i, name, 0.5, "approve", 0.0, row):
                pass  # full: the consumer catches up

    def consume() -> None:
        while not done.is_set() or ring.pending():
            taken = ring.take(32)
            if taken is None:
                continue
            assert all(
                float(f[0]) == float(r.split("-")[0])
                for f, r in zip(taken.features, taken.request_ids, strict=True)
            )
            seen.extend(taken.request_ids)
            ring.release(taken)

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    done.set()
    consumer.join(30)
    ring.close()
    assert len(seen) == len(set(seen)) == per_thread * threads
    for name in range(threads):  # each producer's rows in its own order
        mine = [int(r.split("-")[1]) for r in seen if r.startswith(f"{name}-")]
        assert mine == sorted(mine)


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError):
        MirrorRing.create(0, FEATURES)
