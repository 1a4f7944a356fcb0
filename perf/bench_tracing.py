"""What tracing costs: serving RPS and p99 with tracing off, default sampling, 100% sampling.

Server spans are built by the request-log thread off the hot path (``server/tracing.py``);
the settings are start-up settings of ``riskwire serve`` (``RISKWIRE_TRACING_*``), so
each measurement gets its own server, in four modes:

* ``bare``: tracing and metrics off (no call recorder at all): the base of the metrics
  cost ``throughput_cost_metrics`` = ``1 - rps(off)/rps(bare)``;
* ``off``: ``RISKWIRE_TRACING_EXPORTER=""`` (metrics on, as by default): the base of the
  tracing costs;
* ``default``: the ``jsonl`` exporter at the default sampling (``tracing_sample_ratio``,
  plus every error, slow call and sampled parent);
* ``full``: the ``jsonl`` exporter with ``RISKWIRE_TRACING_SAMPLE_RATIO=1.0`` (every call).

In rounds, the order rotated per round (bare, off, default, full; then off, default,
full, bare; …) so drift on the machine hits all four alike. Every server has ``--workers`` workers,
the ``test`` profile, its own free data and admin ports, a fresh card-state snapshot, a
mirror of the models directory (symlinks) and its own span directory, all in the output
directory. On each, h2load sends unary ``Score`` at ``--concurrency`` connections, as fast
as answered (RPS, p50, p99). After each run the jsonl span files are counted: after
``full`` the ``Score`` spans started inside the measured window must match the requests
h2load sent in it (every call traced); after ``off`` there must be no span file.

Costs are medians over rounds of ``1 - rps(mode)/rps(off)`` and ``p99(mode)/p99(off) - 1``.
Targets: default sampling <= 5% throughput cost, 100% sampling <= 20%.

    python perf/bench_tracing.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``throughput_cost_default`` and ``throughput_cost_full`` (fractions), ``p99_cost_default``,
``p99_cost_full``, ``requests_full`` and ``spans_full``. Exit status 1 when a request
failed or a span check did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.bench_serving import ensure_models, score_point  # noqa: E402
from perf.bench_validation import mirror_models  # noqa: E402

# RISKWIRE_TRACING_EXPORTER, RISKWIRE_TRACING_SAMPLE_RATIO (None: the default) per mode
MODES: dict[str, tuple[str, str | None]] = {
    "bare": ("", None),  # also metrics off: no call recorder at all
    "off": ("", None),
    "default": ("jsonl", None),
    "full": ("jsonl", "1.0"),
}
TARGETS = {"throughput_cost_default_max": 0.05, "throughput_cost_full_max": 0.20}
COVERAGE_MIN = 0.99  # full: Score spans in the measured window / requests h2load sent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = loadgen.round_arguments(__doc__.split("\n")[0], "bare/off/default/full rounds")
    # keep_logs: h2load's request log is read here (requests and the measured window)
    return loadgen.parse_round_arguments(parser, argv, keep_logs=True)


def trace_dir(out: Path, tag: str) -> Path:
    """Where the server of run ``tag`` writes its span files."""
    return out / "traces" / tag


def server_process(
    mode: str, round_index: int, models: Path, args: argparse.Namespace, out: Path
) -> loadgen.ServerProcess:
    """One riskwire server with tracing ``mode`` (not started)."""
    port, admin_port = loadgen.free_port(), loadgen.free_port()
    tag = f"{mode}-r{round_index + 1}"
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    exporter, ratio = MODES[mode]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_TRACING_")}
    env |= {
        "RISKWIRE_TRACING_EXPORTER": exporter,
        "RISKWIRE_TRACING_DIR": str(trace_dir(out, tag)),
        "RISKWIRE_STATE_SNAPSHOT": str(out / "state" / f"cards-{tag}.snapshot"),  # fresh
        "RISKWIRE_ADMIN_PORT": str(admin_port),
        "RISKWIRE_METRICS_PORT": "0",
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
    }
    if ratio is not None:
        env["RISKWIRE_TRACING_SAMPLE_RATIO"] = ratio
    env["RISKWIRE_METRICS"] = "false" if mode == "bare" else "true"
    return loadgen.ServerProcess(
        mode, command, f"127.0.0.1:{port}", out / f"riskwire-{tag}.log", env
    )


def read_requests(log_file: Path) -> tuple[int, tuple[int, int] | None]:
    """(requests, measured window in epoch ns) from an h2load ``--log-file``.

    Each line is ``start_us <TAB> status <TAB> response_time_us`` (start since the epoch);
    the window runs from the first start to the last end.
    """
    count, first, last = 0, None, None
    text = log_file.read_text() if log_file.exists() else ""
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        start, took = int(parts[0]), int(parts[2])
        count += 1
        first = start if first is None else min(first, start)
        last = start + took if last is None else max(last, start + took)
    if first is None or last is None:
        return count, None
    return count, (first * 1000, last * 1000)


def take_h2load_log(
    out: Path, name: str, tag: str, args: argparse.Namespace
) -> tuple[int, tuple[int, int] | None]:
    """:func:`read_requests` of the Score run just measured on server ``name``; its log is
    then kept as ``h2load-<tag>-…`` with ``--out``, deleted otherwise."""
    log_file = out / f"h2load-{name}-Score-c{args.concurrency}.log"
    requests, window = read_requests(log_file)
    if args.out:
        log_file.replace(out / f"h2load-{tag}-Score-c{args.concurrency}.log")
    else:
        log_file.unlink(missing_ok=True)
    return requests, window


def count_spans(directory: Path, window: tuple[int, int] | None) -> tuple[int, int, int]:
    """(span files, spans, ``Score`` spans started inside ``window``) under ``directory``."""
    files = sorted(directory.glob("spans-*.jsonl")) if directory.is_dir() else []
    spans = in_window = 0
    for path in files:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            spans += 1
            span = json.loads(line)
            if window is None or span.get("attributes", {}).get("rpc.method") != "Score":
                continue
            if window[0] <= span.get("start_time_unix_nano", -1) <= window[1]:
                in_window += 1
    return len(files), spans, in_window


def measure(
    h2load: str,
    mode: str,
    round_index: int,
    models: Path,
    bodies: loadgen.Bodies,
    args: argparse.Namespace,
    out: Path,
) -> tuple:
    """Start a server in ``mode``, measure unary Score, stop it, count its spans.

    Returns the h2load point and the span record of the run.
    """
    server = server_process(mode, round_index, models, args, out)
    with server.serving(args.workers):  # the workers flush their spans on SIGTERM
        point = score_point(h2load, server, bodies, args, out, round_index)
    tag = f"{mode}-r{round_index + 1}"
    requests, window = take_h2load_log(out, mode, tag, args)
    files, spans, in_window = count_spans(trace_dir(out, tag), window)
    stray, stray_spans, _ = count_spans(models / ".traces", None)  # the default span dir
    record = {
        "requests": requests,
        "span_files": files + stray,
        "spans": spans + stray_spans,
        "spans_measured": in_window,
    }
    print(
        f"round {round_index + 1} tracing {mode:>7}: Score {point.rps or 0:,.0f} rps, "
        f"p50 {point.p50_ms or 0:.2f} ms, p99 {point.p99_ms or 0:.2f} ms; "
        f"{requests:,} requests, {spans + stray_spans:,} spans ({in_window:,} in the measured "
        f"window); errors {point.errors}",
        flush=True,
    )
    return point, record


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure the four modes in rotated rounds; returns the summary."""
    h2load = loadgen.require_h2load("bench_tracing")
    models = mirror_models(ensure_models(args.models), out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    bodies = loadgen.prepare_bodies(out, batch_rows=1)
    points: dict[str, list] = {mode: [] for mode in MODES}
    records: dict[str, list] = {mode: [] for mode in MODES}
    names = list(MODES)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for mode in names[shift:] + names[:shift]:
            point, record = measure(h2load, mode, round_index, models, bodies, args, out)
            points[mode].append(point)
            records[mode].append(record)
    return summarise(points, records, args)


def _costs(points: dict[str, list], mode: str, field: str, base: str = "off") -> list[float]:
    """Per round: ``1 - mode/base`` for throughput, ``mode/base - 1`` for latency."""
    costs = []
    for reference, point in zip(points[base], points[mode], strict=True):
        ours, theirs = getattr(point, field), getattr(reference, field)
        if ours and theirs:
            costs.append(ours / theirs - 1 if field.endswith("_ms") else 1 - ours / theirs)
    return costs


def span_problems(records: dict[str, list]) -> list[str]:
    """What the span files say went wrong: spans when off, untraced calls when full."""
    problems = []
    for index, record in enumerate(records["off"]):
        if record["span_files"]:
            problems.append(f"off round {index + 1}: {record['span_files']} span file(s)")
    for index, record in enumerate(records["full"]):
        if not record["spans"]:
            problems.append(f"full round {index + 1}: no spans")
        elif record["requests"] and record["spans_measured"] < COVERAGE_MIN * record["requests"]:
            problems.append(
                f"full round {index + 1}: {record['spans_measured']:,} Score spans in the "
                f"measured window for {record['requests']:,} requests"
            )
    return problems


def summarise(points: dict[str, list], records: dict[str, list], args: argparse.Namespace) -> dict:
    """Medians per mode, costs per round and their medians, span counts, the config."""
    from riskwire.server.config import Settings

    by_mode = {
        mode: {
            "rps": loadgen.median_present([p.rps for p in points[mode]]),
            "p50_ms": loadgen.median_present([p.p50_ms for p in points[mode]]),
            "p99_ms": loadgen.median_present([p.p99_ms for p in points[mode]]),
            "errors": sum(p.errors for p in points[mode]),
            "requests": sum(r["requests"] for r in records[mode]),
            "spans": sum(r["spans"] for r in records[mode]),
            "spans_measured": sum(r["spans_measured"] for r in records[mode]),
            "span_files": sum(r["span_files"] for r in records[mode]),
        }
        for mode in MODES
    }
    per_round = {
        f"{kind}_cost_{mode}": _costs(points, mode, field)
        for mode in ("default", "full")
        for kind, field in (("throughput", "rps"), ("p99", "p99_ms"))
    }
    per_round["throughput_cost_metrics"] = _costs(points, "off", "rps", base="bare")
    medians = {key: loadgen.median_cost(values) for key, values in per_round.items()}
    full, default = by_mode["full"], by_mode["default"]
    problems = span_problems(records)

    def within(key: str) -> bool | None:
        cost = medians[key]
        return None if cost is None else cost <= TARGETS[f"{key}_max"]

    settings = Settings()
    return {
        **medians,
        "per_round": per_round,
        "by_mode": by_mode,
        "requests_full": full["requests"],
        "spans_full": full["spans"],
        "spans_full_measured": full["spans_measured"],
        "trace_coverage_full": (
            full["spans_measured"] / full["requests"] if full["requests"] else None
        ),
        "spans_default": default["spans"],
        "sampled_fraction_default": (
            default["spans_measured"] / default["requests"] if default["requests"] else None
        ),
        "span_files_off": by_mode["off"]["span_files"],
        "per_run": records,
        "errors": sum(row["errors"] for row in by_mode.values()),
        "problems": problems,
        "targets": TARGETS,
        "meets_targets": {
            "default": within("throughput_cost_default"),
            "full": within("throughput_cost_full"),
        },
        "config": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "profile": "test",
            "modes": {
                "bare": "RISKWIRE_TRACING_EXPORTER='' RISKWIRE_METRICS=false",
                "off": "RISKWIRE_TRACING_EXPORTER='' (metrics on, the default)",
                "default": "exporter jsonl, sample ratio "
                f"{settings.tracing_sample_ratio} (default), slow_ms {settings.tracing_slow_ms}",
                "full": f"exporter jsonl, sample ratio 1.0, slow_ms {settings.tracing_slow_ms}",
            },
            "default_sample_ratio": settings.tracing_sample_ratio,
            "tool": "h2load unary Score",
            "machine": loadgen.machine_info(args.workers, settings.threads_per_worker),
        },
    }


