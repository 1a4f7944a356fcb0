"""What input validation and drift sketches cost: serving RPS with both on vs both off.

Validation (schema, range and category checks against the package's training profile)
and drift monitoring (per-worker sketches, evaluated by the supervisor) are start-up
settings of ``riskwire serve`` (``RISKWIRE_VALIDATION``, ``RISKWIRE_DRIFT``), so each
measurement gets its own server: in rounds, one with both off and one with both on (the
defaults), the order alternating per round (off, on, then on, off) so drift on the
machine hits both alike. Every server has ``--workers`` workers, the ``test`` profile,
its own free data and admin ports and a fresh card-state snapshot, and serves a mirror
of the models directory (symlinks to its packages) so the drift history and alert log
land in the output directory, never in the models. On each server, with h2load:

* unary ``Score`` at ``--concurrency`` connections, as fast as answered (RPS, p99);
* ``ScoreBatch`` of ``--batch-rows`` rows (one validation kernel per batch) → rows/s.

Costs are medians over rounds of ``1 - on/off`` (throughput, rows/s) and
``p99(on)/p99(off) - 1`` (unary Score p99 at saturation). Target: throughput cost <= 5%.

    python perf/bench_validation.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``throughput_cost`` (unary Score, a fraction), ``batch_throughput_cost`` and ``p99_cost``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.bench_serving import after_run, ensure_models, h2load_point  # noqa: E402
from perf.loadgen import SCORE, SCORE_BATCH  # noqa: E402

MODES = {"off": "false", "on": "true"}  # RISKWIRE_VALIDATION and RISKWIRE_DRIFT
TARGETS = {"throughput_cost_max": 0.05}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = loadgen.round_arguments(__doc__.split("\n")[0], "off/on rounds")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per ScoreBatch")
    return loadgen.parse_round_arguments(parser, argv, keep_logs=False)


def mirror_models(models: Path, out: Path) -> Path:
    """A models dir under ``out`` whose packages are symlinks to those of ``models``.

    The server writes its drift history and alert incidents under the models dir; the
    mirror keeps them with the run's output and the real models untouched.
    """
    mirror = out / "models"
    mirror.mkdir(parents=True, exist_ok=True)
    for entry in models.iterdir():
        link = mirror / entry.name
        if entry.is_dir() and not entry.name.startswith(".") and not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=True)
    return mirror


def server_process(
    mode: str, round_index: int, models: Path, args: argparse.Namespace, out: Path
) -> loadgen.ServerProcess:
    """One riskwire server with validation and drift ``mode`` (not started)."""
    port, admin_port = loadgen.free_port(), loadgen.free_port()
    tag = f"{mode}-r{round_index + 1}"
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    env = {
        **os.environ,
        "RISKWIRE_VALIDATION": MODES[mode],
        "RISKWIRE_DRIFT": MODES[mode],
        "RISKWIRE_STATE_SNAPSHOT": str(out / "state" / f"cards-{tag}.snapshot"),  # fresh
        "RISKWIRE_ADMIN_PORT": str(admin_port),
        "RISKWIRE_METRICS_PORT": "0",
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
    }
    return loadgen.ServerProcess(
        mode, command, f"127.0.0.1:{port}", out / f"riskwire-{tag}.log", env
    )


def measure(
    h2load: str,
    mode: str,
    round_index: int,
    models: Path,
    bodies: loadgen.Bodies,
    args: argparse.Namespace,
    out: Path,
) -> tuple:
    """Start a server in ``mode``, measure Score then ScoreBatch, stop it."""
    server = server_process(mode, round_index, models, args, out)
    with server.serving(args.workers):
        points = []
        for path in (SCORE, SCORE_BATCH):
            point = h2load_point(h2load, server, path, bodies, args.concurrency, args, out)
            if path == SCORE_BATCH and point.rps:
                point.rows_per_s = point.rps * args.batch_rows
            point.repeat = round_index
            after_run(server, path, bodies, point)
            points.append(point)
    score, batch = points
    print(
        f"round {round_index + 1} validation+drift {mode:>3}: Score {score.rps or 0:,.0f} rps, "
        f"p99 {score.p99_ms or 0:.2f} ms; ScoreBatch {batch.rows_per_s or 0:,.0f} rows/s, "
        f"p99 {batch.p99_ms or 0:.2f} ms; errors {score.errors + batch.errors}",
        flush=True,
    )
    return score, batch


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure both modes in alternating rounds; returns the summary."""
    h2load = loadgen.require_h2load("bench_validation")
    models = mirror_models(ensure_models(args.models), out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    bodies = loadgen.prepare_bodies(out, batch_rows=args.batch_rows)
    score: dict[str, list] = {mode: [] for mode in MODES}
    batch: dict[str, list] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        order = list(MODES)[:: -1 if round_index % 2 else 1]
        for mode in order:
            s, b = measure(h2load, mode, round_index, models, bodies, args, out)
            score[mode].append(s)
            batch[mode].append(b)
    return summarise(score, batch, args)


def _costs(runs: dict[str, list], field: str) -> list[float]:
    """Per round: ``1 - on/off`` for throughput, ``on/off - 1`` for latency."""
    costs = []
    for off, on in zip(runs["off"], runs["on"], strict=True):
        ours, base = getattr(on, field), getattr(off, field)
        if ours and base:
            costs.append(ours / base - 1 if field.endswith("_ms") else 1 - ours / base)
    return costs


def summarise(score: dict[str, list], batch: dict[str, list], args: argparse.Namespace) -> dict:
    """Medians per mode, costs per round and their medians, errors and the config."""
    from riskwire.server.config import Settings

    by_mode = {
        mode: {
            "rps": loadgen.median_present([p.rps for p in score[mode]]),
            "p50_ms": loadgen.median_present([p.p50_ms for p in score[mode]]),
            "p99_ms": loadgen.median_present([p.p99_ms for p in score[mode]]),
            "batch_rows_per_s": loadgen.median_present([p.rows_per_s for p in batch[mode]]),
            "batch_p99_ms": loadgen.median_present([p.p99_ms for p in batch[mode]]),
            "errors": sum(p.errors for p in score[mode] + batch[mode]),
        }
        for mode in MODES
    }
    per_round = {
        "throughput_cost": _costs(score, "rps"),
        "batch_throughput_cost": _costs(batch, "rows_per_s"),
        "p99_cost": _costs(score, "p99_ms"),
    }
    medians = {key: loadgen.median_cost(values) for key, values in per_round.items()}
    cost = medians["throughput_cost"]
    return {
        **medians,
        "per_round": per_round,
        "by_mode": by_mode,
        "errors": sum(row["errors"] for row in by_mode.values()),
        "targets": TARGETS,
        "meets_target": None if cost is None else cost <= TARGETS["throughput_cost_max"],
        "config": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "batch_rows": args.batch_rows,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "profile": "test",
            "modes": {"off": "validation=false drift=false", "on": "validation=true drift=true"},
            "tool": "h2load unary Score and ScoreBatch",
            "machine": loadgen.machine_info(args.workers, Settings().threads_per_worker),
        },
    }


