"""API-key store (riskwire.server.auth) and ``riskwire keys create|list|revoke``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.clients.cli import main
from riskwire.server import auth
from riskwire.server.auth import (
    AuthError,
    KeyStore,
    Principal,
    client_id_from_certificate,
    create_key,
    default_key_file,
    list_keys,
    revoke_key,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return default_key_file(tmp_path / "models")


@pytest.fixture(autouse=True)
def _no_riskwire_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RISKWIRE_API_KEYS", "RISKWIRE_KEY_FILE", "RISKWIRE_MODELS"):
        monkeypatch.delenv(name, raising=False)


def bearer(key: str) -> str:
    return f"Bearer {key}"


# ------------------------------------------------------------------------ key format


def test_key_format_and_default_path(key_file: Path, tmp_path: Path) -> None:
    """``rw_<8 hex>_<43 base64url chars>``; the default file is <models>/.auth/keys.json."""
    assert key_file == tmp_path / "models" / ".auth" / "keys.json"
    key = create_key(key_file, "payments", "score")
    prefix, key_id, secret = key[:3], key[3:11], key[12:]
    assert prefix == "rw_" and key[11] == "_"
    assert len(key_id) == 8 and int(key_id, 16) >= 0
    assert len(secret) == 43 and "=" not in secret
    assert auth.parse_bearer(bearer(key)) == (key_id, secret)


def test_create_then_authenticate(key_file: Path) -> None:
    """A created key authenticates as its client with exactly its roles."""
    key = create_key(key_file, "payments", ["score", "feedback"])
    principal = KeyStore(key_file).authenticate(bearer(key))
    assert principal == Principal("payments", frozenset({"score", "feedback"}), key[3:11])
    assert principal.has_role("score") and not principal.has_role("admin")


@pytest.mark.parametrize(
    "header",
    ["bearer {key}", "BEARER {key}", "  Bearer   {key}  ", "Bearer\t{key}"],
)
def test_bearer_tolerates_case_and_spaces(key_file: Path, header: str) -> None:
    key = create_key(key_file, "payments", "score")
    assert KeyStore(key_file).authenticate(header.format(key=key)) is not None


def test_wrong_secret_with_right_key_id_fails(key_file: Path) -> None:
    key = create_key(key_file, "payments", "score")
    store = KeyStore(key_file)
    assert store.authenticate(bearer(key)) is not None  # cached now
    last = key[-1]
    forged = key[:-1] + ("A" if last != "A" else "B")
    assert store.authenticate(bearer(forged)) is None
    other = create_key(key_file, "checkout", "score")
    store.reload()
    assert store.authenticate(bearer(key[:12] + other[12:])) is None  # other key's secret


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=12, max_value=54), char=st.sampled_from("AZaz09-_"))
def test_any_changed_secret_character_fails(
    tmp_path_factory: pytest.TempPathFactory, position: int, char: str
) -> None:
    """Property: changing any one character of the secret makes the key invalid."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key = create_key(key_file, "payments", "score")
    store = KeyStore(key_file)
    forged = key[:position] + char + key[position + 1 :]
    assert (store.authenticate(bearer(forged)) is None) == (forged != key)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "{key}",  # no scheme
        "Basic {key}",
        "Bearer{key}",
        "Bearer rw_{key_id}",
        "Bearer rw_{key_id}_",
        "Bearer {key}x",
        "Bearer {key_short}",
        "Bearer {key} extra",
        "Bearer RW_{key_id}_{secret}",
        "Bearer rw_{key_id_upper}_{secret}",
        "Bearer rw_00000000_{secret}",
    ],
)
def test_malformed_or_unknown_headers_fail(key_file: Path, header: str | None) -> None:
    key = create_key(key_file, "payments", "score")
    key_id, secret = key[3:11], key[12:]
    store = KeyStore(key_file)
    if header is not None:
        header = header.format(
            key=key,
            key_id=key_id,
            secret=secret,
            key_short=key[:-1],
            key_id_upper=key_id.upper() if key_id.upper() != key_id else "ZZZZZZZZ",
        )
    assert store.authenticate(header) is None


@settings(max_examples=200, deadline=None)
@given(header=st.text(max_size=80))
def test_arbitrary_text_never_authenticates(header: str) -> None:
    """Property: random header values neither raise nor authenticate."""
    store = KeyStore(document=json.dumps({"version": 1, "keys": []}))
    assert store.authenticate(header) is None
    assert store.authenticate("Bearer " + header) is None


def test_failed_key_not_cached_as_success(key_file: Path) -> None:
    key = create_key(key_file, "payments", "score")
    store = KeyStore(key_file)
    forged = bearer(key[:-2] + ("xx" if key[-2:] != "xx" else "yy"))
    for _ in range(3):
        assert store.authenticate(forged) is None
    cache = store._state[1]
    assert forged not in cache
    assert store.authenticate(bearer(key)) is not None
    assert set(store._state[1]) == {bearer(key)}


