"""perf/bench_state.py: its counter parsing, and a ``--smoke`` run: every number it promises
exists, the Redis store made at least one round trip per request, no request failed.

No timing assertions: the ratios are printed, not checked.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf import bench_state, loadgen  # noqa: E402

METRICS = """\
# HELP riskwire_state_calls Feature-state updates (one per scoring call)
# TYPE riskwire_state_calls counter
riskwire_state_calls_total{backend="redis"} 100.0
riskwire_state_calls_total{backend="other"} 20.0
# HELP riskwire_state_round_trips Round trips to the state store
# TYPE riskwire_state_round_trips counter
riskwire_state_round_trips_total{backend="redis"} 130.0
riskwire_state_round_trips_total{backend="other"} 20.0
# HELP riskwire_state_conflicts Card writes retried
# TYPE riskwire_state_conflicts counter
riskwire_state_conflicts_total{backend="redis"} 30.0
# HELP riskwire_state_degraded Calls scored without state
# TYPE riskwire_state_degraded counter
riskwire_state_degraded_total{backend="redis"} 0.0
# HELP riskwire_requests Calls
# TYPE riskwire_requests counter
riskwire_requests_total{rpc_method="Score",rpc_grpc_status_code="0"} 118.0
riskwire_requests_total{rpc_method="Score",rpc_grpc_status_code="14"} 2.0
riskwire_requests_total{rpc_method="ScoreBatch",rpc_grpc_status_code="3"} 5.0
# HELP riskwire_queue_depth Items waiting
# TYPE riskwire_queue_depth gauge
riskwire_queue_depth{queue="shadow"} 3.0
"""


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_counter_totals_sums_label_sets() -> None:
    totals = bench_state.counter_totals(METRICS)
    assert totals == {
        "calls": 120.0,
        "round_trips": 150.0,
        "conflicts": 30.0,
        "degraded": 0.0,
        "requests": 120.0,  # Score only
        "failed": 2.0,
        "failed_status_14": 2.0,
    }
    assert bench_state.failures_by_status(totals) == "UNAVAILABLE 2"


def test_counter_totals_without_state_series() -> None:
    # the local store publishes no state counters: nothing to divide by
    text = 'riskwire_requests_total{rpc_method="Score",rpc_grpc_status_code="0"} 7.0\n'
    totals = bench_state.counter_totals(text)
    assert totals == {"requests": 7.0}
    assert bench_state.per_call(totals, "round_trips") is None
    assert bench_state.failures_by_status(totals) == ""
    assert bench_state.counter_totals("") == {}


def test_counter_change_and_per_call() -> None:
    before = bench_state.counter_totals(METRICS)
    after = {**before, "calls": 220.0, "round_trips": 260.0, "conflicts": 40.0}
    change = bench_state.counter_change(before, after)
    assert change["calls"] == 100.0 and change["round_trips"] == 110.0
    assert change["failed"] == 0.0
    assert bench_state.per_call(change, "round_trips") == pytest.approx(1.1)
    assert bench_state.per_call(change, "conflicts") == pytest.approx(0.1)
    assert bench_state.per_call({"calls": 0.0, "round_trips": 0.0}, "round_trips") is None
    # a counter first seen after the start counts from zero
    assert bench_state.counter_change({}, {"calls": 5.0}) == {"calls": 5.0}


def test_card_bodies_are_distinct_cards(tmp_path: Path) -> None:
    from riskwire.protos import scoring_pb2

    bodies = loadgen.prepare_bodies(tmp_path, batch_rows=1)
    cards = bench_state.card_bodies(bodies, 6, tmp_path)

    def card(message: bytes) -> str:
        return scoring_pb2.ScoreRequest.FromString(message).transaction.card_id

    ids = [card(b.messages[loadgen.SCORE]) for b in cards]
    assert len(set(ids)) == 6 and card(bodies.messages[loadgen.SCORE]) not in ids
    for body in cards:  # h2load sends exactly the message the checks use
        assert loadgen.grpc_unframe(body.score.read_bytes()) == body.messages[loadgen.SCORE]


def test_skips_without_tools(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr(loadgen, "find_tool", lambda name: None)
    assert bench_state.main(["--smoke", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "redis-server not found" in summary["skipped"] and "h2load" in summary["skipped"]
    assert summary["rps_redis"] is None and summary["round_trips_per_request"] is None
    assert "skipped" in captured.err


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing")
def test_bench_state_smoke(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # One connection: no two calls race for a card (at 2+ on one card, Redis's optimistic
    # writes can lose max_attempts times in a row and fail a call: the bench reports it).
    command = [sys.executable, str(REPO / "perf" / "bench_state.py"), "--smoke", "--json"]
    command += ["--concurrency", "1", "--models", str(models_dir), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in bench_state.REQUIRED_KEYS:
        assert _finite(summary[key]), (key, output)
    assert summary["round_trips_per_request"] >= 1
    assert summary["errors"] == 0 and summary["failed_server_side"] == 0
    assert summary["problems"] == [] and summary["skipped"] is None
    for scenario in bench_state.SCENARIOS:
        row = summary["scenarios"][scenario]
        assert row["round_trips_per_request"] >= 1 and _finite(row["round_trips_per_request"])
        counters = row["counters_redis"]
        assert counters["calls"] > 0 and counters["degraded"] == 0 and not counters.get("failed")
        for variant in bench_state.VARIANTS:
            assert row[f"rps_{variant}"] > 0 and row[f"errors_{variant}"] == 0
            assert row[f"failed_{variant}"] == 0
            assert row[f"counters_{variant}"]["requests"] > 0  # the server saw the calls
    for variant in bench_state.VARIANTS:
        assert (out / f"riskwire-{variant}-r1.log").is_file()
    assert json.loads((out / "bench_state.json").read_text())["errors"] == 0
    assert "ready to exit" in (out / "redis.log").read_text()  # the bench stopped its Redis
