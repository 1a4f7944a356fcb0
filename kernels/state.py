"""Per-card feature state: an open-addressing hash table made of flat numpy arrays.

The table lives in one byte buffer (private numpy memory, a ``bytearray`` or a
``multiprocessing.shared_memory.SharedMemory.buf``), so worker processes can share it.
Layout, every block starting on a 64-byte boundary::

    header        int64[8]          magic, layout version, capacity, probe_limit,
                                    occupied slots, evictions, lock word, 1 reserved
    keys          uint64[C]         card key of the slot; 0 = empty
    last_time_ms  int64[C]          latest event time seen for the card (never decreases)
    counts        int64[C, 2]       lifetime transactions, transactions with a finite amount
    stats         float64[C, 8]     decayed counts 1h/24h/7d, decayed amount sums 1h/24h/7d
                                    (as of last_time_ms), Welford mean and M2 of amounts
    merchants     uint64[C, 16]     ring of the last 16 merchant keys
    countries     int32[C, 8]       ring of the last 8 country codes

That is 256 bytes per slot (256 MiB at the default capacity of 2**20). Ring positions
are not stored: every transaction pushes one entry, so the next position is
``txn_count % ring size`` and the valid entries are the first ``min(txn_count, size)``.

Probing is linear from a multiplicative hash of the key, over at most ``probe_limit``
slots. Slots are never emptied, so a lookup may stop at the first empty slot. When the
window holds neither the key nor an empty slot, the card with the smallest
``last_time_ms`` in the window (the first such slot on ties) is evicted: its slot is
reset and reused in place (no tombstones needed) and the eviction counter goes up.
Everything depends only on the sequence of transactions, so offline and online passes
over the same stream build identical tables.

The probing itself runs inside the feature kernels (:mod:`riskwire.kernels.features`);
:meth:`CardStateTable.find` is the same lookup in Python. Writers serialise on a
spinlock in the header (``HDR_LOCK``), taken inside the feature kernel.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from typing import Final

import numpy as np

DEFAULT_CAPACITY: Final = 1 << 20
DEFAULT_PROBE_LIMIT: Final = 32
MERCHANT_RING: Final = 16
COUNTRY_RING: Final = 8
LAYOUT_VERSION: Final = 1

# header slots
HDR_MAGIC, HDR_VERSION, HDR_CAPACITY, HDR_PROBE_LIMIT, HDR_OCCUPIED, HDR_EVICTIONS = range(6)
HDR_LOCK = 6  # writers' spinlock word: owner pid, 0 = free (see kernels.atomics)
HEADER_LEN: Final = 8
_MAGIC: Final = int.from_bytes(b"RWCARDST", "little")
# counts columns
CNT_TXN, CNT_AMOUNT = 0, 1
# stats columns: decayed counts, decayed amount sums, Welford mean and M2
ST_COUNT_1H, ST_COUNT_24H, ST_COUNT_7D = 0, 1, 2
ST_AMOUNT_1H, ST_AMOUNT_24H, ST_AMOUNT_7D = 3, 4, 5
ST_MEAN, ST_M2 = 6, 7
NUM_STATS: Final = 8

_ALIGN: Final = 64
# (name, dtype, per-slot shape), in buffer order after the header
_FIELDS: Final = (
    ("keys", np.uint64, ()),
    ("last_time_ms", np.int64, ()),
    ("counts", np.int64, (2,)),
    ("stats", np.float64, (NUM_STATS,)),
    ("merchants", np.uint64, (MERCHANT_RING,)),
    ("countries", np.int32, (COUNTRY_RING,)),
)

# One card's slot as a packed record (256 bytes, field order as in the table): what an
# external store (Redis) keeps per card, moved in and out of a table by slot index.
CARD_RECORD: Final = np.dtype([(name, dtype, shape) for name, dtype, shape in _FIELDS], align=False)

# Snapshot file: a fixed 64-byte header, then (format 2) the table's header, the slot
# numbers of the cards and their packed records; an empty slot takes no space. Format 1
# (the table's bytes verbatim, 268 MB at the default capacity whatever it held) is
# still read.
_FILE_MAGIC: Final = b"RWSNAP\x00\x00"
_FILE_VERSION: Final = 2
_FULL_FILE_VERSION: Final = 1
_FILE_PREFIX = struct.Struct("<8sII")  # magic, version, layout
_FULL_FILE_HEADER = struct.Struct("<8sIIQQQI")  # … capacity, probe, nbytes, crc
_FILE_HEADER = struct.Struct("<8sIIQQQIQ")  # … capacity, probe, nbytes, crc, cards
_FILE_HEADER_LEN: Final = 64

# home slot of a key: multiplicative hash, high bits folded down (same in the kernels)
HASH_MULTIPLIER: Final = 0x9E3779B97F4A7C15
HASH_SHIFT: Final = 29
_MASK64: Final = (1 << 64) - 1


class SnapshotError(ValueError):
    """A snapshot file is missing pieces, corrupt or of an unknown format."""


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(capacity: int) -> tuple[list[tuple[str, int, type, tuple[int, ...]]], int]:
    """Offsets of every array for ``capacity`` slots, and the total byte size."""
    offset = _round_up(HEADER_LEN * 8)
    blocks = []
    for name, dtype, shape in _FIELDS:
        full_shape = (capacity, *shape)
        blocks.append((name, offset, dtype, full_shape))
        offset = _round_up(offset + int(np.prod(full_shape)) * np.dtype(dtype).itemsize)
    return blocks, offset


def _check_capacity(capacity: int, probe_limit: int | None) -> int:
    """Validate; returns the probe limit (default: DEFAULT_PROBE_LIMIT capped at capacity)."""
    if not isinstance(capacity, int | np.integer) or capacity < 2 or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two >= 2, got {capacity!r}")
    if probe_limit is None:
        return min(DEFAULT_PROBE_LIMIT, capacity)
    if not 1 <= probe_limit <= capacity:
        raise ValueError(f"probe_limit must be in [1, capacity={capacity}], got {probe_limit!r}")
    return int(probe_limit)


class CardStateTable:
    """Per-card state arrays laid out in one byte buffer (see the module docstring)."""

    __slots__ = (
        "buffer",
        "nbytes",
        "header",
        "keys",
        "last_time_ms",
        "counts",
        "stats",
        "merchants",
        "countries",
        "arrays",
        "_bytes",
    )

    def __init__(
        self,
        buffer: memoryview | bytearray | np.ndarray,
        capacity: int | None = None,
        *,
        probe_limit: int | None = None,
        zero: bool = True,
    ) -> None:
        """Lay the table out in a writable ``buffer``.

        With ``capacity``, the buffer is formatted as a new empty table (zero-filled
        first unless ``zero=False``, for memory known to be zeroed); ``probe_limit``
        defaults to ``min(DEFAULT_PROBE_LIMIT, capacity)``. Without it, the
        table already formatted in the buffer is attached, e.g. a second process's view
        of a shared-memory table.
        """
        raw = _writable_bytes(buffer)
        formatting = capacity is not None
        if not formatting:
            if raw.size < HEADER_LEN * 8:
                raise ValueError("buffer is too small to hold a card state table header")
            header = raw[: HEADER_LEN * 8].view(np.int64)
            if header[HDR_MAGIC] != _MAGIC or header[HDR_VERSION] != LAYOUT_VERSION:
                raise ValueError("buffer does not hold a card state table (bad magic/version)")
            capacity, probe_limit = int(header[HDR_CAPACITY]), int(header[HDR_PROBE_LIMIT])
            _check_capacity(capacity, probe_limit)
        else:
            probe_limit = _check_capacity(capacity, probe_limit)
        blocks, nbytes = _layout(capacity)
        if raw.size < nbytes:
            raise ValueError(f"buffer has {raw.size} bytes, capacity {capacity} needs {nbytes}")
        self.buffer = buffer
        self.nbytes = nbytes
        self._bytes = raw[:nbytes]
        self.header = raw[: HEADER_LEN * 8].view(np.int64)
        if formatting:
            if zero:
                self._bytes[:] = 0
            self.header[:] = (_MAGIC, LAYOUT_VERSION, capacity, probe_limit, 0, 0, 0, 0)
        for name, offset, dtype, shape in blocks:
            count = int(np.prod(shape))
            view = raw[offset : offset + count * np.dtype(dtype).itemsize].view(dtype)
            setattr(self, name, view.reshape(shape))
        self.arrays = (
            self.header,
            self.keys,
            self.last_time_ms,
            self.counts,
            self.stats,
            self.merchants,
            self.countries,
        )

    @staticmethod
    def nbytes_for(capacity: int) -> int:
        """Bytes a table of ``capacity`` slots needs in a buffer."""
        _check_capacity(capacity, 1)
        return _layout(capacity)[1]

    @classmethod
    def create(
        cls, capacity: int = DEFAULT_CAPACITY, *, probe_limit: int | None = None
    ) -> CardStateTable:
        """A new empty table in private memory (pages are committed as cards arrive)."""
        probe_limit = _check_capacity(capacity, probe_limit)
        buffer = np.zeros(_layout(capacity)[1], dtype=np.uint8)
        return cls(buffer, capacity, probe_limit=probe_limit, zero=False)

    @classmethod
    def attach(cls, buffer: memoryview | bytearray | np.ndarray) -> CardStateTable:
        """A view of the table already formatted in ``buffer``."""
        return cls(buffer)

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return int(self.header[HDR_CAPACITY])

    @property
    def probe_limit(self) -> int:
        """Most slots a lookup inspects."""
        return int(self.header[HDR_PROBE_LIMIT])

    @property
    def occupied(self) -> int:
        """Slots holding a card."""
        return int(self.header[HDR_OCCUPIED])

    @property
    def evictions(self) -> int:
        """Cards evicted because their probe window was full."""
        return int(self.header[HDR_EVICTIONS])

    def __len__(self) -> int:
        return self.occupied

    def find(self, card_key: int) -> int:
        """Slot index holding ``card_key``, or -1 when the card is not in the table."""
        key = int(card_key)
        mask = self.capacity - 1
        h = (key * HASH_MULTIPLIER) & _MASK64
        s = (h ^ (h >> HASH_SHIFT)) & mask
        for _ in range(self.probe_limit):
            k = int(self.keys[s])
            if k == key:
                return s
            if k == 0:
                return -1
            s = (s + 1) & mask
        return -1

    def records(self, slots: np.ndarray) -> np.ndarray:
        """The cards in ``slots`` as packed :data:`CARD_RECORD` rows (copies)."""
        out = np.empty(len(slots), dtype=CARD_RECORD)
        for name, _, _ in _FIELDS:
            out[name] = getattr(self, name)[slots]
        return out

    def put_records(self, slots: np.ndarray, records: np.ndarray) -> None:
        """Overwrite ``slots`` with packed :data:`CARD_RECORD` rows (keys included).

        The occupied count is not adjusted: slots are expected to hold their cards
        already (see :func:`riskwire.kernels.features.card_slots`).
        """
        for name, _, _ in _FIELDS:
            getattr(self, name)[slots] = records[name]

    def snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write the table's cards to ``path`` atomically (see :func:`write_snapshot`).

        Writers must be paused (hold the table lock) for a consistent snapshot.
        """
        slots = np.flatnonzero(self.keys)
        write_snapshot(path, self.header, slots, self.records(slots))

    @staticmethod
    def snapshot_capacity(path: str | os.PathLike[str]) -> int:
        """The capacity of the table a snapshot was taken from (its header checked)."""
        with open(path, "rb") as f:
            return _read_snapshot_header(f, path)[0]

    @classmethod
    def restore(cls, path: str | os.PathLike[str]) -> CardStateTable:
        """Load a snapshot into a new private table."""
        with open(path, "rb") as f:
            capacity, probe_limit, nbytes, body = _read_snapshot_header(f, path)
            buffer = np.zeros(nbytes, dtype=np.uint8)
            body(buffer, True)
        return cls(buffer)

    @classmethod
    def restore_into(
        cls,
        path: str | os.PathLike[str],
        buffer: memoryview | bytearray | np.ndarray,
        *,
        zeroed: bool = False,
    ) -> CardStateTable:
        """Load a snapshot into ``buffer`` (e.g. shared memory) and return a view of it.
        With ``zeroed`` (fresh shared memory), the empty slots are not written: only
        the pages of saved cards are touched.

        On a corrupt file the buffer's header is wiped, so nothing can attach to
        half-loaded state, and :class:`SnapshotError` is raised.
        """
        raw = _writable_bytes(buffer)
        with open(path, "rb") as f:
            capacity, probe_limit, nbytes, body = _read_snapshot_header(f, path)
            if raw.size < nbytes:
                raise ValueError(f"buffer has {raw.size} bytes, snapshot needs {nbytes}")
            try:
                body(raw[:nbytes], zeroed)
            except BaseException:
                raw[: HEADER_LEN * 8] = 0
                raise
        return cls(buffer)


