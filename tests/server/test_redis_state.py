"""The Redis state backend against a real ``redis-server`` on a loopback port.

Redis's clock cannot be faked, so rate-limit scenarios use rates where elapsed time is
irrelevant (0.001 tokens/s: a test lasting a second refills a thousandth of a token).
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
import uuid

import grpc
import pytest

redis = pytest.importorskip("redis", reason="the redis package is not installed")
if shutil.which("redis-server") is None:
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server)", allow_module_level=True
    )

from riskwire.kernels.ratelimit import RateLimitTable  # noqa: E402
from riskwire.net import free_port  # noqa: E402
from riskwire.server.ratelimit import RateLimit, RateLimits, parse_rate_limits  # noqa: E402
from riskwire.server.redis_state import (  # noqa: E402
    RedisConfig,
    RedisRateLimiter,
    RedisTrafficStore,
    StateUnavailableError,
    card_key,
    rate_limit_key,
    traffic_channel,
    traffic_key,
    traffic_names_key,
)
from riskwire.server.traffic import Traffic  # noqa: E402

SLOW = 1e-3  # tokens/s: no measurable refill while a test runs


@pytest.fixture
def raw(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def config_for(server, **changes) -> RedisConfig:  # noqa: ANN001 - conftest's RedisServer
    """A config with a fresh key prefix; generous timeouts unless a test sets them."""
    options = {"key_prefix": f"t{uuid.uuid4().hex[:8]}", "op_timeout_s": 1.0}
    options["failure_cooldown_s"] = 0.0
    options.update(changes)
    return RedisConfig(url=server.url, **options)


def limiter_for(config: RedisConfig, text: str) -> RedisRateLimiter:
    return RedisRateLimiter(config, limits=parse_rate_limits(text))


class ReferenceBucket:
    """The kernel's token bucket in plain Python (time in seconds)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens: float | None = None
        self.last = 0.0

    def take(self, cost: float, now: float) -> float:
        if not self.rate > 0 or not cost > 0:
            return 0.0
        if not self.burst >= cost:
            return math.inf
        if self.tokens is None:
            self.tokens, self.last = self.burst, now
        elif now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


# ---------------------------------------------------------------- rate limiter


def test_rate_limiter_matches_reference_bucket(redis_server):
    limiter = limiter_for(config_for(redis_server), f"default={SLOW}/10")
    reference = ReferenceBucket(SLOW, 10.0)
    kernel = RateLimitTable.create(2)  # the shared-memory limiter's kernel, clock frozen
    costs = [1, 2.5, 3, 0, -1, 11, 2, 1, 0.5, 1, 4, 0.25, 10, 1]
    start = time.monotonic()
    for cost in costs:
        got = limiter.check("alice", cost)
        want = reference.take(cost, 0.0)
        assert kernel.take(1, 0, cost, SLOW, 10.0, 1) == want
        if math.isinf(want) or want == 0.0:
            assert got == want, (cost, got, want)
        else:  # refill of < 1 s at 0.001/s shifts the wait by under a second
            assert want - (time.monotonic() - start) - 0.01 <= got <= want, (cost, got, want)
    limiter.close()


def test_exactly_burst_allowed_then_retry_after_is_long(redis_server):
    limiter = limiter_for(config_for(redis_server), f"default={SLOW}/10")
    results = [limiter.check("bob") for _ in range(12)]
    assert results[:10] == [0.0] * 10
    assert all(990.0 < r <= 1000.0 for r in results[10:]), results[10:]
    assert limiter.check("bob", 11) == math.inf  # more than the burst: never
    assert limiter.check("carol") == 0.0  # buckets are per client
    limiter.close()


def test_bucket_refills_with_redis_time(redis_server):
    limiter = limiter_for(config_for(redis_server), "default=50/1")
    assert limiter.check("dan") == 0.0
    wait = limiter.check("dan")
    assert 0.0 < wait <= 0.02
    time.sleep(wait + 0.005)  # the refill itself is what is under test
    assert limiter.check("dan") == 0.0
    limiter.close()


