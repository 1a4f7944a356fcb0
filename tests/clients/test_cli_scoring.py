"""``riskwire score`` and ``riskwire score-file``, in-process (--local) and via a server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from riskwire.clients.local import LocalScorer
from riskwire.pipeline.data import load_raw

pytestmark = pytest.mark.timeout(300)

DECISIONS = {"approve", "review", "decline"}


def transaction(**fields: object) -> dict[str, object]:
    """A valid transaction on a fresh card."""
    values: dict[str, object] = {
        "transaction_id": "cli-1",
        "card_id": f"card-{uuid.uuid4().hex}",
        "merchant_id": "m-00042",
        "mcc": 5732,
        "amount": 249.0,
        "currency": "EUR",
        "country": "FR",
        "card_country": "DE",
        "channel": "ecommerce",
        "event_time_ms": 1_767_225_600_000 + 9 * 3_600_000,
    }
    values.update(fields)
    return values


def parse_result(stdout: str) -> dict[str, object]:
    """The JSON object ``riskwire score`` prints, checked for the essential fields."""
    result = json.loads(stdout)
    assert 0.0 <= result["probability"] <= 1.0
    assert result["decision"] in DECISIONS
    assert result["model_name"] == "fraud" and result["error"] is None
    return result


# ------------------------------------------------------------------------ riskwire score


def test_score_local_json(run_cli, models_dir: Path) -> None:
    """``score --local --json`` prints a JSON result with probability and decision."""
    proc = run_cli(
        "score", "--local", "--models", str(models_dir), "--json", json.dumps(transaction())
    )
    assert proc.returncode == 0, proc.stderr
    result = parse_result(proc.stdout)
    assert result["transaction_id"] == "cli-1"
    assert 0 < len(result["reasons"]) <= 3


def test_score_via_server_equals_local(run_cli, models_dir: Path, cli_server: str) -> None:
    """``score --target`` on a fresh card == ``score --local`` (fresh state) for the same data."""
    body = transaction()
    local = run_cli("score", "--local", "--models", str(models_dir), "--json", json.dumps(body))
    body["card_id"] = f"card-{uuid.uuid4().hex}"
    remote = run_cli(
        "score", "--target", cli_server, "--json", json.dumps(body), "--top-reasons", "5"
    )
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    local_result, remote_result = parse_result(local.stdout), parse_result(remote.stdout)
    assert remote_result["probability"] == local_result["probability"]
    assert remote_result["decision"] == local_result["decision"]
    assert len(remote_result["reasons"]) <= 5 and remote_result["request_id"]


def test_score_with_field_flags(run_cli, cli_server: str) -> None:
    """Field flags (--card-id, --amount, ...) build the transaction; they override --json."""
    proc = run_cli(
        "score", "--target", cli_server, "--json", json.dumps({"amount": 1.0}),
        "--card-id", f"card-{uuid.uuid4().hex}", "--merchant-id", "m-1", "--amount", "12.5",
        "--mcc", "5411", "--currency", "EUR", "--country", "DE", "--card-country", "DE",
        "--channel", "pos", "--transaction-id", "flags-1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert parse_result(proc.stdout)["transaction_id"] == "flags-1"


@pytest.mark.parametrize("where", ["local", "server"])
def test_score_negative_amount_fails_naming_amount(
    run_cli,
    models_dir: Path,
    cli_server: str,
    where: str,
) -> None:
    """A negative amount: non-zero exit and a message naming ``amount``; no traceback."""
    target = (
        ["--local", "--models", str(models_dir)] if where == "local" else ["--target", cli_server]
    )
    proc = run_cli("score", *target, "--json", json.dumps(transaction(amount=-5.0)))
    assert proc.returncode != 0
    assert "amount" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_score_unknown_field_fails_cleanly(run_cli, models_dir: Path) -> None:
    """An unknown transaction field is named in a clean error."""
    body = json.dumps(transaction(velocity=3))
    proc = run_cli("score", "--local", "--models", str(models_dir), "--json", body)
    assert proc.returncode != 0
    assert "velocity" in proc.stderr and "Traceback" not in proc.stderr


def test_score_unreachable_server_fails_cleanly(run_cli) -> None:
    """No server at the target: UNAVAILABLE reported in one line, non-zero exit."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run_cli(
        "score", "--target", f"127.0.0.1:{port}", "--timeout", "2", "--json",
        json.dumps(transaction()),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "UNAVAILABLE" in proc.stderr and "Traceback" not in proc.stderr


