"""Metrics against scikit-learn (the reference), thresholds, config validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from riskwire.pipeline.config import BuildConfig, ThresholdConfig, load_config
from riskwire.pipeline.errors import BuildConfigError
from riskwire.pipeline.evaluate import (
    average_precision,
    brier_score,
    calibration_table,
    recall_at_fpr,
    roc_auc,
)
from riskwire.pipeline.thresholds import choose_thresholds, decide

labelled_scores = st.integers(min_value=4, max_value=300).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < n),
        # few distinct values so ties are common
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5001, 0.9, 1.0]), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(labelled_scores)
def test_metrics_match_sklearn(data) -> None:
    labels, scores = (np.asarray(v, dtype=np.float64) for v in data)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )
    assert brier_score(labels, scores) == pytest.approx(skm.brier_score_loss(labels, scores))
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert recall_at_fpr(labels, scores, 0.2) == pytest.approx(tpr[fpr <= 0.2].max())


@settings(max_examples=100, deadline=None)
@given(labelled_scores, st.data())
def test_weighted_metrics_match_sklearn(data, draw) -> None:
    labels, scores = (np.asarray(v, dtype=np.float64) for v in data)
    n = len(labels)
    weights = np.asarray(
        draw.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=n, max_size=n))
    )
    positive = weights[labels == 1].sum()
    negative = weights[labels == 0].sum()
    if not (positive > 0 and negative > 0):
        return
    assert roc_auc(labels, scores, weights) == pytest.approx(
        skm.roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12
    )
    assert average_precision(labels, scores, weights) == pytest.approx(
        skm.average_precision_score(labels, scores, sample_weight=weights), abs=1e-12
    )
    assert brier_score(labels, scores, weights) == pytest.approx(
        skm.brier_score_loss(labels, scores, sample_weight=weights)
    )


def test_calibration_table_covers_all_rows() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(10_000)
    labels = (rng.random(10_000) < scores).astype(float)
    table = calibration_table(labels, scores, 10)
    assert sum(row["count"] for row in table) == 10_000
    for row in table:  # a calibrated model: observed ≈ predicted
        assert row["observed_rate"] == pytest.approx(row["mean_predicted"], abs=0.05)


def test_thresholds_respect_false_positive_targets() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random(50_000) < 0.02).astype(int)
    scores = np.where(labels == 1, rng.beta(5, 2, 50_000), rng.beta(1, 8, 50_000))
    chosen = choose_thresholds(labels, scores, ThresholdConfig(review_fpr=0.05, decline_fpr=0.005))
    legit = scores[labels == 0]
    assert np.mean(legit >= chosen["review"]) <= 0.05
    assert np.mean(legit >= chosen["review"]) > 0.049
    assert np.mean(legit >= chosen["decline"]) <= 0.005
    assert chosen["decline"] >= chosen["review"]
    assert decide(chosen["decline"], chosen) == "decline"
    assert decide(chosen["review"], chosen) == "review"
    assert decide(0.0, chosen) == "approve"
    assert chosen["validation"]["decline"]["recall"] > 0


def test_config_validation_and_hash(tmp_path) -> None:
    assert BuildConfig().config_hash() == BuildConfig().config_hash()
    assert BuildConfig(seed=1).config_hash() != BuildConfig().config_hash()
    with pytest.raises(BuildConfigError):
        BuildConfig(train_fraction=0.9, validation_fraction=0.2)
    with pytest.raises(BuildConfigError):
        BuildConfig(thresholds=ThresholdConfig(review_fpr=0.001, decline_fpr=0.01))
    path = tmp_path / "build.toml"
    path.write_text("seed = 3\n[lightgbm]\nnum_leaves = 7\n[thresholds]\nreview_fpr = 0.03\n")
    config = load_config(path)
    assert config.seed == 3 and config.lightgbm["num_leaves"] == 7
    assert config.lightgbm["deterministic"] is True  # defaults kept for unset keys
    assert config.thresholds.review_fpr == 0.03
    path.write_text("sed = 3\n")
    with pytest.raises(BuildConfigError, match="unknown setting"):
        load_config(path)
    path.write_text("seed = \n")
    with pytest.raises(BuildConfigError, match="cannot read"):
        load_config(path)