def print_report(summary: dict) -> None:
    """The table and the costs."""

    num, pct = loadgen.format_number, loadgen.format_change

    print(
        f"\n{'validation+drift':>16} {'Score rps':>10} {'p99 ms':>8} "
        f"{'ScoreBatch rows/s':>18} {'errors':>7}"
    )
    for mode, row in summary["by_mode"].items():
        print(
            f"{mode:>16} {num(row['rps'], ',.0f'):>10} {num(row['p99_ms'], '.2f'):>8} "
            f"{num(row['batch_rows_per_s'], ',.0f'):>18} {row['errors']:>7}"
        )
    rounds = ", ".join(pct(c) for c in summary["per_round"]["throughput_cost"])
    print(
        f"\ncost of validation + drift (median of {len(summary['per_round']['throughput_cost'])}"
        f" rounds): Score throughput {pct(summary['throughput_cost'])} (target <= "
        f"{TARGETS['throughput_cost_max']:.0%}; per round {rounds}), "
        f"ScoreBatch rows/s {pct(summary['batch_throughput_cost'])}, "
        f"Score p99 at saturation {pct(summary['p99_cost'])}"
    )
    print(f"request errors {summary['errors']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 1 when any request failed."""
    summary = loadgen.run_bench("bench_validation", parse_args(argv), run, print_report)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
