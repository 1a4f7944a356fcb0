"""What Redis card state costs: serving RPS and p99 with the local card store vs Redis.

The per-card feature state is a start-up setting of ``riskwire serve``, so each
measurement gets its own server: in rounds, one with each store, the order alternating
per round (local, redis, then redis, local) so drift on the machine hits both alike:

* ``local``: ``RISKWIRE_STATE_BACKEND=local``, the supervisor's shared-memory table;
* ``redis``: ``RISKWIRE_STATE_BACKEND=redis`` against a ``redis-server`` this script
  starts on a free loopback port (``--save '' --appendonly no``, a scratch directory),
  emptied (FLUSHALL) before every server and stopped at the end, with a request-path
  timeout of ``--redis-timeout-ms`` (1 s: the server's 50 ms default turns every stall of
  the machine into failed calls, see ``REDIS_TIMEOUT_MS``). Each transaction is one
  Lua compare-and-set (``server/redis_cards.py``): one round trip when the worker's
  cached copy of the card is current, two or more when another writer came first.

Every server has ``--workers`` workers, the ``test`` profile, its own free data, admin
and metrics ports, a fresh card-state snapshot and a mirror of the models directory. On
each, h2load sends unary ``Score`` as fast as answered, in two scenarios:

* ``one_card``: one h2load with ``--concurrency`` connections and one pre-encoded body,
  the load of every other bench here. Every request is the same card, so the workers
  (and the threads of each) race for it: the worst case for Redis's optimistic writes,
  where a call that loses its compare-and-set ``max_attempts`` times in a row fails
  with UNAVAILABLE (counted as an error);
* ``card_per_connection`` (the headline): ``--concurrency`` h2load processes of one
  connection each, each with its own card: a card's requests come one at a time on one
  connection, so on one worker (like card affinity at the load balancer), and that
  worker's cached copy of the card stays current.

Round trips per request come from the server's Prometheus endpoint: the counters
``riskwire_state_{calls,round_trips,conflicts,degraded}_total`` (summed over label sets,
published by the workers every ``RISKWIRE_METRICS_PUBLISH_S``), scraped once they have
settled before and after each scenario (warm-up and check calls included); the store
counts successful updates only, so the round trips of calls that failed are not in
``round_trips_per_request``. Requests that failed are h2load's non-200s, calls whose
response carried no data (a gRPC error) and calls the server's ``riskwire_requests_total``
counted with a gRPC status other than OK (``errors`` and ``failed`` in the table: the
same failures seen from each side, h2load's estimated from the bytes it received).

Ratios are medians over rounds of ``rps(redis)/rps(local)`` and ``p99(redis)/p99(local)``.

    python perf/bench_state.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--redis-timeout-ms MS] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least ``rps_local``,
``rps_redis``, ``p99_ms_local``, ``p99_ms_redis``, ``throughput_ratio_redis_vs_local``
and ``round_trips_per_request`` (of the ``card_per_connection`` scenario; both
scenarios, with the server's counters, under ``scenarios``). Exit status 1 when a
request failed or a counter check did not hold; 0 with ``"skipped"`` set (and the
numbers null) when redis-server or h2load is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.bench_serving import Point, after_run, ensure_models, h2load_point  # noqa: E402
from perf.bench_validation import mirror_models  # noqa: E402
from perf.loadgen import SCORE  # noqa: E402

VARIANTS = ("local", "redis")
SCENARIOS = ("one_card", "card_per_connection")
HEADLINE = "card_per_connection"  # the top-level numbers: distinct cards, as in real traffic
STATE_COUNTERS = ("calls", "round_trips", "conflicts", "degraded")
PUBLISH_S = 0.1  # RISKWIRE_METRICS_PUBLISH_S: how often the workers publish counters
SETTLE_TIMEOUT_S = 10.0
REDIS_INSTALL_HINT = "apt-get install -y redis-server"
# The server's default (50 ms) fails a call on any stall that long, and three in a row
# fail every call for a cool-down: on a loaded 2-core VM that measures the stalls, not
# the store. With 1 s a stall is latency, as it is for the local store.
REDIS_TIMEOUT_MS = 1000.0
REQUIRED_KEYS = (
    "rps_local",
    "rps_redis",
    "p50_ms_local",
    "p50_ms_redis",
    "p99_ms_local",
    "p99_ms_redis",
    "throughput_ratio_redis_vs_local",
    "p99_ratio_redis_vs_local",
    "round_trips_per_request",
    "conflicts_per_request",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = loadgen.round_arguments(__doc__.split("\n")[0], "local/redis rounds")
    parser.add_argument(
        "--redis-timeout-ms",
        type=float,
        default=REDIS_TIMEOUT_MS,
        help="RISKWIRE_REDIS_TIMEOUT_MS of the redis servers (default %(default)s; the "
        "server's own default is 50)",
    )
    # keep_logs: the per-connection h2load logs are merged here for the percentiles
    return loadgen.parse_round_arguments(parser, argv, keep_logs=True)


# ------------------------------------------------------------------ server counters
def counter_totals(text: str) -> dict[str, float]:
    """The counters this bench reads, from a Prometheus text exposition.

    ``calls``, ``round_trips``, ``conflicts``, ``degraded``: ``riskwire_state_<name>_total``
    summed over label sets (absent when the server has no such series, as with the local
    store); ``requests`` and ``failed``: ``riskwire_requests_total`` of ``Score``, all and
    those with a gRPC status other than OK (0); ``failed_status_<code>``: those per status.
    """
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.startswith("riskwire_state_") and name.endswith("_total"):
                key = name.removeprefix("riskwire_state_").removesuffix("_total")
                if key in STATE_COUNTERS:
                    totals[key] = totals.get(key, 0.0) + sample.value
            elif name == "riskwire_requests_total" and sample.labels.get("rpc_method") == "Score":
                totals["requests"] = totals.get("requests", 0.0) + sample.value
                code = sample.labels.get("rpc_grpc_status_code", "0")
                if code != "0":
                    for key in ("failed", f"failed_status_{code}"):
                        totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def counter_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` for every counter ``after`` has (a missing ``before`` is 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def per_call(change: dict[str, float], name: str) -> float | None:
    """``change[name] / change["calls"]``; None without calls (or without the counter)."""
    calls = change.get("calls")
    if not calls or name not in change:
        return None
    return change[name] / calls


def scrape(metrics_url: str) -> dict[str, float]:
    """The counters of one scrape (raises OSError when the endpoint does not answer)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        return counter_totals(response.read().decode())