def write_snapshot(
    path: str | os.PathLike[str], header: np.ndarray, slots: np.ndarray, records: np.ndarray
) -> None:
    """Write a snapshot (format 2) atomically: temp file in the same dir, fsync, rename.

    ``header`` is the table's header (its counters as of the snapshot), ``slots`` the
    increasing slot numbers of the saved cards and ``records`` their
    :data:`CARD_RECORD` rows. The file holds only those cards (264 bytes each): 5,000
    cards make 1.3 MB, whatever the table's capacity.
    """
    slots = np.ascontiguousarray(slots, dtype="<i8")
    records = np.ascontiguousarray(records, dtype=CARD_RECORD)
    if len(slots) != len(records):
        raise ValueError(f"{len(slots)} slots but {len(records)} records")
    table_header = np.ascontiguousarray(header, dtype="<i8").copy()
    table_header[HDR_OCCUPIED] = len(slots)  # the cards saved, whatever changed meanwhile
    table_header[HDR_LOCK] = 0
    capacity, probe_limit = int(table_header[HDR_CAPACITY]), int(table_header[HDR_PROBE_LIMIT])
    parts = (table_header, slots, records)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    head = _FILE_HEADER.pack(
        _FILE_MAGIC, _FILE_VERSION, LAYOUT_VERSION, capacity, probe_limit,
        _layout(capacity)[1], crc, len(slots),
    ).ljust(_FILE_HEADER_LEN, b"\0")  # fmt: skip
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cardstate-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for part in parts:
                f.write(part.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _writable_bytes(buffer: memoryview | bytearray | np.ndarray) -> np.ndarray:
    raw = np.frombuffer(buffer, dtype=np.uint8)
    if not raw.flags.writeable:
        raise ValueError("buffer must be writable")
    if raw.ctypes.data % 8:
        raise ValueError("buffer must be 8-byte aligned")
    return raw


def _read_snapshot_header(f, path) -> tuple[int, int, int, Callable[[np.ndarray, bool], None]]:
    """Validate a snapshot's header; returns capacity, probe_limit, the table's byte size
    and a function that reads the body into a buffer of that size, checking it (its
    second argument: whether the buffer is known to be zero-filled)."""
    head = f.read(_FILE_HEADER_LEN)
    if len(head) < _FILE_HEADER_LEN:
        raise SnapshotError(f"{path}: truncated snapshot (header is {len(head)} bytes)")
    magic, version, layout = _FILE_PREFIX.unpack_from(head)
    if magic != _FILE_MAGIC:
        raise SnapshotError(f"{path}: not a card state snapshot (bad magic {magic!r})")
    if version not in (_FILE_VERSION, _FULL_FILE_VERSION) or layout != LAYOUT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {version}/layout {layout} is not supported "
            f"(expected {_FILE_VERSION} or {_FULL_FILE_VERSION}/{LAYOUT_VERSION})"
        )
    if version == _FULL_FILE_VERSION:
        *_, capacity, probe_limit, nbytes, crc = _FULL_FILE_HEADER.unpack_from(head)
        cards = 0
    else:
        *_, capacity, probe_limit, nbytes, crc, cards = _FILE_HEADER.unpack_from(head)
    try:
        _check_capacity(capacity, probe_limit)
    except ValueError as exc:
        raise SnapshotError(f"{path}: corrupt snapshot header: {exc}") from exc
    if nbytes != _layout(capacity)[1] or cards > capacity:
        raise SnapshotError(f"{path}: corrupt snapshot header (size does not match capacity)")

    def read_full(out: np.ndarray, zeroed: bool) -> None:
        _read_exactly(f, out, path, "table")
        if zlib.crc32(out) != crc:
            raise SnapshotError(f"{path}: corrupt snapshot (checksum mismatch)")

    def read_cards(out: np.ndarray, zeroed: bool) -> None:
        table_header = np.empty(HEADER_LEN, "<i8")
        slots = np.empty(cards, "<i8")
        records = np.empty(cards, CARD_RECORD)
        for part, what in ((table_header, "table header"), (slots, "slots"), (records, "cards")):
            _read_exactly(f, part.view(np.uint8).reshape(-1), path, what)
        if zlib.crc32(records, zlib.crc32(slots, zlib.crc32(table_header))) != crc:
            raise SnapshotError(f"{path}: corrupt snapshot (checksum mismatch)")
        if cards and (slots[0] < 0 or slots[-1] >= capacity or np.any(np.diff(slots) <= 0)):
            raise SnapshotError(f"{path}: corrupt snapshot (slot numbers out of order)")
        if not np.all(records["keys"]):
            raise SnapshotError(f"{path}: corrupt snapshot (a saved slot has no card)")
        table = CardStateTable(out, capacity, probe_limit=probe_limit, zero=not zeroed)
        table.put_records(slots, records)
        table.header[HDR_OCCUPIED] = cards
        table.header[HDR_EVICTIONS] = table_header[HDR_EVICTIONS]

    def read_body(out: np.ndarray, zeroed: bool) -> None:
        (read_full if version == _FULL_FILE_VERSION else read_cards)(out, zeroed)
        if f.read(1):
            raise SnapshotError(f"{path}: corrupt snapshot (trailing bytes after the table)")
        out[HDR_LOCK * 8 : (HDR_LOCK + 1) * 8] = 0  # a lock held at snapshot time is void

    return capacity, probe_limit, nbytes, read_body


def _read_exactly(f, out: np.ndarray, path, what: str) -> None:
    got = f.readinto(out)
    if got != out.nbytes:
        raise SnapshotError(f"{path}: truncated snapshot ({got} of {out.nbytes} bytes of {what})")
