"""The reference peer: MLServer (``mlserver`` + ``mlserver-lightgbm``) serving ``model.txt``.

MLServer runs in its own virtual environment (``perf/results/peers/mlserver-venv``),
created and filled by :func:`ensure_venv`. The model repository written by
:func:`write_repository` holds:

* ``settings.json`` (server-wide): ``parallel_workers`` (inference in that many worker
  processes; 0 = in the server process), ports, ``debug: false`` (no access log);
* ``fraud/model-settings.json``: ``implementation: mlserver_lightgbm.LightGBMModel``,
  ``parameters.uri: ./model.txt``, one input ``features`` (FP64 ``[-1, 23]``), and for
  adaptive batching ``max_batch_size`` / ``max_batch_time`` (seconds);
* ``fraud/model.txt``: the riskwire package's LightGBM model, byte for byte.

MLServer's LightGBM runtime takes the 23 *precomputed features* (one FP64 tensor) and
returns ``predict`` (the probability). riskwire takes the raw transaction and computes
the features itself, with per-card state: MLServer does less work per request.

Pins: ``uvloop<0.22`` because MLServer 1.7.1's inference workers die at start-up with
uvloop 0.22+ ("There is no current event loop", SeldonIO/MLServer#2286).

Threads: LightGBM predicts with one OpenMP thread per core in every process; with
several processes predicting at once (``parallel_workers`` >= 1 next to the server
process) they oversubscribe the cores and throughput drops about tenfold. The tried
configurations therefore set ``OMP_NUM_THREADS=1``, plus one with the default to show it.

gRPC: MLServer serves gRPC with grpc.aio on the grpcio it installs. One configuration
also gets the ``GRPC_EXPERIMENTS`` riskwire's workers run with (``grpc_experiments`` in
``server/config.py``), so our gRPC tuning is not counted as our advantage.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perf import loadgen
from perf.fastapi_peer import (
    Server,
    Target,
    install_venv,
    post_json,
    same_probabilities,
    venv_versions,
)
from riskwire.server.config import Settings

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "perf" / "results" / "peers" / "mlserver-venv"
MODEL = "fraud"
INPUT = "features"
OUTPUT = "predict"
MLSERVER_VERSION = "1.7.1"
PACKAGES = ("mlserver", "mlserver-lightgbm", "lightgbm", "uvloop", "grpcio", "numpy", "uvicorn")
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"


def requirements(lightgbm_version: str) -> list[str]:
    """What the MLServer venv gets (the same LightGBM version riskwire builds with)."""
    return [
        f"mlserver=={MLSERVER_VERSION}",
        f"mlserver-lightgbm=={MLSERVER_VERSION}",
        "uvloop<0.22",  # SeldonIO/MLServer#2286: workers crash with uvloop 0.22+
        f"lightgbm=={lightgbm_version}",
    ]


@dataclass(frozen=True)
class MLServerConfig:
    """One MLServer configuration: inference workers, adaptive batching, OpenMP threads."""

    parallel_workers: int
    max_batch_size: int = 0  # 0 or 1: adaptive batching off
    max_batch_time: float = 0.0  # seconds
    omp_threads: int = 0  # OMP_NUM_THREADS for LightGBM; 0 = the library's default (cores)
    grpc_experiments: str = ""  # GRPC_EXPERIMENTS for MLServer's grpcio; "" = its defaults

    @property
    def batching(self) -> bool:
        """True when adaptive batching is on."""
        return self.max_batch_size > 1 and self.max_batch_time > 0

    @property
    def label(self) -> str:
        """Short name, e.g. ``pw=2 batch=32/2ms omp=1`` (omp=default: LightGBM's threads)."""
        batch = "off"
        if self.batching:
            batch = f"{self.max_batch_size}/{self.max_batch_time * 1000:g}ms"
        omp = f" omp={self.omp_threads or 'default'}"
        grpc = f" grpc={self.grpc_experiments}" if self.grpc_experiments else ""
        return f"pw={self.parallel_workers} batch={batch}{omp}{grpc}"


def parse_configs(text: str) -> list[MLServerConfig]:
    """``"2@1,2:32:0.002@1,0@1+riskwire"`` → configs:
    ``WORKERS[:BATCH_SIZE:BATCH_SECONDS][@OMP_THREADS][+riskwire]``, where ``+riskwire``
    runs MLServer with riskwire's ``GRPC_EXPERIMENTS``."""
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        spec, plus, tuning = item.partition("+")
        if plus and tuning != "riskwire":
            raise ValueError(f"MLServer config {item!r}: the only suffix is +riskwire")
        head, _, omp = spec.partition("@")
        fields = head.split(":")
        if len(fields) not in (1, 3):
            raise ValueError(f"MLServer config {item!r}: use WORKERS[:SIZE:SECONDS][@THREADS]")
        workers, threads = int(fields[0]), int(omp or 0)
        size, seconds = (int(fields[1]), float(fields[2])) if len(fields) == 3 else (0, 0.0)
        if min(workers, size, seconds, threads) < 0:
            raise ValueError(f"MLServer config {item!r}: values must be >= 0")
        experiments = Settings().grpc_experiments if plus else ""
        configs.append(MLServerConfig(workers, size, seconds, threads, experiments))
    return configs


def default_configs(cores: int) -> list[MLServerConfig]:
    """The documented knobs: workers 0 / 1 (default) / one per core, batching off / on.

    Each with ``OMP_NUM_THREADS=1`` (LightGBM's OpenMP threads per process otherwise
    oversubscribe the cores once several processes predict at once), plus one config
    with LightGBM's default threads, to show what that costs, and the best configuration
    of earlier runs (no inference workers, one thread) with riskwire's grpc experiments.
    """
    workers = sorted({0, 1, cores})
    configs = [MLServerConfig(cores)]
    for w in workers:
        configs += [MLServerConfig(w, omp_threads=1), MLServerConfig(w, 32, 0.002, 1)]
    configs.append(MLServerConfig(0, omp_threads=1, grpc_experiments=Settings().grpc_experiments))
    return configs


# ------------------------------------------------------------------ venv
def python() -> Path:
    """The MLServer venv's interpreter."""
    return VENV / "bin" / "python"


def installed(lightgbm_version: str) -> bool:
    """True when the venv exists with exactly :func:`requirements`."""
    marker = VENV / ".riskwire-requirements"
    wanted = "\n".join(requirements(lightgbm_version))
    return (
        (VENV / "bin" / "mlserver").is_file()
        and marker.is_file()
        and (marker.read_text() == wanted)
    )


def ensure_venv(lightgbm_version: str, log: Any = print) -> str | None:
    """Create the venv and install MLServer unless present; None, or why it failed."""
    if installed(lightgbm_version):
        return None
    return install_venv(VENV, requirements(lightgbm_version), log)


def versions() -> dict[str, str | None]:
    """Versions of MLServer and what it runs on, in its venv."""
    return venv_versions(VENV, PACKAGES)


# ------------------------------------------------------------------ repository
@dataclass(frozen=True)
class Ports:
    """MLServer's three listening ports."""

    grpc: int
    http: int
    metrics: int


def write_repository(
    root: Path, model_file: Path, config: MLServerConfig, ports: Ports, features: int
) -> dict[str, Any]:
    """Write settings.json, fraud/model-settings.json and fraud/model.txt; returns both."""
    if root.exists():
        shutil.rmtree(root)
    (root / MODEL).mkdir(parents=True)
    shutil.copyfile(model_file, root / MODEL / "model.txt")
    settings = {
        "debug": False,  # also turns off uvicorn's access log
        "parallel_workers": config.parallel_workers,
        "host": "127.0.0.1",
        "grpc_port": ports.grpc,
        "http_port": ports.http,
        "metrics_port": ports.metrics,
        "metrics_dir": str(root / ".metrics"),
        "environments_dir": str(root / ".envs"),
    }
    model_settings: dict[str, Any] = {
        "name": MODEL,
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "parameters": {"uri": "./model.txt", "version": "1"},
        "inputs": [{"name": INPUT, "datatype": "FP64", "shape": [-1, features]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP64", "shape": [-1, 1]}],
    }
    if config.batching:
        model_settings["max_batch_size"] = config.max_batch_size
        model_settings["max_batch_time"] = config.max_batch_time
    (root / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (root / MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return {"settings.json": settings, "model-settings.json": model_settings}


def command(root: Path) -> list[str]:
    """``mlserver start <repository>``."""
    return [str(VENV / "bin" / "mlserver"), "start", str(root)]


def ready_pattern(ports: Ports) -> str:
    """The log line MLServer prints once its gRPC server listens."""
    return rf"gRPC server running on http://127\.0\.0\.1:{ports.grpc}"


# ------------------------------------------------------------------ requests
def infer_request(rows: Sequence[Sequence[float]]) -> bytes:
    """A serialised ModelInferRequest: one FP64 ``features`` tensor, raw contents."""
    from riskwire.protos import inference_pb2 as pb

    width = len(rows[0])
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=INPUT, datatype="FP64", shape=[len(rows), width])
    flat = [float(v) for row in rows for v in row]
    request.raw_input_contents.append(struct.pack(f"<{len(flat)}d", *flat))
    return request.SerializeToString()


def rest_body(rows: Sequence[Sequence[float]]) -> bytes:
    """The REST ``/v2/models/fraud/infer`` JSON body for the same tensor."""
    tensor = {
        "name": INPUT,
        "datatype": "FP64",
        "shape": [len(rows), len(rows[0])],
        "data": [float(v) for row in rows for v in row],
    }
    return json.dumps({"inputs": [tensor]}).encode()


def pa_input(rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    """perf_analyzer ``--input-data`` JSON: one single-row step per feature row."""
    return {"data": [{INPUT: {"content": list(map(float, r)), "shape": [len(r)]}} for r in rows]}


def model_ready(target: str) -> bool:
    """True when the gRPC ModelReady(fraud) call answers ready (no grpc.health here)."""
    import grpc

    from perf import loadgen
    from riskwire.protos import inference_pb2 as pb

    try:
        request = pb.ModelReadyRequest(name=MODEL).SerializeToString()
        raw = loadgen.unary_raw(target, MODEL_READY, request, timeout=2.0)
    except grpc.RpcError:
        return False
    return pb.ModelReadyResponse.FromString(raw).ready


def probabilities_of(raw_response: bytes) -> list[float]:
    """The ``predict`` output of a ModelInferResponse (raw or typed contents)."""
    from riskwire.protos import inference_pb2 as pb

    response = pb.ModelInferResponse.FromString(raw_response)
    for index, output in enumerate(response.outputs):
        if output.name == OUTPUT:
            if response.raw_output_contents:
                raw = response.raw_output_contents[index]
                return list(struct.unpack(f"<{len(raw) // 8}d", raw))
            return list(output.contents.fp64_contents)
    raise ValueError(f"no '{OUTPUT}' output in {[o.name for o in response.outputs]}")


def check_grpc(target: str, message: bytes, expected: Sequence[float]) -> str | None:
    """None when gRPC ModelInfer answers LightGBM's own probabilities, else the problem."""
    import grpc

    from perf import loadgen

    try:
        got = probabilities_of(loadgen.unary_raw(target, loadgen.MODEL_INFER, message))
    except grpc.RpcError as exc:
        return f"MLServer ModelInfer failed: {exc.code().name}: {exc.details()}"
    except ValueError as exc:
        return f"MLServer ModelInfer: {exc}"
    if not same_probabilities(got, expected):
        return f"MLServer ModelInfer answered {got}, LightGBM predicts {list(expected)}"
    return None


def check_rest(url: str, body: bytes, expected: Sequence[float]) -> str | None:
    """None when REST infer answers LightGBM's own probabilities, else the problem."""
    status, answer = post_json(url, body)
    if status != 200 or not isinstance(answer, dict):
        return f"MLServer REST infer: HTTP {status}: {str(answer)[:300]}"
    outputs = {o.get("name"): o.get("data") for o in answer.get("outputs", [])}
    got = outputs.get(OUTPUT) or []
    if not same_probabilities(got, expected):
        return f"MLServer REST infer answered {got}, LightGBM predicts {list(expected)}"
    return None


# ------------------------------------------------------------------ start
def targets(label: str, grpc_target: str, http_base: str, rows: Sequence[Sequence[float]],
            expected: Sequence[float], out: Path) -> list[Target]:  # fmt: skip
    """gRPC ModelInfer (h2load), REST infer (h2load) and ModelInfer (perf_analyzer) targets.

    h2load sends ``rows[0]`` as one pre-encoded request; perf_analyzer cycles every row.
    """
    message, rest = infer_request(rows[:1]), rest_body(rows[:1])
    grpc_body, rest_file = out / "mlserver_model_infer.body", out / "mlserver_rest.json"
    grpc_body.write_bytes(loadgen.grpc_frame(message))
    rest_file.write_bytes(rest)
    pa_file = out / "mlserver_perf_analyzer.json"
    pa_file.write_text(json.dumps(pa_input(rows)))
    url = f"{http_base}/v2/models/{MODEL}/infer"
    one = list(expected[:1])
    common = {"server": "mlserver", "config": label, "grpc_target": grpc_target}
    return [
        Target(**common, tool="h2load", protocol="grpc", method="ModelInfer",
               url=f"http://{grpc_target}{loadgen.MODEL_INFER}", path=loadgen.MODEL_INFER,
               message=message, body=grpc_body, headers=loadgen.GRPC_HEADERS,
               checker=lambda: check_grpc(grpc_target, message, one)),
        Target(**common, tool="h2load", protocol="http", method="REST infer", url=url,
               body=rest_file, headers=("content-type: application/json",),
               checker=lambda: check_rest(url, rest, one)),
        Target(**common, tool="perf_analyzer", protocol="grpc", method="ModelInfer",
               pa_input=pa_file, checker=lambda: check_grpc(grpc_target, message, one)),
    ]  # fmt: skip


def start(config: MLServerConfig, model_file: Path, rows: Sequence[Sequence[float]],
          expected: Sequence[float], root: Path, out: Path,
          ) -> tuple[Server, list[Target], dict[str, Any]] | str:  # fmt: skip
    """Write the repository, start MLServer, check its endpoints; or the problem."""
    ports = Ports(*(loadgen.free_port() for _ in range(3)))
    files = write_repository(root, model_file, config, ports, len(rows[0]))
    grpc_target = f"127.0.0.1:{ports.grpc}"
    env = dict(os.environ)
    if config.omp_threads:
        env["OMP_NUM_THREADS"] = str(config.omp_threads)
    if config.grpc_experiments:
        env["GRPC_EXPERIMENTS"] = config.grpc_experiments
    server = Server("mlserver", command(root), grpc_target, root / "mlserver.log", env)
    server.start()
    found = targets(config.label, grpc_target, f"http://127.0.0.1:{ports.http}", rows, expected,
                    out)  # fmt: skip
    try:
        server.wait_until(ready_pattern(ports), 1, lambda: model_ready(grpc_target), 180)
        problem = next(filter(None, (t.check() for t in found[:2])), None)
    except (RuntimeError, TimeoutError) as exc:
        problem = str(exc)[-1500:]
    except BaseException:
        server.stop()
        raise
    if problem:
        server.stop()
        return problem
    configuration = {"label": config.label, **asdict(config), **files, "command": server.command}
    configuration["env"] = {
        name: env.get(name, "(unset)") for name in ("OMP_NUM_THREADS", "GRPC_EXPERIMENTS")
    }
    return server, found, configuration
