"""Token-bucket rate limits: kernel vs a reference bucket, table limits, shared processes."""

from __future__ import annotations

import math
import multiprocessing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.kernels.ratelimit import (
    HDR_LOCK,
    RateLimitTable,
    hash_client,
)
from riskwire.server.ratelimit import (
    UNLIMITED,
    RateLimit,
    RateLimits,
    SharedRateLimiter,
    parse_rate_limits,
)

PID = 4242
SECOND_NS = 1_000_000_000


class ReferenceBucket:
    """A plain-Python token bucket with the kernel's documented semantics."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens: float | None = None
        self.last_ns = 0

    def take(self, now_ns: int, cost: float) -> float:
        if cost > self.burst:
            return math.inf
        if self.tokens is None:
            self.tokens, self.last_ns = self.burst, now_ns
        else:
            elapsed_ns = now_ns - self.last_ns
            refill = elapsed_ns / 1e9 * self.rate if elapsed_ns > 0 else 0.0
            self.tokens = min(self.burst, self.tokens + refill)
            self.last_ns = max(self.last_ns, now_ns)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


steps = st.lists(
    st.tuples(
        st.integers(0, 3),  # client
        st.one_of(st.just(0), st.integers(-50_000, 3 * SECOND_NS)),  # clock step (ns)
        st.sampled_from([0.5, 1.0, 1.0, 1.0, 2.0, 3.5, 100.0]),  # cost (100 > any burst)
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 7.0, 250.0]),
    burst=st.sampled_from([1.0, 4.0, 10.0]),
    steps=steps,
)
def test_kernel_matches_reference_bucket(rate: float, burst: float, steps: list) -> None:
    table = RateLimitTable.create(16)
    buckets = [ReferenceBucket(rate, burst) for _ in range(4)]
    now_ns = 10 * SECOND_NS
    for client, step_ns, cost in steps:
        now_ns += step_ns
        got = table.take(hash_client(f"client-{client}"), now_ns, cost, rate, burst, PID)
        want = buckets[client].take(now_ns, cost)
        assert (got == 0.0) == (want == 0.0)
        assert got == pytest.approx(want, rel=1e-12)
    assert table.header[HDR_LOCK] == 0


def test_retry_after_is_the_time_to_the_next_token() -> None:
    table, key = RateLimitTable.create(16), hash_client("c")
    assert [table.take(key, 0, 1.0, 2.0, 3.0, PID) for _ in range(3)] == [0.0] * 3
    assert table.take(key, 0, 1.0, 2.0, 3.0, PID) == pytest.approx(0.5)
    assert table.take(key, SECOND_NS // 4, 1.0, 2.0, 3.0, PID) == pytest.approx(0.25)
    assert table.take(key, SECOND_NS // 2, 1.0, 2.0, 3.0, PID) == 0.0
    assert table.take(key, SECOND_NS // 2, 5.0, 2.0, 3.0, PID) == math.inf  # cost > burst


def test_unlimited_rate_never_touches_the_table() -> None:
    table = RateLimitTable.create(16)
    for rate in (0.0, -1.0, math.nan):
        assert table.take(hash_client("c"), 0, 1e9, rate, 1.0, PID) == 0.0
    assert table.occupied == 0


def test_clients_have_their_own_buckets() -> None:
    table = RateLimitTable.create(16)
    a, b = hash_client("a"), hash_client("b")
    assert table.take(a, 0, 2.0, 1.0, 2.0, PID) == 0.0
    assert table.take(a, 0, 1.0, 1.0, 2.0, PID) > 0.0
    assert table.take(b, 0, 2.0, 1.0, 2.0, PID) == 0.0
    assert table.occupied == 2 and table.find(a) != table.find(b)


def test_full_table_fails_open_and_counts() -> None:
    table = RateLimitTable.create(4)
    keys = [hash_client(f"c{i}") for i in range(5)]
    for key in keys[:4]:  # every slot holds a bucket in use (not refilled)
        assert table.take(key, 0, 1.0, 1.0, 10.0, PID) == 0.0
    assert table.occupied == 4
    assert [table.take(keys[4], 0, 10.0, 1.0, 10.0, PID) for _ in range(3)] == [0.0] * 3
    assert table.fail_open == 3 and table.find(keys[4]) == -1
    assert table.take(keys[0], 0, 10.0, 1.0, 10.0, PID) > 0.0  # known clients still limited


def test_idle_buckets_are_reclaimed_instead_of_failing_open() -> None:
    table = RateLimitTable.create(4)
    keys = [hash_client(f"c{i}") for i in range(5)]
    for key in keys[:4]:
        table.take(key, 0, 1.0, 1.0, 10.0, PID)
    # one second later every bucket is full again: idle, as good as absent
    assert table.take(keys[4], SECOND_NS, 10.0, 1.0, 10.0, PID) == 0.0
    assert table.take(keys[4], SECOND_NS, 1.0, 1.0, 10.0, PID) > 0.0  # it has a bucket now
    assert (table.fail_open, table.reclaimed, table.occupied) == (0, 1, 4)


def test_table_layout_is_validated() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RateLimitTable.nbytes_for(6)
    with pytest.raises(ValueError, match="bad magic"):
        RateLimitTable.attach(bytearray(RateLimitTable.nbytes_for(4)))
    with pytest.raises(ValueError, match="nonzero uint64"):
        RateLimitTable.create(4).take(0, 0, 1.0, 1.0, 1.0, PID)
    buffer = bytearray(RateLimitTable.nbytes_for(8))
    RateLimitTable.format(buffer, 8, probe_limit=3).take(7, 0, 1.0, 1.0, 1.0, PID)
    again = RateLimitTable.attach(buffer)
    assert (again.capacity, again.probe_limit, again.occupied) == (8, 3, 1)


def test_limiter_uses_config_per_client_and_break_lock_of() -> None:
    limits = parse_rate_limits("default=1/2; vip=1/5; free=0")
    limiter = SharedRateLimiter.create(64, limits=limits)
    try:
        assert sum(limiter.check("someone") == 0.0 for _ in range(10)) == 2
        assert sum(limiter.check("vip") == 0.0 for _ in range(10)) == 5
        assert all(limiter.check("free") == 0.0 for _ in range(100))
        assert limiter.check("someone", cost=3.0) == math.inf
        assert limiter.table.occupied == 2  # warm-up and unlimited clients use no slot
        dead_pid = 2**22 + 12345  # a pid no live process of ours has
        limiter.table.header[HDR_LOCK] = dead_pid  # died holding the lock: check would spin
        assert not limiter.break_lock_of(4242)
        assert limiter.break_lock_of(dead_pid)
        assert limiter.table.header[HDR_LOCK] == 0
        assert limiter.check("new-client") == 0.0
    finally:
        limiter.close()


# Child process (started with spawn; the target is builtins.exec, since spawn cannot
# re-import this module under pytest's importlib import mode): hammer one client.
HAMMER = """
import time
from riskwire.server.ratelimit import SharedRateLimiter, parse_rate_limits
limiter = SharedRateLimiter.attach(name, limits=parse_rate_limits(limits))
ready.put(True)
go.wait(30)
allowed = 0
start = time.monotonic_ns()
while time.monotonic_ns() - start < duration_ns:
    allowed += limiter.check("c1") == 0.0
