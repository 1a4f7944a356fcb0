"""What shadow mirroring costs the primary: RPS and p99 with the shadow off, 10%, 100%.

One riskwire server (2 workers by default) serves the demo model and mirrors to a local
shadow: the same package, so the shadow does as much work per request as the primary
would with a candidate of the same size. Between runs the admin API switches the
mirror rate (off → 10% → 100%, repeated in rounds so drift on the machine hits all three
alike). Each round measures, with h2load on unary ``Score``:

* throughput at saturation: ``--concurrency`` connections sending as fast as answered;
* latency at equal load: the same connections at a fixed total rate,
  ``--load-fraction`` of the round's shadow-off throughput (what backend services see
  at production load, below saturation).

Costs are medians over rounds of ``1 - rps(rate)/rps(off)`` (saturated) and
``p99(rate)/p99(off) - 1`` (at the fixed rate; the saturated p99 cost is reported too).

    python perf/bench_shadow.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``throughput_cost_full`` and ``p99_cost_full`` (fractions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.bench_serving import ensure_models, h2load_point  # noqa: E402
from perf.loadgen import SCORE  # noqa: E402

RATES = {"off": None, "10%": 10.0, "100%": 100.0}
TARGETS = {"throughput_cost_full_max": 0.15, "p99_cost_full_max": 0.10}
STATS_SETTLE_S = 0.6  # two publication intervals: worker → scorer process → stats file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = loadgen.round_arguments(__doc__.split("\n")[0], "off/10%%/100%% rounds")
    parser.add_argument(
        "--load-fraction",
        type=float,
        default=0.6,
        help="fixed-rate runs at this fraction of the shadow-off saturated throughput",
    )
    return loadgen.parse_round_arguments(parser, argv, keep_logs=False)


def set_rate(admin, version: str, rate: float | None) -> dict:  # noqa: ANN001
    """Switch the mirror and wait until both workers run the new configuration."""
    if rate is None:
        stored = admin.set_shadow(enabled=False)
    else:
        stored = admin.set_shadow(enabled=True, version=version, rate_percent=rate)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = admin.shadow_status()
        workers = status["workers"]
        if workers and all(w["generation"] == stored["generation"] for w in workers):
            return status
        time.sleep(0.1)
    raise RuntimeError("workers did not apply the shadow configuration within 10 s")


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure every rate in rounds; returns the summary."""
    from riskwire.clients.admin import AdminClient
    from riskwire.pipeline.package import list_versions

    h2load = loadgen.require_h2load("bench_shadow")
    models = ensure_models(args.models)
    version = str(list_versions(models, "fraud")[-1])
    bodies = loadgen.prepare_bodies(out, batch_rows=1)
    port, admin_port = loadgen.free_port(), loadgen.free_port()
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    env = {
        **os.environ,
        "RISKWIRE_STATE_SNAPSHOT": str(out / "cards.snapshot"),
        "RISKWIRE_ADMIN_PORT": str(admin_port),
        "RISKWIRE_METRICS_PORT": "0",
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
        "RISKWIRE_SHADOW_FLUSH_SECONDS": "5",  # the production default, not the test profile's
    }
    server = loadgen.ServerProcess(
        "riskwire", command, f"127.0.0.1:{port}", out / "riskwire.log", env
    )
    runs: dict[str, list] = {name: [] for name in RATES}
    fixed: dict[str, list] = {name: [] for name in RATES}
    # Mirrors dropped during each rate's runs (saturated, fixed rate), summed over rounds.
    dropped = {name: [0, 0] for name in RATES}
    with server.serving(args.workers), AdminClient(f"127.0.0.1:{admin_port}") as admin:
        set_rate(admin, version, None)  # an untimed run first: the first run is cold
        h2load_point(h2load, server, SCORE, bodies, args.concurrency, args, out)
        seen = dropped_so_far(admin)
        for round_index in range(args.rounds):
            order = _rotated(list(RATES.items()), round_index)
            for name, rate in order:
                set_rate(admin, version, rate)
                point = h2load_point(h2load, server, SCORE, bodies, args.concurrency, args, out)
                runs[name].append(point)
                now = dropped_so_far(admin)
                dropped[name][0] += now - seen
                _print(round_index, name, "saturated", point, now - seen)
                seen = now
            per_client = max(1, round(runs["off"][-1].rps * args.load_fraction / args.concurrency))
            for name, rate in order:
                set_rate(admin, version, rate)
                point = h2load_point(
                    h2load, server, SCORE, bodies, args.concurrency, args, out, per_client
                )
                fixed[name].append(point)
                now = dropped_so_far(admin)
                dropped[name][1] += now - seen
                rate_label = f"at {per_client * args.concurrency} rps"
                _print(round_index, name, rate_label, point, now - seen)
                seen = now
        final = admin.shadow_status()
    return summarise(runs, fixed, final, args, dropped)


def dropped_so_far(admin) -> int:  # noqa: ANN001
    """Mirrors dropped since the server started, once the workers' counts have reached
    the stats (they are published every 0.25 s, through the scorer process)."""
    time.sleep(STATS_SETTLE_S)
    return sum(pair.get("dropped", 0) for pair in admin.shadow_status().get("pairs") or [])


