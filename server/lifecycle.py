"""Model lifecycle on the control plane: load, unload, promote, roll back, canary.

    admin RPC ─▶ Lifecycle (supervisor) ─ writes models/<name>/traffic.json
                      ▲                        │ every worker polls it (≤ 0.25 s):
                      │                        ▼ load + verify + warm, then switch
                 run/models/worker-*.json ◀─ each worker publishes what it holds

A version takes traffic only once every live worker reports it loaded: promote and
canary first add it to the configuration's ``loaded`` list and wait for all workers;
a version that fails to load anywhere is taken out again and the call fails with the
worker's reason, serving untouched. Routing changes themselves are one atomic file
write; each worker switches between two requests.

Every change is appended to the audit log. Promotion to primary or canary passes the
governance gate (``server/governance.py``); ``force`` (admins) is audited there.

Automatic canaries (``steps``, ``step_interval_s``) are advanced by :meth:`tick`,
called by the supervisor every second. Before each step and continuously, the guards
compare the canary with the primary over the requests since the step began, from the
merged metrics (error rate, p99 latency), the drift monitor (output-score PSI) and, when
a shadow pairs them, decision disagreement. A breach rolls the canary back (weight 0),
records the reason in the configuration, the log, the audit log and an alert.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskwire.pipeline.errors import PipelineError
from riskwire.pipeline.package import list_versions

from .audit import AuditLog
from .errors import (
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    ServingError,
)
from .governance import GovernanceError, package_risk, promotion_gate
from .registry import ModelRegistry
from .traffic import FileTrafficStore, Traffic, model_names

log = logging.getLogger(__name__)

SERVER_ERRORS = frozenset({2, 13, 14})  # UNKNOWN, INTERNAL, UNAVAILABLE: the model's fault
GUARD_CLIENT = "riskwire:canary-guard"
METRIC_KEYS = ("roc_auc", "pr_auc", "recall_at_1pct_fpr", "brier")


@dataclass(frozen=True)
class CanaryGuards:
    """Limits of an automatic canary, over the requests since its step began."""

    max_error_rate: float = 0.01  # server errors / calls
    max_p99_ratio: float = 3.0  # canary p99 / primary p99
    max_score_psi: float = 0.25  # output-score PSI of the canary against its profile
    max_disagreement: float = 0.2  # share of decisions differing (when a shadow pairs them)
    min_calls: int = 20  # calls on the canary before a verdict or a step


@dataclass
class _VersionCalls:
    calls: int = 0
    errors: int = 0
    buckets: list[int] | None = None
    bounds: list[float] | None = None

    def minus(self, base: _VersionCalls) -> _VersionCalls:
        buckets = None
        if self.buckets is not None:
            before = base.buckets or [0] * len(self.buckets)
            buckets = [a - b for a, b in zip(self.buckets, before, strict=True)]
        return _VersionCalls(self.calls - base.calls, self.errors - base.errors, buckets,
                             self.bounds)  # fmt: skip

    def p99_s(self) -> float | None:
        """Upper bound of the bucket holding the 99th percentile."""
        if not self.buckets or not self.bounds or sum(self.buckets) == 0:
            return None
        target, running = 0.99 * sum(self.buckets), 0
        for bound, count in zip([*self.bounds, float("inf")], self.buckets, strict=True):
            running += count
            if running >= target:
                return bound
        return None


class Lifecycle:
    """Traffic changes of every model, one at a time, with the workers' acknowledgement."""

    def __init__(
        self,
        models_dir: Path,
        status_dir: Path,
        *,
        live_pids: Callable[[], set[int]],
        audit: AuditLog,
        environment: dict[str, Any],
        guards: CanaryGuards | None = None,
        metrics: Callable[[], list[dict]] | None = None,
        drift_rows: Callable[[], list[dict]] | None = None,
        shadow_pairs: Callable[[], dict] | None = None,
        alert: Callable[[str, str, str, float, str], None] | None = None,
        load_timeout_s: float = 120.0,
        store: Any = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        # traffic configurations: the models dir, or Redis (shared with other replicas)
        self.store = store if store is not None else FileTrafficStore(self.models_dir)
        self.status_dir = status_dir
        self.live_pids = live_pids
        self.audit = audit
        self.environment = environment
        self.guards = guards or CanaryGuards()
        self.metrics = metrics
        self.drift_rows = drift_rows
        self.shadow_pairs = shadow_pairs
        self.alert = alert
        self.load_timeout_s = load_timeout_s
        self._lock = threading.RLock()
        self._baselines: dict[tuple[str, str, int], dict[str, _VersionCalls]] = {}

    # ------------------------------------------------------------------ reading
    def traffic(self, name: str) -> Traffic:
        """The model's configuration, or the implicit one: the version the workers serve
        (the highest one when they started; a version built since does not take over)."""
        traffic = self.store.read(name)
        if traffic is not None:
            return traffic
        versions = list_versions(self.models_dir, name)
        if not versions:
            raise ModelNotFoundError(f"no model {name!r} under {self.models_dir}")
        served = {s.get("serving", {}).get(name) for s in self.worker_states()} - {None}
        if len(served) == 1:
            return Traffic(name=name, primary=str(served.pop()))
        return Traffic(name=name, primary=str(versions[-1]))

    def worker_states(self) -> list[dict[str, Any]]:
        """What each live worker reports holding."""
        live, states = self.live_pids(), []
        for path in sorted(self.status_dir.glob("worker-*.json")):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("pid") in live:
                states.append(state)
        return states

    def list_models(self, name: str = "") -> tuple[list[dict[str, Any]], list[Traffic]]:
        """Every version of every model (or of ``name``) with its state and traffic."""
        names = [name] if name else model_names(self.models_dir)
        states = self.worker_states()
        versions, traffics = [], []
        for model in names:
            try:
                traffic = self.traffic(model)
            except ModelNotFoundError:
                if name:
                    raise
                continue
            traffics.append(traffic)
            for number in list_versions(self.models_dir, model):
                version = str(number)
                path = self.models_dir / model / version
                risk, owner = package_risk(path)
                holders = [s["worker"] for s in states
                           if version in s.get("loaded", {}).get(model, [])]  # fmt: skip
                errors = [s["errors"][f"{model}/{version}"] for s in states
                          if f"{model}/{version}" in s.get("errors", {})]  # fmt: skip
                versions.append({
                    "name": model, "version": version,
                    "state": _state(traffic, version, bool(holders)),
                    "traffic_percent": traffic.share(version), "risk_category": risk,
                    "owner": owner, "metrics": _test_metrics(path),
                    "loaded_in_workers": sorted(holders), "load_error": errors[0] if errors else "",
                })  # fmt: skip
        return versions, traffics

    # ------------------------------------------------------------------ changes
    def load(self, name: str, version: str, client: str) -> tuple[Traffic, str]:
        """Load ``version`` in every worker (serving untouched)."""
        with self._lock:
            args = {"model": name, "version": version}
            try:
                traffic = self._ensure_loaded(self.traffic(name), version)
            except Exception as exc:
                self._audit(client, "model.load", args, exc)
                raise
            self._audit(client, "model.load", args, None)
            return traffic, f"{name} v{version} is loaded in every worker"

    def unload(self, name: str, version: str, client: str) -> tuple[Traffic, str]:
        """Unload a version that takes no traffic and is not the rollback target."""
        with self._lock:
            args = {"model": name, "version": version}
            traffic = self.traffic(name)
            busy = {traffic.primary: "the primary", traffic.canary: "the canary",
                    **dict.fromkeys(traffic.previous[-1:], "the rollback target")}  # fmt: skip
            if version in busy:
                error = FailedPreconditionError(
                    f"{name} v{version} is {busy[version]}; promote or roll back first"
                )
                self._audit(client, "model.unload", args, error)
                raise error
            served = version in traffic.previous
            stored = self.store.write(traffic.replace(
                loaded=tuple(v for v in traffic.loaded if v != version),
                retired=tuple(dict.fromkeys([*traffic.retired, version])) if served
                else traffic.retired,
            ))  # fmt: skip
            self._wait_applied(name, stored.generation)
            self._audit(client, "model.unload", args, None)
            return stored, f"{name} v{version} unloaded" + (" (retired)" if served else "")

    def promote(self, name: str, version: str, client: str, *, force: bool = False
                ) -> tuple[Traffic, str]:  # fmt: skip
        """Blue/green: ``version`` becomes the primary in every worker."""
        with self._lock:
            args = {"model": name, "version": version, "force": force}
            try:
                traffic = self.traffic(name)
                if version == traffic.primary:
                    raise FailedPreconditionError(f"{name} v{version} is already the primary")
                self._gate(name, version, traffic, client, force)
                traffic = self._ensure_loaded(traffic, version)
                stored = self._write(traffic.replace(
                    primary=version,
                    previous=(*[v for v in traffic.previous if v != version], traffic.primary),
                    canary="" if traffic.canary == version else traffic.canary,
                    canary_weight=0.0 if traffic.canary == version else traffic.canary_weight,
                    steps=() if traffic.canary == version else traffic.steps,
                    loaded=tuple(v for v in traffic.loaded if v != version),
                    retired=tuple(v for v in traffic.retired if v != version),
                    halted_reason="",
                ))  # fmt: skip
            except Exception as exc:
                self._audit(client, "model.promote", args, exc)
                raise
            self._audit(client, "model.promote", {**args, "previous": traffic.primary}, None)
            return stored, f"{name} v{version} is the primary (was v{traffic.primary})"

    def rollback(self, name: str, client: str) -> tuple[Traffic, str]:
        """Back to the previous primary at once (it stayed loaded for this)."""
        with self._lock:
            traffic = self.traffic(name)
            args = {"model": name, "from": traffic.primary}
            if not traffic.previous:
                error = FailedPreconditionError(f"{name} has no previous primary to roll back to")
                self._audit(client, "model.rollback", args, error)
                raise error
            target = traffic.previous[-1]
            stored = self._write(traffic.replace(
                primary=target, previous=traffic.previous[:-1], canary="", canary_weight=0.0,
                steps=(), loaded=tuple(dict.fromkeys([*traffic.loaded, traffic.primary])),
            ))  # fmt: skip
            self._audit(client, "model.rollback", {**args, "to": target}, None)
            return stored, f"{name} rolled back to v{target} (v{traffic.primary} stays loaded)"

    def set_canary(
        self, name: str, version: str, weight: float, client: str, *,
        steps: tuple[float, ...] = (), step_interval_s: float = 0.0, force: bool = False,
    ) -> tuple[Traffic, str]:  # fmt: skip
        """Send ``weight`` percent of cards to ``version`` (0 or no version: end it)."""
        with self._lock:
            args = {"model": name, "version": version, "weight": weight, "steps": list(steps),
                    "step_interval_s": step_interval_s, "force": force}  # fmt: skip
            try:
                _check_canary(weight, steps, step_interval_s)
                traffic = self.traffic(name)
                if not version or weight == 0:
                    ended = traffic.canary
                    stored = self._write(traffic.replace(
                        canary="", canary_weight=0.0, steps=(), step_interval_s=0.0,
                        loaded=tuple(dict.fromkeys([*traffic.loaded, *([ended] if ended else [])])),
                    ))  # fmt: skip
                    self._audit(client, "model.canary", args, None)
                    return stored, f"{name}: canary ended" + (f" (v{ended})" if ended else "")
                if version == traffic.primary:
                    raise FailedPreconditionError(f"{name} v{version} is the primary")
                if version != traffic.canary or traffic.canary_weight == 0:
                    self._gate(name, version, traffic, client, force)
                traffic = self._ensure_loaded(traffic, version)
                stored = self._write(traffic.replace(
                    canary=version, canary_weight=float(weight), steps=tuple(steps),
                    step_interval_s=step_interval_s, step_started_at=time.time(),
                    loaded=tuple(v for v in traffic.loaded if v != version), halted_reason="",
                ))  # fmt: skip
            except Exception as exc:
                self._audit(client, "model.canary", args, exc)
                raise
            self._audit(client, "model.canary", args, None)
            plan = f"; then {', '.join(f'{s:g}%' for s in steps)}" if steps else ""
            return stored, f"{name} v{version} takes {weight:g}% of cards{plan}"

    # ------------------------------------------------------------------ automatic canary
    def tick(self, now: float | None = None) -> None:
        """Check the guards of every running canary; advance automatic steps when due."""
        now = time.time() if now is None else now
        for name in self.store.names():
            try:
                traffic = self.store.read(name)
            except (ValueError, ServingError):
                continue
            if traffic is None or not traffic.canary_active:
                continue
            with self._lock:
                self._check_canary(traffic, now)

    def _check_canary(self, traffic: Traffic, now: float) -> None:
        name = traffic.name
        calls = self._calls_since_step(traffic)
        canary = calls.get(traffic.canary, _VersionCalls())
        breach = self._breach(traffic, canary, calls.get(traffic.primary, _VersionCalls()))
        if breach is not None:
            self._halt(traffic, breach)
            return
        due = traffic.steps and now - traffic.step_started_at >= traffic.step_interval_s
        if not due or canary.calls < self.guards.min_calls:
            return
        weight, rest = traffic.steps[0], traffic.steps[1:]
        if weight >= 100.0:
            stored = self._write(traffic.replace(
                primary=traffic.canary, previous=(*traffic.previous, traffic.primary),
                canary="", canary_weight=0.0, steps=(), halted_reason="",
            ))  # fmt: skip
            self._audit(GUARD_CLIENT, "model.canary.complete",
                        {"model": name, "version": traffic.canary}, None)  # fmt: skip
            log.info("model %s: canary v%s completed, now primary", name, stored.primary)
            return
        self._write(traffic.replace(canary_weight=weight, steps=rest, step_started_at=now))
        self._audit(GUARD_CLIENT, "model.canary.step",
                    {"model": name, "version": traffic.canary, "weight": weight}, None)  # fmt: skip
        log.info("model %s: canary v%s stepped to %g%%", name, traffic.canary, weight)

    def _breach(self, traffic: Traffic, canary: _VersionCalls, primary: _VersionCalls
                ) -> str | None:  # fmt: skip
        guards = self.guards
        if canary.calls >= guards.min_calls:
            rate = canary.errors / canary.calls
            if rate > guards.max_error_rate:
                return (f"error rate {rate:.1%} over {canary.calls} calls "
                        f"(limit {guards.max_error_rate:.1%})")  # fmt: skip
            ours, theirs = canary.p99_s(), primary.p99_s()
            enough = primary.calls >= guards.min_calls
            if ours and theirs and enough and ours > guards.max_p99_ratio * theirs:
                return (
                    f"p99 latency {ours * 1000:.1f} ms vs the primary's {theirs * 1000:.1f} ms "
                    f"(limit ×{guards.max_p99_ratio:g})"
                )
        for row in self.drift_rows() if self.drift_rows is not None else ():
            if (
                (row["model"], str(row["version"]), row["column"], row["measure"])
                == (traffic.name, traffic.canary, "score", "psi")
                and row["value"] == row["value"]
                and row["value"] > guards.max_score_psi
            ):
                return (f"output drift: score PSI {row['value']:.3f} in window {row['window']} "
                        f"(limit {guards.max_score_psi:g})")  # fmt: skip
        pairs = self.shadow_pairs() if self.shadow_pairs is not None else {}
        stats = pairs.get((traffic.name, traffic.primary, traffic.name, traffic.canary))
        if stats is not None and stats.scored >= guards.min_calls:
            disagreement = 1.0 - stats.agree / stats.scored
            if disagreement > guards.max_disagreement:
                return (
                    f"disagreement with the primary {disagreement:.1%} of "
                    f"{stats.scored} paired decisions (limit {guards.max_disagreement:.0%})"
                )
        return None

    def _halt(self, traffic: Traffic, reason: str) -> None:
        message = f"canary {traffic.name} v{traffic.canary} rolled back: {reason}"
        self._write(traffic.replace(
            canary="", canary_weight=0.0, steps=(), halted_reason=reason,
            loaded=tuple(dict.fromkeys([*traffic.loaded, traffic.canary])),
        ))  # fmt: skip
        log.error("%s", message)
        self._audit(GUARD_CLIENT, "model.canary.halt",
                    {"model": traffic.name, "version": traffic.canary, "reason": reason},
                    None)  # fmt: skip
        if self.alert is not None:
            self.alert(traffic.name, traffic.canary, "canary_guard", 1.0, message)

    def _calls_since_step(self, traffic: Traffic) -> dict[str, _VersionCalls]:
        """Calls per version of this model since the canary's current step began."""
        totals = self._totals(traffic.name)
        key = (traffic.name, traffic.canary, int(traffic.step_started_at * 1000))
        base = self._baselines.get(key)
        if base is None:
            self._baselines = {k: v for k, v in self._baselines.items() if k[0] != traffic.name}
            base = self._baselines[key] = totals
        return {v: calls.minus(base.get(v, _VersionCalls())) for v, calls in totals.items()}

    def _totals(self, name: str) -> dict[str, _VersionCalls]:
        totals: dict[str, _VersionCalls] = {}
        for series in self.metrics() if self.metrics is not None else ():
            attributes = series["attributes"]
            if attributes.get("riskwire.model") != name:
                continue
            calls = totals.setdefault(attributes["riskwire.model_version"], _VersionCalls())
            if series["name"] == "riskwire.requests":
                calls.calls += int(series["value"])
                if attributes.get("rpc.grpc.status_code") in SERVER_ERRORS:
                    calls.errors += int(series["value"])
            elif series["name"] == "rpc.server.call.duration":
                if calls.buckets is None:
                    calls.buckets, calls.bounds = list(series["buckets"]), series["bounds"]
                elif calls.bounds == series["bounds"]:
                    calls.buckets = [a + b for a, b in zip(calls.buckets, series["buckets"],
                                                           strict=True)]  # fmt: skip
        return totals

    # ------------------------------------------------------------------ helpers
    def _gate(self, name: str, version: str, traffic: Traffic, client: str, force: bool) -> None:
        try:
            decision = promotion_gate(
                self.models_dir, name, version, primary_version=traffic.primary,
                environment=self.environment, force=force, forced_by=client,
                audit_log=self.audit,
            )  # fmt: skip
        except GovernanceError as exc:
            raise InvalidInputError(str(exc)) from exc
        if not decision.allowed:
            raise FailedPreconditionError(
                f"governance: {name} v{version} ({decision.risk} risk) may not be promoted: "
                + "; ".join(decision.reasons)
            )

    def _ensure_loaded(self, traffic: Traffic, version: str) -> Traffic:
        """Verify the package here, then have every worker load it; raises (and restores
        the configuration) when any worker cannot."""
        name = traffic.name
        path = self.models_dir / name / version
        if not path.is_dir():
            raise ModelNotFoundError(f"no package {name} v{version} under {self.models_dir}")
        try:
            ModelRegistry(self.models_dir, name).load(path)  # manifest, schema, features
        except (PipelineError, OSError, ValueError) as exc:
            raise FailedPreconditionError(f"{name} v{version} cannot be loaded: {exc}") from exc
        if version in traffic.needed() and self._held_everywhere(name, version):
            return traffic
        staged = self._write(traffic.replace(
            loaded=tuple(dict.fromkeys([*traffic.loaded, version])),
        ), wait=False)  # fmt: skip
        error = self._wait_loaded(name, version, staged.generation)
        if error is not None:
            self._write(staged.replace(loaded=traffic.loaded), wait=False)
            raise FailedPreconditionError(f"{name} v{version} failed to load: {error}")
        return staged

    def _held_everywhere(self, name: str, version: str) -> bool:
        states = self.worker_states()
        return bool(states) and all(version in s.get("loaded", {}).get(name, []) for s in states)

    def _wait_loaded(self, name: str, version: str, generation: int) -> str | None:
        """None once every live worker holds the version; else the first worker error."""
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:
            states = self.worker_states()
            current = [s for s in states if s.get("generations", {}).get(name, -1) >= generation]
            for state in current:
                error = state.get("errors", {}).get(f"{name}/{version}")
                if error:
                    return f"worker {state['worker']}: {error}"
            if states and len(current) == len(states) and self._held_everywhere(name, version):
                return None
            time.sleep(0.05)
        return f"not loaded by every worker within {self.load_timeout_s:.0f}s"

    def _wait_applied(self, name: str, generation: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.worker_states()
            if all(s.get("generations", {}).get(name, -1) >= generation for s in states):
                return
            time.sleep(0.05)
        log.warning("model %s: not every worker applied generation %d yet", name, generation)

    def _write(self, traffic: Traffic, *, wait: bool = True) -> Traffic:
        stored = self.store.write(traffic)
        if wait:
            self._wait_applied(traffic.name, stored.generation)
        return stored

    def _audit(self, client: str, action: str, args: dict, error: Exception | None) -> None:
        result = "ok" if error is None else f"error: {error}"
        try:
            self.audit.append(client or "unknown", action, args, result)
        except OSError as exc:
            log.error("audit log %s: %s", self.audit.path, exc)


def _state(traffic: Traffic, version: str, held: bool) -> str:
    if traffic.share(version) > 0:
        return "serving"
    if version in traffic.needed() or held:
        return "loaded"
    if version in traffic.retired:
        return "retired"
    return "available"


def _test_metrics(path: Path) -> dict[str, float]:
    try:
        test = json.loads((path / "metrics.json").read_text())["test"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k: float(test[k]) for k in METRIC_KEYS if isinstance(test.get(k), int | float)}


def _check_canary(weight: float, steps: tuple[float, ...], interval_s: float) -> None:
    if not 0.0 <= weight <= 100.0:
        raise InvalidInputError(f"canary weight {weight} is not in 0..100", field="weight")
    previous = weight
    for step in steps:
        if not previous < step <= 100.0:
            raise InvalidInputError(
                f"canary steps must rise above the weight and end at most at 100; got "
                f"{', '.join(f'{s:g}' for s in steps)} after {weight:g}", field="steps"
            )  # fmt: skip
        previous = step
    if steps and interval_s <= 0:
        raise InvalidInputError("automatic steps need step_interval_s > 0", field="steps")


def new_alert_id() -> str:
    """Id of an ad-hoc alert event."""
    return uuid.uuid4().hex[:16]