def print_report(summary: dict) -> None:
    """The table, the costs against the targets and the span checks."""

    num, pct = loadgen.format_number, loadgen.format_change

    print(
        f"\n{'tracing':>8} {'Score rps':>10} {'p50 ms':>7} {'p99 ms':>7} {'requests':>9} "
        f"{'spans':>8} {'errors':>7}"
    )
    for mode, row in summary["by_mode"].items():
        print(
            f"{mode:>8} {num(row['rps'], ',.0f'):>10} {num(row['p50_ms'], '.2f'):>7} "
            f"{num(row['p99_ms'], '.2f'):>7} {row['requests']:>9,} {row['spans']:>8,} "
            f"{row['errors']:>7}"
        )
    rounds = len(summary["per_round"]["throughput_cost_full"])
    print(f"\ncost vs tracing off (median of {rounds} rounds; requests and spans summed):")
    for mode in ("default", "full"):
        key = f"throughput_cost_{mode}"
        per_round = ", ".join(pct(c) for c in summary["per_round"][key])
        verdict = {True: "ok", False: "MISSED", None: "-"}[summary["meets_targets"][mode]]
        print(
            f"  {mode:>7} sampling: throughput {pct(summary[key])} (target <= "
            f"{TARGETS[key + '_max']:.0%}: {verdict}; per round {per_round}), "
            f"p99 {pct(summary[f'p99_cost_{mode}'])}"
        )
    print(f"  metrics (off vs bare): throughput {pct(summary['throughput_cost_metrics'])}")
    coverage, sampled = summary["trace_coverage_full"], summary["sampled_fraction_default"]
    print(
        f"spans: full {summary['spans_full']:,} in all, {summary['spans_full_measured']:,} "
        f"Score spans for {summary['requests_full']:,} measured requests "
        f"(coverage {num(coverage, '.2%')}); default sampled {num(sampled, '.2%')} of the "
        f"measured requests; off {summary['span_files_off']} span files"
    )
    for problem in summary["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"request errors {summary['errors']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 1 when a request failed or a span check did not hold."""
    summary = loadgen.run_bench("bench_tracing", parse_args(argv), run, print_report)
    return 1 if summary["errors"] or summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
