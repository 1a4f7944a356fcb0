"""Authentication, roles, TLS/mTLS, throttling and audit against a real 2-worker server."""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskwire.clients.admin import AdminClient
from riskwire.clients.certs_cli import generate_dev_certificates
from riskwire.clients.client import tls_credentials
from riskwire.protos import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from riskwire.server.audit import read as read_audit
from riskwire.server.audit import verify as verify_audit
from riskwire.server.auth import create_key, revoke_key

pytestmark = pytest.mark.timeout(300)
ROLES = ("score", "feedback", "admin", "read")
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def transaction(card: str = "", amount: float = 12.5) -> scoring_pb2.Transaction:
    return scoring_pb2.Transaction(
        card_id=card or f"card-{uuid.uuid4().hex}", merchant_id="m-1", mcc=5411,
        amount=amount, currency="EUR", country="DE", card_country="DE", channel="pos",
    )  # fmt: skip


def secret_of(key: str) -> str:
    """The secret part of ``rw_<8 hex>_<secret>`` (the secret may contain '_')."""
    return key[len("rw_00000000_") :]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> dict:
    """A key file with one key per role, a revoked key and a throttled client."""
    folder = tmp_path_factory.mktemp("auth")
    path = folder / "keys.json"
    keys = {role: create_key(path, f"client-{role}", role) for role in ROLES}
    keys["revoked"] = create_key(path, "client-revoked", "score,feedback,admin,read")
    revoke_key(path, keys["revoked"].split("_")[1])
    keys["limited"] = create_key(path, "limited", "score")
    keys["free"] = create_key(path, "free", "score")
    # A valid-looking key that was never issued (right format, unknown id).
    keys["bad"] = "rw_0badc0de_" + "A" * 43
    return {"path": path, "keys": keys, "audit": folder / "audit.jsonl"}


@pytest.fixture(scope="module")
def auth_server(module_start_server, models_dir, keyed):
    return module_start_server(
        models_dir,
        env={
            "RISKWIRE_AUTH": "true",
            "RISKWIRE_AUTH_KEY_FILE": str(keyed["path"]),
            "RISKWIRE_AUDIT_LOG": str(keyed["audit"]),
            "RISKWIRE_RATE_LIMITS": "limited=40/5",
            "RISKWIRE_REQUEST_LOG_DIR": str(keyed["path"].parent / "requests"),
        },
    )


def data_plane_calls(channel: grpc.Channel) -> dict:
    """RPC name → (callable taking metadata, role needed or "" when open)."""
    scoring = scoring_pb2_grpc.ScoringStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    feedback = scoring_pb2.FeedbackRequest(
        outcomes=[scoring_pb2.LabelledOutcome(request_id="r-1", label=scoring_pb2.LABEL_FRAUD)]
    )

    def stream(metadata):  # noqa: ANN001, ANN202
        responses = scoring.ScoreStream(
            iter([scoring_pb2.ScoreRequest(transaction=transaction())]),
            metadata=metadata, timeout=10,
        )  # fmt: skip
        return list(responses)

    return {
        "Score": (lambda m: scoring.Score(
            scoring_pb2.ScoreRequest(transaction=transaction()), metadata=m, timeout=10), "score"),
        "ScoreBatch": (lambda m: scoring.ScoreBatch(
            scoring_pb2.ScoreBatchRequest(transactions=[transaction()]), metadata=m, timeout=10),
            "score"),
        "ScoreStream": (stream, "score"),
        "Feedback": (lambda m: scoring.Feedback(feedback, metadata=m, timeout=10), "feedback"),
        "Health": (lambda m: health.Check(health_pb2.HealthCheckRequest(), metadata=m,
                                          timeout=10), ""),
    }  # fmt: skip


def admin_calls(channel: grpc.Channel) -> dict:
    admin = admin_pb2_grpc.AdminStub(channel)
    return {
        "GetShadow": (lambda m: admin.GetShadow(admin_pb2.GetShadowRequest(), metadata=m,
                                                timeout=10), "read"),
        "ShadowStatus": (lambda m: admin.ShadowStatus(admin_pb2.ShadowStatusRequest(),
                                                      metadata=m, timeout=10), "read"),
        "SetShadow": (lambda m: admin.SetShadow(admin_pb2.ShadowConfig(enabled=False),
                                                metadata=m, timeout=10), "admin"),
    }  # fmt: skip


