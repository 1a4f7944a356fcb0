"""Build configuration: a frozen dataclass loaded from TOML (``riskwire build --config``).

Example ``build.toml``::

    seed = 7
    train_fraction = 0.7
    validation_fraction = 0.15
    # Governance (model card, promotion gate): low | medium | high, and who owns the model.
    risk_category = "medium"
    owner = "payments fraud team"

    [lightgbm]
    num_leaves = 63
    learning_rate = 0.05

    [thresholds]
    review_fpr = 0.02
    decline_fpr = 0.002
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BuildConfigError

# Risk categories of a model, from the least to the most controlled (see riskwire.server.
# governance): low may be promoted directly, medium needs the pre-production checklist,
# high needs the checklist and a recorded approval.
RISK_CATEGORIES = ("low", "medium", "high")

# LightGBM parameters that give a reproducible model: fixed threads, deterministic mode.
_DEFAULT_LIGHTGBM: dict[str, Any] = {
    "objective": "binary",
    "num_leaves": 63,
    "learning_rate": 0.05,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 255,
    "num_threads": 2,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}


@dataclass(frozen=True)
class ThresholdConfig:
    """How the approve/review/decline thresholds are chosen on the validation split."""

    review_fpr: float = 0.02  # share of legitimate traffic sent to review or worse
    decline_fpr: float = 0.002  # share of legitimate traffic declined


@dataclass(frozen=True)
class BuildConfig:
    """Every setting that influences the model; its hash identifies a build."""

    seed: int = 42
    train_fraction: float = 0.70  # earliest rows, by event time
    validation_fraction: float = 0.15  # next rows; the rest is the test split
    num_boost_round: int = 600
    early_stopping_rounds: int = 50
    lightgbm: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_LIGHTGBM))
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    profile_bins: int = 20  # histogram bins per numeric column in profile.json
    calibration_bins: int = 10
    risk_category: str = "high"  # low | medium | high: how promotion is gated (card.md)
    owner: str = "fraud-risk ML team"  # the team answerable for the model (card.md)

    def __post_init__(self) -> None:
        if not 0 < self.train_fraction < 1 or not 0 < self.validation_fraction < 1:
            raise BuildConfigError("train_fraction and validation_fraction must be in (0, 1)")
        if self.train_fraction + self.validation_fraction >= 1:
            raise BuildConfigError(
                "train_fraction + validation_fraction must leave rows for the test split"
            )
        if self.num_boost_round < 1 or self.early_stopping_rounds < 1:
            raise BuildConfigError("num_boost_round and early_stopping_rounds must be >= 1")
        t = self.thresholds
        if not 0 < t.decline_fpr < t.review_fpr < 1:
            raise BuildConfigError("thresholds need 0 < decline_fpr < review_fpr < 1")
        if self.profile_bins < 2 or self.calibration_bins < 2:
            raise BuildConfigError("profile_bins and calibration_bins must be >= 2")
        if self.risk_category not in RISK_CATEGORIES:
            raise BuildConfigError(
                f"risk_category must be one of {', '.join(RISK_CATEGORIES)}, "
                f"got {self.risk_category!r}"
            )
        if not isinstance(self.owner, str) or not self.owner.strip() or "\n" in self.owner:
            raise BuildConfigError(f"owner must be a non-empty single line, got {self.owner!r}")

    def lightgbm_params(self) -> dict[str, Any]:
        """LightGBM parameters with the seeds derived from :attr:`seed`."""
        return {**self.lightgbm, "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every setting."""
        return asdict(self)

    def config_hash(self) -> str:
        """SHA-256 of the canonical JSON of the settings."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_config(path: str | Path | None) -> BuildConfig:
    """Read a build TOML file; ``None`` gives the defaults."""
    if path is None:
        return BuildConfig()
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildConfigError(f"cannot read build config {path}: {exc}") from exc
    known = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BuildConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    values = dict(raw)
    if "lightgbm" in values:
        values["lightgbm"] = {**_DEFAULT_LIGHTGBM, **values["lightgbm"]}
    if "thresholds" in values:
        try:
            values["thresholds"] = ThresholdConfig(**values["thresholds"])
        except TypeError as exc:
            raise BuildConfigError(f"{path}: [thresholds]: {exc}") from exc
    try:
        return BuildConfig(**values)
    except TypeError as exc:
        raise BuildConfigError(f"{path}: {exc}") from exc
