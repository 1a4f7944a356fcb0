"""Per-card feature state shared by all worker processes.

The supervisor creates the table in POSIX shared memory (restoring the last snapshot
if there is one); each worker attaches to it. Every feature computation holds the
table's spinlock (taken inside the Numba kernel, see ``kernels.atomics``), so a card's
transactions are applied one at a time whichever worker receives them — the same
sequence the offline pass sees, hence the same features. The critical section is about
a microsecond and never waits for the GIL, so it does not limit multi-core scaling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from riskwire.kernels.atomics import break_lock, spin_lock, spin_unlock
from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import card_slots, compute_features, peek_features
from riskwire.kernels.state import HDR_LOCK, CardStateTable, SnapshotError, write_snapshot

log = logging.getLogger(__name__)


SNAPSHOT_CHUNK_SLOTS = 1024  # slots whose cards are copied per hold of the lock


@contextlib.contextmanager
def _locked(header: np.ndarray, owner: int) -> Iterator[None]:
    """Hold the table's lock (as ``owner``) for the block."""
    spin_lock(header, HDR_LOCK, owner)
    try:
        yield
    finally:
        spin_unlock(header, HDR_LOCK)


class SharedCardState:
    """A card state table in shared memory plus the lock that serialises its writers."""

    def __init__(self, memory: shared_memory.SharedMemory, *, owner: bool) -> None:
        self._memory = memory
        self._owner = owner
        self.table = CardStateTable.attach(memory.buf)

    @classmethod
    def create(cls, capacity: int, *, snapshot: Path | None = None) -> SharedCardState:
        """New shared table (supervisor side), restored from ``snapshot`` when it exists."""
        size = CardStateTable.nbytes_for(capacity)
        memory = shared_memory.SharedMemory(create=True, size=size)
        tried = snapshot is not None and snapshot.exists()
        if tried:
            try:
                _restore(snapshot, memory.buf, capacity)
                return cls(memory, owner=True)
            except (SnapshotError, ValueError, OSError) as exc:
                log.warning(
                    "card state snapshot %s not restored (%s); starting empty", snapshot, exc
                )
        # Fresh shared memory is zero-filled by the kernel: no need to write it, unless
        # a failed restore wrote into it.
        CardStateTable(memory.buf, capacity, zero=tried)
        return cls(memory, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedCardState:
        """Worker side: map the supervisor's table by its shared-memory name."""
        memory = shared_memory.SharedMemory(name=name)
        return cls(memory, owner=False)

    @property
    def name(self) -> str:
        """Shared-memory segment name to hand to workers."""
        return self._memory.name

    def update(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx`` from each card's state, then apply ``tx`` to the state."""
        return compute_features(self.table, tx, out)

    def peek(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx`` without changing any state."""
        return peek_features(self.table, tx, out)

    def snapshot(self, path: Path) -> None:
        """Snapshot the table's cards to ``path`` (atomically; only occupied slots are
        written, see :func:`~riskwire.kernels.state.write_snapshot`).

        The cards are copied :data:`SNAPSHOT_CHUNK_SLOTS` slots at a time, each chunk
        under the table's lock: a worker waits for one chunk at most. Chunks that held
        no card when the keys were scanned (without the lock) are skipped.

        Every card is copied whole, but chunks at different moments: a card a worker
        changes meanwhile is saved as it was before or after that change. A card
        inserted meanwhile may be missing (as if it came after the snapshot), or, when
        its probe passed a slot the copy had already taken while empty, saved where no
        lookup reaches it after a restore: then it starts over, as a new card would."""
        path.parent.mkdir(parents=True, exist_ok=True)
        source = self.table
        header, keys = source.header, source.keys
        owner = os.getpid()
        chunks = np.unique(np.flatnonzero(keys) // SNAPSHOT_CHUNK_SLOTS).tolist()
        slots, records = [], []
        for chunk in chunks:
            start = chunk * SNAPSHOT_CHUNK_SLOTS
            with _locked(header, owner):
                found = np.flatnonzero(keys[start : start + SNAPSHOT_CHUNK_SLOTS]) + start
                records.append(source.records(found))
            slots.append(found)
        with _locked(header, owner):  # counters as of the last chunk
            counters = header.copy()
        empty = np.empty(0, np.int64)
        write_snapshot(
            path,
            counters,
            np.concatenate(slots) if slots else empty,
            np.concatenate(records) if records else source.records(empty),
        )

    def break_lock_of(self, pid: int) -> bool:
        """Free the table lock if process ``pid`` (dead) still holds it."""
        return bool(break_lock(self.table.header, HDR_LOCK, pid))

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the segment."""
        self.table = None  # release numpy views before closing the mapping
        with contextlib.suppress(BufferError):  # a view still alive: unmapped at exit
            self._memory.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self._memory.unlink()


def _restore(snapshot: Path, buffer: memoryview, capacity: int) -> None:
    """Load ``snapshot`` into fresh (zeroed) shared memory formatted for ``capacity``
    slots. A snapshot of another capacity has its cards inserted anew, oldest first
    (a smaller table evicts the oldest, as serving would)."""
    if CardStateTable.snapshot_capacity(snapshot) == capacity:
        CardStateTable.restore_into(snapshot, buffer, zeroed=True)
        log.info("restored card state from %s", snapshot)
        return
    saved = CardStateTable.restore(snapshot)
    table = CardStateTable(buffer, capacity, zero=False)
    cards = np.flatnonzero(saved.keys)
    records = saved.records(cards[np.argsort(saved.last_time_ms[cards], kind="stable")])
    slots = card_slots(table, records["keys"])
    # A card evicted by a later one left its slot to it: write each slot's last card.
    last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
    table.put_records(slots[last], records[last])
    log.warning(
        "card state snapshot %s has %d slots, the table %d: %d of its %d cards moved in",
        snapshot, saved.capacity, capacity, len(last), len(cards),
    )  # fmt: skip


def default_snapshot_dir() -> Path:
    """A writable directory for snapshots when none is configured."""
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir()))


class LocalCardState:
    """A private (single-process) card state table, for edge scoring and tests.

    Threads may share it: the feature kernel takes the table's spinlock itself.
    """

    def __init__(self, table: CardStateTable) -> None:
        self.table = table

    def update(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx``, then apply ``tx`` to the state."""
        return compute_features(self.table, tx, out)

    def peek(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx`` without changing any state."""
        return peek_features(self.table, tx, out)
