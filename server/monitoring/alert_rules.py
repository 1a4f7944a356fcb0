"""Alert rules and what they produce: measurements in, AlertEvent out.

A rule fires when ``value <op> threshold`` holds for ``for_s`` seconds on measurements whose
measure and window equal the rule's and whose model and column match its fnmatch patterns.
``rules_from_config`` builds rules from TOML/JSON tables and names the rule and key in every
error; ``DEFAULT_RULES`` are tuned against alert fatigue.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

MEASURES = frozenset(
    {
        "psi", "js", "linf", "missing_rate_change", "flagged_share",  # drift
        "auc", "auc_drop", "precision_decline", "recall_decline", "precision_review",
        "recall_review", "ece", "brier", "label_rate",  # live performance (delayed labels)
    }
)  # fmt: skip
SEVERITIES = ("info", "warning", "critical")
OPS = (">", "<")

_WINDOW_RE = re.compile(r"^[1-9][0-9]*[smhd]$")


class AlertConfigError(ValueError):
    """An alert rule or route is invalid; the message names the rule or route and the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """``measure`` of ``column`` for ``model`` v``version`` over ``window``.

    ``value`` NaN means not enough data; ``count`` is the number of samples behind the value
    when known (rules with ``min_count`` treat a smaller count like NaN).
    """

    model: str
    version: int | str
    window: str
    measure: str
    column: str
    value: float
    count: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlertRule:
    """Fire when ``value <op> threshold`` holds for ``for_s`` seconds on matching measurements."""

    name: str
    measure: str  # one of MEASURES
    threshold: float
    column: str = "*"  # fnmatch pattern
    exclude_columns: tuple[str, ...] = ()  # fnmatch patterns taken out of ``column``
    window: str = "1h"
    op: str = ">"
    for_s: float = 600.0  # the condition must hold this long before firing
    resolve_threshold: float | None = None  # None: threshold (no hysteresis)
    resolve_for_s: float = 300.0  # back on the good side this long before resolving
    severity: str = "warning"  # one of SEVERITIES
    model: str = "*"  # fnmatch pattern on the model name
    min_count: int = 0  # measurements from fewer samples count as "not enough data"

    def __post_init__(self) -> None:
        _check_rule(self)
        for key in ("threshold", "for_s", "resolve_for_s"):
            object.__setattr__(self, key, float(getattr(self, key)))
        resolve = self.threshold if self.resolve_threshold is None else self.resolve_threshold
        object.__setattr__(self, "resolve_threshold", float(resolve))
        object.__setattr__(self, "exclude_columns", tuple(self.exclude_columns))

    def matches(self, m: Measurement) -> bool:
        """Whether this rule watches ``m`` (measure, window, model and column patterns)."""
        return (
            m.measure == self.measure
            and m.window == self.window
            and fnmatch.fnmatchcase(m.model, self.model)
            and fnmatch.fnmatchcase(m.column, self.column)
            and not any(fnmatch.fnmatchcase(m.column, p) for p in self.exclude_columns)
        )

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.op == ">" else value < self.threshold

    def recovered(self, value: float) -> bool:
        limit = self.resolve_limit
        return value <= limit if self.op == ">" else value >= limit

    @property
    def resolve_limit(self) -> float:
        """The threshold a firing alert must get back behind to resolve."""
        return self.threshold if self.resolve_threshold is None else self.resolve_threshold


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_rule(rule: AlertRule) -> None:
    if not isinstance(rule.name, str) or not rule.name.strip():
        raise AlertConfigError(f"alert rule: name: must be a non-empty string, got {rule.name!r}")

    def fail(key: str, why: str) -> None:
        raise AlertConfigError(f"alert rule {rule.name!r}: {key}: {why}")

    if rule.measure not in MEASURES:
        fail("measure", f"expected one of {', '.join(sorted(MEASURES))}; got {rule.measure!r}")
    for key in ("column", "model"):
        if not isinstance(getattr(rule, key), str) or not getattr(rule, key):
            fail(key, f"must be a non-empty fnmatch pattern, got {getattr(rule, key)!r}")
    if not isinstance(rule.exclude_columns, list | tuple) or not all(
        isinstance(p, str) and p for p in rule.exclude_columns
    ):
        fail("exclude_columns", f"must be a list of patterns, got {rule.exclude_columns!r}")
    if not isinstance(rule.window, str) or not _WINDOW_RE.match(rule.window):
        fail("window", f"expected a duration such as '5m', '1h' or '24h'; got {rule.window!r}")
    if rule.op not in OPS:
        fail("op", f"expected '>' or '<'; got {rule.op!r}")
    if rule.severity not in SEVERITIES:
        fail("severity", f"expected one of {', '.join(SEVERITIES)}; got {rule.severity!r}")
    for key in ("threshold", "resolve_threshold", "for_s", "resolve_for_s"):
        value = getattr(rule, key)
        if key == "resolve_threshold" and value is None:
            continue
        if not is_number(value) or (key.endswith("_s") and value < 0):
            kind = "a number of seconds >= 0" if key.endswith("_s") else "a finite number"
            fail(key, f"must be {kind}, got {value!r}")
    if (
        not isinstance(rule.min_count, int)
        or isinstance(rule.min_count, bool)
        or rule.min_count < 0
    ):
        fail("min_count", f"must be an integer >= 0, got {rule.min_count!r}")
    if rule.resolve_threshold is not None:
        wrong = (
            rule.resolve_threshold > rule.threshold
            if rule.op == ">"
            else rule.resolve_threshold < rule.threshold
        )
        if wrong:
            side = "<=" if rule.op == ">" else ">="
            fail("resolve_threshold", f"must be {side} threshold {rule.threshold} for op {rule.op}")


