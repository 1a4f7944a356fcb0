"""``riskwire keys …``: API keys of the servers' bearer authentication.

    riskwire keys create --client C --roles score[,feedback,admin,read] [--key-file F]
    riskwire keys list [--json]
    riskwire keys revoke KEY_ID | --client C

Every command takes ``--key-file F`` and ``--models DIR``. The key file is ``--key-file``,
else ``$RISKWIRE_KEY_FILE``, else ``<models>/.auth/keys.json`` (models: ``--models``,
``$RISKWIRE_MODELS`` or ``./models``). ``create`` prints the new key once; the file
keeps only a salted hash. Running servers pick up changes within about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

KEY_FILE_ENV = "RISKWIRE_KEY_FILE"


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``keys`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser("keys", help="API keys: create, list, revoke").add_subparsers(
        dest="keys_command", required=True
    )

    create = group.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--client", required=True, help="client id, e.g. payments")
    create.add_argument(
        "--roles", required=True, help="comma-separated: score, feedback, admin, read"
    )
    _file_args(create)
    create.set_defaults(handler=cmd_create)

    listing = group.add_parser("list", help="keys, oldest first (never the secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    _file_args(listing)
    listing.set_defaults(handler=cmd_list)

    revoke = group.add_parser("revoke", help="revoke a key by id, or every key of a client")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("key_id", nargs="?", default=None, help="the key id (see keys list)")
    which.add_argument("--client", default=None, help="revoke every key of this client id")
    _file_args(revoke)
    revoke.set_defaults(handler=cmd_revoke)
    return group


def _file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        dest="key_file",
        default=None,
        help=f"key file (default: ${KEY_FILE_ENV} or <models>/.auth/keys.json)",
    )
    parser.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )


def key_file(args: argparse.Namespace) -> Path:
    """``--key-file`` > ``$RISKWIRE_KEY_FILE`` > ``<models>/.auth/keys.json``."""
    explicit = args.key_file or os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit)
    from riskwire.pipeline.package import models_dir
    from riskwire.server.auth import default_key_file

    return default_key_file(models_dir(args.models))


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


def _env_note() -> None:
    from riskwire.server.auth import ENV_VAR

    if os.environ.get(ENV_VAR):
        print(
            f"riskwire: note: ${ENV_VAR} is set; servers started with it ignore the key file",
            file=sys.stderr,
        )


def _audit(args: argparse.Namespace, action: str, arguments: dict[str, Any], result: str) -> None:
    """Append a key change to the audit log (the caller is the local OS user)."""
    import getpass
    import socket

    from riskwire.server.audit import AuditLog

    from .audit_cli import audit_log_path

    client = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    try:
        AuditLog(audit_log_path(None, args.models)).append(client, action, arguments, result)
    except OSError as exc:
        print(f"riskwire: warning: audit log not written: {exc}", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    """Create a key, print it once."""
    from riskwire.server.auth import AuthError, create_key

    path = key_file(args)
    arguments = {"client": args.client, "roles": args.roles, "file": str(path)}
    try:
        key = create_key(path, args.client, args.roles)
    except (AuthError, OSError) as exc:
        _audit(args, "keys.create", arguments, f"error: {exc}")
        return _error(str(exc))
    _audit(args, "keys.create", {**arguments, "key_id": key.split("_")[1]}, "ok")
    print(key)
    print(
        f"created key {key.split('_')[1]} for client {args.client!r} in {path}; "
        "store it now, it cannot be shown again",
        file=sys.stderr,
    )
    _env_note()
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the keys of the key file, one line each."""
    from riskwire.server.auth import AuthError, list_keys

    path = key_file(args)
    try:
        keys = list_keys(path)
    except (AuthError, OSError) as exc:
        return _error(str(exc))
    if args.json:
        for key in keys:
            print(json.dumps(key, sort_keys=True))
        return 0
    if not keys:
        print(f"no keys in {path}")
        return 0
    print(format_keys(keys))
    return 0


def format_keys(keys: list[dict[str, Any]]) -> str:
    """A table: key id, client, roles, created, state (active or revoked at …)."""
    header = ("key_id", "client", "roles", "created", "state")
    rows = [
        (
            k["key_id"],
            k["client_id"],
            ",".join(k["roles"]),
            k["created_at"] or "?",
            f"revoked {k['revoked_at']}" if k["revoked_at"] else "active",
        )
        for k in keys
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in (header, *rows)
    )


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id, or every key of ``--client``."""
    from riskwire.server.auth import AuthError, revoke_key

    path = key_file(args)
    by_client = args.client is not None
    arguments = {"client": args.client, "key_id": args.key_id, "file": str(path)}
    try:
        revoked = revoke_key(path, args.client if by_client else args.key_id, client=by_client)
    except (AuthError, OSError) as exc:
        _audit(args, "keys.revoke", arguments, f"error: {exc}")
        return _error(str(exc))
    _audit(args, "keys.revoke", {**arguments, "revoked": revoked}, "ok")
    what = f"client {args.client!r}" if by_client else f"key {args.key_id}"
    if revoked:
        print(f"revoked {', '.join(revoked)} ({what}) in {path}")
    else:
        print(f"{what}: already revoked")
    _env_note()
    return 0
