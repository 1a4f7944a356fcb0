"""Where a request's CPU goes: riskwire and the bare echo ceiling at the same fixed rate.

The two servers of ``perf/bench_serving.py`` (same workers, threads, pinning and
SO_REUSEPORT sharing; riskwire with every feature at its default) are driven one after
the other by h2load with single-row ``ModelInfer`` at one fixed total rate, so the load
generator behaves the same for both. Over a measured window the script reads every
process's and thread's CPU time from ``/proc`` and, with ``perf`` installed, samples the
workers with ``perf record`` and splits their CPU by the code it ran in: the Python
interpreter, the kernel, grpc's C core, Numba's compiled kernels, NumPy, libc, other.
Every number is CPU microseconds per request; the last column is riskwire minus echo.

    python perf/cpu_split.py [--rate 8000] [--duration 10] [--perf auto|on|off] [--json]

With ``--json`` the last line printed is one JSON object: ``cpu_us_per_request`` (per
server), ``cpu_ratio`` (riskwire / echo) and each server's ``rows`` and ``code`` splits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import bench_serving, loadgen  # noqa: E402
from perf.loadgen import MODEL_INFER  # noqa: E402

SERVERS = ("echo", "riskwire")
# perf's DSO names → what the CPU was spent on, first match wins.
CODE_KINDS = (
    ("Python interpreter", re.compile(r"^libpython|^python3")),
    ("kernel", re.compile(r"^\[kernel")),
    ("grpc core", re.compile(r"^cygrpc")),
    ("Numba kernels (JIT code)", re.compile(r"^\[JIT\]|^\[unknown\]")),
    ("Numba dispatcher", re.compile(r"^_dispatcher|^_helperlib|^_nrt_python")),
    ("NumPy", re.compile(r"^_multiarray|^_umath|^libopenblas|^libscipy_openblas")),
    ("libc", re.compile(r"^libc\.so|^libm\.so|^ld-linux|^\[vdso\]")),
)
OTHER = "other"
# /proc rows: which process (and, in a worker, which thread) the CPU was spent in.
ROWS = ("worker serving threads", "worker other threads", "helper processes", "supervisor")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None,
                        help="models dir with a fraud package (default: cached demo)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="handler threads per worker (default: riskwire's own)")  # fmt: skip
    parser.add_argument("--rate", type=int, default=8000,
                        help="total requests/s over all connections (default 8000)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=8, help="h2load connections")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    parser.add_argument("--duration", type=float, default=10.0, help="measured window, s")
    parser.add_argument("--perf", choices=("auto", "on", "off"), default="auto",
                        help="split the workers' CPU with `perf record` (auto: when "
                        "installed)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="keep logs and data here")
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    args = parser.parse_args(argv)
    if args.threads is None:
        from riskwire.server.config import Settings

        args.threads = Settings().threads_per_worker
    args.batch_rows = 1  # bench_serving's echo option; ModelInfer ignores it
    if args.perf == "on" and not shutil.which("perf"):
        parser.error("--perf on: `perf` is not installed (apt-get install -y linux-perf)")
    args.use_perf = args.perf == "on" or (args.perf == "auto" and shutil.which("perf"))
    return args


# --------------------------------------------------------------------- /proc accounting
def _ticks(stat_path: Path) -> tuple[list[str], int] | None:
    """(fields after the command name, utime + stime) of a /proc stat file."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields, int(fields[11]) + int(fields[12])


