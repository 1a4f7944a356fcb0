"""Fixtures for the load, stress, soak and fault tests: real 2-worker servers, durations.

Every test that takes ``duration_s`` runs twice: a short smoke run in the default
(CI) run, and the full run, marked ``load`` (deselected by default; select it with
``pytest -m load tests/load``). Full durations come from the environment:

* ``RISKWIRE_LOAD_SECONDS`` — load, stress (per round) and fault runs (default 120);
* ``RISKWIRE_SOAK_SECONDS`` — the soak run (default 1800, i.e. 30 minutes).

The servers listen on 127.0.0.1 only, use the session's model package
(``models_dir``), snapshot card state into a temporary directory, and are stopped at
teardown. The process helpers are tests/server/conftest.py's, loaded by path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

SMOKE_SECONDS = {"load": 6.0, "stress": 3.0, "soak": 10.0, "fault": 6.0}
FULL_SECONDS_ENV = {"soak": "RISKWIRE_SOAK_SECONDS"}  # the others: RISKWIRE_LOAD_SECONDS
FULL_SECONDS_DEFAULT = {"soak": 1800.0}  # the others: 120 s
LOAD_SECONDS_ENV = "RISKWIRE_LOAD_SECONDS"
# Per worker: gRPC answers RESOURCE_EXHAUSTED past this many calls in flight, so the
# stress test sees load shedding instead of only client-side deadlines.
MAX_CONCURRENT_RPCS = 24


def _load_server_helpers() -> ModuleType:
    """tests/server/conftest.py as a plain module (its ServerProcess and helpers)."""
    path = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_riskwire_load_server_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


helpers = _load_server_helpers()
ServerProcess = helpers.ServerProcess


def full_seconds(kind: str) -> float:
    """Duration of the full (``load``-marked) run of a test kind, from the environment."""
    env = FULL_SECONDS_ENV.get(kind, LOAD_SECONDS_ENV)
    default = FULL_SECONDS_DEFAULT.get(kind, 120.0)
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise pytest.UsageError(f"{env}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise pytest.UsageError(f"{env} must be > 0, got {value}")
    return value


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``duration_s`` of ``test_<kind>...``: smoke (CI) and full (``load``)."""
    if "duration_s" not in metafunc.fixturenames:
        return
    kind = metafunc.function.__name__.removeprefix("test_").split("_", 1)[0]
    if kind not in SMOKE_SECONDS:
        raise pytest.UsageError(f"{metafunc.function.__name__}: no durations for {kind!r}")
    full = full_seconds(kind)
    metafunc.parametrize(
        "duration_s",
        [
            pytest.param(SMOKE_SECONDS[kind], id="smoke", marks=pytest.mark.timeout(300)),
            pytest.param(
                full,
                id="full",
                marks=[pytest.mark.load, pytest.mark.timeout(int(full * 3 + 600))],
            ),
        ],
    )


StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def start_load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Factory ``start(models, env=None)``: a 2-worker test-profile server, SERVING.

    Servers still running at the end of the session are stopped (SIGTERM, then SIGKILL).
    """
    started: list[ServerProcess] = []

    def start(models: Path, env: dict[str, str] | None = None) -> ServerProcess:
        snapshot = tmp_path_factory.mktemp("load-state") / "cards.snapshot"
        port = helpers.free_port()
        args = helpers.serve_args(models, port, "--workers", "2", "--profile", "test")
        server = helpers.ServerProcess(args, helpers.server_env(snapshot, env), port, snapshot)
        started.append(server)
        server.wait_serving(workers=2)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def load_server(start_load_server: StartServer, models_dir: Path) -> ServerProcess:
    """The 2-worker server the load, stress and soak tests share (fault tests get their own).

    It caps calls in flight at ``MAX_CONCURRENT_RPCS`` per worker, as a deployment that
    wants overload shed quickly would.
    """
    return start_load_server(
        models_dir, env={"RISKWIRE_MAX_CONCURRENT_RPCS": str(MAX_CONCURRENT_RPCS)}
    )
