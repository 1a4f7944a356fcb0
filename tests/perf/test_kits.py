"""The load-tool kits: ghz configs and data, perf_analyzer input data, h2load bodies.

Static checks only (no server; see tests/load/test_kits_live.py for live ones): every
file parses, uses only keys or names the tool and our protos know, every request
message parses into the right protobuf type, and every generator script reproduces
its committed output exactly. ghz itself cannot be installed here, so its documented
config keys and its own option checks are restated below.

``inference.*`` messages come from a private descriptor pool, as in
tests/server/conftest.py (``oip_pb``), so this module never claims the protobuf symbols
tritonclient also declares.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import (
    descriptor,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message,
    message_factory,
)

import riskwire.protos
from riskwire.protos import scoring_pb2
from riskwire.server.grpc.tensors import INPUTS

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
GHZ = REPO / "perf" / "ghz"
PERF_ANALYZER = REPO / "perf" / "perf_analyzer"
H2LOAD = REPO / "perf" / "h2load"
SCRIPT_TIMEOUT_S = 120

# Every key a ghz config file may hold. ghz reads config files into runner.Config, whose
# JSON tags are these keys, one per long command-line option
# (https://ghz.sh/docs/options, https://ghz.sh/docs/example_config; runner/config.go in
# github.com/bojand/ghz). Durations are Go duration strings ("10s", "50ms").
GHZ_DOCUMENTED_KEYS = frozenset({
    # call and schema
    "proto", "protoset", "call", "import-paths", "host",
    # security
    "cacert", "cert", "key", "cname", "skipTLS", "insecure", "authority",
    # load (RPS) schedule
    "async", "rps", "load-schedule", "load-start", "load-end", "load-step",
    "load-step-duration", "load-max-duration",
    # concurrency schedule
    "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
    "concurrency-step", "concurrency-step-duration", "concurrency-max-duration",
    # run length and timeouts
    "total", "timeout", "duration", "max-duration", "duration-stop",
    # data and metadata
    "data", "data-file", "binary-file", "metadata", "metadata-file", "reflect-metadata",
    # streaming calls
    "stream-interval", "stream-call-duration", "stream-call-count", "stream-dynamic-messages",
    # output and statistics
    "output", "format", "skipFirst", "count-errors",
    # connections
    "connections", "connect-timeout", "keepalive", "enable-compression",
    "max-recv-message-size", "max-send-message-size",
    # meta
    "name", "tags", "cpus", "debug",
})  # fmt: skip
GHZ_DURATION_KEYS = (
    "timeout", "duration", "max-duration", "load-step-duration", "load-max-duration",
    "concurrency-step-duration", "concurrency-max-duration", "stream-interval",
    "stream-call-duration", "connect-timeout", "keepalive",
)  # fmt: skip
GHZ_SCHEDULES = ("const", "step", "line")
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
STREAMING = ("ScoreStream", "ModelStreamInfer")
H2LOAD_BODIES = {  # body file → (service, method)
    "score.body": ("riskwire.v1.Scoring", "Score"),
    "score_batch.body": ("riskwire.v1.Scoring", "ScoreBatch"),
    "model_infer.body": ("inference.GRPCInferenceService", "ModelInfer"),
}


# ------------------------------------------------------------------ protos
def _inference_file() -> descriptor.FileDescriptor:
    """inference.proto's descriptor from the committed module, in a private pool."""
    source = Path(riskwire.protos.__file__).with_name("inference_pb2.py").read_text()
    blob = next(
        ast.literal_eval(node.args[0])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "AddSerializedFile"
    )
    proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool.FindFileByName(proto.name)


INFERENCE_FILE = _inference_file()
FILES = {  # .proto path (as ghz configs name it) → descriptor of the generated module
    "protos/proto/riskwire/protos/scoring.proto": scoring_pb2.DESCRIPTOR,
    "protos/proto/riskwire/protos/inference.proto": INFERENCE_FILE,
}


def find_method(call: str, proto: str | None) -> descriptor.MethodDescriptor:
    """The method a ghz ``call`` names ('pkg.Service.Method' or 'pkg.Service/Method').

    With ``proto`` only that file's services count; without (reflection), any service
    the server registers does.
    """
    service_name, method_name = re.split(r"[/.](?=[^/.]+$)", call)
    files = [FILES[proto]] if proto is not None else list(FILES.values())
    for file in files:
        for service in file.services_by_name.values():
            if service.full_name == service_name and method_name in service.methods_by_name:
                return service.methods_by_name[method_name]
    raise AssertionError(f"call {call!r}: no such method in {proto or 'our services'}")


def message_class(descriptor_: descriptor.Descriptor) -> type[message.Message]:
    """The message class of a descriptor (whichever pool it lives in)."""
    return message_factory.GetMessageClass(descriptor_)


