"""Loaded models in a worker: one :class:`ModelRuntime` per (name, version).

For now the serving version of a model is its highest integer version; the lifecycle
work (promote, canary, rollback) replaces :meth:`ModelRegistry.serving_version`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from riskwire.kernels.schema import FEATURE_NAMES
from riskwire.kernels.validate import ValidationSpec
from riskwire.pipeline.errors import PipelineError
from riskwire.pipeline.package import ModelPackage, list_versions, load_package

from .errors import ModelNotFoundError, clip

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
        self, models_dir: Path, default_model: str, *, range_tolerance: float = 0.1
    ) -> None:
        self._models_dir = models_dir
        self._range_tolerance = range_tolerance
        self.default_model = default_model
        self._models: dict[tuple[str, str], ModelRuntime] = {}
        self._serving: dict[str, str] = {}

    def load_all(self) -> list[ModelRuntime]:
        """Load the highest version of every model; a broken package is skipped, logged."""
        loaded = []
        if not self._models_dir.is_dir():
            return loaded
        for model_dir in sorted(p for p in self._models_dir.iterdir() if p.is_dir()):
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

    def get(self, name: str = "", version: str = "") -> ModelRuntime:
        """The runtime for a request; empty name/version mean default model/serving version."""
        name = name or self.default_model
        if not version:
            version = self._serving.get(name, "")
            if not version:
                raise self._not_loaded(name)
        runtime = self._models.get((name, version))
        if runtime is None:
            known = sorted(v for (n, v) in self._models if n == name)
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
        return sorted((v for (n, v) in self._models if n == name), key=int)

    def serving(self) -> list[ModelRuntime]:
        """The serving runtime of every model."""
        return [self._models[(n, v)] for n, v in sorted(self._serving.items())]
