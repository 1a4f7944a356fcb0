"""The hash-chained admin audit log: tampering is detected, appends are safe across processes,
secrets are redacted, and ``riskwire audit verify|list`` report it."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskwire.clients.cli import main
from riskwire.server.audit import (
    GENESIS_HASH,
    REDACTED,
    AuditLog,
    default_audit_log,
    head_path,
    read,
    record_hash,
    redact,
    verify,
)

pytestmark = pytest.mark.timeout(60)


def write_log(path: Path, count: int = 5) -> AuditLog:
    """A log of ``count`` records alternating between two clients and actions."""
    log = AuditLog(path)
    for i in range(count):
        action = "model.load" if i % 2 == 0 else "shadow.set"
        log.append(f"client-{i % 2}", action, {"name": "fraud", "version": i}, "ok")
    return log


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_records_are_chained_and_verify(tmp_path: Path) -> None:
    """seq counts from 1, prev links hashes from 64 zeros, the head names the last record."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    first = log.append("ops", "model.load", {"name": "fraud", "version": 2}, "ok")
    second = log.append("ops", "model.unload", {"name": "fraud"}, "error: not loaded")
    assert (first["seq"], first["prev"]) == (1, GENESIS_HASH)
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert second["hash"] == record_hash(second)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert [json.loads(line) for line in lines_of(path)] == [first, second]
    assert json.loads(head_path(path).read_text()) == {"seq": 2, "hash": second["hash"]}
    result = verify(path)
    assert result.ok and result.records == 2 and result.problems == []
    assert (result.last_seq, result.last_hash) == (2, second["hash"])


def test_edited_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    lines[2] = lines[2].replace('"version":2', '"version":7')
    path.write_text("".join(lines))
    result = verify(path)
    assert not result.ok
    assert result.problems == ["line 3 (seq 3): hash mismatch: record edited"]


def test_edited_line_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    record = json.loads(lines[1])
    record["client"] = "intruder"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    problems = verify(path).problems
    assert len(problems) == 1 and problems[0].startswith("line 3 (seq 3): prev does not match")


def test_removed_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    del lines[2]
    path.write_text("".join(lines))
    problems = verify(path).problems
    assert any(p.startswith("line 3 (seq 4): prev does not match") for p in problems)
    assert any(p.startswith("line 3 (seq 4): seq gap: expected 3") for p in problems)


def test_swapped_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    problems = verify(path).problems
    assert any(p.startswith("line 2 (seq 3)") for p in problems)
    assert any(p.startswith("line 3 (seq 2): seq repeats or goes back") for p in problems)


def test_truncated_tail_is_caught_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_text("".join(lines_of(path)[:-1]))
    result = verify(path)
    assert result.records == 4
    assert result.problems == [
        f"{head_path(path)}: head is seq 5 but the log ends at seq 4: records removed from the end"
    ]


def test_deleted_log_with_a_head_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    path.unlink()
    assert not verify(path).ok
    assert verify(tmp_path / "never.jsonl").ok  # no log, no head: empty