end = time.monotonic_ns()
limiter.close()
results.put((allowed, start, end))
"""


def test_processes_share_one_bucket_per_client() -> None:
    rate, burst, processes = 200.0, 50.0, 3
    limiter = SharedRateLimiter.create(1024)
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    env = {
        "name": limiter.name, "limits": f"default={rate}/{burst}", "duration_ns": SECOND_NS // 2,
        "ready": ready, "results": results, "go": go,
    }  # fmt: skip
    workers = [ctx.Process(target=exec, args=(HAMMER, env)) for _ in range(processes)]
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=60)
        go.set()
        outcomes = [results.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(10)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        limiter.close()
    allowed = sum(n for n, _, _ in outcomes)
    elapsed_s = (max(end for *_, end in outcomes) - min(s for _, s, _ in outcomes)) / 1e9
    assert allowed <= burst + rate * elapsed_s + 1  # one bucket: per-process ones give ~3x
    assert allowed >= 0.75 * (burst + rate * 0.5)  # and it did let the allowed share through


def test_parse_rate_limits() -> None:
    limits = parse_rate_limits(" default=100/200; payments=5000/10000;\nbatch-loader=50 ; ")
    assert limits.default == RateLimit(100.0, 200.0)
    assert limits.for_client("payments") == RateLimit(5000.0, 10000.0)
    assert limits.for_client("batch-loader") == RateLimit(50.0, 50.0)
    assert limits.for_client("other") == RateLimit(100.0, 200.0)
    assert parse_rate_limits("slow=0.5").for_client("slow") == RateLimit(0.5, 1.0)
    assert parse_rate_limits("x=0").for_client("x").unlimited
    assert parse_rate_limits("").default == UNLIMITED
    assert parse_rate_limits("a=1").for_client("b") == UNLIMITED
    assert RateLimits().for_client("anyone").unlimited


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("payments", r"'payments': expected CLIENT=RATE\[/BURST\]"),
        ("=5", "expected CLIENT=RATE"),
        ("a=", "expected CLIENT=RATE"),
        ("a=fast", "'a=fast': rate 'fast' is not a number"),
        ("a=5/lots", "'a=5/lots': burst 'lots' is not a number"),
        ("a=5/", "burst '' is not a number"),
        ("a=-1", "'a=-1': rate must be finite and >= 0"),
        ("a=inf", "rate must be finite"),
        ("a=nan", "rate must be finite"),
        ("a=5/0.5", "'a=5/0.5': burst must be >= 1"),
        ("a=1; b=2; a=3", "'a=3': client 'a' is listed twice"),
        ("default=1; default=2", "client 'default' is listed twice"),
    ],
)
def test_parse_rate_limits_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate_limits(text)


def test_set_limits_applies_to_remembered_clients() -> None:
    limiter = SharedRateLimiter.create(64, limits=parse_rate_limits("default=1/1"))
    try:
        assert limiter.check("c") == 0.0
        assert limiter.check("c") > 0.0
        limiter.set_limits(parse_rate_limits("default=1/1; c=0"))
        assert all(limiter.check("c") == 0.0 for _ in range(10))
    finally:
        limiter.close()
