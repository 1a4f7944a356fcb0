"""The shadow report: numbers against independent recomputation, HTML, CLI, export."""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import shutil
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from riskwire.clients import shadow_cli
from riskwire.shadow.metrics import RankedScores, average_precision, bootstrap_metrics, roc_auc
from riskwire.shadow.records import (
    FEATURE_COLUMNS,
    LABEL_SCHEMA,
    RECORD_SCHEMA,
    RECORD_SCHEMA_NO_FEATURES,
    SegmentWriter,
)
from riskwire.shadow.report import bucket_seconds, compute_report, load_window
from riskwire.shadow.report_html import FIGURE_IDS, render_html

START = datetime(2026, 11, 20, tzinfo=UTC)
SPAN = timedelta(days=2)
MAIN_PAIR = ("fraud", "1", "fraud", "2")
ODD_PAIR = ("fraud", "1", "fraud<&'\"x>", "3")  # needs escaping in HTML


def _decisions(p: np.ndarray) -> list[str]:
    return np.where(p >= 0.5, "decline", np.where(p >= 0.2, "review", "approve")).tolist()


def _make_rows(rng: np.random.Generator, n: int, pair: tuple[str, ...], prefix: str) -> dict:
    """Paired records of one model pair: shadow = primary + noise, some shadow failures."""
    fraud = rng.random(n) < 0.1
    primary_logit = -3.0 + 2.5 * fraud + rng.normal(size=n)
    shadow_logit = primary_logit + 1.0 * fraud + rng.normal(scale=0.3, size=n)
    primary = np.round(1 / (1 + np.exp(-primary_logit)), 3)  # rounded: plenty of ties
    shadow = np.round(1 / (1 + np.exp(-shadow_logit)), 3)
    failed = rng.random(n) < 0.03
    times = START + timedelta(seconds=1) * np.sort(rng.uniform(0, SPAN.total_seconds(), n))
    shadow_latency = rng.lognormal(5.0, 0.5, n)
    shadow_values = [None if f else float(s) for f, s in zip(failed, shadow, strict=True)]
    shadow_decisions = [None if f else d for f, d in zip(failed, _decisions(shadow), strict=True)]
    return {
        "request_id": [f"{prefix}-req-{i}" for i in range(n)],
        "transaction_id": [f"{prefix}-tx-{i}" for i in range(n)],
        "time": times.tolist(),
        "entity_hash": rng.integers(0, 2**63, n, dtype=np.uint64).tolist(),
        "worker": [0] * n,
        "primary_model": [pair[0]] * n,
        "primary_version": [pair[1]] * n,
        "shadow_model": [pair[2]] * n,
        "shadow_version": [pair[3]] * n,
        "primary_probability": primary.tolist(),
        "shadow_probability": shadow_values,
        "primary_decision": _decisions(primary),
        "shadow_decision": shadow_decisions,
        "primary_latency_us": rng.lognormal(6.0, 0.3, n).tolist(),
        "shadow_latency_us": np.where(failed, np.nan, shadow_latency).tolist(),
        "shadow_error": ["deadline exceeded <shadow>" if f else None for f in failed],
        "client_id": ["payments"] * n,
        "fraud": fraud,
    }


def _write_records(directory: Path, rows: dict) -> None:
    """Half the rows as worker 0 (with feature columns), half as worker 1 (without)."""
    n = len(rows["request_id"])
    half = n // 2
    rng = np.random.default_rng(5)
    for worker, part, schema in ((0, slice(0, half), RECORD_SCHEMA),
                                 (1, slice(half, n), RECORD_SCHEMA_NO_FEATURES)):  # fmt: skip
        count = len(range(n)[part])
        columns = []
        for field in schema:
            if field.name == "worker":
                columns.append([worker] * count)
            elif field.name in FEATURE_COLUMNS:
                columns.append(rng.normal(size=count).tolist())
            else:
                columns.append(rows[field.name][part])
        writer = SegmentWriter(directory / "records", schema, worker=worker, flush_rows=10**9)
        writer.add_rows(columns)
        writer.flush()


