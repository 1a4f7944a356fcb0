"""The admin audit log: an append-only, hash-chained JSON-lines file.

Every admin action (model load/unload, traffic change, key change) is appended as one line::

    {"seq":3,"time":"2026-01-01T09:00:00.123Z","client":"ops-1","action":"shadow.set",
     "args":{...},"result":"ok","prev":"<hash of seq 2>","hash":"<sha256 of this record>"}

``seq`` starts at 1 and increments; ``prev`` is the ``hash`` field of the previous record
(64 zeros for the first); ``hash`` is the hex SHA-256 of the canonical JSON (sorted keys,
compact separators, ASCII) of every other field of the record, ``prev`` included. Lines
are written in a fixed form (fields in the order above, ``args`` keys sorted), so
:func:`verify` can also compare each line byte for byte with the form it would write.

:func:`verify` detects an edited line (hash mismatch, or a line not in the written form), a
removed, inserted or reordered line (``prev`` mismatch and a ``seq`` gap or repeat). A
chain alone cannot detect a removed *tail*, so after each append the latest ``seq`` and
``hash`` are also written to the sidecar ``<log>.head``; verify reports a log that ends
before the head. Limits: anyone with write access to both files can rewrite the whole
chain and the head consistently, since there is no secret in the hash. To pin the log,
ship the head elsewhere (``riskwire audit verify`` prints it; ``--head SEQ:HASH`` checks
the log against a head kept off the machine).

Secrets never reach the log: :func:`redact` replaces the value of any argument whose name
contains ``key``, ``secret``, ``token`` or ``password`` (case-insensitive, at any depth)
with ``"[redacted]"``, except ``key_id``.

Several processes may append at once (the supervisor and CLI commands that change keys):
each append holds an exclusive ``flock`` on the log file while it reads the last record
(seeking back from the end) and appends its line with one ``os.write`` on an ``O_APPEND``
descriptor, followed by ``fsync``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from riskwire.files import write_text_atomic

GENESIS_HASH = "0" * 64
REDACTED = "[redacted]"
FIELDS = ("seq", "time", "client", "action", "args", "result", "prev", "hash")
_SECRET_WORDS = ("key", "secret", "token", "password")
_NOT_SECRET = frozenset({"key_id"})
_FIELD_TYPES: dict[str, type] = {
    "seq": int, "time": str, "client": str, "action": str, "args": dict, "result": str,
    "prev": str, "hash": str,
}  # fmt: skip
_TAIL_BLOCK_BYTES = 4096
_FILE_MODE = 0o640


def default_audit_log(models_dir: str | os.PathLike[str]) -> Path:
    """The default audit log of a models directory: ``<models>/.audit/audit.jsonl``."""
    return Path(models_dir) / ".audit" / "audit.jsonl"


def head_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar holding the latest ``seq`` and ``hash`` of the log at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".head")


def redact(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` with the value of every secret-looking name replaced by ``"[redacted]"``.

    A name is secret when it contains ``key``, ``secret``, ``token`` or ``password``
    (case-insensitive), except ``key_id``. Nested mappings (also inside lists) are redacted
    the same way."""
    return {str(name): _redact_value(str(name), value) for name, value in args.items()}


def _redact_value(name: str, value: Any) -> Any:
    lowered = name.lower()
    if lowered not in _NOT_SECRET and any(word in lowered for word in _SECRET_WORDS):
        return REDACTED
    return _redact_nested(value)


def _redact_nested(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_nested(item) for item in value]
    return value


