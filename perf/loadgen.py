"""Shared helpers of the serving benchmarks: request bodies, load tools and their parsers.

* Request bodies: gRPC-framed protobuf bodies for h2load (``0x00`` + 4-byte big-endian
  length + message), perf_analyzer ``--input-data`` JSON, built from synthetic
  transactions (``riskwire.pipeline.synth``) with ``event_time_ms = 0`` (server time).
* Tools: locating ``h2load`` / ``perf_analyzer`` (with install hints when missing),
  running them, and parsing their output (pure functions, unit-tested on canned text).
* Servers: :class:`ServerProcess` (start, wait for readiness, stop with SIGTERM then
  SIGKILL), a health check and a raw-bytes unary call to verify a body really succeeds —
  h2load counts any HTTP 200 as a success, even when the gRPC status is an error.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskwire.net import free_port  # noqa: F401 - re-exported for the bench scripts

INSTALL_HINTS = {
    "h2load": "apt-get install -y nghttp2-client",
    "perf_analyzer": (
        "pip install 'tritonclient[all]==2.41.0' nvidia-cuda-runtime-cu12 "
        "&& apt-get install -y libb64-0d"
    ),
}
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
# Metadata every benchmark call carries (h2load headers and the checking calls), e.g.
# the API key of bench_auth's authenticated server; empty by default.
CALL_METADATA: list[tuple[str, str]] = []


# ------------------------------------------------------------------ request bodies
def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed), as sent on the wire."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_unframe(body: bytes) -> bytes:
    """The protobuf message inside one gRPC frame (raises ValueError when malformed)."""
    if len(body) < 5 or body[0] != 0:
        raise ValueError("not an uncompressed gRPC frame")
    (length,) = struct.unpack(">I", body[1:5])
    if len(body) != 5 + length:
        raise ValueError(f"frame declares {length} bytes but carries {len(body) - 5}")
    return body[5:]


def sample_transactions(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """``count`` synthetic transactions (distinct rows, realistic cards and merchants)."""
    from riskwire.pipeline import synth

    rows = synth.generate(max(count, 100), seed=seed).slice(0, count).to_pylist()
    for row in rows:
        row.pop("label", None)
        row.pop("event_time", None)
        row["event_time_ms"] = 0  # the server's clock: state stays time-ordered
    return rows


def score_request(tx: Mapping[str, Any]) -> bytes:
    """A serialised ScoreRequest for one transaction."""
    from riskwire.protos import scoring_pb2 as sc

    return sc.ScoreRequest(transaction=sc.Transaction(**tx)).SerializeToString()


def score_batch_request(txs: Sequence[Mapping[str, Any]]) -> bytes:
    """A serialised ScoreBatchRequest (no reason codes: the batch default)."""
    from riskwire.protos import scoring_pb2 as sc

    return sc.ScoreBatchRequest(
        transactions=[sc.Transaction(**tx) for tx in txs]
    ).SerializeToString()


def model_infer_request(tx: Mapping[str, Any], model: str = "fraud") -> bytes:
    """A serialised single-row ModelInferRequest with raw contents, like perf_analyzer's."""
    from riskwire.protos import inference_pb2 as pb
    from riskwire.server.grpc.tensors import INPUTS

    request = pb.ModelInferRequest(model_name=model)
    for spec in INPUTS:
        value = tx[spec.name]
        if spec.datatype == "BYTES":
            data = str(value).encode()
            raw = struct.pack("<I", len(data)) + data
        else:
            raw = struct.pack({"INT32": "<i", "INT64": "<q", "FP64": "<d"}[spec.datatype], value)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=[1, 1])
        request.raw_input_contents.append(raw)
    return request.SerializeToString()


SCORE = "/riskwire.v1.Scoring/Score"
SCORE_BATCH = "/riskwire.v1.Scoring/ScoreBatch"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Bodies:
    """The request bodies of a benchmark run, on disk and as the messages they carry."""

    score: Path  # framed ScoreRequest (h2load -d)
    batch: Path  # framed ScoreBatchRequest
    batch_rows: int
    pa_input: Path  # perf_analyzer --input-data JSON
    messages: dict[str, bytes]  # method path → unframed request message, for checks


