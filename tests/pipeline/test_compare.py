"""Champion vs challenger: metrics against plain-Python references, bootstrap properties,
the verdict rule, lineage of ``riskwire build --parent`` and the ``riskwire compare`` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.clients import compare_cli
from riskwire.clients.cli import main
from riskwire.pipeline import compare, synth
from riskwire.pipeline.build import build
from riskwire.pipeline.compare import (
    CHALLENGER_BETTER,
    CHAMPION_BETTER,
    METRICS,
    NO_DIFFERENCE,
    compare_models,
    format_comparison,
    verdict,
)
from riskwire.pipeline.errors import BuildConfigError, DataValidationError
from riskwire.pipeline.evaluate import recall_at_fpr
from riskwire.pipeline.lineage import parse_model_ref
from riskwire.pipeline.package import manifest_sha256
from riskwire.pipeline.ranking import RankedScores, rank_metrics
from riskwire.pipeline.runs import read_runs

# --- plain-Python references (no numpy tricks, no scikit-learn) ---------------------


def auc_reference(y, s, w) -> float:
    """Σ over (fraud, legit) pairs of w_i·w_j·[s_i > s_j] (ties ½) / Σ w_i·w_j."""
    num = den = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] == 1 and y[j] == 0:
                pair = w[i] * w[j]
                den += pair
                num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def counts_at(y, s, w, threshold) -> tuple[float, float]:
    """Weighted (true positives, false positives) of flagging score >= threshold."""
    tp = sum(w[i] for i in range(len(y)) if y[i] == 1 and s[i] >= threshold)
    fp = sum(w[i] for i in range(len(y)) if y[i] == 0 and s[i] >= threshold)
    return tp, fp


def ap_reference(y, s, w) -> float:
    positives = sum(w[i] for i in range(len(y)) if y[i] == 1)
    ap = previous = 0.0
    for threshold in sorted(set(s), reverse=True):
        tp, fp = counts_at(y, s, w, threshold)
        ap += (tp / positives - previous) * (tp / (tp + fp) if tp + fp else 0.0)
        previous = tp / positives
    return ap


def recall_reference(y, s, w, max_fp: float) -> float:
    positives = sum(w[i] for i in range(len(y)) if y[i] == 1)
    best = 0.0
    for threshold in set(s):
        tp, fp = counts_at(y, s, w, threshold)
        if fp <= max_fp + 1e-12:
            best = max(best, tp / positives)
    return best


def cost_reference(y, s, w, threshold, missed_cost, decline_cost) -> float:
    total = 0.0
    for i in range(len(y)):
        declined = s[i] >= threshold
        if y[i] == 1 and not declined:
            total += missed_cost * w[i]
        if y[i] == 0 and declined:
            total += decline_cost * w[i]
    return total / sum(w)


LEVELS = [0.0, 0.1, 0.2, 0.35, 0.5, 0.5001, 0.7, 0.9, 1.0]  # few values: many ties


@st.composite
def labelled_pairs(draw, min_rows: int = 6, max_rows: int = 40):
    """(labels, champion scores, challenger scores, thresholds, weights or None)."""
    n = draw(st.integers(min_rows, max_rows))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    labels[0], labels[1] = 0, 1  # both classes present
    a = draw(st.lists(st.sampled_from(LEVELS), min_size=n, max_size=n))
    b = draw(st.lists(st.sampled_from(LEVELS), min_size=n, max_size=n))
    thresholds = (draw(st.sampled_from(LEVELS)), draw(st.sampled_from(LEVELS)))
    weights = draw(
        st.none() | st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n, max_size=n)
    )
    return np.array(labels), np.array(a), np.array(b), thresholds, weights


# --- metrics ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(labelled_pairs())
def test_point_metrics_match_plain_python(case) -> None:
    y, a, b, thresholds, weights = case
    w = [1.0] * len(y) if weights is None else weights
    result = compare_models(
        y, a, b, thresholds=thresholds, weights=weights, n_boot=0, cost_missed_fraud=7
    )
    legit = sum(w[i] for i in range(len(y)) if y[i] == 0)
    fp_champion = counts_at(y, a, w, thresholds[0])[1]
    assert result["serving_fpr"] == pytest.approx(fp_champion / legit, abs=1e-12)
    for role, s, threshold in (("champion", a, thresholds[0]), ("challenger", b, thresholds[1])):
        got = result[role]
        assert got["roc_auc"] == pytest.approx(auc_reference(y, s, w), abs=1e-12)
        assert got["pr_auc"] == pytest.approx(ap_reference(y, s, w), abs=1e-12)
        assert got["recall_at_serving_fpr"] == pytest.approx(
            recall_reference(y, s, w, fp_champion), abs=1e-12
        )
        assert got["cost"] == pytest.approx(cost_reference(y, s, w, threshold, 7, 1), abs=1e-12)
        assert got["roc_auc_ci"] == [None, None]  # no bootstrap, no interval
    assert result["verdict"] == NO_DIFFERENCE


def test_auc_on_a_small_hand_checked_case() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])
    # pairs (fraud, legit): 0.35 beats 0.1 only; 0.8 beats 0.1, 0.4, ties 0.8; 0.9 beats all
    expected = (1 + 2.5 + 3) / 9
    assert auc_reference(y, s, [1.0] * 6) == pytest.approx(expected)
    result = compare_models(y, s, s, thresholds=(0.5, 0.5), n_boot=0)
    assert result["champion"]["roc_auc"] == pytest.approx(expected, abs=1e-12)
    # one false decline (0.8 legit) of 3 legit; 2 of 3 frauds caught
    assert result["serving_fpr"] == pytest.approx(1 / 3)
    assert result["champion"]["cost"] == pytest.approx((10 * 1 + 1 * 1) / 6)


@settings(max_examples=40, deadline=None)
@given(labelled_pairs(max_rows=25), st.data())
def test_weight_two_equals_a_duplicated_row(case, data) -> None:
    y, a, b, thresholds, _ = case
    doubled = data.draw(st.lists(st.integers(0, len(y) - 1), min_size=1, max_size=5, unique=True))
    weights = np.ones(len(y))
    weights[doubled] = 2.0
    repeat = np.r_[np.arange(len(y)), doubled]
    weighted = compare_models(y, a, b, thresholds=thresholds, weights=weights, n_boot=0)
    copied = compare_models(y[repeat], a[repeat], b[repeat], thresholds=thresholds, n_boot=0)
    assert weighted["serving_fpr"] == pytest.approx(copied["serving_fpr"], abs=1e-12)
    for role in ("champion", "challenger", "difference"):
        for metric in METRICS:
            assert weighted[role][metric] == pytest.approx(copied[role][metric], abs=1e-12)


def test_rank_metrics_recall_matches_the_roc_curve_under_weights() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(3000) < 0.1
    s = np.round(rng.random(3000) + 0.4 * y, 2)
    w = rng.choice([0.0, 0.5, 1.0, 4.0], 3000)
    for budget in (0.0, 3.0, 17.5, 120.0):
        gp, gn = RankedScores(s, y).group_sums(w)
        _, _, recall = rank_metrics(gp, gn, np.array([budget]))
        fpr = budget / w[~y].sum()
        assert recall[0] == pytest.approx(recall_at_fpr(y, s, fpr * (1 + 1e-9), w), abs=1e-12)


# --- bootstrap and verdict ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(labelled_pairs(min_rows=20, max_rows=60), st.integers(0, 2**16))
def test_bootstrap_intervals_contain_the_point_estimate(case, seed) -> None:
    # A percentile interval is not guaranteed to contain the estimate, but on 20+ rows a
    # miss would point to point estimates and bootstrap computing different things.
    y, a, b, thresholds, weights = case
    result = compare_models(y, a, b, thresholds=thresholds, weights=weights, n_boot=300, seed=seed)
    for role in ("champion", "challenger", "difference"):
        for metric in METRICS:
            low, high = result[role][f"{metric}_ci"]
            assert low - 1e-9 <= result[role][metric] <= high + 1e-9, (role, metric)


@settings(max_examples=40, deadline=None)
@given(labelled_pairs(), st.integers(0, 2**16))
def test_a_model_compared_with_itself_shows_no_difference(case, seed) -> None:
    y, a, _, thresholds, weights = case
    result = compare_models(
        y, a, a, thresholds=(thresholds[0],) * 2, weights=weights, n_boot=100, seed=seed
    )
    assert result["verdict"] == NO_DIFFERENCE
    for metric in METRICS:
        assert result["difference"][metric] == 0
        assert result["difference"][f"{metric}_ci"] in ([0.0, 0.0], [None, None])
        assert result["champion"][metric] == result["challenger"][metric]


def test_bootstrap_is_seeded_and_paired_with_the_shadow_bootstrap() -> None:
    from riskwire.pipeline.ranking import bootstrap_metrics

    rng = np.random.default_rng(3)
    y = rng.random(2000) < 0.1
    a, b = rng.random(2000) + 0.5 * y, rng.random(2000) + 0.8 * y
    first = compare_models(y, a, b, thresholds=(0.9, 0.9), n_boot=150, seed=4)
    assert first == compare_models(y, a, b, thresholds=(0.9, 0.9), n_boot=150, seed=4)
    boot = bootstrap_metrics([a, b], y, replicates=150, seed=4)
    expected = np.percentile(boot[1, 0] - boot[0, 0], [2.5, 97.5])
    np.testing.assert_allclose(first["difference"]["roc_auc_ci"], expected, rtol=0, atol=1e-12)


def test_clear_winner_either_way() -> None:
    rng = np.random.default_rng(8)
    y = rng.random(20_000) < 0.05
    weak = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.0 * y - 3)))
    strong = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 3.0 * y - 3)))
    kwargs = {"thresholds": (0.3, 0.3), "n_boot": 200}
    better = compare_models(y, weak, strong, **kwargs)
    assert better["verdict"] == CHALLENGER_BETTER
    assert better["difference"]["cost_ci"][1] < 0 < better["difference"]["roc_auc_ci"][0]
    worse = compare_models(y, strong, weak, **kwargs)
    assert worse["verdict"] == CHAMPION_BETTER
    text = format_comparison(better, names=("fraud v1", "fraud v2"))
    assert "champion fraud v1 vs challenger fraud v2" in text
    assert "verdict: challenger better" in text and "recall @ serving FPR" in text


@pytest.mark.parametrize(
    ("cost_ci", "auc_ci", "expected"),
    [
        ([-0.2, -0.1], [-0.01, 0.02], CHALLENGER_BETTER),
        ([-0.2, -0.1], [0.01, 0.02], CHALLENGER_BETTER),
        ([-0.2, -0.1], [-0.03, -0.01], NO_DIFFERENCE),  # cheaper but ranks worse
        ([0.1, 0.2], [-0.02, 0.01], CHAMPION_BETTER),
        ([0.1, 0.2], [0.01, 0.02], NO_DIFFERENCE),  # dearer but ranks better
        ([-0.1, 0.1], [0.01, 0.02], NO_DIFFERENCE),
        ([None, None], [None, None], NO_DIFFERENCE),
    ],
)
def test_verdict_rule(cost_ci, auc_ci, expected) -> None:
    difference = {"cost": 0.0, "cost_ci": cost_ci, "roc_auc": 0.0, "roc_auc_ci": auc_ci}
    code, text = verdict(difference, positives=100)
    assert code == expected and text.startswith(expected)
    assert "only 5 fraud rows" in verdict(difference, positives=5)[1]


def test_bad_inputs_are_refused() -> None:
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="exactly one"):
        compare_models(y, s, s, n_boot=0)
    with pytest.raises(ValueError, match="weights"):
        compare_models(y, s, s, thresholds=(0.5, 0.5), weights=np.array([1, -1, 1, 1]))
    with pytest.raises(ValueError, match="labels"):
        compare_models(np.array([0, 2, 0, 1]), s, s, thresholds=(0.5, 0.5))
    with pytest.raises(ValueError, match="cost_missed_fraud"):
        compare_models(y, s, s, thresholds=(0.5, 0.5), cost_missed_fraud=-1)


def test_cli_defaults_match_the_library() -> None:
    assert compare_cli.DEFAULT_COST_MISSED_FRAUD == compare.DEFAULT_COST_MISSED_FRAUD
    assert compare_cli.DEFAULT_COST_FALSE_DECLINE == compare.DEFAULT_COST_FALSE_DECLINE
    assert compare_cli.DEFAULT_BOOTSTRAP == compare.DEFAULT_BOOTSTRAP


# --- lineage and the CLI, end to end --------------------------------------------------


def riskwire(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


SMALL_TOML = """num_boost_round = 60
early_stopping_rounds = 10
[lightgbm]
num_leaves = 15
learning_rate = 0.1
min_data_in_leaf = 20
"""


@pytest.fixture(scope="module")
def lineage(built_model, synth_data_file, tmp_path_factory) -> dict:
    """fraud v1 (the session model, copied) and v2 built by the CLI with --parent fraud/1
    from weighted training data; a labelled holdout from another seed."""
    base = tmp_path_factory.mktemp("lineage")
    models = base / "models"
    shutil.copytree(built_model.path, models / "fraud" / "1")
    table = pq.read_table(synth_data_file).slice(0, 20_000)
    weights = np.where(np.asarray(table["label"]) == 1, 3.0, 1.0)
    weighted = base / "weighted.parquet"
    pq.write_table(table.append_column("weight", pa.array(weights)), weighted)
    config = base / "small.toml"
    config.write_text(SMALL_TOML)
    done = riskwire(
        "build", "--data", str(weighted), "--models", str(models), "--config", str(config),
        "--parent", "fraud/1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    holdout = base / "holdout.parquet"
    synth.write(synth.generate(8_000, seed=11), holdout)
    return {"models": models, "data": weighted, "holdout": holdout, "parent": built_model}


def test_build_records_lineage_and_weights(lineage) -> None:
    models = lineage["models"]
    meta = json.loads((models / "fraud" / "2" / "metadata.json").read_text())
    parent_meta = lineage["parent"].path / "metadata.json"
    parent_data = json.loads(parent_meta.read_text())["data"]
    parent = meta["lineage"]["parent"]
    assert parent["name"] == "fraud" and parent["version"] == 1 and parent["found"]
    assert parent["manifest_sha256"] == manifest_sha256(models / "fraud" / "1")
    assert parent["data_sha256"] == parent_data["sha256"]
    assert parent["data_window"] == {
        "first_event_time": parent_data["first_event_time"],
        "last_event_time": parent_data["last_event_time"],
    }
    window = meta["lineage"]["data_window"]
    assert window["first_event_time"] == meta["data"]["first_event_time"]
    assert window["last_event_time"] == meta["data"]["last_event_time"]
    assert window["first_event_time"] <= window["last_event_time"]
    assert meta["sample_weights"]["column"] == "weight"
    assert meta["sample_weights"]["max"] == 3.0
    assert "Retrained from **fraud v1**" in (models / "fraud" / "2" / "card.md").read_text()
    (run,) = read_runs(models)
    assert run["parent"] == "fraud/1" and run["lineage"] == meta["lineage"]
    assert run["sample_weights"] is True
    listed = riskwire("runs", "list", "--models", str(models))
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert "parent" in header.split() and row.split()[3] == "fraud/1"
    first = json.loads((lineage["parent"].path / "metadata.json").read_text())
    assert first["lineage"]["parent"] is None and first["sample_weights"] is None


def test_parent_must_be_name_slash_version_and_may_be_absent(lineage, tmp_path) -> None:
    for bad in ("fraud", "fraud/0", "fraud/v2", "../x/1", "fraud/1/2"):
        with pytest.raises(BuildConfigError, match="NAME/VERSION"):
            parse_model_ref(bad)
    with pytest.raises(BuildConfigError):
        build(lineage["data"], name="fraud", models=tmp_path, parent="fraud/")
    assert not any(tmp_path.iterdir())
    assert str(parse_model_ref("fraud-eu.v2/12")) == "fraud-eu.v2/12"


def test_cli_compare_json(lineage, tmp_path) -> None:
    out = tmp_path / "report.json"
    done = riskwire(
        "compare", "fraud", "1", "2", "--data", str(lineage["holdout"]),
        "--models", str(lineage["models"]), "--bootstrap", "200", "--seed", "3",
        "--cost-missed-fraud", "20", "--json", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    assert report["rows"] == report["data"]["rows"] == 8_000
    assert report["positives"] == report["data"]["fraud_rows"] > 0
    assert report["costs"] == {"missed_fraud": 20.0, "false_decline": 1.0}
    assert report["bootstrap"] == {"resamples": 200, "seed": 3, "confidence": 0.95}
    assert report["models"]["challenger"]["parent"] == "fraud/1"
    assert report["models"]["champion"]["version"] == 1
    assert report["verdict"] in (CHALLENGER_BETTER, CHAMPION_BETTER, NO_DIFFERENCE)
    for role in ("champion", "challenger"):
        entry = report[role]
        assert entry["decline_threshold"] == report["models"][role]["decline_threshold"]
        assert entry["roc_auc"] > 0.8
        for metric in METRICS:
            low, high = entry[f"{metric}_ci"]
            assert low <= high
    # the champion's recall at its own serving FPR is at least its recall at its threshold
    assert report["champion"]["recall_at_serving_fpr"] >= report["champion"]["recall_at_decline"]


def test_cli_compare_a_version_with_itself(lineage, capsys) -> None:
    argv = ["compare", "fraud", "1", "1", "--data", str(lineage["holdout"])]
    assert main([*argv, "--models", str(lineage["models"]), "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "verdict: no significant difference" in text and "cost per row" in text
    assert main([*argv, "--models", str(lineage["models"]), "--bootstrap", "-1"]) == 2
    assert main(["compare", "fraud", "1", "9", "--data", str(lineage["holdout"]),
                 "--models", str(lineage["models"])]) == 2  # fmt: skip
    assert "no model package here" in capsys.readouterr().err


def test_cli_compare_needs_labels(lineage, tmp_path) -> None:
    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(pq.read_table(lineage["holdout"]).drop_columns(["label"]), unlabelled)
    with pytest.raises(DataValidationError, match="no 'label' column"):
        compare_cli.score_versions(unlabelled, lineage["models"], "fraud", (1, 2))