def _rotated(items: list, round_index: int) -> list:
    """The rates in this round's order: rotated by one each round, so over every three
    rounds each rate runs once first, second and last (whatever builds up or warms up
    during a round — log segments, page cache, the machine — hits all rates alike)."""
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def _print(round_index: int, name: str, load: str, point, dropped: int) -> None:  # noqa: ANN001
    print(
        f"round {round_index + 1} shadow {name:>4} {load:>14}: {point.rps:,.0f} rps, "
        f"p99 {point.p99_ms or 0:.2f} ms, errors {point.errors}, mirrors dropped {dropped:,}",
        flush=True,
    )


def _cost(runs: dict[str, list], name: str, field: str) -> float | None:
    """Median over rounds of the relative cost of ``name`` against ``off`` in that round."""
    costs = []
    for base, point in zip(runs["off"], runs[name], strict=True):
        ours, theirs = getattr(point, field), getattr(base, field)
        if ours and theirs:
            costs.append(1 - ours / theirs if field == "rps" else ours / theirs - 1)
    return statistics.median(costs) if costs else None


def _median(points: list, field: str) -> float | None:
    values = [getattr(p, field) for p in points if getattr(p, field)]
    return statistics.median(values) if values else None


def summarise(
    runs: dict[str, list],
    fixed: dict[str, list],
    final: dict,
    args: argparse.Namespace,
    dropped: dict[str, list[int]] | None = None,
) -> dict:
    """Medians per rate, costs, mirror counters and the targets."""
    table = {
        name: {
            "rps": _median(runs[name], "rps"),
            "p99_ms": _median(runs[name], "p99_ms"),
            "fixed_rate_rps": _median(fixed[name], "rps"),
            "fixed_rate_p50_ms": _median(fixed[name], "p50_ms"),
            "fixed_rate_p99_ms": _median(fixed[name], "p99_ms"),
            "errors": sum(p.errors for p in runs[name] + fixed[name]),
            "dropped_saturated": (dropped or {}).get(name, [None, None])[0],
            "dropped_fixed_rate": (dropped or {}).get(name, [None, None])[1],
        }
        for name in RATES
    }
    pairs = final.get("pairs") or [{}]
    summary = {
        "throughput_cost_full": _cost(runs, "100%", "rps"),
        "p99_cost_full": _cost(fixed, "100%", "p99_ms"),
        "p99_cost_full_saturated": _cost(runs, "100%", "p99_ms"),
        "throughput_cost_10": _cost(runs, "10%", "rps"),
        "p99_cost_10": _cost(fixed, "10%", "p99_ms"),
        "p99_cost_10_saturated": _cost(runs, "10%", "p99_ms"),
        "by_rate": table,
        "mirrored": sum(p.get("mirrored", 0) for p in pairs),
        "dropped": sum(p.get("dropped", 0) for p in pairs),
        "shadow_failed": sum(p.get("failed", 0) for p in pairs),
        "errors": sum(row["errors"] for row in table.values()),
        "targets": TARGETS,
        "config": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "load_fraction": args.load_fraction,
            "tool": "h2load unary Score",
            "machine": loadgen.machine_info(args.workers, 8),
        },
    }
    return summary


def print_report(summary: dict) -> None:
    """The table and the costs."""

    num, pct = loadgen.format_number, loadgen.format_change

    print(
        f"\n{'shadow':>7} {'saturated rps':>14} {'p99 ms':>8} {'fixed rps':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>7}"
    )
    for name, row in summary["by_rate"].items():
        print(
            f"{name:>7} {num(row['rps'], ',.0f'):>14} {num(row['p99_ms'], '.2f'):>8} "
            f"{num(row['fixed_rate_rps'], ',.0f'):>10} {num(row['fixed_rate_p50_ms'], '.2f'):>7} "
            f"{num(row['fixed_rate_p99_ms'], '.2f'):>7} {row['errors']:>7}"
        )

    print(
        f"\ncost of 100% mirroring: throughput {pct(summary['throughput_cost_full'])} "
        f"(target <= 15%), p99 at equal load {pct(summary['p99_cost_full'])} (target <= 10%), "
        f"p99 at saturation {pct(summary['p99_cost_full_saturated'])}"
    )
    print(
        f"cost of 10% mirroring: throughput {pct(summary['throughput_cost_10'])}, "
        f"p99 at equal load {pct(summary['p99_cost_10'])}, "
        f"p99 at saturation {pct(summary['p99_cost_10_saturated'])}"
    )
    print(
        f"mirrored {summary['mirrored']:,}, dropped {summary['dropped']:,}, "
        f"shadow failures {summary['shadow_failed']:,}, request errors {summary['errors']}"
    )
    full = summary["by_rate"]["100%"]
    if full.get("dropped_fixed_rate") is not None:
        print(
            f"dropped at 100%: {full['dropped_saturated']:,} in the saturated runs, "
            f"{full['dropped_fixed_rate']:,} at the fixed rate"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    summary = loadgen.run_bench("bench_shadow", parse_args(argv), run, print_report)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