def outcome(call, metadata) -> grpc.StatusCode:  # noqa: ANN001
    try:
        call(metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def allowed(role_needed: str, role: str) -> bool:
    if not role_needed or role_needed == role:
        return True
    return role_needed == "read" and role in ("score", "admin")


def test_auth_matrix_every_role_every_rpc(auth_server, keyed) -> None:
    """Each role × each RPC × {no key, unknown key, revoked key, right key}."""
    keys = keyed["keys"]
    with (
        grpc.insecure_channel(auth_server.target) as data,
        grpc.insecure_channel(auth_server.admin_target) as control,
    ):
        calls = {**data_plane_calls(data), **admin_calls(control)}
        problems = []
        for name, (call, needed) in calls.items():
            for who in ("none", "bad", "revoked", *ROLES):
                code = outcome(call, bearer(keys.get(who, "")))
                if who in ("none", "bad", "revoked"):
                    expected_ok = not needed
                    if not expected_ok and code != grpc.StatusCode.UNAUTHENTICATED:
                        problems.append(f"{name} with {who} key: {code}")
                elif allowed(needed, who):
                    if code in DENIED:
                        problems.append(f"{name} with {who} key: refused ({code})")
                elif code != grpc.StatusCode.PERMISSION_DENIED:
                    problems.append(f"{name} with {who} key: {code}, expected PERMISSION_DENIED")
        assert not problems, "\n".join(problems)
    text = auth_server.log()
    for key in keys.values():  # no key (or its secret) in any log line
        assert secret_of(key) not in text


def test_admin_changes_are_audited_with_the_client_id(auth_server, keyed) -> None:
    with AdminClient(auth_server.admin_target, api_key=keyed["keys"]["admin"]) as admin:
        admin.set_shadow(enabled=False, rate_percent=50.0)
    records = read_audit(keyed["audit"], action="shadow.set")
    assert records and records[-1]["client"] == "client-admin"
    assert records[-1]["result"] == "ok" and records[-1]["args"]["rate_percent"] == 50.0
    assert verify_audit(keyed["audit"]).ok


def test_request_log_carries_the_client_id_never_the_key(auth_server, keyed) -> None:
    key = keyed["keys"]["score"]
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        stub.Score(scoring_pb2.ScoreRequest(transaction=transaction()), metadata=bearer(key),
                   timeout=10)  # fmt: skip
    folder = keyed["path"].parent / "requests"
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for f in folder.glob("requests-w*.jsonl")
                 for line in f.read_text().splitlines()]  # fmt: skip
        if any(line.get("client_id") == "client-score" for line in lines):
            break
        time.sleep(0.2)
    assert any(line.get("client_id") == "client-score" for line in lines)
    text = "".join(f.read_text() for f in folder.glob("requests-w*.jsonl"))
    assert secret_of(key) not in text


