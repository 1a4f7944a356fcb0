"""Per-card feature state in Redis (RedisCardState) against a real ``redis-server``:
features equal the offline kernel's exactly, whichever replica applies a transaction."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("redis", reason="the redis package is not installed")
if shutil.which("redis-server") is None:
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server)", allow_module_level=True
    )

from riskwire.kernels.encoding import TransactionArrays  # noqa: E402
from riskwire.kernels.features import compute_features_offline  # noqa: E402
from riskwire.kernels.schema import FEATURE_NAMES, NUM_FEATURES  # noqa: E402
from riskwire.kernels.state import CARD_RECORD  # noqa: E402
from riskwire.server.redis_cards import RedisCardState  # noqa: E402
from riskwire.server.redis_state import RedisConfig, StateUnavailableError  # noqa: E402

TXN_COUNT = FEATURE_NAMES.index("card_txn_count")
T0 = 1_704_067_200_000


def config_for(server, **changes) -> RedisConfig:  # noqa: ANN001 - conftest's RedisServer
    """A config with a fresh key prefix; generous timeouts unless a test sets them."""
    options = {"key_prefix": f"c{uuid.uuid4().hex[:8]}", "op_timeout_s": 2.0}
    options["failure_cooldown_s"] = 0.0
    options.update(changes)
    return RedisConfig(url=server.url, **options)


def stream(seed: int, rows: int, cards: int) -> TransactionArrays:
    """A time-ordered stream over a few cards: repeat merchants, foreign countries,
    NaN amounts and late arrivals."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 2**63, cards, dtype=np.uint64)
    times = T0 + np.cumsum(rng.exponential(90_000, rows)).astype(np.int64)
    late = rng.random(rows) < 0.05
    times[late] -= 3_600_000
    amount = np.round(rng.lognormal(3.5, 1.0, rows), 2)
    amount[rng.random(rows) < 0.02] = np.nan
    return TransactionArrays(
        card_key=keys[rng.integers(0, cards, rows)],
        merchant_key=rng.integers(1, 12, rows).astype(np.uint64),
        event_time_ms=times,
        amount=amount,
        mcc=rng.choice([5411, 5812, 7995], rows).astype(np.int32),
        country=rng.integers(-1, 4, rows).astype(np.int32),
        card_country=rng.integers(0, 3, rows).astype(np.int32),
        currency=rng.integers(0, 3, rows).astype(np.int32),
        channel=rng.integers(0, 3, rows).astype(np.int32),
    )


def rows_of(tx: TransactionArrays, index) -> TransactionArrays:  # noqa: ANN001
    return TransactionArrays(*(getattr(tx, name)[index] for name in TransactionArrays.__slots__))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal, NaN where NaN."""
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


@pytest.fixture
def stores(redis_server):
    """Two stores on one Redis with one key prefix: two replicas, separate caches."""
    config = config_for(redis_server)
    made = [RedisCardState(config), RedisCardState(config)]
    yield made
    for store in made:
        store.close()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_alternating_replicas_give_the_offline_features(redis_server, seed, cuts) -> None:
    """Rows handed to two replicas in turn, as single calls and batches of any size
    (repeated cards included), give bit-for-bit the offline pass's features."""
    config = config_for(redis_server)
    replicas = [RedisCardState(config), RedisCardState(config)]
    tx = stream(seed, 120, cards=6)
    expected, _ = compute_features_offline(tx)
    served = np.empty_like(expected)
    start, turn = 0, 0
    for size in itertools.cycle(cuts):
        if start >= len(tx.amount):
            break
        index = np.arange(start, min(start + size, len(tx.amount)))
        replicas[turn % 2].update(rows_of(tx, index), out := np.empty((len(index), NUM_FEATURES)))
        served[index] = out
        start, turn = index[-1] + 1, turn + 1
    assert start == len(tx.amount)
    assert same(served, expected)
    for replica in replicas:
        replica.close()


def test_concurrent_writers_apply_every_card_in_one_order(stores) -> None:
    """Four threads on two replicas scoring the same few cards at once: every card's
    transactions are applied one at a time, so the features served equal an offline
    pass over each card's rows in the order they were applied (which card_txn_count,
    the card's count before the row, gives back)."""
    tx = stream(7, 400, cards=3)
    served = np.empty((len(tx.amount), NUM_FEATURES))
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            store = stores[thread % 2]
            for i in range(thread, len(tx.amount), 4):
                store.update(rows_of(tx, [i]), served[i : i + 1])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(s.conflicts for s in stores) > 0  # the test did exercise contention
    for card in np.unique(tx.card_key):
        mine = np.flatnonzero(tx.card_key == card)
        order = mine[np.argsort(served[mine, TXN_COUNT], kind="stable")]
        assert served[order, TXN_COUNT].tolist() == list(range(len(mine)))
        expected, _ = compute_features_offline(rows_of(tx, order))
        assert same(served[order], expected)


