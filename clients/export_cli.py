"""``riskwire data export``: a training set from the prediction log and the labels.

    riskwire data export --since 2026-11-01 --until 2026-12-01 --out train.parquet

Reads ``<shadow dir>/predictions`` and ``<shadow dir>/labels`` (and the review queue's
inclusion probabilities) of a server (``--shadow-dir``, ``--models`` or ``--queue`` as
for ``riskwire review``) and writes the rows answered in ``[since, until)`` with their
labels, features as served and sample weights; see
:mod:`riskwire.server.training_export`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from . import review_cli


def register(data: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``riskwire data`` subcommands."""
    export = data.add_parser(
        "export", help="training data: logged requests joined with review and feedback labels"
    )
    export.add_argument("--since", type=_when, default=None, help="ISO date/time, UTC (incl.)")
    export.add_argument("--until", type=_when, default=None, help="ISO date/time, UTC (excl.)")
    export.add_argument("--out", required=True, help="output Parquet file")
    export.add_argument(
        "--unlabelled",
        choices=("exclude", "mark"),
        default="exclude",
        help="rows without a label: leave out (default) or keep with label null",
    )
    export.add_argument("--json", action="store_true", help="print the summary as JSON")
    review_cli.add_location_args(export)
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the training set and print what it holds."""
    from riskwire.server.training_export import (
        export_training_data,
        summary,
        write_training_data,
    )

    if args.since and args.until and args.since >= args.until:
        print("riskwire: error: --since must be before --until", file=sys.stderr)
        return 2
    table = export_training_data(
        review_cli.shadow_dir(args),
        since=args.since,
        until=args.until,
        unlabelled=args.unlabelled,
        queue=review_cli.queue_file(args),
    )
    write_training_data(table, args.out)
    facts = {"out": str(args.out), **summary(table)}
    if args.json:
        print(json.dumps(facts))
    else:
        latency = facts["median_label_latency_s"]
        print(
            f"wrote {facts['rows']} rows to {args.out}: {facts['fraud']} fraud, "
            f"{facts['from_review']} labelled by reviewers, weighted rows "
            f"{facts['weighted_rows']:.1f}, median label latency "
            + ("n/a" if latency is None else f"{latency / 3600:.1f} h")
        )
    return 0


def _when(text: str) -> datetime:
    """An ISO-8601 date or date-time; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
