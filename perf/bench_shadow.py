"""What shadow mirroring costs the primary: RPS and p99 with the shadow off, 10%, 100%.

One riskwire server (2 workers by default) serves the demo model and mirrors to a local
shadow: the same package, so the shadow does as much work per request as the primary
would with a candidate of the same size. Between runs the admin API switches the
mirror rate (off → 10% → 100%, repeated in rounds so drift on the machine hits all three
alike); each run is h2load on unary ``Score`` at one concurrency. Costs are the median
over rounds of ``1 - rps(rate)/rps(off)`` and ``p99(rate)/p99(off) - 1``.

    python perf/bench_shadow.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``throughput_cost_full`` and ``p99_cost_full`` (fractions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="models dir (default: demo)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="off/10%%/100%% rounds")
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s runs (CI)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="keep logs and results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.rounds = 1.0, 0.5, 1
    args.keep_logs = False
    return args


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

    h2load = loadgen.find_tool("h2load")
    if h2load is None:
        raise SystemExit("bench_shadow: h2load not found (apt-get install nghttp2-client)")
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
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
        "RISKWIRE_SHADOW_FLUSH_SECONDS": "5",  # the production default, not the test profile's
    }
    server = loadgen.ServerProcess(
        "riskwire", command, f"127.0.0.1:{port}", out / "riskwire.log", env
    )
    runs: dict[str, list] = {name: [] for name in RATES}
    server.start()
    try:
        server.wait_ready(rf"serving on \S+:{port} with {args.workers} workers", timeout=180)
        with AdminClient(f"127.0.0.1:{admin_port}") as admin:
            for round_index in range(args.rounds):
                for name, rate in RATES.items():
                    set_rate(admin, version, rate)
                    point = h2load_point(h2load, server, SCORE, bodies, args.concurrency, args, out)
                    runs[name].append(point)
                    print(
                        f"round {round_index + 1} shadow {name:>4}: {point.rps:,.0f} rps, "
                        f"p99 {point.p99_ms or 0:.2f} ms, errors {point.errors}",
                        flush=True,
                    )
            final = admin.shadow_status()
    finally:
        server.stop()
    return summarise(runs, final, args)


def _cost(runs: dict[str, list], name: str, field: str) -> float | None:
    """Median over rounds of the relative cost of ``name`` against ``off`` in that round."""
    costs = []
    for base, point in zip(runs["off"], runs[name], strict=True):
        ours, theirs = getattr(point, field), getattr(base, field)
        if ours and theirs:
            costs.append(1 - ours / theirs if field == "rps" else ours / theirs - 1)
    return statistics.median(costs) if costs else None


def summarise(runs: dict[str, list], final: dict, args: argparse.Namespace) -> dict:
    """Medians per rate, costs, mirror counters and the targets."""
    table = {}
    for name, points in runs.items():
        rps = [p.rps for p in points if p.rps]
        p99 = [p.p99_ms for p in points if p.p99_ms]
        table[name] = {
            "rps": statistics.median(rps) if rps else None,
            "p99_ms": statistics.median(p99) if p99 else None,
            "errors": sum(p.errors for p in points),
        }
    pairs = final.get("pairs") or [{}]
    summary = {
        "throughput_cost_full": _cost(runs, "100%", "rps"),
        "p99_cost_full": _cost(runs, "100%", "p99_ms"),
        "throughput_cost_10": _cost(runs, "10%", "rps"),
        "p99_cost_10": _cost(runs, "10%", "p99_ms"),
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
            "tool": "h2load unary Score",
            "machine": loadgen.machine_info(args.workers, 8),
        },
    }
    return summary


def print_report(summary: dict) -> None:
    """The table and the costs."""
    print(f"\n{'shadow':>7} {'rps':>10} {'p99 ms':>8} {'errors':>7}")
    for name, row in summary["by_rate"].items():
        rps = f"{row['rps']:,.0f}" if row["rps"] else "-"
        p99 = f"{row['p99_ms']:.2f}" if row["p99_ms"] else "-"
        print(f"{name:>7} {rps:>10} {p99:>8} {row['errors']:>7}")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1%}"

    print(
        f"\ncost of 100% mirroring: throughput {pct(summary['throughput_cost_full'])} "
        f"(target <= 15%), p99 {pct(summary['p99_cost_full'])} (target <= 10%)"
    )
    print(
        f"cost of 10% mirroring: throughput {pct(summary['throughput_cost_10'])}, "
        f"p99 {pct(summary['p99_cost_10'])}"
    )
    print(
        f"mirrored {summary['mirrored']:,}, dropped {summary['dropped']:,}, "
        f"shadow failures {summary['shadow_failed']:,}, request errors {summary['errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        summary = run(args, out)
        if args.out:
            loadgen.write_json(out / "bench_shadow.json", summary)
    print_report(summary)
    if args.json:
        print(json.dumps(summary, sort_keys=True, default=str))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
