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
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from riskwire.kernels.atomics import break_lock, spin_lock, spin_unlock
from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import compute_features, peek_features
from riskwire.kernels.state import HDR_LOCK, CardStateTable, SnapshotError

log = logging.getLogger(__name__)


class SharedCardState:
    """A card state table in shared memory plus the lock that serialises its writers."""

    def __init__(self, memory: shared_memory.SharedMemory, *, owner: bool) -> None:
        self._memory = memory
        self._owner = owner
        self._snapshot_buffer: np.ndarray | None = None
        self.table = CardStateTable.attach(memory.buf)

    @classmethod
    def create(cls, capacity: int, *, snapshot: Path | None = None) -> SharedCardState:
        """New shared table (supervisor side), restored from ``snapshot`` when it exists."""
        size = CardStateTable.nbytes_for(capacity)
        memory = shared_memory.SharedMemory(create=True, size=size)
        restored = False
        if snapshot is not None and snapshot.exists():
            try:
                CardStateTable.restore_into(snapshot, memory.buf)
                restored = True
                log.info("restored card state from %s", snapshot)
            except (SnapshotError, ValueError, OSError) as exc:
                log.warning(
                    "card state snapshot %s not restored (%s); starting empty", snapshot, exc
                )
        if not restored:
            # Fresh shared memory is zero-filled by the kernel: no need to write it.
            CardStateTable(memory.buf, capacity, zero=False)
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
        """Consistent snapshot: copy under the table's lock, write (atomically) outside it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._snapshot_buffer is None:
            # Allocated and faulted in once, outside the lock: copying into fresh pages
            # under the lock stalled every worker for up to a second per snapshot.
            self._snapshot_buffer = np.ones(self.table.nbytes, dtype=np.uint8)
        copy = self._snapshot_buffer
        header = self.table.header
        spin_lock(header, HDR_LOCK, os.getpid())
        try:
            copy[:] = np.frombuffer(self._memory.buf, dtype=np.uint8, count=self.table.nbytes)
        finally:
            spin_unlock(header, HDR_LOCK)
        CardStateTable.attach(copy).snapshot(path)

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