def parse_message(descriptor_: descriptor.Descriptor, item: dict[str, Any]) -> message.Message:
    """``item`` as a protobuf message; raises ParseError on unknown fields or bad types."""
    return json_format.ParseDict(item, message_class(descriptor_)())


# ------------------------------------------------------------------ ghz
def ghz_configs() -> list[Path]:
    """Every ghz config file (the data files live in data/)."""
    return sorted(GHZ.glob("*.json"))


def test_ghz_kit_is_complete() -> None:
    """Configs for all four methods, const/step/line schedules, with and without a proto."""
    configs = [json.loads(p.read_text()) for p in ghz_configs()]
    calls = {c["call"].rsplit(".", 1)[1] for c in configs}
    assert calls == {"Score", "ScoreBatch", "ModelInfer", "ScoreStream"}
    schedules = {c.get("load-schedule", "const") for c in configs}
    assert schedules == set(GHZ_SCHEDULES)
    reflected = {c["call"] for c in configs if "proto" not in c and "protoset" not in c}
    assert reflected == {c["call"] for c in configs}, "every method needs a reflection variant"


@pytest.mark.parametrize("path", ghz_configs(), ids=lambda p: p.name)
def test_ghz_config(path: Path) -> None:
    """Parses, documented keys only, passes ghz's option checks, files exist, data parse."""
    config = json.loads(path.read_text())
    assert isinstance(config, dict)
    unknown = sorted(set(config) - GHZ_DOCUMENTED_KEYS)
    assert not unknown, f"keys ghz does not document: {unknown}"
    for key in GHZ_DURATION_KEYS:
        if key in config:
            assert GO_DURATION.match(str(config[key])), f"{key}: {config[key]!r}"
    assert config["insecure"] is True and config["host"].startswith("127.0.0.1:")
    check_ghz_options(config)

    proto = config.get("proto")
    if proto is not None:
        assert proto in FILES, f"proto {proto} is not one of ours"
        assert (REPO / proto).is_file()
        text = (REPO / proto).read_text()
        assert f"rpc {config['call'].rsplit('.', 1)[1]}(" in text
    method = find_method(config["call"], proto)

    data = config.get("data")
    if "data-file" in config:
        assert data is None, "data and data-file are exclusive"
        data_path = REPO / config["data-file"]
        assert data_path.is_file(), f"{config['data-file']} (paths are relative to the repo root)"
        data = json.loads(data_path.read_text())
    items = data if isinstance(data, list) else [data]
    assert items and all(isinstance(item, dict) for item in items)  # ghz's checkData
    for item in items:
        parse_message(method.input_type, item)
    if method.name in STREAMING:
        assert method.client_streaming and isinstance(data, list)


def check_ghz_options(config: dict[str, Any]) -> None:
    """ghz's own checks on a run (runner.NewConfig), restated."""
    for key in ("rps", "total", "concurrency", "connections", "load-start", "load-end"):
        assert isinstance(config.get(key, 0), int) and config.get(key, 0) >= 0, key
    assert config.get("connections", 1) <= config.get("concurrency", 50), (
        "number of connections cannot be greater than concurrency"
    )
    assert "total" in config or "duration" in config or "max-duration" in config
    for prefix in ("load", "concurrency"):
        schedule = config.get(f"{prefix}-schedule", "const")
        assert schedule in GHZ_SCHEDULES
        if schedule == "const":
            continue
        assert config.get(f"{prefix}-start", 0) != config.get(f"{prefix}-end", 0)
        assert config.get(f"{prefix}-step", 0) != 0
        if schedule == "step":
            assert config.get(f"{prefix}-step-duration", "0") not in ("0", "0s")
    if config.get("load-schedule", "const") == "const" and "rps" in config:
        assert config["rps"] > 0


def test_ghz_data_exercises_per_card_state() -> None:
    """Several distinct cards, most with repeat payments; every event at server time."""
    requests = json.loads((GHZ / "data" / "score.json").read_text())
    cards = [r["transaction"]["card_id"] for r in requests]
    assert len(requests) == 64 and len(set(cards)) >= 8
    assert sum(cards.count(c) > 1 for c in set(cards)) >= len(set(cards)) // 2
    assert all(r["transaction"]["event_time_ms"] == 0 for r in requests)
    batches = json.loads((GHZ / "data" / "score_batch.json").read_text())
    assert [t for b in batches for t in b["transactions"]] == [r["transaction"] for r in requests]
    infer = json.loads((GHZ / "data" / "model_infer.json").read_text())
    assert len(infer) == len(requests)
    cls = message_class(INFERENCE_FILE.message_types_by_name["ModelInferRequest"])
    first = json_format.ParseDict(infer[0], cls())
    assert [t.name for t in first.inputs] == [s.name for s in INPUTS]
    assert [t.datatype for t in first.inputs] == [s.datatype for s in INPUTS]
    by_name = {t.name: t for t in first.inputs}
    assert by_name["card_id"].contents.bytes_contents == [cards[0].encode()]


