"""``riskwire certs dev``: a local CA, server and client certificates for testing TLS.

    riskwire certs dev [--out DIR] [--host NAMES] [--client NAME] [--days N] [--models DIR]

Writes to ``--out`` (default ``<models>/.tls``): ``ca.pem``/``ca.key`` (the CA),
``server.pem``/``server.key`` (for localhost, 127.0.0.1, ::1 and each ``--host``) and
``client.pem``/``client.key`` (CN = ``--client``, clientAuth, for mutual TLS). EC P-256
keys, unencrypted PEM, mode 0600. For development only: existing files are replaced.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DEFAULT_CLIENT = "riskwire-dev-client"
DEFAULT_DAYS = 30
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_CLOCK_SKEW = timedelta(minutes=5)
_DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``certs`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser("certs", help="TLS certificates for development").add_subparsers(
        dest="certs_command", required=True
    )
    dev = group.add_parser("dev", help="generate a local CA, server and client certificates")
    dev.add_argument("--out", default=None, help="output directory (default: <models>/.tls)")
    dev.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra server name or IP (comma-separated or repeated); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    dev.add_argument(
        "--client", default=DEFAULT_CLIENT, help=f"client certificate CN (default {DEFAULT_CLIENT})"
    )
    dev.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    dev.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    dev.set_defaults(handler=cmd_dev)
    return group


def cmd_dev(args: argparse.Namespace) -> int:
    """Generate the development certificates and print how to use them."""
    if args.out:
        out = Path(args.out)
    else:
        from riskwire.pipeline.package import models_dir

        out = models_dir(args.models) / ".tls"
    hosts = [h.strip() for value in args.host for h in value.split(",") if h.strip()]
    try:
        paths = generate_dev_certificates(out, hosts=hosts, client=args.client, days=args.days)
    except (ValueError, OSError) as exc:
        print(f"riskwire: error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
    print(f"wrote a development CA and certificates to {out} (valid {args.days} days)")
    for name, path in paths.items():
        print(f"  {name:<11} {path}")
    print(f"\nserver ({names}), in the server config:")
    print(f'  tls_cert = "{paths["server_cert"]}"')
    print(f'  tls_key = "{paths["server_key"]}"')
    print(f'  tls_client_ca = "{paths["ca_cert"]}"   # mutual TLS: require client certificates')
    print(f"client (CN={args.client}, for mutual TLS):")
    print(f"  CA {paths['ca_cert']}")
    print(f"  certificate {paths['client_cert']}, key {paths['client_key']}")
    print(
        f"  e.g. grpcurl -cacert {paths['ca_cert']} -cert {paths['client_cert']} "
        f"-key {paths['client_key']} localhost:50051 list"
    )
    return 0


def generate_dev_certificates(
    out_dir: str | os.PathLike[str],
    *,
    hosts: Iterable[str] = (),
    client: str = DEFAULT_CLIENT,
    days: int = DEFAULT_DAYS,
) -> dict[str, Path]:
    """Write a CA, a server and a client certificate with their keys to ``out_dir``.

    The server certificate names localhost, 127.0.0.1, ::1 and ``hosts`` (DNS names or IP
    addresses); the client certificate has CN ``client`` and the clientAuth usage.
    Returns the paths by role: ca_cert, ca_key, server_cert, server_key, client_cert,
    client_key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    if not client or len(client) > 64:
        raise ValueError(f"--client {client!r}: expected 1 to 64 characters")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    validity = (now - _CLOCK_SKEW, now + timedelta(days=days))

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "riskwire development"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("riskwire development CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, _sha256())
    )

    def leaf(common_name: str, usage: Any, alt_names: list[Any]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(name(common_name), ca_name, key.public_key(), validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), False)
        return builder.sign(ca_key, _sha256()), key

    server_names = list(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
    server_cert, server_key = leaf(
        "localhost", ExtendedKeyUsageOID.SERVER_AUTH, [_general_name(h) for h in server_names]
    )
    # A DNS SAN with the client name, when it is one: strict RFC 5280 verifiers want a SAN.
    client_alt = [x509.DNSName(client)] if _DNS_NAME.fullmatch(client) else []
    client_cert, client_key = leaf(client, ExtendedKeyUsageOID.CLIENT_AUTH, client_alt)

    paths = {
        "ca_cert": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
        "client_cert": out / "client.pem",
        "client_key": out / "client.key",
    }
    for role, cert, key in (
        ("ca", ca_cert, ca_key),
        ("server", server_cert, server_key),
        ("client", client_cert, client_key),
    ):
        _write(paths[f"{role}_key"], _key_pem(key), mode=0o600)
        _write(paths[f"{role}_cert"], _cert_pem(cert), mode=0o644)
    return paths


def _builder(subject: Any, issuer: Any, public_key: Any, validity: tuple[datetime, datetime]):
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
    )


def _key_usage(*, cert_sign: bool) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> Any:
    """An IPAddress SAN for an IP literal, a DNSName otherwise."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or len(host) > 253 or any(c.isspace() for c in host):
        raise ValueError(f"--host {host!r}: not a DNS name or IP address")
    return x509.DNSName(host)


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _key_pem(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_pem(cert: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _write(path: Path, text: str, *, mode: int) -> None:
    """Write atomically (the temporary file is created 0600), then set ``mode``."""
    from riskwire.files import write_text_atomic

    write_text_atomic(path, text)
    os.chmod(path, mode)