def test_score_malformed_json_fails_cleanly(run_cli, models_dir: Path) -> None:
    """Malformed --json: non-zero exit and a one-line error, not a traceback."""
    proc = run_cli("score", "--local", "--models", str(models_dir), "--json", '{"amount": ')
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "json" in proc.stderr.lower()


def test_score_local_without_models_fails_cleanly(run_cli, tmp_path: Path) -> None:
    """--local with an empty models directory: a clean 'no model' error, not a traceback."""
    proc = run_cli(
        "score", "--local", "--models", str(tmp_path), "--json", json.dumps(transaction())
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "no loadable model" in proc.stderr


# ------------------------------------------------------------------------ riskwire score-file


def read_results(path: Path) -> dict[str, list]:
    """The score-file output as columns."""
    return pq.read_table(path).to_pydict()


def check_results(results: dict[str, list], source: Path) -> None:
    """One row per input transaction, each scored, no errors."""
    ids = pq.read_table(source, columns=["transaction_id"]).column(0).to_pylist()
    assert sorted(results["transaction_id"]) == sorted(ids)
    assert all(e is None for e in results["error"])
    assert all(0.0 <= p <= 1.0 for p in results["probability"])
    assert set(results["decision"]) <= DECISIONS


@pytest.fixture(scope="module")
def local_scored(run_cli, models_dir: Path, small_tx_file: Path, tmp_path_factory) -> Path:
    """``score-file --local`` output for the small file."""
    out = tmp_path_factory.mktemp("scored") / "local.parquet"
    proc = run_cli(
        "score-file", str(small_tx_file), "--out", str(out), "--local", "--models",
        str(models_dir), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scored 500 rows" in proc.stdout and "0 failed" in proc.stdout
    return out


def test_score_file_local(local_scored: Path, small_tx_file: Path) -> None:
    """--local: one scored row per input, no errors."""
    check_results(read_results(local_scored), small_tx_file)


def test_score_file_local_equals_in_process_scorer(
    local_scored: Path, small_tx_file: Path, models_dir: Path
) -> None:
    """The CLI's --local results == LocalScorer.score_batch over the time-ordered rows."""
    raw = load_raw(small_tx_file, require_label=False).columns
    names = ("transaction_id", "card_id", "merchant_id", "currency", "country", "card_country")
    rows = [
        {
            **{name: str(raw[name][i]) for name in names},
            "channel": str(raw["channel"][i]),
            "mcc": int(raw["mcc"][i]),
            "amount": float(raw["amount"][i]),
            "event_time_ms": int(raw["event_time"][i]),
        }
        for i in range(len(raw["amount"]))
    ]
    expected = LocalScorer(models_dir).score_batch(rows)
    got = read_results(local_scored)
    assert got["transaction_id"] == [r.transaction_id for r in expected]
    assert got["probability"] == [r.probability for r in expected]
    assert got["decision"] == [r.decision for r in expected]


def test_score_file_via_server_equals_local(
    run_cli,
    cli_server: str,
    local_scored: Path,
    small_tx_file: Path,
    tmp_path: Path,
) -> None:
    """Via the dedicated server (empty state for these cards) == --local, row for row."""
    out = tmp_path / "server.parquet"
    proc = run_cli(
        "score-file", str(small_tx_file), "--out", str(out), "--target", cli_server,
        "--chunk-rows", "64", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    served = read_results(out)
    check_results(served, small_tx_file)
    assert served == read_results(local_scored)


def test_score_file_csv_output(
    run_cli, models_dir: Path, small_tx_file: Path, tmp_path: Path
) -> None:
    """A .csv --out works too and has a header plus one line per transaction."""
    out = tmp_path / "scored.csv"
    proc = run_cli(
        "score-file", str(small_tx_file), "--out", str(out), "--local", "--models",
        str(models_dir), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 501 and "probability" in lines[0]


def test_score_file_negative_amount_fails_naming_amount(
    run_cli,
    models_dir: Path,
    small_tx_file: Path,
    tmp_path: Path,
) -> None:
    """A file with a negative amount: non-zero exit, a message naming ``amount``."""
    table = pq.read_table(small_tx_file)
    amounts = table.column("amount").to_pylist()
    amounts[7] = -3.0
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        table.set_column(table.schema.get_field_index("amount"), "amount", pa.array(amounts)), bad
    )
    proc = run_cli(
        "score-file", str(bad), "--out", str(tmp_path / "out.parquet"), "--local",
        "--models", str(models_dir), "--quiet",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "amount" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.parquet").exists()