def test_one_round_trip_when_the_cache_is_current(stores) -> None:
    first, second = stores
    tx = stream(3, 40, cards=10)
    first.update(rows_of(tx, np.arange(20)), np.empty((20, NUM_FEATURES)))
    calls, trips = first.calls, first.round_trips
    first.update(rows_of(tx, np.arange(20, 40)), np.empty((20, NUM_FEATURES)))  # one pipeline
    assert (first.calls - calls, first.round_trips - trips) == (1, 1)
    second.update(rows_of(tx, [0]), np.empty((1, NUM_FEATURES)))  # second never saw it
    assert (second.round_trips, second.conflicts) == (2, 1)
    assert second.counters() == {"calls": 1, "round_trips": 2, "conflicts": 1, "degraded": 0}


def test_peek_changes_nothing(stores) -> None:
    store = stores[0]
    tx = stream(5, 30, cards=4)
    store.update(rows_of(tx, np.arange(29)), np.empty((29, NUM_FEATURES)))
    last = rows_of(tx, [29])
    peeked = store.peek(last, np.empty((1, NUM_FEATURES)))
    again = stores[1].peek(last, np.empty((1, NUM_FEATURES)))
    applied = store.update(last, np.empty((1, NUM_FEATURES)))
    expected, _ = compute_features_offline(tx)
    assert same(peeked, expected[29:]) and same(again, peeked) and same(applied, peeked)


def test_card_keys_are_hash_tags_with_a_ttl(redis_server) -> None:
    config = config_for(redis_server)
    store = RedisCardState(config, ttl_s=3600)
    tx = stream(1, 1, cards=1)
    store.update(tx, np.empty((1, NUM_FEATURES)))
    raw = redis_server.client()
    key = f"{{{config.key_prefix}:card:{int(tx.card_key[0])}}}"
    stored = raw.hgetall(key)
    assert int(stored[b"v"]) == 1
    record = np.frombuffer(stored[b"s"], dtype=CARD_RECORD)[0]
    assert int(record["keys"]) == int(tx.card_key[0]) and int(record["counts"][0]) == 1
    assert 3590 * 1000 < raw.pttl(key) <= 3600 * 1000
    raw.close()
    store.close()


def test_contention_past_max_attempts_follows_the_failure_policy(redis_server) -> None:
    config = config_for(redis_server)
    writer = RedisCardState(config)
    tx = stream(2, 2, cards=1)
    writer.update(rows_of(tx, [0]), np.empty((1, NUM_FEATURES)))
    stale = RedisCardState(config, max_attempts=1)  # never saw the card: its write loses
    with pytest.raises(StateUnavailableError, match="contended"):
        stale.update(rows_of(tx, [1]), np.empty((1, NUM_FEATURES)))
    writer.close()
    stale.close()


def test_redis_down_closed_degrade_and_recovery(own_redis) -> None:
    fast = {"op_timeout_s": 0.05, "connect_timeout_s": 0.2}
    closed = RedisCardState(config_for(own_redis, **fast))
    degrade = RedisCardState(config_for(own_redis, on_failure="degrade", **fast))
    tx = stream(4, 6, cards=1)
    for store in (closed, degrade):
        store.update(rows_of(tx, [0, 1]), np.empty((2, NUM_FEATURES)))
    assert not degrade.took_degraded()
    own_redis.stop()

    started = time.monotonic()
    with pytest.raises(StateUnavailableError, match="unavailable"):
        closed.update(rows_of(tx, [2]), np.empty((1, NUM_FEATURES)))
    assert time.monotonic() - started < 1.0
    out = degrade.update(rows_of(tx, [2]), np.empty((1, NUM_FEATURES)))
    stateless, _ = compute_features_offline(rows_of(tx, [2]))  # as the card's first row
    assert same(out, stateless)
    assert degrade.took_degraded() and not degrade.took_degraded()
    assert degrade.degraded == 1

    own_redis.start()  # same port, empty: the cards start over
    fresh = closed.update(rows_of(tx, [3]), np.empty((1, NUM_FEATURES)))
    assert same(fresh, compute_features_offline(rows_of(tx, [3]))[0])
    assert not same(degrade.update(rows_of(tx, [3]), np.empty((1, NUM_FEATURES))), out)
    assert not degrade.took_degraded()
    closed.close()
    degrade.close()


