"""What the prediction log and the review queue cost: Score RPS and p99, off vs the defaults.

Every answer (or a sample: ``prediction_log_rate``, in percent) goes to the worker's
prediction log (``server/monitoring/predictions.py``: a deque on the request path, Parquet
segments written by a background thread), and ``review_sample_percent`` of them (plus
every ``review`` decision) to the review queue (``server/review.py``: a deque, SQLite
written by a drain thread). Both are start-up settings of ``riskwire serve``, so each
measurement gets its own server, in three variants:

* ``baseline``: ``RISKWIRE_PREDICTION_LOG_RATE=0`` and ``RISKWIRE_REVIEW_QUEUE=false``;
* ``default``: neither set: the log at its default rate (25%) and the review queue on at
  its default sample (1%);
* ``rate_10``: ``RISKWIRE_PREDICTION_LOG_RATE=10``, the review queue at its default
  (left out with ``--no-rate-10``).

In rounds, the order rotated per round (baseline, default, rate_10; then default,
rate_10, baseline; …) so drift on the machine hits all alike. Every server has
``--workers`` workers, the ``test`` profile but ``RISKWIRE_SHADOW_FLUSH_SECONDS`` at
``--flush-seconds`` (default: the setting's own default, 5 s, not the test profile's
0.5 s: segments as large as in production), its own free data port, a fresh card-state
snapshot, a mirror of the models directory and its own shadow directory
(``RISKWIRE_SHADOW_DIR``), where the log and the queue are written. On each, h2load
sends unary ``Score`` at ``--concurrency`` connections (one card), as fast as answered
(RPS, p50, p99). Once the server has stopped (its workers flush the log on SIGTERM),
the rows are read back with ``riskwire.shadow.records.read_predictions``: all of them
(warm-up and check calls included) and those stamped inside h2load's measured window,
which must be about the default rate's share of the measured requests, about 10% with
``rate_10`` and none in the baseline; the review queue's cases are counted too.

Costs are medians over rounds of ``1 - rps(variant)/rps(baseline)`` and
``p99(variant)/p99(baseline) - 1``. Target: the defaults cost <= 5% throughput.

    python perf/bench_prediction_log.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--flush-seconds S] [--no-rate-10] [--smoke]
        [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``cost_default`` (a fraction), ``cost_rate_10`` (null with ``--no-rate-10``),
``rps_baseline``, ``rps_default``, ``p99_ms_baseline``, ``p99_ms_default`` and
``rows_logged`` (prediction-log rows the default servers wrote, summed over rounds).
Exit status 1 when a request failed or a row count did not hold.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.bench_serving import ensure_models, score_point  # noqa: E402
from perf.bench_tracing import _costs, take_h2load_log  # noqa: E402
from perf.bench_validation import mirror_models  # noqa: E402

# RISKWIRE_PREDICTION_LOG_RATE, RISKWIRE_REVIEW_QUEUE per variant (None: the default)
VARIANTS: dict[str, tuple[str | None, str | None]] = {
    "baseline": ("0", "false"),
    "default": (None, None),
    "rate_10": ("10", None),
}
OWN_SETTINGS = ("RISKWIRE_PREDICTION_LOG_", "RISKWIRE_REVIEW_", "RISKWIRE_SHADOW_")
TARGETS = {"cost_default_max": 0.05}
COVERAGE_MIN = 0.99  # at 100%: rows stamped in the measured window / requests h2load sent
SAMPLE_BAND = (0.5, 2.0)  # a sampled log: logged fraction of the measured requests / rate
SAMPLE_MIN_REQUESTS = 1000  # fewer: too few to check the sample's size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from riskwire.server.config import Settings

    parser = loadgen.round_arguments(__doc__.split("\n")[0], "baseline/default/rate_10 rounds")
    parser.add_argument(
        "--flush-seconds",
        type=float,
        default=Settings().shadow_flush_seconds,
        help="RISKWIRE_SHADOW_FLUSH_SECONDS of every server (default %(default)s, the "
        "setting's default; the test profile's is 0.5)",
    )
    parser.add_argument("--no-rate-10", action="store_true", help="skip the 10%% variant")
    # keep_logs: h2load's request log is read here (requests and the measured window)
    args = loadgen.parse_round_arguments(parser, argv, keep_logs=True)
    args.variants = [v for v in VARIANTS if not (v == "rate_10" and args.no_rate_10)]
    return args


def shadow_dir(out: Path, tag: str) -> Path:
    """Where the server of run ``tag`` writes its prediction log and review queue."""
    return out / "shadow" / tag


def server_process(
    variant: str, round_index: int, models: Path, args: argparse.Namespace, out: Path
) -> loadgen.ServerProcess:
    """One riskwire server with prediction log and review queue ``variant`` (not started)."""
    port = loadgen.free_port()
    tag = f"{variant}-r{round_index + 1}"
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_SETTINGS)}
    env |= {
        "RISKWIRE_SHADOW_DIR": str(shadow_dir(out, tag)),
        "RISKWIRE_SHADOW_FLUSH_SECONDS": str(args.flush_seconds),
        "RISKWIRE_STATE_SNAPSHOT": str(out / "state" / f"cards-{tag}.snapshot"),  # fresh
        "RISKWIRE_ADMIN_PORT": "0",
        "RISKWIRE_METRICS_PORT": "0",
    }
    rate, review = VARIANTS[variant]
    if rate is not None:
        env["RISKWIRE_PREDICTION_LOG_RATE"] = rate
    if review is not None:
        env["RISKWIRE_REVIEW_QUEUE"] = review
    return loadgen.ServerProcess(
        variant, command, f"127.0.0.1:{port}", out / f"riskwire-{tag}.log", env
    )


def count_logged(directory: Path, window: tuple[int, int] | None) -> tuple[int, int, int]:
    """(prediction-log rows, rows stamped inside ``window`` (epoch ns), review cases)
    written under the shadow ``directory``."""
    from riskwire.server.review import ReviewQueue, queue_path
    from riskwire.shadow.records import read_predictions

    rows = read_predictions(directory).num_rows
    in_window = 0
    if rows and window is not None:
        since, until = (datetime.fromtimestamp(ns / 1e9, UTC) for ns in window)
        # the column is in ms: the last request's answer may be stamped in the window's ms
        until = until.replace(microsecond=until.microsecond // 1000 * 1000 + 1000)
        in_window = read_predictions(directory, since=since, until=until).num_rows
    cases = 0
    if queue_path(directory).exists():
        queue = ReviewQueue(queue_path(directory))
        try:
            cases = queue.stats()["total"]
        finally:
            queue.close()
    return rows, in_window, cases


def measure(
    h2load: str,
    variant: str,
    round_index: int,
    models: Path,
    bodies: loadgen.Bodies,
    args: argparse.Namespace,
    out: Path,
) -> tuple:
    """Start a server with ``variant``, measure unary Score, stop it, count what it logged.

    Returns the h2load point and the record of the run.
    """
    server = server_process(variant, round_index, models, args, out)
    with server.serving(args.workers):  # the workers write what their logs hold on SIGTERM
        point = score_point(h2load, server, bodies, args, out, round_index)
    tag = f"{variant}-r{round_index + 1}"
    requests, window = take_h2load_log(out, variant, tag, args)
    rows, in_window, cases = count_logged(shadow_dir(out, tag), window)
    record = {"requests": requests, "rows": rows, "rows_measured": in_window, "cases": cases}
    print(
        f"round {round_index + 1} {variant:>8}: Score {point.rps or 0:,.0f} rps, "
        f"p50 {point.p50_ms or 0:.2f} ms, p99 {point.p99_ms or 0:.2f} ms; {requests:,} "
        f"requests, {rows:,} rows logged ({in_window:,} in the measured window), "
        f"{cases:,} review cases; errors {point.errors}",
        flush=True,
    )
    return point, record


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure the variants in rotated rounds; returns the summary."""
    h2load = loadgen.require_h2load("bench_prediction_log")
    models = mirror_models(ensure_models(args.models), out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    bodies = loadgen.prepare_bodies(out, batch_rows=1)
    names = args.variants
    points: dict[str, list] = {variant: [] for variant in names}
    records: dict[str, list] = {variant: [] for variant in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for variant in names[shift:] + names[:shift]:
            point, record = measure(h2load, variant, round_index, models, bodies, args, out)
            points[variant].append(point)
            records[variant].append(record)
    return summarise(points, records, args)


def log_problems(records: dict[str, list]) -> list[str]:
    """What the logs say went wrong: rows or cases when off, a sample far from its rate
    (at 100%: a measured call not logged)."""
    from riskwire.server.config import Settings

    problems = []
    for index, record in enumerate(records["baseline"]):
        if record["rows"] or record["cases"]:
            problems.append(
                f"baseline round {index + 1}: {record['rows']} rows, {record['cases']} cases"
            )
    rates = {"default": Settings().prediction_log_rate / 100.0, "rate_10": 0.10}
    for variant, rate in rates.items():
        for index, record in enumerate(records.get(variant, [])):
            requests, measured = record["requests"], record["rows_measured"]
            if not record["rows"]:
                problems.append(f"{variant} round {index + 1}: no rows logged")
            elif rate >= 1.0 and requests and measured < COVERAGE_MIN * requests:
                problems.append(
                    f"{variant} round {index + 1}: {measured:,} rows in the measured window "
                    f"for {requests:,} requests"
                )
            elif rate < 1.0 and requests >= SAMPLE_MIN_REQUESTS:
                fraction = measured / requests
                if not SAMPLE_BAND[0] * rate <= fraction <= SAMPLE_BAND[1] * rate:
                    problems.append(
                        f"{variant} round {index + 1}: {fraction:.1%} of calls logged at a "
                        f"{rate:.0%} rate"
                    )
    return problems


def summarise(points: dict[str, list], records: dict[str, list], args: argparse.Namespace) -> dict:
    """Medians per variant, costs per round and their medians, row counts, the config."""
    from riskwire.server.config import Settings

    def fraction(row: dict) -> float | None:
        return row["rows_measured"] / row["requests"] if row["requests"] else None

    by_variant = {}
    for variant in points:
        row = {
            "rps": loadgen.median_present([p.rps for p in points[variant]]),
            "p50_ms": loadgen.median_present([p.p50_ms for p in points[variant]]),
            "p99_ms": loadgen.median_present([p.p99_ms for p in points[variant]]),
            "errors": sum(p.errors for p in points[variant]),
            **{key: sum(r[key] for r in records[variant]) for key in records[variant][0]},
        }
        row["logged_fraction"] = fraction(row)
        by_variant[variant] = row
    per_round: dict[str, list[float]] = {}
    for variant in ("default", "rate_10"):
        if variant in points:
            per_round[f"cost_{variant}"] = _costs(points, variant, "rps", base="baseline")
            per_round[f"p99_cost_{variant}"] = _costs(points, variant, "p99_ms", base="baseline")
    medians = {key: loadgen.median_cost(values) for key, values in per_round.items()}
    medians.setdefault("cost_rate_10", None)
    medians.setdefault("p99_cost_rate_10", None)
    flat = {
        f"{key}_{variant}": by_variant[variant][key]
        for variant in by_variant
        for key in ("rps", "p50_ms", "p99_ms")
    }
    default = by_variant["default"]
    cost = medians["cost_default"]
    settings = Settings()
    return {
        **medians,
        **flat,
        "rows_logged": default["rows"],
        "rows_logged_measured": default["rows_measured"],
        "requests_default": default["requests"],
        "review_cases_default": default["cases"],
        "logged_fraction_default": default["logged_fraction"],
        "logged_fraction_rate_10": by_variant.get("rate_10", {}).get("logged_fraction"),
        "per_round": per_round,
        "by_variant": by_variant,
        "per_run": records,
        "errors": sum(row["errors"] for row in by_variant.values()),
        "problems": log_problems(records),
        "targets": TARGETS,
        "meets_target": None if cost is None else cost <= TARGETS["cost_default_max"],
        "config": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "profile": "test",
            "shadow_flush_seconds": args.flush_seconds,
            "variants": {
                "baseline": "prediction_log_rate=0, review_queue=false",
                "default": f"prediction_log_rate={settings.prediction_log_rate:g} (default), "
                f"review_queue={str(settings.review_queue).lower()} at "
                f"{settings.review_sample_percent:g}% (default)",
                "rate_10": "prediction_log_rate=10, review queue at its default",
            },
            "tool": "h2load unary Score, one card",
            "machine": loadgen.machine_info(args.workers, settings.threads_per_worker),
        },
    }


def print_report(summary: dict) -> None:
    """The table, the costs against the target and the row checks."""
    num, pct = loadgen.format_number, loadgen.format_change
    print(
        f"\n{'variant':>8} {'Score rps':>10} {'p50 ms':>7} {'p99 ms':>7} {'requests':>9} "
        f"{'rows':>9} {'logged':>7} {'cases':>6} {'errors':>7}"
    )
    for variant, row in summary["by_variant"].items():
        print(
            f"{variant:>8} {num(row['rps'], ',.0f'):>10} {num(row['p50_ms'], '.2f'):>7} "
            f"{num(row['p99_ms'], '.2f'):>7} {row['requests']:>9,} {row['rows']:>9,} "
            f"{num(row['logged_fraction'], '.1%'):>7} {row['cases']:>6,} {row['errors']:>7}"
        )
    rounds = len(summary["per_round"]["cost_default"])
    print(f"\ncost vs baseline (log and review queue off; median of {rounds} rounds):")
    for variant in ("default", "rate_10"):
        key = f"cost_{variant}"
        if key not in summary["per_round"]:
            continue
        cost = summary[key]
        per_round = ", ".join(pct(-c) for c in summary["per_round"][key])
        verdict = f"cost {num(cost, '.1%')}"
        if variant == "default":
            met = {True: "ok", False: "MISSED", None: "-"}[summary["meets_target"]]
            verdict += f", target <= {TARGETS['cost_default_max']:.0%}: {met}"
        print(
            f"  {variant:>8}: throughput {pct(None if cost is None else -cost)} ({verdict}; "
            f"per round {per_round}), p99 {pct(summary[f'p99_cost_{variant}'])}"
        )
    print(
        f"rows: default {summary['rows_logged']:,} logged ({summary['rows_logged_measured']:,} "
        f"for {summary['requests_default']:,} measured requests), "
        f"{summary['review_cases_default']:,} review cases"
    )
    for problem in summary["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"request errors {summary['errors']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 1 when a request failed or a row check did not hold."""
    summary = loadgen.run_bench("bench_prediction_log", parse_args(argv), run, print_report)
    return 1 if summary["errors"] or summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
