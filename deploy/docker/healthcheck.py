#!/usr/bin/env python3
"""gRPC health probe for a riskwire pod: ``grpc.health.v1.Health/Check`` on the data plane.

Kubernetes' native ``grpc:`` probe connects in plaintext only (before 1.37, which adds
``mode: TLS``), and profile prod serves the data plane over TLS, so the pod's probes run
this script instead (installed in the image as ``/usr/local/bin/riskwire-healthcheck``).

TLS is on when ``--tls-cert`` (default: ``$RISKWIRE_TLS_CERT``, which the pod's ConfigMap
sets) names the server's certificate. The CA comes from ``--ca`` (default: ``ca.crt``
beside the certificate, as in a cert-manager Secret, else the certificate itself), and
the name checked against the certificate is ``--server-name`` (default: ``localhost``
when the certificate holds it or 127.0.0.1, else its first DNS name). For mutual TLS,
``--client-cert`` and ``--client-key`` present a certificate.

Exit status: 0 SERVING (with ``--alive``: any answer, e.g. NOT_SERVING while draining or
warming, which a liveness probe must not punish); 1 answered but not SERVING; 2 no
answer (refused, timed out, TLS failure). Only grpcio and grpcio-health-checking are
imported (cryptography too with TLS), so a probe costs ~0.1 s of CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _server_name(cert_pem: bytes) -> str:
    """The name to check the server certificate against when dialling 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        ips = names.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        dns, ips = [], []
    if "localhost" in dns or ipaddress.ip_address("127.0.0.1") in ips:
        return "localhost"
    for name in dns:
        return name.replace("*.", "probe.", 1)  # a wildcard matches any one label
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else "localhost"


def _channel(args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    if not args.tls_cert:
        return grpc.insecure_channel(args.address, options=options)
    cert = Path(args.tls_cert).read_bytes()
    ca_path = Path(args.ca) if args.ca else Path(args.tls_cert).with_name("ca.crt")
    ca = ca_path.read_bytes() if ca_path.is_file() else cert
    client = (None, None)
    if args.client_cert and args.client_key:
        client = (Path(args.client_key).read_bytes(), Path(args.client_cert).read_bytes())
    credentials = grpc.ssl_channel_credentials(ca, *client)
    name = args.server_name or _server_name(cert)
    options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("RISKWIRE_PORT", "50051")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port to dial")
    parser.add_argument("--service", default="", help='health service name ("" = server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds for the call")
    parser.add_argument("--alive", action="store_true", help="any answer passes (liveness)")
    parser.add_argument("--plaintext", action="store_true", help="no TLS whatever is set")
    parser.add_argument("--tls-cert", default=os.environ.get("RISKWIRE_TLS_CERT", ""))
    parser.add_argument("--ca", default=os.environ.get("RISKWIRE_HEALTHCHECK_CA", ""))
    parser.add_argument("--server-name", default="")
    parser.add_argument("--client-cert", default="")
    parser.add_argument("--client-key", default="")
    args = parser.parse_args(argv)
    if args.plaintext:
        args.tls_cert = ""
    try:
        with _channel(args) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"no answer from {args.address}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot read TLS files: {exc}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.address}: {status}")
    if response.status == health_pb2.HealthCheckResponse.SERVING or args.alive:
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
