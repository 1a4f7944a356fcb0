"""What to mirror where: :class:`ShadowConfig`, its request filter and the control file.

The supervisor owns the configuration: it writes it to a small JSON control file (atomic
rename, a generation number that only grows) and every worker's shadow scorer polls the
file's modification time a few times a second, so a change made through the admin API
reaches all workers within a second without a restart.

Filter syntax: clauses separated by ``;``, all of which must hold. A clause is
``field=value[,value…]`` (one of the values), ``field!=value[,value…]`` (none of them)
or, for the numeric fields, ``field>x``, ``>=``, ``<``, ``<=``. Fields: channel,
country, card_country, currency, mcc, amount. Example: ``channel=ecommerce; amount>=100``.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from riskwire.files import write_text_atomic

FILTER_FIELDS = ("channel", "country", "card_country", "currency", "mcc", "amount")
_NUMERIC = {"mcc": int, "amount": float}
_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,128}$")  # model names, versions: no paths
_CLAUSE = re.compile(r"^\s*([a-z_]+)\s*(!=|>=|<=|=|>|<)\s*(.+?)\s*$")

# (channel, country, card_country, currency, mcc, amount) → mirror this request?
RequestFilter = Callable[[str, str, str, str, int, float], bool]


class ShadowConfigError(ValueError):
    """A shadow setting is malformed (the message names it and what was expected)."""


def parse_filter(text: str) -> RequestFilter | None:
    """Compile a filter expression; None for an empty one (mirror everything)."""
    checks: list[Callable[[tuple], bool]] = []
    for clause in (c for c in text.split(";") if c.strip()):
        match = _CLAUSE.match(clause)
        if not match:
            raise ShadowConfigError(
                f"filter clause {clause.strip()!r}: expected field=value, field!=value "
                "or field>number (also >=, <, <=)"
            )
        name, op, raw = match.groups()
        if name not in FILTER_FIELDS:
            raise ShadowConfigError(
                f"filter field {name!r} is not one of {', '.join(FILTER_FIELDS)}"
            )
        index = FILTER_FIELDS.index(name)
        kind = _NUMERIC.get(name, str)
        try:
            values = [kind(v.strip()) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise ShadowConfigError(f"filter field {name!r}: {raw!r} is not a number") from None
        if op in _COMPARE:
            if kind is str or len(values) != 1:
                raise ShadowConfigError(
                    f"filter field {name!r}: {op} needs one number and a numeric field"
                )
            checks.append(_compare(index, _COMPARE[op], values[0]))
        else:
            checks.append(_membership(index, frozenset(values), op == "="))
    if not checks:
        return None

    def wanted(*request: Any) -> bool:
        return all(check(request) for check in checks)

    return wanted


def _compare(index: int, op: Callable[[Any, Any], bool], bound: float) -> Callable[[tuple], bool]:
    return lambda request: op(request[index], bound)


def _membership(index: int, values: frozenset, inside: bool) -> Callable[[tuple], bool]:
    return lambda request: (request[index] in values) == inside


@dataclass(frozen=True)
class ShadowConfig:
    """The shadow target of one primary model, and which of its requests to mirror.

    A local target is ``model``/``version`` in this server's models directory; a remote
    one is ``endpoint`` (host:port of any Open Inference Protocol v2 server), scoring
    the primary's feature vectors sent as one FP64 tensor ``endpoint_input`` [n, 23].
    """

    enabled: bool = False
    primary: str = ""  # model whose traffic is mirrored ("" = the server's default model)
    model: str = ""  # shadow model name ("" = the primary's name)
    version: str = ""  # local shadow version (required for a local target)
    endpoint: str = ""  # remote target host:port ("" = local)
    endpoint_input: str = "features"
    rate_percent: float = 100.0
    filter: str = ""
    timeout_s: float = 1.0  # per remote call
    review_threshold: float = -1.0  # remote decisions; < 0 = the primary's thresholds
    decline_threshold: float = -1.0
    generation: int = 0

    def validate(self) -> ShadowConfig:
        """Raise ShadowConfigError if malformed; returns self."""
        if not 0.0 <= self.rate_percent <= 100.0:
            raise ShadowConfigError(f"rate_percent must be in 0..100, got {self.rate_percent}")
        if self.timeout_s <= 0:
            raise ShadowConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        parse_filter(self.filter)
        for name in ("primary", "model", "version"):
            value = getattr(self, name)
            if value and not _NAME.match(value):
                raise ShadowConfigError(
                    f"{name} {value!r}: expected letters, digits, '.', '_' or '-'"
                )
        if not self.enabled:
            return self
        if self.endpoint:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ShadowConfigError(f"endpoint {self.endpoint!r}: expected host:port")
        elif not self.version:
            raise ShadowConfigError("a local shadow needs a model version (or an endpoint)")
        return self

    def label(self, primary_name: str) -> tuple[str, str]:
        """(shadow model name, version) as records and summaries name it."""
        name = self.model or primary_name
        if self.endpoint:
            return f"{self.endpoint}/{name}", self.version
        return name, self.version

    def to_json(self) -> str:
        """The control-file form."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> ShadowConfig:
        """From a dict (control file, TOML); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ShadowConfigError(f"unknown shadow setting(s): {', '.join(unknown)}")
        try:
            return cls(**raw).validate()
        except TypeError as exc:
            raise ShadowConfigError(str(exc)) from exc


def write_control(path: str | os.PathLike[str], config: ShadowConfig) -> ShadowConfig:
    """Store ``config`` atomically with the next generation number; returns what was stored."""
    path = Path(path)
    current = read_control(path)
    stored = replace(config, generation=(current.generation if current else 0) + 1)
    write_text_atomic(path, stored.to_json())
    return stored


def read_control(path: str | os.PathLike[str]) -> ShadowConfig | None:
    """The stored configuration, or None when there is no control file."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    return ShadowConfig.from_mapping(raw)
