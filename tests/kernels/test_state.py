"""Card state table: probing, eviction, snapshots, external and shared-memory buffers."""

from __future__ import annotations

import contextlib
import gc
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from multiprocessing import shared_memory

import numpy as np
import pytest

from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import card_slots, compute_features, compute_features_offline
from riskwire.kernels.schema import FEATURE_NAMES, NUM_FEATURES
from riskwire.kernels.state import (
    CARD_RECORD,
    HASH_MULTIPLIER,
    HASH_SHIFT,
    CardStateTable,
    SnapshotError,
    write_snapshot,
)

TXN_COUNT = FEATURE_NAMES.index("card_txn_count")


def stream(seed: int, n: int, n_cards: int) -> TransactionArrays:
    """A small time-ordered stream over ``n_cards`` cards."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 2**63, n_cards, dtype=np.uint64)
    return TransactionArrays(
        card_key=keys[rng.integers(0, n_cards, n)],
        merchant_key=rng.integers(1, 50, n).astype(np.uint64),
        event_time_ms=1_700_000_000_000 + np.cumsum(rng.integers(0, 600_000, n)),
        amount=rng.exponential(40.0, n),
        mcc=rng.integers(-1, 10_000, n).astype(np.int32),
        country=rng.integers(-1, 5, n).astype(np.int32),
        card_country=rng.integers(-1, 5, n).astype(np.int32),
        currency=rng.integers(-1, 43, n).astype(np.int32),
        channel=rng.integers(-1, 5, n).astype(np.int32),
    )


def single(card: int, t: int, amount: float = 5.0) -> TransactionArrays:
    """One transaction of ``card`` at ``t``."""
    one = np.ones(1, dtype=np.int32)
    return TransactionArrays(
        np.array([card], dtype=np.uint64), np.array([7], dtype=np.uint64),
        np.array([t], dtype=np.int64), np.array([float(amount)]), one, one, one, one, one,
    )  # fmt: skip


def home_slot(key: int, capacity: int) -> int:
    h = (key * HASH_MULTIPLIER) & (2**64 - 1)
    return (h ^ (h >> HASH_SHIFT)) & (capacity - 1)


def test_insert_and_find() -> None:
    tx = stream(seed=1, n=2000, n_cards=300)
    _, table = compute_features_offline(tx)
    distinct = np.unique(tx.card_key)
    assert table.capacity == 1024 and table.occupied == len(table) == len(distinct)
    for key in distinct:
        slot = table.find(int(key))
        assert slot >= 0 and table.keys[slot] == key
    assert table.counts[:, 0].sum() == len(tx)
    assert table.find(12345) == -1


@pytest.mark.parametrize("capacity", [0, 1, 3, 1000, 1025])
def test_capacity_must_be_a_power_of_two(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        CardStateTable.create(capacity)


def test_probe_limit_range() -> None:
    with pytest.raises(ValueError, match="probe_limit"):
        CardStateTable.create(8, probe_limit=9)
    with pytest.raises(ValueError, match="probe_limit"):
        CardStateTable.create(8, probe_limit=0)


def test_layout_is_aligned() -> None:
    table = CardStateTable.create(64)
    base = table._bytes.ctypes.data
    for arr in table.arrays:
        assert (arr.ctypes.data - base) % 64 == 0 and arr.flags.c_contiguous
    assert table.nbytes == CardStateTable.nbytes_for(64) >= 64 * 256


def test_eviction_takes_least_recently_seen_in_window() -> None:
    colliding = [k for k in range(1, 500) if home_slot(k, 8) == 0][:6]
    a, b, c, d, e, f = colliding
    table = CardStateTable.create(8, probe_limit=4)
    for key, t, amount in (
        (a, 10, 5),
        (b, 20, 5),
        (c, 30, 5),
        (c, 31, 900),
        (d, 40, 5),
        (a, 50, 5),
    ):
        compute_features(table, single(key, t, amount))
    assert [table.find(k) for k in (a, b, c, d)] == [0, 1, 2, 3] and table.evictions == 0

    features = compute_features(table, single(e, 60))  # window full: b (t=20) goes
    assert table.evictions == 1 and table.find(b) == -1 and table.find(e) == 1
    assert features[0, TXN_COUNT] == 0.0 and table.occupied == 4

    features = compute_features(table, single(b, 70))  # b starts over, c (t=31) goes
    assert features[0, TXN_COUNT] == 0.0
    assert table.find(c) == -1 and table.find(b) == 2 and table.evictions == 2
    assert compute_features(table, single(a, 80))[0, TXN_COUNT] == 2.0  # a kept its history
    again = compute_features(table, single(b, 70))[0]  # nothing left over from c
    assert again[TXN_COUNT] == 1.0 and again[FEATURE_NAMES.index("card_count_7d")] == 1.0
    assert again[FEATURE_NAMES.index("card_amount_7d")] == 5.0
    assert np.isnan(compute_features(table, single(b, 70))[0, FEATURE_NAMES.index("amount_zscore")])

    ties = CardStateTable.create(8, probe_limit=4)
    for key in (a, b, c, d, f):
        compute_features(ties, single(key, 100))
    assert ties.find(a) == -1 and ties.find(f) == 0  # equal times: first in probe order


def test_eviction_is_deterministic_online_and_offline() -> None:
    tx = stream(seed=2, n=3000, n_cards=500)
    offline, table = compute_features_offline(tx, capacity=64, probe_limit=4)
    assert table.evictions > 0 and table.occupied == 64
    again = compute_features_offline(tx, capacity=64, probe_limit=4)[1]
    assert np.array_equal(again._bytes, table._bytes)
    online_table = CardStateTable.create(64, probe_limit=4)
    online = np.vstack(
        [compute_features(online_table, tx.take(slice(i, i + 1))) for i in range(len(tx))]
    )
    assert np.array_equal(online, offline, equal_nan=True)
    assert np.array_equal(online_table._bytes, table._bytes)


def test_snapshot_restore_round_trip(tmp_path) -> None:
    tx = stream(seed=3, n=3000, n_cards=200)
    first, rest = tx.take(slice(0, 2000)), tx.take(slice(2000, None))
    _, table = compute_features_offline(first)
    path = tmp_path / "cards.snap"
    table.snapshot(path)
    table.snapshot(path)  # overwriting is atomic too
    assert os.listdir(tmp_path) == ["cards.snap"]

    restored = CardStateTable.restore(path)
    assert restored.capacity == table.capacity and restored.probe_limit == table.probe_limit
    for mine, theirs in zip(table.arrays, restored.arrays, strict=True):
        assert np.array_equal(mine, theirs)
    expected = compute_features(table, rest)
    assert np.array_equal(compute_features(restored, rest), expected, equal_nan=True)

    shm_like = bytearray(restored.nbytes + 100)
    into = CardStateTable.restore_into(path, shm_like)
    assert np.array_equal(compute_features(into, rest), expected, equal_nan=True)


def test_snapshot_holds_only_the_cards(tmp_path) -> None:
    """A snapshot's size follows the cards in the table, not its capacity."""
    table = CardStateTable.create(1 << 16)
    compute_features(table, stream(seed=7, n=500, n_cards=50))
    path = tmp_path / "cards.snap"
    table.snapshot(path)
    assert path.stat().st_size == 64 + 64 + table.occupied * (8 + CARD_RECORD.itemsize)
    assert table.nbytes > 100 * path.stat().st_size
    restored = CardStateTable.restore(path)
    into = CardStateTable.restore_into(path, bytearray(table.nbytes), zeroed=True)
    for mine, theirs, fresh in zip(table.arrays, restored.arrays, into.arrays, strict=True):
        assert np.array_equal(mine, theirs) and np.array_equal(mine, fresh)

    empty = CardStateTable.create(64)
    empty.snapshot(path)
    assert CardStateTable.restore(path).occupied == 0


