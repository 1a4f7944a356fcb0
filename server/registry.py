"""Loaded models in a worker: one :class:`ModelRuntime` per (name, version).

A model's serving (primary) version and its canary come from its traffic
configuration (``server/traffic.py``); without one, the highest version serves.
:meth:`ModelRegistry.apply` loads, verifies and warms every version a configuration
needs *before* routing to it, so a version never takes traffic cold, and a version
that fails to load leaves the routing as it was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from riskwire.files import write_text_atomic
from riskwire.kernels.schema import FEATURE_NAMES
from riskwire.kernels.validate import ValidationSpec
from riskwire.pipeline.errors import PipelineError
from riskwire.pipeline.package import ModelPackage, list_versions, load_package

from .errors import ModelNotFoundError, ServingError, clip
from .traffic import (
    FileTrafficStore,
    Traffic,
    canary_bucket,
    canary_threshold,
    model_names,
    read_traffic,
    traffic_stamp,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelRuntime:
    """What the hot path needs of one model version."""

    name: str
    version: str
    package: ModelPackage
    review_threshold: float
    decline_threshold: float
    feature_names: tuple[str, ...]
    validation: ValidationSpec

    @property
    def forest(self):  # noqa: ANN201 - the kernels' Forest
        """The compiled forest."""
        return self.package.forest

    def decision(self, probability: float) -> str:
        """approve / review / decline from the package thresholds."""
        if probability >= self.decline_threshold:
            return "decline"
        if probability >= self.review_threshold:
            return "review"
        return "approve"

    def decisions(self, probabilities: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`decision` (object array of strings)."""
        codes = (probabilities >= self.review_threshold).astype(np.int8) + (
            probabilities >= self.decline_threshold
        )
        return np.array(("approve", "review", "decline"), dtype=object)[codes]

    def warmup(self) -> None:
        """Compile (or load from cache) and run every forest and validation kernel once."""
        self.forest.warmup()
        self.validation.warmup()


class ModelRegistry:
    """Every model under the models directory, at its serving version."""

    def __init__(
        self,
        models_dir: Path,
        default_model: str,
        *,
        range_tolerance: float = 0.1,
        store: Any = None,
    ) -> None:
        self.models_dir = self._models_dir = Path(models_dir)
        # Where traffic configurations are read (the models dir, or Redis)
        self.store = store if store is not None else FileTrafficStore(self.models_dir)
        self._range_tolerance = range_tolerance
        self.default_model = default_model
        self._models: dict[tuple[str, str], ModelRuntime] = {}
        self._serving: dict[str, str] = {}
        # name → (canary runtime, bucket threshold); absent = no canary
        self._canary: dict[str, tuple[ModelRuntime, int]] = {}
        self.applied: dict[str, int] = {}  # name → traffic generation in effect
        # Called with each version loaded at runtime (the drift recorder's sketches).
        self.on_load: Callable[[ModelRuntime], None] | None = None
        self.errors: dict[str, str] = {}  # "name/version" → why it could not be loaded

    def load_all(self) -> list[ModelRuntime]:
        """Load every model at its configured traffic (or its highest version); a broken
        package is skipped, logged."""
        loaded = []
        if not self._models_dir.is_dir():
            return loaded
        for model_dir in sorted(p for p in self._models_dir.iterdir() if p.is_dir()):
            try:
                traffic = self.store.read(model_dir.name)
            except (ValueError, ServingError) as exc:  # unreadable, or Redis unavailable
                log.error("%s; serving the highest version", exc)
                traffic = None
            if traffic is not None:
                self.apply(traffic, warm=False)
                if traffic.name in self._serving:
                    loaded.extend(r for (n, _), r in self._models.items() if n == traffic.name)
                    continue
            versions = list_versions(self._models_dir, model_dir.name)
            for version in reversed(versions):
                try:
                    runtime = self.load(model_dir / str(version))
                except PipelineError as exc:
                    log.error("not serving %s: %s", model_dir / str(version), exc)
                    continue
                self._serving[runtime.name] = runtime.version
                loaded.append(runtime)
                break
        return loaded

    def load(self, path: Path) -> ModelRuntime:
        """Verify, load and register one package directory."""
        package = load_package(path)
        names = tuple(package.metadata["model"]["feature_names"])
        if names != FEATURE_NAMES:
            raise PipelineError(
                f"{path}: package features {names} differ from this server's {FEATURE_NAMES}"
            )
        runtime = ModelRuntime(
            name=package.name,
            version=str(package.version),
            package=package,
            review_threshold=float(package.thresholds["review"]),
            decline_threshold=float(package.thresholds["decline"]),
            feature_names=names,
            validation=ValidationSpec.from_schema(package.schema, tolerance=self._range_tolerance),
        )
        self._models[(runtime.name, runtime.version)] = runtime
        return runtime

    def apply(self, traffic: Traffic, *, warm: bool = True) -> dict[str, str]:
        """Make this worker serve ``traffic``: load (and warm) what it needs first, then
        switch the primary and canary, then drop versions no longer needed. Returns the
        versions that failed to load (their role keeps its previous version)."""
        name, failed = traffic.name, {}
        for version in traffic.needed():
            if (name, version) in self._models:
                continue
            try:
                runtime = self.load(self._models_dir / name / version)
                if warm:
                    runtime.warmup()
                if self.on_load is not None:
                    self.on_load(runtime)
            except (PipelineError, OSError, ValueError) as exc:
                failed[version] = str(exc)
                self.errors[f"{name}/{version}"] = str(exc)
                log.error("model %s version %s not loaded: %s", name, version, exc)
        if (name, traffic.primary) in self._models:
            self._serving[name] = traffic.primary
        canary = self._models.get((name, traffic.canary)) if traffic.canary_active else None
        if canary is not None:
            self._canary[name] = (canary, canary_threshold(traffic.canary_weight))
        else:
            self._canary.pop(name, None)
        keep = set(traffic.needed()) | {self._serving.get(name, "")}
        for key in [k for k in self._models if k[0] == name and k[1] not in keep]:
            del self._models[key]
        for version in traffic.needed():
            if version not in failed:
                self.errors.pop(f"{name}/{version}", None)
        self.applied[name] = traffic.generation
        return failed

    def is_serving(self, runtime: ModelRuntime) -> bool:
        """Whether ``runtime`` is its model's primary version."""
        return self._serving.get(runtime.name) == runtime.version

    def canary_of(self, name: str) -> tuple[ModelRuntime, int] | None:
        """The model's canary and its bucket threshold (None: no canary)."""
        return self._canary.get(name)

    def route(self, runtime: ModelRuntime, card_key: int) -> ModelRuntime:
        """The version that answers this card: the canary when the model has one, the
        call asked for the serving version and the card's bucket is below the weight."""
        canary = self._canary.get(runtime.name)
        if canary is None or runtime.version != self._serving.get(runtime.name):
            return runtime
        return canary[0] if canary_bucket(card_key) < canary[1] else runtime

    def state(self) -> dict[str, dict]:
        """What this worker holds: loaded versions, serving, canary (for the control
        plane)."""
        loaded: dict[str, list[str]] = {}
        for n, v in list(self._models):
            loaded.setdefault(n, []).append(v)
        return {
            "loaded": {n: sorted(vs, key=_version_key) for n, vs in loaded.items()},
            "serving": dict(self._serving),
            "canary": {n: [r.version, t] for n, (r, t) in self._canary.items()},
            "generations": dict(self.applied),
            "errors": dict(self.errors),
        }

    def get(self, name: str = "", version: str = "") -> ModelRuntime:
        """The runtime for a request; empty name/version mean default model/serving version."""
        name = name or self.default_model
        if not version:
            version = self._serving.get(name, "")
            if not version:
                raise self._not_loaded(name)
        runtime = self._models.get((name, version))
        if runtime is None:
            known = sorted(v for (n, v) in list(self._models) if n == name)
            if not known:
                raise self._not_loaded(name)
            raise ModelNotFoundError(
                f"model '{clip(name)}' has no version '{clip(version)}'; loaded: {', '.join(known)}"
            )
        return runtime

    def _not_loaded(self, name: str) -> ModelNotFoundError:
        available = ", ".join(self.names()) or "none"
        return ModelNotFoundError(f"model '{clip(name)}' is not loaded; available: {available}")

    def names(self) -> list[str]:
        """Names of the models being served."""
        return sorted(self._serving)

    def versions(self, name: str) -> list[str]:
        """Loaded versions of a model."""
        return sorted((v for (n, v) in list(self._models) if n == name), key=_version_key)

    def serving(self) -> list[ModelRuntime]:
        """The serving runtime of every model."""
        return [self._models[(n, v)] for n, v in sorted(list(self._serving.items()))]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


