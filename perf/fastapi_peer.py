"""The hand-rolled peer: a FastAPI + LightGBM service, as a team would write it.

``POST /predict`` takes ``{"features": [[f0, ..., f22], ...]}`` (the model's 23 features,
:data:`riskwire.kernels.schema.FEATURE_NAMES` order) and answers
``{"probability": [p, ...]}`` from ``lightgbm.Booster.predict`` on the package's
``model.txt`` — the same work MLServer's LightGBM runtime does (features in, probability
out; no per-card state, no validation). ``GET /health`` answers ``{"status": "ok"}``.

It runs under uvicorn (uvloop, httptools, no access log) with one worker process per
core, each on its own SO_REUSEPORT listener with new connections handed out in turn
(see :func:`serve`), and ``OMP_NUM_THREADS=1`` (LightGBM's default of one OpenMP thread
per core in every worker oversubscribes the cores: throughput collapses under concurrent
load), in its own virtual environment (``perf/results/peers/fastapi-venv``) created by
:func:`ensure_venv`.

This module is used in three places, so its top level uses the standard library only
(and no ``from __future__ import annotations``: FastAPI must see the request model):

* by ``perf/run.py`` (riskwire's venv): venv set-up, the server command, a probe, and
  the plumbing both peers share (at the end: venvs, server processes, load targets);
* as ``python -m perf.fastapi_peer --port P --workers N`` in the peer venv: the
  listeners and the uvicorn processes (:func:`serve`);
* by each uvicorn worker: ``uvicorn --factory perf.fastapi_peer:create_app --fd K`` with
  ``RISKWIRE_PEER_MODEL`` naming the model file.
"""

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perf import loadgen  # standard library only at import time

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "perf" / "results" / "peers" / "fastapi-venv"
MODEL_ENV = "RISKWIRE_PEER_MODEL"
READY_PATTERN = r"Application startup complete"
BACKLOG = 2048
PACKAGES = ("fastapi", "uvicorn", "starlette", "pydantic", "lightgbm", "numpy", "uvloop")


def requirements(lightgbm_version: str) -> list[str]:
    """What the peer venv gets: FastAPI, uvicorn with its fast extras, the same LightGBM."""
    return ["fastapi==0.165.0", "uvicorn[standard]==0.54.0", f"lightgbm=={lightgbm_version}"]


