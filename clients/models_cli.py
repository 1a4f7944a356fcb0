"""``riskwire models …``: the model lifecycle of a running server (admin API).

    riskwire models list [NAME] [--json]
    riskwire models load NAME VERSION
    riskwire models unload NAME VERSION
    riskwire models promote NAME VERSION [--force]
    riskwire models rollback NAME
    riskwire models canary NAME VERSION --weight PCT [--steps 5,25,50,100] [--interval 10m]
                           [--force]
    riskwire models canary NAME --stop
    riskwire models shadow NAME VERSION --rate PCT
    riskwire models shadow NAME --off

Every command takes ``--admin HOST:PORT`` (default 127.0.0.1:50052); the API key and TLS
files come from ``$RISKWIRE_API_KEY`` and ``$RISKWIRE_TLS_*`` as for the other commands.
Changes print the resulting traffic state; gRPC errors print ``CODE: details`` and exit 2.
grpc is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .admin import AdminClient

DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"  # as riskwire.clients.admin (imported lazily)

_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}
_TABLE_COLUMNS = ("NAME", "VERSION", "STATE", "TRAFFIC", "RISK", "OWNER", "ROC_AUC")


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``models`` command group to the top-level subparsers; return its subparsers."""
    group = commands.add_parser(
        "models", help="model lifecycle: list, load, promote, rollback, canary, shadow"
    ).add_subparsers(dest="models_command", required=True)

    listing = _command(group, "list", cmd_list, "versions, states and traffic of each model")
    listing.add_argument("name", nargs="?", default="", help="only this model")
    listing.add_argument("--json", action="store_true", help="print everything as JSON")

    for verb, handler, text in (
        ("load", cmd_load, "load a version in every worker (serving is untouched)"),
        ("unload", cmd_unload, "unload a version that takes no traffic"),
        ("promote", cmd_promote, "make a version the primary (blue/green)"),
    ):
        parser = _command(group, verb, handler, text)
        parser.add_argument("name")
        parser.add_argument("version")
    _force_arg(group.choices["promote"])

    rollback = _command(group, "rollback", cmd_rollback, "back to the previous primary")
    rollback.add_argument("name")

    canary = _command(group, "canary", cmd_canary, "send a share of cards to a candidate")
    canary.add_argument("name")
    canary.add_argument("version", nargs="?", default="", help="candidate (not with --stop)")
    how = canary.add_mutually_exclusive_group(required=True)
    how.add_argument("--weight", type=_weight, help="percent of cards (sticky by card)")
    how.add_argument("--stop", action="store_true", help="end the canary")
    canary.add_argument("--steps", type=_steps, default=(), help="later weights, e.g. 5,25,50,100")
    canary.add_argument(
        "--interval",
        type=_interval,
        default=0.0,
        help="time between steps: 30s, 10m, 1h or seconds",
    )
    _force_arg(canary)

    shadow = _command(group, "shadow", cmd_shadow, "mirror a share of a model's traffic")
    shadow.add_argument("name", help="model whose traffic is mirrored")
    shadow.add_argument("version", nargs="?", default="", help="shadow version (not with --off)")
    mirror = shadow.add_mutually_exclusive_group(required=True)
    mirror.add_argument("--rate", type=_rate, help="percent of requests mirrored (0-100)")
    mirror.add_argument("--off", action="store_true", help="stop mirroring this model")
    return group


def _command(
    group: argparse._SubParsersAction, verb: str, handler: Callable[..., int], text: str
) -> argparse.ArgumentParser:
    parser = group.add_parser(verb, help=text)
    parser.add_argument(
        "--admin",
        default=DEFAULT_ADMIN_TARGET,
        help=f"admin API host:port (default {DEFAULT_ADMIN_TARGET})",
    )
    parser.set_defaults(handler=handler)
    return parser


def _force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="admins only: skip the governance gate (audited)"
    )


def _percent(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0.0 <= value <= 100.0) or (value == 0.0 and not zero):
        bounds = "[0, 100]" if zero else "(0, 100]"
        raise argparse.ArgumentTypeError(f"{text} is not a percent in {bounds}")
    return value


def _weight(text: str) -> float:
    return _percent(text, zero=False)


def _rate(text: str) -> float:
    return _percent(text, zero=True)


def _steps(text: str) -> tuple[float, ...]:
    """``5,25,50,100``: percents, each in (0, 100], strictly ascending."""
    steps = tuple(_weight(part.strip()) for part in text.split(","))
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise argparse.ArgumentTypeError(f"steps {text!r} are not ascending")
    return steps


def _interval(text: str) -> float:
    """``90``, ``90s``, ``10m`` or ``1.5h`` as seconds (> 0)."""
    number, unit = text.strip(), 1.0
    if number[-1:].lower() in _SECONDS_PER_UNIT:
        number, unit = number[:-1], _SECONDS_PER_UNIT[number[-1].lower()]
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = float("nan")
    if not seconds > 0.0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use 30s, 10m, 1h or 600")
    return seconds


def _error(message: str) -> int:
    print(f"riskwire: error: {message}", file=sys.stderr)
    return 2


def _rpc_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A gRPC error in ``handler`` prints ``CODE: details`` and returns exit status 2."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        try:
            return handler(args)
        except grpc.RpcError as exc:
            return _error(f"{exc.code().name}: {exc.details()}")

    return wrapper


def _admin(args: argparse.Namespace) -> AdminClient:
    """A client of the admin API at ``--admin`` (API key and TLS from the environment)."""
    from .admin import AdminClient
    from .client import connection_from_env

    return AdminClient(args.admin, **connection_from_env())


def _report(change: dict[str, Any]) -> int:
    if change["message"]:
        print(change["message"])
    print(format_traffic(change["traffic"]))
    return 0


