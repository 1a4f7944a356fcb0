"""``riskwire governance …``: the pre-production checklist and approvals of a package.

    riskwire governance check NAME VERSION [--models DIR] [--primary V]
                              [--require-monitoring] [--shadow-records N] [--json]
    riskwire governance approve NAME VERSION --by CLIENT [--note TEXT] [--models DIR]
                                [--key-file F] [--json]

``check`` prints each checklist item as PASS/FAIL with its detail, then the gate decision
for the package's risk category (see ``riskwire.server.governance``); it exits 0 when
promotion would be allowed, 1 when not (2: bad arguments or no such package). The target
environment is the one the server settings resolve to here (``RISKWIRE_*`` variables:
``auth``, ``tls_cert``, ``shadow_dir``); the primary is ``--primary``, else the model's
current primary (``traffic.json``), else the highest version below the candidate. Paired
shadow records of the candidate are counted in the shadow directory unless
``--shadow-records`` gives the count.

``approve`` records an approval of the package's current bytes (its MANIFEST.sha256) in
``<models>/.governance/approvals.jsonl`` and the audit log. ``--by`` must be a client with
an active ``admin`` key (``$RISKWIRE_API_KEYS``, else ``--key-file``, ``$RISKWIRE_KEY_FILE``
or ``<models>/.auth/keys.json``). Models: ``--models`` > ``$RISKWIRE_MODELS`` > ``./models``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``governance`` command group to the top-level subparsers; return it."""
    group = commands.add_parser(
        "governance", help="promotion gate: pre-production checklist, approvals"
    ).add_subparsers(dest="governance_command", required=True)

    check = group.add_parser("check", help="evaluate the pre-production checklist of a package")
    _package_args(check)
    check.add_argument(
        "--primary", default=None, help="current primary version (default: highest below)"
    )
    check.add_argument(
        "--require-monitoring",
        dest="require_monitoring",
        action="store_true",
        help="shadow results must be available (at least 1000 paired records)",
    )
    check.add_argument(
        "--shadow-records",
        dest="shadow_records",
        type=int,
        default=None,
        help="paired shadow records of the candidate (default: counted in the shadow dir)",
    )
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(handler=cmd_check)

    approve = group.add_parser("approve", help="record an approval of a package (admin)")
    _package_args(approve)
    approve.add_argument("--by", required=True, help="client id of the approving admin")
    approve.add_argument("--note", default="", help="why it is approved (ticket, review)")
    approve.add_argument(
        "--key-file",
        dest="key_file",
        default=None,
        help="key file holding --by's admin key (default: $RISKWIRE_KEY_FILE or under models)",
    )
    approve.add_argument("--json", action="store_true", help="print the approval as JSON")
    approve.set_defaults(handler=cmd_approve)
    return group


def _package_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name, e.g. fraud")
    parser.add_argument("version", help="package version, e.g. 7")
    parser.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Print the checklist and the gate decision; 0 if promotion would be allowed, else 1."""
    from riskwire.pipeline.package import models_dir
    from riskwire.server.config import SettingsError, load_settings
    from riskwire.server.errors import ModelNotFoundError
    from riskwire.server.governance import GovernanceError, promotion_gate

    models = models_dir(args.models)
    try:
        settings = load_settings(environ=dict(os.environ))
        primary = args.primary if args.primary is not None else default_primary(models, args)
        shadow_records = args.shadow_records
        if shadow_records is None:
            shadow_records = shadow_record_count(settings.shadow_path, args.name, args.version)
        environment = {
            "auth": settings.auth,
            "tls": bool(settings.tls_cert),
            "shadow_records": shadow_records,
        }
        decision = promotion_gate(
            models,
            args.name,
            args.version,
            primary_version=primary,
            environment=environment,
            require_monitoring=args.require_monitoring,
        )
    except (SettingsError, GovernanceError, ModelNotFoundError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps({**decision.to_dict(), "primary_version": primary}, sort_keys=True))
    else:
        print(format_decision(decision, primary))
    return 0 if decision.allowed else 1


def default_primary(models: Path, args: argparse.Namespace) -> str | None:
    """The model's current primary (its traffic configuration), else the highest version
    below the candidate; None when there is none."""
    from riskwire.pipeline.package import list_versions
    from riskwire.server.governance import GovernanceError
    from riskwire.server.traffic import read_traffic

    if not str(args.version).isdigit():
        raise GovernanceError(f"version {args.version!r}: expected a positive integer")
    try:
        traffic = read_traffic(models, args.name)
    except ValueError as exc:
        raise GovernanceError(str(exc)) from exc
    if traffic is not None and traffic.primary != str(args.version):
        return traffic.primary
    below = [v for v in list_versions(models, args.name) if v < int(args.version)]
    return str(below[-1]) if below else None


def shadow_record_count(shadow_dir: Path, name: str, version: str) -> int:
    """Paired records in ``shadow_dir`` whose shadow was ``name`` v``version`` and answered."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from riskwire.shadow.records import RECORDS, segment_files

    columns = ["shadow_model", "shadow_version", "shadow_probability"]
    total = 0
    for segment in segment_files(shadow_dir, RECORDS):
        try:
            table = pq.read_table(segment, columns=columns)
        except (OSError, KeyError, ValueError):  # unreadable, or an older schema
            continue
        mine = pc.and_(
            pc.equal(table["shadow_model"], name), pc.equal(table["shadow_version"], str(version))
        )
        answered = pc.and_(mine, pc.is_valid(table["shadow_probability"]))
        total += int(pc.sum(pc.cast(pc.fill_null(answered, False), "int64")).as_py() or 0)
    return total


