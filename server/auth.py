"""API keys and client identities: the store the auth interceptor asks on every call.

A client sends ``authorization: Bearer rw_<key_id>_<secret>`` as gRPC metadata. ``key_id``
(8 hex chars) is public and picks the entry; ``secret`` (32 random bytes, base64url) is
checked against the stored salted hash. The key file (or ``$RISKWIRE_API_KEYS``) holds

    {"version": 1, "keys": [{"key_id": "3f9a0c1e", "client_id": "payments",
      "roles": ["score"], "salt": "<16 bytes hex>", "hash": "<sha256 hex>",
      "created_at": "2026-01-01T00:00:00Z", "revoked_at": null}, ...]}

and never the key or its secret. ``hash = SHA-256(salt || secret)``: a key is a 256-bit
random token, not a password, so a fast salted hash cannot be brute-forced, while a slow
KDF (bcrypt, scrypt) would cost milliseconds per request on the hot path.

:class:`KeyStore` authenticates (constant-time comparison, successful tokens cached) and
reloads the file when its mtime, size or inode changes, checked at most every
``reload_s`` seconds, so ``riskwire keys create|revoke`` reach every worker within about
a second without a restart. :func:`create_key`, :func:`list_keys` and :func:`revoke_key`
are the read-modify-write side, serialised between processes with ``flock``.
Roles: ``score`` (data plane), ``feedback``, ``admin`` (control plane), ``read``
(reports, status). Missing/unknown key → UNAUTHENTICATED and wrong role →
PERMISSION_DENIED are the interceptor's job; this module only says who the caller is.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from riskwire.files import write_text_atomic

log = logging.getLogger(__name__)

ROLES = ("score", "feedback", "admin", "read")
ENV_VAR = "RISKWIRE_API_KEYS"
FILE_VERSION = 1
DEFAULT_RELOAD_S = 1.0
CACHE_MAX_ENTRIES = 1024
KEY_PREFIX = "rw_"
_SALT_BYTES = 16
_SECRET_BYTES = 32
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{8}")
_TOKEN = re.compile(r"rw_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_HEX = re.compile(r"[0-9a-f]+")
_NEVER_LOADED = object()


class AuthError(ValueError):
    """A bad role, client id, key file or an unknown key id (management side)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called: the client id, its roles and the key that proved it ("" for mTLS)."""

    client_id: str
    roles: frozenset[str]
    key_id: str = ""

    def has_role(self, role: str) -> bool:
        """True when the principal holds ``role``."""
        return role in self.roles


@dataclass(frozen=True, slots=True)
class _Entry:
    """A verifiable key: salt and digest as bytes, the principal built once."""

    salt: bytes
    digest: bytes
    principal: Principal


# ------------------------------------------------------------------ validation, format


def default_key_file(models_dir: str | os.PathLike[str]) -> Path:
    """The default key file of a models directory: ``<models>/.auth/keys.json``."""
    return Path(models_dir) / ".auth" / "keys.json"


def validate_client_id(client_id: str) -> str:
    """``client_id`` if it is 1..64 chars of ``[A-Za-z0-9._:@/-]``, else AuthError."""
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise AuthError(
            f"client id {client_id!r}: expected 1 to 64 characters of A-Z a-z 0-9 . _ : @ / -"
        )
    return client_id


def parse_roles(roles: str | Iterable[str]) -> frozenset[str]:
    """Roles from ``"score,feedback"`` or an iterable; AuthError on an unknown or no role."""
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    names = frozenset(str(r).strip() for r in items if str(r).strip())
    unknown = sorted(names - set(ROLES))
    if unknown:
        raise AuthError(f"unknown role(s) {', '.join(unknown)}: expected {', '.join(ROLES)}")
    if not names:
        raise AuthError(f"no role given: expected one or more of {', '.join(ROLES)}")
    return names


def hash_secret(salt: bytes, secret: str) -> bytes:
    """SHA-256 of ``salt || secret`` (the secret's ASCII text)."""
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def parse_bearer(header_value: str | None) -> tuple[str, str] | None:
    """``(key_id, secret)`` of ``"Bearer rw_<key_id>_<secret>"``; None when malformed."""
    if not header_value:
        return None
    value = header_value.strip()
    if value[:7].lower() != "bearer " and value[:7].lower() != "bearer\t":
        return None
    match = _TOKEN.fullmatch(value[7:].strip())
    return (match.group(1), match.group(2)) if match else None


def parse_key_document(text: str, *, source: str = "key file") -> list[dict[str, Any]]:
    """The validated entries of a key document (JSON ``{"version": 1, "keys": [...]}``)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AuthError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("version") != FILE_VERSION:
        raise AuthError(f'{source}: expected {{"version": {FILE_VERSION}, "keys": [...]}}')
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise AuthError(f'{source}: "keys" must be a list')
    for index, entry in enumerate(keys):
        _check_entry(entry, f"{source}: keys[{index}]")
    return keys


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise AuthError(f"{where}: expected an object")
    key_id = entry.get("key_id")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise AuthError(f"{where}: key_id must be 8 lowercase hex characters")
    roles = entry.get("roles")
    if not isinstance(roles, list):
        raise AuthError(f"{where}: roles must be a list")
    try:
        validate_client_id(entry.get("client_id"))
        parse_roles(roles)
    except AuthError as exc:
        raise AuthError(f"{where}: {exc}") from None
    for field, chars in (("salt", 2 * _SALT_BYTES), ("hash", 64)):
        value = entry.get(field)
        if not isinstance(value, str) or len(value) != chars or not _HEX.fullmatch(value):
            raise AuthError(f"{where}: {field} must be {chars} lowercase hex characters")


def _active_entries(entries: list[dict[str, Any]]) -> dict[str, _Entry]:
    """key_id → verifiable entry, revoked keys left out."""
    active = {}
    for e in entries:
        if e.get("revoked_at") or e.get("revoked") is True:
            continue
        principal = Principal(e["client_id"], parse_roles(e["roles"]), e["key_id"])
        active[e["key_id"]] = _Entry(bytes.fromhex(e["salt"]), bytes.fromhex(e["hash"]), principal)
    return active


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- KeyStore


class KeyStore:
    """Authenticates bearer keys against a key file (reloaded on change) or a fixed document.

    Many threads may call :meth:`authenticate` at once: the keys and the success cache
    are swapped together as one tuple on reload, so the hot path takes no lock. A
    missing file means no keys (every key is refused). A file that fails to parse on
    reload keeps the previous keys and logs an error; at construction it raises.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        document: str | None = None,
        reload_s: float = DEFAULT_RELOAD_S,
    ) -> None:
        if (path is None) == (document is None):
            raise ValueError("KeyStore needs exactly one of path and document")
        if reload_s < 0:
            raise ValueError(f"reload_s must be >= 0, got {reload_s}")
        self.path = None if path is None else Path(path)
        self.reload_s = float(reload_s)
        self._signature: object = _NEVER_LOADED
        self._next_check_s = float("inf") if path is None else 0.0
        self._reload_lock = threading.Lock()
        self._state: tuple[dict[str, _Entry], dict[str, Principal]] = ({}, {})
        if document is not None:
            self._state = (_active_entries(parse_key_document(document, source=ENV_VAR)), {})
        else:
            self._reload(time.monotonic(), strict=True)

    @classmethod
    def from_env_or_file(
        cls,
        path: str | os.PathLike[str],
        environ: Mapping[str, str] | None = None,
        *,
        reload_s: float = DEFAULT_RELOAD_S,
    ) -> KeyStore:
        """The keys of ``$RISKWIRE_API_KEYS`` (read-only) when set, else those of ``path``."""
        environ = os.environ if environ is None else environ
        document = environ.get(ENV_VAR)
        if document:
            return cls(document=document, reload_s=reload_s)
        return cls(path, reload_s=reload_s)

    @property
    def source(self) -> str:
        """Where the keys come from: the file path, or the environment variable name."""
        return ENV_VAR if self.path is None else str(self.path)

    def __len__(self) -> int:
        """The number of active (not revoked) keys."""
        return len(self._state[0])

    def authenticate(self, header_value: str | None) -> Principal | None:
        """The principal of an ``authorization`` metadata value, None when it proves nothing.

        None for a missing, malformed, unknown or revoked key and for a wrong secret.
        A verified header value is cached (bounded, emptied on reload): a repeat costs
        one dict lookup. Failures are never cached.
        """
        if not header_value:
            return None
        now = time.monotonic()
        if now >= self._next_check_s:
            self._maybe_reload(now)
        keys, cache = self._state  # one consistent snapshot
        principal = cache.get(header_value)
        if principal is not None:
            return principal
        parsed = parse_bearer(header_value)
        if parsed is None:
            return None
        entry = keys.get(parsed[0])  # key ids are public: no need to hide a miss
        if entry is None or not hmac.compare_digest(
            hash_secret(entry.salt, parsed[1]), entry.digest
        ):
            return None
        if len(cache) >= CACHE_MAX_ENTRIES:
            cache.clear()
        cache[header_value] = entry.principal  # lands in a dropped dict if a reload raced
        return entry.principal

    def reload(self) -> bool:
        """Check the file now (ignoring ``reload_s``); True when the keys were reloaded."""
        if self.path is None:
            return False
        with self._reload_lock:
            return self._reload(time.monotonic(), strict=False)

    def _maybe_reload(self, now: float) -> None:
        # Only one thread checks; the others go on with the current keys.
        if not self._reload_lock.acquire(blocking=False):
            return
        try:
            if now >= self._next_check_s:
                self._reload(now, strict=False)
        finally:
            self._reload_lock.release()

    def _reload(self, now: float, *, strict: bool) -> bool:
        """Reload when the file's (mtime, size, inode) changed; returns whether it did."""
        path = self.path
        if path is None:
            return False
        self._next_check_s = now + self.reload_s
        try:
            st = path.stat()
            signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = None  # no file, no keys: every key is refused
        if signature == self._signature:
            return False
        if signature is None:
            self._state = ({}, {})
            self._signature = None
            return True
        try:
            text = path.read_text(encoding="utf-8")
            keys = _active_entries(parse_key_document(text, source=str(path)))
        except (OSError, AuthError) as exc:
            if strict:
                raise AuthError(str(exc)) from exc
            log.error("API keys not reloaded, keeping the previous keys: %s", exc)
            self._signature = signature  # log once per change, not on every check
            return False
        self._state = (keys, {})
        self._signature = signature
        return True