def test_restore_reads_full_table_snapshots(tmp_path) -> None:
    """Format 1 (the table's bytes verbatim, written before format 2) still restores."""
    table = compute_features_offline(stream(seed=8, n=300, n_cards=30))[1]
    body = table._bytes.tobytes()
    head = struct.pack(
        "<8sIIQQQI", b"RWSNAP\0\0", 1, 1, table.capacity, table.probe_limit, len(body),
        zlib.crc32(body),
    ).ljust(64, b"\0")  # fmt: skip
    path = tmp_path / "cards.snap"
    path.write_bytes(head + body)
    restored = CardStateTable.restore(path)
    for mine, theirs in zip(table.arrays, restored.arrays, strict=True):
        assert np.array_equal(mine, theirs)
    path.write_bytes(head + body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        CardStateTable.restore(path)


def test_restore_rejects_slots_that_cannot_be(tmp_path) -> None:
    """A well-checksummed file whose slot numbers or keys make no table is refused."""
    table = compute_features_offline(stream(seed=9, n=200, n_cards=20))[1]
    slots = np.flatnonzero(table.keys)
    path = tmp_path / "cards.snap"
    for bad_slots, bad_keys, message in (
        (slots[::-1].copy(), False, "out of order"),
        (np.r_[slots[:-1], table.capacity], False, "out of order"),
        (slots, True, "has no card"),
    ):
        records = table.records(slots)
        if bad_keys:
            records["keys"][0] = 0
        write_snapshot(path, table.header, bad_slots, records)
        with pytest.raises(SnapshotError, match=message):
            CardStateTable.restore(path)


def test_failed_snapshot_leaves_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    table = compute_features_offline(stream(seed=4, n=100, n_cards=10))[1]
    path = tmp_path / "cards.snap"
    path.write_bytes(b"previous")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        table.snapshot(path)
    assert os.listdir(tmp_path) == ["cards.snap"] and path.read_bytes() == b"previous"


def test_restore_rejects_bad_files(tmp_path) -> None:
    table = compute_features_offline(stream(seed=5, n=100, n_cards=10))[1]
    path = tmp_path / "cards.snap"
    table.snapshot(path)
    good = path.read_bytes()
    cases = {
        "truncated snapshot": good[: len(good) // 2],
        "truncated snapshot \\(header": good[:10],
        "checksum mismatch": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:],
        "trailing bytes": good + b"\0",
        "not a card state snapshot": b"PK\x03\x04" + good[4:],
    }
    for message, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(SnapshotError, match=message):
            CardStateTable.restore(path)

    buffer = bytearray(table.nbytes)
    CardStateTable(buffer, table.capacity)
    path.write_bytes(cases["checksum mismatch"])
    with pytest.raises(SnapshotError):
        CardStateTable.restore_into(path, buffer)
    with pytest.raises(ValueError, match="does not hold a card state table"):
        CardStateTable.attach(buffer)  # half-loaded state cannot be attached


def test_table_in_bytearray_and_second_view() -> None:
    tx = stream(seed=6, n=1000, n_cards=100)
    buffer = bytearray(CardStateTable.nbytes_for(256))
    table = CardStateTable(buffer, 256)
    view = CardStateTable.attach(buffer)
    first = compute_features(table, tx.take(slice(0, 500)))
    assert view.occupied == table.occupied > 0
    second = compute_features(view, tx.take(slice(500, None)))  # continues table's state
    expected = compute_features_offline(tx, capacity=256)[0]
    assert np.array_equal(np.vstack([first, second]), expected, equal_nan=True)
    assert table.counts[:, 0].sum() == len(tx)


def test_bad_buffers() -> None:
    with pytest.raises(ValueError, match="writable"):
        CardStateTable(bytes(CardStateTable.nbytes_for(8)), 8)
    with pytest.raises(ValueError, match="needs"):
        CardStateTable(bytearray(100), 8)
    with pytest.raises(ValueError, match="does not hold"):
        CardStateTable.attach(bytearray(CardStateTable.nbytes_for(8)))


_CHILD = """
import sys
from multiprocessing import resource_tracker, shared_memory
import numpy as np
from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import compute_features
from riskwire.kernels.state import CardStateTable

shm = shared_memory.SharedMemory(name=sys.argv[1])
# the parent owns the segment (Python < 3.13 has no track=False)
resource_tracker.unregister(shm._name, "shared_memory")
data = np.load(sys.argv[2])
tx = TransactionArrays(*(np.ascontiguousarray(data[f]) for f in TransactionArrays.__slots__))
table = CardStateTable.attach(shm.buf)
compute_features(table, tx)
del table
shm.close()
"""


def test_shared_memory_across_processes(tmp_path) -> None:
    tx = stream(seed=7, n=1000, n_cards=100)
    capacity = 256
    shm = shared_memory.SharedMemory(create=True, size=CardStateTable.nbytes_for(capacity))
    try:
        table = CardStateTable(shm.buf, capacity)
        first = compute_features(table, tx.take(slice(0, 300)))
        # a child process attaches by name and continues the stream
        rows = tx.take(slice(300, 700))
        np.savez(
            tmp_path / "rows.npz", **{f: getattr(rows, f) for f in TransactionArrays.__slots__}
        )
        subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_CHILD), shm.name, str(tmp_path / "rows.npz")],
            check=True,
            timeout=120,
        )
        assert table.counts[:, 0].sum() == 700
        last = compute_features(table, tx.take(slice(700, None)))
        expected = compute_features_offline(tx, capacity=capacity)[0]
        assert np.array_equal(first, expected[:300], equal_nan=True)
        assert np.array_equal(last, expected[700:], equal_nan=True)
        assert last.shape == (300, NUM_FEATURES)
        del table
        gc.collect()  # numpy views pin the mapping; release them before close()
    finally:
        shm.unlink()
        with contextlib.suppress(BufferError):  # only if an assertion left views alive
            shm.close()


