"""Per-card feature state in Redis, for replicas that share no memory.

Each card's state is one Redis hash ``{<prefix>:card:<card_key>}`` (the whole key is its
hash tag, so a card lives on one Cluster shard) with two fields: ``s``, the card's slot
of the local table packed as a 256-byte :data:`~riskwire.kernels.state.CARD_RECORD`,
and ``v``, a version counted up by every write.

A transaction is applied by optimistic concurrency around the *same* Numba kernel the
offline build and the shared-memory store run, so the features are exact by
construction:

1. the worker takes the card's last known record and version from its own cache
   (a card not seen yet: the empty record, version 0);
2. it loads the record into a small private table and runs ``compute_features`` on the
   request's rows — features from the state before each row, then the update;
3. one Lua script on the Redis server compares the version and, when it still matches,
   stores the new record (version + 1) — one round trip. When another replica wrote the
   card meanwhile, the script answers with the current record instead, and the worker
   goes back to step 2 with it (the write that lost is not applied).

Threads of one worker take turns on a card (striped locks by card key), so a write can
only lose to another process or replica, and the loser retries at once from the state
the script returned. So each successful write applies a card's rows to exactly the state
the previous write left, in the order the writes succeeded: the same sequence an offline
pass over that order sees. A batch sends one script per distinct card, pipelined (one
round trip per attempt). With card affinity at the load balancer (Envoy's ring hash on
the card id) a replica's cache is nearly always current and a transaction costs one
round trip; a card seen first by this worker, or written by another replica since,
costs two. One card written at once by many processes (a card-testing burst spread over
replicas) costs a retry per lost write, and past ``max_attempts`` lost writes in a row
the call fails as below.

When Redis is slow or down (a socket timeout, a refused connection, or a card that
stays contended past ``max_attempts``), ``on_failure`` decides: ``"closed"`` raises
:class:`~riskwire.server.redis_state.StateUnavailableError` (UNAVAILABLE), ``"degrade"``
scores with the stateless features only (every card is treated as new: no history),
marks the call (:meth:`RedisCardState.took_degraded`; the data plane adds the response
flag ``state_unavailable``) and counts it. Nothing is written then, so the card's
stored history stays what it was.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Final

import numpy as np
import redis
from redis.exceptions import NoScriptError, RedisError

from riskwire.kernels.encoding import TransactionArrays
from riskwire.kernels.features import card_slots, compute_features, peek_features
from riskwire.kernels.state import CARD_RECORD, HDR_EVICTIONS, HDR_OCCUPIED, CardStateTable

from .redis_state import RedisConfig, StateUnavailableError, _Breaker, _Script, card_key

DEFAULT_TTL_S: Final = 90 * 86_400  # a card idle this long is forgotten (0: never)
_STRIPES: Final = 256  # per-worker locks by card key: one writer per card per worker
_EMPTY_RECORD: Final = np.zeros(1, dtype=CARD_RECORD)[0].tobytes()

# KEYS[1] the card's hash; ARGV expected version, new record, TTL in ms (0: none).
# Returns {1, new version} when stored, {0, current version, current record} when not.
_APPLY = _Script("""
local current = redis.call('HMGET', KEYS[1], 'v', 's')
local version = tonumber(current[1]) or 0
if version ~= tonumber(ARGV[1]) then
  return {0, version, current[2] or ''}
