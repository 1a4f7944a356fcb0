"""The drift report (HTML from ``<models>/.drift`` and the profile) and ``riskwire drift``.

Live counts are drawn from the package's own training fractions, with one column
(``amount``) skewed towards its upper bins, so its PSI is far above every other. The
``status`` command talks to a fake admin server on port 0 returning a canned response.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from riskwire.clients import drift_cli
from riskwire.kernels.sketch import SketchLayout
from riskwire.protos import admin_pb2, admin_pb2_grpc
from riskwire.server.monitoring.drift import column_measures
from riskwire.server.monitoring.drift_report import (
    DriftReportError,
    history_key,
    load_history,
    load_latest,
    render_drift_report,
)

SHIFTED = "amount"
NOW_S = 1_780_000_000.0  # 2026-05-28
REQUESTS = 5000
HISTORY_STEPS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def skewed(fractions: np.ndarray) -> np.ndarray:
    """Mass moved towards the upper bins: a clear, deterministic shift."""
    weights = fractions * np.linspace(0.05, 3.0, len(fractions))
    return weights / weights.sum()


def synth_counts(
    layout: SketchLayout, requests: int, rng: np.random.Generator, *, shift: float = 0.0
) -> np.ndarray:
    """A merged window row: every column drawn from its training fractions, the
    ``SHIFTED`` column mixed with :func:`skewed` by ``shift`` (0: none, 1: fully)."""
    counts = np.zeros(layout.total_slots, dtype=np.int64)
    for index, spec in enumerate(layout.columns):
        fractions = spec.expected / spec.expected.sum()
        if spec.name == SHIFTED:
            fractions = (1 - shift) * fractions + shift * skewed(fractions)
        missing = round(requests * spec.expected_missing)
        row = np.r_[rng.multinomial(requests - missing, fractions), missing]
        counts[layout.slot_offsets[index] : layout.slot_offsets[index + 1]] = row
    counts[-2], counts[-1] = requests, requests // 50
    return counts


def history_line(at: float, rows: dict[str, tuple[SketchLayout, np.ndarray]]) -> str:
    """One history.jsonl line as the monitor writes it (NaN and counts left out)."""
    values = {}
    for key, (layout, counts) in rows.items():
        measures = column_measures(layout, counts, 200)
        values[key] = {
            column: {m: round(v, 6) for m, v in found.items() if m != "count" and v == v}
            for column, found in measures.items()
        }
    return json.dumps({"at": at, "values": values})


def write_drift(
    models: Path,
    layout: SketchLayout,
    *,
    model: str,
    version: str,
    latest: bool = True,
    history: bool = True,
) -> None:
    """latest.json with windows 5m and 1h, history.jsonl with HISTORY_STEPS evaluations
    of both windows (the shift growing), under ``models/.drift``."""
    rng = np.random.default_rng(7)
    directory = models / ".drift"
    directory.mkdir(parents=True, exist_ok=True)
    if latest:
        windows = {
            "5m": synth_counts(layout, REQUESTS // 4, rng, shift=1.0).tolist(),
            "1h": synth_counts(layout, REQUESTS, rng, shift=1.0).tolist(),
        }
        payload = {"at": NOW_S, "models": [{"name": model, "version": version, "windows": windows}]}
        (directory / "latest.json").write_text(json.dumps(payload))
    if history:
        lines = []
        for step in range(HISTORY_STEPS):
            rows = {
                history_key(model, version, window): (
                    layout,
                    synth_counts(layout, requests, rng, shift=step / (HISTORY_STEPS - 1)),
                )
                for window, requests in (("5m", REQUESTS // 4), ("1h", REQUESTS))
            }
            lines.append(history_line(NOW_S - 300 * (HISTORY_STEPS - 1 - step), rows))
        (directory / "history.jsonl").write_text("\n".join(lines) + "\n")


def copy_models(models_dir: Path, target: Path) -> Path:
    """The shared models directory copied (never written to), without server leftovers."""
    shutil.copytree(models_dir, target, ignore=shutil.ignore_patterns(".drift", ".alerts"))
    return target


def run_cli(argv: list[str]) -> int:
    """``riskwire drift …`` through a parser holding only the drift group."""
    parser = argparse.ArgumentParser(prog="riskwire")
    drift_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["drift", *argv])
    return args.handler(args)


@pytest.fixture(scope="module")
def package(built_model) -> tuple[str, str]:
    """(model, version) of the built package."""
    return built_model.path.parent.name, built_model.path.name


@pytest.fixture(scope="module")
def layout(built_model) -> SketchLayout:
    return SketchLayout(json.loads((built_model.path / "profile.json").read_text()))


@pytest.fixture(scope="module")
def drift_models(models_dir, tmp_path_factory, layout, package) -> Path:
    """A copy of the models directory with latest.json and history.jsonl."""
    models = copy_models(models_dir, tmp_path_factory.mktemp("drift") / "models")
    write_drift(models, layout, model=package[0], version=package[1])
    return models


@pytest.fixture(scope="module")
def report_html(drift_models) -> str:
    return render_drift_report(drift_models)


def dist_ids(text: str) -> list[str]:
    return re.findall(r"id='dist-([^']+)'", text)


def test_report_has_one_figure_per_column_and_the_history(report_html, layout, package):
    names = [spec.name for spec in layout.columns]
    assert sorted(dist_ids(report_html)) == sorted(names)
    assert "id='dist-score'" in report_html
    assert "id='over-time'" in report_html
    assert f"Drift report: {package[0]} v{package[1]}" in report_html
    assert "window 1h" in report_html  # the longest window by default
    assert f"{HISTORY_STEPS} evaluations" in report_html
    sources = re.findall(r"<img [^>]*src='([^']+)'", report_html)
    assert len(sources) == len(names) + 1  # one per column and the over-time figure
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "http://" not in report_html and "https://" not in report_html


def test_shifted_column_comes_first(report_html):
    assert dist_ids(report_html)[0] == SHIFTED
    summary = report_html.split("<section id='summary'>", 1)[1].split("</table>", 1)[0]
    first_row = summary.split("<tr>")[2]
    assert f"#dist-{SHIFTED}'" in first_row
    assert "class='n alert'" in first_row  # PSI > 0.25
    assert summary.count("class='n alert'") == 1


def test_history_only_says_there_are_no_live_counts(tmp_path, models_dir, layout, package):
    models = copy_models(models_dir, tmp_path / "models")
    write_drift(models, layout, model=package[0], version=package[1], latest=False)
    text = render_drift_report(models, window="5m")
    assert "No live counts" in text
    assert dist_ids(text) == []
    assert "id='over-time'" in text and "data:image/png;base64," in text
    summary = text.split("<section id='summary'>", 1)[1]
    assert summary.index(f"#dist-{SHIFTED}'") < summary.index("#dist-score'")


def test_counts_of_another_layout_are_not_plotted(tmp_path, models_dir, package):
    models = copy_models(models_dir, tmp_path / "models")
    (models / ".drift").mkdir()
    payload = {"at": NOW_S, "models": [{"name": package[0], "version": package[1],
                                        "windows": {"1h": [5, 1, 0]}}]}  # fmt: skip
    (models / ".drift" / "latest.json").write_text(json.dumps(payload))
    text = render_drift_report(models)
    assert "The live counts have 3 slots" in text
    assert "No drift history" in text
    assert dist_ids(text) == []


def test_data_strings_are_escaped_and_no_history_is_noted(tmp_path, built_model, layout):
    name, version = "fr<a>ud&'x", "1"
    models = tmp_path / "models"
    shutil.copytree(built_model.path, models / name / version)
    profile_path = models / name / version / "profile.json"
    profile = json.loads(profile_path.read_text())
    odd = "<b>$x^$</b>"  # HTML, and unbalanced mathtext for matplotlib
    profile["inputs"]["card_country"]["frequencies"][odd] = 0.3
    profile_path.write_text(json.dumps(profile))
    odd_layout = SketchLayout(profile)
    write_drift(models, odd_layout, model=name, version=version, history=False)
    text = render_drift_report(models)
    assert "fr&lt;a&gt;ud&amp;&#x27;x" in text
    assert "fr<a>" not in text and "<b>$" not in text
    assert "No drift history" in text
    assert sorted(dist_ids(text)) == sorted(spec.name for spec in odd_layout.columns)


def test_report_errors(tmp_path, drift_models, built_model, package):
    with pytest.raises(DriftReportError, match="no drift data in"):
        render_drift_report(tmp_path)
    with pytest.raises(DriftReportError, match=r"model nope; available: fraud v\d+ \(5m, 1h\)"):
        render_drift_report(drift_models, model="nope")
    bare = tmp_path / "bare"
    shutil.copytree(drift_models / ".drift", bare / ".drift")
    with pytest.raises(DriftReportError, match="no profile for"):
        render_drift_report(bare)


def test_load_helpers(tmp_path, drift_models, package):
    directory = drift_models / ".drift"
    latest = load_latest(directory / "latest.json")
    assert latest["at"] == NOW_S and latest["models"][0]["name"] == package[0]
    assert load_latest(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DriftReportError, match="not readable"):
        load_latest(tmp_path / "bad.json")

    history = tmp_path / "history.jsonl"
    text = (directory / "history.jsonl").read_text()
    history.write_text(text + '{"at": 1, "values"')  # a line being written
    key = history_key(*package, "1h")
    records = load_history(history, key)
    assert len(records) == HISTORY_STEPS
    assert [r["at"] for r in records] == sorted(r["at"] for r in records)
    assert records[-1]["values"][SHIFTED]["psi"] > 0.25 > records[0]["values"][SHIFTED]["psi"]
    assert set(load_history(history)[0]["values"]) == {key, history_key(*package, "5m")}
    assert load_history(history, "other|1|1h") == []
    assert load_history(tmp_path / "none.jsonl") == []


def test_cli_report_writes_the_file(tmp_path, drift_models, capsys):
    out = tmp_path / "drift.html"
    argv = ["report", "--models", str(drift_models), "--window", "5m", "--out", str(out)]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    text = out.read_text()
    assert "window 5m" in text and "id='over-time'" in text
    assert dist_ids(text)[0] == SHIFTED


def test_cli_report_errors_cleanly_without_files(tmp_path, capsys):
    out = tmp_path / "drift.html"
    assert run_cli(["report", "--models", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("riskwire: error: no drift data in ")
    assert "Traceback" not in err
    assert not out.exists()
    missing_dir = tmp_path / "no" / "drift.html"
    assert run_cli(["report", "--models", str(tmp_path), "--out", str(missing_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- drift status against a fake admin server


def drift_value(column, measure, value, threshold=math.nan, *, window="1h", alerting=False):
    return admin_pb2.DriftValue(
        model="fraud", version="3", window=window, column=column, measure=measure,
        value=value, count=REQUESTS, threshold=threshold, alerting=alerting,
    )  # fmt: skip


CANNED = admin_pb2.DriftStatusResponse(
    values=[
        drift_value("mcc", "linf", 0.05, 0.1),
        drift_value("score", "js", 0.02),  # no threshold
        drift_value("amount", "psi", math.nan, 0.25, window="5m"),  # too few requests
        drift_value("amount", "psi", 0.6, 0.25, alerting=True),
        drift_value("flagged", "flagged_share", 0.03, 0.02, alerting=True),
    ],
    alerts=[
        admin_pb2.FiringAlert(
            id="a1b2c3d4e5",
            rule="psi-high",
            severity="critical",
            model="fraud",
            version="3",
            window="1h",
            column="amount",
            measure="psi",
            value=0.6,
            threshold=0.25,
            started_at=NOW_S - 120,
            message="PSI of amount is 0.6 (> 0.25)",
        )  # fmt: skip
    ],
    evaluated_at=NOW_S,
    validation={"validated": 5000, "flagged": 150},
)


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """Answers DriftStatus with CANNED; model "missing" is NOT_FOUND."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def DriftStatus(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append((request.model, request.window))
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model 'missing'")
        return CANNED


