"""Shared state in Redis, for replicas on several machines: rate-limit buckets and the
traffic configuration (the same interfaces as the shared-memory rate limiter and the
``traffic.json`` files); the per-card feature state is in :mod:`.redis_cards`.

Key layout (Redis Cluster ready)
--------------------------------
Redis Cluster shards by the CRC16 of a key's *hash tag*, the text between the first
``{`` and the next ``}``. Every key of one family shares a hash tag, so the keys one
script or transaction touches live on one shard (no CROSSSLOT errors), and different
clients and cards spread over the cluster::

    {<prefix>:rl:<client_id>}      hash, fields t (tokens), ts (Redis TIME, microseconds):
                                   one client's rate-limit bucket; expires when idle
                                   (TTL 2 x burst / rate, at least 1 s: a bucket idle that
                                   long has refilled, so expiry loses nothing)
    {<prefix>:traffic}:<model>     string, the model's traffic configuration as JSON
                                   (Traffic.to_dict, generation included)
    {<prefix>:traffic}:names       set, the model names holding a configuration
    {<prefix>:card:<card_key>}     hash, fields s (the card's packed state, 256 bytes)
                                   and v (its version): one card's feature state, see
                                   :mod:`riskwire.server.redis_cards`; expires when idle
                                   (``redis_card_ttl_days``)

``<prefix>:traffic`` (no braces: a channel, not a key) is the pub/sub channel on which
every traffic change is announced as ``{"name": ..., "generation": ...}``. The traffic
keys share one tag on purpose: a change is one atomic script over the model key and the
names set; traffic is small and off the request path, so one shard holds it all.

Failure behaviour
-----------------
Every call has a socket timeout (``op_timeout_s`` on the request path, plus
``connect_timeout_s`` when a connection must be opened) and no retries, so a slow or
dead Redis never holds a request past those bounds. What happens then is configured by
``on_failure``: ``"closed"`` raises :class:`StateUnavailableError` (UNAVAILABLE to the
client), ``"degrade"`` lets the request through unthrottled and counts it. After
``failure_threshold`` failures in a row, calls within ``failure_cooldown_s`` fail the
same way at once, without touching Redis, so a blackholed server costs a connect timeout
a few times, not per request; one slow reply fails only its own request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from riskwire.server.errors import ErrorCode, ServingError
from riskwire.server.ratelimit import RateLimits
from riskwire.server.traffic import Traffic

log = logging.getLogger(__name__)

_MEMO_LIMIT: Final = 1 << 16  # client ids remembered per process (bounds the memo dict)
_MIN_TTL_MS: Final = 1000
_SCHEMES: Final = ("redis", "rediss", "unix")

OnFailure = Literal["closed", "degrade"]


class StateUnavailableError(ServingError):
    """The shared state store did not answer in time (or at all): UNAVAILABLE."""

    code = ErrorCode.UNAVAILABLE


def rate_limit_key(prefix: str, client_id: str) -> str:
    """Key of a client's bucket: the whole key is the hash tag."""
    return f"{{{prefix}:rl:{client_id}}}"


def traffic_key(prefix: str, name: str) -> str:
    """Key of a model's traffic configuration (JSON)."""
    return f"{{{prefix}:traffic}}:{name}"


def traffic_names_key(prefix: str) -> str:
    """Key of the set of model names with a traffic configuration."""
    return f"{{{prefix}:traffic}}:names"


def traffic_channel(prefix: str) -> str:
    """Pub/sub channel announcing traffic changes."""
    return f"{prefix}:traffic"


def card_key(prefix: str, key: int | str) -> str:
    """Key of one card's feature state: the whole key is the hash tag."""
    return f"{{{prefix}:card:{key}}}"