def test_cache_is_bounded(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CACHE_MAX_ENTRIES", 4)
    key = create_key(key_file, "payments", "score")
    store = KeyStore(key_file)
    for spaces in range(10):  # distinct header values for the same key
        assert store.authenticate(" " * spaces + bearer(key)) is not None
        assert len(store._state[1]) <= 4


# ------------------------------------------------------------------- key file at rest


def test_key_file_holds_no_key_or_secret_and_is_0600(key_file: Path) -> None:
    keys = [create_key(key_file, f"client-{i}", "score,read") for i in range(3)]
    text = key_file.read_text()
    for key in keys:
        assert key not in text and key[12:] not in text
        assert key[3:11] in text  # the public key id is stored
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    document = json.loads(text)
    assert document["version"] == 1 and len(document["keys"]) == 3
    entry = document["keys"][0]
    assert set(entry) == {
        "key_id", "client_id", "roles", "salt", "hash", "created_at", "revoked_at",
    }  # fmt: skip
    assert len(entry["salt"]) == 32 and len(entry["hash"]) == 64
    assert entry["created_at"].endswith("Z") and entry["revoked_at"] is None
    salts = {e["salt"] for e in document["keys"]}
    assert len(salts) == 3
    assert not list(key_file.parent.glob("*.tmp"))


def test_missing_file_means_no_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "absent.json", reload_s=0)
    assert len(store) == 0
    assert store.authenticate("Bearer rw_00000000_" + "A" * 43) is None


def test_bad_file_fails_at_start_keeps_keys_on_reload(key_file: Path) -> None:
    key = create_key(key_file, "payments", "score")
    store = KeyStore(key_file, reload_s=0)
    good = key_file.read_text()
    key_file.write_text("{not json")
    with pytest.raises(AuthError, match="not valid JSON"):
        KeyStore(key_file)
    assert store.authenticate(bearer(key)) is not None  # previous keys kept
    key_file.write_text(good.replace('"score"', '"root"'))
    with pytest.raises(AuthError, match="unknown role"):
        KeyStore(key_file)


# ---------------------------------------------------------------- revoke and reload


def test_revoked_key_fails_after_reload(key_file: Path) -> None:
    key = create_key(key_file, "payments", "score")
    keep = create_key(key_file, "payments", "read")
    store = KeyStore(key_file, reload_s=0)
    assert store.authenticate(bearer(key)) is not None  # and cached
    assert revoke_key(key_file, key[3:11]) == [key[3:11]]
    assert store.authenticate(bearer(key)) is None
    assert store.authenticate(bearer(keep)) is not None
    assert revoke_key(key_file, key[3:11]) == []  # already revoked
    with pytest.raises(AuthError, match="no key"):
        revoke_key(key_file, "ffffffff")


def test_revoke_all_keys_of_a_client(key_file: Path) -> None:
    a1 = create_key(key_file, "a", "score")
    a2 = create_key(key_file, "a", "feedback")
    b = create_key(key_file, "b", "score")
    assert sorted(revoke_key(key_file, "a", client=True)) == sorted([a1[3:11], a2[3:11]])
    store = KeyStore(key_file)
    assert [store.authenticate(bearer(k)) is None for k in (a1, a2, b)] == [True, True, False]
    listing = {k["key_id"]: k for k in list_keys(key_file)}
    assert listing[b[3:11]]["revoked_at"] is None
    assert listing[a1[3:11]]["revoked_at"].endswith("Z")
    with pytest.raises(AuthError):
        revoke_key(key_file, "a1", client=False)


def test_reload_picks_up_key_from_another_writer(key_file: Path) -> None:
    """A key written by another process applies on the next check (reload_s=0)."""
    create_key(key_file, "payments", "score")
    store = KeyStore(key_file, reload_s=0)
    before = store._state
    assert store.authenticate("Bearer nothing") is None
    assert store._state is before  # unchanged file: no reload
    new = create_key(key_file, "checkout", "score,feedback")
    assert store.authenticate(bearer(new)).client_id == "checkout"


def test_reload_waits_for_reload_s(key_file: Path) -> None:
    store = KeyStore(key_file, reload_s=3600)
    new = create_key(key_file, "payments", "score")
    assert store.authenticate(bearer(new)) is None  # not checked yet
    assert store.reload() is True
    assert store.authenticate(bearer(new)) is not None


def test_list_keys_has_no_secrets(key_file: Path) -> None:
    create_key(key_file, "payments", "feedback,score")
    [entry] = list_keys(key_file)
    assert set(entry) == {"key_id", "client_id", "roles", "created_at", "revoked_at"}
    assert entry["roles"] == ["score", "feedback"]  # canonical order