def prepare_bodies(out: Path, batch_rows: int, pa_rows: int = 64) -> Bodies:
    """Write the bodies under ``out``; the checks use the exact bytes h2load will send."""
    txs = sample_transactions(max(batch_rows, pa_rows) + 1)
    score, batch = out / "score.body", out / "score_batch.body"
    score.write_bytes(grpc_frame(score_request(txs[0])))
    batch.write_bytes(grpc_frame(score_batch_request(txs[:batch_rows])))
    pa_input = out / "model_infer.json"
    steps = [{name: [value] for name, value in tx.items()} for tx in txs[1 : pa_rows + 1]]
    pa_input.write_text(json.dumps({"data": steps}))  # one single-row step per transaction
    messages = {
        SCORE: grpc_unframe(score.read_bytes()),
        SCORE_BATCH: grpc_unframe(batch.read_bytes()),
        MODEL_INFER: model_infer_request(txs[1]),
    }
    return Bodies(score, batch, batch_rows, pa_input, messages)


def check_call(target: str, path: str, bodies: Bodies) -> str | None:
    """Send a body with a real gRPC call; None when the answer is OK and well formed."""
    import grpc

    from riskwire.protos import inference_pb2, scoring_pb2

    try:
        raw = unary_raw(target, path, bodies.messages[path])
    except grpc.RpcError as exc:
        return f"call failed: {exc.code().name}: {exc.details()}"
    if path == SCORE:
        score = scoring_pb2.ScoreResponse.FromString(raw)
        if score.HasField("error") or not 0.0 <= score.probability <= 1.0 or not score.decision:
            return f"bad ScoreResponse: {score}"
    elif path == SCORE_BATCH:
        results = scoring_pb2.ScoreBatchResponse.FromString(raw).results
        failed = [r.error.message for r in results if r.HasField("error")]
        if len(results) != bodies.batch_rows or failed:
            return f"ScoreBatch: {len(results)} results, errors {failed[:3]}"
    else:
        infer = inference_pb2.ModelInferResponse.FromString(raw)
        names = [o.name for o in infer.outputs]
        if "probability" not in names or len(infer.raw_output_contents) != len(names):
            return f"bad ModelInferResponse outputs {names}"
    return None


# ------------------------------------------------------------------ tools
def find_tool(name: str) -> str | None:
    """Path of a load tool: next to this Python (the venv's bin) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def perf_analyzer_env() -> dict[str, str]:
    """Environment for perf_analyzer: the pip CUDA runtime's lib/, one channel per context.

    tritonclient shares one gRPC channel (one TCP connection) among up to 6 concurrent
    contexts by default; with SO_REUSEPORT a connection stays on one worker, so 8
    contexts on 2 connections may all land on one worker. Share count 1 gives one
    connection per in-flight request, like h2load's ``-c C -m 1``.
    """
    env = dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="1")
    try:
        import nvidia.cuda_runtime as cuda_runtime  # type: ignore[import-not-found]

        libs = [str(Path(p) / "lib") for p in cuda_runtime.__path__]
    except ImportError:
        libs = []
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


def tool_problem(name: str) -> str | None:
    """Why a load tool cannot run here (with how to install it), or None when it can."""
    path = find_tool(name)
    if path is None:
        return f"{name} not found; install it with: {INSTALL_HINTS[name]}"
    env = perf_analyzer_env() if name == "perf_analyzer" else None
    args = [path, "--version"]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{name} at {path} does not run ({exc}); install: {INSTALL_HINTS[name]}"
    output = done.stdout + done.stderr
    if "error while loading shared libraries" in output:
        missing = output.strip().splitlines()[-1]
        return f"{name} cannot load a library ({missing}); install: {INSTALL_HINTS[name]}"
    return None


@dataclass(frozen=True)
class H2loadSummary:
    """The totals h2load prints at the end of a run."""

    rps: float
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_other: int  # 3xx + 4xx + 5xx
    data_bytes: int  # DATA payload received, warm-up included (a gRPC error sends none)

    @property
    def errors(self) -> int:
        """Requests that did not end with HTTP 200 (gRPC statuses are not visible)."""
        return self.failed + self.errored + self.timeout + self.status_other


def parse_h2load_output(text: str) -> H2loadSummary:
    """Parse h2load's stdout (raises ValueError when the summary lines are missing)."""
    finished = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    requests = re.search(
        r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    data = re.search(r"traffic: .*, \S+ \((\d+)\) data", text)
    if not (finished and requests and codes and data):
        raise ValueError("h2load output has no summary (did the run fail to start?)")
    counts = [int(g) for g in requests.groups()]
    other = sum(int(g) for g in codes.groups())
    return H2loadSummary(float(finished.group(1)), *counts, other, int(data.group(1)))


def failed_grpc_calls(summary: H2loadSummary, ok_size: int) -> int:
    """About how many calls h2load counted as successes got a gRPC error.

    A gRPC error is an HTTP 200 without DATA, so it shows only in the DATA bytes
    received: under 90% of ``total x ok_size`` (the framed size of a successful
    response), the shortfall in responses is the count; otherwise 0.
    """
    if summary.data_bytes >= 0.9 * ok_size * summary.total:
        return 0
    return round(summary.total - summary.data_bytes / ok_size)


def parse_h2load_log(text: str) -> tuple[list[float], int]:
    """(latencies in ms, non-200 count) from an h2load ``--log-file``.

    Each line is ``start_us <TAB> http_status <TAB> response_time_us``; h2load writes
    only the main phase (not the warm-up), and status -1 for requests that failed.
    """
    latencies, bad = [], 0
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] != "200":
            bad += 1
            continue
        latencies.append(int(parts[2]) / 1000.0)
    return latencies, bad


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered) / 100.0, 6)))  # round: 99.9% of 1000
    return ordered[min(rank, len(ordered)) - 1]


