"""perf/bench_serving.py: output parsers, the echo server, and the ``--smoke`` run.

No timing assertions: the smoke run only checks that every number it reports exists
and is a positive finite value (or null, and the test skipped, when a tool is missing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    """Import perf/<name>.py by path (perf/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"_perf_{name}", REPO / "perf" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


loadgen = _load("loadgen")

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 8 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration for measurements.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 4.01s, 6485.33 req/s, 1.28MB/s
requests: 19456 total, 19456 started, 19456 done, 19450 succeeded, 4 failed, 1 errored, 1 timeout
status codes: 19450 2xx, 0 3xx, 2 4xx, 1 5xx
traffic: 3.85MB (4032204) total, 76.25KB (78084) headers (space savings 96.27%), 3.64MB (3821709) data
                     min         max         mean         sd        +/- sd
time for request:      196us      6.45ms       875us       646us    91.11%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :     809.79      810.76      810.42        0.44    75.00%
"""  # noqa: E501

H2LOAD_LOG = "1795672334585219\t200\t1054\n1795672334585243\t200\t2000\n1795672334585249\t-1\t3\n"

PA_CSV_CLIENT_ONLY = """\
Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
8,5151.5,1,0,1291,2035,2420,4891
"""  # noqa: E501

PA_CSV_WITH_SERVER = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
1,2368.35,2,100,5,10,200,5,1,388,420,450,478,410,0,400
32,7000.1,2,100,5,10,200,5,1,4100,5000,6000,9000,4300,0,4200
"""  # noqa: E501


def test_parse_h2load_output() -> None:
    summary = loadgen.parse_h2load_output(H2LOAD_OUTPUT)
    assert summary.rps == pytest.approx(6485.33)
    assert (summary.total, summary.succeeded, summary.failed) == (19456, 19450, 4)
    assert (summary.errored, summary.timeout, summary.status_other) == (1, 1, 3)
    assert summary.errors == 4 + 1 + 1 + 3
    assert summary.data_bytes == 3821709


@pytest.mark.parametrize(("answered", "failed"), [(100, 0), (95, 0), (60, 40), (0, 100)])
def test_failed_grpc_calls_from_the_data_bytes(answered: int, failed: int) -> None:
    # A gRPC error is an HTTP 200 without DATA; within 10% of the expected bytes is noise.
    summary = loadgen.H2loadSummary(100.0, 100, 100, 0, 0, 0, 0, answered * 57)
    assert loadgen.failed_grpc_calls(summary, 57) == failed


def test_parse_h2load_output_without_summary() -> None:
    with pytest.raises(ValueError, match="no summary"):
        loadgen.parse_h2load_output("-D: value error 1.5\n")


def test_parse_h2load_log_and_percentiles() -> None:
    latencies, bad = loadgen.parse_h2load_log(H2LOAD_LOG)
    assert latencies == [1.054, 2.0]
    assert bad == 1
    assert loadgen.percentile([], 99) is None
    values = [float(v) for v in range(1, 1001)]
    assert loadgen.percentile(values, 50) == 500.0
    assert loadgen.percentile(values, 99) == 990.0
    assert loadgen.percentile(values, 99.9) == 999.0
    assert loadgen.percentile(values, 100) == 1000.0


@pytest.mark.parametrize("text", [PA_CSV_CLIENT_ONLY, PA_CSV_WITH_SERVER])
def test_parse_perf_analyzer_csv(text: str) -> None:
    first = loadgen.parse_perf_analyzer_csv(text)[0]
    assert first.rps > 0
    assert first.p50_ms is not None and first.p99_ms is not None
    assert 0 < first.p50_ms <= first.p99_ms < 10


def test_parse_perf_analyzer_csv_values() -> None:
    rows = loadgen.parse_perf_analyzer_csv(PA_CSV_WITH_SERVER)
    assert [r.concurrency for r in rows] == [1, 32]
    assert rows[1].rps == pytest.approx(7000.1)
    assert (rows[1].p50_ms, rows[1].p99_ms) == (pytest.approx(4.1), pytest.approx(9.0))
    with pytest.raises(ValueError):
        loadgen.parse_perf_analyzer_csv("Concurrency,foo\n1,2\n")


def test_grpc_frame_round_trip() -> None:
    message = loadgen.score_request(loadgen.sample_transactions(1)[0])
    framed = loadgen.grpc_frame(message)
    assert framed[:1] == b"\x00" and int.from_bytes(framed[1:5], "big") == len(message)
    assert loadgen.grpc_unframe(framed) == message
    with pytest.raises(ValueError):
        loadgen.grpc_unframe(framed[:-1])


def test_h2load_command_uses_one_thread_and_grpc_headers(tmp_path: Path) -> None:
    command = loadgen.h2load_command(
        "h2load", "http://127.0.0.1:1/x/Y", tmp_path / "b", 8, 1.5, 0.5, tmp_path / "log"
    )
    assert command[command.index("-t") + 1] == "1"
    assert command[command.index("-c") + 1] == "8"
    assert command[command.index("-D") + 1] == "1500ms"
    assert "content-type: application/grpc" in command and "te: trailers" in command


@pytest.mark.timeout(120)
def test_echo_server_answers_score(tmp_path: Path) -> None:
    port = loadgen.free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, str(REPO / "perf" / "echo_server.py"), "--port", str(port)]
    server = loadgen.ServerProcess(
        "echo", [*command, "--workers", "2"], target, tmp_path / "echo.log"
    )
    server.start()
    try:
        server.wait_ready(rf"serving on \S+:{port} with 2 workers", timeout=60)
        with grpc.insecure_channel(target) as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            request = scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(card_id="c1", merchant_id="m1", amount=1.0)
            )
            response = stub.Score(request, timeout=5)
            batch = stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(), timeout=5)
        assert isinstance(response, scoring_pb2.ScoreResponse)
        assert 0.0 <= response.probability <= 1.0 and response.decision
        assert len(batch.results) == 256
        bodies = loadgen.prepare_bodies(tmp_path, 256, pa_rows=4)
        for path in (loadgen.SCORE, loadgen.SCORE_BATCH, loadgen.MODEL_INFER):
            assert loadgen.check_call(target, path, bodies) is None
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_serving_smoke(models_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "perf" / "bench_serving.py"), "--smoke", "--json"]
    command += ["--models", str(models_dir), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=840, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, output
    summary = json.loads(lines[-1])
    keys = ("rps_ratio_vs_echo", "p99_ms_c8", "batch_rows_per_s", "machine", "points", "errors")
    for key in keys:
        assert key in summary, f"missing {key}\n{output}"
    assert done.returncode == 0 and summary["errors"] == 0, output
    assert (tmp_path / "out" / "results.json").is_file()
    measured = {(p["tool"], p["method"]) for p in summary["points"] if p["rps"] is not None}
    for tool, method in measured:
        for p in summary["points"]:
            if (p["tool"], p["method"]) == (tool, method):
                for field in ("rps", "p50_ms", "p99_ms"):
                    assert _positive(p[field]), f"{p}\n{output}"
    if ("perf_analyzer", "ModelInfer") in measured:
        assert _positive(summary["p99_ms_c8_model_infer"]), output
    if ("h2load", "Score") not in measured:
        for key in ("rps_ratio_vs_echo", "p99_ms_c8", "batch_rows_per_s"):
            assert summary[key] is None, output
        pytest.skip(f"h2load not usable here: {summary['skipped']}")
    for key in ("rps_ratio_vs_echo", "p99_ms_c8", "batch_rows_per_s"):
        assert _positive(summary[key]), f"{key}\n{output}"
    if ("perf_analyzer", "ModelInfer") not in measured:
        pytest.skip(f"perf_analyzer not usable here: {summary['skipped']}")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