def group_threads(group: int) -> dict[tuple[int, int], tuple[str, int]]:
    """(pid, tid) → (role, CPU ticks) of every thread of the processes in a process group.

    Roles: ``worker`` (riskwire's and the echo's spawned workers), ``supervisor`` (the
    group leader), ``helper`` (any other process: prediction-log writer, shadow scorer).
    """
    threads: dict[tuple[int, int], tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        parsed = _ticks(stat)
        if parsed is None or int(parsed[0][2]) != group:  # pgrp
            continue
        pid = int(stat.parent.name)
        try:
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        role = "supervisor" if pid == group else "helper"
        if b"multiprocessing.spawn" in command:
            role = "worker"
        for task in (stat.parent / "task").glob("[0-9]*/stat"):
            counted = _ticks(task)
            if counted is not None:
                threads[(pid, int(task.parent.name))] = (role, counted[1])
    return threads


def cpu_rows(
    before: dict[tuple[int, int], tuple[str, int]],
    after: dict[tuple[int, int], tuple[str, int]],
) -> dict[str, float]:
    """CPU seconds per row of :data:`ROWS` between two :func:`group_threads` snapshots.

    A worker's serving thread is its busiest one: grpc's polling thread, which answers
    the small unary calls itself (``server/grpc/dispatch.py``).
    """
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[tuple[int, int], tuple[str, int]] = {
        key: (role, ticks - before.get(key, (role, 0))[1]) for key, (role, ticks) in after.items()
    }
    busiest: dict[int, tuple[int, int]] = {}
    for (pid, tid), (role, ticks) in used.items():
        if role == "worker" and ticks > busiest.get(pid, (0, -1))[1]:
            busiest[pid] = (tid, ticks)
    rows = dict.fromkeys(ROWS, 0.0)
    for (pid, tid), (role, ticks) in used.items():
        if role == "worker":
            row = ROWS[0] if busiest[pid][0] == tid else ROWS[1]
        else:
            row = ROWS[2] if role == "helper" else ROWS[3]
        rows[row] += ticks / tick
    return rows


# ------------------------------------------------------------------------- perf split
def code_kind(dso: str) -> str:
    """The :data:`CODE_KINDS` name of a perf DSO, or ``other``."""
    for name, pattern in CODE_KINDS:
        if pattern.search(dso):
            return name
    return OTHER


def parse_perf_report(text: str) -> dict[str, float]:
    """Shares (0–1) by code kind from ``perf report --sort dso --stdio`` output."""
    shares: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S.*?)\s*$", line)
        if match and not line.lstrip().startswith("#"):
            shares[code_kind(match.group(2))] += float(match.group(1)) / 100.0
    return dict(shares)


def perf_split(data: Path) -> dict[str, float]:
    """The shares of a ``perf record`` file by code kind."""
    done = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return parse_perf_report(done.stdout)


