"""The governance gate: risk category in packages, checklist, approvals, force, the CLI.

Two real packages are built once per module (fraud v1 low risk, v2 high risk, same data
and model settings, so their metrics are equal); every test works on its own copy of the
models directory, since approvals and audit records are written into it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from riskwire.clients.cli import main
from riskwire.clients.governance_cli import shadow_record_count
from riskwire.pipeline.build import build
from riskwire.pipeline.config import BuildConfig, load_config
from riskwire.pipeline.errors import BuildConfigError
from riskwire.pipeline.package import MANIFEST_NAME, load_package, manifest_text
from riskwire.server import audit
from riskwire.server.auth import create_key, default_key_file
from riskwire.server.errors import ModelNotFoundError
from riskwire.server.governance import (
    CheckItem,
    GovernanceError,
    approvals,
    approvals_path,
    checklist,
    compare_metrics,
    manifest_digest,
    owner_from_card,
    package_risk,
    promotion_gate,
    record_approval,
    risk_from_card,
)

SECURE = {"auth": True, "tls": True, "shadow_records": 5000}
OLD_CARD_LINES = """
- **Risk category:** high (automated decisions on payments affect customers directly;
  changes to thresholds or promotions need an approval).
- **Owner:** fraud-risk ML team (set `owner` in the build config for your team).
- **Users:** payment and checkout services calling riskwire over gRPC.
"""


@pytest.fixture(scope="module")
def built_models(synth_data_file, small_config, tmp_path_factory) -> Path:
    """fraud v1 (low risk, owner "card team") and v2 (high risk, default owner)."""
    models = tmp_path_factory.mktemp("governance-models")
    low = replace(small_config(), risk_category="low", owner="card team")
    build(synth_data_file, name="fraud", models=models, config=low)
    build(synth_data_file, name="fraud", models=models, config=small_config())
    return models


@pytest.fixture
def models(built_models, tmp_path) -> Path:
    """A private copy of the built models directory."""
    return Path(shutil.copytree(built_models, tmp_path / "models"))


def rewrite_package(package: Path, **metadata_changes) -> None:
    """Change metadata.json and rewrite the manifest: a valid package with other bytes."""
    path = package / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.update(metadata_changes)
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (package / MANIFEST_NAME).write_text(manifest_text(package))


def make_medium(models: Path) -> None:
    """fraud v3: a copy of v2 whose metadata says medium risk (a valid package)."""
    shutil.copytree(models / "fraud" / "2", models / "fraud" / "3")
    rewrite_package(
        models / "fraud" / "3",
        version=3,
        governance={"risk_category": "medium", "owner": "ops"},
    )


def items_by_name(items: list[CheckItem]) -> dict[str, CheckItem]:
    return {item.name: item for item in items}


# ------------------------------------------------------------------ config and package


def test_config_validates_and_hashes_the_governance_fields(tmp_path) -> None:
    assert BuildConfig().risk_category == "high" and BuildConfig().owner
    with pytest.raises(BuildConfigError, match="risk_category"):
        BuildConfig(risk_category="extreme")
    for owner in ("", "  ", "two\nlines"):
        with pytest.raises(BuildConfigError, match="owner"):
            BuildConfig(owner=owner)
    toml = tmp_path / "build.toml"
    toml.write_text(
        'risk_category = "medium"\nowner = "payments team"\n[lightgbm]\nnum_leaves = 7\n'
    )
    config = load_config(toml)
    assert (config.risk_category, config.owner) == ("medium", "payments team")
    assert config.lightgbm["num_leaves"] == 7
    assert BuildConfig(risk_category="low").config_hash() != BuildConfig().config_hash()


def test_packages_carry_risk_category_and_owner(built_models) -> None:
    low, high = built_models / "fraud" / "1", built_models / "fraud" / "2"
    assert load_package(low).metadata["governance"] == {
        "risk_category": "low",
        "owner": "card team",
    }
    assert load_package(high).metadata["governance"]["risk_category"] == "high"
    card = (low / "card.md").read_text()
    assert "- **Risk category:** low: may be promoted to primary or canary directly." in card
    assert "- **Owner:** card team\n" in card
    assert "recorded approval" in (high / "card.md").read_text()
    assert package_risk(low) == ("low", "card team")
    assert package_risk(high) == ("high", "fraud-risk ML team")


def test_card_parser_reads_old_and_new_cards() -> None:
    assert risk_from_card(OLD_CARD_LINES) == "high"
    assert owner_from_card(OLD_CARD_LINES) == "fraud-risk ML team"
    assert risk_from_card("- **Risk category:** Medium: promotion needs the checklist") == (
        "medium"
    )
    assert risk_from_card("- **Risk category:** severe") is None
    assert risk_from_card("no such line") is None and owner_from_card("") is None


def test_old_packages_fall_back_to_the_card_then_to_high(built_models, tmp_path) -> None:
    old = Path(shutil.copytree(built_models / "fraud" / "1", tmp_path / "old"))
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["governance"]
    (old / "metadata.json").write_text(json.dumps(metadata))
    assert package_risk(old) == ("low", "card team")  # from card.md
    (old / "card.md").write_text("# Model card\n" + OLD_CARD_LINES)
    assert package_risk(old) == ("high", "fraud-risk ML team")
    (old / "card.md").unlink()
    assert package_risk(old) == ("high", "unknown")


# -------------------------------------------------------------------------- checklist


def test_compare_metrics_applies_margins_per_metric() -> None:
    primary = {"roc_auc": 0.90, "pr_auc": 0.50, "recall_at_1pct_fpr": 0.40, "brier": 0.010}
    same = compare_metrics(primary, primary)
    assert same.passed and same.name == "metrics"
    assert "roc_auc 0.9000 vs 0.9000" in same.detail and "brier" in same.detail
    within = {"roc_auc": 0.896, "pr_auc": 0.491, "recall_at_1pct_fpr": 0.381, "brier": 0.0119}
    assert compare_metrics(within, primary).passed
    worse = {**within, "roc_auc": 0.894, "brier": 0.0121}
    result = compare_metrics(worse, primary)
    assert not result.passed
    assert "roc_auc" in result.detail.split(";")[0] and "brier" in result.detail.split(";")[0]
    assert "pr_auc" not in result.detail.split(";")[0]
    assert compare_metrics(worse, primary, {"roc_auc": 0.01, "brier": 0.005}).passed
    assert not compare_metrics(primary, primary, {"pr_auc": -0.01}).passed
    assert not compare_metrics({**primary, "pr_auc": math.nan}, primary).passed
    assert not compare_metrics({"roc_auc": 0.95}, primary).passed  # missing metrics fail
    assert compare_metrics(primary, {"roc_auc": 0.5}).passed  # the primary lacks some
    with pytest.raises(GovernanceError, match="unknown metric"):
        compare_metrics(primary, primary, {"accuracy": 0.1})


def test_checklist_passes_in_a_secure_environment(models) -> None:
    items = checklist(models, "fraud", 2, primary_version="1", environment=SECURE)
    assert [i.name for i in items] == ["manifest", "metrics", "profile", "monitoring", "security"]
    assert all(i.passed for i in items), items
    found = items_by_name(items)
    assert "vs primary v1" in found["metrics"].detail and "roc_auc" in found["metrics"].detail
    assert not found["monitoring"].required and found["security"].required  # high risk
    first = checklist(models, "fraud", 1, primary_version=None, environment={})
    found = items_by_name(first)
    assert found["metrics"].passed and found["metrics"].detail == "no current primary"
    assert not found["security"].passed and not found["security"].required  # low risk
    assert not found["monitoring"].passed and "no shadow results" in found["monitoring"].detail


def test_checklist_failures(models) -> None:
    worse = checklist(
        models, "fraud", 2, primary_version=1, margins={"roc_auc": -0.01}, environment=SECURE
    )
    assert not items_by_name(worse)["metrics"].passed
    env = {"auth": True, "tls": False, "shadow_records": 10, "shadow_min_records": 20}
    found = items_by_name(
        checklist(models, "fraud", 2, primary_version=1, environment=env, require_monitoring=True)
    )
    assert not found["monitoring"].passed and found["monitoring"].required
    assert "10 paired shadow records" in found["monitoring"].detail
    assert not found["security"].passed and "tls off" in found["security"].detail
    (models / "fraud" / "2" / "card.md").write_text("tampered")
    (models / "fraud" / "2" / "profile.json").write_text("{}")
    found = items_by_name(checklist(models, "fraud", 2, primary_version=1, environment=SECURE))
    assert not found["manifest"].passed and "does not match" in found["manifest"].detail
    assert not found["profile"].passed
    with pytest.raises(ModelNotFoundError):
        checklist(models, "fraud", 9, primary_version=1, environment=SECURE)
    with pytest.raises(GovernanceError):
        checklist(models, "../fraud", 1, primary_version=None, environment=SECURE)


# ------------------------------------------------------------------ approvals and the gate


def test_high_risk_needs_an_approval_of_the_exact_bytes(models) -> None:
    decision = promotion_gate(models, "fraud", 2, primary_version="1", environment=SECURE)
    assert (decision.risk, decision.allowed, decision.approved_by) == ("high", False, [])
    assert any("no approval" in reason for reason in decision.reasons)
    record_approval(models, "fraud", 1, "alice", "wrong version")
    assert not promotion_gate(models, "fraud", 2, primary_version=1, environment=SECURE).allowed

    approval = record_approval(models, "fraud", 2, "alice", "CHG-42 reviewed")
    assert approval["manifest_sha256"] == manifest_digest(models / "fraud" / "2")
    assert approval["time"].endswith("Z") and approval["version"] == 2
    decision = promotion_gate(models, "fraud", 2, primary_version=1, environment=SECURE)
    assert decision.allowed and not decision.forced and decision.approved_by == ["alice"]
    insecure = promotion_gate(models, "fraud", 2, primary_version=1, environment={})
    assert not insecure.allowed and insecure.reasons[0].startswith("security failed")

    # Rebuilt under the same version number with other bytes: the approval no longer counts.
    rewrite_package(models / "fraud" / "2", build={"built_at": "2030-01-01T00:00:00+00:00"})
    assert approvals(models, "fraud", 2) == []
    decision = promotion_gate(models, "fraud", 2, primary_version=1, environment=SECURE)
    assert not decision.allowed and decision.items[0].passed  # a valid package, unapproved
    lines = approvals_path(models).read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == [1, 2]


def test_medium_needs_the_checklist_and_low_passes_directly(models) -> None:
    make_medium(models)
    medium = promotion_gate(models, "fraud", 3, primary_version=2, environment={})
    assert medium.risk == "medium" and medium.owner == "ops"
    assert medium.allowed and medium.approved_by == []  # security not required, no approval
    worse = promotion_gate(
        models, "fraud", 3, primary_version=2, environment={}, margins={"pr_auc": -0.05}
    )
    assert not worse.allowed and worse.reasons[0].startswith("metrics failed")
    low = promotion_gate(
        models, "fraud", 1, primary_version=2, environment={}, margins={"pr_auc": -0.05}
    )
    assert low.risk == "low" and low.allowed and low.reasons == []
    assert not items_by_name(low.items)["metrics"].passed  # reported all the same


def test_force_overrides_the_gate_and_is_audited(models) -> None:
    with pytest.raises(GovernanceError, match="force"):
        promotion_gate(models, "fraud", 2, primary_version=1, environment={}, force=True)
    decision = promotion_gate(
        models, "fraud", 2, primary_version=1, environment={}, force=True, forced_by="ops-admin"
    )
    assert decision.allowed and decision.forced and decision.reasons
    record_approval(models, "fraud", 2, "alice", "looked fine")
    log = audit.default_audit_log(models)
    records = audit.read(log, action="governance")
    assert [(r["action"], r["client"]) for r in records] == [
        ("governance.force", "ops-admin"),
        ("governance.approve", "alice"),
    ]
    assert records[0]["args"]["overridden"] == decision.reasons
    assert records[0]["args"]["model"] == "fraud" and records[0]["args"]["version"] == 2
    assert records[1]["args"]["note"] == "looked fine"
    assert records[1]["args"]["manifest_sha256"] == manifest_digest(models / "fraud" / "2")
    assert audit.verify(log).ok
    with pytest.raises(GovernanceError):
        record_approval(models, "fraud", 2, "not a client id!", "")


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(monkeypatch, models, tmp_path) -> dict[str, str]:
    """A clean RISKWIRE_* environment pointing at ``models``; returns TLS settings."""
    for name in list(os.environ):
        if name.startswith("RISKWIRE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RISKWIRE_MODELS", str(models))
    monkeypatch.setenv("RISKWIRE_SHADOW_DIR", str(tmp_path / "shadow"))
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("placeholder")
    return {
        "RISKWIRE_AUTH": "true",
        "RISKWIRE_TLS_CERT": str(tmp_path / "cert.pem"),
        "RISKWIRE_TLS_KEY": str(tmp_path / "key.pem"),
    }


def test_cli_check_and_approve(cli_env, models, monkeypatch, capsys) -> None:
    assert main(["governance", "check", "fraud", "1"]) == 0
    out = capsys.readouterr().out
    assert "risk low, owner card team, primary none" in out
    assert "FAIL  security" in out and "PASS  manifest" in out and "ALLOWED" in out

    assert main(["governance", "check", "fraud", "2", "--shadow-records", "5000"]) == 1
    out = capsys.readouterr().out
    assert "primary v1" in out and "PASS  metrics" in out and "NOT ALLOWED" in out
    assert "FAIL  security    target environment: auth off, tls off" in out

    assert main(["governance", "approve", "fraud", "2", "--by", "alice", "--note", "ok"]) == 2
    assert "no active admin key" in capsys.readouterr().err
    create_key(default_key_file(models), "reader", "read")
    create_key(default_key_file(models), "alice", "admin")
    assert main(["governance", "approve", "fraud", "2", "--by", "reader"]) == 2
    capsys.readouterr()
    assert main(["governance", "approve", "fraud", "2", "--by", "alice", "--note", "ok"]) == 0
    assert "approved fraud v2 by alice" in capsys.readouterr().out

    for name, value in cli_env.items():
        monkeypatch.setenv(name, value)
    assert main(["governance", "check", "fraud", "2", "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["allowed"] and decision["approved_by"] == ["alice"]
    assert decision["primary_version"] == "1" and decision["risk"] == "high"
    monitoring = [i for i in decision["items"] if i["name"] == "monitoring"][0]
    assert not monitoring["passed"] and "0 paired shadow records" in monitoring["detail"]
    assert main(["governance", "check", "fraud", "2", "--require-monitoring"]) == 1
    capsys.readouterr()
    assert main(["governance", "check", "fraud", "2", "--primary", "2"]) == 0
    assert "vs primary v2" in capsys.readouterr().out

    assert main(["governance", "check", "fraud", "7"]) == 2
    assert "no package fraud v7" in capsys.readouterr().err
    assert main(["audit", "verify"]) == 0


def test_cli_counts_answered_shadow_records_of_the_candidate(tmp_path) -> None:
    folder = tmp_path / "records"
    folder.mkdir()
    table = pa.table(
        {
            "shadow_model": ["fraud", "fraud", "fraud", "other"],
            "shadow_version": ["2", "2", "1", "2"],
            "shadow_probability": [0.1, None, 0.2, 0.3],
        }
    )
    pq.write_table(table, folder / "part-1.parquet")
    pq.write_table(table, folder / "part-2.parquet")
    assert shadow_record_count(tmp_path, "fraud", "2") == 2
    assert shadow_record_count(tmp_path / "none", "fraud", "2") == 0
