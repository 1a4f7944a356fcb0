"""``riskwire review …``: the human-in-the-loop review queue.

    riskwire review next [--reviewer ID] [--lease S] [--history N] [--json]
    riskwire review label CASE (--fraud | --legit) [--note TEXT] [--reviewer ID] [--force]
    riskwire review release CASE [--reviewer ID] [--force]
    riskwire review list [--status pending|leased|expired|labelled] [--limit N] [--json]
    riskwire review stats [--json]
    riskwire review sync

Every command takes ``--queue PATH`` and ``--shadow-dir DIR`` | ``--models DIR``. The
shadow directory is ``--shadow-dir``, else ``$RISKWIRE_SHADOW_DIR``, else the folder of
``--queue`` when only that is given, else ``<models>/.shadow`` (models: ``--models``,
``$RISKWIRE_MODELS`` or ``./models``); the queue is ``--queue``, else
``<shadow dir>/review.sqlite``. Verdicts go to the queue and to ``<shadow dir>/labels``,
the label store the Feedback RPC writes (segments of worker 1000), where the shadow
report and the data export join them.

The reviewer is ``--reviewer``, else ``$RISKWIRE_REVIEWER``, else the OS user name.
``next`` leases a case for ``--lease`` seconds (a second ``next`` by the same reviewer
returns the same case); nobody else gets it until the lease expires or it is released.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from riskwire.server.review import Case, ReviewQueue

REVIEWER_ENV = "RISKWIRE_REVIEWER"
SHADOW_DIR_ENV = "RISKWIRE_SHADOW_DIR"
STATUS_CHOICES = ("pending", "leased", "expired", "labelled")
T = TypeVar("T")


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``review`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser(
        "review", help="human review queue: lease cases, record verdicts as labels"
    ).add_subparsers(dest="review_command", required=True)

    nxt = group.add_parser("next", help="lease the next case and show it")
    _common_args(nxt, reviewer=True)
    nxt.add_argument("--lease", type=float, default=300.0, help="lease seconds (default 300)")
    nxt.add_argument(
        "--history", type=int, default=3, help="the card's earlier queued cases shown (default 3)"
    )
    nxt.add_argument("--json", action="store_true", help="print the case as JSON")
    nxt.set_defaults(handler=cmd_next)

    label = group.add_parser("label", help="record a verdict on a case")
    _common_args(label, reviewer=True)
    label.add_argument("case", type=int, help="case id")
    verdict = label.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--fraud", dest="label", action="store_const", const=1)
    verdict.add_argument("--legit", dest="label", action="store_const", const=0)
    label.add_argument("--note", default="", help="free text kept with the verdict")
    label.add_argument(
        "--force", action="store_true", help="relabel a labelled case / override a live lease"
    )
    label.set_defaults(handler=cmd_label)

    release = group.add_parser("release", help="give a leased case back to the queue")
    _common_args(release, reviewer=True)
    release.add_argument("case", type=int, help="case id")
    release.add_argument("--force", action="store_true", help="release another reviewer's lease")
    release.set_defaults(handler=cmd_release)

    listing = group.add_parser("list", help="cases, in queue order (labelled: latest first)")
    _common_args(listing)
    listing.add_argument("--status", choices=STATUS_CHOICES, default=None)
    listing.add_argument("--limit", type=int, default=50, help="at most N cases (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per case")
    listing.set_defaults(handler=cmd_list)

    stats = group.add_parser("stats", help="counts by status and reason")
    _common_args(stats)
    stats.add_argument("--json", action="store_true", help="print the counts as JSON")
    stats.set_defaults(handler=cmd_stats)

    sync = group.add_parser("sync", help="write verdicts not yet exported to the label store")
    _common_args(sync)
    sync.set_defaults(handler=cmd_sync)
    return group


def _common_args(parser: argparse.ArgumentParser, *, reviewer: bool = False) -> None:
    add_location_args(parser)
    if reviewer:
        parser.add_argument(
            "--reviewer", default=None, help=f"reviewer id (default: ${REVIEWER_ENV} or OS user)"
        )


def add_location_args(parser: argparse.ArgumentParser) -> None:
    """``--queue`` and ``--shadow-dir`` | ``--models``: where the queue and labels are."""
    parser.add_argument(
        "--queue", default=None, help="queue file (default: <shadow>/review.sqlite)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--shadow-dir",
        dest="shadow_dir",
        default=None,
        help=f"shadow directory (default: ${SHADOW_DIR_ENV} or <models>/.shadow)",
    )
    where.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )


# ---------------------------------------------------------------------- resolution
def shadow_dir(args: argparse.Namespace) -> Path:
    """Where labels are written (and the queue lives by default); see the module doc."""
    if args.shadow_dir:
        return Path(args.shadow_dir)
    if os.environ.get(SHADOW_DIR_ENV):
        return Path(os.environ[SHADOW_DIR_ENV])
    if args.queue and not args.models:
        return Path(args.queue).parent
    # As riskwire.pipeline.package.models_dir, without importing the build pipeline (0.5 s
    # a call, which a reviewer would pay on every case).
    return Path(args.models or os.environ.get("RISKWIRE_MODELS") or "models") / ".shadow"


def queue_file(args: argparse.Namespace) -> Path:
    """``--queue``, else ``<shadow dir>/review.sqlite``."""
    from riskwire.server.review import queue_path

    return Path(args.queue) if args.queue else queue_path(shadow_dir(args))


def reviewer_id(args: argparse.Namespace) -> str:
    """``--reviewer``, else ``$RISKWIRE_REVIEWER``, else the OS user name."""
    if args.reviewer:
        return args.reviewer
    if os.environ.get(REVIEWER_ENV):
        return os.environ[REVIEWER_ENV]
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise SystemExit(
            _error(f"no reviewer id: pass --reviewer or set ${REVIEWER_ENV}")
        ) from None


def _open(args: argparse.Namespace) -> ReviewQueue:
    from riskwire.server.review import ReviewQueue

    path = queue_file(args)
    if not path.exists():
        raise SystemExit(
            _error(
                f"no review queue at {path} (the server creates it when review queueing is "
                "on; pass --queue, --shadow-dir or --models)"
            )
        )
    return ReviewQueue(path)


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


def _run(call: Callable[[], T]) -> T:
    """``call()``; a queue refusal or bad value becomes ``riskwire: error: …`` (exit 2)."""
    import sqlite3

    from riskwire.server.errors import ServingError

    try:
        return call()
    except (ServingError, ValueError, sqlite3.Error) as exc:
        raise SystemExit(_error(str(exc))) from None


# ---------------------------------------------------------------------- commands
def cmd_next(args: argparse.Namespace) -> int:
    """Lease the next case to the reviewer and print it with its card's earlier cases."""
    queue = _open(args)
    case = _run(lambda: queue.lease_next(reviewer_id(args), args.lease))
    history = (
        queue.card_history(case.card_hash, case.event_time_ms, max(args.history, 0))
        if case is not None and args.history > 0
        else []
    )
    if args.json:
        document = None
        if case is not None:
            document = {"case": case.to_dict(), "card_history": [c.to_dict() for c in history]}
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    if case is None:
        stats = queue.stats()
        print(
            f"no case to review ({stats['by_status']['leased']} leased by reviewers, "
            f"{stats['by_status']['labelled']} labelled)"
        )
        return 0
    print(format_case(case, history))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """Record the verdict in the queue, then export pending verdicts to the label store."""
    queue = _open(args)
    reviewer = reviewer_id(args)
    case = _run(lambda: queue.label(args.case, args.label, reviewer, args.note, force=args.force))
    print(f"case {case.case_id} labelled {_verdict(case.label)} by {reviewer}")
    labels = shadow_dir(args)
    try:
        written = _sync(queue, labels)
    except Exception as exc:  # the verdict is committed; sync retries the export
        print(
            f"riskwire: warning: verdict kept in the queue, not yet in the label store "
            f"{labels / 'labels'}: {exc}; run `riskwire review sync`",
            file=sys.stderr,
        )
        return 0
    print(f"{written} label{'s' if written != 1 else ''} written to {labels / 'labels'}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Return a leased case to the queue."""
    queue = _open(args)
    case = _run(lambda: queue.release(args.case, reviewer_id(args), force=args.force))
    print(f"case {case.case_id} released")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Export verdicts not yet in the label store (after a failed or interrupted label)."""
    queue = _open(args)
    labels = shadow_dir(args)
    try:
        written = _sync(queue, labels)
    except OSError as exc:
        return _error(f"label store {labels / 'labels'}: {exc}")
    print(f"{written} label{'s' if written != 1 else ''} written to {labels / 'labels'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print cases, one line each (or one JSON object per line)."""
    queue = _open(args)
    cases = _run(lambda: queue.cases(args.status, limit=args.limit))
    if args.json:
        for case in cases:
            print(json.dumps(case.to_dict(), sort_keys=True))
        return 0
    if not cases:
        print("no cases" + (f" {args.status}" if args.status else ""))
        return 0
    print(f"{'case':>7}  {'status':<8}  {'reason':<6}  {'decision':<8}  {'score':>6}  "
          f"{'model':<14}  {'enqueued':<24}  who")  # fmt: skip
    for case in cases:
        print(format_line(case))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the queue's counts."""
    stats = _open(args).stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    by_status, by_reason = stats["by_status"], stats["by_reason"]
    print(
        f"{stats['total']} cases: {by_status['pending']} pending, {by_status['leased']} leased "
        f"({stats['expired_leases']} expired), {by_status['labelled']} labelled "
        f"({stats['fraud']} fraud, {stats['legit']} legit)"
    )
    print(f"queued for: review decision {by_reason['review']}, random sample {by_reason['sample']}")
    print(f"verdicts not yet in the label store: {stats['unexported']}")
    return 0


def _sync(queue: ReviewQueue, shadow: Path) -> int:
    from riskwire.server.review import REVIEW_LABEL_WORKER, sync_labels
    from riskwire.shadow.labels import LabelStore

    return sync_labels(queue, LabelStore(shadow, REVIEW_LABEL_WORKER))


# ---------------------------------------------------------------------- formatting
def _verdict(label: int | None) -> str:
    return {1: "fraud", 0: "legit"}.get(label, "-")  # type: ignore[arg-type]


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _card(card_hash: str) -> str:
    """The card hash, shortened for display (it is already a keyed hash, never the id)."""
    return card_hash[:10] + "…"


def format_line(case: Case) -> str:
    """One list line: id, status, reason, decision, score, model, enqueued, lease/verdict."""
    if case.status == "labelled":
        who = f"{_verdict(case.label)} by {case.labelled_by} at {_iso(case.labelled_at_ms)}"
    elif case.status == "leased":
        who = f"{case.lease_owner} until {_iso(case.lease_until_ms)}"
    else:
        who = ""
    model = f"{case.model} v{case.version}"
    return (
        f"{case.case_id:>7}  {case.status:<8}  {case.reason:<6}  {case.decision:<8}  "
        f"{case.probability:>6.4f}  {model:<14}  {_iso(case.enqueued_at_ms):<24}  {who}"
    ).rstrip()


def format_case(case: Case, history: list[Case]) -> str:
    """The case as ``review next`` prints it: header, top reasons, features as served
    beside the card's earlier queued cases (newest first)."""
    why = (
        "review decision"
        if case.reason == "review"
        else f"random sample of other decisions (p={case.inclusion_probability:g})"
    )
    lines = [
        f"case {case.case_id}   {case.model} v{case.version}   score {case.probability:.4f}   "
        f"decision {case.decision}",
        f"queued for: {why}",
        f"request {case.request_id or '-'}   transaction {case.transaction_id or '-'}   "
        f"event time {_iso(case.event_time_ms)}   card {_card(case.card_hash)}",
        f"leased to {case.lease_owner} until {_iso(case.lease_until_ms)}",
        "",
        "top reasons",
    ]
    if case.top_reasons:
        lines.append(f"  {'feature':<20} {'contribution':>12} {'value':>12}")
        for feature, contribution, value in case.top_reasons:
            lines.append(f"  {feature:<20} {contribution:>+12.4f} {_num(value):>12}")
    else:
        lines.append("  (none recorded)")
    lines += ["", _features_table(case, history)]
    if not history:
        lines.append("  (no earlier case of this card in the queue)")
    lines += ["", f"label it: riskwire review label {case.case_id} --fraud|--legit [--note …]"]
    return "\n".join(lines)


def _features_table(case: Case, history: list[Case]) -> str:
    columns = [case, *history]
    head = ["this case"] + [f"#{c.case_id}" for c in history]
    rows = [
        ("time", [_iso(c.event_time_ms)[5:19].replace("T", " ") for c in columns]),
        ("score", [f"{c.probability:.4f}" for c in columns]),
        ("decision", [c.decision for c in columns]),
        ("verdict", [_verdict(c.label) for c in columns]),
    ]
    names = list(case.features)
    for c in history:
        names += [n for n in c.features if n not in case.features and n not in names]
    rows += [(n, [_num(c.features.get(n)) for c in columns]) for n in names]
    width = max(14, *(len(v) for _, values in rows for v in values))
    out = [
        f"features as served, beside the card's earlier queued cases ({len(history)} shown)",
        f"  {'':<20}" + "".join(f" {h:>{width}}" for h in head),
    ]
    out += [f"  {name:<20}" + "".join(f" {v:>{width}}" for v in values) for name, values in rows]
    return "\n".join(out)
