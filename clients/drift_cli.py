"""``riskwire drift …``: live drift measures and the drift report.

    riskwire drift status [--admin HOST:PORT] [--model M] [--window W] [--all] [--json]
    riskwire drift report [--models DIR] [--model NAME] [--version V] [--window W]
                          [--min-count N] --out drift.html

``status`` asks a running server (admin API) for the latest measures, firing alerts and
validation counters. By default it lists only the values that have an alert threshold,
highest value/threshold first (``!``: alerting); ``--all`` lists every value, ``--json``
prints everything as one JSON object (NaN as null). ``report`` renders an HTML page from
``<models>/.drift/`` (latest.json, history.jsonl) and the package's profile.json.
Heavy modules (grpc, numpy, matplotlib) are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from riskwire.files import write_text_atomic

from .alerts_cli import add_data_dir_arg, data_dir

DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"
_VALUE_FIELDS = (
    "model", "version", "window", "column", "measure", "value", "count", "threshold", "alerting",
)  # fmt: skip
_ALERT_FIELDS = (
    "id", "rule", "severity", "model", "version", "window", "column", "measure", "value",
    "threshold", "started_at", "message",
)  # fmt: skip


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``drift`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser(
        "drift", help="data drift: live measures and alerts, HTML report"
    ).add_subparsers(dest="drift_command", required=True)

    status = group.add_parser("status", help="latest drift measures of a running server")
    status.add_argument(
        "--admin",
        default=DEFAULT_ADMIN_TARGET,
        help=f"admin API host:port (default {DEFAULT_ADMIN_TARGET})",
    )
    status.add_argument("--model", default="", help="only this model (default: every model)")
    status.add_argument("--window", default="", help="only this window, e.g. 1h (default: all)")
    status.add_argument(
        "--all", action="store_true", help="every value, not only those with a threshold"
    )
    status.add_argument("--json", action="store_true", help="print everything as JSON")
    status.add_argument("--timeout-s", dest="timeout_s", type=float, default=5.0)
    status.set_defaults(handler=cmd_status)

    report = group.add_parser("report", help="HTML report: training vs live, drift over time")
    report.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    add_data_dir_arg(report)
    report.add_argument("--model", default=None, help="model name (default: the busiest)")
    report.add_argument("--version", default=None, help="model version (default: the busiest)")
    report.add_argument("--window", default=None, help="window, e.g. 1h (default: the longest)")
    report.add_argument(
        "--min-count",
        dest="min_count",
        type=int,
        default=200,
        help="fewer live values in a column: no measure (default 200, as the server)",
    )
    report.add_argument("--out", required=True, help="output HTML file")
    report.set_defaults(handler=cmd_report)
    return group


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _message_dict(message: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    out = {name: getattr(message, name) for name in fields}
    return {k: _number(v) if isinstance(v, float) else v for k, v in out.items()}


def drift_status(
    target: str, *, model: str = "", window: str = "", timeout_s: float = 5.0
) -> dict[str, Any]:
    """The DriftStatus of the server at ``target`` as a plain dict (NaN as None)."""
    import grpc

    from riskwire.protos import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        response = admin_pb2_grpc.AdminStub(channel).DriftStatus(
            admin_pb2.DriftStatusRequest(model=model, window=window), timeout=timeout_s
        )
    return {
        "evaluated_at": response.evaluated_at or None,
        "validation": dict(sorted(response.validation.items())),
        "alerts": [_message_dict(a, _ALERT_FIELDS) for a in response.alerts],
        "values": [_message_dict(v, _VALUE_FIELDS) for v in response.values],
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print the latest drift measures, firing alerts and validation counters."""
    import grpc

    try:
        status = drift_status(
            args.admin, model=args.model, window=args.window, timeout_s=args.timeout_s
        )
    except grpc.RpcError as exc:
        return _error(f"{exc.code().name}: {exc.details()}")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, allow_nan=False))
        return 0
    print(format_status(status, every_value=args.all))
    return 0


def format_status(status: dict[str, Any], *, every_value: bool = False) -> str:
    """The human-readable status: evaluation time, validation, alerts, then the values."""
    at = status["evaluated_at"]
    lines = [f"drift evaluated at {_iso(at)}" if at else "drift: not evaluated yet"]
    counters = ", ".join(f"{k} {v}" for k, v in status["validation"].items())
    lines.append(f"validation: {counters or 'no counters'}")
    lines.append(f"firing alerts: {len(status['alerts']) or 'none'}")
    for alert in status["alerts"]:
        text = alert["message"] or (
            f"{alert['model']} v{alert['version']} {alert['column']}/{alert['window']} "
            f"{alert['measure']} {_num(alert['value'])} (threshold {_num(alert['threshold'])})"
        )
        lines.append(f"  {alert['severity']:<8}  {text}")
    values = status["values"]
    shown = values if every_value else [v for v in values if _ratio(v) is not None]
    shown = sorted(shown, key=_by_ratio)
    if not every_value:
        lines.append(
            f"values with a threshold: {len(shown)} of {len(values)}, "
            "highest value/threshold first (--all: every value)"
        )
    if shown:
        lines.append(_table(shown))
    return "\n".join(lines)


def _ratio(value: dict[str, Any]) -> float | None:
    """|value| / |threshold|, None when either is missing (NaN)."""
    if value["value"] is None or value["threshold"] is None:
        return None
    if value["threshold"] == 0:
        return math.inf if value["value"] else 0.0
    return abs(value["value"]) / abs(value["threshold"])


def _by_ratio(value: dict[str, Any]) -> tuple[bool, float]:
    """Sort key: highest value/threshold first, values without one last (stable)."""
    ratio = _ratio(value)
    return (ratio is None, 0.0 if ratio is None else -ratio)


def _table(values: list[dict[str, Any]]) -> str:
    header = ("", "model", "window", "column", "measure", "value", "threshold")
    rows = [
        (
            "!" if v["alerting"] else "",
            f"{v['model']} v{v['version']}",
            v["window"],
            v["column"],
            v["measure"],
            _num(v["value"]),
            _num(v["threshold"]),
        )
        for v in values
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    numeric = {5, 6}
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in (header, *rows)
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_report(args: argparse.Namespace) -> int:
    """Render the drift report of ``<models>/.drift`` to ``--out``."""
    from riskwire.pipeline.package import models_dir
    from riskwire.server.monitoring.drift_report import DriftReportError, render_drift_report

    out = Path(args.out)
    if not out.parent.is_dir():
        return _error(f"--out {out}: directory {out.parent} does not exist")
    try:
        text = render_drift_report(
            models_dir(args.models),
            model=args.model,
            version=args.version,
            window=args.window,
            min_count=args.min_count,
            data_dir=data_dir(args.data_dir),
        )
    except DriftReportError as exc:
        return _error(str(exc))
    try:
        write_text_atomic(out, text)
    except OSError as exc:
        return _error(f"--out {out}: {exc}")
    print(f"wrote {out} ({len(text.encode()) // 1024} KiB)")
    return 0