class TrafficWatcher:
    """Applies changed traffic configurations to this worker's registry (a thread
    polling the traffic files) and publishes what the worker holds for the control plane
    (``status_path``, written atomically after every change)."""

    def __init__(
        self, registry: ModelRegistry, worker: int, status_path: Path, poll_s: float = 0.25
    ) -> None:
        self.registry = registry
        self.worker = worker
        self.status_path = status_path
        self.poll_s = poll_s
        self._stamp: tuple = ()
        self._subscription: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> None:
        """Publish the start-up state, then watch (the files, or Redis's announcements)."""
        store = self.registry.store
        self._stamp = traffic_stamp(self.registry.models_dir)
        self.publish()
        if hasattr(store, "subscribe"):
            self._subscription = store.subscribe(self.apply)
        else:
            self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._subscription is not None:
            self._subscription.close()

    def apply(self, traffic: Traffic) -> None:
        """Apply one announced configuration (when it is new here) and publish."""
        if self.registry.applied.get(traffic.name) == traffic.generation:
            return
        self.registry.apply(traffic)
        log.info(
            "model %s: primary %s, canary %s at %.2f%% (generation %d)",
            traffic.name, traffic.primary, traffic.canary or "-", traffic.canary_weight,
            traffic.generation,
        )  # fmt: skip
        self.publish()

    def check(self) -> bool:
        """Apply what changed since the last check; returns whether anything did."""
        stamp = traffic_stamp(self.registry.models_dir)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        for name in model_names(self.registry.models_dir):
            try:
                traffic = read_traffic(self.registry.models_dir, name)
            except ValueError as exc:
                log.error("%s (keeping the current routing)", exc)
                continue
            if traffic is not None:
                self.apply(traffic)
        self.publish()
        return True

    def publish(self) -> None:
        """Write this worker's model state (atomically)."""
        payload = {"worker": self.worker, "pid": os.getpid(), **self.registry.state()}
        try:
            write_text_atomic(self.status_path, json.dumps(payload))
        except OSError as exc:
            log.error("model status %s: %s", self.status_path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bad change must not stop the watcher
                log.exception("applying a traffic change failed")