def test_throttling_is_shared_by_both_workers(auth_server, keyed) -> None:
    """'limited' (40/s, burst 5) is refused beyond its rate over connections that reach
    both workers; 'free' is never refused."""
    keys = keyed["keys"]
    channels = [
        grpc.insecure_channel(auth_server.target, options=[("grpc.use_local_subchannel_pool", 1),
                                                            ("probe", i)])
        for i in range(8)
    ]  # fmt: skip
    counts = {"ok": 0, "limited": 0, "other": 0, "free_ok": 0, "free_other": 0}
    workers: set[int] = set()
    retry_hints: list[str] = []
    lock = threading.Lock()
    duration_s = 3.0
    stop = time.monotonic() + duration_s

    def hammer(channel: grpc.Channel, who: str) -> None:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        while time.monotonic() < stop:
            request = scoring_pb2.ScoreRequest(transaction=transaction())
            try:
                response = stub.Score(request, metadata=bearer(keys[who]), timeout=10)
                with lock:
                    counts["ok" if who == "limited" else "free_ok"] += 1
                    workers.add(auth_server.worker_of(response.request_id))
            except grpc.RpcError as exc:
                with lock:
                    if who == "free":
                        counts["free_other"] += 1
                    elif exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        counts["limited"] += 1
                        hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                        if hint:
                            retry_hints.append(hint)
                    else:
                        counts["other"] += 1
            if who == "free":
                time.sleep(0.01)

    threads = [threading.Thread(target=hammer, args=(channel, "limited")) for channel in channels]
    threads += [threading.Thread(target=hammer, args=(channels[0], "free"))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for channel in channels:
        channel.close()
    assert len(workers) == 2, "the limited client's calls reached only one worker"
    expected = 5 + 40 * elapsed
    assert abs(counts["ok"] - expected) <= 0.1 * expected, (counts, elapsed)
    assert counts["limited"] > counts["ok"] and counts["other"] == 0
    assert retry_hints and all(0 < int(h) <= 1000 for h in retry_hints)
    assert counts["free_ok"] > 0 and counts["free_other"] == 0


def test_key_rotation_while_traffic_flows(start_server, models_dir, tmp_path) -> None:
    """A new key works and a revoked one stops working within seconds, with no restart
    and no failed call for the client that switched keys in time."""
    path = tmp_path / "keys.json"
    old = create_key(path, "payments", "score")
    server = start_server(
        models_dir, env={"RISKWIRE_AUTH": "true", "RISKWIRE_AUTH_KEY_FILE": str(path)}
    )
    current = {"key": old}
    failures: list[str] = []
    done = threading.Event()

    def traffic() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)
            while not done.is_set():
                try:
                    stub.Score(scoring_pb2.ScoreRequest(transaction=transaction()),
                               metadata=bearer(current["key"]), timeout=10)  # fmt: skip
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)
                time.sleep(0.005)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.5)
        new = create_key(path, "payments", "score")
        with grpc.insecure_channel(server.target) as channel:
            stub = scoring_pb2_grpc.ScoringStub(channel)

            def score(metadata):  # noqa: ANN001, ANN202
                return stub.Score(
                    scoring_pb2.ScoreRequest(transaction=transaction()), metadata=metadata,
                    timeout=10,
                )  # fmt: skip

            # Every worker takes the new key within its reload interval: fresh
            # connections (spread over the workers) all succeed within seconds.
            deadline = time.monotonic() + 15
            for i in range(6):
                with grpc.insecure_channel(server.target, options=[
                        ("grpc.use_local_subchannel_pool", 1), ("n", i)]) as fresh:  # fmt: skip
                    fresh_stub = scoring_pb2_grpc.ScoringStub(fresh)
                    while outcome(lambda m, s=fresh_stub: s.Score(scoring_pb2.ScoreRequest(
                            transaction=transaction()), metadata=m, timeout=10),
                            bearer(new)) != grpc.StatusCode.OK:  # fmt: skip
                        assert time.monotonic() < deadline, "the new key was not taken"
                        time.sleep(0.1)
            time.sleep(1.5)  # > reload_s: the traffic's worker has the new key too
            current["key"] = new
            revoke_key(path, old.split("_")[1])
            deadline = time.monotonic() + 15
            seen: collections.Counter[str] = collections.Counter()
            while (code := outcome(score, bearer(old))) != grpc.StatusCode.UNAUTHENTICATED:
                seen[code.name] += 1
                assert time.monotonic() < deadline, (
                    f"the revoked key still works: answers {dict(seen)}, workers "
                    f"{sorted(server.worker_pids())}; log:\n{server.log_tail()}"
                )
                time.sleep(0.1)
    finally:
        done.set()
        thread.join()
    assert not failures, failures[:5]


