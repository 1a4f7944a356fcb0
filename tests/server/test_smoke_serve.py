"""``make serve`` equivalent: ``riskwire serve`` with default workers answers health."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(300)


def test_serve_with_default_workers_is_serving(start_server, models_dir) -> None:
    """As ``make serve`` runs it (default profile and workers = one per core): SERVING
    within 120 s, every service SERVING, and a clean stop."""
    cores = len(os.sched_getaffinity(0))
    server = start_server(models_dir, workers=None, profile=None, wait=False)
    server.wait_serving(workers=cores, timeout_s=120)
    assert len(server.worker_pids()) == cores
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "riskwire.v1.Scoring", "inference.GRPCInferenceService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    assert server.stop() == 0, server.log_tail()
