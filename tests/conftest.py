"""Session-wide fixtures: a small synthetic data set and a model package built from it.

Building takes a few seconds, so every test module that needs a model shares these.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from riskwire.pipeline import synth
from riskwire.pipeline.build import BuildResult, build
from riskwire.pipeline.config import BuildConfig

SMALL_LIGHTGBM = {"num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20}


def small_config(**overrides) -> BuildConfig:
    """A fast build config (few small trees) for tests."""
    base = BuildConfig()
    return BuildConfig(
        num_boost_round=120,
        early_stopping_rounds=20,
        lightgbm={**base.lightgbm, **SMALL_LIGHTGBM},
        **overrides,
    )


@pytest.fixture(scope="session", name="small_config")
def small_config_fixture():
    """The :func:`small_config` factory, for test modules (conftest is not importable)."""
    return small_config


@pytest.fixture(scope="session")
def synth_data_file(tmp_path_factory) -> Path:
    """40k synthetic transactions (seed 3) as Parquet."""
    path = tmp_path_factory.mktemp("data") / "tx.parquet"
    synth.write(synth.generate(40_000, seed=3), path)
    return path


@pytest.fixture(scope="session")
def built_model(synth_data_file, tmp_path_factory) -> BuildResult:
    """A package ``fraud`` v1 in its own models directory (``built_model.path.parent.parent``)."""
    models = tmp_path_factory.mktemp("models")
    return build(synth_data_file, name="fraud", models=models, config=small_config())


@pytest.fixture(scope="session")
def models_dir(built_model) -> Path:
    """The models directory holding ``built_model``."""
    return built_model.path.parent.parent