def format_decision(decision: Any, primary: str | None) -> str:
    """The checklist (one PASS/FAIL line per item) and the gate decision, for people."""
    lines = [
        f"governance check {decision.model} v{decision.version}: risk {decision.risk}, "
        f"owner {decision.owner}, primary {'v' + primary if primary else 'none'}"
    ]
    width = max(len(item.name) for item in decision.items)
    for item in decision.items:
        state = "PASS" if item.passed else "FAIL"
        note = "" if item.required else "  (not required)"
        lines.append(f"  {state}  {item.name:<{width}}  {item.detail}{note}")
    approvers = ", ".join(decision.approved_by) or "none for these bytes"
    lines.append(f"approvals: {approvers}")
    verdict = "ALLOWED" if decision.allowed else "NOT ALLOWED"
    lines.append(f"promotion to primary or canary: {verdict} ({_rule(decision.risk)})")
    lines.extend(f"  - {reason}" for reason in decision.reasons)
    return "\n".join(lines)


def _rule(risk: str) -> str:
    return {
        "low": "low risk: may be promoted directly",
        "medium": "medium risk: every required item must pass",
        "high": "high risk: every required item must pass and an approval is needed",
    }.get(risk, risk)


# -------------------------------------------------------------------------- approve


def cmd_approve(args: argparse.Namespace) -> int:
    """Record an approval by an admin client and print it."""
    from riskwire.pipeline.package import models_dir
    from riskwire.server.audit import AuditLog
    from riskwire.server.auth import AuthError
    from riskwire.server.errors import ModelNotFoundError
    from riskwire.server.governance import GovernanceError, record_approval

    from .audit_cli import audit_log_path

    models = models_dir(args.models)
    try:
        source, roles = client_roles(args, args.by)
        if "admin" not in roles:
            return _error(
                f"client {args.by!r} holds no active admin key in {source}: approvals need "
                f"the admin role (riskwire keys create --client {args.by} --roles admin)"
            )
        approval = record_approval(
            models,
            args.name,
            args.version,
            args.by,
            args.note,
            audit_log=AuditLog(audit_log_path(None, args.models)),
        )
    except (AuthError, GovernanceError, ModelNotFoundError, OSError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(approval, sort_keys=True))
    else:
        note = f": {approval['note']}" if approval["note"] else ""
        print(
            f"approved {approval['model']} v{approval['version']} by {approval['by']} at "
            f"{approval['time']} (manifest sha256 {approval['manifest_sha256'][:16]}){note}"
        )
    return 0


def client_roles(args: argparse.Namespace, client_id: str) -> tuple[str, frozenset[str]]:
    """(where the keys came from, the roles of ``client_id``'s active keys there)."""
    from riskwire.server.auth import ENV_VAR, parse_key_document, read_entries

    from .keys_cli import key_file

    inline = os.environ.get(ENV_VAR)
    if inline:
        source, entries = f"${ENV_VAR}", parse_key_document(inline, source=f"${ENV_VAR}")
    else:
        path = key_file(args)
        source, entries = str(path), read_entries(path)
    roles = {
        role
        for entry in entries
        if entry["client_id"] == client_id and not entry.get("revoked_at")
        for role in entry["roles"]
    }
    return source, frozenset(roles)