# ----------------------------------------------------------------- management (CLI side)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``<path>.lock`` for a read-modify-write of the key file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The validated entries of a key file; [] when it does not exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return parse_key_document(text, source=str(path))


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    text = json.dumps({"version": FILE_VERSION, "keys": entries}, indent=2) + "\n"
    write_text_atomic(path, text)  # mkstemp creates the file 0600; chmod says so explicitly
    os.chmod(path, 0o600)


def create_key(path: str | os.PathLike[str], client_id: str, roles: str | Iterable[str]) -> str:
    """Add a key for ``client_id`` with ``roles`` to the key file; return the plain key.

    The key is shown only here: the file keeps its salted hash.
    """
    path = Path(path)
    validate_client_id(client_id)
    role_set = parse_roles(roles)
    with _locked(path):
        entries = read_entries(path)
        taken = {e["key_id"] for e in entries}
        key_id = secrets.token_hex(4)
        while key_id in taken:
            key_id = secrets.token_hex(4)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=")
        salt = secrets.token_bytes(_SALT_BYTES)
        entries.append(
            {
                "key_id": key_id,
                "client_id": client_id,
                "roles": [r for r in ROLES if r in role_set],
                "salt": salt.hex(),
                "hash": hash_secret(salt, secret.decode("ascii")).hex(),
                "created_at": _now_iso(),
                "revoked_at": None,
            }
        )
        _write_entries(path, entries)
    return f"{KEY_PREFIX}{key_id}_{secret.decode('ascii')}"