def test_ghz_readme_runs_every_config() -> None:
    """The README has the exact command for every config, from the repo root."""
    readme = (GHZ / "README.md").read_text()
    for path in ghz_configs():
        assert f"ghz --config perf/ghz/{path.name}" in readme, path.name


# ------------------------------------------------------------------ perf_analyzer
def test_perf_analyzer_input_data() -> None:
    """{"data": [steps]}: each step names model inputs only, with values of their type."""
    document = json.loads((PERF_ANALYZER / "model_infer.json").read_text())
    assert set(document) == {"data"} and len(document["data"]) >= 16
    specs = {spec.name: spec for spec in INPUTS}
    required = {spec.name for spec in INPUTS if not spec.optional}
    python_types = {"BYTES": str, "INT32": int, "INT64": int, "FP64": (int, float)}
    cards = set()
    for step in document["data"]:
        assert required <= set(step) <= set(specs), sorted(set(step) ^ set(specs))
        for name, values in step.items():
            assert isinstance(values, list) and len(values) == 1, name  # dims [1], batch 1
            assert isinstance(values[0], python_types[specs[name].datatype]), name
        cards.add(step["card_id"][0])
    assert len(cards) >= 8


def test_perf_analyzer_readme_has_the_command_lines() -> None:
    """Environment (channel share count, CUDA runtime, libb64) and the command lines."""
    readme = (PERF_ANALYZER / "README.md").read_text()
    for needle in (
        "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1",
        "LD_LIBRARY_PATH",
        "nvidia-cuda-runtime-cu12",
        "libb64-0d",
        "--input-data perf/perf_analyzer/model_infer.json",
        "perf_analyzer -m fraud -i grpc",
    ):
        assert needle in readme, needle


# ------------------------------------------------------------------ h2load
def _unframe(body: bytes) -> bytes:
    assert len(body) >= 5 and body[0] == 0, "not an uncompressed gRPC frame"
    length = int.from_bytes(body[1:5], "big")
    assert len(body) == 5 + length, f"frame declares {length} bytes, carries {len(body) - 5}"
    return body[5:]


@pytest.mark.parametrize("name", sorted(H2LOAD_BODIES))
def test_h2load_body_parses_as_its_request(name: str) -> None:
    """Each body is one gRPC frame holding a complete request of its method's type."""
    service, method_name = H2LOAD_BODIES[name]
    method = find_method(f"{service}/{method_name}", None)
    request = message_class(method.input_type).FromString(_unframe((H2LOAD / name).read_bytes()))
    assert request.SerializeToString() == _unframe((H2LOAD / name).read_bytes())
    if method_name == "Score":
        assert request.transaction.card_id and request.transaction.event_time_ms == 0
    elif method_name == "ScoreBatch":
        assert len(request.transactions) == 256
        assert len({t.card_id for t in request.transactions}) >= 8
    else:
        assert request.model_name == "fraud"
        assert [t.name for t in request.inputs] == [s.name for s in INPUTS]
        assert len(request.raw_input_contents) == len(request.inputs)
    readme = (H2LOAD / "README.md").read_text()
    assert f"-d perf/h2load/{name}" in readme and f"/{service}/{method_name}" in readme


def test_h2load_readme_warns_about_http_200() -> None:
    """gRPC errors are HTTP 200: the README says so and how to check."""
    readme = (H2LOAD / "README.md").read_text()
    assert "counts any HTTP 200 as a success" in readme
    assert "make_bodies.py --verify" in readme


# ------------------------------------------------------------------ generators
def _run(script: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd="/",  # the scripts must not depend on the working directory
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ghz_make_data_reproduces_the_data(tmp_path: Path) -> None:
    """perf/ghz/make_data.py writes exactly the committed data files."""
    _run(GHZ / "make_data.py", "--out", str(tmp_path))
    committed = sorted(p.name for p in (GHZ / "data").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (GHZ / "data" / name).read_bytes(), name


def test_perf_analyzer_make_input_reproduces_the_input(tmp_path: Path) -> None:
    """perf/perf_analyzer/make_input.py writes exactly the committed input data."""
    out = tmp_path / "model_infer.json"
    _run(PERF_ANALYZER / "make_input.py", "--out", str(out))
    assert out.read_bytes() == (PERF_ANALYZER / "model_infer.json").read_bytes()


def test_h2load_make_bodies_reproduces_the_bodies(tmp_path: Path) -> None:
    """perf/h2load/make_bodies.py writes the committed bodies byte for byte."""
    _run(H2LOAD / "make_bodies.py", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(H2LOAD_BODIES)
    assert sorted(p.name for p in H2LOAD.glob("*.body")) == sorted(H2LOAD_BODIES)
    for name in H2LOAD_BODIES:
        assert (tmp_path / name).read_bytes() == (H2LOAD / name).read_bytes(), name
