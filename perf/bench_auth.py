"""What authentication and throttling cost: serving RPS with both on vs both off.

Authentication and rate limits are start-up settings of ``riskwire serve``, so each
measurement gets its own server: in rounds, one with both off and one with both on, the
order alternating per round so drift on the machine hits both alike:

* ``off``: ``RISKWIRE_AUTH=false``, no rate limits;
* ``on``: ``RISKWIRE_AUTH=true`` with a key file holding the benchmark's key (h2load
  sends ``authorization: Bearer <key>`` on every call), and
  ``RISKWIRE_RATE_LIMITS=default=1000000/1000000``: every call authenticates, checks
  its role and takes a token from the shared bucket, none is refused.

Admission control (the queue-time budget) is at its default in both. Every server has
``--workers`` workers, the ``test`` profile, its own free ports, a fresh card-state
snapshot and a mirror of the models directory. h2load sends unary ``Score`` at
``--concurrency`` connections, as fast as answered (RPS, p50, p99); after each run a
real call with the key checks the server still answers correctly.

Costs are medians over rounds of ``1 - rps(on)/rps(off)`` and ``p99(on)/p99(off) - 1``.
Target: throughput cost <= 5%.

    python perf/bench_auth.py [--models DIR] [--workers N] [--duration S]
        [--concurrency C] [--rounds R] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object holding at least
``throughput_cost`` (a fraction) and ``p99_cost``.
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
from perf.bench_serving import ensure_models, score_point  # noqa: E402
from perf.bench_validation import _costs, mirror_models  # noqa: E402

MODES = ("off", "on")
RATE_LIMITS = "default=1000000/1000000"  # checked on every call, never reached
TARGETS = {"throughput_cost_max": 0.05}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = loadgen.round_arguments(__doc__.split("\n")[0], "off/on rounds")
    return loadgen.parse_round_arguments(parser, argv, keep_logs=False)


def server_process(
    mode: str, round_index: int, models: Path, key_file: Path, args: argparse.Namespace,
    out: Path,
) -> loadgen.ServerProcess:  # fmt: skip
    """One riskwire server with auth and throttling ``mode`` (not started)."""
    port = loadgen.free_port()
    tag = f"{mode}-r{round_index + 1}"
    command = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    command += ["--port", str(port), "--workers", str(args.workers), "--profile", "test"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RISKWIRE_AUTH",
                                                                     "RISKWIRE_RATE"))}  # fmt: skip
    env |= {
        "RISKWIRE_AUTH": "true" if mode == "on" else "false",
        "RISKWIRE_AUTH_KEY_FILE": str(key_file),
        "RISKWIRE_RATE_LIMITS": RATE_LIMITS if mode == "on" else "",
        "RISKWIRE_STATE_SNAPSHOT": str(out / "state" / f"cards-{tag}.snapshot"),  # fresh
        "RISKWIRE_ADMIN_PORT": "0",
        "RISKWIRE_METRICS_PORT": "0",
        "RISKWIRE_SHADOW_DIR": str(out / "shadow"),
    }
    return loadgen.ServerProcess(
        mode, command, f"127.0.0.1:{port}", out / f"riskwire-{tag}.log", env
    )


def measure(
    h2load: str, mode: str, round_index: int, models: Path, key_file: Path,
    bodies: loadgen.Bodies, args: argparse.Namespace, out: Path,
) -> loadgen.Point:  # fmt: skip
    """Start a server in ``mode``, measure unary Score, stop it."""
    server = server_process(mode, round_index, models, key_file, args, out)
    with server.serving(args.workers):
        point = score_point(h2load, server, bodies, args, out, round_index)
    print(
        f"round {round_index + 1} auth+throttling {mode:>3}: Score {point.rps or 0:,.0f} rps, "
        f"p50 {point.p50_ms or 0:.2f} ms, p99 {point.p99_ms or 0:.2f} ms; "
        f"errors {point.errors}",
        flush=True,
    )
    return point


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure both modes in alternating rounds; returns the summary."""
    from riskwire.server.auth import create_key

    h2load = loadgen.require_h2load("bench_auth")
    models = mirror_models(ensure_models(args.models), out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    key_file = out / "keys.json"
    key_file.unlink(missing_ok=True)
    key = create_key(key_file, "bench", "score")
    # Sent in both modes: the "off" server ignores it, so both carry the same bytes.
    loadgen.CALL_METADATA[:] = [("authorization", f"Bearer {key}")]
    bodies = loadgen.prepare_bodies(out, batch_rows=1)
    runs: dict[str, list] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES[:: -1 if round_index % 2 else 1]:
            point = measure(h2load, mode, round_index, models, key_file, bodies, args, out)
            runs[mode].append(point)
    return summarise(runs, args)


def summarise(runs: dict[str, list], args: argparse.Namespace) -> dict:
    """Medians per mode, costs per round and their medians, errors and the config."""
    from riskwire.server.config import Settings

    by_mode = {
        mode: {
            "rps": loadgen.median_present([p.rps for p in runs[mode]]),
            "p50_ms": loadgen.median_present([p.p50_ms for p in runs[mode]]),
            "p99_ms": loadgen.median_present([p.p99_ms for p in runs[mode]]),
            "errors": sum(p.errors for p in runs[mode]),
        }
        for mode in MODES
    }
    per_round = {"throughput_cost": _costs(runs, "rps"), "p99_cost": _costs(runs, "p99_ms")}
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
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "profile": "test",
            "modes": {
                "off": "auth=false, no rate limits",
                "on": f"auth=true (API key), rate_limits={RATE_LIMITS}",
            },  # fmt: skip
            "tool": "h2load unary Score",
            "machine": loadgen.machine_info(args.workers, Settings().threads_per_worker),
        },
    }


def print_report(summary: dict) -> None:
    """Human-readable table of the summary."""
    print("\nauth + throttling   rps        p50 ms   p99 ms   errors")
    for mode, row in summary["by_mode"].items():
        print(
            f"  {mode:<17} {row['rps'] or 0:>9,.0f}  {row['p50_ms'] or 0:>7.2f}  "
            f"{row['p99_ms'] or 0:>7.2f}  {row['errors']:>6}"
        )
    cost, p99 = summary["throughput_cost"], summary["p99_cost"]
    if cost is not None:
        verdict = "met" if summary["meets_target"] else "MISSED"
        print(f"throughput cost {cost:.1%} (target <= 5%: {verdict}); p99 cost {p99 or 0:+.1%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = loadgen.run_bench("bench_auth", args, run, print_report)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
