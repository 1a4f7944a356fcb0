"""Per-client rate limits (token buckets) enforced across all worker processes together.

The supervisor creates a :class:`SharedRateLimiter` in POSIX shared memory; each worker
attaches to it by name and calls :meth:`SharedRateLimiter.check` once per request. The
buckets live in :mod:`riskwire.kernels.ratelimit`, updated under the table's spinlock
inside the kernel, so N workers enforce one limit per client, not N.

Limits come from a setting such as ``"default=100/200; payments=5000/10000"``
(:func:`parse_rate_limits`): ``rate`` requests/s with a ``burst``, per client id, and a
default for every other client.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Final

from riskwire.kernels.atomics import break_lock
from riskwire.kernels.ratelimit import (
    DEFAULT_CAPACITY,
    HDR_LOCK,
    RateLimitTable,
    hash_client,
    take,
    warmup,
)

DEFAULT_CLIENT: Final = "default"  # the name of the default entry in the setting
_MEMO_LIMIT: Final = 1 << 16  # client ids remembered per process (bounds the memo dict)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's parameters: ``rate_per_s`` 0 means unlimited."""

    rate_per_s: float
    burst: float

    @property
    def unlimited(self) -> bool:
        """True when requests of this client are never throttled."""
        return self.rate_per_s <= 0.0


UNLIMITED: Final = RateLimit(0.0, 0.0)


@dataclass(frozen=True)
class RateLimits:
    """Per-client limits and the default for every client not listed."""

    default: RateLimit = UNLIMITED
    clients: dict[str, RateLimit] = field(default_factory=dict, hash=False)

    def for_client(self, client_id: str) -> RateLimit:
        """The limit that applies to ``client_id``."""
        return self.clients.get(client_id, self.default)


def parse_rate_limits(text: str) -> RateLimits:
    """Parse ``"default=100/200; payments=5000/10000; batch-loader=50"``.

    Entries are ``CLIENT=RATE[/BURST]`` separated by ``;`` or newlines: ``RATE`` in
    requests/s (``0`` = unlimited), ``BURST`` the most requests at once (default:
    ``RATE``, at least 1). ``default`` sets the limit of unlisted clients (unlimited
    when absent). Raises ValueError naming the bad entry.
    """
    default = UNLIMITED
    clients: dict[str, RateLimit] = {}
    seen: set[str] = set()
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"rate limit {part!r}: expected CLIENT=RATE[/BURST]")
        if name in seen:
            raise ValueError(f"rate limit {part!r}: client {name!r} is listed twice")
        seen.add(name)
        limit = _parse_limit(part, value)
        if name == DEFAULT_CLIENT:
            default = limit
        else:
            clients[name] = limit
    return RateLimits(default, clients)


def _parse_limit(part: str, value: str) -> RateLimit:
    """``RATE[/BURST]`` of entry ``part``."""
    rate_text, slash, burst_text = (s.strip() for s in value.partition("/"))
    rate = _parse_number(part, "rate", rate_text)
    if rate == 0.0:
        return UNLIMITED
    if not slash:
        return RateLimit(rate, max(rate, 1.0))
    burst = _parse_number(part, "burst", burst_text)
    if burst < 1.0:
        raise ValueError(f"rate limit {part!r}: burst must be >= 1 (one request), got {burst:g}")
    return RateLimit(rate, burst)


def _parse_number(part: str, what: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"rate limit {part!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(f"rate limit {part!r}: {what} must be finite and >= 0, got {text!r}")
    return number


_PID = os.getpid()  # lock owner id, refreshed in a forked child


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class SharedRateLimiter:
    """Token buckets in shared memory, one per client, checked by every worker."""

    def __init__(
        self, memory: shared_memory.SharedMemory, *, owner: bool, limits: RateLimits | None
    ) -> None:
        self._memory = memory
        self._owner = owner
        self.table: RateLimitTable | None = RateLimitTable.attach(memory.buf)
        self._arrays = self.table.arrays
        self._limits = limits or RateLimits()
        # client id -> (key, rate_per_s, burst): the hot path's one dict lookup
        self._memo: dict[str, tuple[int, float, float]] = {}
        warmup()

    @classmethod
    def create(
        cls,
        capacity: int = DEFAULT_CAPACITY,
        *,
        limits: RateLimits | None = None,
        probe_limit: int | None = None,
    ) -> SharedRateLimiter:
        """New empty shared table (supervisor side)."""
        size = RateLimitTable.nbytes_for(capacity)
        memory = shared_memory.SharedMemory(create=True, size=size)
        # fresh shared memory is zero-filled by the kernel: no need to write it
        RateLimitTable.format(memory.buf, capacity, probe_limit=probe_limit, zero=False)
        return cls(memory, owner=True, limits=limits)

    @classmethod
    def attach(cls, name: str, *, limits: RateLimits | None = None) -> SharedRateLimiter:
        """Worker side: map the supervisor's table by its shared-memory name."""
        return cls(shared_memory.SharedMemory(name=name), owner=False, limits=limits)

    @property
    def name(self) -> str:
        """Shared-memory segment name to hand to workers."""
        return self._memory.name

    @property
    def limits(self) -> RateLimits:
        """The limits in force in this process."""
        return self._limits

    def set_limits(self, limits: RateLimits) -> None:
        """Apply new limits from the next request on (buckets keep their tokens)."""
        self._limits = limits
        self._memo = {}

    def check(self, client_id: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``client_id``: 0.0 if allowed, else retry-after seconds.

        The retry-after is ``inf`` when ``cost`` exceeds the client's burst (never).
        """
        entry = self._memo.get(client_id)
        if entry is None:
            entry = self._remember(client_id)
        key, rate, burst = entry
        if rate <= 0.0:
            return 0.0
        return take(*self._arrays, key, time.monotonic_ns(), cost, rate, burst, _PID)

    def _remember(self, client_id: str) -> tuple[int, float, float]:
        if len(self._memo) >= _MEMO_LIMIT:  # unbounded client ids must not grow memory
            self._memo.clear()
        limit = self._limits.for_client(client_id)
        entry = (hash_client(client_id), limit.rate_per_s, limit.burst)
        self._memo[client_id] = entry
        return entry

    def warmup(self) -> None:
        """Run the kernel on a private throwaway table: no client's tokens are used."""
        warmup()

    def break_lock_of(self, pid: int) -> bool:
        """Free the table lock if process ``pid`` (dead) still holds it."""
        return bool(break_lock(self._arrays[0], HDR_LOCK, pid))

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the segment."""
        self.table = None  # release numpy views before closing the mapping
        self._arrays = ()
        with contextlib.suppress(BufferError):  # a view still alive: unmapped at exit
            self._memory.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self._memory.unlink()