@_rpc_errors
def cmd_list(args: argparse.Namespace) -> int:
    """Print the versions table and one traffic line per model (or everything as JSON)."""
    with _admin(args) as admin:
        models = admin.list_models(args.name)
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
        return 0
    if not models["versions"] and not models["traffic"]:
        print(f"no versions of {args.name}" if args.name else "no models")
        return 0
    print(format_versions(models["versions"]))
    for traffic in models["traffic"]:
        print(format_traffic(traffic))
    return 0


@_rpc_errors
def cmd_load(args: argparse.Namespace) -> int:
    """Load a version in every worker."""
    with _admin(args) as admin:
        return _report(admin.load_model(args.name, args.version))


@_rpc_errors
def cmd_unload(args: argparse.Namespace) -> int:
    """Unload a version that takes no traffic."""
    with _admin(args) as admin:
        return _report(admin.unload_model(args.name, args.version))


@_rpc_errors
def cmd_promote(args: argparse.Namespace) -> int:
    """Make a version the primary."""
    with _admin(args) as admin:
        return _report(admin.promote(args.name, args.version, force=args.force))


@_rpc_errors
def cmd_rollback(args: argparse.Namespace) -> int:
    """Back to the previous primary."""
    with _admin(args) as admin:
        return _report(admin.rollback(args.name))


@_rpc_errors
def cmd_canary(args: argparse.Namespace) -> int:
    """Start, change or (``--stop``) end a canary."""
    problem = _canary_problem(args)
    if problem:
        return _error(problem)
    with _admin(args) as admin:
        if args.stop:
            return _report(admin.set_canary(args.name, "", 0.0, force=args.force))
        change = admin.set_canary(
            args.name,
            args.version,
            args.weight,
            steps=args.steps,
            step_interval_s=args.interval,
            force=args.force,
        )
        return _report(change)


def _canary_problem(args: argparse.Namespace) -> str | None:
    if args.stop and (args.version or args.steps or args.interval):
        return "--stop takes no VERSION, --steps or --interval"
    if not args.stop and not args.version:
        return "canary needs a VERSION (or --stop)"
    if args.interval and not args.steps:
        return "--interval needs --steps"
    return None


@_rpc_errors
def cmd_shadow(args: argparse.Namespace) -> int:
    """Mirror ``--rate`` percent of NAME's requests to VERSION, or (``--off``) stop."""
    if args.off and args.version:
        return _error("--off takes no VERSION")
    if not args.off and not args.version:
        return _error("shadow needs a VERSION (or --off)")
    with _admin(args) as admin:
        if not args.off:
            stored = admin.set_shadow(
                enabled=True, primary=args.name, version=args.version, rate_percent=args.rate
            )
        else:
            current = admin.get_shadow()
            if current["enabled"] and current["primary"] not in ("", args.name):
                return _error(
                    f"the shadow mirrors {current['primary']}, not {args.name}; nothing changed"
                )
            stored = admin.set_shadow(enabled=False, primary=args.name)
    print(format_shadow(stored))
    return 0


def format_shadow(config: dict[str, Any]) -> str:
    """One line: where the primary's traffic is mirrored, and the configuration generation."""
    generation = f"(configuration {config['generation']})"
    primary = config["primary"] or "the default model"
    if not config["enabled"]:
        return f"shadow of {primary}: off {generation}"
    target = f"{config['model'] or primary} v{config['version']}"
    if config["endpoint"]:
        target += f" at {config['endpoint']}"
    return f"shadow of {primary}: {target}, {config['rate_percent']:g}% mirrored {generation}"


def format_versions(versions: list[dict[str, Any]]) -> str:
    """The fixed-width versions table, then one line per version that failed to load."""
    rows = [_TABLE_COLUMNS]
    for v in versions:
        roc_auc = v["metrics"].get("roc_auc")
        rows.append(
            (
                v["name"],
                v["version"],
                v["state"],
                f"{v['traffic_percent']:g}%" if v["traffic_percent"] else "-",
                v["risk_category"] or "-",
                v["owner"] or "-",
                "-" if roc_auc is None else f"{roc_auc:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines += [
        f"{v['name']} v{v['version']}: load error: {v['load_error']}"
        for v in versions
        if v["load_error"]
    ]
    return "\n".join(lines)


def format_traffic(traffic: dict[str, Any]) -> str:
    """One line: primary, canary and its weight, automatic steps left or why they halted,
    the previous primary (the rollback target) and other loaded versions."""
    parts = [f"primary {_version(traffic['primary'])}"]
    if traffic["canary"]:
        parts.append(f"canary v{traffic['canary']} at {traffic['canary_weight']:g}%")
    if traffic["steps"]:
        steps = ", ".join(f"{s:g}%" for s in traffic["steps"])
        every = traffic["step_interval_s"]
        parts.append(f"next {steps}" + (f" every {format_duration(every)}" if every else ""))
    if traffic["halted_reason"]:
        parts.append(f"canary halted: {traffic['halted_reason']}")
    if traffic["previous"]:
        parts.append(f"previous v{traffic['previous'][-1]}")
    if traffic["loaded"]:
        parts.append("also loaded " + ", ".join(f"v{v}" for v in traffic["loaded"]))
    return f"{traffic['name']}: " + ", ".join(parts)


def _version(version: str) -> str:
    return f"v{version}" if version else "none"


def format_duration(seconds: float) -> str:
    """``600`` → ``10m``, ``5400`` → ``1.5h``, ``45`` → ``45s``."""
    for unit in ("h", "m"):
        if seconds >= _SECONDS_PER_UNIT[unit]:
            return f"{seconds / _SECONDS_PER_UNIT[unit]:g}{unit}"
    return f"{seconds:g}s"