def h2load_command(
    h2load: str,
    url: str,
    body: Path,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    log_file: Path,
    rps_per_client: int | None = None,
) -> list[str]:
    """h2load arguments: one thread, ``concurrency`` connections of one stream each.

    One connection per in-flight request lets SO_REUSEPORT spread the load over the
    workers (a single connection would always land on one worker). With
    ``rps_per_client`` the load is open at that fixed rate per connection instead of
    as fast as the server answers.
    """
    args = [h2load, "-t", "1", "-c", str(concurrency), "-m", "1"]
    if rps_per_client:
        args.append(f"--rps={rps_per_client}")
    args += ["-D", f"{round(duration_s * 1000)}ms", "-d", str(body), "--log-file", str(log_file)]
    if warmup_s > 0:
        args += ["--warm-up-time", f"{round(warmup_s * 1000)}ms"]
    for header in (*GRPC_HEADERS, *(f"{key}: {value}" for key, value in CALL_METADATA)):
        args += ["-H", header]
    return [*args, url]


@dataclass(frozen=True)
class PerfAnalyzerPoint:
    """One row of perf_analyzer's ``-f`` CSV (latencies in ms)."""

    concurrency: int
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def parse_perf_analyzer_csv(text: str) -> list[PerfAnalyzerPoint]:
    """Parse perf_analyzer's CSV; latency columns are in microseconds."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "Inferences/Second" not in rows[0]:
        raise ValueError("perf_analyzer CSV has no 'Inferences/Second' column")

    def ms(row: dict[str, str], column: str) -> float | None:
        raw = row.get(column)
        return float(raw) / 1000.0 if raw not in (None, "") else None

    return [
        PerfAnalyzerPoint(
            concurrency=int(row["Concurrency"]),
            rps=float(row["Inferences/Second"]),
            p50_ms=ms(row, "p50 latency"),
            p90_ms=ms(row, "p90 latency"),
            p95_ms=ms(row, "p95 latency"),
            p99_ms=ms(row, "p99 latency"),
        )
        for row in rows
    ]


def perf_analyzer_command(
    perf_analyzer: str,
    target: str,
    model: str,
    concurrency: int,
    input_json: Path,
    window_ms: int,
    csv_path: Path,
    stability_pct: int = 25,
) -> list[str]:
    """perf_analyzer arguments: gRPC, sync calls, batch 1, time windows.

    It keeps measuring windows until three in a row agree within ``stability_pct``
    (at most 8 windows; it fails when they never do).
    """
    return [
        perf_analyzer, "-m", model, "-i", "grpc", "-u", target, "-b", "1",
        "--concurrency-range", str(concurrency), "--input-data", str(input_json),
        "--measurement-mode", "time_windows", "-p", str(window_ms),
        "-s", str(stability_pct), "-r", "8", "-f", str(csv_path),
    ]  # fmt: skip


# ------------------------------------------------------------------ servers
def unary_raw(target: str, path: str, message: bytes, timeout: float = 5.0) -> bytes:
    """Call a unary method with raw request bytes; returns the raw response (or raises)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        return channel.unary_unary(path)(message, timeout=timeout, metadata=CALL_METADATA)


