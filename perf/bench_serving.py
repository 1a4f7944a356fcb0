"""riskwire vs a bare grpcio echo server, side by side in one run (the Python ceiling).

Both servers run at once with the same worker count, thread pool, SO_REUSEPORT port
sharing, per-core pinning and spawn-started workers (see ``perf/echo_server.py``). At
each concurrency the echo and then riskwire are driven by the same tool and body:

* h2load, unary ``Score`` (one pre-encoded request body; its card's history grows);
* perf_analyzer, ``ModelInfer`` single row (cycling through 64 distinct transactions);
* h2load, ``ScoreBatch`` of 256 rows (a pre-encoded body) → rows/s.

Every body is first checked with a real gRPC call (h2load counts any HTTP 200 as a
success, whatever the gRPC status), and after every run each server's health and that
call are checked again; failures are printed and counted. On these 2-core machines the
load generator (h2load with one thread, perf_analyzer) competes with the servers for
CPU: absolute numbers are noise, the ratio ours/echo is the result.

    python perf/bench_serving.py [--models DIR] [--workers N] [--duration S]
        [--concurrency 1,8,32] [--smoke] [--json] [--out DIR]

With ``--json`` the last line printed is one JSON object (see ``KEY_NOTES``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.loadgen import MODEL_INFER, SCORE, SCORE_BATCH, Bodies, check_call  # noqa: E402

SERVERS = ("echo", "riskwire")
TARGETS = {"rps_ratio_vs_echo_min": 0.8, "p99_ms_c8_max": 2.0, "batch_rows_per_s_min": 200_000}
KEY_NOTES = {
    "rps_ratio_vs_echo": "riskwire RPS / echo RPS, unary Score with h2load at concurrency "
    "rps_ratio_vs_echo_concurrency (8 when measured)",
    "rps_ratio_vs_echo_by_concurrency": "the same ratio for each tool/method and concurrency",
    "p99_ms_c8": "riskwire p99 latency (ms) of unary Score with h2load at concurrency 8",
    "batch_rows_per_s": "riskwire ScoreBatch rows/s (256-row bodies, h2load)",
}
_DEFAULT_CACHE = REPO / "perf" / "results" / "cache"


@dataclass
class Point:
    """One measurement: a server, a tool, a method, a concurrency."""

    server: str
    tool: str
    method: str
    concurrency: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    errors: int = 0
    rows_per_s: float | None = None
    repeat: int = 0
    notes: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--smoke`` shrinks durations and concurrencies)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, help="models dir holding a 'fraud' package")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--threads", type=int, default=None, help="gRPC threads per worker")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated list")
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="1.5 s points at concurrency 1,8")
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--out", type=Path, help="raw results directory")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point (median kept)")
    parser.add_argument("--keep-logs", action="store_true", help="keep h2load request logs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.concurrency = min(args.duration, 1.5), "1,8"
    if args.warmup is None:
        args.warmup = 0.5 if args.smoke else min(2.0, args.duration / 4)
    if args.threads is None:
        from riskwire.server.config import Settings

        args.threads = Settings().threads_per_worker
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def ensure_models(models: Path | None) -> Path:
    """The models dir to serve: the given one, or a demo model built once and cached."""
    if models is not None:
        if not (models / "fraud").is_dir():
            raise SystemExit(f"bench_serving: {models} has no 'fraud' model package")
        return models
    cached = _DEFAULT_CACHE / "models"
    cli = [sys.executable, "-m", "riskwire.clients.cli"]
    versions = sorted((cached / "fraud").glob("*"))
    verify = [*cli, "package", "verify", str(versions[-1])] if versions else None
    if verify and subprocess.run(verify, capture_output=True).returncode == 0:
        return cached
    shutil.rmtree(cached, ignore_errors=True)  # absent, or stale after a format change
    _DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
    data = _DEFAULT_CACHE / "tx.parquet"
    print(f"building a demo model into {cached} (cached for later runs) ...", flush=True)
    subprocess.run([*cli, "data", "synth", "--rows", "200000", "--out", str(data)], check=True)
    subprocess.run([*cli, "build", "--data", str(data), "--models", str(cached)], check=True)
    return cached


def server_processes(
    args: argparse.Namespace, models: Path, out: Path, state: Path
) -> dict[str, loadgen.ServerProcess]:
    """Both servers, not started: same workers, threads, pinning and SO_REUSEPORT sharing."""
    ports = {name: loadgen.free_port() for name in SERVERS}
    workers = ["--workers", str(args.workers)]
    echo = [sys.executable, str(REPO / "perf" / "echo_server.py"), "--port", str(ports["echo"])]
    echo += [*workers, "--threads", str(args.threads), "--batch-rows", str(args.batch_rows)]
    ours = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(models)]
    ours += ["--port", str(ports["riskwire"]), *workers, "--profile", "test"]
    env = {
        **os.environ,
        "RISKWIRE_THREADS_PER_WORKER": str(args.threads),
        "RISKWIRE_STATE_SNAPSHOT": str(state / "cards.snapshot"),  # fresh; models untouched
        "RISKWIRE_SHADOW_DIR": str(state / "shadow"),  # prediction log: fresh per run
        # Any free ports: never clash with a running server.
        "RISKWIRE_ADMIN_PORT": "0",
        "RISKWIRE_METRICS_PORT": "0",
    }
    return {
        name: loadgen.ServerProcess(
            name, command, f"127.0.0.1:{ports[name]}", out / f"{name}.log", env
        )
        for name, command in (("echo", echo), ("riskwire", ours))
    }


def start_servers(servers: dict[str, loadgen.ServerProcess], workers: int) -> None:
    """Start both servers and wait until every worker of each one serves."""
    for server in servers.values():
        server.start()
    for server in servers.values():
        server.wait_serving(workers)


def _fail(point: Point, message: str, count: int = 1) -> Point:
    """Count and print an error of a measurement."""
    point.errors += count
    point.notes = "; ".join(filter(None, [point.notes, message]))
    print(f"ERROR {point.server} {point.tool} {point.method} c={point.concurrency}: {message}")
    return point


def after_run(server: loadgen.ServerProcess, path: str, bodies: Bodies, point: Point) -> None:
    """Health and a real call after a run; problems are printed and counted."""
    if not loadgen.health_ok(server.target):
        _fail(point, "health check failed")
    problem = check_call(server.target, path, bodies)
    if problem:
        _fail(point, problem)


def score_point(
    h2load: str, server: loadgen.ServerProcess, bodies: Bodies, args: argparse.Namespace,
    out: Path, round_index: int,
) -> Point:  # fmt: skip
    """One measured h2load run of unary Score at ``args.concurrency``, then the server's
    health and a real call checked (the side-by-side benches' common measurement)."""
    point = h2load_point(h2load, server, SCORE, bodies, args.concurrency, args, out)
    point.repeat = round_index
    after_run(server, SCORE, bodies, point)
    return point


def h2load_point(h2load: str, server: loadgen.ServerProcess, path: str, bodies: Bodies,
                 concurrency: int, args: argparse.Namespace, out: Path,
                 rps_per_client: int | None = None) -> Point:  # fmt: skip
    """A warm-up run, then the measured h2load run; percentiles from its per-request log.

    h2load counts a gRPC error as a success (HTTP 200), but an error response carries no
    DATA: received data bytes under 90% of ``requests x`` the size of a successful
    response (taken right after the warm-up) mean that calls failed.
    """
    method = path.rsplit("/", 1)[1]
    point = Point(server.name, "h2load", method, concurrency)
    body = bodies.batch if path == SCORE_BATCH else bodies.score
    log_file = out / f"h2load-{server.name}-{method}-c{concurrency}.log"
    url = f"http://{server.target}{path}"
    timeout = args.duration * 3 + 60
    for seconds in (args.warmup, args.duration):
        command = loadgen.h2load_command(
            h2load, url, body, concurrency, seconds, 0, log_file, rps_per_client
        )
        if seconds == args.duration:
            log_file.unlink(missing_ok=True)  # h2load appends: drop the warm-up's requests
            try:
                ok_size = len(loadgen.unary_raw(server.target, path, bodies.messages[path])) + 5
            except grpc.RpcError as exc:
                return _fail(point, f"not run: the call fails ({exc.code().name})")
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    try:
        summary = loadgen.parse_h2load_output(done.stdout)
    except ValueError as exc:
        return _fail(point, f"{exc}: {done.stderr.strip()[-300:]}")
    latencies, bad = loadgen.parse_h2load_log(log_file.read_text() if log_file.exists() else "")
    if not args.keep_logs:
        log_file.unlink(missing_ok=True)
    point.rps, point.errors = summary.rps, summary.errors
    point.p50_ms, point.p99_ms, point.p999_ms = (
        loadgen.percentile(latencies, q) for q in (50, 99, 99.9)
    )
    if summary.errors:
        point.notes = f"{summary.errors} requests without HTTP 200 ({bad} in the log)"
    failed = loadgen.failed_grpc_calls(summary, ok_size)
    if failed:
        _fail(point, f"~{failed} of {summary.total} calls got a gRPC error", failed)
    return point


def perf_analyzer_point(
    tool: str,
    server: loadgen.ServerProcess,
    concurrency: int,
    bodies: Bodies,
    args: argparse.Namespace,
    out: Path,
) -> Point:
    """One perf_analyzer run on ModelInfer (three stable windows spanning ~duration)."""
    point = Point(server.name, "perf_analyzer", "ModelInfer", concurrency)
    csv_path = out / f"perf_analyzer-{server.name}-c{concurrency}.csv"
    window_ms = max(300, int(args.duration * 1000 / 3))
    command = loadgen.perf_analyzer_command(
        tool, server.target, "fraud", concurrency, bodies.pa_input, window_ms, csv_path,
        stability_pct=100 if args.smoke else 25,  # smoke checks the plumbing, not stability
    )  # fmt: skip
    env, timeout = loadgen.perf_analyzer_env(), window_ms * 8 / 1000 + 60
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        output = done.stdout + done.stderr
        (out / f"perf_analyzer-{server.name}-c{concurrency}.txt").write_text(output)
        rows = loadgen.parse_perf_analyzer_csv(csv_path.read_text()) if done.returncode == 0 else []
    except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
        output, rows = str(exc), []
    if not rows:
        return _fail(point, "perf_analyzer failed: " + " | ".join(output.strip().splitlines()[-2:]))
    row = rows[0]
    point.rps, point.p50_ms, point.p99_ms = row.rps, row.p50_ms, row.p99_ms
    point.notes = "p99.9 not reported by perf_analyzer"
    return point


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _key(p: Point) -> tuple[str, str, str, int]:
    return p.server, p.tool, p.method, p.concurrency


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratios(points: list[Point]) -> dict[str, dict[str, float | None]]:
    """riskwire/echo RPS per ``tool method`` and concurrency (median of paired runs)."""
    index = {(p.server, p.tool, p.method, p.concurrency, p.repeat): p for p in points}
    paired: dict[str, dict[str, list[float]]] = {}
    for (server, tool, method, c, rep), ours in index.items():
        echo = index.get(("echo", tool, method, c, rep))
        if server == "riskwire" and echo is not None:
            cell = paired.setdefault(f"{tool} {method}", {}).setdefault(str(c), [])
            valid = ours.rps and echo.rps and not ours.errors and not echo.errors
            cell += [ours.rps / echo.rps] if valid else []  # a failed run is no result
    return {key: {c: _median(v) for c, v in cells.items()} for key, cells in paired.items()}


def _row(p: Point) -> str:
    return (
        f"{p.server:<9} {p.tool:<14} {p.method:<10} {p.concurrency:>5} {_fmt(p.rps, 0):>10} "
        f"{_fmt(p.p50_ms):>8} {_fmt(p.p99_ms):>8} {_fmt(p.p999_ms):>9} {p.errors:>7} "
        f"{_fmt(p.rows_per_s, 0):>10}"
    )


def print_report(points: list[Point], summary: dict) -> None:
    """The human-readable table, the ratios and the targets."""
    print(f"\nmachine: {json.dumps(summary['machine'])}")
    head = "server    tool           method      conc        RPS   p50 ms   p99 ms  p99.9 ms"
    print(f"\n{head}  errors     rows/s")
    for p in points:
        print(_row(p))
    print("\nratio riskwire/echo (RPS, median over repeats):")
    for key, values in summary["rps_ratio_vs_echo_by_concurrency"].items():
        cells = ", ".join(f"c={c}: {_fmt(r, 3)}" for c, r in values.items())
        print(f"  {key:<26} {cells}")
    print(f"\ntargets {TARGETS}:")
    for key, met in summary["meets_targets"].items():
        print(f"  {key:<20} {_fmt(summary[key], 3):>12}  {'-' if met is None else met}")


def summarise(
    args: argparse.Namespace, points: list[Point], machine: dict, skipped: list[str], out: Path
) -> dict:
    """The JSON summary (the ``--json`` last line and ``results.json``)."""
    by_c = ratios(points)
    score = by_c.get("h2load Score", {})
    ratio_c = 8 if "8" in score else (max(int(c) for c in score) if score else None)

    def pick(server: str, tool: str, method: str, c: int, field: str) -> float | None:
        key = (server, tool, method, c)
        found = [getattr(p, field) for p in points if not p.errors and key == _key(p)]
        return _median([v for v in found if v is not None])

    summary = {
        "rps_ratio_vs_echo": score.get(str(ratio_c)) if ratio_c else None,
        "rps_ratio_vs_echo_concurrency": ratio_c,
        "rps_ratio_vs_echo_by_concurrency": by_c,
        "p99_ms_c8": pick("riskwire", "h2load", "Score", 8, "p99_ms"),
        "p99_ms_c8_model_infer": pick("riskwire", "perf_analyzer", "ModelInfer", 8, "p99_ms"),
        "batch_rows_per_s": pick(
            "riskwire", "h2load", "ScoreBatch", args.batch_concurrency, "rows_per_s"
        ),
        "batch_rows_per_s_echo": pick(
            "echo", "h2load", "ScoreBatch", args.batch_concurrency, "rows_per_s"
        ),
        "batch_rows": args.batch_rows,
        "batch_concurrency": args.batch_concurrency,
        "duration_s": args.duration,
        "repeat": args.repeat,
        "errors": sum(p.errors for p in points),
        "skipped": skipped,
        "targets": TARGETS,
        "machine": machine,
        "out_dir": str(out),
        "key_notes": KEY_NOTES,
        "points": [asdict(p) for p in points],
    }
    for key in ("rps_ratio_vs_echo", "p99_ms_c8", "batch_rows_per_s"):
        value = summary[key]
        if isinstance(value, float) and not math.isfinite(value):
            summary[key] = None
    ratio, p99, rows = (summary[k] for k in ("rps_ratio_vs_echo", "p99_ms_c8", "batch_rows_per_s"))
    summary["meets_targets"] = {  # null: not measured
        "rps_ratio_vs_echo": None if ratio is None else ratio >= TARGETS["rps_ratio_vs_echo_min"],
        "p99_ms_c8": None if p99 is None else p99 <= TARGETS["p99_ms_c8_max"],
        "batch_rows_per_s": None if rows is None else rows >= TARGETS["batch_rows_per_s_min"],
    }
    return summary


def run(args: argparse.Namespace, out: Path) -> dict:
    """Start both servers, measure every point, always tear the servers down."""
    skipped: list[str] = []
    tools = {}
    for name in ("h2load", "perf_analyzer"):
        problem = loadgen.tool_problem(name)
        if problem:
            print(f"SKIP {problem}", flush=True)
            skipped.append(problem)
        else:
            tools[name] = loadgen.find_tool(name)
    models = ensure_models(args.models)
    bodies = loadgen.prepare_bodies(out, args.batch_rows)
    machine = loadgen.machine_info(args.workers, args.threads)
    points: list[Point] = []
    state = tempfile.TemporaryDirectory(prefix="bench-serving-state-")
    servers = server_processes(args, models, out, Path(state.name))
    try:
        start_servers(servers, args.workers)
        for server in servers.values():  # the bodies must really succeed, not just HTTP 200
            for path in (SCORE, SCORE_BATCH, MODEL_INFER):
                problem = check_call(server.target, path, bodies)
                if problem:
                    raise SystemExit(f"bench_serving: {server.name} {path}: {problem}")
        plan = []
        if "h2load" in tools:
            plan += [("h2load", SCORE, c) for c in args.levels]
        if "perf_analyzer" in tools:
            plan += [("perf_analyzer", MODEL_INFER, c) for c in args.levels]
        if "h2load" in tools:
            plan.append(("h2load", SCORE_BATCH, args.batch_concurrency))
        for repeat, (tool, path, c) in itertools.product(range(args.repeat), plan):
            order = list(servers.values())[:: -1 if repeat % 2 else 1]  # alternate who goes first
            for server in order:
                if tool == "h2load":
                    point = h2load_point(tools[tool], server, path, bodies, c, args, out)
                    if path == SCORE_BATCH and point.rps:
                        point.rows_per_s = point.rps * args.batch_rows
                else:
                    point = perf_analyzer_point(tools[tool], server, c, bodies, args, out)
                point.repeat = repeat
                after_run(server, path, bodies, point)
                points.append(point)
                print(f"  {_row(point)}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        state.cleanup()
    summary = summarise(args, points, machine, skipped, out)
    print_report(points, summary)
    loadgen.write_json(out / "results.json", summary)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Point.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 1 when any error was counted, else 0."""
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "perf" / "results" / f"bench_serving-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    summary = run(args, out)
    print(f"\nraw results in {out}", flush=True)
    if args.json:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
