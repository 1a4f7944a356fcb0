"""Multi-core scaling: riskwire vs the bare grpcio echo server at 1, 2, 4, 8, 14 workers.

For each worker count N both servers get cores 0..N-1 (each worker pinned to its own
core) and h2load, with one thread per remaining core, is pinned to the other cores, so
the load generator never steals a worker's core. Unary ``Score`` with the same body for
both servers; each point runs echo then riskwire. Efficiency is
``rps(N) / (N * rps(1))`` — 1.0 is linear scaling.

Self-contained: it installs nothing and needs no network. ``h2load`` is taken from
``--h2load`` or PATH (its shared libraries may be supplied via LD_LIBRARY_PATH), and a
models directory with a ``fraud`` package must be given (``--models``).

    python perf/scaling.py --models DIR [--workers 1,2,4,8,14] [--duration 8] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402
from perf.loadgen import SCORE  # noqa: E402

_PIN = (
    "import os,sys\ntry: os.sched_setaffinity(0, {cpus})\nexcept OSError: pass\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _try_pin(cpus: list[int]) -> None:
    with contextlib.suppress(OSError):  # some sandboxes refuse affinity: run unpinned
        os.sched_setaffinity(0, set(cpus))


def pinned(command: list[str], cpus: list[int]) -> list[str]:
    """``command`` (a Python command line) run with its CPU affinity set to ``cpus``."""
    return [command[0], "-c", _PIN.format(cpus=set(cpus)), *command[1:]]


def server_commands(
    models: Path, port_echo: int, port_ours: int, workers: int, threads: int
) -> dict[str, list[str]]:
    """The echo and riskwire command lines for ``workers`` workers."""
    python = sys.executable
    echo = [
        python,
        str(REPO / "perf" / "echo_server.py"),
        "--port",
        str(port_echo),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
    ]
    ours = [
        python,
        "-m",
        "riskwire.clients.cli",
        "serve",
        "--models",
        str(models),
        "--port",
        str(port_ours),
        "--workers",
        str(workers),
        "--profile",
        "test",
    ]
    return {"echo": echo, "riskwire": ours}


def run_h2load(
    h2load: str,
    target: str,
    body: Path,
    cpus: list[int],
    connections: int,
    duration_s: float,
    warmup_s: float,
    log: Path,
) -> dict:
    """One h2load run pinned to ``cpus``; RPS and latency percentiles."""
    import subprocess

    threads = max(1, len(cpus))
    connections = max(threads, connections - connections % threads)
    args = loadgen.h2load_command(
        h2load, f"http://{target}{SCORE}", body, connections, duration_s, warmup_s, log
    )
    args[args.index("-t") + 1] = str(threads)
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=duration_s + 120,
        preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)),
    )
    summary = loadgen.parse_h2load_output(done.stdout)
    latencies, bad = loadgen.parse_h2load_log(log.read_text()) if log.exists() else ([], 0)
    return {
        "rps": summary.rps,
        "p50_ms": loadgen.percentile(latencies, 50),
        "p99_ms": loadgen.percentile(latencies, 99),
        "errors": summary.errors + bad,
        "loadgen_threads": threads,
        "connections": connections,
    }


def measure(args: argparse.Namespace, out: Path) -> dict:
    """Every worker count, both servers; returns the results object."""
    from riskwire.server.config import Settings

    cores = sorted(os.sched_getaffinity(0))
    h2load = args.h2load or loadgen.find_tool("h2load")
    if h2load is None:
        raise SystemExit("h2load not found: " + loadgen.INSTALL_HINTS["h2load"])
    bodies = loadgen.prepare_bodies(out, batch_rows=8)
    threads = Settings().threads_per_worker
    points = []
    for workers in args.workers:
        if workers >= len(cores):
            print(f"skipping {workers} workers: only {len(cores)} cores", flush=True)
            continue
        server_cpus, load_cpus = cores[:workers], cores[workers:]
        ports = {"echo": loadgen.free_port(), "riskwire": loadgen.free_port()}
        commands = server_commands(args.models, ports["echo"], ports["riskwire"], workers, threads)
        env = {
            **os.environ,
            "RISKWIRE_STATE_SNAPSHOT": str(out / f"cards-{workers}.snap"),
            "RISKWIRE_SHADOW_DIR": str(out / f"shadow-{workers}"),  # prediction log: fresh
            "RISKWIRE_ADMIN_PORT": "0",
            "RISKWIRE_METRICS_PORT": "0",
        }
        for name in ("echo", "riskwire"):
            target = f"127.0.0.1:{ports[name]}"
            server = loadgen.ServerProcess(
                name,
                pinned(commands[name], server_cpus),
                target,
                out / f"{name}-{workers}.log",
                env,
            )
            server.start()
            try:
                server.wait_ready(rf"serving on \S+:{ports[name]} with {workers} workers", 240)
                problem = loadgen.check_call(target, SCORE, bodies)
                if problem:
                    raise RuntimeError(f"{name}: {problem}")
                result = run_h2load(
                    h2load,
                    target,
                    bodies.score,
                    load_cpus,
                    args.connections_per_worker * workers,
                    args.duration,
                    args.warmup,
                    out / f"h2load-{name}-{workers}.log",
                )
                result["healthy_after"] = loadgen.check_call(target, SCORE, bodies) is None
            finally:
                server.stop()
            points.append({"server": name, "workers": workers, **result})
            print(
                f"{name:>8} workers={workers:>2} rps={result['rps']:>10.0f} "
                f"p50={result['p50_ms'] or float('nan'):.2f}ms "
                f"p99={result['p99_ms'] or float('nan'):.2f}ms errors={result['errors']}",
                flush=True,
            )
    return {
        "machine": loadgen.machine_info(max(args.workers), threads),
        "points": points,
        "efficiency": efficiency(points),
        "duration_s": args.duration,
    }


def efficiency(points: list[dict]) -> dict[str, dict[str, float]]:
    """Per server: rps(N) / (N * rps(smallest N measured, scaled to one worker))."""
    result: dict[str, dict[str, float]] = {}
    for server in ("echo", "riskwire"):
        mine = sorted((p for p in points if p["server"] == server), key=lambda p: p["workers"])
        if not mine:
            continue
        base = mine[0]["rps"] / mine[0]["workers"]
        result[server] = {str(p["workers"]): p["rps"] / (p["workers"] * base) for p in mine}
    return result


def print_report(results: dict) -> None:
    """Table: workers, RPS of both, ratio ours/echo, efficiency of both."""
    by = {(p["server"], p["workers"]): p for p in results["points"]}
    eff = results["efficiency"]
    print(
        f"\n{'workers':>7} {'echo rps':>10} {'ours rps':>10} {'ours/echo':>9} "
        f"{'echo eff':>8} {'ours eff':>8}"
    )
    for workers in sorted({p["workers"] for p in results["points"]}):
        echo, ours = by.get(("echo", workers)), by.get(("riskwire", workers))
        ratio = ours["rps"] / echo["rps"] if echo and ours and echo["rps"] else math.nan
        print(
            f"{workers:>7} {echo['rps'] if echo else math.nan:>10.0f} "
            f"{ours['rps'] if ours else math.nan:>10.0f} {ratio:>9.2f} "
            f"{eff.get('echo', {}).get(str(workers), math.nan):>8.2f} "
            f"{eff.get('riskwire', {}).get(str(workers), math.nan):>8.2f}"
        )
    print(f"machine: {results['machine']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument(
        "--workers", default="1,2,4,8,14", type=lambda text: [int(w) for w in text.split(",")]
    )
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections-per-worker", type=int, default=8)
    parser.add_argument("--h2load", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="riskwire-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    results = measure(args, out)
    print_report(results)
    loadgen.write_json(out / "scaling.json", results)
    if args.json:
        summary = {
            "efficiency_at_8": results["efficiency"].get("riskwire", {}).get("8"),
            "echo_efficiency_at_8": results["efficiency"].get("echo", {}).get("8"),
            **results,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