def test_records_round_trip_through_another_table() -> None:
    """A card's slot packed as a record and put into another table gives the same
    features there: what the Redis store relies on."""
    rng = np.random.default_rng(3)
    rows = 200
    keys = np.array([11, 12, 13], dtype=np.uint64)
    tx = TransactionArrays(
        card_key=keys[rng.integers(0, 3, rows)],
        merchant_key=rng.integers(1, 30, rows).astype(np.uint64),
        event_time_ms=np.cumsum(rng.integers(0, 600_000, rows)).astype(np.int64),
        amount=rng.lognormal(3, 1, rows),
        mcc=np.full(rows, 5411, np.int32),
        country=rng.integers(0, 5, rows).astype(np.int32),
        card_country=np.zeros(rows, np.int32),
        currency=np.zeros(rows, np.int32),
        channel=np.zeros(rows, np.int32),
    )
    head, tail = tx.take(np.arange(150)), tx.take(np.arange(150, rows))
    expected, _ = compute_features_offline(tx)
    _, big = compute_features_offline(head)
    records = big.records(card_slots(big, keys))
    assert records.dtype == CARD_RECORD and CARD_RECORD.itemsize == 256
    assert big.occupied == 3  # the cards were there already: nothing inserted
    small = CardStateTable.create(8, probe_limit=8)
    small.put_records(card_slots(small, keys), records)
    assert small.occupied == 3
    served = compute_features(small, tail)
    assert np.array_equal(served, expected[150:], equal_nan=True)
    with pytest.raises(ValueError, match="non-zero"):
        card_slots(small, np.array([0], dtype=np.uint64))