@dataclass(frozen=True)
class RedisConfig:
    """Where the shared state lives and how long to wait for it."""

    # redis://[user:password@]host:port/db, rediss:// for TLS, or unix:///path.sock
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "riskwire"  # first part of every key's hash tag
    connect_timeout_s: float = 0.2  # opening a connection (TCP + TLS + AUTH)
    op_timeout_s: float = 0.05  # one request-path command (a rate-limit check)
    control_timeout_s: float = 1.0  # traffic reads/writes and the pub/sub connection
    on_failure: OnFailure = "closed"  # closed: UNAVAILABLE; degrade: allow and count
    failure_threshold: int = 3  # failures in a row that start a cool-down
    failure_cooldown_s: float = 0.25  # then fail at once this long, then try again (0: never)
    pool_size: int = 8  # connections per process and client
    health_check_interval_s: int = 30  # PING a connection idle this long before use
    tls_ca_path: str = ""  # CA bundle verifying the server (rediss:// only)
    tls_cert_path: str = ""  # client certificate for mutual TLS (rediss:// only)
    tls_key_path: str = ""  # its private key (rediss:// only)

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"redis url {self.display_url!r}: scheme must be one of {_SCHEMES}")
        tls = (self.tls_ca_path, self.tls_cert_path, self.tls_key_path)
        if any(tls) and scheme != "rediss":
            raise ValueError("redis TLS paths are set but the url is not rediss://")
        if bool(self.tls_cert_path) != bool(self.tls_key_path):
            raise ValueError("redis TLS client certificate and key must be given together")
        if not self.key_prefix or any(c in self.key_prefix for c in "{}"):
            raise ValueError(f"redis key prefix {self.key_prefix!r}: non-empty, no braces")
        if self.on_failure not in ("closed", "degrade"):
            raise ValueError(f"redis on_failure {self.on_failure!r}: 'closed' or 'degrade'")
        for name in ("connect_timeout_s", "op_timeout_s", "control_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"redis {name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.failure_cooldown_s) and self.failure_cooldown_s >= 0):
            raise ValueError(f"redis failure_cooldown_s must be >= 0: {self.failure_cooldown_s}")
        if self.pool_size < 1 or self.failure_threshold < 1 or self.health_check_interval_s < 0:
            raise ValueError(
                "redis pool_size and failure_threshold must be >= 1, health_check_interval_s >= 0"
            )

    @property
    def display_url(self) -> str:
        """The url with its password masked (for logs and error messages)."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def client(self, *, timeout_s: float | None = None) -> redis.Redis:
        """A new client with its own pool: socket timeouts, no retries, a bounded pool.

        ``timeout_s`` replaces ``op_timeout_s`` as the socket timeout (and the longest
        wait for a free pooled connection).
        """
        timeout = self.op_timeout_s if timeout_s is None else timeout_s
        options: dict = {
            "socket_timeout": timeout,
            "socket_connect_timeout": self.connect_timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": self.health_check_interval_s,
            "max_connections": self.pool_size,
            "timeout": timeout,  # BlockingConnectionPool: wait for a free connection
        }
        if urlsplit(self.url).scheme == "rediss":
            options.update(
                ssl_ca_certs=self.tls_ca_path or None,
                ssl_certfile=self.tls_cert_path or None,
                ssl_keyfile=self.tls_key_path or None,
            )
        pool = redis.BlockingConnectionPool.from_url(self.url, **options)
        return redis.Redis(connection_pool=pool)


class _Breaker:
    """Counts failures in a row; from ``threshold`` on, calls skip Redis for a cool-down
    (the first call after it tries again). Races between threads only shift a count."""

    __slots__ = ("threshold", "cooldown_s", "down_until", "failures")

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.down_until = 0.0
        self.failures = 0

    def is_open(self) -> bool:
        return self.down_until > 0.0 and time.monotonic() < self.down_until

    def failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("%s: Redis unavailable: %s: %s", what, type(exc).__name__, exc)
        if self.failures >= self.threshold and self.cooldown_s:
            self.down_until = time.monotonic() + self.cooldown_s

    def succeeded(self, what: str) -> None:
        if self.failures >= self.threshold:
            log.info("%s: Redis available again", what)
        self.failures = 0
        self.down_until = 0.0


class _Script:
    """A Lua script run by EVALSHA, falling back to EVAL (which caches it) on NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, keys: list[str], args: list) -> object:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


