"""``riskwire build``: raw data → features → LightGBM → evaluation → model package.

Stages, each a function of plain arrays so they can be tested alone:
load and validate → time split → features through the kernels (the same code the
server runs) → train with early stopping on validation → evaluate on test →
profile → thresholds on validation → package → run registry.

A ``weight`` column in the data is used as LightGBM sample weights (train and
validation sets); evaluation and thresholds stay unweighted. ``parent`` names the model
this build retrains (:mod:`.lineage`).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.features import compute_features_offline
from riskwire.kernels.forest import Forest
from riskwire.kernels.schema import CATEGORICAL_FEATURES, FEATURE_NAMES, TIME_COLUMN

from . import provenance
from .card import render_card
from .config import BuildConfig
from .data import WEIGHT_COLUMN, RawData, file_sha256, load_raw
from .errors import DataValidationError
from .evaluate import evaluate
from .lineage import ModelRef, data_window, lineage_record, parse_model_ref
from .package import PACKAGE_FORMAT, canonical_json, models_dir, write_package
from .profile_build import build_profile, build_schema
from .runs import append_run, find_matching_run
from .thresholds import choose_thresholds, decision_rates

# The forest kernel must reproduce LightGBM; a build that does not is refused.
MAX_KERNEL_DIFF = 1e-9


@dataclass(frozen=True)
class Split:
    """Row ranges of the time-ordered train / validation / test splits."""

    train: slice
    validation: slice
    test: slice

    def describe(self, times_ms: np.ndarray) -> dict[str, Any]:
        """Row counts and first/last event time of each split (ISO-8601 UTC)."""
        return {
            name: {
                "rows": part.stop - part.start,
                "first_event_time": _iso(times_ms[part.start]),
                "last_event_time": _iso(times_ms[part.stop - 1]),
            }
            for name, part in (
                ("train", self.train),
                ("validation", self.validation),
                ("test", self.test),
            )
        }


@dataclass(frozen=True)
class BuildResult:
    """What a build produced (or which earlier run it reused)."""

    name: str
    version: int
    path: Path
    run: dict[str, Any]
    reused: bool


def time_split(rows: int, config: BuildConfig) -> Split:
    """Earliest rows train, the next validate, the latest test (rows are time-sorted)."""
    train_end = int(rows * config.train_fraction)
    valid_end = int(rows * (config.train_fraction + config.validation_fraction))
    if train_end < 1 or valid_end - train_end < 1 or rows - valid_end < 1:
        raise DataValidationError(f"{rows} rows are too few to split into train/validation/test")
    return Split(slice(0, train_end), slice(train_end, valid_end), slice(valid_end, rows))


def offline_features(raw: RawData) -> np.ndarray:
    """Model features of time-sorted raw rows, as the build trains on them: the features
    the server served when the file carries them (an export of production traffic),
    otherwise the server's feature kernels run over the rows in order, card state
    starting empty."""
    if raw.served_features is not None:
        return raw.served_features
    features, _ = compute_features_offline(encode_columns(raw.columns))
    return features


def train_booster(
    features: np.ndarray,
    labels: np.ndarray,
    split: Split,
    config: BuildConfig,
    weights: np.ndarray | None = None,
) -> lgb.Booster:
    """LightGBM binary model, early-stopped on the validation split (sample ``weights``
    apply to both sets when given)."""
    categorical = [FEATURE_NAMES.index(name) for name in CATEGORICAL_FEATURES]
    params = config.lightgbm_params()
    train_set = lgb.Dataset(
        features[split.train],
        labels[split.train],
        weight=None if weights is None else weights[split.train],
        feature_name=list(FEATURE_NAMES),
        categorical_feature=categorical,
        params=params,
        free_raw_data=True,
    )
    valid_set = lgb.Dataset(
        features[split.validation],
        labels[split.validation],
        weight=None if weights is None else weights[split.validation],
        reference=train_set,
    )
    return lgb.train(
        params,
        train_set,
        num_boost_round=config.num_boost_round,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )


def build(
    data_path: str | Path,
    *,
    name: str,
    models: str | Path | None = None,
    config: BuildConfig | None = None,
    force: bool = False,
    parent: str | ModelRef | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> BuildResult:
    """Build a model package from a raw data file; see the module docstring.

    ``parent`` (``NAME/VERSION``) is the model this build retrains, recorded as lineage.
    """
    config = config or BuildConfig()
    root = models_dir(models)
    if isinstance(parent, str):
        parent = parse_model_ref(parent)
    data_sha256 = file_sha256(data_path)
    config_hash = config.config_hash()
    if not force:
        earlier = find_matching_run(
            root,
            name=name,
            config_hash=config_hash,
            data_sha256=data_sha256,
            parent=None if parent is None else str(parent),
        )
        if earlier is not None:
            log(
                f"same data and config as run {earlier['run_id']}: reusing "
                f"{earlier['package_path']} (use --force to retrain)"
            )
            return BuildResult(
                name, earlier["version"], Path(earlier["package_path"]), earlier, reused=True
            )

    raw = load_raw(data_path)
    log(f"loaded {len(raw)} rows ({int(raw.labels.sum())} fraud) from {data_path}")
    data = data_record(raw, Path(data_path).name, data_sha256)
    lineage = lineage_record(
        root, parent, data_window(data["first_event_time"], data["last_event_time"])
    )
    if lineage["parent"] is not None and not lineage["parent"]["found"]:
        log(f"parent {parent} is not under {root}: recording its name and version only")
    split = time_split(len(raw), config)
    features = offline_features(raw)
    labels = raw.labels.astype(np.float64)
    booster = train_booster(features, labels, split, config, raw.weights)
    model_text = booster.model_to_string(num_iteration=booster.best_iteration)
    forest = Forest.from_model_string(model_text)
    scores = forest.predict(features)
    _check_kernel_matches(booster, forest, features[split.test])
    log(f"trained {forest.num_trees()} trees (best iteration {booster.best_iteration})")

    thresholds = choose_thresholds(
        labels[split.validation], scores[split.validation], config.thresholds
    )
    metrics = _metrics(labels, scores, split, thresholds, config)
    log(
        f"test ROC AUC {metrics['test']['roc_auc']:.4f}, PR AUC {metrics['test']['pr_auc']:.4f}, "
        f"recall@1%FPR {metrics['test']['recall_at_1pct_fpr']:.4f}"
    )
    built_at = datetime.now(UTC).isoformat(timespec="seconds")
    code = provenance.code_version()
    libraries = provenance.library_versions()

    def metadata(version: int) -> bytes:
        return canonical_json(
            {
                "package_format": PACKAGE_FORMAT,
                "name": name,
                "version": version,
                "model": {
                    "type": "lightgbm",
                    "objective": "binary",
                    "num_trees": forest.num_trees(),
                    "best_iteration": booster.best_iteration,
                    "feature_names": list(FEATURE_NAMES),
                    "categorical_features": list(CATEGORICAL_FEATURES),
                },
                "thresholds": thresholds,
                "data": data,
                "sample_weights": _weights_record(raw.weights),
                "lineage": lineage,
                "split": split.describe(raw.columns[TIME_COLUMN]),
                "params": config.to_dict(),
                "config_hash": config_hash,
                "seed": config.seed,
                "governance": {"risk_category": config.risk_category, "owner": config.owner},
                "code": code,
                "libraries": libraries,
                "python": provenance.python_version(),
                # The only field that differs between two builds of the same inputs.
                "build": {"built_at": built_at},
            }
        )

    files = {
        "model.txt": model_text.encode(),
        "forest.npz": _forest_bytes(forest),
        "schema.json": canonical_json(build_schema(raw, split.train)),
        "profile.json": canonical_json(
            build_profile(raw, features, scores, split, bins=config.profile_bins)
        ),
        "metrics.json": canonical_json(metrics),
        "metadata.json": metadata,
        "card.md": lambda version: render_card(
            name=name,
            version=version,
            metrics=metrics,
            thresholds=thresholds,
            split=split.describe(raw.columns[TIME_COLUMN]),
            data_sha256=data_sha256,
            risk_category=config.risk_category,
            owner=config.owner,
            lineage=lineage,
        ).encode(),
        "requirements.txt": provenance.requirements_txt().encode(),
    }
    version, path = write_package(root, name, files)
    run = {
        "run_id": hashlib.sha256(f"{name}/{version}/{built_at}".encode()).hexdigest()[:12],
        "name": name,
        "version": version,
        "package_path": str(path.resolve()),
        "built_at": built_at,
        "config_hash": config_hash,
        "params": config.to_dict(),
        "data_path": str(Path(data_path).resolve()),
        "data_sha256": data_sha256,
        "data_rows": len(raw),
        "parent": None if parent is None else str(parent),
        "lineage": lineage,
        "sample_weights": raw.weights is not None,
        "code_commit": code["commit"],
        "code_dirty": code["dirty"],
        "libraries": libraries,
        "metrics": {
            k: metrics["test"][k] for k in ("roc_auc", "pr_auc", "recall_at_1pct_fpr", "brier")
        },
    }
    append_run(root, run)
    log(f"wrote {path}")
    return BuildResult(name, version, path, run, reused=False)


def _metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    split: Split,
    thresholds: dict[str, Any],
    config: BuildConfig,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for part_name in ("validation", "test"):
        part = getattr(split, part_name)
        result[part_name] = evaluate(
            labels[part], scores[part], calibration_bins=config.calibration_bins
        )
    test_labels, test_scores = labels[split.test], scores[split.test]
    result["test"]["at_thresholds"] = {
        "review_or_worse": decision_rates(test_labels, test_scores >= thresholds["review"]),
        "decline": decision_rates(test_labels, test_scores >= thresholds["decline"]),
    }
    result["train"] = {"rows": split.train.stop, "fraud_rows": int(labels[split.train].sum())}
    return result


def _check_kernel_matches(booster: lgb.Booster, forest: Forest, sample: np.ndarray) -> None:
    sample = sample[:20_000]
    expected = booster.predict(sample, raw_score=True, num_iteration=booster.best_iteration)
    diff = float(np.max(np.abs(forest.predict(sample, raw_score=True) - expected)))
    if not diff <= MAX_KERNEL_DIFF:
        raise RuntimeError(f"forest kernel differs from LightGBM by {diff:g}; refusing to package")


def _forest_bytes(forest: Forest) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forest.npz"
        forest.save(path)
        return path.read_bytes()


def data_record(raw: RawData, file_name: str, data_sha256: str) -> dict[str, Any]:
    """File name, hash, rows, fraud rows and event-time window of labelled raw data."""
    times = raw.columns[TIME_COLUMN]
    return {
        "file": file_name,
        "sha256": data_sha256,
        "rows": len(raw),
        "fraud_rows": int(raw.labels.sum()),
        # "served": the file's features as the server served them (a production export)
        "features": "served" if raw.served_features is not None else "computed",
        "first_event_time": _iso(times[0]),
        "last_event_time": _iso(times[-1]),
    }


def _weights_record(weights: np.ndarray | None) -> dict[str, Any] | None:
    if weights is None:
        return None
    return {
        "column": WEIGHT_COLUMN,
        "used_for": "LightGBM sample weights of the train and validation sets",
        "sum": float(weights.sum()),
        "min": float(weights.min()),
        "max": float(weights.max()),
        "zero_rows": int(np.count_nonzero(weights == 0)),
    }


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(int(epoch_ms) / 1000, UTC).isoformat(timespec="milliseconds")
