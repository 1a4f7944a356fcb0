"""``riskwire compare``: a challenger model version against the champion on labelled data.

    riskwire compare NAME CHAMPION CHALLENGER --data holdout.parquet [--models DIR]
                     [--cost-missed-fraud 10] [--cost-false-decline 1]
                     [--bootstrap 1000] [--seed 0] [--json] [--out report.json]

Both packages are verified and loaded as ``riskwire package verify`` loads them, the
data (raw transactions with a ``label`` column, as ``riskwire data synth`` writes) goes
through the build's own offline feature pass, and :mod:`riskwire.pipeline.compare` does
the statistics (metrics, paired bootstrap intervals, verdict; see its docstring). A
``weight`` column makes every metric weighted. Card history starts empty at the first
row of the file, for both models alike. ``--json`` prints the report as JSON instead
of a table; ``--out`` also writes the JSON to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The defaults of riskwire.pipeline.compare, repeated so that building the parser does not
# import numpy (``riskwire --help`` stays fast); a test checks that they agree.
DEFAULT_COST_MISSED_FRAUD = 10.0
DEFAULT_COST_FALSE_DECLINE = 1.0
DEFAULT_BOOTSTRAP = 1000


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare`` command to the top-level subparsers."""
    parser = commands.add_parser(
        "compare", help="compare a challenger model version with the champion on labelled data"
    )
    parser.add_argument("name", help="model name (for example fraud)")
    parser.add_argument("champion", type=_version, help="champion version (the one serving)")
    parser.add_argument("challenger", type=_version, help="challenger version (the candidate)")
    parser.add_argument("--data", required=True, help="labelled raw transactions (.parquet/.csv)")
    parser.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    parser.add_argument(
        "--cost-missed-fraud",
        type=float,
        default=DEFAULT_COST_MISSED_FRAUD,
        help=f"cost of one fraud approved (default {DEFAULT_COST_MISSED_FRAUD:g})",
    )
    parser.add_argument(
        "--cost-false-decline",
        type=float,
        default=DEFAULT_COST_FALSE_DECLINE,
        help=f"cost of one legitimate payment declined (default {DEFAULT_COST_FALSE_DECLINE:g})",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        help=f"paired bootstrap resamples, 0 for none (default {DEFAULT_BOOTSTRAP})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.set_defaults(handler=cmd_compare)
    return parser


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be a positive integer, got {text!r}")
    return int(text)


def cmd_compare(args: argparse.Namespace) -> int:
    """Score the data with both versions, compare, print (and write) the report."""
    from riskwire.files import write_text_atomic
    from riskwire.pipeline.compare import ROLES, compare_models, format_comparison

    problem = _check_args(args)
    if problem:
        print(f"riskwire: error: {problem}", file=sys.stderr)
        return 2
    data, labels, weights, scored = score_versions(
        args.data, args.models, args.name, (args.champion, args.challenger)
    )
    result = compare_models(
        labels,
        scored[0][1],
        scored[1][1],
        thresholds=[package.thresholds["decline"] for package, _ in scored],
        cost_missed_fraud=args.cost_missed_fraud,
        cost_false_decline=args.cost_false_decline,
        weights=weights,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    report = {
        "model": args.name,
        "models": {role: _describe(p) for role, (p, _) in zip(ROLES, scored, strict=True)},
        "data": data,
        **result,
    }
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    if args.out:
        write_text_atomic(Path(args.out), text)
    if args.json:
        sys.stdout.write(text)
    else:
        names = [f"{args.name} v{v}" for v in (args.champion, args.challenger)]
        print(format_comparison(result, names=names))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    if args.bootstrap < 0:
        return "--bootstrap must be >= 0"
    for flag, value in (
        ("--cost-missed-fraud", args.cost_missed_fraud),
        ("--cost-false-decline", args.cost_false_decline),
    ):
        if not value >= 0 or value == float("inf"):
            return f"{flag} must be a finite number >= 0, got {value}"
    return None


def score_versions(
    data_path: str | Path, models: str | Path | None, name: str, versions: tuple[int, ...]
) -> tuple[dict[str, Any], Any, Any, list[tuple[Any, Any]]]:
    """(data description, labels, weights or None, [(package, probabilities)] per version).

    Features are computed once, as the build computes them, and each verified package
    scores them with its forest kernel.
    """
    from riskwire.kernels.schema import FEATURE_NAMES
    from riskwire.pipeline.build import data_record, offline_features
    from riskwire.pipeline.data import file_sha256, load_raw
    from riskwire.pipeline.errors import DataValidationError, PackageIntegrityError
    from riskwire.pipeline.package import load_package, models_dir

    root = models_dir(models)
    packages = [load_package(root / name / str(version)) for version in versions]
    for package in packages:
        names = tuple(package.metadata["model"]["feature_names"])
        if names != FEATURE_NAMES:
            raise PackageIntegrityError(
                f"{package.path}: package features {names} differ from this riskwire's "
                f"{FEATURE_NAMES}"
            )
    raw = load_raw(data_path, require_label=False)
    if raw.labels is None:
        raise DataValidationError(
            f"{data_path}: no 'label' column: compare needs labelled rows (1 fraud, 0 not)"
        )
    features = offline_features(raw)
    scored = [(package, package.forest.predict(features)) for package in packages]
    data = data_record(raw, Path(data_path).name, file_sha256(data_path))
    return data, raw.labels, raw.weights, scored


def _describe(package: Any) -> dict[str, Any]:
    from riskwire.pipeline.package import manifest_sha256

    lineage = package.metadata.get("lineage") or {}
    parent = lineage.get("parent")
    return {
        "name": package.name,
        "version": package.version,
        "path": str(package.path.resolve()),
        "manifest_sha256": manifest_sha256(package.path),
        "decline_threshold": float(package.thresholds["decline"]),
        "parent": None if not parent else f"{parent['name']}/{parent['version']}",
        "data_window": lineage.get("data_window"),
    }
