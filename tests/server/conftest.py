"""Fixtures for integration tests against a real ``riskwire serve`` subprocess.

``server`` is one shared 2-worker server for the whole session (state is shared, so
tests use fresh card ids); ``start_server`` starts dedicated servers for tests that
kill, restart or misconfigure one, and stops them all at teardown. Every server
listens on 127.0.0.1 only and snapshots its card state into a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskwire.net import free_port
from riskwire.protos import scoring_pb2, scoring_pb2_grpc

START_TIMEOUT_S = 120.0  # workers import, load and warm Numba kernels before SERVING
STOP_TIMEOUT_S = 30.0
EPOCH_2026_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class ServerProcess:
    """A ``riskwire serve`` subprocess with its merged stdout/stderr captured by a thread."""

    def __init__(self, args: Sequence[str], env: dict[str, str], port: int, snapshot: Path):
        self.port = port
        self.admin_port = int(env["RISKWIRE_ADMIN_PORT"])
        self.metrics_port = int(env["RISKWIRE_METRICS_PORT"])
        self.snapshot = snapshot
        self.args = list(args)
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def target(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        """host:port of the admin API (control plane)."""
        return f"127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self) -> str:
        """Everything the server printed so far."""
        with self._changed:
            return "".join(self._lines)

    def wait_for_log(self, predicate: Callable[[str], bool], timeout_s: float) -> str:
        """The first log line matching ``predicate``; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no matching log line in {timeout_s}s; log:\n{self.log_tail()}")
                self._changed.wait(min(remaining, 0.5))

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the log, for failure messages."""
        with self._changed:
            return "".join(self._lines[-lines:])

    def wait_exit(self, timeout_s: float) -> int:
        """Exit status once the process ends; fails after ``timeout_s``."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running after {timeout_s}s; log:\n{self.log_tail()}")

    def wait_serving(self, workers: int | None = 2, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the supervisor's 'serving on' line, then for health SERVING."""
        deadline = time.monotonic() + timeout_s
        marker = f"serving on 127.0.0.1:{self.port} with "
        if workers is not None:
            marker += f"{workers} workers"
        with self._changed:
            while not any(marker in line for line in self._lines):
                if self.process.poll() is not None:
                    pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"server not ready in {timeout_s}s; log:\n{self.log_tail()}")
                self._changed.wait(min(remaining, 0.5))
        self.wait_health(deadline - time.monotonic())

    def wait_health(self, timeout_s: float = 30.0) -> None:
        """Poll grpc.health.v1 (service "") on fresh connections until SERVING."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
            last = self.health()
            if last == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)  # poll interval, bounded by the deadline
        pytest.fail(f"health not SERVING in {timeout_s}s (last: {last}); log:\n{self.log_tail()}")

    def health(self) -> object:
        """One health check on a new connection: the status, or the RpcError's code."""
        with grpc.insecure_channel(self.target, options=[local_pool()]) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
            except grpc.RpcError as exc:
                return exc.code()
            return response.status

    @staticmethod
    def worker_of(request_id: str) -> int:
        """The worker that served a call: server-generated request ids start with its pid (hex)."""
        return int(request_id.split("-", 1)[0], 16)

    def connect_each_worker(self, max_connections: int = 40) -> dict[int, grpc.Channel]:
        """One channel (own TCP connection) per live worker, found by probing with fresh cards.

        SO_REUSEPORT spreads connections over the workers, so a handful of connections
        reaches every worker; the caller closes the channels.
        """
        workers, found = self.worker_pids(), {}
        for i in range(max_connections):
            channel = grpc.insecure_channel(self.target, options=[local_pool(), ("probe", i)])
            probe = scoring_pb2.ScoreRequest(
                transaction=scoring_pb2.Transaction(
                    card_id=f"probe-{uuid.uuid4().hex}", merchant_id="m-1", amount=1.0, mcc=5411
                )
            )
            response = scoring_pb2_grpc.ScoringStub(channel).Score(probe, timeout=10)
            pid = self.worker_of(response.request_id)
            if pid in found:
                channel.close()
            else:
                found[pid] = channel
            if set(found) == workers:
                return found
        for channel in found.values():
            channel.close()
        pytest.fail(f"{max_connections} connections reached workers {sorted(found)} of {workers}")

    def worker_pids(self) -> set[int]:
        """Pids of the live worker processes (spawned children of the supervisor)."""
        return {p for p in child_pids(self.pid) if "multiprocessing.spawn" in _cmdline(p)}

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, then SIGKILL the supervisor and any worker left behind."""
        if self.process.poll() is not None:
            return self.process.returncode
        workers = self.worker_pids()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in workers | self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=timeout_s)
            return None


def local_pool() -> tuple[str, int]:
    """Channel option giving a channel its own TCP connection (not the global pool)."""
    return ("grpc.use_local_subchannel_pool", 1)


def server_env(snapshot: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server: no inherited RISKWIRE_*, snapshots in ``snapshot``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    env["RISKWIRE_STATE_SNAPSHOT"] = str(snapshot)
    env["RISKWIRE_ADMIN_PORT"] = str(free_port())
    env["RISKWIRE_METRICS_PORT"] = str(free_port())
    env.update(extra or {})
    return env


def serve_args(models: Path, port: int, *extra: str) -> list[str]:
    """Command line of ``riskwire serve`` on 127.0.0.1:port."""
    return [
        sys.executable, "-m", "riskwire.clients.cli", "serve",
        "--models", str(models), "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


StartServer = Callable[..., ServerProcess]


@contextlib.contextmanager
def _server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """A :data:`StartServer` that stops every server it started when the block ends."""
    started: list[ServerProcess] = []

    def start(
        models: Path,
        *extra: str,
        snapshot: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        workers: int | None = 2,
        profile: str | None = "test",
    ) -> ServerProcess:
        if snapshot is None:
            snapshot = tmp_path_factory.mktemp("state") / "cards.snapshot"
        args = list(extra)
        if "--workers" not in args and workers is not None:
            args += ["--workers", str(workers)]
        if "--profile" not in args and profile is not None:
            args += ["--profile", profile]
        port = free_port()
        server = ServerProcess(
            serve_args(models, port, *args), server_env(snapshot, env), port, snapshot
        )
        started.append(server)
        if wait:
            server.wait_serving(workers=workers)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Factory: ``start_server(models, *extra_args, snapshot=, env=, wait=, workers=, profile=)``.

    Adds ``--workers 2 --profile test`` unless ``extra_args`` name them or ``workers`` /
    ``profile`` is None (the server's own default); waits until SERVING unless
    ``wait=False``. Every server started is stopped when the test ends, so the suite
    never holds more than a few servers (and their memory) at once.
    """
    with _server_factory(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def module_start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """:func:`start_server` for module-scoped fixtures: stopped when the module ends."""
    with _server_factory(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """The shared 2-worker server on ``models_dir`` (use fresh card ids in every test)."""
    with _server_factory(tmp_path_factory) as start:
        yield start(models_dir)


@pytest.fixture(scope="session")
def thresholds(built_model) -> dict[str, float]:
    """The package's decision thresholds (review, decline)."""
    import json

    metadata = json.loads((built_model.path / "metadata.json").read_text())
    return {k: float(metadata["thresholds"][k]) for k in ("review", "decline")}


@pytest.fixture(scope="session")
def forest(built_model):
    """The compiled forest of the built package, as the server loads it."""
    from riskwire.pipeline.package import load_package

    return load_package(built_model.path).forest


@pytest.fixture(scope="session")
def oip_pb() -> SimpleNamespace:
    """riskwire's ``inference.*`` message classes, from a private descriptor pool.

    Importing ``riskwire.protos.inference_pb2`` here would claim the ``inference.*``
    symbols in the default pool, which tritonclient's generated code also claims (and
    vice versa), so tests build the classes from the committed module's serialized
    descriptor without importing it.
    """
    import ast

    import riskwire.protos

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
    file = pool.FindFileByName(proto.name)
    return SimpleNamespace(
        **{
            name: message_factory.GetMessageClass(descriptor)
            for name, descriptor in file.message_types_by_name.items()
        }
    )


REDIS_START_TIMEOUT_S = 10.0


class RedisServer:
    """A ``redis-server`` child process without persistence, restartable on its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        import redis

        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on {self.port}") from None
                    time.sleep(0.01)
        finally:
            probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def client(self):  # noqa: ANN201 - redis.Redis
        """A plain redis-py client of this server."""
        import redis

        return redis.Redis(port=self.port, socket_timeout=2.0)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):  # noqa: ANN201
    """A redis-server on a free loopback port for the module (skips without one)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):  # noqa: ANN201
    """A redis-server of this test alone (stopped and restarted by it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
