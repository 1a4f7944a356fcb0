"""perf/bench_prediction_log.py ``--smoke``: every number it promises exists, the log was on.

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
def test_bench_prediction_log_smoke(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "perf" / "bench_prediction_log.py"), "--smoke"]
    command += ["--json", "--models", str(models_dir), "--out", str(out)]
    before = sorted(p.name for p in models_dir.iterdir())
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("cost_default", "cost_rate_10", "p99_cost_default", "p99_cost_rate_10"):
        assert _finite(summary[key]), key
    for variant in ("baseline", "default", "rate_10"):
        for key in ("rps", "p50_ms", "p99_ms"):
            assert _finite(summary[f"{key}_{variant}"]), (variant, key)
            assert summary[f"{key}_{variant}"] > 0, (variant, key)
        assert summary["by_variant"][variant]["requests"] > 0
        assert (out / f"riskwire-{variant}-r1.log").is_file()
    assert summary["errors"] == 0 and summary["problems"] == [], output
    # the log was on by default (its sample of the measured calls), off in the baseline
    assert isinstance(summary["rows_logged"], int) and summary["rows_logged"] > 0
    assert 0 < summary["rows_logged_measured"] <= summary["requests_default"]
    assert summary["by_variant"]["baseline"]["rows"] == 0
    assert summary["by_variant"]["baseline"]["cases"] == 0
    assert list((out / "shadow" / "default-r1" / "predictions").glob("*.parquet"))
    assert not (out / "shadow" / "baseline-r1" / "predictions").exists()
    assert summary["config"]["rounds"] == 1 and "machine" in summary["config"]
    assert json.loads((out / "bench_prediction_log.json").read_text())["errors"] == 0
    assert sorted(p.name for p in models_dir.iterdir()) == before  # logs stay in out/