def _sharing_helpers():  # noqa: ANN202 - the module test_state_sharing.py, loaded by path
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_state_sharing.py")
    spec = importlib.util.spec_from_file_location("_riskwire_state_sharing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _redis_env(server, **extra: str) -> dict[str, str]:  # noqa: ANN001 - a RedisServer
    return {
        "RISKWIRE_STATE_BACKEND": "redis",
        "RISKWIRE_REDIS_URL": server.url,
        "RISKWIRE_REDIS_KEY_PREFIX": f"s{uuid.uuid4().hex[:8]}",
        **extra,
    }


def test_two_servers_alternating_give_the_offline_features(
    start_server, models_dir, redis_server, forest
) -> None:
    """One card's payments alternate between two servers (2 workers each) sharing one
    Redis, as single calls and a batch: served == offline probabilities, exactly."""
    import grpc

    from riskwire.protos import scoring_pb2, scoring_pb2_grpc

    sharing = _sharing_helpers()
    env = _redis_env(redis_server, RISKWIRE_REDIS_TIMEOUT_MS="1000")
    servers = [start_server(models_dir, env=env), start_server(models_dir, env=env)]
    channels = [grpc.insecure_channel(s.target) for s in servers]
    stubs = [scoring_pb2_grpc.ScoringStub(c) for c in channels]
    history = sharing.card_history(f"card-{uuid.uuid4().hex}", 16)
    served = []
    for i, transaction in enumerate(history[:12]):
        request = scoring_pb2.ScoreRequest(transaction=transaction)
        response = stubs[i % 2].Score(request, timeout=10)
        assert not response.flags
        served.append(response.probability)
    batch_request = scoring_pb2.ScoreBatchRequest(transactions=history[12:])
    batch = stubs[0].ScoreBatch(batch_request, timeout=10)
    served += [result.probability for result in batch.results]
    expected = sharing.offline_probabilities(forest, history)
    np.testing.assert_allclose(served, expected, rtol=0, atol=0)
    for channel in channels:
        channel.close()


def test_redis_killed_mid_traffic_degrades_then_recovers(
    start_server, models_dir, own_redis
) -> None:
    """redis_on_failure = degrade: with Redis gone, calls are answered within the
    deadline, flagged state_unavailable, and counted; when Redis returns, flags stop."""
    import grpc

    from riskwire.protos import scoring_pb2, scoring_pb2_grpc

    sharing = _sharing_helpers()
    env = _redis_env(
        own_redis, RISKWIRE_REDIS_TIMEOUT_MS="100", RISKWIRE_REDIS_ON_FAILURE="degrade"
    )
    server = start_server(models_dir, env=env)
    channel = grpc.insecure_channel(server.target)
    stub = scoring_pb2_grpc.ScoringStub(channel)
    history = sharing.card_history(f"card-{uuid.uuid4().hex}", 30)

    def score(i: int) -> scoring_pb2.ScoreResponse:
        return stub.Score(scoring_pb2.ScoreRequest(transaction=history[i]), timeout=5)

    assert [list(score(i).flags) for i in range(3)] == [[]] * 3
    own_redis.stop()
    started = time.monotonic()
    down = [score(i) for i in range(3, 13)]
    assert time.monotonic() - started < 5.0
    assert all(list(r.flags) == ["state_unavailable"] for r in down)
    assert all(0.0 <= r.probability <= 1.0 and r.decision for r in down)
    own_redis.start()
    deadline = time.monotonic() + 10
    i = 13
    while list(score(i).flags):
        i += 1
        assert time.monotonic() < deadline and i < len(history), "no recovery"
        time.sleep(0.2)
    assert _degraded_calls(server.metrics_port, len(down)) >= len(down)  # on the endpoint
    assert server.process.poll() is None
    channel.close()


def _degraded_calls(metrics_port: int, at_least: float = 1.0, timeout_s: float = 15.0) -> float:
    """riskwire_state_degraded_total over the workers, once it reaches ``at_least`` (each
    worker publishes its own count on its own schedule) or ``timeout_s`` has passed."""
    import re
    import urllib.request

    pattern = re.compile(r"^riskwire_state_degraded_total\{[^}]*\} (\S+)$", re.M)
    deadline = time.monotonic() + timeout_s
    while True:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            total = sum(float(v) for v in pattern.findall(response.read().decode()))
        if total >= at_least or time.monotonic() > deadline:
            return total
        time.sleep(0.3)
