"""``riskwire alerts …``: the drift-alert incident log.

    riskwire alerts list [--incidents PATH | --models M] [--open] [--json]

The incident log is ``<models>/.alerts/incidents.jsonl`` (models: ``--models``,
``$RISKWIRE_MODELS`` or ``./models``), written by the server's alert engine. ``--json``
prints one incident per line, with all its events.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``alerts`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser("alerts", help="drift alerts: the incident log").add_subparsers(
        dest="alerts_command", required=True
    )
    listing = group.add_parser("list", help="incidents, oldest first")
    source = listing.add_mutually_exclusive_group()
    source.add_argument("--incidents", default=None, help="incident log (JSON lines)")
    source.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    add_data_dir_arg(listing)
    listing.add_argument("--open", action="store_true", help="only incidents still firing")
    listing.add_argument("--json", action="store_true", help="one JSON object per incident")
    listing.set_defaults(handler=cmd_list)
    return group


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: where the server writes drift history and incidents."""
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        default=None,
        help="the server's data_dir (default: $RISKWIRE_DATA_DIR, else the models directory)",
    )


def data_dir(value: str | None) -> Path | None:
    """``--data-dir``, else ``$RISKWIRE_DATA_DIR``, else None (the models directory)."""
    chosen = value or os.environ.get("RISKWIRE_DATA_DIR")
    return Path(chosen) if chosen else None


def cmd_list(args: argparse.Namespace) -> int:
    """Print the incidents of the log, one line each."""
    from riskwire.server.monitoring.alerts import incident_log_path, read_incidents

    if args.incidents:
        path = args.incidents
    else:
        from riskwire.pipeline.package import models_dir

        path = incident_log_path(data_dir(args.data_dir) or models_dir(args.models))
    incidents = read_incidents(path, open_only=args.open)
    if args.json:
        for incident in incidents:
            print(json.dumps(incident, sort_keys=True))
        return 0
    if not incidents:
        print(f"no {'open ' if args.open else ''}incidents in {path}")
        return 0
    for incident in incidents:
        print(format_incident(incident))
    return 0


def format_incident(incident: dict[str, Any]) -> str:
    """One line: id prefix, state, severity, rule, model vN, column/window, value vs threshold,
    started and resolved times (ISO-8601 UTC)."""
    value = incident.get("value")
    comparison = (
        f"{value:.3g} {incident.get('op', '>')} {incident.get('threshold', float('nan')):g}"
        if isinstance(value, int | float)
        else "-"
    )
    resolved = incident.get("resolved_at")
    return "  ".join(
        (
            str(incident.get("id", "?"))[:8],
            f"{incident.get('state', '?'):<8}",
            f"{incident.get('severity', '?'):<8}",
            str(incident.get("rule", "?")),
            f"{incident.get('model', '?')} v{incident.get('version', '?')}",
            f"{incident.get('column', '?')}/{incident.get('window', '?')}",
            comparison,
            f"started {_iso(incident.get('started_at'))}",
            f"resolved {_iso(resolved)}" if resolved is not None else "open",
        )
    )


def _iso(epoch_s: object) -> str:
    if not isinstance(epoch_s, int | float):
        return "-"
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