end
version = version + 1
redis.call('HSET', KEYS[1], 'v', version, 's', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {1, version}
""")


class _Contended(RedisError):
    """A card's version changed under every attempt (treated like an unavailable store)."""


class _Scratch(threading.local):
    """Per-thread private tables, one per capacity, reused between calls."""

    def __init__(self) -> None:
        self.tables: dict[int, CardStateTable] = {}
        self.degraded = False

    def table(self, cards: int) -> CardStateTable:
        capacity = max(2, 1 << (2 * cards - 1).bit_length())
        table = self.tables.get(capacity)
        if table is None:
            table = CardStateTable.create(capacity, probe_limit=capacity)
            if capacity <= 1 << 12:  # keep the small ones; big batches are rare
                self.tables[capacity] = table
        else:
            table.keys[:] = 0
            table.header[HDR_OCCUPIED] = table.header[HDR_EVICTIONS] = 0
        return table


class RedisCardState:
    """Per-card feature state in Redis behind the interface of the shared-memory store
    (:class:`~riskwire.server.state.SharedCardState`): ``update`` and ``peek``."""

    def __init__(
        self,
        config: RedisConfig,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        cache_size: int = 1 << 16,
        max_attempts: int = 32,
        client: redis.Redis | None = None,
    ) -> None:
        if cache_size < 1 or max_attempts < 1 or ttl_s < 0:
            raise ValueError("cache_size and max_attempts must be >= 1, ttl_s >= 0")
        self.config = config
        self._client = client or config.client()
        self._owns_client = client is None
        self._prefix = config.key_prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._cache_size = cache_size
        self._max_attempts = max_attempts
        self._degrade = config.on_failure == "degrade"
        self._breaker = _Breaker(config.failure_threshold, config.failure_cooldown_s)
        self._scratch = _Scratch()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # card key -> (version, packed record): the newest this worker has seen
        self._cache: dict[int, tuple[int, bytes]] = {}
        self._lock = threading.Lock()  # the counters below
        self.calls = 0  # update() calls
        self.round_trips = 0  # pipelines sent to Redis (one per attempt)
        self.conflicts = 0  # card writes refused because another writer came first
        self.degraded = 0  # calls scored without state (on_failure = "degrade")

    def update(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx`` from each card's state, then apply ``tx`` to the state."""
        if self._breaker.is_open():
            return self._failed(tx, out, None)
        try:
            trips, conflicts = self._apply(tx, out)
        except RedisError as exc:
            return self._failed(tx, out, exc)
        if self._breaker.failures:
            self._breaker.succeeded("card state")
        with self._lock:
            self.calls += 1
            self.round_trips += trips
            self.conflicts += conflicts
        return out

    def peek(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray:
        """Features of ``tx`` against the stored state, changing nothing (one read)."""
        cards = _distinct(tx.card_key)
        try:
            pipe = self._client.pipeline(transaction=False)
            for card in cards.tolist():
                pipe.hget(card_key(self._prefix, card), "s")
            stored = pipe.execute()
        except RedisError as exc:
            return self._failed(tx, out, exc)
        table = self._load(cards, [s or _EMPTY_RECORD for s in stored])[0]
        return peek_features(table, tx, out)

    def took_degraded(self) -> bool:
        """Whether this thread's last call was scored without state (clears the mark)."""
        scratch = self._scratch
        if scratch.degraded:
            scratch.degraded = False
            return True
        return False

    def counters(self) -> dict[str, int]:
        """Calls, round trips, conflicts and degraded calls so far (this process)."""
        with self._lock:
            return {
                "calls": self.calls,
                "round_trips": self.round_trips,
                "conflicts": self.conflicts,
                "degraded": self.degraded,
            }

    def warmup(self) -> None:
        """Load the script into Redis's cache (a failure here is logged by the caller)."""
        self._client.script_load(_APPLY.source)

    def close(self) -> None:
        """Close the connections (when this store created its client)."""
        if self._owns_client:
            self._client.close()

    def _apply(self, tx: TransactionArrays, out: np.ndarray) -> tuple[int, int]:
        """Run the optimistic read-modify-write under the cards' stripe locks (threads of
        this worker take turns on a card, so only other processes can make a write
        lose); returns (round trips, conflicts)."""
        cards = _distinct(tx.card_key)
        stripes = sorted({card % _STRIPES for card in cards.tolist()})  # one order: no deadlock
        locks = self._stripes
        for stripe in stripes:
            locks[stripe].acquire()
        try:
            return self._apply_locked(tx, out, cards)
        finally:
            for stripe in stripes:
                locks[stripe].release()

    def _apply_locked(
        self, tx: TransactionArrays, out: np.ndarray, cards: np.ndarray
    ) -> tuple[int, int]:
        cache = self._cache
        known = [cache.get(card) for card in cards.tolist()]
        versions = [0 if k is None else k[0] for k in known]
        records = [_EMPTY_RECORD if k is None else k[1] for k in known]
        rows, rows_out, retry_rows = tx, out, None
        conflicts = 0
        for attempt in range(1, self._max_attempts + 1):
            table, slots = self._load(cards, records)
            compute_features(table, rows, rows_out)
            new = table.records(slots)
            replies = self._write(cards, versions, new)
            lost = []
            for j, reply in enumerate(replies):
                card = int(cards[j])
                if isinstance(reply, NoScriptError):  # script cache flushed: try again
                    lost.append(j)
                elif reply[0] == 1:
                    self._remember(card, int(reply[1]), new[j].tobytes())
                else:
                    versions[j], records[j] = self._current(card, versions[j], reply)
                    lost.append(j)
            if rows_out is not out:  # a retry computed only the rows of its cards
                out[retry_rows] = rows_out
            if not lost:
                return attempt, conflicts
            conflicts += len(lost)
            cards = cards[lost]
            versions = [versions[j] for j in lost]
            records = [records[j] for j in lost]
            retry_rows = np.flatnonzero(np.isin(tx.card_key, cards))
            rows = tx.take(retry_rows)
            rows_out = np.empty((len(retry_rows), out.shape[1]))
        raise _Contended(f"{len(cards)} card(s) still contended after {self._max_attempts} tries")

    def _load(self, cards: np.ndarray, records: list[bytes]) -> tuple[CardStateTable, np.ndarray]:
        """A private table holding ``records`` for ``cards``; returns it and their slots."""
        table = self._scratch.table(len(cards))
        slots = card_slots(table, cards)
        packed = np.frombuffer(b"".join(records), dtype=CARD_RECORD).copy()
        packed["keys"] = cards  # an empty record is a new card: give it its key
        table.put_records(slots, packed)
        return table, slots

    def _write(self, cards: np.ndarray, versions: list[int], new: np.ndarray) -> list:
        """One compare-and-set per card, pipelined: one round trip."""
        prefix, ttl_ms = self._prefix, self._ttl_ms
        if len(cards) == 1:
            key = card_key(prefix, int(cards[0]))
            return [_APPLY(self._client, [key], [versions[0], new[0].tobytes(), ttl_ms])]
        pipe = self._client.pipeline(transaction=False)
        for j, card in enumerate(cards.tolist()):
            pipe.evalsha(_APPLY.sha, 1, card_key(prefix, card), versions[j], new[j].tobytes(),
                         ttl_ms)  # fmt: skip
        replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, NoScriptError):
                self._client.script_load(_APPLY.source)
                break
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _current(self, card: int, tried: int, reply: list) -> tuple[int, bytes]:
        """The state to retry from after losing a write with version ``tried``: Redis's,
        or a newer one a sibling thread stored since Redis answered."""
        version, record = int(reply[1]), reply[2] or _EMPTY_RECORD
        cached = self._cache.get(card)
        if cached is not None and cached[0] > version and cached[0] != tried:
            return cached
        # Redis's word, even when older than the cache: the key expired or Redis restarted
        self._remember(card, version, record, force=True)
        return version, record

    def _remember(self, card: int, version: int, record: bytes, *, force: bool = False) -> None:
        cache = self._cache
        current = cache.get(card)
        if current is not None and current[0] >= version and not force:
            return  # another thread of this worker already saw a newer write
        if current is None and len(cache) >= self._cache_size:
            # forget the card remembered longest ago (threads may race: any loss is fine)
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del cache[next(iter(cache))]
        cache[card] = (version, record)

    def _failed(self, tx: TransactionArrays, out: np.ndarray, exc: RedisError | None) -> np.ndarray:
        if exc is not None and not isinstance(exc, _Contended):
            self._breaker.failed("card state", exc)
        if not self._degrade:
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "failing, in cool-down"
            raise StateUnavailableError(
                f"card state store (Redis at {self.config.display_url}) is unavailable ({why})"
            ) from exc
        with self._lock:
            self.degraded += 1
        self._scratch.degraded = True
        empty = self._scratch.table(1)  # no card in it: every row is a card's first
        return peek_features(empty, tx, out)


def _distinct(card_keys: np.ndarray) -> np.ndarray:
    """The distinct card keys of a call (one row: the key itself)."""
    return card_keys[:1] if len(card_keys) == 1 else np.unique(card_keys)
