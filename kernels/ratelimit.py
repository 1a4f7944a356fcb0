"""Per-client token buckets in a flat buffer, shared by every worker process.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second; a request
costing ``cost`` tokens passes when the bucket holds that many, and otherwise learns how
long until it will (the retry-after hint). Buckets live in a fixed-capacity
open-addressing table laid out in one byte buffer (private numpy memory or a
``multiprocessing.shared_memory.SharedMemory.buf``), every block 64-byte aligned::

    header   int64[8]     magic, layout version, capacity, probe_limit, occupied slots,
                          fail-open count, lock word, reclaimed slots
    keys     uint64[C]    client key (:func:`hash_client`); 0 = empty
    tokens   float64[C]   tokens as of last_ns
    last_ns  int64[C]     last refill, CLOCK_MONOTONIC ns (``time.monotonic_ns()``: one
                          clock for every process on the machine)
    rates    float64[C]   tokens/s the bucket was last used with
    bursts   float64[C]   capacity the bucket was last used with

:func:`take` runs entirely under the header's spinlock (``HDR_LOCK``, owner pid, see
:mod:`riskwire.kernels.atomics`), so the processes share one bucket per client. Rate and
burst come with each call (from the config) and are stored in the slot, so a config
change applies on the next request.

Refill: ``tokens = min(burst, tokens + (now_ns - last_ns) / 1e9 * rate)``; a ``now_ns``
older than ``last_ns`` (two processes read the clock, the later one took the lock first)
refills nothing and leaves ``last_ns`` alone. A new bucket starts full.

Probing is linear from the card table's multiplicative hash over ``probe_limit`` slots;
slots never become empty, so a lookup may stop at the first empty slot. A slot whose
bucket has refilled to its burst by now is *idle*: it is indistinguishable from a bucket
that does not exist yet, so a new client may take it over (counted in
``HDR_RECLAIMED``). Only when every slot of the window holds a bucket still in use does
the table count a *fail-open* (``HDR_FAIL_OPEN``) and allow the request: refusing every
new client because the table is too small would turn a sizing mistake into an outage,
while failing open merely leaves that client unthrottled until buckets go idle. The
table is sized by config; the counter is exported so the mistake is visible.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numba import njit, types

from .atomics import spin_lock, spin_unlock
from .encoding import hash64

DEFAULT_CAPACITY: Final = 1 << 14
DEFAULT_PROBE_LIMIT: Final = 32
LAYOUT_VERSION: Final = 1

# header slots
HDR_MAGIC, HDR_VERSION, HDR_CAPACITY, HDR_PROBE_LIMIT, HDR_OCCUPIED, HDR_FAIL_OPEN = range(6)
HDR_LOCK = 6  # spinlock word: owner pid, 0 = free (see kernels.atomics)
HDR_RECLAIMED = 7  # idle buckets taken over by new clients
HEADER_LEN: Final = 8
_MAGIC: Final = int.from_bytes(b"RWRATELM", "little")

_ALIGN: Final = 64
_FIELDS: Final = (  # (name, dtype), in buffer order after the header
    ("keys", np.uint64),
    ("tokens", np.float64),
    ("last_ns", np.int64),
    ("rates", np.float64),
    ("bursts", np.float64),
)
_TABLE_TYPES = (  # RateLimitTable.arrays
    types.int64[::1], types.uint64[::1], types.float64[::1], types.int64[::1],
    types.float64[::1], types.float64[::1],
)  # fmt: skip

# home slot of a key (same hash as the card state table); the probing lives in this
# module because numba's cache does not notice edits to other modules
HASH_MULTIPLIER: Final = 0x9E3779B97F4A7C15
HASH_SHIFT: Final = 29
_MASK64: Final = (1 << 64) - 1
_HASH_MULTIPLIER = np.uint64(HASH_MULTIPLIER)
_HASH_SHIFT = np.uint64(HASH_SHIFT)
_EMPTY = np.uint64(0)
_NS_PER_S: Final = 1e9
_inline = njit(inline="always", nogil=True, cache=True)


def hash_client(client_id: str) -> int:
    """Stable 64-bit table key of a client id (never 0; same in every process)."""
    return hash64(client_id)


@_inline
def _refilled(tokens, last_ns, now_ns, rate, burst):
    """Tokens after refilling from ``last_ns`` to ``now_ns`` (no refill backwards)."""
    elapsed_ns = now_ns - last_ns
    refill = elapsed_ns / _NS_PER_S * rate if elapsed_ns > 0 else 0.0
    return min(burst, tokens + refill)


@_inline
def _acquire_slot(header, keys, tokens, last_ns, rates, bursts, key, now_ns, probe_limit):
    """Slot of ``key`` and whether it is new; (-1, False) when the window is all in use."""
    mask = keys.shape[0] - 1
    h = key * _HASH_MULTIPLIER
    h ^= h >> _HASH_SHIFT
    s = np.int64(h & np.uint64(mask))
    idle = -1
    for _ in range(probe_limit):
        k = keys[s]
        if k == key:
            return s, False
        if k == _EMPTY:
            break
        if idle < 0 and _refilled(tokens[s], last_ns[s], now_ns, rates[s], bursts[s]) >= bursts[s]:
            idle = s
        s = (s + 1) & mask
    else:  # window exhausted: the key is not in the table and there is no empty slot
        if idle < 0:
            return -1, False
    if idle >= 0:  # reuse the first idle bucket before an empty slot: shorter chains
        header[HDR_RECLAIMED] += 1
        s = idle
    else:
        header[HDR_OCCUPIED] += 1
    keys[s] = key
    return s, True


@njit(
    types.float64(
        *_TABLE_TYPES, types.uint64, types.int64, types.float64, types.float64, types.float64,
        types.int64,
    ),
    cache=True,
    nogil=True,
)  # fmt: skip
def take(header, keys, tokens, last_ns, rates, bursts, key, now_ns, cost, rate, burst, pid):
    """Take ``cost`` tokens from ``key``'s bucket at ``now_ns``, locking for ``pid``.

    Returns 0.0 when allowed, else the seconds until ``cost`` tokens will be available
    (``inf`` when ``cost`` exceeds ``burst``: never). ``rate`` (tokens/s) <= 0 means
    unlimited: allowed without touching the table. A ``cost`` <= 0 and key 0 (which
    cannot be stored) are allowed likewise.
    """
    if not rate > 0.0 or not cost > 0.0 or key == _EMPTY:
        return 0.0
    if not burst >= cost:
        return math.inf
    # header may live in shared memory: never trust it to be in range
    probe_limit = max(1, min(header[HDR_PROBE_LIMIT], keys.shape[0]))
    spin_lock(header, HDR_LOCK, pid)
    s, new = _acquire_slot(header, keys, tokens, last_ns, rates, bursts, key, now_ns, probe_limit)
    if s < 0:
        header[HDR_FAIL_OPEN] += 1
        spin_unlock(header, HDR_LOCK)
        return 0.0
    if new:
        available = burst
        last_ns[s] = now_ns
    else:
        available = _refilled(tokens[s], last_ns[s], now_ns, rate, burst)
        if now_ns > last_ns[s]:
            last_ns[s] = now_ns
    rates[s] = rate
    bursts[s] = burst
    if available >= cost:
        tokens[s] = available - cost
        wait_s = 0.0
    else:
        tokens[s] = available
        wait_s = (cost - available) / rate
    spin_unlock(header, HDR_LOCK)
    return wait_s


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(capacity: int) -> tuple[list[tuple[str, int, type]], int]:
    """Byte offset of every block for ``capacity`` slots, and the total size."""
    offset = _round_up(HEADER_LEN * 8)
    blocks = []
    for name, dtype in _FIELDS:
        blocks.append((name, offset, dtype))
        offset = _round_up(offset + capacity * np.dtype(dtype).itemsize)
    return blocks, offset


def _check_capacity(capacity: int, probe_limit: int | None) -> int:
    """Validate; returns the probe limit (default: DEFAULT_PROBE_LIMIT capped at capacity)."""
    if not isinstance(capacity, int | np.integer) or capacity < 2 or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two >= 2, got {capacity!r}")
    if probe_limit is None:
        return min(DEFAULT_PROBE_LIMIT, int(capacity))
    if not 1 <= probe_limit <= capacity:
        raise ValueError(f"probe_limit must be in [1, capacity={capacity}], got {probe_limit!r}")
    return int(probe_limit)


class RateLimitTable:
    """Token buckets laid out in one byte buffer (see the module docstring)."""

    __slots__ = ("nbytes", "header", "keys", "tokens", "last_ns", "rates", "bursts", "arrays")

    def __init__(self, buffer: memoryview | bytearray | np.ndarray) -> None:
        """View of the table already formatted in ``buffer`` (see :meth:`attach`)."""
        raw = _writable_bytes(buffer)
        if raw.size < HEADER_LEN * 8:
            raise ValueError("buffer is too small to hold a rate limit table header")
        header = raw[: HEADER_LEN * 8].view(np.int64)
        if header[HDR_MAGIC] != _MAGIC or header[HDR_VERSION] != LAYOUT_VERSION:
            raise ValueError("buffer does not hold a rate limit table (bad magic/version)")
        capacity = int(header[HDR_CAPACITY])
        _check_capacity(capacity, int(header[HDR_PROBE_LIMIT]))
        blocks, nbytes = _layout(capacity)
        if raw.size < nbytes:
            raise ValueError(f"buffer has {raw.size} bytes, capacity {capacity} needs {nbytes}")
        self.nbytes = nbytes
        self.header = header
        for name, offset, dtype in blocks:
            size = capacity * np.dtype(dtype).itemsize
            setattr(self, name, raw[offset : offset + size].view(dtype))
        self.arrays = (self.header, self.keys, self.tokens, self.last_ns, self.rates, self.bursts)

    @staticmethod
    def nbytes_for(capacity: int) -> int:
        """Bytes a table of ``capacity`` slots needs in a buffer."""
        _check_capacity(capacity, 1)
        return _layout(capacity)[1]

    @classmethod
    def format(
        cls,
        buffer: memoryview | bytearray | np.ndarray,
        capacity: int,
        *,
        probe_limit: int | None = None,
        zero: bool = True,
    ) -> RateLimitTable:
        """Write a new empty table into ``buffer`` and return a view of it.

        ``zero=False`` skips zero-filling, for memory known to be zeroed (fresh shared
        memory, ``np.zeros``).
        """
        probe_limit = _check_capacity(capacity, probe_limit)
        raw = _writable_bytes(buffer)
        nbytes = _layout(capacity)[1]
        if raw.size < nbytes:
            raise ValueError(f"buffer has {raw.size} bytes, capacity {capacity} needs {nbytes}")
        if zero:
            raw[:nbytes] = 0
        header = raw[: HEADER_LEN * 8].view(np.int64)
        header[:] = (_MAGIC, LAYOUT_VERSION, capacity, probe_limit, 0, 0, 0, 0)
        return cls(buffer)

    @classmethod
    def create(
        cls, capacity: int = DEFAULT_CAPACITY, *, probe_limit: int | None = None
    ) -> RateLimitTable:
        """A new empty table in private memory."""
        buffer = np.zeros(cls.nbytes_for(capacity), dtype=np.uint8)
        return cls.format(buffer, capacity, probe_limit=probe_limit, zero=False)

    @classmethod
    def attach(cls, buffer: memoryview | bytearray | np.ndarray) -> RateLimitTable:
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
        """Slots holding a bucket."""
        return int(self.header[HDR_OCCUPIED])

    @property
    def fail_open(self) -> int:
        """Requests allowed unchecked because the client's probe window was all in use."""
        return int(self.header[HDR_FAIL_OPEN])

    @property
    def reclaimed(self) -> int:
        """Idle buckets taken over by new clients."""
        return int(self.header[HDR_RECLAIMED])

    def take(
        self, key: int, now_ns: int, cost: float, rate: float, burst: float, pid: int
    ) -> float:
        """:func:`take` on this table: 0.0 if allowed, else retry-after seconds."""
        if not 0 < key <= _MASK64:
            raise ValueError(f"key must be a nonzero uint64, got {key!r}")
        return take(*self.arrays, key, now_ns, cost, rate, burst, pid)

    def find(self, key: int) -> int:
        """Slot index holding ``key``, or -1 (same probing as the kernel; no lock)."""
        mask = self.capacity - 1
        h = (int(key) * HASH_MULTIPLIER) & _MASK64
        s = (h ^ (h >> HASH_SHIFT)) & mask
        for _ in range(self.probe_limit):
            k = int(self.keys[s])
            if k == key:
                return s
            if k == 0:
                return -1
            s = (s + 1) & mask
        return -1


def warmup() -> None:
    """Run :func:`take` on a private throwaway table (never a shared one's tokens).

    The kernel itself is compiled (or loaded from numba's cache) on import.
    """
    table = RateLimitTable.create(2)
    table.take(1, 0, 1.0, 1.0, 1.0, 1)
    table.take(1, 1, 1.0, 1.0, 1.0, 1)


def _writable_bytes(buffer: memoryview | bytearray | np.ndarray) -> np.ndarray:
    raw = np.frombuffer(buffer, dtype=np.uint8)
    if not raw.flags.writeable:
        raise ValueError("buffer must be writable")
    if raw.ctypes.data % 8:
        raise ValueError("buffer must be 8-byte aligned")
    return raw