@pytest.mark.parametrize(
    ("client", "roles", "message"),
    [
        ("payments", "score,superuser", "unknown role"),
        ("payments", "", "no role"),
        ("", "score", "client id"),
        ("has space", "score", "client id"),
        ("x" * 65, "score", "client id"),
    ],
)
def test_create_validates(key_file: Path, client: str, roles: str, message: str) -> None:
    with pytest.raises(AuthError, match=message):
        create_key(key_file, client, roles)
    assert not key_file.exists()


def test_client_id_charset() -> None:
    assert auth.validate_client_id("svc:pay/eu-1@corp.example_2") == "svc:pay/eu-1@corp.example_2"


# ---------------------------------------------------------------------- environment


def test_env_document_is_used_instead_of_file(key_file: Path, tmp_path: Path) -> None:
    env_key = create_key(tmp_path / "env-keys.json", "container", "score")
    file_key = create_key(key_file, "payments", "score")
    environ = {"RISKWIRE_API_KEYS": (tmp_path / "env-keys.json").read_text()}
    store = KeyStore.from_env_or_file(key_file, environ, reload_s=0)
    assert store.source == "RISKWIRE_API_KEYS"
    assert store.authenticate(bearer(env_key)).client_id == "container"
    assert store.authenticate(bearer(file_key)) is None
    assert store.reload() is False  # read-only
    from_file = KeyStore.from_env_or_file(key_file, {}, reload_s=0)
    assert from_file.source == str(key_file)
    assert from_file.authenticate(bearer(file_key)) is not None


def test_bad_env_document_fails_fast(key_file: Path) -> None:
    with pytest.raises(AuthError, match="RISKWIRE_API_KEYS"):
        KeyStore.from_env_or_file(key_file, {"RISKWIRE_API_KEYS": '{"keys": []}'})


# ----------------------------------------------------------------------------- mTLS


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"x509_common_name": [b"payments"], "x509_subject": [b"CN=other"]}, "payments"),
        ({"x509_subject": [b"O=Example\\, Inc.,CN=checkout,C=DE"]}, "checkout"),
        ({"x509_subject": [b"CN=a\\,b,O=x"]}, "a,b"),
        ({"x509_subject": ["cn=lower"]}, "lower"),
        ({"x509_subject": [b"O=no-cn"]}, None),
        ({"transport_security_type": [b"ssl"]}, None),
        ({"transport_security_type": [b"insecure"]}, None),
        ({}, None),
    ],
)
def test_client_id_from_certificate(context: dict, expected: str | None) -> None:
    assert client_id_from_certificate(context) == expected


# ------------------------------------------------------------------------------ CLI


def test_cli_create_list_revoke(
    key_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = key_file.parent.parent
    args = ["keys", "create", "--client", "payments", "--roles", "score", "--models", str(models)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("rw_") and "\n" not in key
    assert "cannot be shown again" in err
    assert KeyStore(key_file).authenticate(bearer(key)).roles == frozenset({"score"})

    monkeypatch.setenv("RISKWIRE_MODELS", str(models))  # default resolution
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert key[3:11] in out and "payments" in out and "active" in out and key[12:] not in out

    assert main(["keys", "revoke", key[3:11]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "list", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["key_id"] == key[3:11] and row["revoked_at"]
    assert KeyStore(key_file).authenticate(bearer(key)) is None


def test_cli_key_file_resolution_and_client_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit.json"
    from_env = tmp_path / "env.json"
    monkeypatch.setenv("RISKWIRE_KEY_FILE", str(from_env))
    assert main(["keys", "create", "--client", "a", "--roles", "read"]) == 0
    args = ["keys", "create", "--client", "a", "--roles", "admin", "--key-file", str(explicit)]
    assert main(args) == 0
    capsys.readouterr()
    assert len(list_keys(from_env)) == 1 and len(list_keys(explicit)) == 1
    assert main(["keys", "revoke", "--client", "a"]) == 0
    assert list_keys(from_env)[0]["revoked_at"] and not list_keys(explicit)[0]["revoked_at"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--client", "p", "--roles", "score,god"], "unknown role"),
        (["keys", "create", "--client", "bad id", "--roles", "score"], "client id"),
        (["keys", "revoke", "deadbeef"], "no key with key id"),
        (["keys", "revoke", "--client", "nobody"], "no key with client"),
    ],
)
def test_cli_errors_exit_2(
    key_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    create_key(key_file, "payments", "score")
    assert main([*args, "--key-file", str(key_file)]) == 2
    out, err = capsys.readouterr()
    assert message in err and not out


def test_file_mode_survives_umask(key_file: Path) -> None:
    old = os.umask(0)
    try:
        create_key(key_file, "payments", "score")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) & 0o077 == 0