def settled_counters(metrics_url: str) -> dict[str, float]:
    """The counters once two scrapes a few publish intervals apart agree (the workers
    publish every ``PUBLISH_S``); the last scrape when they keep moving."""
    time.sleep(3 * PUBLISH_S)
    last = scrape(metrics_url)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(3 * PUBLISH_S)
        current = scrape(metrics_url)
        if current == last:
            return current
        last = current
    return last


# ------------------------------------------------------------------ redis-server
def start_redis(redis_server: str, out: Path) -> tuple[loadgen.ServerProcess, str]:
    """A redis-server without persistence on a free loopback port; (process, URL)."""
    import redis

    port = loadgen.free_port()
    workdir = out / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    process = loadgen.ServerProcess("redis", command, f"127.0.0.1:{port}", out / "redis.log")
    process.start()
    probe = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                probe.ping()
                return process, f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    process.stop()
                    raise RuntimeError(
                        f"redis-server did not start:\n{process.log_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)
    finally:
        probe.close()


def flush_redis(url: str) -> None:
    """Forget every card: each redis server starts as fresh as the local snapshot."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()


# ------------------------------------------------------------------ measurement
def card_bodies(bodies: loadgen.Bodies, count: int, out: Path) -> list[loadgen.Bodies]:
    """``count`` bodies (Score messages), each for its own card, none the card of
    ``bodies``: the same bodies with another framed ``Score`` message each."""
    from riskwire.protos import scoring_pb2

    taken = {scoring_pb2.ScoreRequest.FromString(bodies.messages[SCORE]).transaction.card_id}
    found: list[loadgen.Bodies] = []
    rows = 16 * count + 100
    for tx in loadgen.sample_transactions(rows, seed=2):
        if tx["card_id"] in taken:
            continue
        taken.add(tx["card_id"])
        message = loadgen.score_request(tx)
        path = out / f"score-card{len(found) + 1}.body"
        path.write_bytes(loadgen.grpc_frame(message))
        found.append(
            dataclasses.replace(bodies, score=path, messages={**bodies.messages, SCORE: message})
        )
        if len(found) == count:
            return found
    raise RuntimeError(f"{rows} synthetic transactions hold fewer than {count} other cards")


def per_connection_point(
    h2load: str, server: loadgen.ServerProcess, cards: list[loadgen.Bodies],
    args: argparse.Namespace, out: Path,
) -> Point:  # fmt: skip
    """One h2load of one connection per card, all at once; their RPS summed, their
    request logs merged for the percentiles."""
    tags = [f"{server.name}-card{index + 1}" for index in range(len(cards))]
    # h2load_point reads only a server's name (its log file's) and target
    clients = [loadgen.ServerProcess(tag, [], server.target, out / f"{tag}.unused") for tag in tags]
    with ThreadPoolExecutor(len(cards)) as pool:
        points = list(
            pool.map(
                lambda pair: h2load_point(h2load, pair[0], SCORE, pair[1], 1, args, out),
                zip(clients, cards, strict=True),
            )
        )
    point = Point(server.name, "h2load", "Score", len(cards))
    latencies: list[float] = []
    for tag in tags:
        log_file = out / f"h2load-{tag}-Score-c1.log"
        latencies += loadgen.parse_h2load_log(log_file.read_text() if log_file.exists() else "")[0]
        if not args.out:
            log_file.unlink(missing_ok=True)
    rates = [p.rps for p in points]
    point.rps = sum(rates) if all(rates) else None  # type: ignore[arg-type]
    point.p50_ms, point.p99_ms, point.p999_ms = (
        loadgen.percentile(latencies, q) for q in (50, 99, 99.9)
    )
    point.errors = sum(p.errors for p in points)
    point.notes = "; ".join(p.notes for p in points if p.notes)
    return point


def server_process(
    variant: str, round_index: int, models: Path, redis_url: str, args: argparse.Namespace,
    out: Path,
) -> tuple[loadgen.ServerProcess, str]:  # fmt: skip
    """One riskwire server with card store ``variant`` (not started) and its metrics URL."""
    port, metrics_port = loadgen.free_port(), loadgen.free_port()
    tag = f"{variant}-r{round_index + 1}"
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    own = ("RISKWIRE_STATE_", "RISKWIRE_REDIS_")  # set here, whatever the caller's are
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env |= {
        "RISKWIRE_STATE_BACKEND": variant,
        "RISKWIRE_REDIS_URL": redis_url,
        "RISKWIRE_REDIS_TIMEOUT_MS": str(args.redis_timeout_ms),
        "RISKWIRE_STATE_SNAPSHOT": str(out / "state" / f"cards-{tag}.snapshot"),  # fresh
        "RISKWIRE_ADMIN_PORT": "0",
        "RISKWIRE_METRICS": "true",
        "RISKWIRE_METRICS_PORT": str(metrics_port),
        "RISKWIRE_METRICS_PUBLISH_S": str(PUBLISH_S),
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
    }
    server = loadgen.ServerProcess(tag, command, f"127.0.0.1:{port}", out / f"riskwire-{tag}.log",
                                   env)  # fmt: skip
    return server, f"http://127.0.0.1:{metrics_port}/metrics"


def measure(
    h2load: str, variant: str, round_index: int, models: Path, redis_url: str,
    bodies: loadgen.Bodies, cards: list[loadgen.Bodies], args: argparse.Namespace, out: Path,
) -> dict[str, tuple[Point, dict[str, float]]]:  # fmt: skip
    """Start a server with ``variant``, measure both scenarios, stop it; per scenario the
    h2load point and the change of the server's counters."""
    if variant == "redis":
        flush_redis(redis_url)
    server, metrics_url = server_process(variant, round_index, models, redis_url, args, out)
    results = {}
    with server.serving(args.workers):
        before = settled_counters(metrics_url)
        for scenario in SCENARIOS:
            if scenario == "one_card":
                point = h2load_point(h2load, server, SCORE, bodies, args.concurrency, args, out)
                log_file = out / f"h2load-{server.name}-Score-c{args.concurrency}.log"
                if not args.out:
                    log_file.unlink(missing_ok=True)
            else:
                point = per_connection_point(h2load, server, cards, args, out)
            point.server, point.repeat = variant, round_index
            after_run(server, SCORE, bodies, point)
            after = settled_counters(metrics_url)
            change = counter_change(before, after)
            before = after
            results[scenario] = (point, change)
            trips = per_call(change, "round_trips")
            print(
                f"round {round_index + 1} {variant:>5} {scenario:<19}: Score "
                f"{point.rps or 0:,.0f} rps, p50 {point.p50_ms or 0:.2f} ms, p99 "
                f"{point.p99_ms or 0:.2f} ms; round trips/request "
                f"{loadgen.format_number(trips, '.3f')}; errors {point.errors}, server-side "
                f"failed {change.get('failed', 0):.0f}",
                flush=True,
            )
    return results


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure both stores in alternating rounds; returns the summary."""
    h2load, redis_server = loadgen.find_tool("h2load"), loadgen.find_tool("redis-server")
    assert h2load and redis_server, "checked by main()"
    models = mirror_models(ensure_models(args.models), out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    bodies = loadgen.prepare_bodies(out, batch_rows=1)
    cards = card_bodies(bodies, args.concurrency, out)
    runs: dict[str, dict[str, list]] = {s: {v: [] for v in VARIANTS} for s in SCENARIOS}
    redis, redis_url = start_redis(redis_server, out)
    try:
        for round_index in range(args.rounds):
            for variant in VARIANTS[:: -1 if round_index % 2 else 1]:
                results = measure(h2load, variant, round_index, models, redis_url, bodies,
                                  cards, args, out)  # fmt: skip
                for scenario, result in results.items():
                    runs[scenario][variant].append(result)
    finally:
        redis.stop()
    return summarise(runs, args)


# ------------------------------------------------------------------ summary
def _ratios(runs: dict[str, list], field: str) -> list[float]:
    """Per round: ``redis/local`` of ``field`` (rounds missing either are left out)."""
    ratios = []
    for (local, _), (redis, _) in zip(runs["local"], runs["redis"], strict=True):
        ours, base = getattr(redis, field), getattr(local, field)
        if ours and base:
            ratios.append(ours / base)
    return ratios


def summarise_scenario(runs: dict[str, list]) -> dict:
    """One scenario: medians per store, per-round ratios and their medians, counters."""
    summary: dict = {"per_round": {}}
    for variant in VARIANTS:
        points = [point for point, _ in runs[variant]]
        changes = [change for _, change in runs[variant]]
        total: dict[str, float] = {}
        for change in changes:
            for key, value in change.items():
                total[key] = total.get(key, 0.0) + value
        summary[f"rps_{variant}"] = loadgen.median_present([p.rps for p in points])
        summary[f"p50_ms_{variant}"] = loadgen.median_present([p.p50_ms for p in points])
        summary[f"p99_ms_{variant}"] = loadgen.median_present([p.p99_ms for p in points])
        summary[f"errors_{variant}"] = sum(p.errors for p in points)  # seen by the bench
        summary[f"failed_{variant}"] = int(total.get("failed", 0))  # counted by the server
        summary[f"counters_{variant}"] = total
    for key, field in (("throughput_ratio", "rps"), ("p99_ratio", "p99_ms")):
        per_round = _ratios(runs, field)
        summary["per_round"][key] = per_round
        summary[f"{key}_redis_vs_local"] = loadgen.median_cost(per_round)
    counters = summary["counters_redis"]
    summary["round_trips_per_request"] = per_call(counters, "round_trips")
    summary["conflicts_per_request"] = per_call(counters, "conflicts")
    summary["degraded_redis"] = int(counters.get("degraded", 0))
    summary["errors"] = summary["errors_local"] + summary["errors_redis"]
    summary["failed_server_side"] = summary["failed_local"] + summary["failed_redis"]
    return summary


def counter_problems(scenario: str, summary: dict) -> list[str]:
    """What the counters say went wrong: no Redis counters, degraded calls."""
    problems = []
    trips = summary["round_trips_per_request"]
    if trips is None or trips < 1:
        problems.append(f"{scenario}: no Redis round trips counted ({summary['counters_redis']})")
    if summary["degraded_redis"]:
        problems.append(f"{scenario}: {summary['degraded_redis']} calls scored without state")
    return problems


def summarise(runs: dict[str, dict[str, list]], args: argparse.Namespace) -> dict:
    """Both scenarios; the ``HEADLINE`` scenario's numbers also at the top level."""
    from riskwire.server.config import Settings

    scenarios = {scenario: summarise_scenario(runs[scenario]) for scenario in SCENARIOS}
    problems = [p for name, row in scenarios.items() for p in counter_problems(name, row)]
    return {
        **{key: scenarios[HEADLINE][key] for key in REQUIRED_KEYS},
        "scenario": HEADLINE,
        "scenarios": scenarios,
        "errors": sum(row["errors"] for row in scenarios.values()),
        "failed_server_side": sum(row["failed_server_side"] for row in scenarios.values()),
        "problems": problems,
        "skipped": None,
        "config": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "profile": "test",
            "metrics_publish_s": PUBLISH_S,
            "redis_timeout_ms": args.redis_timeout_ms,
            "variants": {
                "local": "state_backend=local (shared-memory table)",
                "redis": "state_backend=redis, a local redis-server (no persistence)",
            },
            "scenarios": {
                "one_card": f"one h2load, {args.concurrency} connections, one card",
                "card_per_connection": f"{args.concurrency} h2load x 1 connection, a card each",
            },
            "tool": "h2load unary Score",
            "machine": loadgen.machine_info(args.workers, Settings().threads_per_worker),
        },
    }