def health_ok(target: str, timeout: float = 2.0) -> bool:
    """True when grpc.health.v1 Check("") answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2

    try:
        raw = unary_raw(target, "/grpc.health.v1.Health/Check", b"", timeout)
    except grpc.RpcError:
        return False
    return health_pb2.HealthCheckResponse.FromString(raw).status == 1  # SERVING


class ServerProcess:
    """A server started as its own process group, output to a log file."""

    def __init__(
        self,
        name: str,
        command: list[str],
        target: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.command, self.target, self.log_path = name, command, target, log_path
        self._env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (stdout and stderr go to ``log_path``)."""
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )

    def log_text(self) -> str:
        """Everything the server has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, ready_pattern: str, timeout: float) -> None:
        """Wait until the log shows ``ready_pattern`` (all workers up) and health is SERVING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_text()[-3000:]}")
            if re.search(ready_pattern, self.log_text()) and health_ok(self.target):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    def wait_serving(self, workers: int, timeout: float = 180.0) -> None:
        """Wait until riskwire's supervisor says all ``workers`` serve on this target."""
        port = self.target.rsplit(":", 1)[1]
        self.wait_ready(rf"serving on \S+:{port} with {workers} workers", timeout)

    @contextlib.contextmanager
    def serving(self, workers: int) -> Iterator[ServerProcess]:
        """Start riskwire, wait for all ``workers``, stop it on leaving (whatever happens)."""
        self.start()
        try:
            self.wait_serving(workers)
            yield self
        finally:
            self.stop()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server (it drains its workers), then SIGKILL its whole group."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers, if any
        process.wait()


def machine_info(workers: int, threads: int) -> dict[str, Any]:
    """Where the numbers were measured."""
    import platform

    import grpc

    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_model": names[0] if names else platform.processor(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "workers": workers,
        "threads_per_worker": threads,
    }


def write_json(path: Path, value: Any) -> None:
    """Write pretty JSON (via a temporary file and rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def require_h2load(script: str) -> str:
    """The h2load binary, or exit with how to install it."""
    h2load = find_tool("h2load")
    if h2load is None:
        raise SystemExit(f"{script}: h2load not found (apt-get install nghttp2-client)")
    return h2load


def median_present(values: list[float | None]) -> float | None:
    """Median of the measurements present (None and 0 are missing measurements)."""
    present = [v for v in values if v]
    return statistics.median(present) if present else None


def median_cost(values: list[float]) -> float | None:
    """Median keeping zeros and negatives (a cost may be <= 0)."""
    return statistics.median(values) if values else None


def format_number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" when it was not measured."""
    return "-" if value is None else format(value, spec)


def format_change(value: float | None) -> str:
    """A signed percentage (+12.3%), or "-" when it was not measured."""
    return "-" if value is None else f"{value:+.1%}"


def round_arguments(description: str, rounds_help: str) -> Any:
    """An argument parser with the options every side-by-side round benchmark takes:
    ``--models --workers --duration --warmup --concurrency --rounds --smoke --json --out``
    (add your own, then call :func:`parse_round_arguments`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", type=Path, default=None, help="models dir (default: demo)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", type=int, default=8, help="h2load connections")
    parser.add_argument("--rounds", type=int, default=3, help=rounds_help)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s runs (CI)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="keep logs and results here")
    return parser


def parse_round_arguments(parser: Any, argv: list[str] | None, *, keep_logs: bool) -> Any:
    """Parse; ``--smoke`` means one round of 1 s runs after a 0.5 s warm-up."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.rounds = 1.0, 0.5, 1
    args.keep_logs = keep_logs
    return args


def run_bench(
    name: str,
    args: Any,
    run: Callable[[Any, Path], dict],
    print_report: Callable[[dict], None],
) -> dict:
    """The shared ending of the side-by-side benchmarks: run in ``args.out`` (kept, with
    ``<name>.json``) or a scratch folder, print the report and, with ``args.json``, the
    summary as the last line."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"{name.replace('_', '-')}-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        summary = run(args, out)
        if args.out:
            write_json(out / f"{name}.json", summary)
    print_report(summary)
    if args.json:
        print(json.dumps(summary, sort_keys=True, default=str))
    return summary