_RULE_KEYS = tuple(f.name for f in dataclasses.fields(AlertRule))
_REQUIRED_RULE_KEYS = ("name", "measure", "threshold")


def rules_from_config(raw: Sequence[Mapping[str, Any]]) -> list[AlertRule]:
    """Rules from a list of tables (TOML/JSON); raises AlertConfigError naming rule and key."""
    if not isinstance(raw, list | tuple):
        raise AlertConfigError(f"alert rules: expected a list of tables, got {type(raw).__name__}")
    rules: list[AlertRule] = []
    for index, entry in enumerate(raw, 1):
        if not isinstance(entry, Mapping):
            raise AlertConfigError(f"alert rule #{index}: expected a table, got {entry!r}")
        name = entry.get("name")
        label = f"alert rule {name!r}" if isinstance(name, str) and name else f"alert rule #{index}"
        unknown = sorted(set(entry) - set(_RULE_KEYS))
        if unknown:
            raise AlertConfigError(
                f"{label}: unknown key {unknown[0]!r} (expected: {', '.join(_RULE_KEYS)})"
            )
        missing = [key for key in _REQUIRED_RULE_KEYS if key not in entry]
        if missing:
            raise AlertConfigError(f"{label}: missing required key {missing[0]!r}")
        values = dict(entry)
        if isinstance(values.get("exclude_columns"), str):
            values["exclude_columns"] = (values["exclude_columns"],)
        rule = AlertRule(**values)
        if any(r.name == rule.name for r in rules):
            raise AlertConfigError(f"{label}: name: duplicate rule name")
        rules.append(rule)
    return rules


# Tuned against alert fatigue: the 1h window, a condition held for 10 minutes, hysteresis on
# the way back. Output drift is the early signal, so score PSI fires first and critical.
DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="score_psi", measure="psi", column="score",
        threshold=0.2, resolve_threshold=0.15, severity="critical",
    ),
    AlertRule(
        name="input_psi", measure="psi", exclude_columns=("score", "flagged"),
        threshold=0.25, resolve_threshold=0.2,
    ),
    AlertRule(name="categorical_linf", measure="linf", threshold=0.2, resolve_threshold=0.15),
    AlertRule(
        name="flagged_share", measure="flagged_share", threshold=0.05, resolve_threshold=0.04
    ),
    AlertRule(
        name="missing_rate_change", measure="missing_rate_change",
        threshold=0.1, resolve_threshold=0.05,
    ),
    AlertRule(  # concept drift: live AUC on labelled traffic below the package's test AUC
        name="auc_drop", measure="auc_drop", window="24h", threshold=0.05,
        resolve_threshold=0.03, for_s=1800, resolve_for_s=1800,
    ),
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlertEvent:
    """One state change of an incident; ``id`` is shared by its firing and resolved events.

    ``op``/``threshold`` are the comparison the message states: the rule's when firing, the
    complement against ``resolve_threshold`` when resolved.
    """

    id: str
    state: str  # "firing" | "resolved"
    rule: str
    severity: str
    model: str
    version: int | str
    window: str
    measure: str
    column: str
    value: float
    op: str
    threshold: float
    started_at: float  # epoch seconds when the condition started
    at: float  # epoch seconds of this event
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