def record_hash(record: Mapping[str, Any]) -> str:
    """The hex SHA-256 of the canonical JSON of every field of ``record`` but ``hash``."""
    body = {name: value for name, value in record.items() if name != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _line(record: Mapping[str, Any]) -> bytes:
    """The line written for ``record``: its fields in :data:`FIELDS` order, then a newline."""
    ordered = {name: record[name] for name in FIELDS}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True)
    return text.encode("ascii") + b"\n"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends hash-chained records to the JSON-lines file at ``path`` (see the module doc).

    Safe to use from several threads and processes at once. Picklable (as its path), so it
    can be handed to spawned processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.head_path = head_path(self.path)
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[AuditLog], tuple[Path]]:
        return (AuditLog, (self.path,))

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def append(self, client: str, action: str, args: Mapping[str, Any], result: str) -> dict:
        """Append one record and return it.

        ``result`` is ``"ok"`` or ``"error: <message>"``; ``args`` are redacted (see
        :func:`redact`) and must be JSON-serialisable (other values are written as ``str``)."""
        if result != "ok" and not result.startswith("error: "):
            raise ValueError(f"audit result must be 'ok' or 'error: <message>', got {result!r}")
        # Normalise to plain JSON values with sorted keys, as a reader will parse them back.
        clean = json.loads(json.dumps(redact(args), sort_keys=True, default=str))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                seq, prev, torn = _last_seq_hash(self.path)
                record: dict[str, Any] = {
                    "seq": seq + 1, "time": _now_iso(), "client": str(client),
                    "action": str(action), "args": clean, "result": result, "prev": prev,
                }  # fmt: skip
                record["hash"] = record_hash(record)
                # A torn last line (crash mid-write) is left for verify to report; ours
                # starts on a line of its own.
                _write_all(fd, (b"\n" if torn else b"") + _line(record))
                os.fsync(fd)
                head = {"seq": record["seq"], "hash": record["hash"]}
                write_text_atomic(self.head_path, json.dumps(head) + "\n")
            finally:
                os.close(fd)
        return record


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write``; loops only on a short write (disk full, signal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _last_seq_hash(path: Path) -> tuple[int, str, bool]:
    """``(seq, hash)`` of the last well-formed record of the log (``(0, GENESIS_HASH)`` when
    there is none), and whether the file ends without a newline (a torn write)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return 0, GENESIS_HASH, False
        handle.seek(-1, os.SEEK_END)
        torn = handle.read(1) != b"\n"
        for raw in _lines_backwards(handle):
            record = _parse(raw)
            if record is not None and _shape_problem(record) is None:
                return record["seq"], record["hash"], torn
    return 0, GENESIS_HASH, torn


def _lines_backwards(handle: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file, last first, reading blocks backwards from the end."""
    end = handle.seek(0, os.SEEK_END)
    pending = b""
    while end > 0:
        start = max(0, end - _TAIL_BLOCK_BYTES)
        handle.seek(start)
        lines = (handle.read(end - start) + pending).split(b"\n")
        pending = lines.pop(0)  # may continue in the previous block
        yield from reversed(lines)
        end = start
    yield pending


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return record if isinstance(record, dict) else None


def _shape_problem(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` is not an audit record (missing or mistyped fields), or None."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        return f"not an audit record: missing {', '.join(missing)}"
    for name, kind in _FIELD_TYPES.items():
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"not an audit record: {name} is not a {kind.__name__}"
    for name in ("prev", "hash"):
        value = record[name]
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            return f"not an audit record: {name} is not a hex SHA-256"
    return None


@dataclass
class VerifyResult:
    """The outcome of :func:`verify`.

    ``records``: well-formed records read; ``problems``: one message per problem, with its
    line number; ``last_seq``/``last_hash``: the last record's (0 and 64 zeros if none)."""

    ok: bool
    records: int
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0
    last_hash: str = GENESIS_HASH


def verify(path: str | os.PathLike[str], *, head: tuple[int, str] | None = None) -> VerifyResult:
    """Check the chain of the log at ``path`` and, if present, its ``<path>.head`` sidecar.

    ``head``: an extra ``(seq, hash or hash prefix)`` kept elsewhere that the log must
    contain. A missing log is empty (a missing log with a head file is a problem)."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    state = _ChainCheck()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    elif data:
        state.problems.append(f"line {len(lines)}: no newline at the end (torn write?)")
    for number, raw in enumerate(lines, start=1):
        state.check_line(number, raw)
    pins = [(head_path(path), _read_head(head_path(path), state.problems))]
    if head is not None:
        pins.append(("--head", head))
    for source, pin in pins:
        if pin is not None:
            state.check_head(str(source), *pin)
    return VerifyResult(
        ok=not state.problems,
        records=state.records,
        problems=state.problems,
        last_seq=state.last_seq,
        last_hash=state.last_hash,
    )


class _ChainCheck:
    """The running state of :func:`verify`: the last good record and the problems so far."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.records = 0
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.last_line = 0
        self.hashes: dict[int, str] = {}  # seq -> hash, to check heads

    def check_line(self, number: int, raw: bytes) -> None:
        record = _parse(raw)
        if record is None:
            self.problems.append(f"line {number}: bad JSON")
            return
        shape = _shape_problem(record)
        if shape is not None:
            self.problems.append(f"line {number}: {shape}")
            return
        seq, where = record["seq"], f"line {number} (seq {record['seq']})"
        if raw + b"\n" != _line(record):
            self.problems.append(f"{where}: not in the form it was written in: line edited")
        if record_hash(record) != record["hash"]:
            self.problems.append(f"{where}: hash mismatch: record edited")
        if record["prev"] != self.last_hash:
            before = f"line {self.last_line}" if self.last_line else "the start of the log"
            self.problems.append(
                f"{where}: prev does not match the hash of the record at {before}: "
                "a record was removed, inserted or reordered"
            )
        if seq <= self.last_seq:
            self.problems.append(f"{where}: seq repeats or goes back (previous {self.last_seq})")
        elif seq != self.last_seq + 1:
            self.problems.append(f"{where}: seq gap: expected {self.last_seq + 1}: records removed")
        self.records += 1
        self.last_seq, self.last_hash, self.last_line = seq, record["hash"], number
        self.hashes[seq] = record["hash"]

    def check_head(self, source: str, seq: int, digest: str) -> None:
        if seq > self.last_seq:
            self.problems.append(
                f"{source}: head is seq {seq} but the log ends at seq {self.last_seq}: "
                "records removed from the end"
            )
        elif seq not in self.hashes:
            self.problems.append(f"{source}: head seq {seq} is not in the log")
        elif not digest or not self.hashes[seq].startswith(digest.lower()):
            self.problems.append(f"{source}: the record with head seq {seq} has another hash")


def _read_head(path: Path, problems: list[str]) -> tuple[int, str] | None:
    """``(seq, hash)`` of a head sidecar, None if absent; a bad one adds a problem."""
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
        seq, digest = head["seq"], head["hash"]
        if not isinstance(seq, int) or not isinstance(digest, str):
            raise TypeError("seq or hash of the wrong type")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        problems.append(f"{path}: unreadable head: {exc}")
        return None
    return seq, digest


def read(
    path: str | os.PathLike[str],
    *,
    since: datetime | str | None = None,
    action: str | None = None,
    client: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The well-formed records of the log, oldest first (an absent log has none).

    ``since``: only records at or after this time (aware datetime or ISO-8601 string);
    ``action``: this action or its sub-actions (``shadow`` matches ``shadow.set``);
    ``client``: this client id; ``limit``: only the last ``limit`` matching records.
    Unparseable lines are skipped here; :func:`verify` reports them."""
    path = Path(path)
    if not path.exists():
        return []
    start = _as_datetime(since) if since is not None else None
    records = []
    with open(path, "rb") as handle:
        for raw in handle:
            record = _parse(raw)
            if record is None or _shape_problem(record) is not None:
                continue
            if action is not None and not (
                record["action"] == action or record["action"].startswith(action + ".")
            ):
                continue
            if client is not None and record["client"] != client:
                continue
            if start is not None and not _at_or_after(record["time"], start):
                continue
            records.append(record)
    if limit is not None:
        records = records[-limit:] if limit > 0 else []
    return records


def _as_datetime(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _at_or_after(time_text: str, start: datetime) -> bool:
    try:
        return _as_datetime(time_text) >= start
    except ValueError:
        return False