# ------------------------------------------------------------------ the service
def create_app() -> Any:
    """The FastAPI application (runs in the peer venv; the model path comes from the env)."""
    import lightgbm as lgb
    import numpy as np
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    booster = lgb.Booster(model_file=os.environ[MODEL_ENV])
    width = booster.num_feature()
    app = FastAPI(title="fraud model (FastAPI + LightGBM)")

    class PredictRequest(BaseModel):
        features: list[list[float]]

    class PredictResponse(BaseModel):
        probability: list[float]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: PredictRequest) -> PredictResponse:
        rows = np.asarray(request.features, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != width:
            raise HTTPException(422, f"features must be rows of {width} numbers")
        return PredictResponse(probability=booster.predict(rows).tolist())

    return app


# ------------------------------------------------------------------ set-up, from run.py
def python() -> Path:
    """The peer venv's interpreter."""
    return VENV / "bin" / "python"


def installed(lightgbm_version: str) -> bool:
    """True when the venv exists with exactly :func:`requirements`."""
    marker = VENV / ".riskwire-requirements"
    return (
        python().is_file()
        and marker.is_file()
        and marker.read_text() == "\n".join(requirements(lightgbm_version))
    )


def ensure_venv(lightgbm_version: str, log: Callable[[str], None] = print) -> str | None:
    """Create the venv and install :func:`requirements` unless present; None or the error."""
    if installed(lightgbm_version):
        return None
    return install_venv(VENV, requirements(lightgbm_version), log)


def command(port: int, workers: int) -> list[str]:
    """The peer venv's python running :func:`serve`: ``workers`` uvicorn processes."""
    return [
        str(python()), "-m", "perf.fastapi_peer", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def uvicorn_command(fd: int) -> list[str]:
    """One uvicorn worker on the listening socket ``fd``: uvloop + httptools, no access log."""
    return [
        sys.executable, "-m", "uvicorn", "--factory", "perf.fastapi_peer:create_app",
        "--fd", str(fd), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
        "--log-level", "info",
    ]  # fmt: skip


def listeners(host: str, port: int, count: int) -> tuple[list[socket.socket], str]:
    """``count`` SO_REUSEPORT sockets listening on ``host:port``, and how new connections
    are spread over them: in turn (riskwire's eBPF round-robin, ``server/balance.py``)
    or, where that cannot be attached, by the kernel's hash (and why)."""
    sockets = []
    for _ in range(count):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # uvicorn takes an inherited socket for a Unix one, so its event loop never sets
        # TCP_NODELAY on the connections; they inherit it from the listener instead
        # (without it, Nagle and delayed ACKs cap 32 connections at ~730 req/s).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((host, port))
        listener.listen(BACKLOG)
        sockets.append(listener)
    if count < 2:
        return sockets, "one listener"
    # Loaded by path: it uses the standard library only, and riskwire is not installed here.
    spec = importlib.util.spec_from_file_location("_balance", REPO / "server" / "balance.py")
    balance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(balance)
    try:
        balance.spread_connections(port, count)
    except balance.BalanceUnavailable as exc:
        return sockets, f"by the kernel's hash ({exc})"
    return sockets, "in turn"


def serve(host: str, port: int, workers: int) -> int:
    """Run ``workers`` uvicorn processes, each on its own SO_REUSEPORT listener, until
    SIGTERM/SIGINT or one of them exits.

    ``uvicorn --workers N`` shares one listening socket, and whichever worker wakes first
    accepts a burst of new connections: h2load's 32 connections went 32 / 0 in two runs
    of four (6.9k-7.0k req/s against 10.8k-11.6k when split). One listener per worker
    with connections handed out in turn, as riskwire and the echo get them, measures
    the service instead of that coin flip.
    """
    sockets, spread = listeners(host, port, workers)
    print(f"fastapi-peer: {workers} uvicorn workers on {host}:{port}, new connections "
          f"spread {spread}", flush=True)  # fmt: skip
    children = [
        subprocess.Popen(uvicorn_command(s.fileno()), pass_fds=(s.fileno(),)) for s in sockets
    ]
    for listener in sockets:
        listener.close()  # the children hold them
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    while not stop.wait(0.2) and all(child.poll() is None for child in children):
        pass
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    for child in children:
        try:
            child.wait(10.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0 if stop.is_set() else 1


def environment(model_file: Path, omp_threads: int = 1) -> dict[str, str]:
    """The server's environment: model file, this repo on the import path, OpenMP threads.

    ``OMP_NUM_THREADS=1`` by default: with one uvicorn worker per core, LightGBM's default
    (one OpenMP thread per core in every worker) oversubscribes the cores and collapses
    throughput under concurrent load (0 keeps the library default).
    """
    env = {**os.environ, MODEL_ENV: str(model_file), "PYTHONPATH": str(REPO)}
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


def configuration(workers: int, omp_threads: int = 1) -> dict[str, Any]:
    """What is recorded next to the numbers."""
    return {
        "server": "uvicorn",
        "workers": workers,
        "listeners": "one SO_REUSEPORT socket per worker; new connections in turn where "
        "eBPF is allowed (the log's 'fastapi-peer:' line says which)",
        "OMP_NUM_THREADS": str(omp_threads) if omp_threads else "(unset)",
        "loop": "uvloop",
        "http": "httptools (HTTP/1.1)",
        "access_log": False,
        "endpoint": "POST /predict (JSON features in, JSON probability out; async def)",
        "input": "the 23 precomputed features (float64)",
    }


def ready(base_url: str) -> bool:
    """True when ``GET /health`` answers 200."""
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def predict_body(rows: Sequence[Sequence[float]]) -> bytes:
    """The ``POST /predict`` body for feature rows."""
    return json.dumps({"features": [list(map(float, row)) for row in rows]}).encode()


def check_predict(url: str, body: bytes, expected: Sequence[float]) -> str | None:
    """None when ``POST /predict`` answers the expected probabilities, else the problem."""
    status, answer = post_json(url, body)
    if status != 200 or not isinstance(answer, dict):
        return f"POST /predict: HTTP {status}: {str(answer)[:300]}"
    got = answer.get("probability") or []
    if not same_probabilities(got, expected):
        return f"POST /predict: probabilities {got} differ from LightGBM's {list(expected)}"
    return None


def versions() -> dict[str, str | None]:
    """Versions of what the service runs on, in its venv."""
    return venv_versions(VENV, PACKAGES)


def target(base_url: str, rows: Sequence[Sequence[float]], expected: Sequence[float],
           out: Path) -> "Target":  # fmt: skip
    """The h2load HTTP/1.1 target ``POST /predict`` with ``rows[0]``."""
    body, url, one = predict_body(rows[:1]), f"{base_url}/predict", list(expected[:1])
    path = out / "fastapi_predict.json"
    path.write_bytes(body)
    return Target(
        server="fastapi", config="uvicorn", tool="h2load", protocol="http",
        method="POST /predict", url=url, body=path, headers=("content-type: application/json",),
        checker=lambda: check_predict(url, body, one),
    )  # fmt: skip


# ------------------------------------------------------------------ peer plumbing
# (shared with perf/mlserver_peer.py and perf/run.py: venvs, processes, targets)
def install_venv(venv: Path, packages: Sequence[str], log: Callable[[str], None]) -> str | None:
    """``python3 -m venv`` + ``pip install``; records what was installed, or returns why not."""
    log(f"installing {' '.join(packages)} into {venv} ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [  # a venv's python makes a venv of its base interpreter (sys._base_executable)
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", *packages],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            return f"'{' '.join(step)}' failed (exit {done.returncode}):\n" + "\n".join(tail)
    (venv / ".riskwire-requirements").write_text("\n".join(packages))
    return None


def venv_versions(venv: Path, packages: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of ``packages`` in a venv (None when absent)."""
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError: out[name] = None\n"
        "print(json.dumps(out))"
    )
    command = [str(venv / "bin" / "python"), "-c", code, *packages]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else dict.fromkeys(packages)


def post_json(url: str, payload: bytes, timeout: float = 5.0) -> tuple[int, Any]:
    """POST a JSON body; (HTTP status, decoded JSON or the raw text)."""
    request = urllib.request.Request(
        url, data=payload, headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def same_probabilities(got: Sequence[float], expected: Sequence[float]) -> bool:
    """True when a server answered LightGBM's own probabilities (to 1e-9)."""
    return len(got) == len(expected) and all(
        abs(g - e) <= 1e-9 for g, e in zip(got, expected, strict=True)
    )


class Server(loadgen.ServerProcess):
    """A server process whose readiness is a log line (``count`` times) plus a probe."""

    def wait_until(
        self, pattern: str, count: int, probe: Callable[[], bool], timeout: float
    ) -> None:
        """Wait for ``count`` matches of ``pattern`` in the log and a true ``probe()``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_text()[-3000:]}")
            if len(re.findall(pattern, self.log_text())) >= count and probe():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every live process in the server's process group."""
        if self._process is None:
            return 0.0
        group, ticks = self._process.pid, 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group:  # pgrp; utime, stime follow at 11, 12
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu(server: Server, seconds: float = 2.0) -> float:
    """Percent of one core the server uses while nobody calls it."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return round(100.0 * (server.cpu_seconds() - before) / seconds, 1)


@dataclass
class Target:
    """One endpoint of one server, driven by one tool."""

    server: str
    config: str
    tool: str  # "h2load" or "perf_analyzer"
    protocol: str  # "grpc" or "http"
    method: str
    url: str = ""  # h2load URL
    grpc_target: str = ""  # host:port
    path: str = ""  # gRPC method path
    message: bytes = b""  # the unframed gRPC request in ``body``
    body: Path | None = None  # h2load -d
    headers: tuple[str, ...] = ()
    pa_input: Path | None = None  # perf_analyzer --input-data
    checker: Callable[[], str | None] | None = None

    def check(self) -> str | None:
        """None when a real call answers correctly, else what is wrong."""
        return self.checker() if self.checker else None

    def ok_size(self) -> int | None:
        """Bytes of DATA a successful gRPC call receives (frame included); None if it fails.

        HTTP targets answer 1: h2load's status codes already show their failures.
        """
        if self.protocol != "grpc" or self.tool != "h2load":
            return 1
        import grpc

        try:
            return len(loadgen.unary_raw(self.grpc_target, self.path, self.message)) + 5
        except grpc.RpcError:
            return None

    def describe(self) -> dict[str, Any]:
        """The target as recorded in the results (no callables, no bytes)."""
        skip = ("message", "checker")
        return {k: str(v) for k, v in asdict(self).items() if k not in skip and v}


def main(argv: list[str] | None = None) -> int:
    """``python -m perf.fastapi_peer --port P --workers N`` (in the peer venv)."""
    parser = argparse.ArgumentParser(description="The FastAPI + LightGBM peer under uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.workers)


if __name__ == "__main__":
    sys.exit(main())
