"""Model governance: risk category, approvals and the gate before promotion.

Every package's model card carries a risk category and an owner (``BuildConfig.
risk_category`` / ``owner``, stored in ``metadata.json["governance"]``; packages built
before that have only the card, and a package without either counts as ``high``). The
category decides what promotion to primary or canary needs:

    low      may be promoted directly (the checklist is still reported)
    medium   every required item of the pre-production checklist passes
    high     the checklist, and at least one approval recorded for the package's bytes

:func:`checklist` evaluates the items ``manifest``, ``metrics`` (at or above the current
primary, within per-metric margins), ``profile`` (needed by drift monitoring),
``monitoring`` (enough paired shadow records; required only when asked) and ``security``
(auth and TLS on in the target environment; required for high risk). :func:`promotion_gate`
turns the items, the category and the approvals into a :class:`GateDecision`.

Approvals are appended to ``<models>/.governance/approvals.jsonl``, one JSON object a line
(``model``, ``version``, ``by``, ``note``, ``time``, ``manifest_sha256``), and to the admin
audit log (action ``governance.approve``). ``manifest_sha256`` is the SHA-256 of the
package's ``MANIFEST.sha256`` file, so an approval covers those exact bytes: a package
rebuilt under the same version number with other bytes is not approved. ``force`` overrides
the gate; it is written to the audit log (action ``governance.force``, with the reasons
it overrode). Checking that the approver or forcer holds the ``admin`` role is the
caller's job (the admin API's interceptor, or the CLI against the key file).

Nothing here talks gRPC; the admin API and ``riskwire governance`` both call it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from riskwire.pipeline.config import RISK_CATEGORIES
from riskwire.pipeline.errors import PipelineError
from riskwire.pipeline.package import MANIFEST_NAME, load_package, verify_package

from .audit import AuditLog, default_audit_log
from .auth import validate_client_id
from .errors import ModelNotFoundError

DEFAULT_RISK = "high"  # what a package without a readable category counts as (safest)
UNKNOWN_OWNER = "unknown"
# Per test metric: how far below the primary a candidate may be (brier: above; lower is
# better).
DEFAULT_MARGINS: dict[str, float] = {
    "roc_auc": 0.005,
    "pr_auc": 0.01,
    "recall_at_1pct_fpr": 0.02,
    "brier": 0.002,
}
LOWER_IS_BETTER = frozenset({"brier"})
DEFAULT_SHADOW_MIN_RECORDS = 1000
APPROVE_ACTION = "governance.approve"
FORCE_ACTION = "governance.force"
_APPROVALS_FILE = Path(".governance") / "approvals.jsonl"
_FILE_MODE = 0o640
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CARD_RISK = re.compile(r"^\s*[-*]?\s*\*\*Risk category:\*\*\s*([A-Za-z]+)", re.MULTILINE)
_CARD_OWNER = re.compile(r"^\s*[-*]?\s*\*\*Owner:\*\*[ \t]*(.*?)[ \t]*$", re.MULTILINE)
# The placeholder text of cards written before the owner was configurable.
_OLD_OWNER_HINT = " (set `owner` in the build config for your team)."


class GovernanceError(ValueError):
    """A bad argument: model name, version, client id, margins, force without a client."""


# --------------------------------------------------------------------- risk category


def risk_from_card(text: str) -> str | None:
    """The category on the card's ``**Risk category:** <word>`` line, None if absent."""
    match = _CARD_RISK.search(text)
    word = match.group(1).lower() if match else None
    return word if word in RISK_CATEGORIES else None


def owner_from_card(text: str) -> str | None:
    """The text of the card's ``**Owner:**`` line, None if absent or empty."""
    match = _CARD_OWNER.search(text)
    if not match:
        return None
    owner = match.group(1).removesuffix(_OLD_OWNER_HINT).strip()
    return owner or None