def _write_labels(directory: Path, rows: dict, rng: np.random.Generator) -> None:
    """Labels for about 60% of requests: by request id, or by transaction id only."""
    n = len(rows["request_id"])
    chosen = np.flatnonzero(rng.random(n) < 0.6)
    by_request = rng.random(len(chosen)) < 0.5
    stamp = START + SPAN + timedelta(days=3)
    columns = [
        [rows["request_id"][i] if r else None for i, r in zip(chosen, by_request, strict=True)],
        [rows["transaction_id"][i] for i in chosen],
        [int(rows["fraud"][i]) for i in chosen],
        [stamp] * len(chosen),
        [stamp] * len(chosen),
        [0] * len(chosen),
    ]
    writer = SegmentWriter(directory / "labels", LABEL_SCHEMA, worker=0)
    writer.add_rows(columns)
    writer.flush()


def _concat(*parts: dict) -> dict:
    return {key: [v for part in parts for v in list(part[key])] for key in parts[0]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two shadow directories of the same 3000 records (two pairs), with and without labels."""
    rng = np.random.default_rng(42)
    rows = _concat(_make_rows(rng, 2500, MAIN_PAIR, "a"), _make_rows(rng, 500, ODD_PAIR, "b"))
    labelled = tmp_path_factory.mktemp("shadow-labelled")
    unlabelled = tmp_path_factory.mktemp("shadow-unlabelled")
    _write_records(labelled, rows)
    _write_records(unlabelled, rows)
    _write_labels(labelled, rows, rng)
    return {"rows": rows, "labelled": labelled, "unlabelled": unlabelled}


@pytest.fixture(scope="module")
def report(data) -> dict:
    return compute_report(data["labelled"], bootstrap=200, seed=1)


def _pair(report: dict, key: tuple[str, ...]) -> dict:
    names = ("primary_model", "primary_version", "shadow_model", "shadow_version")
    (found,) = [p for p in report["pairs"] if tuple(p[k] for k in names) == key]
    return found


def _expected(rows: dict, key: tuple[str, ...], labels: Path | None = None) -> dict:
    """The pair's rows as numpy arrays, recomputed without the report code."""
    names = ("primary_model", "primary_version", "shadow_model", "shadow_version")
    mask = np.array([tuple(rows[k][i] for k in names) == key for i in range(len(rows["worker"]))])
    pick = np.flatnonzero(mask)
    shadow = np.array([np.nan if v is None else v for v in rows["shadow_probability"]])[pick]
    return {
        "primary": np.array(rows["primary_probability"])[pick],
        "shadow": shadow,
        "primary_decision": np.array(rows["primary_decision"], dtype=object)[pick],
        "shadow_decision": np.array(rows["shadow_decision"], dtype=object)[pick],
        "request_id": np.array(rows["request_id"])[pick],
    }


def _labels_by_request(directory: Path, rows: dict) -> dict[str, int]:
    """request id → label, resolving transaction-only labels through the generator's rows."""
    table = pq.read_table(directory / "labels").to_pydict()
    tx_to_req = dict(zip(rows["transaction_id"], rows["request_id"], strict=True))
    return {
        req or tx_to_req[tx]: label
        for req, tx, label in zip(
            table["request_id"], table["transaction_id"], table["label"], strict=True
        )
    }


# --- numbers ------------------------------------------------------------------------


def test_report_summary_matches_recomputation(data, report):
    assert report["records"] == 3000
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for key in (MAIN_PAIR, ODD_PAIR):
        pair, exp = _pair(report, key), _expected(data["rows"], key)
        ok = ~np.isnan(exp["shadow"])
        p, s = exp["primary"][ok], exp["shadow"][ok]
        pd, sd = exp["primary_decision"][ok], exp["shadow_decision"][ok]
        summary = pair["summary"]
        assert summary["mirrored"] == len(ok)
        assert summary["failed"] == int((~ok).sum()) > 0
        assert summary["scored"] == int(ok.sum())
        assert summary["agreement_rate"] == pytest.approx(np.mean(pd == sd))
        assert summary["mean_abs_delta"] == pytest.approx(np.mean(np.abs(s - p)))
        assert summary["max_abs_delta"] == pytest.approx(np.max(np.abs(s - p)))
        assert summary["correlation"] == pytest.approx(np.corrcoef(p, s)[0, 1], rel=1e-9)
        flips = Counter(f"{a}->{b}" for a, b in zip(pd, sd, strict=True) if a != b)
        assert {k: v for k, v in summary["flips"].items() if v} == dict(flips)
        matrix = np.asarray(pair["flip_matrix"]["counts"])
        assert matrix.sum() == ok.sum()
        assert np.trace(matrix) == int(np.sum(pd == sd))
        assert pair["histograms"]["primary"] and sum(pair["histograms"]["shadow"]) == ok.sum()
        over = pair["over_time"]
        assert sum(over["requests"]) == len(ok) and sum(over["scored"]) == ok.sum()
        assert 10 <= len(over["requests"]) <= 21


def test_report_quality_matches_sklearn(data, report):
    labels = _labels_by_request(data["labelled"], data["rows"])
    for key in (MAIN_PAIR, ODD_PAIR):
        pair, exp = _pair(report, key), _expected(data["rows"], key)
        y = np.array([labels.get(r, -1) for r in exp["request_id"]])
        assert pair["labelled"] == int((y >= 0).sum())
        use = (y >= 0) & ~np.isnan(exp["shadow"])
        q = pair["quality"]
        assert q["rows"] == use.sum() and q["positives"] == y[use].sum() > 0
        for name in ("primary", "shadow"):
            scores, m = exp[name][use], q[name]
            assert m["roc_auc"] == pytest.approx(roc_auc_score(y[use], scores), abs=1e-12)
            assert m["pr_auc"] == pytest.approx(average_precision_score(y[use], scores), abs=1e-12)
            for metric in ("roc_auc", "pr_auc"):
                low, high = m[metric + "_ci"]
                assert low <= m[metric] <= high
            declined = exp[name + "_decision"][use] == "decline"
            tp = np.sum(declined & (y[use] == 1))
            assert m["at_decline"]["precision"] == pytest.approx(tp / declined.sum())
            assert m["at_decline"]["recall"] == pytest.approx(tp / y[use].sum())
            flagged = exp[name + "_decision"][use] != "approve"
            assert m["at_review_or_decline"]["flagged"] == flagged.sum()
        d = q["difference"]
        assert d["roc_auc"] == pytest.approx(q["shadow"]["roc_auc"] - q["primary"]["roc_auc"])
        assert d["roc_auc_ci"][0] <= d["roc_auc"] <= d["roc_auc_ci"][1]
        assert q["verdict"] in ("better", "worse", "no_difference")
        assert q["verdict_text"]
    # the shadow's logit carries more signal, on 2500 pairs the difference is clear
    assert _pair(report, MAIN_PAIR)["quality"]["verdict"] == "better"


def test_report_has_the_champion_challenger_comparison(data, report):
    labels = _labels_by_request(data["labelled"], data["rows"])
    pair, exp = _pair(report, MAIN_PAIR), _expected(data["rows"], MAIN_PAIR)
    y = np.array([labels.get(r, -1) for r in exp["request_id"]])
    use = (y >= 0) & ~np.isnan(exp["shadow"])
    q = pair["quality"]
    c = q["comparison"]
    assert c["rows"] == q["rows"] and c["positives"] == q["positives"]
    assert c["bootstrap"]["resamples"] == 200 and c["costs"]["missed_fraud"] == 10
    legit = y[use] == 0
    declined = exp["primary_decision"][use] == "decline"
    assert c["serving_fpr"] == pytest.approx(np.sum(declined & legit) / legit.sum())
    for role, name in (("champion", "primary"), ("challenger", "shadow")):
        assert c[role]["roc_auc"] == pytest.approx(q[name]["roc_auc"], abs=1e-12)
        assert c[role]["recall_at_decline"] == pytest.approx(q[name]["at_decline"]["recall"])
    # the same resamples as the quality section: the same ROC AUC intervals
    assert c["difference"]["roc_auc_ci"] == pytest.approx(q["difference"]["roc_auc_ci"])
    assert c["verdict"] == "challenger better"  # the shadow separates fraud better
    page = render_html(report, load_window(data["labelled"]))
    assert "id='champion-challenger'" in page and "id='champion-challenger-2'" in page
    assert "Champion vs challenger:</b> challenger better" in page
    assert "champion vs challenger: challenger better" in shadow_cli.summary_line(report)


def test_rank_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for n, levels in ((50, 5), (2000, 30), (5000, 10_000)):
        y = rng.random(n) < 0.2
        scores = np.round(rng.random(n) + 0.3 * y, int(math.log10(levels)))
        assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        assert average_precision(scores, y) == pytest.approx(
            average_precision_score(y, scores), abs=1e-12
        )
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([False, False])))