def list_keys(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The keys of a key file, oldest first: key_id, client_id, roles, created_at,
    revoked_at (None while active). No salts or hashes."""
    fields = ("key_id", "client_id", "roles", "created_at", "revoked_at")
    return [{f: e.get(f) for f in fields} for e in read_entries(path)]


def revoke_key(
    path: str | os.PathLike[str], key_id_or_client: str, *, client: bool = False
) -> list[str]:
    """Revoke one key by id, or with ``client=True`` every key of that client id.

    Returns the key ids revoked now (already revoked ones are left as they are);
    AuthError when no key matches.
    """
    path = Path(path)
    field = "client_id" if client else "key_id"
    with _locked(path):
        entries = read_entries(path)
        matching = [e for e in entries if e[field] == key_id_or_client]
        if not matching:
            what = "client" if client else "key id"
            raise AuthError(f"no key with {what} {key_id_or_client!r} in {path}")
        revoked = [e for e in matching if not e.get("revoked_at")]
        now = _now_iso()
        for entry in revoked:
            entry["revoked_at"] = now
        if revoked:
            _write_entries(path, entries)
    return [e["key_id"] for e in revoked]


# ----------------------------------------------------------------------------- mTLS


def client_id_from_certificate(auth_context: Mapping[str, Any]) -> str | None:
    """The subject CN of the peer's verified client certificate, None without one.

    ``auth_context`` is grpc's ``context.auth_context()``: names to lists of bytes, e.g.
    ``{"transport_security_type": [b"ssl"], "x509_common_name": [b"payments"],
    "x509_subject": [b"CN=payments,O=Example"]}``. ``x509_common_name`` wins; otherwise
    the CN is parsed from the RFC 4514 ``x509_subject``.
    """
    common_name = _first_text(auth_context.get("x509_common_name"))
    if common_name:
        return common_name
    subject = _first_text(auth_context.get("x509_subject"))
    if not subject:
        return None
    for attribute in re.split(r"(?<!\\),", subject):
        name, sep, value = attribute.strip().partition("=")
        if sep and name.strip().upper() == "CN" and value.strip():
            return re.sub(r"\\(.)", r"\1", value.strip())
    return None


def _first_text(values: Any) -> str | None:
    if not values:
        return None
    value = values[0] if isinstance(values, list | tuple) else values
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value) or None
