"""``riskwire audit …``: check and list the hash-chained admin audit log.

    riskwire audit verify [--path F | --models DIR] [--head SEQ:HASH]
    riskwire audit list [--path F | --models DIR] [--action A] [--client C] [--since T]
                        [--limit N] [--json]

The log is ``--path``, else ``$RISKWIRE_AUDIT_LOG``, else ``<models>/.audit/audit.jsonl``
(models: ``--models``, ``$RISKWIRE_MODELS`` or ``./models``). ``verify`` prints
``ok: N records, head SEQ HASH16`` and exits 0, or one line per problem and exits 1 (2: no
log at all). Keep the printed head somewhere else and pass it back with ``--head`` to
detect a log rewritten together with its head file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

AUDIT_LOG_ENV = "RISKWIRE_AUDIT_LOG"
_COLUMNS = ("seq", "time", "client", "action", "result")


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``audit`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser(
        "audit", help="admin audit log: verify the hash chain, list actions"
    ).add_subparsers(dest="audit_command", required=True)

    verify = group.add_parser("verify", help="check the hash chain and the head of the log")
    _source_args(verify)
    verify.add_argument(
        "--head",
        default=None,
        type=_head_arg,
        metavar="SEQ:HASH",
        help="SEQ:HASH (a hash prefix will do) printed by an earlier verify: the log must hold it",
    )
    verify.set_defaults(handler=cmd_verify)

    listing = group.add_parser("list", help="audit records, oldest first")
    _source_args(listing)
    listing.add_argument("--action", default=None, help="this action or its sub-actions")
    listing.add_argument("--client", default=None, help="only this client id")
    listing.add_argument("--since", default=None, help="only from this ISO-8601 time on")
    listing.add_argument("--limit", type=int, default=None, help="only the last N records")
    listing.add_argument("--json", action="store_true", help="one JSON object per record")
    listing.set_defaults(handler=cmd_list)
    return group


def _source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--path", default=None, help=f"audit log (default: ${AUDIT_LOG_ENV} or under --models)"
    )
    source.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )


def _head_arg(text: str) -> tuple[int, str]:
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) < 8:
        raise argparse.ArgumentTypeError(f"expected SEQ:HASH (8+ hex digits), got {text!r}")
    return int(seq), digest


def audit_log_path(path: str | None, models: str | None) -> Path:
    """``path`` > ``$RISKWIRE_AUDIT_LOG`` > ``default_audit_log(models directory)``."""
    from riskwire.pipeline.package import models_dir
    from riskwire.server.audit import default_audit_log

    explicit = path or os.environ.get(AUDIT_LOG_ENV)
    return Path(explicit) if explicit else default_audit_log(models_dir(models))


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the log: 0 when intact, 1 with one line per problem, 2 without a log."""
    from riskwire.server.audit import head_path, verify

    path = audit_log_path(args.path, args.models)
    if not path.exists() and not head_path(path).exists():
        print(f"riskwire: error: no audit log at {path}", file=sys.stderr)
        return 2
    result = verify(path, head=args.head)
    if not result.ok:
        for problem in result.problems:
            print(problem)
        return 1
    print(f"ok: {result.records} records, head {result.last_seq} {result.last_hash[:16]}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the matching records as a table, or as JSON lines with ``--json``."""
    from riskwire.server.audit import read

    path = audit_log_path(args.path, args.models)
    try:
        records = read(
            path, since=args.since, action=args.action, client=args.client, limit=args.limit
        )
    except ValueError as exc:  # a --since that is not ISO-8601
        print(f"riskwire: error: --since: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
    elif records:
        print(format_records(records))
    else:
        print(f"no audit records in {path}")
    return 0


def format_records(records: list[dict[str, Any]]) -> str:
    """An aligned table: seq, time, client, action, result, then the arguments as JSON."""
    header = (*_COLUMNS, "args")
    rows = [
        (*(str(r[c]).replace("\n", "\\n") for c in _COLUMNS), json.dumps(r["args"], sort_keys=True))
        for r in records
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(_COLUMNS))]
    return "\n".join(_row(row, widths) for row in (header, *rows))


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    """seq right-aligned, the other columns padded, the args last as they are."""
    padded = [cells[0].rjust(widths[0])]
    padded += [cell.ljust(width) for cell, width in zip(cells[1:-1], widths[1:], strict=True)]
    return "  ".join((*padded, cells[-1]))
