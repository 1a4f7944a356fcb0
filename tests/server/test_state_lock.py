"""The shared card state's spinlock: serialises processes, and a dead owner's lock breaks."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from riskwire.kernels.atomics import spin_lock
from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.state import CNT_TXN, HDR_LOCK
from riskwire.server.state import SharedCardState

ROWS_PER_PROCESS = 3000


def one_card(rows: int, start_ms: int):
    return encode_columns({
        "card_id": ["card-shared"] * rows, "merchant_id": ["m"] * rows, "mcc": [5411] * rows,
        "amount": [1.0] * rows, "currency": ["EUR"] * rows, "country": ["DE"] * rows,
        "card_country": ["DE"] * rows, "channel": ["pos"] * rows,
        "event_time": np.arange(start_ms, start_ms + rows, dtype=np.int64),
    })  # fmt: skip


# Child process: apply one transaction at a time to the shared card. (A script, since
# spawn could not re-import this module under pytest's importlib import mode.)
HAMMER = """
import sys, numpy as np
from riskwire.kernels.encoding import encode_columns
from riskwire.server.state import SharedCardState
name, start, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state = SharedCardState.attach(name)
# A plain subprocess has its own resource tracker, which would unlink the segment when
# this process exits (spawn-started server workers share the supervisor's instead).
from multiprocessing import resource_tracker
resource_tracker.unregister(state._memory._name, "shared_memory")
tx = encode_columns({
    "card_id": ["card-shared"] * rows, "merchant_id": ["m"] * rows, "mcc": [5411] * rows,
    "amount": [1.0] * rows, "currency": ["EUR"] * rows, "country": ["DE"] * rows,
    "card_country": ["DE"] * rows, "channel": ["pos"] * rows,
    "event_time": np.arange(start, start + rows, dtype=np.int64),
})
out = np.empty((1, 23))
for i in range(rows):
    state.update(tx.take(slice(i, i + 1)), out)
import os
os._exit(0)  # skip SharedMemory.__del__ while numpy views of it are alive
"""


def test_processes_updating_one_card_lose_no_update() -> None:
    state = SharedCardState.create(1024)
    try:
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", HAMMER, state.name, str(k * 10**6), str(ROWS_PER_PROCESS)]
            )
            for k in range(3)
        ]
        for worker in workers:
            assert worker.wait(120) == 0
        slot = state.table.find(int(one_card(1, 0).card_key[0]))
        assert state.table.counts[slot, CNT_TXN] == 3 * ROWS_PER_PROCESS
        assert state.table.header[HDR_LOCK] == 0
    finally:
        state.close()


def test_lock_of_a_dead_owner_is_broken_and_state_usable_again() -> None:
    state = SharedCardState.create(1024)
    try:
        dead_pid = 2**22 + 12345  # a pid no live process of ours has
        spin_lock(state.table.header, HDR_LOCK, dead_pid)
        assert not state.break_lock_of(4242)  # someone else's pid: left alone
        assert state.break_lock_of(dead_pid)
        features = state.update(one_card(1, 0), np.empty((1, 23)))
        assert features[0, -1] == 0.0  # first transaction of the card
        assert state.table.header[HDR_LOCK] == 0
    finally:
        state.close()


def cards(ids: list[str], time_ms: int):
    """One transaction of each card, at ``time_ms``."""
    n = len(ids)
    return encode_columns({
        "card_id": ids, "merchant_id": ["m"] * n, "mcc": [5411] * n, "amount": [2.5] * n,
        "currency": ["EUR"] * n, "country": ["DE"] * n, "card_country": ["DE"] * n,
        "channel": ["pos"] * n, "event_time": np.full(n, time_ms, dtype=np.int64),
    })  # fmt: skip


def record_of(table, key: int):  # noqa: ANN001, ANN201
    """A card's whole state (None when the table does not hold it)."""
    slot = table.find(key)
    return None if slot < 0 else table.records(np.array([slot]))[0].tobytes()


def test_snapshot_holds_the_lock_for_one_chunk_at_a_time(tmp_path, monkeypatch) -> None:
    """The snapshot copies the table a chunk of slots per hold of the lock (workers wait
    for one chunk at most) and restores to the same table."""
    from riskwire.kernels.state import CardStateTable
    from riskwire.server import state as state_module

    monkeypatch.setattr(state_module, "SNAPSHOT_CHUNK_SLOTS", 128)
    holds, lock = [], state_module.spin_lock
    monkeypatch.setattr(state_module, "spin_lock", lambda *a: holds.append(1) or lock(*a))
    state = SharedCardState.create(1024)
    try:
        state.update(cards([f"card-{i}" for i in range(300)], 1_000), np.empty((300, 23)))
        state.snapshot(tmp_path / "cards.snapshot")
        assert len(holds) == 1024 // 128 + 1  # 8 chunks, each with cards; the counters
        restored = CardStateTable.restore(tmp_path / "cards.snapshot")
        for name in ("keys", "last_time_ms", "counts", "stats", "merchants", "countries"):
            assert np.array_equal(getattr(restored, name), getattr(state.table, name)), name
        assert restored.occupied == state.table.occupied == 300
    finally:
        state.close()