def test_unlimited_and_free_requests_never_touch_redis(redis_server):
    dead = RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", on_failure="closed")
    limiter = RedisRateLimiter(dead, limits=parse_rate_limits("default=0; big=5/2"))
    assert limiter.check("anyone") == 0.0  # rate 0: unlimited
    assert limiter.check("big", 0.0) == 0.0  # costs nothing
    assert limiter.check("big", 3.0) == math.inf  # above the burst: known without Redis
    with pytest.raises(StateUnavailableError):
        limiter.check("big")  # the one call that needs Redis
    limiter.close()


def test_two_replicas_share_one_bucket(redis_server):
    config = config_for(redis_server)
    replicas = [limiter_for(config, f"default={SLOW}/10") for _ in range(2)]
    allowed = []

    def hammer(limiter: RedisRateLimiter) -> None:
        allowed.append(sum(limiter.check("shared") == 0.0 for _ in range(25)))

    threads = [threading.Thread(target=hammer, args=(r,)) for r in replicas for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 10
    for limiter in replicas:
        limiter.close()


def test_set_limits_applies_on_next_check(redis_server):
    limiter = limiter_for(config_for(redis_server), "default=0")
    assert limiter.limits.default.unlimited
    limiter.set_limits(RateLimits(RateLimit(SLOW, 1.0)))
    assert limiter.check("eve") == 0.0
    assert limiter.check("eve") > 0.0
    limiter.close()


def test_keys_use_hash_tags_and_expire(redis_server, raw):
    config = config_for(redis_server)
    limiter = limiter_for(config, f"default=100/10; slow={SLOW}/10")
    limiter.check("fast")
    limiter.check("slow")
    prefix = config.key_prefix
    assert limiter.key_for("fast") == f"{{{prefix}:rl:fast}}" == rate_limit_key(prefix, "fast")
    assert 0 < raw.pttl(f"{{{prefix}:rl:fast}}") <= 1000  # 2 x 10/100 s, at least 1 s
    assert 19_000_000 < raw.pttl(f"{{{prefix}:rl:slow}}") <= 20_000_000  # 2 x 10/0.001 s
    assert set(raw.keys(f"*{prefix}*")) == {
        f"{{{prefix}:rl:fast}}".encode(),
        f"{{{prefix}:rl:slow}}".encode(),
    }
    assert traffic_key(prefix, "fraud") == f"{{{prefix}:traffic}}:fraud"
    assert traffic_names_key(prefix) == f"{{{prefix}:traffic}}:names"
    assert card_key(prefix, 42) == f"{{{prefix}:card:42}}"
    assert traffic_channel(prefix) == f"{prefix}:traffic"
    limiter.close()


def test_script_reloaded_after_script_flush(redis_server, raw):
    limiter = limiter_for(config_for(redis_server), f"default={SLOW}/3")
    assert limiter.check("frank") == 0.0
    raw.script_flush()  # NOSCRIPT on the next EVALSHA: falls back to EVAL
    assert limiter.check("frank") == 0.0
    assert limiter.check("frank") == 0.0
    assert limiter.check("frank") > 0.0
    limiter.close()


def test_redis_down_closed_degrade_and_recovery(own_redis):
    fast = {"op_timeout_s": 0.05, "connect_timeout_s": 0.2}
    closed = limiter_for(config_for(own_redis, **fast), f"default={SLOW}/100")
    degrade = limiter_for(config_for(own_redis, on_failure="degrade", **fast), "default=1/1")
    assert closed.check("gina") == 0.0
    assert degrade.check("gina") == 0.0
    assert degrade.check("gina") > 0.0
    own_redis.stop()

    for _ in range(2):  # a pooled connection to the dead server, then a fresh connect
        started = time.monotonic()
        with pytest.raises(StateUnavailableError, match="unavailable"):
            closed.check("gina")
        assert time.monotonic() - started < 1.0
    assert [degrade.check("gina") for _ in range(3)] == [0.0] * 3
    assert degrade.degraded == 3

    own_redis.start()  # same port, empty: buckets start full again
    assert closed.check("gina") == 0.0
    assert degrade.check("gina") == 0.0
    assert degrade.check("gina") > 0.0
    assert degrade.degraded == 3
    closed.close()
    degrade.close()


def test_slow_redis_times_out_and_cools_down(redis_server, raw):
    config = config_for(
        redis_server, op_timeout_s=0.05, failure_threshold=2, failure_cooldown_s=60.0
    )
    limiter = limiter_for(config, f"default={SLOW}/10")
    assert limiter.check("hank") == 0.0
    raw.client_pause(600)  # every other client's commands wait 0.6 s
    try:
        for _ in range(2):  # below the threshold, each call tries Redis
            started = time.monotonic()
            with pytest.raises(StateUnavailableError, match="TimeoutError"):
                limiter.check("hank")
            assert time.monotonic() - started < 0.25
        with pytest.raises(StateUnavailableError, match="cool-down"):
            limiter.check("hank")  # within the cool-down: no round trip at all
    finally:
        raw.client_unpause()
    limiter.close()


def test_config_validation_and_tls():
    with pytest.raises(ValueError, match="on_failure"):
        RedisConfig(on_failure="open")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rediss"):
        RedisConfig(url="redis://h:6379", tls_ca_path="/ca.pem")
    with pytest.raises(ValueError, match="scheme"):
        RedisConfig(url="http://h:6379")
    with pytest.raises(ValueError, match="prefix"):
        RedisConfig(key_prefix="a{b}")
    with pytest.raises(ValueError, match="op_timeout_s"):
        RedisConfig(op_timeout_s=0)
    with pytest.raises(ValueError, match="failure_threshold"):
        RedisConfig(failure_threshold=0)
    secret = RedisConfig(url="rediss://user:hunter2@h:6380/0", tls_ca_path="/ca.pem")
    assert "hunter2" not in repr(secret) and "hunter2" not in secret.display_url
    client = secret.client()  # no connection is made until the first command
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_ca_certs"] == "/ca.pem"
    assert kwargs["socket_timeout"] == secret.op_timeout_s
    assert kwargs["socket_connect_timeout"] == secret.connect_timeout_s
    assert client.connection_pool.max_connections == secret.pool_size
    client.close()


# ---------------------------------------------------------------- traffic


def _traffic(name: str = "fraud", **changes) -> Traffic:
    return Traffic(name=name, primary="7", previous=("5", "6"), **changes)


def test_traffic_write_read_names(redis_server):
    store = RedisTrafficStore(config_for(redis_server))
    assert store.read("fraud") is None and store.names() == []
    first = store.write(_traffic(canary="8", canary_weight=5.0, steps=(25.0, 50.0)))
    assert first.generation == 1 and first.updated_at
    assert store.read("fraud") == first
    second = store.write(first.replace(canary_weight=25.0, steps=(50.0,)))
    assert second.generation == 2
    store.write(_traffic("aml"))
    assert store.names() == ["aml", "fraud"]
    assert store.read_all() == {"aml": store.read("aml"), "fraud": second}
    store.close()


def test_traffic_generation_counts_from_the_given_one(redis_server):
    store = RedisTrafficStore(config_for(redis_server))
    assert store.write(_traffic(generation=12)).generation == 13  # migrated from a file
    assert store.write(_traffic(generation=0)).generation == 14  # stored one wins
    store.close()


def test_traffic_generations_are_atomic_under_concurrent_writers(redis_server):
    config = config_for(redis_server)
    stores = [RedisTrafficStore(config) for _ in range(4)]
    generations: list[int] = []
    lock = threading.Lock()

    def write_many(store: RedisTrafficStore) -> None:
        for i in range(10):
            stored = store.write(_traffic(canary_weight=float(i)))
            with lock:
                generations.append(stored.generation)

    threads = [threading.Thread(target=write_many, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(generations) == list(range(1, 41))
    assert stores[0].read("fraud").generation == 40
    for store in stores:
        store.close()


def _next(changes: queue.Queue, timeout_s: float = 1.0) -> Traffic:
    return changes.get(timeout=timeout_s)


def test_subscriber_sees_a_change_within_a_second(redis_server):
    config = config_for(redis_server)
    writer, reader = RedisTrafficStore(config), RedisTrafficStore(config)
    existing = writer.write(_traffic("aml"))
    changes: queue.Queue[Traffic] = queue.Queue()
    reader.subscribe(changes.put)
    assert _next(changes) == existing  # the initial state first
    stored = writer.write(_traffic(canary="8", canary_weight=5.0))
    started = time.monotonic()
    assert _next(changes) == stored
    assert time.monotonic() - started < 1.0
    stored = writer.write(stored.replace(canary_weight=50.0))
    assert _next(changes).generation == stored.generation == 2
    assert changes.empty()
    writer.close()
    reader.close()


def test_subscriber_resync_catches_a_lost_message(redis_server, raw):
    config = config_for(redis_server)
    store = RedisTrafficStore(config)
    changes: queue.Queue[Traffic] = queue.Queue()
    assert store.subscribe(changes.put, initial=False, resync_interval_s=0.2).ready.wait(1.0)
    lost = _traffic(generation=7)  # written around the store: no PUBLISH
    raw.sadd(traffic_names_key(config.key_prefix), "fraud")
    raw.set(traffic_key(config.key_prefix, "fraud"), json.dumps(lost.to_dict()))
    assert _next(changes) == lost
    assert store.write(lost).generation == 8
    assert _next(changes).generation == 8
    store.close()


def test_subscriber_reconnects_after_redis_restart(own_redis):
    config = config_for(own_redis)
    writer, reader = RedisTrafficStore(config), RedisTrafficStore(config)
    changes: queue.Queue[Traffic] = queue.Queue()
    subscription = reader.subscribe(changes.put)
    assert subscription.ready.wait(1.0)
    assert writer.write(_traffic()).generation == 1
    assert _next(changes).generation == 1
    own_redis.stop()
    with pytest.raises(StateUnavailableError):
        writer.read("fraud")
    own_redis.start()  # empty again: the control plane writes the configuration anew
    stored = writer.write(_traffic(generation=1))
    assert _next(changes, 3.0) == stored
    assert stored.generation == 2 and subscription.reconnects >= 1
    writer.close()
    reader.close()


def test_subscriber_survives_a_failing_callback(redis_server):
    config = config_for(redis_server)
    store = RedisTrafficStore(config)
    changes: queue.Queue[Traffic] = queue.Queue()

    def callback(traffic: Traffic) -> None:
        changes.put(traffic)
        if traffic.generation == 1:
            raise RuntimeError("boom")

    store.subscribe(callback)
    store.write(_traffic())
    assert _next(changes).generation == 1
    store.write(_traffic())
    assert _next(changes).generation == 2
    store.close()


# ------------------------------------------------------------------ two real servers


def _score_outcomes(target: str, calls: int) -> list[str]:
    from riskwire.protos import scoring_pb2, scoring_pb2_grpc

    codes = []
    with grpc.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        for i in range(calls):
            request = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
                card_id=f"redis-{i}", merchant_id="m", mcc=5411, amount=10.0))  # fmt: skip
            try:
                stub.Score(request, timeout=5)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    return codes


def test_a_rate_limit_holds_across_two_servers(start_server, models_dir, redis_server) -> None:
    """Two riskwire servers (2 workers each) on one Redis: one bucket for the client (the
    peer address without auth), burst 20 and no refill to speak of."""
    env = {
        "RISKWIRE_STATE_BACKEND": "redis",
        "RISKWIRE_REDIS_URL": redis_server.url,
        "RISKWIRE_REDIS_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "RISKWIRE_REDIS_TIMEOUT_MS": "1000",
        "RISKWIRE_RATE_LIMITS": f"default={SLOW}/20",
    }
    first, second = start_server(models_dir, env=env), start_server(models_dir, env=env)
    codes = _score_outcomes(first.target, 15) + _score_outcomes(second.target, 15)
    assert codes.count("OK") == 20 and codes.count("RESOURCE_EXHAUSTED") == 10, codes


def test_redis_down_fails_closed_within_the_deadline(start_server, models_dir, own_redis) -> None:
    server = start_server(models_dir, env={
        "RISKWIRE_STATE_BACKEND": "redis", "RISKWIRE_REDIS_URL": own_redis.url,
        "RISKWIRE_REDIS_TIMEOUT_MS": "200", "RISKWIRE_RATE_LIMITS": "default=100000/100000",
    })  # fmt: skip
    assert _score_outcomes(server.target, 3) == ["OK"] * 3
    own_redis.stop()
    started = time.monotonic()
    codes = _score_outcomes(server.target, 5)
    assert set(codes) == {"UNAVAILABLE"} and time.monotonic() - started < 5.0, codes
    own_redis.start()
    deadline = time.monotonic() + 10
    while _score_outcomes(server.target, 1) != ["OK"]:
        assert time.monotonic() < deadline, "no recovery after Redis came back"
        time.sleep(0.2)
    assert server.process.poll() is None
