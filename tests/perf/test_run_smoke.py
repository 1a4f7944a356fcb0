"""perf/run.py (``make bench``): ratio and table helpers, MLServer settings, the smoke run.

No timing assertions: the smoke run checks that the summary has every key (null where a
peer was skipped) and that the numbers it does report are positive. MLServer is left out
(installing it costs minutes); FastAPI runs only when its venv already exists.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from riskwire.server.config import Settings

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

plot = importlib.import_module("perf.plot")
mlserver_peer = importlib.import_module("perf.mlserver_peer")
fastapi_peer = importlib.import_module("perf.fastapi_peer")

HEADLINE_KEYS = (
    "throughput_ratio_vs_mlserver",
    "p99_ratio_vs_mlserver",
    "throughput_ratio_vs_echo",
    "p99_ratio_vs_echo",
    "throughput_ratio_vs_fastapi",
    "p99_ratio_vs_fastapi",
)


def _point(server: str, rps: float | None, p99: float | None, concurrency: int | None = 8,
           tool: str = "h2load", protocol: str = "grpc", method: str = "ModelInfer",
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "phase": "main", "server": server, "config": "", "tool": tool, "protocol": protocol,
        "method": method, "concurrency": concurrency, "rate": None, "rps": rps,
        "p50_ms": p99 and p99 / 2, "p99_ms": p99, "p999_ms": p99 and p99 * 2, "errors": 0,
        "requests": 100, "notes": "", **extra,
    }  # fmt: skip


def test_ratios_pair_same_series_and_load() -> None:
    points = [
        _point("riskwire", 1000.0, 2.0),
        _point("mlserver", 250.0, 8.0),
        _point("echo", 2000.0, 1.0),
        _point("fastapi", 500.0, 4.0, protocol="http", method="POST /predict"),
        _point("riskwire", 400.0, 1.0, concurrency=1),
        _point("mlserver", 100.0, 2.0, concurrency=1),
        _point("riskwire", 100.0, 3.0, concurrency=None, rate=100.0),
        _point("mlserver", 100.0, 30.0, concurrency=None, rate=100.0),
    ]
    table = plot.ratios(points)
    assert table["mlserver"]["c=8"] == {"throughput": 4.0, "p99": 0.25}
    assert table["mlserver"]["c=1"] == {"throughput": 4.0, "p99": 0.5}
    assert table["mlserver"]["rate=100"]["p99"] == pytest.approx(0.1)
    assert table["echo"]["c=8"] == {"throughput": 0.5, "p99": 2.0}
    assert table["fastapi"]["c=8"] == {"throughput": 2.0, "p99": 0.5}
    assert "mlserver_rest" not in table and "echo_perf_analyzer" not in table
    head = plot.headline(table, 8)
    assert head["throughput_ratio_vs_mlserver"] == 4.0
    assert head["p99_ratio_vs_mlserver"] == 0.25
    assert head["throughput_ratio_vs_echo"] == 0.5
    assert head["ratio_vs_mlserver_comparison"] == "mlserver"


def test_ratios_skip_failed_points_and_prefer_perf_analyzer() -> None:
    points = [
        _point("riskwire", 1000.0, 2.0),
        _point("mlserver", 250.0, 8.0, errors=3),  # a failed run is no result
        _point("riskwire", 900.0, 3.0, tool="perf_analyzer"),
        _point("mlserver", 300.0, 9.0, tool="perf_analyzer"),
        _point("mlserver", 999.0, 1.0, phase="tune"),  # tuning points never pair
    ]
    table = plot.ratios(points)
    assert "mlserver" not in table
    head = plot.headline(table, 8)
    assert head["ratio_vs_mlserver_comparison"] == "mlserver_perf_analyzer"
    assert head["throughput_ratio_vs_mlserver"] == pytest.approx(3.0)
    assert head["throughput_ratio_vs_echo"] is None and head["p99_ratio_vs_fastapi"] is None


def test_ratios_take_the_median_over_repeats() -> None:
    points = []
    for repeat, (ours, theirs) in enumerate([(1000.0, 500.0), (900.0, 100.0), (800.0, 400.0)]):
        points += [_point("riskwire", ours, 1.0, repeat=repeat)]
        points += [_point("echo", theirs, 2.0, repeat=repeat)]
    assert plot.ratios(points)["echo"]["c=8"] == {"throughput": 2.0, "p99": 0.5}


def test_server_cpu_per_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1.5 CPU seconds over 2 s of wall time at 750 req/s: 1,000 µs per request."""
    run = importlib.import_module("perf.run")
    cpu, clock = iter([10.0, 11.5]), iter([100.0, 102.0])
    monkeypatch.setattr(run.time, "monotonic", lambda: next(clock))
    bench = run.Bench({}, None, tmp_path, cpu={"riskwire": lambda: next(cpu)})
    point = run.Point("main", "riskwire", "", "h2load", "grpc", "ModelInfer", 8, rps=750.0)
    bench._cpu_per_request(point, bench._cpu_mark("riskwire"))
    assert point.server_cpu_us == 1000.0
    other = run.Point("main", "echo", "", "h2load", "grpc", "ModelInfer", 8, rps=750.0)
    bench._cpu_per_request(other, bench._cpu_mark("echo"))  # no CPU reader: left unknown
    assert other.server_cpu_us is None