@pytest.fixture(scope="module")
def fake_admin() -> Iterator[tuple[str, FakeAdmin]]:
    servicer = FakeAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_cli_status_human(fake_admin, capsys):
    target, servicer = fake_admin
    assert run_cli(["status", "--admin", target, "--model", "fraud", "--window", "1h"]) == 0
    assert servicer.requests[-1] == ("fraud", "1h")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "drift evaluated at 2026-05-28T20:26:40Z"
    assert lines[1] == "validation: flagged 150, validated 5000"
    assert lines[2] == "firing alerts: 1"
    assert lines[3].split() == ["critical", "PSI", "of", "amount", "is", "0.6", "(>", "0.25)"]
    assert lines[4].startswith("values with a threshold: 3 of 5, highest value/threshold first")
    assert lines[5].split() == ["model", "window", "column", "measure", "value", "threshold"]
    rows = [line.split() for line in lines[6:]]
    assert rows == [
        ["!", "fraud", "v3", "1h", "amount", "psi", "0.6", "0.25"],
        ["!", "fraud", "v3", "1h", "flagged", "flagged_share", "0.03", "0.02"],
        ["fraud", "v3", "1h", "mcc", "linf", "0.05", "0.1"],
    ]


def test_cli_status_all(fake_admin, capsys):
    assert run_cli(["status", "--admin", fake_admin[0], "--all"]) == 0
    assert fake_admin[1].requests[-1] == ("", "")
    out = capsys.readouterr().out
    rows = out.splitlines()[-5:]
    assert [r.split()[-4:] for r in rows[-2:]] == [
        ["score", "js", "0.02", "n/a"],
        ["amount", "psi", "n/a", "0.25"],
    ]
    assert "values with a threshold" not in out


def test_cli_status_json(fake_admin, capsys):
    assert run_cli(["status", "--admin", fake_admin[0], "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["evaluated_at"] == NOW_S
    assert status["validation"] == {"flagged": 150, "validated": 5000}
    assert len(status["values"]) == len(CANNED.values)
    by_key = {(v["window"], v["column"], v["measure"]): v for v in status["values"]}
    assert by_key["5m", "amount", "psi"]["value"] is None
    assert by_key["1h", "score", "js"]["threshold"] is None
    assert by_key["1h", "amount", "psi"] == {
        "model": "fraud", "version": "3", "window": "1h", "column": "amount",
        "measure": "psi", "value": 0.6, "count": REQUESTS, "threshold": 0.25, "alerting": True,
    }  # fmt: skip
    assert status["alerts"][0]["severity"] == "critical"
    assert status["alerts"][0]["started_at"] == NOW_S - 120


def test_cli_status_grpc_error(fake_admin, capsys):
    assert run_cli(["status", "--admin", fake_admin[0], "--model", "missing"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "riskwire: error: NOT_FOUND: no model 'missing'\n"
    assert captured.out == ""
