"""Model lifecycle: hot load/unload, blue/green, canary (sticky, guarded), rollback and
the governance gate, against real 2-worker servers under continuous load."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from riskwire.clients.admin import AdminClient
from riskwire.kernels import encoding
from riskwire.pipeline.build import build
from riskwire.pipeline.package import MANIFEST_NAME, manifest_text
from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.server.audit import read as read_audit
from riskwire.server.governance import record_approval
from riskwire.server.registry import ModelRegistry
from riskwire.server.traffic import Traffic, read_traffic, write_traffic

pytestmark = pytest.mark.timeout(600)


def rewrite(package: Path, **metadata_changes) -> None:
    """Change metadata.json and rewrite the manifest: a valid package with other bytes."""
    path = package / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.update(metadata_changes)
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (package / MANIFEST_NAME).write_text(manifest_text(package))


def copy_version(models: Path, source: str, target: str, risk: str) -> Path:
    package = Path(shutil.copytree(models / "fraud" / source, models / "fraud" / target))
    rewrite(package, version=int(target), governance={"risk_category": risk, "owner": "tests"})
    return package


@pytest.fixture(scope="module")
def built(synth_data_file, small_config, tmp_path_factory) -> Path:
    """fraud v1 and v2 (low risk, different models), v3 whose every score is NaN (loads
    and warms fine, fails every call), v4 high risk (a copy of v2)."""
    models = tmp_path_factory.mktemp("lifecycle-models")
    low = dataclasses.replace(small_config(), risk_category="low")
    build(synth_data_file, name="fraud", models=models, config=low)
    second = dataclasses.replace(small_config(), risk_category="low")
    second.lightgbm["num_leaves"] = 7
    build(synth_data_file, name="fraud", models=models, config=second)
    bad = copy_version(models, "2", "3", "low")
    arrays = dict(np.load(bad / "forest.npz"))
    arrays["sigmoid"] = np.float64("nan")  # every probability NaN: INTERNAL on each call
    np.savez(bad / "forest.npz", **arrays)
    (bad / MANIFEST_NAME).write_text(manifest_text(bad))
    copy_version(models, "2", "4", "high")
    return models


@pytest.fixture
def models(built, tmp_path) -> Path:
    """A private copy, served from v1."""
    copy = Path(shutil.copytree(built, tmp_path / "models"))
    write_traffic(copy, Traffic(name="fraud", primary="1"))
    return copy


class Load:
    """Bounded continuous Score traffic over many cards from 4 threads; every outcome
    is kept (status and answering version)."""

    def __init__(self, target: str, threads: int = 4) -> None:
        self.target = target
        self.results: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            while not self._stop.is_set():
                card = f"card-{int(rng.integers(0, 2000))}"
                request = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
                    card_id=card, merchant_id="m-1", mcc=5411, amount=float(rng.uniform(1, 500)),
                    currency="EUR", country="DE", card_country="DE", channel="pos",
                ))  # fmt: skip
                try:
                    response = stub.Score(request, timeout=10)
                    self.results.append(("OK", response.model_version))
                except grpc.RpcError as exc:
                    self.results.append((exc.code().name, ""))


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_twenty_changes_under_load_fail_no_request(start_server, models) -> None:
    server = start_server(models)
    with AdminClient(server.admin_target) as admin, Load(server.target) as load:
        time.sleep(0.5)
        changes = [
            lambda: admin.promote("fraud", "2"),
            lambda: admin.rollback("fraud"),
            lambda: admin.set_canary("fraud", "2", 10),
            lambda: admin.set_canary("fraud", "2", 50),
            lambda: admin.set_canary("fraud", "", 0),
            lambda: admin.promote("fraud", "2"),
            lambda: admin.set_canary("fraud", "1", 25),
            lambda: admin.rollback("fraud"),
            lambda: admin.load_model("fraud", "3"),  # a new version, loaded and unloaded
            lambda: admin.unload_model("fraud", "3"),
        ] * 2
        for change in changes:
            change()
            time.sleep(0.2)
        time.sleep(0.5)
        listing = admin.list_models("fraud")
    assert len(changes) == 20
    statuses = {status for status, _ in load.results}
    assert statuses == {"OK"}, f"failed calls: {[r for r in load.results if r[0] != 'OK'][:5]}"
    answered = {version for _, version in load.results}
    assert answered <= {"1", "2"} and answered == {"1", "2"}
    assert len(load.results) > 200
    states = {v["version"]: v for v in listing["versions"]}
    assert states["1"]["state"] == "serving" and states["1"]["traffic_percent"] == 100.0
    assert states["2"]["state"] == "loaded"  # the rolled-back primary stays loaded
    assert states["3"]["state"] == "available" and states["3"]["loaded_in_workers"] == []
    assert states["1"]["loaded_in_workers"] == [0, 1]
    assert states["4"]["risk_category"] == "high"
    actions = [r["action"] for r in read_audit(models / ".audit" / "audit.jsonl")]
    assert actions.count("model.promote") == 4 and actions.count("model.rollback") == 4
    assert actions.count("model.canary") == 8 and actions.count("model.load") == 2
    traffic = read_traffic(models, "fraud")
    assert traffic is not None and traffic.primary == "1" and traffic.generation >= 20


def test_traffic_survives_a_restart(start_server, models) -> None:
    server = start_server(models)
    with AdminClient(server.admin_target) as admin:
        admin.promote("fraud", "2")
        admin.set_canary("fraud", "1", 30)
    server.stop()
    again = start_server(models)
    with grpc.insecure_channel(again.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        versions = set()
        for i in range(200):
            request = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
                card_id=f"restart-{i}", merchant_id="m", mcc=5411, amount=10.0))  # fmt: skip
            versions.add(stub.Score(request, timeout=10).model_version)
    assert versions == {"1", "2"}  # the canary still takes its cards after the restart


def test_canary_is_sticky_by_card_and_monotone(built) -> None:
    registry = ModelRegistry(built, "fraud")
    registry.apply(Traffic(name="fraud", primary="1"), warm=False)
    primary = registry.get("fraud", "1")
    cards = [encoding.hash64(f"card-{i}") for i in range(10_000)]

    def on_canary(weight: float) -> set[int]:
        registry.apply(Traffic(name="fraud", primary="1", canary="2", canary_weight=weight),
                       warm=False)  # fmt: skip
        return {i for i, key in enumerate(cards) if registry.route(primary, key).version == "2"}

    previous: set[int] = set()
    for weight in (1, 5, 25, 50, 90):
        chosen = on_canary(weight)
        assert abs(len(chosen) / len(cards) * 100 - weight) <= 2.0, weight
        assert chosen == on_canary(weight)  # stable at a fixed weight
        assert previous <= chosen  # raising the weight only moves cards to the canary
        previous = chosen
    pinned = registry.get("fraud", "1")
    assert all(registry.route(pinned, key) is not None for key in cards[:10])


def test_a_bad_automatic_canary_is_rolled_back_by_its_guard(start_server, models) -> None:
    server = start_server(models)
    with AdminClient(server.admin_target) as admin, Load(server.target) as load:
        time.sleep(0.3)
        admin.set_canary("fraud", "3", 20, steps=(50, 100), step_interval_s=3.0)
        traffic = wait_until(
            lambda: (t := read_traffic(models, "fraud")) and t.halted_reason and t,
            timeout_s=60,
            what="the canary guard to halt v3",
        )
        time.sleep(1.0)  # every worker polls the configuration within 0.25 s
        started = len(load.results)
        time.sleep(1.0)
    assert "error rate" in traffic.halted_reason
    assert traffic.canary == "" and traffic.canary_weight == 0 and traffic.primary == "1"
    after = load.results[started:]
    assert after and all(status == "OK" and version == "1" for status, version in after)
    failed = [r for r in load.results if r[0] != "OK"]
    assert failed and all(status == "INTERNAL" for status, _ in failed)  # only v3's answers
    halts = [r for r in read_audit(models / ".audit" / "audit.jsonl")
             if r["action"] == "model.canary.halt"]  # fmt: skip
    assert halts and halts[-1]["args"]["version"] == "3"
    incidents = (models / ".alerts" / "incidents.jsonl").read_text()
    assert "canary fraud v3 rolled back" in incidents


def test_a_broken_package_never_disturbs_serving(start_server, models) -> None:
    broken = copy_version(models, "2", "5", "low")
    (broken / "model.txt").write_text("tampered\n")  # no longer matches the manifest
    incompatible = copy_version(models, "2", "6", "low")
    rewrite(incompatible, model={**json.loads((incompatible / "metadata.json").read_text())[
        "model"], "feature_names": ["f0"]})  # fmt: skip
    server = start_server(models)
    with AdminClient(server.admin_target) as admin, Load(server.target) as load:
        for version in ("5", "6"):
            for change in (lambda v=version: admin.load_model("fraud", v),
                           lambda v=version: admin.promote("fraud", v),
                           lambda v=version: admin.set_canary("fraud", v, 50)):  # fmt: skip
                with pytest.raises(grpc.RpcError) as refused:
                    change()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "cannot be loaded" in refused.value.details()
        time.sleep(0.3)
    assert {status for status, _ in load.results} == {"OK"}
    assert {version for _, version in load.results} == {"1"}
    assert read_traffic(models, "fraud").primary == "1"


def test_high_risk_needs_an_approval_and_both_are_audited(start_server, models, tmp_path) -> None:
    from riskwire.clients.certs_cli import generate_dev_certificates
    from riskwire.clients.client import tls_credentials
    from riskwire.server.auth import create_key

    files = generate_dev_certificates(tmp_path / "tls")
    keys = tmp_path / "keys.json"
    admin_key = create_key(keys, "ops", "admin")
    server = start_server(models, env={
        "RISKWIRE_AUTH": "true", "RISKWIRE_AUTH_KEY_FILE": str(keys),
        "RISKWIRE_TLS_CERT": str(files["server_cert"]),
        "RISKWIRE_TLS_KEY": str(files["server_key"]),
    }, wait=False)  # fmt: skip
    server.wait_for_log(lambda text: "serving on" in text, 120)
    credentials = tls_credentials(str(files["ca_cert"]))
    with AdminClient(server.admin_target, api_key=admin_key, credentials=credentials) as admin:
        with pytest.raises(grpc.RpcError) as refused:
            admin.promote("fraud", "4")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "approval" in refused.value.details()
        record_approval(models, "fraud", "4", "ops", "reviewed by the risk committee")
        change = admin.promote("fraud", "4")
        assert change["traffic"]["primary"] == "4"
    records = read_audit(models / ".audit" / "audit.jsonl")
    promotions = [r for r in records if r["action"] == "model.promote"]
    assert [r["result"].split(":")[0] for r in promotions] == ["error", "ok"]
    assert all(r["client"] == "ops" for r in promotions)
    assert any(r["action"] == "governance.approve" for r in records)


def test_unknown_versions_and_impossible_changes_are_clear(start_server, models) -> None:
    server = start_server(models)
    with AdminClient(server.admin_target) as admin:
        for call, code in (
            (lambda: admin.promote("fraud", "99"), grpc.StatusCode.NOT_FOUND),
            (lambda: admin.unload_model("fraud", "1"), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: admin.rollback("fraud"), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: admin.set_canary("fraud", "2", 150), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: admin.list_models(f"nope-{uuid.uuid4().hex[:6]}"),
             grpc.StatusCode.NOT_FOUND),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == code, refused.value.details()


def test_a_change_through_one_replica_reaches_the_other(start_server, models, redis_server):
    """Two servers sharing traffic through Redis: a promotion made through one is served
    by the other within a second (no shared disk needed for the configuration)."""
    env = {"RISKWIRE_STATE_BACKEND": "redis", "RISKWIRE_REDIS_URL": redis_server.url,
           "RISKWIRE_REDIS_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}"}  # fmt: skip
    first, second = start_server(models, env=env), start_server(models, env=env)

    def answered_by(server) -> str:  # noqa: ANN001
        with grpc.insecure_channel(server.target) as channel:
            transaction = scoring_pb2.Transaction(
                card_id=f"r-{uuid.uuid4().hex}", merchant_id="m", mcc=5411, amount=5.0
            )
            request = scoring_pb2.ScoreRequest(transaction=transaction)
            return scoring_pb2_grpc.ScoringStub(channel).Score(request, timeout=10).model_version

    # Nothing in Redis yet: the highest version serves (traffic.json is not read).
    assert answered_by(second) == "4"
    with AdminClient(first.admin_target) as admin:
        admin.promote("fraud", "2")  # through the first replica
    changed = time.monotonic()
    while answered_by(second) != "2":
        assert time.monotonic() - changed < 5.0, "the second replica did not apply it"
        time.sleep(0.05)
    assert time.monotonic() - changed < 1.5


def test_a_version_built_while_serving_does_not_take_over(start_server, built, tmp_path) -> None:
    """No traffic configuration: the server serves the highest version it started with.
    A version built later and loaded through the admin API stays a candidate."""
    models = tmp_path / "models"
    (models / "fraud").mkdir(parents=True)
    shutil.copytree(built / "fraud" / "1", models / "fraud" / "1")
    server = start_server(models)
    shutil.copytree(built / "fraud" / "2", models / "fraud" / "2")  # built meanwhile
    with AdminClient(server.admin_target) as admin:
        admin.load_model("fraud", "2")
    assert read_traffic(models, "fraud").primary == "1"
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        request = scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(
            card_id=f"card-{uuid.uuid4().hex}", merchant_id="m-1", mcc=5411, amount=10.0,
            currency="EUR", country="DE", card_country="DE", channel="pos",
        ))  # fmt: skip
        assert {stub.Score(request, timeout=10).model_version for _ in range(4)} == {"1"}