def test_snapshot_skips_chunks_without_cards(tmp_path, monkeypatch) -> None:
    """A sparse table: the lock is taken only for chunks that hold cards, and the file
    holds only the cards."""
    from riskwire.kernels.state import CardStateTable
    from riskwire.server import state as state_module

    monkeypatch.setattr(state_module, "SNAPSHOT_CHUNK_SLOTS", 128)
    holds, lock = [], state_module.spin_lock
    monkeypatch.setattr(state_module, "spin_lock", lambda *a: holds.append(1) or lock(*a))
    state = SharedCardState.create(1 << 14)
    try:
        state.update(cards([f"card-{i}" for i in range(10)], 1_000), np.empty((10, 23)))
        holds.clear()
        state.snapshot(tmp_path / "cards.snapshot")
        assert len(holds) <= 10 + 1  # of 128 chunks
        assert (tmp_path / "cards.snapshot").stat().st_size < 4096
        restored = CardStateTable.restore(tmp_path / "cards.snapshot")
        for name in ("keys", "last_time_ms", "counts", "stats", "merchants", "countries"):
            assert np.array_equal(getattr(restored, name), getattr(state.table, name)), name
    finally:
        state.close()


@pytest.mark.parametrize("capacity", [1 << 12, 256])
def test_snapshot_of_another_capacity_moves_the_cards_in(tmp_path, capacity) -> None:
    """A changed ``state_capacity`` keeps the table's configured size: the snapshot's
    cards are inserted anew, each whole; a smaller table keeps what fits."""
    names = [f"card-{i}" for i in range(300)]
    keys = [int(cards([card], 0).card_key[0]) for card in names]
    old = SharedCardState.create(1024)
    try:
        for i in range(0, 300, 30):  # later cards are newer
            old.update(cards(names[i : i + 30], 1_000 + i), np.empty((30, 23)))
        before = {key: record_of(old.table, key) for key in keys}
        old.snapshot(tmp_path / "cards.snapshot")
    finally:
        old.close()
    new = SharedCardState.create(capacity, snapshot=tmp_path / "cards.snapshot")
    try:
        assert new.table.capacity == capacity
        kept = [key for key in keys if new.table.find(key) >= 0]
        assert new.table.occupied == len(kept)
        assert all(record_of(new.table, key) == before[key] for key in kept)
        if capacity > 1024:
            assert len(kept) == 300
        else:
            assert 0 < len(kept) <= 256 and new.table.evictions == 300 - len(kept)
    finally:
        new.close()


def test_corrupt_snapshot_starts_an_empty_table(tmp_path) -> None:
    """A full-table snapshot (format 1) whose checksum fails was read into the shared
    memory before the check: the table must start empty, not with its bytes."""
    from riskwire.kernels.state import CardStateTable

    nbytes = CardStateTable.nbytes_for(1024)
    head = struct.pack("<8sIIQQQI", b"RWSNAP\0\0", 1, 1, 1024, 32, nbytes, 0).ljust(64, b"\0")
    body = CardStateTable(bytearray(nbytes), 1024)._bytes.copy()
    body[64:] = 0xAB  # every slot "holds a card"
    (tmp_path / "cards.snapshot").write_bytes(head + body.tobytes())
    state = SharedCardState.create(1024, snapshot=tmp_path / "cards.snapshot")
    try:
        assert state.table.occupied == 0 and not state.table.keys.any()
    finally:
        state.close()


def test_snapshot_during_updates_saves_each_card_whole(tmp_path, monkeypatch) -> None:
    """Workers keep scoring between the snapshot's chunks: every card comes back whole,
    as it was before or after its update; a card inserted meanwhile comes back whole or
    not at all; the cards nobody touched come back unchanged, where they were."""
    from riskwire.kernels.state import CardStateTable
    from riskwire.server import state as state_module

    monkeypatch.setattr(state_module, "SNAPSHOT_CHUNK_SLOTS", 64)
    state = SharedCardState.create(1024)
    try:
        old = [f"card-{i}" for i in range(400)]
        state.update(cards(old, 1_000), np.empty((len(old), 23)))
        keys = {card: int(cards([card], 0).card_key[0]) for card in old}
        before = {card: record_of(state.table, keys[card]) for card in old}
        touched, inserted = old[::7], [f"new-{i}" for i in range(40)]
        batches = iter([(touched[i::16], inserted[i::16]) for i in range(16)])
        unlock = state_module.spin_unlock

        def unlock_then_score(*args) -> None:  # noqa: ANN002 - a worker runs between chunks
            unlock(*args)
            some, new = next(batches, ([], []))
            if some or new:
                state.update(cards(some + new, 2_000), np.empty((len(some) + len(new), 23)))

        monkeypatch.setattr(state_module, "spin_unlock", unlock_then_score)
        state.snapshot(tmp_path / "cards.snapshot")
        monkeypatch.setattr(state_module, "spin_unlock", unlock)
        restored = CardStateTable.restore(tmp_path / "cards.snapshot")
        as_saved = []
        for card in old:
            saved = record_of(restored, keys[card])
            assert restored.find(keys[card]) == state.table.find(keys[card])
            if card in touched:
                after = record_of(state.table, keys[card])
                assert saved in (before[card], after), card
                as_saved.append(saved == after)
            else:
                assert saved == before[card], card
        assert any(as_saved) and not all(as_saved)  # chunks before and after updates
        for card in inserted:
            key = int(cards([card], 0).card_key[0])
            assert record_of(restored, key) in (None, record_of(state.table, key)), card
    finally:
        state.close()
