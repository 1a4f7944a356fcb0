"""Which version of a model answers: the traffic configuration and the canary router.

One file per model, ``<models>/<name>/traffic.json``, written atomically by the control
plane and read by every worker (polled; a change applies within a second)::

    {"name": "fraud", "primary": "7", "previous": ["5", "6"], "canary": "8",
     "canary_weight": 5.0, "steps": [25, 50, 100], "step_interval_s": 600,
     "step_started_at": 1764150000.0, "loaded": ["9"], "retired": ["4"],
     "halted_reason": "", "generation": 12, "updated_at": "2026-11-26T10:00:00Z"}

It lives next to the packages, so it survives restarts and travels with the models.
Without a file a model is served at its highest version (no canary). With
``state_backend = "redis"`` the same configurations live in Redis instead, shared by
every replica and announced by pub/sub (``server/redis_state.py``).

Canary routing is sticky by card: a card's bucket is a fixed function of its key
(``canary_bucket``, 0..9999), and a card goes to the canary when its bucket is below
``weight × 100``. At a fixed weight a card always sees the same version, and raising
the weight only moves cards from the primary to the canary, never back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from riskwire.files import write_text_atomic

TRAFFIC_FILE = "traffic.json"
BUCKETS = 10_000  # canary weight resolution: 0.01 percent
_BUCKET_SHIFT = 23  # above the hash bits the state table uses for its slot index


def canary_bucket(card_key: int) -> int:
    """The card's fixed bucket in 0..BUCKETS-1 (from its 64-bit key)."""
    return (int(card_key) >> _BUCKET_SHIFT) % BUCKETS


def canary_buckets(card_keys: np.ndarray) -> np.ndarray:
    """:func:`canary_bucket` of many keys (uint64 array)."""
    return (card_keys >> np.uint64(_BUCKET_SHIFT)) % np.uint64(BUCKETS)


def canary_threshold(weight_percent: float) -> int:
    """Buckets below this go to the canary."""
    return max(0, min(BUCKETS, round(weight_percent * BUCKETS / 100)))


@dataclass(frozen=True)
class Traffic:
    """The traffic configuration of one model."""

    name: str
    primary: str
    previous: tuple[str, ...] = ()
    canary: str = ""
    canary_weight: float = 0.0
    steps: tuple[float, ...] = ()  # automatic canary weights still to come
    step_interval_s: float = 0.0
    step_started_at: float = 0.0  # epoch seconds the current weight took effect
    loaded: tuple[str, ...] = ()  # kept loaded in every worker besides the above
    retired: tuple[str, ...] = ()  # served once, unloaded since
    halted_reason: str = ""
    generation: int = 0
    updated_at: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_weight <= 100.0:
            raise ValueError(f"canary weight {self.canary_weight} is not in 0..100")
        if self.canary and self.canary == self.primary:
            raise ValueError(f"version {self.canary} cannot be both primary and canary")

    @property
    def canary_active(self) -> bool:
        """Whether a canary takes any traffic."""
        return bool(self.canary) and self.canary_weight > 0

    def needed(self) -> list[str]:
        """Versions every worker must hold: primary, canary, the rollback target and
        the explicitly loaded ones (in that order, without repeats)."""
        wanted = [self.primary, self.canary, *self.previous[-1:], *self.loaded]
        return list(dict.fromkeys(v for v in wanted if v))

    def share(self, version: str) -> float:
        """Percent of this model's traffic the version answers."""
        if self.canary_active and version == self.canary:
            return self.canary_weight
        if version == self.primary:
            return 100.0 - (self.canary_weight if self.canary_active else 0.0)
        return 0.0

    def replace(self, **changes: Any) -> Traffic:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        for key in ("previous", "steps", "loaded", "retired"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Traffic:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("previous", "loaded", "retired"):
            values[key] = tuple(str(v) for v in values.get(key, ()))
        values["steps"] = tuple(float(v) for v in values.get("steps", ()))
        values["primary"] = str(values["primary"])
        values["canary"] = str(values.get("canary", ""))
        return cls(**values)


def traffic_path(models_dir: Path, name: str) -> Path:
    """Where a model's traffic configuration lives."""
    return Path(models_dir) / name / TRAFFIC_FILE


def read_traffic(models_dir: Path, name: str) -> Traffic | None:
    """The model's traffic configuration (None without a file)."""
    path = traffic_path(models_dir, name)
    try:
        return Traffic.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable traffic configuration: {exc}") from exc


def write_traffic(models_dir: Path, traffic: Traffic) -> Traffic:
    """Store a new configuration atomically (generation + 1); returns what was stored."""
    current = read_traffic(models_dir, traffic.name)
    stored = traffic.replace(
        generation=(current.generation if current else traffic.generation) + 1,
        updated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    write_text_atomic(
        traffic_path(models_dir, traffic.name), json.dumps(stored.to_dict(), indent=2) + "\n"
    )
    return stored


def model_names(models_dir: Path) -> list[str]:
    """Names of the model folders under the models directory."""
    if not Path(models_dir).is_dir():
        return []
    return sorted(
        p.name for p in Path(models_dir).iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def traffic_stamp(models_dir: Path) -> tuple:
    """Cheap change detector over every traffic file (name, mtime_ns, size)."""
    stamp = []
    for name in model_names(models_dir):
        try:
            info = os.stat(traffic_path(models_dir, name))
        except FileNotFoundError:
            continue
        stamp.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamp)


class FileTrafficStore:
    """Traffic configurations as ``<models>/<name>/traffic.json`` (one machine)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)

    def read(self, name: str) -> Traffic | None:
        """The model's configuration (None without one)."""
        return read_traffic(self.models_dir, name)

    def write(self, traffic: Traffic) -> Traffic:
        """Store a new configuration (generation + 1)."""
        return write_traffic(self.models_dir, traffic)

    def names(self) -> list[str]:
        """Models that have a configuration."""
        return [n for n in model_names(self.models_dir)
                if traffic_path(self.models_dir, n).exists()]  # fmt: skip


def open_traffic_store(settings: Any) -> Any:
    """The traffic store the settings name: the models directory, or Redis (shared by
    replicas, with change notification) when ``state_backend = "redis"``."""
    if settings.state_backend != "redis":
        return FileTrafficStore(Path(settings.models))
    from .redis_state import RedisTrafficStore

    return RedisTrafficStore(settings.redis_config())
