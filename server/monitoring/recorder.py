"""Worker side of drift monitoring: sketch every scored request, publish window sums.

    handler → DriftRecorder.record_one / record_many   (one Numba pass, under a lock)
    publisher thread, every ``publish_s`` → <run_dir>/drift/worker-<id>-<pid>.json
        {"models": [{"name", "version", "windows": {"5m": [counts…], …}}], "validation": …}

The supervisor adds the files of live workers together (counts merge by addition).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from riskwire.files import write_text_atomic
from riskwire.kernels.sketch import Sketch, SketchLayout

log = logging.getLogger(__name__)

WINDOWS = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0}


def parse_windows(text: str) -> dict[str, float]:
    """``"5m,1h,24h"`` → {"5m": 300, …} (units s, m, h, d)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    windows = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part[-1] not in units or not part[:-1].replace(".", "", 1).isdigit():
            raise ValueError(f"window {part!r}: expected a number and s/m/h/d, e.g. 5m")
        windows[part] = float(part[:-1]) * units[part[-1]]
    if not windows:
        raise ValueError("at least one drift window is needed")
    return windows


class DriftRecorder:
    """One worker's sketches, one per served model version."""

    def __init__(
        self,
        worker: int,
        path: Path,
        *,
        windows: dict[str, float],
        bucket_s: int = 60,
        publish_s: float = 5.0,
        counters: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker = worker
        self.path = path
        self.windows = windows
        self.bucket_s = bucket_s
        self.publish_s = publish_s
        self._buckets = int(np.ceil(max(windows.values()) / bucket_s)) + 1
        self._counters = counters
        self._clock = clock
        self._sketches: dict[tuple[str, str], Sketch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-publisher", daemon=True)

    def add_model(self, name: str, version: str, profile: dict[str, Any]) -> None:
        """Start sketching a model version (its profile gives the bins); the kernels are
        warmed here, before the version serves."""
        layout = SketchLayout(profile)
        layout.warmup()
        sketch = Sketch(layout, bucket_s=self.bucket_s, buckets=self._buckets)
        with self._lock:
            self._sketches[(name, version)] = sketch

    def record_one(
        self,
        name: str,
        version: str,
        features: np.ndarray,
        card_country: int,
        score: float,
        flagged: bool,
    ) -> None:
        """Count one scored request (a model without a sketch is skipped)."""
        sketch = self._sketches.get((name, version))
        if sketch is None:
            return
        now = self._clock()
        with self._lock:
            sketch.add_one(features, card_country, score, flagged, now)

    def record_many(
        self,
        name: str,
        version: str,
        features: np.ndarray,
        card_country: np.ndarray,
        scores: np.ndarray,
        flagged: np.ndarray,
    ) -> None:
        """Count a batch of scored requests."""
        sketch = self._sketches.get((name, version))
        if sketch is None or not len(scores):
            return
        now = self._clock()
        with self._lock:
            sketch.add_many(features, card_country, scores, flagged, now)

    def snapshot(self) -> dict[str, Any]:
        """Window sums of every sketch, as published."""
        now = self._clock()
        models = []
        with self._lock:
            for (name, version), sketch in self._sketches.items():
                windows = {
                    label: sketch.window(now, seconds).tolist()
                    for label, seconds in self.windows.items()
                }
                models.append({"name": name, "version": version, "windows": windows})
        payload = {"worker": self.worker, "pid": os.getpid(), "at": now, "models": models}
        if self._counters is not None:
            payload["validation"] = self._counters()
        return payload

    def publish(self) -> None:
        """Write the snapshot for the supervisor (atomic rename)."""
        try:
            write_text_atomic(self.path, json.dumps(self.snapshot()))
        except OSError as exc:
            log.error("drift sketch could not be published to %s: %s", self.path, exc)

    def start(self) -> None:
        """Publish every ``publish_s`` from a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Publish one last time and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.publish()

    def _run(self) -> None:
        while not self._stop.wait(self.publish_s):
            self.publish()
