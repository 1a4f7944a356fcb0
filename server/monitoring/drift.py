"""Supervisor side of drift monitoring: merge worker sketches, measure drift, alert.

Every ``drift_eval_s`` the supervisor adds up the window sums the live workers
published, compares each column with the training profile and hands the values to the
alert engine. Measures per model version, window and column:

* ``psi``: population stability index of live vs training bin fractions;
* ``js``: Jensen–Shannon distance (base 2, in [0, 1]);
* ``linf``: largest absolute difference of category fractions (categorical columns);
* ``missing_rate_change``: live missing rate minus the training one;
* ``flagged_share`` (column ``flagged``): share of requests validation flagged.

A window with fewer than ``min_count`` requests yields NaN (no verdict either way).
Every evaluation is appended to a history file (JSON lines) for the drift report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from riskwire.files import write_text_atomic
from riskwire.kernels.sketch import CATEGORICAL, FLAGGED_SLOT, REQUESTS_SLOT, SketchLayout

from .alerts import AlertEngine, Measurement
from .performance import live_performance

log = logging.getLogger(__name__)

MEASURES = ("psi", "js", "linf", "missing_rate_change")
FLAGGED_COLUMN = "flagged"
LATEST_FILE = "latest.json"  # merged window counts of the last evaluation
PSI_EPSILON = 1e-4


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions (fractions) over the same bins."""
    e = np.maximum(expected, PSI_EPSILON)
    a = np.maximum(actual, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance (square root of the divergence, base 2): 0 same, 1 disjoint."""
    p = p / p.sum() if p.sum() else p
    q = q / q.sum() if q.sum() else q
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return math.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def column_measures(layout: SketchLayout, counts: np.ndarray, min_count: int) -> dict:
    """{column: {measure: value, "count": n}} for one merged window row."""
    out: dict[str, dict[str, float]] = {}
    for index, spec in enumerate(layout.columns):
        slots = layout.column_counts(counts, index).astype(np.float64)
        present, missing = slots[:-1], slots[-1]
        total = present.sum() + missing
        values = dict.fromkeys(MEASURES, math.nan)
        if present.sum() >= min_count:
            actual = present / present.sum()
            values["psi"] = psi(spec.expected, actual)
            values["js"] = js_distance(spec.expected, actual)
            if spec.kind == CATEGORICAL:
                values["linf"] = float(np.max(np.abs(actual - spec.expected)))
        if total >= min_count:
            values["missing_rate_change"] = float(missing / total - spec.expected_missing)
        out[spec.name] = values | {"count": float(total)}
    requests = float(counts[REQUESTS_SLOT])
    share = counts[FLAGGED_SLOT] / requests if requests >= min_count else math.nan
    out[FLAGGED_COLUMN] = {"flagged_share": float(share), "count": requests}
    return out


def read_worker_sketches(directory: Path) -> list[dict[str, Any]]:
    """Published sketches of the workers that are still alive."""
    found = []
    for path in sorted(directory.glob("worker-*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if pid_alive(payload.get("pid", -1)):
            found.append(payload)
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (workers' published files outlive them)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge(payloads: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], np.ndarray]:
    """Window sums added across workers: {(model, version, window): counts}."""
    merged: dict[tuple[str, str, str], np.ndarray] = {}
    for payload in payloads:
        for model in payload["models"]:
            for window, counts in model["windows"].items():
                key = (model["name"], model["version"], window)
                row = np.asarray(counts, dtype=np.int64)
                if key in merged and merged[key].shape == row.shape:
                    merged[key] = merged[key] + row
                else:
                    merged[key] = row
    return merged


class DriftMonitor:
    """Evaluates drift for the supervisor and feeds the alert engine."""

    def __init__(
        self,
        models_dir: Path,
        sketch_dir: Path,
        engine: AlertEngine,
        *,
        history_path: Path,
        min_count: int = 200,
        history_every_s: float = 60.0,
        predictions_dir: Path | None = None,
        windows: dict[str, float] | None = None,
        performance_every_s: float = 300.0,
        min_labels: int = 100,
    ) -> None:
        self.models_dir = models_dir
        self.sketch_dir = sketch_dir
        self.engine = engine
        self.history_path = history_path
        self.min_count = min_count
        self.history_every_s = history_every_s
        self._layouts: dict[tuple[str, str], SketchLayout] = {}
        self._lock = threading.Lock()
        self._latest: list[dict[str, Any]] = []
        self._validation: dict[str, int] = {}
        self.evaluated_at = 0.0
        self._history_at = 0.0
        self.predictions_dir = predictions_dir
        self.windows = windows or {}
        self.performance_every_s = performance_every_s
        self.min_labels = min_labels
        self._performance: list[dict[str, Any]] = []
        self._performance_at = -math.inf

    def layout(self, name: str, version: str) -> SketchLayout | None:
        """The sketch layout of a model version (from its profile.json), cached."""
        key = (name, version)
        if key not in self._layouts:
            try:
                path = self.models_dir / name / version / "profile.json"
                profile = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("no profile for %s v%s: %s", name, version, exc)
                return None
            self._layouts[key] = SketchLayout(profile)
        return self._layouts[key]

    def evaluate(self, now: float | None = None) -> list[dict[str, Any]]:
        """Merge, measure, alert; returns the rows (model, version, window, column,
        measure, value, count)."""
        now = time.time() if now is None else now
        payloads = read_worker_sketches(self.sketch_dir)
        rows: list[dict[str, Any]] = []
        merged = merge(payloads)
        for (name, version, window), counts in sorted(merged.items()):
            layout = self.layout(name, version)
            if layout is None or counts.shape[0] != layout.total_slots:
                continue
            for column, values in column_measures(layout, counts, self.min_count).items():
                count = values.pop("count")
                for measure, value in values.items():
                    rows.append(
                        {
                            "model": name, "version": version, "window": window,
                            "column": column, "measure": measure, "value": value,
                            "count": count,
                        }
                    )  # fmt: skip
        if (
            self.predictions_dir is not None
            and now - self._performance_at >= self.performance_every_s
        ):
            self._performance_at = now
            try:
                self._performance = live_performance(
                    self.predictions_dir, self.models_dir, self.windows,
                    now=now, min_labels=self.min_labels,
                )  # fmt: skip
            except (OSError, ValueError) as exc:
                log.error("live performance could not be computed: %s", exc)
        rows.extend(self._performance)
        validation: dict[str, int] = {}
        for payload in payloads:
            for key, value in (payload.get("validation") or {}).items():
                if isinstance(value, int):
                    validation[key] = validation.get(key, 0) + value
        self.engine.evaluate(
            (
                Measurement(r["model"], r["version"], r["window"], r["measure"], r["column"],
                            r["value"])
                for r in rows
            ),
            now,
        )  # fmt: skip
        with self._lock:
            self._latest, self._validation, self.evaluated_at = rows, validation, now
        if now - self._history_at >= self.history_every_s and rows:
            self._history_at = now
            self._append_history(rows, now)
            self._write_latest(merged, now)
        return rows

    def latest(self) -> tuple[list[dict[str, Any]], dict[str, int], float]:
        """The last evaluation's rows, merged validation counters and its time."""
        with self._lock:
            return list(self._latest), dict(self._validation), self.evaluated_at

    def _write_latest(self, merged: dict[tuple[str, str, str], np.ndarray], now: float) -> None:
        """The merged window counts, next to the history, for the drift report."""
        models: dict[tuple[str, str], dict[str, list[int]]] = {}
        for (name, version, window), counts in merged.items():
            models.setdefault((name, version), {})[window] = counts.tolist()
        payload = {
            "at": now,
            "models": [
                {"name": n, "version": v, "windows": w} for (n, v), w in sorted(models.items())
            ],
        }
        path = self.history_path.with_name(LATEST_FILE)
        try:
            write_text_atomic(path, json.dumps(payload))
        except OSError as exc:
            log.error("drift counts could not be written to %s: %s", path, exc)

    def _append_history(self, rows: list[dict[str, Any]], now: float) -> None:
        compact: dict[str, Any] = {}
        for r in rows:
            if isinstance(r["value"], float) and math.isnan(r["value"]):
                continue
            key = f"{r['model']}|{r['version']}|{r['window']}"
            compact.setdefault(key, {}).setdefault(r["column"], {})[r["measure"]] = round(
                r["value"], 6
            )
        try:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.history_path, "a") as handle:
                handle.write(json.dumps({"at": now, "values": compact}) + "\n")
        except OSError as exc:
            log.error("drift history could not be written to %s: %s", self.history_path, exc)


def alert_config(rules_file: str, webhook: str) -> dict[str, Any]:
    """``{"rules", "routes"}`` for :func:`engine_from_config` from the settings: a TOML file
    of ``[[rule]]`` and ``[[route]]`` tables, plus an optional webhook for every alert."""
    import tomllib

    raw: dict[str, Any] = {}
    if rules_file:
        data = tomllib.loads(Path(rules_file).read_text())
        unknown = sorted(set(data) - {"rule", "route"})
        if unknown:
            raise ValueError(f"{rules_file}: unknown table(s) {', '.join(unknown)}")
        if "rule" in data:
            raw["rules"] = data["rule"]
        raw["routes"] = list(data.get("route", []))
    if webhook:
        routes = raw.setdefault("routes", [])
        if not routes:
            routes.append({"sink": "log"})
        routes.append({"sink": "webhook", "url": webhook})
    return raw