def test_table_csv_and_labels(tmp_path: Path) -> None:
    points = [_point("riskwire", 1234.5, 2.0), _point("echo", None, None, rate=50.0)]
    text = plot.format_table(points)
    assert "riskwire" in text and "1,234" in text and "rate=50" in text
    assert "cpu us/req" in text
    assert plot.format_ratios({}) == "(no comparison had both sides measured)"
    plot.write_csv(points, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("phase,server,config") and len(lines) == 3


def test_mlserver_configs_and_repository(tmp_path: Path) -> None:
    configs = mlserver_peer.parse_configs("0, 2@1, 2:32:0.002@1")
    assert [c.label for c in configs] == ["pw=0 batch=off omp=default", "pw=2 batch=off omp=1",
                                          "pw=2 batch=32/2ms omp=1"]  # fmt: skip
    with pytest.raises(ValueError):
        mlserver_peer.parse_configs("2:32")
    with pytest.raises(ValueError):
        mlserver_peer.parse_configs("0@1+turbo")
    tuned = mlserver_peer.parse_configs("0@1+riskwire")[0]
    assert tuned.grpc_experiments == Settings().grpc_experiments != ""
    assert tuned.label == f"pw=0 batch=off omp=1 grpc={tuned.grpc_experiments}"
    assert mlserver_peer.MLServerConfig(2) in mlserver_peer.default_configs(2)
    assert tuned in mlserver_peer.default_configs(2)
    model = tmp_path / "model.txt"
    model.write_text("tree\n")
    ports = mlserver_peer.Ports(1, 2, 3)
    files = mlserver_peer.write_repository(tmp_path / "repo", model, configs[2], ports, 23)
    settings = json.loads((tmp_path / "repo" / "settings.json").read_text())
    model_settings = json.loads((tmp_path / "repo" / "fraud" / "model-settings.json").read_text())
    assert settings["parallel_workers"] == 2 and settings["grpc_port"] == 1
    assert model_settings["implementation"] == "mlserver_lightgbm.LightGBMModel"
    assert model_settings["parameters"]["uri"] == "./model.txt"
    assert (model_settings["max_batch_size"], model_settings["max_batch_time"]) == (32, 0.002)
    assert model_settings["inputs"][0]["shape"] == [-1, 23]
    assert files["settings.json"] == settings
    assert (tmp_path / "repo" / "fraud" / "model.txt").read_text() == "tree\n"


def test_peer_request_bodies_round_trip() -> None:
    rows = [[float(i) for i in range(23)]]
    message = mlserver_peer.infer_request(rows)
    from riskwire.protos import inference_pb2 as pb

    request = pb.ModelInferRequest.FromString(message)
    assert request.inputs[0].name == "features" and list(request.inputs[0].shape) == [1, 23]
    response = pb.ModelInferResponse(outputs=[{"name": "predict", "datatype": "FP64"}])
    response.raw_output_contents.append(bytes(8))
    assert mlserver_peer.probabilities_of(response.SerializeToString()) == [0.0]
    rest = json.loads(mlserver_peer.rest_body(rows))
    assert rest["inputs"][0]["data"] == rows[0]
    assert json.loads(fastapi_peer.predict_body(rows)) == {"features": rows}
    assert fastapi_peer.same_probabilities([0.1], [0.1 + 1e-12])
    assert not fastapi_peer.same_probabilities([0.1], [0.2])


def test_fastapi_peer_listeners_share_the_port_and_take_turns() -> None:
    """Each of the peer's uvicorn workers gets its own listener (``uvicorn --fd``), with
    TCP_NODELAY for its connections to inherit, and new connections come in turn."""
    import socket

    port = importlib.import_module("perf.loadgen").free_port()
    listeners, spread = fastapi_peer.listeners("127.0.0.1", port, 2)
    clients: list[socket.socket] = []
    try:
        for listener in listeners:
            assert listener.getsockname() == ("127.0.0.1", port)
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            listener.setblocking(False)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        accepted = []
        for listener in listeners:
            connections = []
            while True:
                try:
                    connections.append(listener.accept()[0])
                except BlockingIOError:
                    break
            assert all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in connections)
            accepted.append(len(connections))
            clients += connections  # closed below
        assert sum(accepted) == 8
        if spread == "in turn":
            assert accepted == [4, 4]
        else:
            assert spread.startswith("by the kernel's hash ("), spread
    finally:
        for s in (*listeners, *clients):
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_smoke(models_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "perf" / "run.py"), "--smoke", "--json"]
    command += ["--skip-mlserver", "--models", str(models_dir), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=840, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, output
    summary = json.loads(lines[-1])
    for key in (*HEADLINE_KEYS, "ratios", "machine", "versions", "configuration", "points"):
        assert key in summary, f"missing {key}\n{output}"
    assert done.returncode == 0 and summary["errors"] == 0, output
    assert summary["throughput_ratio_vs_mlserver"] is None  # skipped
    assert any("mlserver" in s for s in summary["skipped"])
    for name in ("results.json", "results.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    plot_file = tmp_path / "out" / "plot.png"
    assert plot_file.is_file() or "matplotlib" in summary["plot"], summary["plot"]
    measured = [p for p in summary["points"] if p["phase"] == "main" and p["rps"] is not None]
    assert {p["server"] for p in measured} >= {"riskwire", "echo"}, output
    for p in measured:
        for field in ("rps", "p50_ms", "p99_ms"):
            assert _positive(p[field]), f"{p}\n{output}"
        assert p["server_cpu_us"] is not None and p["server_cpu_us"] >= 0, p
    assert any(_positive(p["server_cpu_us"]) for p in measured if p["server"] == "riskwire")
    assert _positive(summary["throughput_ratio_vs_echo"]), output
    assert _positive(summary["p99_ratio_vs_echo"]), output
    if fastapi_peer.installed(summary["versions"]["riskwire_venv"]["lightgbm"]):
        assert _positive(summary["throughput_ratio_vs_fastapi"]), output


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
