"""The ``riskwire`` command line.

    riskwire data synth --rows N --seed S --out FILE
    riskwire data export --out FILE [--since T] [--until T] …  (see clients/export_cli.py)
    riskwire build --data FILE --name NAME [--config build.toml] [--models DIR] [--force]
                   [--parent NAME/VERSION]
    riskwire runs list [--models DIR] [--json]
    riskwire compare NAME CHAMPION CHALLENGER --data FILE …  (see clients/compare_cli.py)
    riskwire package verify PATH
    riskwire score [--local] (--json '{...}' | --card-id C --amount A ...)
    riskwire score-file IN --out OUT [--local]
    riskwire serve [--host H] [--port P] [--workers N] [--models DIR] [--config FILE]
                   [--profile dev|test|staging|prod]
    riskwire shadow report|export|status|set|clear …   (see clients/shadow_cli.py)
    riskwire feedback FILE [--target HOST:PORT]
    riskwire alerts list [--models DIR] [--open] [--json]
    riskwire drift status|report …                      (see clients/drift_cli.py)
    riskwire models list|load|unload|promote|rollback|canary|shadow …  (models_cli.py)
    riskwire governance check|approve …                 (see clients/governance_cli.py)
    riskwire keys create|list|revoke …                  (see clients/keys_cli.py)
    riskwire certs dev [--out DIR]                      (see clients/certs_cli.py)
    riskwire audit verify|list …                        (see clients/audit_cli.py)
    riskwire review next|label|list|stats|sync …        (see clients/review_cli.py)

Heavy modules are imported inside each command so ``riskwire --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _models_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default=None,
        help="models directory (default: $RISKWIRE_MODELS or ./models)",
    )


def _cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from riskwire.pipeline import synth

    started = time.perf_counter()
    table = synth.generate(args.rows, seed=args.seed)
    synth.write(table, args.out)
    fraud = sum(table.column("label").to_pylist())
    print(
        f"wrote {table.num_rows} rows ({fraud} fraud, {fraud / table.num_rows:.2%}) "
        f"to {args.out} in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from riskwire.pipeline.build import build
    from riskwire.pipeline.config import load_config

    result = build(
        args.data,
        name=args.name,
        models=args.models,
        config=load_config(args.config),
        force=args.force,
        parent=args.parent,
        log=lambda message: print(message, flush=True),
    )
    metrics = result.run["metrics"]
    state = "reused" if result.reused else "built"
    print(
        f"{state} {result.name} v{result.version} at {result.path}: "
        f"test ROC AUC {metrics['roc_auc']:.4f}"
    )
    return 0


def _cmd_runs_list(args: argparse.Namespace) -> int:
    from riskwire.pipeline.package import models_dir
    from riskwire.pipeline.runs import format_runs, read_runs

    runs = read_runs(models_dir(args.models))
    if args.json:
        for run in runs:
            print(json.dumps(run, sort_keys=True))
    elif runs:
        print(format_runs(runs))
    else:
        print("no runs recorded yet")
    return 0


def _cmd_package_verify(args: argparse.Namespace) -> int:
    from riskwire.pipeline.package import load_package

    package = load_package(args.path)
    print(
        f"ok: {package.name} v{package.version}, {package.forest.num_trees()} trees, "
        f"{len(package.metadata['model']['feature_names'])} features"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    # One Numba thread per process (parallelism comes from the workers). Set before
    # Numba is first imported: later, a fresh compile (empty cache) refuses the change.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from riskwire.server.config import SettingsError, load_settings
    from riskwire.server.supervisor import Supervisor

    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "models": args.models,
        "profile": args.profile,
        "log_level": args.log_level,
    }
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
        return Supervisor(settings).run()
    except SettingsError as exc:
        print(f"riskwire: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="riskwire", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="data sources").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="generate synthetic fraud-style transactions")
    synth.add_argument("--rows", type=int, default=200_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output file (.parquet or .csv)")
    synth.set_defaults(handler=_cmd_data_synth)
    from . import export_cli

    export_cli.register(data)

    build = commands.add_parser("build", help="build a model package from raw data")
    build.add_argument("--data", required=True, help="raw transactions (.parquet or .csv)")
    build.add_argument("--name", default="fraud", help="model name (default: fraud)")
    build.add_argument("--config", default=None, help="build config TOML")
    build.add_argument(
        "--force",
        action="store_true",
        help="retrain even if a run with the same data and config exists",
    )
    build.add_argument(
        "--parent",
        default=None,
        metavar="NAME/VERSION",
        help="the model version this build retrains (recorded as lineage), e.g. fraud/7",
    )
    _models_arg(build)
    build.set_defaults(handler=_cmd_build)

    runs = commands.add_parser("runs", help="the run registry").add_subparsers(
        dest="runs_command", required=True
    )
    runs_list = runs.add_parser("list", help="list recorded builds")
    runs_list.add_argument("--json", action="store_true", help="one JSON object per line")
    _models_arg(runs_list)
    runs_list.set_defaults(handler=_cmd_runs_list)

    package = commands.add_parser("package", help="model packages").add_subparsers(
        dest="package_command", required=True
    )
    verify = package.add_parser("verify", help="check a package's manifest and load it")
    verify.add_argument("path")
    verify.set_defaults(handler=_cmd_package_verify)
    from . import score_cli

    score = commands.add_parser("score", help="score one transaction")
    score_cli.add_score_args(score)
    score.set_defaults(handler=score_cli.cmd_score)
    score_file = commands.add_parser("score-file", help="score a Parquet/CSV file")
    score_cli.add_score_file_args(score_file)
    score_file.set_defaults(handler=score_cli.cmd_score_file)

    from . import (
        alerts_cli,
        audit_cli,
        certs_cli,
        compare_cli,
        drift_cli,
        governance_cli,
        keys_cli,
        models_cli,
        review_cli,
        shadow_cli,
    )

    shadow_cli.register(commands)
    shadow_cli.register_feedback(commands)
    alerts_cli.register(commands)
    drift_cli.register(commands)
    audit_cli.register(commands)
    keys_cli.register(commands)
    certs_cli.register(commands)
    governance_cli.register(commands)
    models_cli.register(commands)
    compare_cli.register(commands)
    review_cli.register(commands)

    serve = commands.add_parser("serve", help="serve models over gRPC")
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 50051)")
    serve.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: one per core)"
    )
    serve.add_argument(
        "--models", default=None, help="models directory (default: $RISKWIRE_MODELS or ./models)"
    )
    serve.add_argument("--config", default=None, help="server config TOML")
    serve.add_argument("--profile", default=None, choices=("dev", "test", "staging", "prod"))
    serve.add_argument("--log-level", dest="log_level", default=None)
    serve.set_defaults(handler=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``riskwire`` console script."""
    from riskwire.pipeline.errors import PipelineError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PipelineError as exc:
        print(f"riskwire: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
