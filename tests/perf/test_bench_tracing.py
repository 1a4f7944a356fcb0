"""perf/bench_tracing.py ``--smoke``: every number it promises exists, every call was traced.

No timing assertions: the costs are printed, not checked.
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


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_bench_tracing_smoke(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "perf" / "bench_tracing.py"), "--smoke", "--json"]
    command += ["--models", str(models_dir), "--out", str(out)]
    before = sorted(p.name for p in models_dir.iterdir())
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in (
        "throughput_cost_default",
        "throughput_cost_full",
        "p99_cost_default",
        "p99_cost_full",
    ):
        assert _finite(summary[key]), key
    assert summary["errors"] == 0 and summary["problems"] == []
    for mode in ("off", "default", "full"):
        row = summary["by_mode"][mode]
        for key in ("rps", "p50_ms", "p99_ms"):
            assert _finite(row[key]) and row[key] > 0, (mode, key)
        assert row["errors"] == 0 and row["requests"] > 0
        assert (out / f"riskwire-{mode}-r1.log").is_file()
    # 100% sampling: a span for every measured call; tracing off: no span file at all
    assert summary["spans_full"] > 0
    assert summary["spans_full_measured"] >= 0.99 * summary["requests_full"] > 0
    assert summary["by_mode"]["off"]["spans"] == 0 and summary["span_files_off"] == 0
    assert not list((out / "traces" / "off-r1").glob("spans-*.jsonl"))
    assert list((out / "traces" / "full-r1").glob("spans-*.jsonl"))
    assert summary["config"]["rounds"] == 1 and "machine" in summary["config"]
    assert json.loads((out / "bench_tracing.json").read_text())["errors"] == 0
    assert sorted(p.name for p in models_dir.iterdir()) == before  # spans stay in out/
