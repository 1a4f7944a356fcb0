"""`make demo-loop` (scripts/demo_loop.py) end to end: synth → build → serve → shadow →
traffic → labels → export → retrain → compare → canary → promote or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo_loop.py"


def run_demo(work: Path, *sizes: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(work), "--json", *sizes],
        env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_outcome(outcome: dict, work: Path) -> None:
    exported = outcome["exported"]
    assert exported["rows"] > 0 and exported["fraud"] > 0
    assert exported["from_review"] > 0 and outcome["reviewed_cases"] > 0
    assert exported["median_label_latency_s"] > 0  # labels came after the transactions
    assert outcome["verdict"] in (
        "challenger better",
        "champion better",
        "no significant difference",
    )
    assert outcome["promoted"] == (outcome["verdict"] == "challenger better")
    assert outcome["primary"].startswith("fraud: primary v" + ("3" if outcome["promoted"] else "1"))
    metadata = json.loads((work / "models" / "fraud" / "3" / "metadata.json").read_text())
    assert metadata["lineage"]["parent"]["version"] == 1
    assert metadata["data"]["features"] == "served"
    assert (work / "shadow-report.html").stat().st_size > 0


@pytest.mark.slow
def test_demo_loop_short(tmp_path: Path) -> None:
    """A small version of the walk-through (CI)."""
    work = tmp_path / "demo"
    sizes = ["--history-rows", "15000", "--live-rows", "20000", "--holdout-rows", "10000"]
    outcome = run_demo(work, *sizes, "--rounds", "60", "--bootstrap", "100")
    check_outcome(outcome, work)


@pytest.mark.load
def test_demo_loop_full(tmp_path: Path) -> None:
    """The walk-through at `make demo-loop`'s sizes."""
    work = tmp_path / "demo"
    check_outcome(run_demo(work), work)