def test_weighted_and_resampled_metrics_equal_sklearn_on_resampled_rows():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.random(n) < 0.3
    scores = np.round(rng.random(n) + 0.2 * y, 2)
    draws = rng.integers(0, n, size=(3, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])
    ranked = RankedScores(scores, y)
    roc, ap = ranked.metrics(counts)
    resampled_roc, resampled_ap = ranked.resampled_metrics(draws)
    for b in range(3):
        rows = draws[b]
        assert roc[b] == pytest.approx(roc_auc_score(y[rows], scores[rows]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(y[rows], scores[rows]), abs=1e-12)
    np.testing.assert_allclose(resampled_roc, roc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(resampled_ap, ap, rtol=0, atol=1e-12)


def test_bootstrap_is_paired_and_seeded():
    rng = np.random.default_rng(2)
    y = rng.random(1000) < 0.2
    a = rng.random(1000) + 0.5 * y
    first = bootstrap_metrics([a, a], y, replicates=50, seed=3)
    assert first.shape == (2, 2, 50)
    np.testing.assert_array_equal(first[0], first[1])  # same rows resampled for both
    np.testing.assert_array_equal(first, bootstrap_metrics([a, a], y, replicates=50, seed=3))


def test_bucket_seconds_is_round_and_bounded():
    assert bucket_seconds(0) == 1
    assert bucket_seconds(20 * 60_000) == 60
    assert bucket_seconds(2 * 86_400_000) == 10800
    assert bucket_seconds(365 * 86_400_000) % 86400 == 0


def test_window_filters_records(data):
    since, until = START + timedelta(hours=12), START + timedelta(hours=30)
    windowed = compute_report(data["labelled"], since=since, until=until, bootstrap=20)
    times = np.array([t.timestamp() for t in data["rows"]["time"]])
    inside = (times >= since.timestamp()) & (times < until.timestamp())
    assert windowed["records"] == inside.sum() > 0
    assert sum(p["summary"]["mirrored"] for p in windowed["pairs"]) == inside.sum()
    first = min(p["time_range"]["first"] for p in windowed["pairs"])
    last = max(p["time_range"]["last"] for p in windowed["pairs"])
    assert since.isoformat()[:13] <= first and last < until.isoformat()[:19]
    assert windowed["window"]["since"].startswith("2026-11-20T12:00")
    # text times work too, and an empty window yields no pairs
    assert compute_report(data["labelled"], since="2030-01-01", bootstrap=0)["pairs"] == []


def test_without_labels_quality_is_none(data):
    unlabelled = compute_report(data["unlabelled"], bootstrap=10)
    assert unlabelled["labelled"] == 0
    assert all(p["quality"] is None and p["labelled"] == 0 for p in unlabelled["pairs"])


def test_degenerate_pair_all_shadow_failures_one_label_class(tmp_path):
    rows = _make_rows(np.random.default_rng(7), 40, MAIN_PAIR, "c")
    rows["shadow_probability"] = [None] * 40
    rows["shadow_decision"] = [None] * 40
    rows["time"] = [START] * 40  # one instant: one time bucket
    rows["fraud"] = np.zeros(40, bool)
    _write_records(tmp_path, rows)
    _write_labels(tmp_path, rows, np.random.default_rng(8))
    degenerate = compute_report(tmp_path, bootstrap=0)
    (pair,) = degenerate["pairs"]
    assert pair["summary"]["scored"] == 0 and pair["summary"]["agreement_rate"] is None
    assert pair["over_time"]["requests"] == [40]
    assert pair["quality"]["rows"] == 0 and pair["quality"]["verdict"] == "insufficient"
    page = render_html(degenerate, load_window(tmp_path))
    assert "scored none of these requests" in page and "id='roc'" in page


def test_bootstrap_off_gives_no_interval(data):
    quality = _pair(compute_report(data["labelled"], bootstrap=0), MAIN_PAIR)["quality"]
    assert quality["primary"]["roc_auc"] is not None
    assert quality["primary"]["roc_auc_ci"] == [None, None]
    assert quality["verdict"] == "no_interval"


# --- HTML ---------------------------------------------------------------------------


def _image_payloads(page: str) -> list[bytes]:
    found = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return [base64.b64decode(x) for x in found]


def test_html_has_every_figure_with_images(data, report):
    page = render_html(report, load_window(data["labelled"]))
    for name in FIGURE_IDS:
        assert f"id='{name}'" in page and f"id='{name}-2'" in page
    images = _image_payloads(page)
    assert len(images) == 2 * len(FIGURE_IDS)
    assert all(image.startswith(b"\x89PNG") for image in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "fraud&lt;&amp;&#x27;&quot;x&gt;" in page and "fraud<&" not in page
    assert "deadline exceeded &lt;shadow&gt;" in page
    assert "Verdict:" in page and "shadow better" in page


def test_html_without_labels_says_so(data):
    unlabelled = compute_report(data["unlabelled"], bootstrap=0)
    page = render_html(unlabelled, load_window(data["unlabelled"]))
    assert "No labels" in page
    assert f"id='{FIGURE_IDS[0]}'" in page and "id='roc'" in page
    assert len(_image_payloads(page)) == 2 * (len(FIGURE_IDS) - 2)


def test_zero_records_page(tmp_path):
    empty = compute_report(tmp_path / "nothing-here", bootstrap=10)
    assert empty["records"] == 0 and empty["pairs"] == []
    page = render_html(empty, load_window(tmp_path / "nothing-here"))
    assert "no shadow records in this window" in page
    assert "<img" not in page


# --- CLI ----------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="riskwire")
    subparsers = shadow_cli.register(parser.add_subparsers(dest="command", required=True))
    assert subparsers.choices.keys() >= {"report", "export"}
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_report_json_to_stdout(data, capsys):
    window = ["--since", "2026-11-20", "--until", "2026-11-21T00:00Z"]
    rc = _run(["shadow", "report", "--dir", str(data["labelled"]), "--format", "json", *window])
    out = capsys.readouterr()
    assert rc == 0
    parsed = json.loads(out.out)
    assert parsed["window"]["until"] == "2026-11-21T00:00:00.000Z"
    assert 0 < parsed["records"] < 3000 and len(parsed["pairs"]) == 2
    assert "records" in out.err  # the summary line goes to stderr, keeping stdout JSON


def test_cli_report_html_and_models_default(data, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(data["labelled"], models / ".shadow")
    assert _run(["shadow", "report", "--format", "html"]) == 2  # HTML needs --out
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "report.html"
    rc = _run(["shadow", "report", "--models", str(models), "--out", str(out), "--bootstrap", "0"])
    assert rc == 0 and out.read_text().startswith("<!doctype html>")
    line = capsys.readouterr().out
    assert str(out) in line and "3000 records" in line and "2 pair(s)" in line
    monkeypatch.setenv("RISKWIRE_MODELS", str(models))
    json_out = tmp_path / "report.json"
    rc = _run(["shadow", "report", "--format", "json", "--out", str(json_out), "--bootstrap", "0"])
    assert rc == 0 and json.loads(json_out.read_text())["records"] == 3000


def test_cli_rejects_bad_times(data, capsys):
    with pytest.raises(SystemExit):
        _run(["shadow", "report", "--since", "yesterday-ish"])
    assert "not a time" in capsys.readouterr().err
    rc = _run(["shadow", "export", "--dir", str(data["labelled"]), "--since", "2026-11-22",
               "--until", "2026-11-21", "--out", "x.parquet"])  # fmt: skip
    assert rc == 2


def test_cli_export_writes_joined_parquet(data, tmp_path, capsys):
    out = tmp_path / "joined.parquet"
    rc = _run(["shadow", "export", "--dir", str(data["labelled"]), "--until", "2026-11-21",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    table = pq.read_table(out)
    times = np.array([t.timestamp() for t in data["rows"]["time"]])
    assert table.num_rows == int((times < datetime(2026, 11, 21, tzinfo=UTC).timestamp()).sum())
    assert "label" in table.column_names
    labelled = table.num_rows - table["label"].null_count
    assert 0 < labelled < table.num_rows
    assert f"wrote {table.num_rows} rows ({labelled} labelled)" in capsys.readouterr().out


# --- a real browser -----------------------------------------------------------------


@pytest.mark.slow
def test_html_renders_in_headless_chromium(data, report, tmp_path):
    names = ("chromium", "chromium-browser", "google-chrome")
    browser = next((shutil.which(b) for b in names if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH")
    page = tmp_path / "report.html"
    page.write_text(render_html(report, load_window(data["labelled"])), encoding="utf-8")
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000 and shot.read_bytes().startswith(b"\x89PNG")
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
        timeout=120,
    ).stdout  # fmt: skip
    assert dom.count("data:image/png;base64,") == 2 * len(FIGURE_IDS)
    assert 'id="roc"' in dom