def print_report(summary: dict) -> None:
    """The table: per scenario and store RPS, p50, p99, round trips; the ratios."""
    num = loadgen.format_number
    print(
        f"\n{'scenario':<20} {'store':<6} {'Score rps':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'trips/req':>9} {'conflicts/req':>13} {'errors':>6} {'failed':>6}"
    )
    for scenario, row in summary["scenarios"].items():
        for variant in VARIANTS:
            trips = row["round_trips_per_request"] if variant == "redis" else None
            conflicts = row["conflicts_per_request"] if variant == "redis" else None
            rps, p50, p99 = (row[f"{key}_{variant}"] for key in ("rps", "p50_ms", "p99_ms"))
            print(
                f"{scenario if variant == 'local' else '':<20} {variant:<6} "
                f"{num(rps, ',.0f'):>10} {num(p50, '.2f'):>7} "
                f"{num(p99, '.2f'):>7} {num(trips, '.3f'):>9} "
                f"{num(conflicts, '.3f'):>13} {row[f'errors_{variant}']:>6} "
                f"{row[f'failed_{variant}']:>6}"
            )
        per_round = ", ".join(f"{r:.2f}" for r in row["per_round"]["throughput_ratio"])
        print(
            f"{'':<20} redis/local: throughput "
            f"{num(row['throughput_ratio_redis_vs_local'], '.2f')}x (per round {per_round}), "
            f"p99 {num(row['p99_ratio_redis_vs_local'], '.2f')}x"
        )
    for scenario, row in summary["scenarios"].items():
        for variant in VARIANTS:
            failed = failures_by_status(row[f"counters_{variant}"])
            if failed:
                print(f"{scenario} {variant}: failed server-side: {failed}")
    for problem in summary["problems"]:
        print(f"PROBLEM: {problem}")
    print(
        f"request errors {summary['errors']} (h2load, checks); calls failed server-side "
        f"{summary['failed_server_side']}"
    )


