"""End-to-end build: synthetic data → verified package; reproducibility; run registry; CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.features import compute_features_offline
from riskwire.pipeline.build import build
from riskwire.pipeline.data import load_raw
from riskwire.pipeline.package import MANIFEST_NAME, PACKAGE_FILES, load_package
from riskwire.pipeline.runs import read_runs


@pytest.fixture(scope="module")
def data_file(synth_data_file) -> Path:
    return synth_data_file


@pytest.fixture(scope="module")
def built(built_model, models_dir):
    return built_model, models_dir


def test_package_is_complete_verified_and_scores_well(built, data_file) -> None:
    result, models = built
    assert not result.reused and result.version == 1
    assert result.path == models / "fraud" / "1"
    names = {p.name for p in result.path.iterdir()}
    assert names == set(PACKAGE_FILES) | {MANIFEST_NAME}
    package = load_package(result.path)
    assert package.metrics["test"]["roc_auc"] > 0.85
    meta = package.metadata
    assert meta["data"]["sha256"] == result.run["data_sha256"]
    assert meta["data"]["rows"] == 40_000
    split = meta["split"]
    assert sum(part["rows"] for part in split.values()) == 40_000
    assert split["train"]["last_event_time"] <= split["validation"]["first_event_time"]
    assert split["validation"]["last_event_time"] <= split["test"]["first_event_time"]
    assert {"lightgbm", "numpy", "numba"} <= set(meta["libraries"])
    assert meta["code"]["commit"]
    assert 0 < package.thresholds["review"] <= package.thresholds["decline"] < 1
    assert "lightgbm==" in (result.path / "requirements.txt").read_text()
    card = (result.path / "card.md").read_text()
    assert "Intended use" in card and "Risk category" in card and "Limitations" in card
    for name in ("amount", "channel"):
        assert name in package.profile["inputs"]
    assert len(package.profile["features"]) == package.forest.num_feature()
    assert package.profile["score"]["bin_fractions"]
    assert sum(package.profile["score"]["bin_fractions"]) == pytest.approx(1.0)


def test_package_forest_reproduces_the_booster(built, data_file) -> None:
    import lightgbm as lgb

    result, _ = built
    package = load_package(result.path)
    booster = lgb.Booster(model_file=str(result.path / "model.txt"))
    features, _ = compute_features_offline(encode_columns(load_raw(data_file).columns))
    sample = features[-5000:]
    np.testing.assert_allclose(
        package.forest.predict(sample, raw_score=True),
        booster.predict(sample, raw_score=True),
        rtol=0,
        atol=1e-9,
    )


def test_builds_are_reproducible(built, data_file, tmp_path, small_config) -> None:
    first, _ = built
    second = build(data_file, name="fraud", models=tmp_path, config=small_config())
    assert (first.path / "model.txt").read_bytes() == (second.path / "model.txt").read_bytes()
    manifest = {p: (p / MANIFEST_NAME).read_text().splitlines() for p in (first.path, second.path)}
    differing = [
        a.split("  ")[1]
        for a, b in zip(manifest[first.path], manifest[second.path], strict=True)
        if a != b
    ]
    assert differing in ([], ["metadata.json"])
    meta = [json.loads((p / "metadata.json").read_text()) for p in (first.path, second.path)]
    for m in meta:
        m.pop("build")
    assert meta[0] == meta[1]


def test_same_inputs_reuse_the_run_unless_forced(data_file, tmp_path, small_config) -> None:
    first = build(data_file, name="fraud", models=tmp_path, config=small_config())
    again = build(data_file, name="fraud", models=tmp_path, config=small_config())
    assert again.reused and again.version == first.version == 1
    other = build(data_file, name="fraud", models=tmp_path, config=small_config(seed=7))
    assert not other.reused and other.version == 2
    forced = build(data_file, name="fraud", models=tmp_path, config=small_config(), force=True)
    assert not forced.reused and forced.version == 3
    runs = read_runs(tmp_path)
    assert [r["version"] for r in runs] == [1, 2, 3]
    assert all(r["data_sha256"] == runs[0]["data_sha256"] for r in runs)


def riskwire(*args: str, env_models: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_models is not None:
        env["RISKWIRE_MODELS"] = str(env_models)
    return subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_runs_list_and_verify(built) -> None:
    result, models = built
    listed = riskwire("runs", "list", env_models=models)
    assert listed.returncode == 0, listed.stderr
    assert "fraud" in listed.stdout and result.run["run_id"] in listed.stdout
    verified = riskwire("package", "verify", str(result.path))
    assert verified.returncode == 0 and "ok: fraud v1" in verified.stdout


def test_cli_refuses_bad_data_and_leaves_models_empty(data_file, tmp_path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(data_file).drop_columns(["channel"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    models = tmp_path / "models"
    done = riskwire("build", "--data", str(bad), "--name", "fraud", "--models", str(models))
    assert done.returncode == 2
    assert "missing column(s) channel: all 40000 rows lack them" in done.stderr
    assert not models.exists() or not any(models.rglob("*"))


def test_cli_synth_writes_parquet(tmp_path) -> None:
    out = tmp_path / "s.parquet"
    done = riskwire("data", "synth", "--rows", "2000", "--seed", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote 2000 rows" in done.stdout
    assert len(load_raw(out)) == 2000