def test_tls_and_mutual_tls(start_server, models_dir, tmp_path) -> None:
    """TLS with client certificates: a certificate alone identifies the client (its CN,
    with the configured roles); plaintext and certificate-less connections are refused."""
    files = generate_dev_certificates(tmp_path / "tls", client="checkout")
    keys = tmp_path / "keys.json"
    key = create_key(keys, "payments", "score")
    server = start_server(
        models_dir,
        env={
            "RISKWIRE_AUTH": "true",
            "RISKWIRE_AUTH_KEY_FILE": str(keys),
            "RISKWIRE_TLS_CERT": str(files["server_cert"]),
            "RISKWIRE_TLS_KEY": str(files["server_key"]),
            "RISKWIRE_TLS_CLIENT_CA": str(files["ca_cert"]),
            "RISKWIRE_REQUEST_LOG_DIR": str(tmp_path / "requests"),
        },
        wait=False,
    )
    server.wait_for_log(lambda text: "serving on" in text, 120)
    ca, cert, client_key = (str(files[k]) for k in ("ca_cert", "client_cert", "client_key"))
    mutual = tls_credentials(ca, cert, client_key)
    request = scoring_pb2.ScoreRequest(transaction=transaction())
    with grpc.secure_channel(server.target, mutual) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        response = stub.Score(request, timeout=10)  # the certificate is the credential
        assert 0.0 <= response.probability <= 1.0
        stub.Score(request, metadata=bearer(key), timeout=10)  # a key on top also works
        with pytest.raises(grpc.RpcError) as denied:  # certificate clients: score only
            stub.Feedback(scoring_pb2.FeedbackRequest(), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(server.admin_target, mutual) as channel:  # TLS on the admin plane
        with pytest.raises(grpc.RpcError) as denied:
            admin_pb2_grpc.AdminStub(channel).SetShadow(admin_pb2.ShadowConfig(), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(server.target) as plaintext:
        with pytest.raises(grpc.RpcError) as refused:
            scoring_pb2_grpc.ScoringStub(plaintext).Score(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(server.target, tls_credentials(ca)) as no_certificate:
        with pytest.raises(grpc.RpcError) as refused:
            scoring_pb2_grpc.ScoringStub(no_certificate).Score(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 10
    clients: set[str] = set()
    while "checkout" not in clients and time.monotonic() < deadline:
        clients = {json.loads(line).get("client_id", "")
                   for f in (tmp_path / "requests").glob("*.jsonl")
                   for line in f.read_text().splitlines()}  # fmt: skip
        time.sleep(0.2)
    assert {"checkout", "payments"} <= clients


def test_hostile_auth_metadata_never_crashes_or_leaks(auth_server, keyed) -> None:
    """Huge, binary, unicode-looking and repeated authorization metadata: clear refusals,
    the server keeps serving, and no offered key text reaches a log."""
    secret_marker = "SECRET" + uuid.uuid4().hex
    hostile = [
        (("authorization", "Bearer " + secret_marker * 200),),
        (("authorization", "Bearer rw_" + secret_marker),),
        (("authorization", "bearer\trw_00000000_" + "x" * 43),),
        (("authorization", "Basic " + secret_marker),),
        (("authorization-bin", b"\x00\xff" + secret_marker.encode()),),
        (("authorization", "Bearer %E2%98%83" + secret_marker),),
        tuple(("authorization", f"Bearer {secret_marker}{i}") for i in range(50)),
        (("authorization", ""),),
    ]
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        for metadata in hostile:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Score(scoring_pb2.ScoreRequest(transaction=transaction()),
                           metadata=metadata, timeout=10)  # fmt: skip
            assert refused.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.INTERNAL,  # metadata over the HTTP/2 header limit
            ), refused.value  # fmt: skip
            assert secret_marker not in (refused.value.details() or "")
        stub.Score(scoring_pb2.ScoreRequest(transaction=transaction()),
                   metadata=bearer(keyed["keys"]["score"]), timeout=10)  # fmt: skip
    assert secret_marker not in auth_server.log()
    folder = keyed["path"].parent / "requests"
    assert secret_marker not in "".join(f.read_text() for f in folder.glob("*.jsonl"))
    assert auth_server.process.poll() is None


def test_admin_client_reads_with_a_read_key(auth_server, keyed) -> None:
    with AdminClient(auth_server.admin_target, api_key=keyed["keys"]["read"]) as admin:
        assert "enabled" in admin.get_shadow()
        with pytest.raises(grpc.RpcError) as denied:
            admin.set_shadow(enabled=False)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_keys_cli_changes_are_audited(tmp_path: Path, capsys) -> None:
    from riskwire.clients.cli import main

    models = tmp_path / "models"
    assert main(["keys", "create", "--client", "ops", "--roles", "admin",
                 "--models", str(models)]) == 0  # fmt: skip
    key = capsys.readouterr().out.strip()
    assert main(["keys", "revoke", key.split("_")[1], "--models", str(models)]) == 0
    records = read_audit(models / ".audit" / "audit.jsonl")
    assert [r["action"] for r in records] == ["keys.create", "keys.revoke"]
    assert secret_of(key) not in (models / ".audit" / "audit.jsonl").read_text()
    assert main(["audit", "verify", "--models", str(models)]) == 0