# KEYS[1] bucket; ARGV rate (tokens/s), burst, cost, ttl_ms. Returns the retry-after
# seconds as a string ("0" when allowed): a Lua number reply would be truncated.
_TAKE = _Script("""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
else
  if now > last then
    tokens = tokens + (now - last) / 1000000 * rate
    last = now
  end
  if tokens > burst then tokens = burst end
end
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.17g', last))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return string.format('%.17g', wait)
""")


class RedisRateLimiter:
    """Per-client token buckets in Redis, shared by every worker of every replica.

    Same interface and semantics as :class:`~riskwire.server.ratelimit.SharedRateLimiter`
    (a new bucket starts full, ``cost`` > burst is ``inf``, rate 0 is unlimited without
    a round trip); the clock is Redis's own ``TIME``, so replicas with skewed clocks
    agree. One EVALSHA per check.
    """

    def __init__(
        self,
        config: RedisConfig,
        *,
        limits: RateLimits | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.config = config
        self._client = client or config.client()
        self._owns_client = client is None
        self._limits = limits or RateLimits()
        self._degrade = config.on_failure == "degrade"
        self._breaker = _Breaker(config.failure_threshold, config.failure_cooldown_s)
        self._degraded = 0
        self._degraded_lock = threading.Lock()
        # client id -> (key, rate_per_s, burst, ttl_ms): the hot path's one dict lookup
        self._memo: dict[str, tuple[str, float, float, int]] = {}

    @property
    def limits(self) -> RateLimits:
        """The limits in force in this process."""
        return self._limits

    @property
    def degraded(self) -> int:
        """Requests let through unchecked because Redis failed (``degrade`` mode)."""
        return self._degraded

    def set_limits(self, limits: RateLimits) -> None:
        """Apply new limits from the next request on (buckets keep their tokens)."""
        self._limits = limits
        self._memo = {}

    def key_for(self, client_id: str) -> str:
        """The Redis key of ``client_id``'s bucket."""
        return rate_limit_key(self.config.key_prefix, client_id)

    def check(self, client_id: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``client_id``: 0.0 if allowed, else retry-after seconds.

        The retry-after is ``inf`` when ``cost`` exceeds the client's burst (never).
        Raises :class:`StateUnavailableError` when Redis fails and ``on_failure`` is
        ``"closed"``.
        """
        entry = self._memo.get(client_id)
        if entry is None:
            entry = self._remember(client_id)
        key, rate, burst, ttl_ms = entry
        if not rate > 0.0 or not cost > 0.0:
            return 0.0
        if not burst >= cost:
            return math.inf
        if self._breaker.is_open():
            return self._failed(None)
        try:
            wait = _TAKE(self._client, [key], [rate, burst, float(cost), ttl_ms])
        except RedisError as exc:
            return self._failed(exc)
        if self._breaker.failures:
            self._breaker.succeeded("rate limiter")
        return float(wait)

    def _remember(self, client_id: str) -> tuple[str, float, float, int]:
        if len(self._memo) >= _MEMO_LIMIT:  # unbounded client ids must not grow memory
            self._memo.clear()
        limit = self._limits.for_client(client_id)
        rate, burst = limit.rate_per_s, limit.burst
        ttl_ms = max(_MIN_TTL_MS, math.ceil(burst / rate * 2000)) if rate > 0 else _MIN_TTL_MS
        entry = (self.key_for(client_id), rate, burst, ttl_ms)
        self._memo[client_id] = entry
        return entry

    def _failed(self, exc: RedisError | None) -> float:
        if exc is not None:
            self._breaker.failed("rate limiter", exc)
        if self._degrade:
            with self._degraded_lock:
                self._degraded += 1
            return 0.0
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "failing, in cool-down"
        raise StateUnavailableError(
            f"rate limit store (Redis at {self.config.display_url}) is unavailable ({why})"
        ) from exc

    def warmup(self) -> None:
        """Load the script into Redis's cache (a failure here is logged, not raised)."""
        try:
            self._client.script_load(_TAKE.source)
        except RedisError as exc:
            log.warning("rate limiter warm-up: Redis unavailable: %s", exc)

    def close(self) -> None:
        """Close the connections (when this limiter created its client)."""
        if self._owns_client:
            self._client.close()


# KEYS[1] model key, KEYS[2] names set; ARGV name, JSON object without "generation",
# the generation to count from when no configuration is stored yet, channel.
_WRITE_TRAFFIC = _Script("""
local generation = tonumber(ARGV[3])
local current = redis.call('GET', KEYS[1])
if current then
  local stored = string.match(current, ',"generation":(%d+)}$')
  if not stored then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' then stored = decoded['generation'] end
  end
  generation = tonumber(stored) or generation
end
generation = generation + 1
local body = string.sub(ARGV[2], 1, -2) .. ',"generation":' .. string.format('%d', generation)
body = body .. '}'
redis.call('SET', KEYS[1], body)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], cjson.encode({name = ARGV[1], generation = generation}))
return generation
""")


class RedisTrafficStore:
    """Traffic configurations in Redis with change notification (pub/sub).

    The counterpart of ``read_traffic`` / ``write_traffic`` for replicas that share no
    disk. Every call raises :class:`StateUnavailableError` when Redis fails (traffic
    is never on the request path: the caller keeps the configuration it has).
    """

    def __init__(self, config: RedisConfig, *, client: redis.Redis | None = None) -> None:
        self.config = config
        self._client = client or config.client(timeout_s=config.control_timeout_s)
        self._owns_client = client is None
        self._subscriptions: list[TrafficSubscription] = []

    def key_for(self, name: str) -> str:
        """The Redis key of a model's configuration."""
        return traffic_key(self.config.key_prefix, name)

    def write(self, traffic: Traffic) -> Traffic:
        """Store a new configuration atomically (generation + 1) and announce it;
        returns what was stored."""
        updated_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = traffic.replace(updated_at=updated_at).to_dict()
        del body["generation"]
        prefix = self.config.key_prefix
        keys = [self.key_for(traffic.name), traffic_names_key(prefix)]
        text = json.dumps(body, allow_nan=False)
        args = [traffic.name, text, traffic.generation, traffic_channel(prefix)]
        try:
            generation = int(_WRITE_TRAFFIC(self._client, keys, args))
        except RedisError as exc:
            raise self._unavailable("write", exc) from exc
        return traffic.replace(generation=generation, updated_at=updated_at)

    def read(self, name: str) -> Traffic | None:
        """The model's configuration (None when none is stored)."""
        raw = self._read_raw(name)
        return None if raw is None else self._decode(name, raw)

    def read_all(self) -> dict[str, Traffic]:
        """Every stored configuration, by model name (one SMEMBERS and one MGET)."""
        return {name: self._decode(name, raw) for name, raw in self._read_all_raw().items()}

    def names(self) -> list[str]:
        """Names of the models with a stored configuration, sorted."""
        try:
            return sorted(n.decode() for n in self._client.smembers(self._names_key))
        except RedisError as exc:
            raise self._unavailable("read", exc) from exc

    def subscribe(
        self,
        callback: Callable[[Traffic], None],
        *,
        initial: bool = True,
        resync_interval_s: float = 5.0,
    ) -> TrafficSubscription:
        """Call ``callback(traffic)`` from a daemon thread for every change.

        With ``initial``, every stored configuration is delivered first. Changes come
        by pub/sub; every ``resync_interval_s`` (and after every reconnect) a full
        re-read catches any message lost meanwhile. A configuration is delivered once
        per generation; exceptions from ``callback`` are logged.
        """
        subscription = TrafficSubscription(
            self.config, callback, initial=initial, resync_interval_s=resync_interval_s
        )
        self._subscriptions.append(subscription)
        return subscription

    def close(self) -> None:
        """Stop the subscriptions and close the connections."""
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        if self._owns_client:
            self._client.close()

    @property
    def _names_key(self) -> str:
        return traffic_names_key(self.config.key_prefix)

    def _read_raw(self, name: str) -> bytes | None:
        try:
            return self._client.get(self.key_for(name))
        except RedisError as exc:
            raise self._unavailable("read", exc) from exc

    def _read_all_raw(self) -> dict[str, bytes]:
        try:
            names = sorted(n.decode() for n in self._client.smembers(self._names_key))
            values = self._client.mget([self.key_for(n) for n in names]) if names else []
        except RedisError as exc:
            raise self._unavailable("read", exc) from exc
        return {name: raw for name, raw in zip(names, values, strict=True) if raw is not None}

    def _decode(self, name: str, raw: bytes) -> Traffic:
        try:
            return Traffic.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.key_for(name)}: unreadable traffic configuration") from exc

    def _unavailable(self, what: str, exc: RedisError) -> StateUnavailableError:
        return StateUnavailableError(
            f"traffic {what}: Redis at {self.config.display_url} is unavailable "
            f"({type(exc).__name__}: {exc})"
        )


_POLL_S: Final = 0.1  # longest wait for a message before checking stop and resync
_MIN_BACKOFF_S: Final = 0.05  # reconnect waits, doubling while Redis stays down
_MAX_BACKOFF_S: Final = 1.0


class TrafficSubscription:
    """The daemon thread behind :meth:`RedisTrafficStore.subscribe`."""

    def __init__(
        self,
        config: RedisConfig,
        callback: Callable[[Traffic], None],
        *,
        initial: bool,
        resync_interval_s: float,
    ) -> None:
        self._store = RedisTrafficStore(config)
        self._channel = traffic_channel(config.key_prefix)
        self._callback = callback
        self._resync_interval_s = resync_interval_s
        self._seen: dict[str, int] = {}  # name -> generation delivered
        self._quiet = not initial  # first sync records generations without delivering
        self._stop = threading.Event()
        self.reconnects = 0
        self._subscribed = False
        self.ready = threading.Event()  # set once subscribed and the first re-read is done
        self._thread = threading.Thread(target=self._run, name="redis-traffic", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and close its connections."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._store.close()

    def _run(self) -> None:
        backoff_s = _MIN_BACKOFF_S
        while not self._stop.is_set():
            self._subscribed = False
            try:
                self._listen()
            except (RedisError, StateUnavailableError, OSError) as exc:
                self.reconnects += 1
                log.warning("traffic subscription: Redis unavailable, retrying: %s", exc)
            except Exception:  # never let the thread die
                log.exception("traffic subscription failed, retrying")
            backoff_s = _MIN_BACKOFF_S if self._subscribed else min(_MAX_BACKOFF_S, backoff_s * 2)
            self._stop.wait(backoff_s)

    def _listen(self) -> None:
        pubsub = self._store._client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            next_resync = math.inf  # set once the subscription is confirmed
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=_POLL_S)
                if message is not None and message["type"] == "subscribe":
                    self._subscribed = True
                    next_resync = 0.0  # subscribed: changes from now on arrive as messages
                elif message is not None and message["type"] == "message":
                    self._on_message(message["data"])
                if time.monotonic() >= next_resync:
                    self._resync()
                    next_resync = time.monotonic() + self._resync_interval_s
        finally:
            with contextlib.suppress(RedisError, OSError):
                pubsub.close()

    def _on_message(self, data: bytes) -> None:
        try:
            name = str(json.loads(data)["name"])
        except (ValueError, KeyError, TypeError):
            log.warning("traffic subscription: ignoring malformed message %r", data[:200])
            return
        raw = self._store._read_raw(name)
        if raw is not None:
            self._deliver(name, raw)

    def _resync(self) -> None:
        for name, raw in self._store._read_all_raw().items():
            self._deliver(name, raw)
        self._quiet = False
        self.ready.set()

    def _deliver(self, name: str, raw: bytes) -> None:
        try:
            traffic = self._store._decode(name, raw)
        except ValueError as exc:
            log.warning("traffic subscription: %s", exc)
            return
        if self._seen.get(traffic.name) == traffic.generation:
            return
        self._seen[traffic.name] = traffic.generation
        if self._quiet:
            return
        try:
            self._callback(traffic)
        except Exception:
            log.exception("traffic subscription callback failed for %s", traffic.name)