def package_risk(package_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """``(risk category, owner)`` of a package: from ``metadata.json["governance"]``,
    else from card.md, else ``("high", "unknown")``."""
    package_dir = Path(package_dir)
    governance = _read_json(package_dir / "metadata.json").get("governance")
    risk = owner = None
    if isinstance(governance, dict):
        risk = governance.get("risk_category")
        owner = governance.get("owner")
    card = _read_text(package_dir / "card.md")
    if risk not in RISK_CATEGORIES:
        risk = risk_from_card(card) or DEFAULT_RISK
    if not isinstance(owner, str) or not owner.strip():
        owner = owner_from_card(card) or UNKNOWN_OWNER
    return risk, owner


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ""


# ------------------------------------------------------------------------ packages


def package_path(models_dir: str | os.PathLike[str], name: str, version: int | str) -> Path:
    """``<models>/<name>/<version>`` after checking the name and version."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise GovernanceError(f"model name {name!r}: expected letters, digits, '.', '_', '-'")
    return Path(models_dir) / name / str(_version(version))


def require_package(models_dir: str | os.PathLike[str], name: str, version: int | str) -> Path:
    """:func:`package_path`, or ModelNotFoundError when there is no package there."""
    path = package_path(models_dir, name, version)
    if not path.is_dir():
        raise ModelNotFoundError(f"no package {name} v{version} in {models_dir}")
    return path


def manifest_digest(package_dir: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of the package's MANIFEST.sha256 file: the identity of its bytes."""
    return hashlib.sha256((Path(package_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def _version(version: int | str) -> int:
    text = str(version)
    if isinstance(version, bool) or not text.isdigit() or int(text) < 1:
        raise GovernanceError(f"version {version!r}: expected a positive integer")
    return int(text)


# ----------------------------------------------------------------------- approvals


def approvals_path(models_dir: str | os.PathLike[str]) -> Path:
    """The append-only approval log: ``<models>/.governance/approvals.jsonl``."""
    return Path(models_dir) / _APPROVALS_FILE


def record_approval(
    models_dir: str | os.PathLike[str],
    name: str,
    version: int | str,
    by: str,
    note: str = "",
    *,
    audit_log: AuditLog | None = None,
) -> dict[str, Any]:
    """Approve the current bytes of package ``name`` v``version`` on behalf of ``by``.

    The package's manifest is verified first (PackageIntegrityError otherwise). The
    approval is written to the audit log (``audit_log``, default
    ``<models>/.audit/audit.jsonl``) and then appended to the approval log; returns it.
    """
    path = require_package(models_dir, name, version)
    try:
        validate_client_id(by)
    except ValueError as exc:
        raise GovernanceError(f"approver: {exc}") from exc
    verify_package(path)
    approval = {
        "model": name,
        "version": _version(version),
        "by": by,
        "note": str(note),
        "time": _now_iso(),
        "manifest_sha256": manifest_digest(path),
    }
    log = audit_log or AuditLog(default_audit_log(models_dir))
    args = {k: approval[k] for k in ("model", "version", "note", "manifest_sha256")}
    # Audited first: an approval that counts is always in the audit log.
    log.append(by, APPROVE_ACTION, args, "ok")
    try:
        _append_line(approvals_path(models_dir), approval)
    except OSError as exc:
        log.append(by, APPROVE_ACTION, args, f"error: approval not stored: {exc}")
        raise
    return approval


def approvals(
    models_dir: str | os.PathLike[str], name: str, version: int | str
) -> list[dict[str, Any]]:
    """Approvals of ``name`` v``version`` that match its current MANIFEST.sha256, oldest
    first ([] when the package or its manifest is missing)."""
    path = package_path(models_dir, name, version)
    try:
        digest = manifest_digest(path)
    except OSError:
        return []
    number = _version(version)
    return [
        record
        for record in _read_lines(approvals_path(models_dir))
        if record.get("model") == name
        and record.get("version") == number
        and record.get("manifest_sha256") == digest
        and isinstance(record.get("by"), str)
    ]


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line under an exclusive flock, with one write, then fsync."""
    line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; unparseable lines are skipped."""
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for raw in raw_lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------- checklist


@dataclass(frozen=True)
class CheckItem:
    """One item of the pre-production checklist; ``required`` items gate promotion."""

    name: str
    passed: bool
    detail: str
    required: bool = True


def compare_metrics(
    candidate: Mapping[str, Any],
    primary: Mapping[str, Any],
    margins: Mapping[str, float] | None = None,
) -> CheckItem:
    """The ``metrics`` item: candidate test metrics against the primary's.

    ``candidate`` / ``primary``: ``metrics.json["test"]`` of each package. Each metric of
    :data:`DEFAULT_MARGINS` must be at least the primary's minus its margin (``brier``:
    at most the primary's plus its margin). ``margins`` overrides some of the defaults.
    A metric the primary lacks is not compared; one the candidate lacks (or NaN) fails.
    """
    limits = _margins(margins)
    failed, parts = [], []
    for metric, margin in limits.items():
        ok, text = _compare_one(metric, candidate.get(metric), primary.get(metric), margin)
        parts.append(text)
        if not ok:
            failed.append(metric)
    verdict = f"below the primary beyond the margin: {', '.join(failed)}; " if failed else ""
    return CheckItem("metrics", not failed, verdict + "; ".join(parts))


def _margins(margins: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_MARGINS)
    for metric, value in (margins or {}).items():
        if metric not in DEFAULT_MARGINS:
            raise GovernanceError(
                f"margin for unknown metric {metric!r}: expected {', '.join(DEFAULT_MARGINS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise GovernanceError(f"margin for {metric}: expected a number, got {value!r}")
        merged[metric] = float(value)
    return merged


def _compare_one(metric: str, candidate: Any, primary: Any, margin: float) -> tuple[bool, str]:
    if not _is_number(primary):
        return True, f"{metric} {_fmt(candidate)} (primary has none)"
    if not _is_number(candidate):
        return False, f"{metric} missing or NaN in the candidate (primary {_fmt(primary)})"
    if metric in LOWER_IS_BETTER:
        bound, ok, sign = primary + margin, candidate <= primary + margin, "≤"
    else:
        bound, ok, sign = primary - margin, candidate >= primary - margin, "≥"
    d = 5 if metric in LOWER_IS_BETTER else 4  # Brier scores are small
    return ok, f"{metric} {_fmt(candidate, d)} vs {_fmt(primary, d)} (need {sign} {_fmt(bound, d)})"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else str(value)


def checklist(
    models_dir: str | os.PathLike[str],
    name: str,
    version: int | str,
    *,
    primary_version: int | str | None,
    margins: Mapping[str, float] | None = None,
    environment: Mapping[str, Any] | None = None,
    require_monitoring: bool = False,
) -> list[CheckItem]:
    """The pre-production checklist of package ``name`` v``version`` (see the module doc).

    ``primary_version``: the version currently serving as primary (None: no primary, the
    metrics item passes). ``environment``: the target environment, with ``auth`` and
    ``tls`` (bools), ``shadow_records`` (paired shadow records of this candidate) and
    optionally ``shadow_min_records`` (default 1000).
    """
    path = require_package(models_dir, name, version)
    risk, _ = package_risk(path)
    env = dict(environment or {})
    return [
        _manifest_item(path),
        _metrics_item(models_dir, name, primary_version, path, margins),
        _profile_item(path),
        _monitoring_item(env, require_monitoring),
        _security_item(env, required=risk == "high"),
    ]


def _manifest_item(path: Path) -> CheckItem:
    try:
        package = load_package(path)
    except (PipelineError, KeyError, ValueError) as exc:
        return CheckItem("manifest", False, str(exc))
    return CheckItem(
        "manifest",
        True,
        f"{MANIFEST_NAME} verified, {package.forest.num_trees()} trees "
        f"(manifest sha256 {manifest_digest(path)[:16]})",
    )


def _metrics_item(
    models_dir: str | os.PathLike[str],
    name: str,
    primary_version: int | str | None,
    path: Path,
    margins: Mapping[str, float] | None,
) -> CheckItem:
    if primary_version is None:
        _margins(margins)  # a bad margin is an error even without a primary
        return CheckItem("metrics", True, "no current primary")
    primary_path = package_path(models_dir, name, primary_version)
    candidate = _test_metrics(path)
    primary = _test_metrics(primary_path)
    if candidate is None:
        return CheckItem("metrics", False, f"{path / 'metrics.json'}: missing or unreadable")
    if primary is None:
        where = primary_path / "metrics.json"
        return CheckItem("metrics", False, f"primary v{primary_version}: {where} unreadable")
    item = compare_metrics(candidate, primary, margins)
    return CheckItem(item.name, item.passed, f"vs primary v{primary_version}: {item.detail}")


def _test_metrics(path: Path) -> dict[str, Any] | None:
    test = _read_json(path / "metrics.json").get("test")
    return test if isinstance(test, dict) else None


def _profile_item(path: Path) -> CheckItem:
    profile = _read_json(path / "profile.json")
    if not profile:
        return CheckItem("profile", False, "profile.json missing or empty: no drift monitoring")
    sections = ", ".join(f"{k} ({len(v)})" for k, v in sorted(profile.items()) if _sized(v))
    return CheckItem("profile", True, f"profile.json present: {sections or 'non-empty'}")


def _sized(value: Any) -> bool:
    return isinstance(value, dict | list) and bool(value)


def _monitoring_item(env: Mapping[str, Any], required: bool) -> CheckItem:
    minimum = env.get("shadow_min_records", DEFAULT_SHADOW_MIN_RECORDS)
    records = env.get("shadow_records")
    if records is None:
        return CheckItem("monitoring", False, "no shadow results for this candidate", required)
    passed = int(records) >= int(minimum)
    detail = f"{int(records)} paired shadow records (need ≥ {int(minimum)})"
    return CheckItem("monitoring", passed, detail, required)


def _security_item(env: Mapping[str, Any], *, required: bool) -> CheckItem:
    states = {what: bool(env.get(what)) for what in ("auth", "tls")}
    detail = ", ".join(f"{what} {'on' if on else 'off'}" for what, on in states.items())
    return CheckItem("security", all(states.values()), f"target environment: {detail}", required)


# --------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateDecision:
    """Whether package ``model`` v``version`` may become primary or canary, and why.

    ``reasons``: why not (what ``force`` overrode when ``forced``); ``approved_by``: the
    clients whose approvals match the package's current bytes."""

    allowed: bool
    risk: str
    reasons: list[str]
    items: list[CheckItem]
    approved_by: list[str]
    forced: bool = False
    owner: str = UNKNOWN_OWNER
    model: str = ""
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict of the decision and its items."""
        return asdict(self)


def promotion_gate(
    models_dir: str | os.PathLike[str],
    name: str,
    version: int | str,
    *,
    primary_version: int | str | None,
    environment: Mapping[str, Any] | None,
    margins: Mapping[str, float] | None = None,
    force: bool = False,
    forced_by: str = "",
    require_monitoring: bool = False,
    audit_log: AuditLog | None = None,
) -> GateDecision:
    """Decide whether ``name`` v``version`` may be promoted to primary or canary.

    low risk: allowed; medium: allowed when every required checklist item passes; high:
    the checklist and at least one approval of the current bytes. ``force=True`` allows it
    anyway and appends a ``governance.force`` record (client ``forced_by``, which must be
    an admin: the caller checks the role) with the reasons it overrode.
    """
    path = require_package(models_dir, name, version)
    if force:
        try:
            validate_client_id(forced_by)
        except ValueError as exc:
            raise GovernanceError(f"force needs the admin's client id: {exc}") from exc
    risk, owner = package_risk(path)
    items = checklist(
        models_dir,
        name,
        version,
        primary_version=primary_version,
        margins=margins,
        environment=environment,
        require_monitoring=require_monitoring,
    )
    approved_by = list(dict.fromkeys(a["by"] for a in approvals(models_dir, name, version)))
    reasons = _blocking_reasons(risk, items, approved_by)
    decision = GateDecision(
        allowed=not reasons or force,
        risk=risk,
        reasons=reasons,
        items=items,
        approved_by=approved_by,
        forced=force,
        owner=owner,
        model=name,
        version=_version(version),
    )
    if force:
        _audit_force(models_dir, decision, primary_version, forced_by, audit_log)
    return decision


def _blocking_reasons(risk: str, items: list[CheckItem], approved_by: list[str]) -> list[str]:
    if risk == "low":
        return []
    reasons = [
        f"{item.name} failed: {item.detail}" for item in items if item.required and not item.passed
    ]
    if risk == "high" and not approved_by:
        reasons.append(
            "high risk: no approval recorded for this package's current bytes "
            "(riskwire governance approve NAME VERSION --by CLIENT)"
        )
    return reasons


def _audit_force(
    models_dir: str | os.PathLike[str],
    decision: GateDecision,
    primary_version: int | str | None,
    forced_by: str,
    audit_log: AuditLog | None,
) -> None:
    log = audit_log or AuditLog(default_audit_log(models_dir))
    args = {
        "model": decision.model,
        "version": decision.version,
        "risk": decision.risk,
        "primary_version": None if primary_version is None else str(primary_version),
        "overridden": decision.reasons,
    }
    log.append(forced_by, FORCE_ACTION, args, "ok")
