"""``riskwire certs dev``: the generated CA, server and client certificates, and a real
mutual-TLS gRPC round trip with them."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from riskwire.clients.certs_cli import generate_dev_certificates
from riskwire.clients.cli import main
from riskwire.server.auth import client_id_from_certificate

pytestmark = pytest.mark.timeout(60)

CLIENT = "payments-test"
WHOAMI = "/riskwire.test.Whoami/Who"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tls")
    return generate_dev_certificates(out, hosts=("api.example.test", "10.1.2.3"), client=CLIENT)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_load_and_keys_are_private(certs: dict[str, Path]) -> None:
    assert {p.name for p in certs.values()} == {
        "ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key",
    }  # fmt: skip
    for role in ("ca", "server", "client"):
        key = load_pem_private_key(certs[f"{role}_key"].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        cert = load_cert(certs[f"{role}_cert"])
        assert cert.public_key() == key.public_key()
        assert stat.S_IMODE(certs[f"{role}_key"].stat().st_mode) == 0o600


def test_server_certificate_verifies_against_ca(certs: dict[str, Path]) -> None:
    ca, server = load_cert(certs["ca_cert"]), load_cert(certs["server_cert"])
    builder = PolicyBuilder().store(Store([ca]))
    for name in ("localhost", "api.example.test"):
        chain = builder.build_server_verifier(x509.DNSName(name)).verify(server, [])
        assert chain[-1] == ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "api.example.test"} <= set(sans.get_values_for_type(x509.DNSName))
    ips = set(sans.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")} <= ips
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_client_certificate_has_cn_and_client_auth(certs: dict[str, Path]) -> None:
    ca, client = load_cert(certs["ca_cert"]), load_cert(certs["client_cert"])
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CLIENT
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(client, [])
    assert verified.chain[-1] == ca


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_both_leaves(certs: dict[str, Path]) -> None:
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", certs["ca_cert"], certs["server_cert"],
         certs["client_cert"]],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo the client id the auth helper reads from the peer certificate."""
    return (client_id_from_certificate(context.auth_context()) or "").encode()


@pytest.fixture(scope="module")
def mtls_port(certs: dict[str, Path]) -> Iterator[int]:
    """An in-process gRPC server requiring client certificates: health + Whoami."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "riskwire.test.Whoami", {"Who": grpc.unary_unary_rpc_method_handler(_whoami)}
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(certs["server_key"].read_bytes(), certs["server_cert"].read_bytes())],
        root_certificates=certs["ca_cert"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _channel(port: int, certs: dict[str, Path], *, client_cert: bool) -> grpc.Channel:
    pair = (
        {
            "private_key": certs["client_key"].read_bytes(),
            "certificate_chain": certs["client_cert"].read_bytes(),
        }
        if client_cert
        else {}
    )
    credentials = grpc.ssl_channel_credentials(certs["ca_cert"].read_bytes(), **pair)
    # localhost may resolve to ::1 first, where nothing listens; pin the name, dial IPv4.
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def test_mutual_tls_round_trip(mtls_port: int, certs: dict[str, Path]) -> None:
    with _channel(mtls_port, certs, client_cert=True) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert channel.unary_unary(WHOAMI)(b"", timeout=10) == CLIENT.encode()


def test_localhost_name_round_trip(mtls_port: int, certs: dict[str, Path]) -> None:
    """Dialling ``localhost:<port>`` verifies the server certificate by its DNS name."""
    credentials = grpc.ssl_channel_credentials(
        certs["ca_cert"].read_bytes(),
        certs["client_key"].read_bytes(),
        certs["client_cert"].read_bytes(),
    )
    with grpc.secure_channel(f"localhost:{mtls_port}", credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_connection_without_client_certificate_fails(
    mtls_port: int, certs: dict[str, Path]
) -> None:
    with (
        _channel(mtls_port, certs, client_cert=False) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_fails(
    mtls_port: int, certs: dict[str, Path], tmp_path: Path
) -> None:
    other = generate_dev_certificates(tmp_path / "other", client="intruder")
    credentials = grpc.ssl_channel_credentials(
        certs["ca_cert"].read_bytes(),
        other["client_key"].read_bytes(),
        other["client_cert"].read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    with (
        grpc.secure_channel(f"127.0.0.1:{mtls_port}", credentials, options=options) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_certs_dev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default out dir <models>/.tls; prints the paths and the settings to use."""
    monkeypatch.setenv("RISKWIRE_MODELS", str(tmp_path / "models"))
    assert main(["certs", "dev", "--host", "a.test,10.0.0.9", "--host", "b.test"]) == 0
    out = capsys.readouterr().out
    tls = tmp_path / "models" / ".tls"
    assert f'tls_cert = "{tls / "server.pem"}"' in out
    assert f'tls_key = "{tls / "server.key"}"' in out
    assert f'tls_client_ca = "{tls / "ca.pem"}"' in out
    assert str(tls / "client.key") in out
    sans = (
        load_cert(tls / "server.pem")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert {"a.test", "b.test", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    client = load_cert(tls / "client.pem")
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "riskwire-dev-client"
    )


def test_cli_certs_dev_rejects_bad_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "dev", "--out", str(tmp_path), "--days", "0"]) == 2
    assert "--days" in capsys.readouterr().err
