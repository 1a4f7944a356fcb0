"""Fixtures for the client/CLI tests: a dedicated server, a CLI runner, a small data file.

The server here is separate from tests/server's shared one, so its card state holds
only what these tests send (synthetic card ids like ``card-000123`` would otherwise
collide with other tests' traffic).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskwire.net import free_port
from riskwire.pipeline import synth

START_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 180.0


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    env.update(extra)
    return env


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            response = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2.0
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="session")
def cli_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dedicated 2-worker server on models_dir; yields its 127.0.0.1:port target."""
    state = tmp_path_factory.mktemp("cli-state")
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "riskwire.clients.cli", "serve", "--models",
                str(models_dir), "--host", "127.0.0.1", "--port", str(port),
                "--workers", "2", "--profile", "test",
            ],
            env=_clean_env(RISKWIRE_STATE_SNAPSHOT=str(state / "cards.snapshot")),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        target = f"127.0.0.1:{port}"
        marker = f"serving on {target} with 2 workers"
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                log.seek(0)
                text = log.read()
                if marker in text and _serving(target):
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start (status {process.poll()}):\n{text}")
                time.sleep(0.2)  # poll interval, bounded by the deadline
            yield target
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args)``: run ``riskwire ARGS`` (python -m riskwire.clients.cli)."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "riskwire.clients.cli", *args],
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )

    return run


@pytest.fixture(scope="session")
def small_tx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 synthetic transactions (seed 811, unlike the model's training data) as Parquet."""
    path = tmp_path_factory.mktemp("score-file") / "tx500.parquet"
    synth.write(synth.generate(500, seed=811), path)
    return path