def test_pinned_head_detects_a_rewritten_chain(tmp_path: Path) -> None:
    """A chain rewritten consistently (with its head file) still fails a head kept elsewhere."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    pinned = verify(path)
    path.unlink()
    for i in range(3):  # a forged history of the same length
        AuditLog(path).append("intruder", "model.load", {"version": i}, "ok")
    assert verify(path).ok
    forged = verify(path, head=(pinned.last_seq, pinned.last_hash[:16]))
    assert forged.problems == ["--head: the record with head seq 3 has another hash"]


def test_torn_last_line_is_reported_and_appends_continue(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial line; the next append chains past it on a new line."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with path.open("a") as handle:
        handle.write('{"seq":3,"ti')
    record = AuditLog(path).append("ops", "model.load", {}, "ok")
    assert record["seq"] == 3 and record["prev"] == json.loads(lines_of(path)[1])["hash"]
    assert verify(path).problems == ["line 3: bad JSON"]


def test_appends_from_several_processes_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    calls = [(f"proc-{i % 4}", "keys.rotate", {"key_id": f"k{i}"}, "ok") for i in range(200)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(log.append, calls, chunksize=10)
    result = verify(path)
    assert result.ok, result.problems
    records = read(path)
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert sorted(r["args"]["key_id"] for r in records) == sorted(f"k{i}" for i in range(200))


def test_threads_append_one_chain(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    log = AuditLog(tmp_path / "audit.jsonl")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.append("t", "traffic.set", {"i": i}, "ok"), range(80)))
    assert verify(log.path).records == 80 and verify(log.path).ok


def test_secrets_are_redacted(tmp_path: Path) -> None:
    args = {
        "key_id": "k-1",
        "api_key": "s3cret",
        "Secret": "x",
        "token": "t",
        "new_password": "p",
        "nested": {"private_key": "pem", "name": "ok", "items": [{"AccessToken": "t"}]},
        "weight": 0.1,
    }
    assert redact(args) == {
        "key_id": "k-1",
        "api_key": REDACTED,
        "Secret": REDACTED,
        "token": REDACTED,
        "new_password": REDACTED,
        "nested": {"private_key": REDACTED, "name": "ok", "items": [{"AccessToken": REDACTED}]},
        "weight": 0.1,
    }
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append("ops", "keys.add", args, "ok")
    text = path.read_text()
    assert "s3cret" not in text and "pem" not in text and '"key_id":"k-1"' in text


def test_bad_result_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="audit result"):
        AuditLog(tmp_path / "audit.jsonl").append("ops", "model.load", {}, "fine")


def test_read_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 6)
    assert [r["seq"] for r in read(path, action="shadow")] == [2, 4, 6]
    assert [r["seq"] for r in read(path, action="model.load", limit=2)] == [3, 5]
    assert [r["seq"] for r in read(path, client="client-0")] == [1, 3, 5]
    assert len(read(path, since="2000-01-01T00:00:00Z")) == 6
    assert read(path, since="2999-01-01T00:00:00Z") == []
    assert read(tmp_path / "missing.jsonl") == []


def test_default_location(tmp_path: Path) -> None:
    assert default_audit_log(tmp_path) == tmp_path / ".audit" / "audit.jsonl"


# ------------------------------------------------------------------------- the CLI


def test_cli_verify_and_list(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RISKWIRE_AUDIT_LOG", raising=False)
    path = default_audit_log(tmp_path)
    write_log(path, 3)
    last = json.loads(lines_of(path)[-1])

    assert main(["audit", "verify", "--models", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"ok: 3 records, head 3 {last['hash'][:16]}\n"

    assert main(["audit", "list", "--path", str(path), "--action", "shadow", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in listed] == [2]

    monkeypatch.setenv("RISKWIRE_AUDIT_LOG", str(path))
    assert main(["audit", "list", "--client", "client-0"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["seq", "time", "client", "action", "result", "args"]
    assert len(table) == 3 and "model.load" in table[1] and '{"name": "fraud"' in table[2]

    assert main(["audit", "verify", "--head", f"3:{last['hash'][:16]}"]) == 0
    capsys.readouterr()

    lines = lines_of(path)
    path.write_text(lines[0] + lines[2])
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("line 2 (seq 3)") for line in out)


def test_cli_verify_without_a_log(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RISKWIRE_AUDIT_LOG", raising=False)
    monkeypatch.setenv("RISKWIRE_MODELS", str(tmp_path))
    assert main(["audit", "verify"]) == 2
    assert "no audit log" in capsys.readouterr().err
    assert main(["audit", "list"]) == 0
    assert capsys.readouterr().out.startswith("no audit records in ")


# -------------------------------------------------------------- property: tampering


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
records_st = st.lists(
    st.tuples(
        st.text(max_size=10),
        st.sampled_from(["model.load", "model.unload", "traffic.set", "keys.rotate"]),
        st.dictionaries(st.text(max_size=6), json_values, max_size=4),
        st.sampled_from(["ok", "error: boom", "error: ünïcode\nline"]),
    ),
    min_size=1,
    max_size=6,
)
tampering_st = st.one_of(
    st.tuples(st.just("byte"), st.integers(min_value=0), st.integers(0, 255)),
    st.tuples(st.sampled_from(["delete", "duplicate", "swap"]), st.integers(0), st.integers(0)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=records_st, tampering=tampering_st)
def test_any_single_tampering_is_detected(tmp_path: Path, records, tampering) -> None:
    path = tmp_path / "prop" / "audit.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    head_path(path).unlink(missing_ok=True)
    log = AuditLog(path)
    for record in records:
        log.append(*record)
    assert verify(path).ok

    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    kind, a, b = tampering
    if kind == "byte":
        position = a % len(data)
        if data[position] == b:
            b = (b + 1) % 256
        tampered = data[:position] + bytes([b]) + data[position + 1 :]
    elif kind == "delete":
        tampered = b"".join(lines[: a % len(lines)] + lines[a % len(lines) + 1 :])
    elif kind == "duplicate":
        i = a % len(lines)
        tampered = b"".join(lines[: i + 1] + lines[i:])
    else:
        if len(lines) < 2:
            return
        i, j = a % len(lines), b % len(lines)
        if i == j:
            j = (i + 1) % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
        tampered = b"".join(lines)
    path.write_bytes(tampered)
    assert not verify(path).ok