def failures_by_status(counters: dict[str, float]) -> str:
    """The calls the server answered with an error, by gRPC status ("" when none)."""
    import grpc

    names = {str(code.value[0]): code.name for code in grpc.StatusCode}
    parts = [
        f"{names.get(key.rsplit('_', 1)[1], key)} {value:,.0f}"
        for key, value in sorted(counters.items())
        if key.startswith("failed_status_") and value
    ]
    return ", ".join(parts)


def missing_tools() -> str | None:
    """Why this bench cannot run here (with how to install), or None when it can."""
    missing = [
        f"{name} not found ({hint})"
        for name, hint in (
            ("h2load", loadgen.INSTALL_HINTS["h2load"]),
            ("redis-server", REDIS_INSTALL_HINT),
        )
        if loadgen.find_tool(name) is None
    ]
    return "; ".join(missing) or None


def main(argv: list[str] | None = None) -> int:
    """Entry point: 1 when a request failed or a counter check did not hold; 0 when
    skipped for a missing tool (said on stderr and, with ``--json``, in ``skipped``)."""
    import json

    args = parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"bench_state: skipped: {reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({**dict.fromkeys(REQUIRED_KEYS), "skipped": reason}, sort_keys=True))
        return 0
    summary = loadgen.run_bench("bench_state", args, run, print_report)
    failed = summary["errors"] or summary["failed_server_side"]
    return 1 if failed or summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