# ------------------------------------------------------------------------ measurement
def measure(
    args: argparse.Namespace, server: loadgen.ServerProcess, bodies: loadgen.Bodies, out: Path
) -> dict[str, Any]:
    """Serve at the fixed rate; the CPU per request of each row (and code kind)."""
    h2load = loadgen.require_h2load("cpu_split")
    group = server._process.pid  # noqa: SLF001 - the server is its process group's leader
    per_client = max(1, round(args.rate / args.concurrency))
    total_s = args.warmup + args.duration + 1.0
    url = f"http://{server.target}{MODEL_INFER}"
    command = loadgen.h2load_command(
        h2load, url, out / "model_infer.body", args.concurrency, total_s, 0.0,
        out / f"{server.name}.h2load.log", per_client,
    )  # fmt: skip
    ok_size = len(loadgen.unary_raw(server.target, MODEL_INFER, bodies.messages[MODEL_INFER])) + 5
    load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(args.warmup)
    before, started = group_threads(group), time.monotonic()
    recorder = None
    if args.use_perf:
        workers = sorted({pid for (pid, _), (role, _) in before.items() if role == "worker"})
        recorder = subprocess.Popen(
            ["perf", "record", "-F", "999", "-o", str(out / f"{server.name}.perf.data"),
             "-p", ",".join(map(str, workers)), "--", "sleep", str(args.duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    time.sleep(args.duration)
    after, window_s = group_threads(group), time.monotonic() - started
    if recorder is not None:
        recorder.wait(timeout=120)
    output, _ = load.communicate(timeout=total_s + 60)
    summary = loadgen.parse_h2load_output(output)
    requests = summary.rps * window_s
    rows = {name: seconds / requests * 1e6 for name, seconds in cpu_rows(before, after).items()}
    result: dict[str, Any] = {
        "rps": round(summary.rps, 1),
        "h2load_errors": summary.errors,
        "grpc_errors": loadgen.failed_grpc_calls(summary, ok_size),
        "cpu_us_per_request": round(sum(rows.values()), 1),
        "rows": {name: round(value, 1) for name, value in rows.items()},
    }
    if recorder is not None:
        worker_us = rows[ROWS[0]] + rows[ROWS[1]]
        shares = perf_split(out / f"{server.name}.perf.data") if not recorder.returncode else {}
        if shares:
            result["code"] = {name: round(share * worker_us, 1) for name, share in shares.items()}
        else:  # e.g. kernel.perf_event_paranoid forbids it for this user
            print(f"WARNING {server.name}: perf record gave no samples (exit "
                  f"{recorder.returncode}); no split by code")  # fmt: skip
    problem = loadgen.check_call(server.target, MODEL_INFER, bodies)
    if problem:
        result["check"] = problem
    return result


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Both servers, one after the other; the summary."""
    models = bench_serving.ensure_models(args.models)
    bodies = loadgen.prepare_bodies(out, 1, pa_rows=1)
    (out / "model_infer.body").write_bytes(loadgen.grpc_frame(bodies.messages[MODEL_INFER]))
    state = Path(tempfile.mkdtemp(prefix="cpu-split-", dir=out))
    servers = bench_serving.server_processes(args, models, out, state)
    results = {}
    for name in SERVERS:
        with servers[name].serving(args.workers) as server:
            print(f"{name}: {args.rate} req/s for {args.duration:g} s ...", flush=True)
            results[name] = measure(args, server, bodies, out)
    echo, ours = (results[name]["cpu_us_per_request"] for name in SERVERS)
    return {
        "rate": args.rate,
        "concurrency": args.concurrency,
        "window_s": args.duration,
        "machine": loadgen.machine_info(args.workers, args.threads),
        "servers": results,
        "cpu_us_per_request": {name: results[name]["cpu_us_per_request"] for name in SERVERS},
        "cpu_ratio": round(ours / echo, 3) if echo else None,
    }


def print_report(summary: dict[str, Any]) -> None:
    """The side-by-side table: µs of CPU per request, echo | riskwire | difference."""
    echo, ours = (summary["servers"][name] for name in SERVERS)
    print(f"\nCPU per request (µs) at {summary['rate']} req/s, h2load ModelInfer, "
          f"{summary['concurrency']} connections, {summary['window_s']:g} s window")  # fmt: skip
    print(f"{'':34}{'echo':>10}{'riskwire':>10}{'diff':>10}")

    def line(label: str, a: float | None, b: float | None) -> None:
        a, b = a or 0.0, b or 0.0
        print(f"{label:34}{a:10.1f}{b:10.1f}{b - a:+10.1f}")

    for row in ROWS:
        line(row, echo["rows"][row], ours["rows"][row])
    line("all processes", echo["cpu_us_per_request"], ours["cpu_us_per_request"])
    if "code" in echo and "code" in ours:
        print("workers' CPU by code (perf record):")
        kinds = [name for name, _ in CODE_KINDS] + [OTHER]
        for kind in kinds:
            line(f"  {kind}", echo["code"].get(kind), ours["code"].get(kind))
    print(f"riskwire / echo CPU per request: {summary['cpu_ratio']}")
    for name in SERVERS:
        result = summary["servers"][name]
        if result["h2load_errors"] or result["grpc_errors"] or "check" in result:
            print(f"WARNING {name}: {result['h2load_errors']} calls without HTTP 200, "
                  f"~{result['grpc_errors']} with a gRPC error; "
                  f"{result.get('check') or 'check call OK'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point; 1 when a server failed its check call or h2load saw errors."""
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="cpu-split-"))
    out.mkdir(parents=True, exist_ok=True)
    summary = run(args, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_report(summary)
    if args.json:
        print(json.dumps(summary))
    failed = any(
        r["h2load_errors"] or r["grpc_errors"] or "check" in r for r in summary["servers"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
