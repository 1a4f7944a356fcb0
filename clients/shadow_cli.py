"""``riskwire shadow …``: the shadow comparison report and the joined-records export.

    riskwire shadow report [--dir D | --models M] [--since T] [--until T]
                           [--format html|json] [--out FILE] [--bootstrap N] [--seed S]
    riskwire shadow export [--dir D | --models M] [--since T] [--until T] --out FILE
    riskwire shadow status [--admin HOST:PORT] [--json]
    riskwire shadow set --version V [--model M] [--endpoint HOST:PORT] [--rate PCT]
                        [--filter EXPR] [--primary M] [--timeout-s S] [--admin HOST:PORT]
    riskwire shadow clear [--admin HOST:PORT]
    riskwire feedback FILE [--target HOST:PORT]   (labels: request_id/transaction_id,
                                                   label, optional labelled_at_ms)

Times are ``2026-11-26``, ``2026-11-26T10:00`` (UTC unless an offset is given) or epoch
milliseconds; the window is ``since <= time < until``. Heavy modules (pyarrow,
matplotlib) are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from riskwire.files import write_text_atomic


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``shadow`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser(
        "shadow", help="shadow deployments: comparison report, joined-records export"
    ).add_subparsers(dest="shadow_command", required=True)

    report = group.add_parser("report", help="compare shadow and primary (HTML or JSON)")
    _window_args(report)
    report.add_argument("--out", default=None, help="output file (required for HTML)")
    report.add_argument(
        "--format", choices=("html", "json"), default="html", help="output format (default: html)"
    )
    report.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="bootstrap replicates for the AUC confidence intervals (0: none)",
    )
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    report.set_defaults(handler=cmd_report)

    export = group.add_parser("export", help="records in the window joined with labels")
    _window_args(export)
    export.add_argument("--out", required=True, help="output file (.parquet or .csv)")
    export.set_defaults(handler=cmd_export)

    status = group.add_parser("status", help="live comparison, merged across workers")
    _admin_arg(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=cmd_status)

    change = group.add_parser("set", help="mirror traffic to a shadow (applies within 1 s)")
    _admin_arg(change)
    change.add_argument("--version", default="", help="shadow version (local shadow)")
    change.add_argument("--model", default="", help="shadow model name (default: the primary's)")
    change.add_argument("--endpoint", default="", help="remote OIP v2 shadow host:port")
    change.add_argument("--rate", type=float, default=100.0, help="percent mirrored (0-100)")
    change.add_argument("--filter", default="", help='e.g. "channel=ecommerce; amount>=100"')
    change.add_argument("--primary", default="", help="model whose traffic is mirrored")
    change.add_argument("--timeout-s", dest="timeout_s", type=float, default=1.0)
    change.set_defaults(handler=cmd_set)

    clear = group.add_parser("clear", help="stop mirroring")
    _admin_arg(clear)
    clear.set_defaults(handler=cmd_clear)
    return group


def register_feedback(commands: argparse._SubParsersAction) -> None:
    """Add ``riskwire feedback FILE``: send delayed labels from a CSV/Parquet file."""
    feedback = commands.add_parser("feedback", help="send delayed labels (ground truth)")
    feedback.add_argument("file", help="CSV/Parquet: request_id and/or transaction_id, label")
    feedback.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    feedback.add_argument("--chunk", type=int, default=1000, help="labels per call")
    feedback.set_defaults(handler=cmd_feedback)


def _admin_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", default="127.0.0.1:50052", help="admin API host:port (default 127.0.0.1:50052)"
    )


def _admin_call(args: argparse.Namespace, call: Any) -> Any:  # noqa: ANN401
    import grpc

    from .admin import AdminClient
    from .client import connection_from_env

    with AdminClient(args.admin, **connection_from_env()) as admin:
        try:
            return call(admin)
        except grpc.RpcError as exc:
            raise SystemExit(_error(f"{exc.code().name}: {exc.details()}")) from None


def cmd_status(args: argparse.Namespace) -> int:
    """Print the live shadow status."""
    status = _admin_call(args, lambda admin: admin.shadow_status())
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    config = status["config"]
    if not config["enabled"]:
        print("shadow: off")
    else:
        target = config["endpoint"] or "local"
        print(
            f"shadow: {config['model'] or '(primary name)'} v{config['version'] or '-'} "
            f"({target}) at {config['rate_percent']:g}%"
            + (f" where {config['filter']}" if config["filter"] else "")
        )
    for w in status["workers"]:
        state = "active" if w["active"] else f"inactive {w['target_error']}".rstrip()
        print(
            f"  worker {w['worker']} pid {w['pid']}: {state}, generation {w['generation']}, "
            f"queued {w['queued']}, records written {w['records_written']}"
        )
    for p in status["pairs"]:
        print(
            f"{p['primary_model']} v{p['primary_version']} -> {p['shadow_model']} "
            f"v{p['shadow_version']}: mirrored {p['mirrored']}, dropped {p['dropped']}, "
            f"failed {p['failed']}, agreement {_pct(p['agreement_rate'])}, "
            f"mean |dp| {_num(p['mean_abs_delta'])}, max |dp| {_num(p['max_abs_delta'])}, "
            f"corr {_num(p['correlation'])}, PSI {_num(p['psi'])}"
        )
        flips = ", ".join(f"{k} {v}" for k, v in p["flips"].items() if v)
        print(f"  flips: {flips or 'none'}")
    print(f"records: {status['records_dir']}")
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def cmd_set(args: argparse.Namespace) -> int:
    """Change the shadow configuration."""
    stored = _admin_call(
        args,
        lambda admin: admin.set_shadow(
            enabled=True,
            primary=args.primary,
            model=args.model,
            version=args.version,
            endpoint=args.endpoint,
            rate_percent=args.rate,
            filter=args.filter,
            timeout_s=args.timeout_s,
        ),
    )
    print(f"shadow configuration {stored['generation']}: {json.dumps(stored, sort_keys=True)}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    """Turn mirroring off."""
    stored = _admin_call(args, lambda admin: admin.clear_shadow())
    print(f"shadow off (configuration {stored['generation']})")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """Send labels from a file in chunks; prints how many were stored."""
    import grpc

    from riskwire.pipeline.data import read_table

    from .client import RiskwireClient, connection_from_env

    rows = read_table(args.file).to_pylist()
    stored = 0
    with RiskwireClient(args.target, timeout_s=30.0, **connection_from_env()) as client:
        for start in range(0, len(rows), args.chunk):
            try:
                stored += client.feedback(rows[start : start + args.chunk])
            except (grpc.RpcError, ValueError, KeyError) as exc:
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                return _error(f"rows {start}..: {details} ({stored} stored before)")
    print(f"stored {stored} labels from {args.file}")
    return 0


def _window_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dir", default=None, help="shadow directory (default: <models>/.shadow)")
    where.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    parser.add_argument("--since", type=_time, default=None, help="window start (inclusive)")
    parser.add_argument("--until", type=_time, default=None, help="window end (exclusive)")


def _time(text: str) -> datetime:
    from riskwire.shadow.records import utc

    try:
        return utc(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use 2026-11-26, 2026-11-26T10:00[Z] or epoch milliseconds"
        ) from None


def shadow_dir(args: argparse.Namespace) -> Path:
    """``--dir``, else ``<models>/.shadow``."""
    if args.dir:
        return Path(args.dir)
    from riskwire.pipeline.package import models_dir

    return models_dir(args.models) / ".shadow"


def _check_window(args: argparse.Namespace) -> str | None:
    if args.since and args.until and args.since >= args.until:
        return "--since must be before --until"
    return None


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


def cmd_report(args: argparse.Namespace) -> int:
    """Compute the report; write HTML to --out, or JSON to --out / stdout."""
    from riskwire.shadow.report import load_window, report_from_table
    from riskwire.shadow.report_html import render_html

    problem = _check_window(args)
    if problem is None and args.format == "html" and not args.out:
        problem = "--out is required for --format html"
    if problem is None and args.bootstrap < 0:
        problem = "--bootstrap must be >= 0"
    if problem:
        return _error(problem)
    directory = shadow_dir(args)
    if not directory.is_dir():
        print(f"riskwire: warning: no shadow directory at {directory}", file=sys.stderr)
    joined = load_window(directory, since=args.since, until=args.until)
    report = report_from_table(
        joined,
        directory=directory,
        since=args.since,
        until=args.until,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    if args.format == "json":
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    else:
        text = render_html(report, joined)
    if not args.out:
        sys.stdout.write(text)
        print(summary_line(report), file=sys.stderr)
        return 0
    write_text_atomic(Path(args.out), text)
    print(f"wrote {args.out}: {summary_line(report)}")
    return 0


def summary_line(report: dict[str, Any]) -> str:
    """One line: records, pairs, labels and the first pair's headline numbers."""
    pairs = report["pairs"]
    line = f"{report['records']} records, {len(pairs)} pair(s), {report['labelled']} labelled"
    if not pairs:
        return line + " (nothing in this window)"
    first = pairs[0]
    agreement = first["summary"]["agreement_rate"]
    line += (
        f"; {first['primary_model']} v{first['primary_version']} vs "
        f"{first['shadow_model']} v{first['shadow_version']}: agreement "
        + ("n/a" if agreement is None else f"{agreement:.2%}")
    )
    if first["quality"]:
        line += f", {first['quality']['verdict_text']}"
        comparison = first["quality"].get("comparison")
        if comparison:
            line += f"; champion vs challenger: {comparison['verdict_text']}"
    return line


def cmd_export(args: argparse.Namespace) -> int:
    """Write the window's records joined with labels to one Parquet (or CSV) file."""
    from riskwire.shadow.records import write_joined
    from riskwire.shadow.report import load_window

    problem = _check_window(args)
    if problem:
        return _error(problem)
    directory = shadow_dir(args)
    if not directory.is_dir():
        print(f"riskwire: warning: no shadow directory at {directory}", file=sys.stderr)
    joined = load_window(directory, since=args.since, until=args.until)
    try:
        path = write_joined(joined, args.out)
    except ValueError as exc:
        return _error(str(exc))
    labelled = joined.num_rows - joined["label"].null_count
    print(f"wrote {joined.num_rows} rows ({labelled} labelled) to {path}")
    return 0
