"""``perf/bench_kernels.py --smoke --json`` runs, reports every number, and is correct.

No timing assertions: only that the numbers exist and are positive and finite, and
that the benchmark's own predictions agree with LightGBM.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "bench_kernels.py"
HAS_TL2CGEN = importlib.util.find_spec("tl2cgen") is not None


@pytest.fixture(scope="module")
def smoke_result() -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert "synthetic" in done.stdout  # says which model it measured
    return json.loads(lines[-1])


@pytest.mark.slow
def test_smoke_reports_positive_finite_numbers(smoke_result):
    keys = ["single_row_speedup_vs_lightgbm", "batch_ratio_vs_lightgbm"]
    keys += ["single_row_us_median_ours", "single_row_us_p99_ours"]
    keys += [f"batch_rows_per_s_ours_{size}" for size in (1, 64, 1024)]
    if HAS_TL2CGEN:
        keys += ["batch_ratio_vs_tl2cgen", "single_row_speedup_vs_tl2cgen"]
        keys += ["tl2cgen_max_abs_diff_vs_lightgbm"]
    for key in keys:
        assert key in smoke_result, key
    for key, value in smoke_result.items():
        if isinstance(value, float) and "diff" not in key:
            assert math.isfinite(value) and value > 0, (key, value)
    ratios = smoke_result["batch_ratio_vs_tl2cgen_by_size"] if HAS_TL2CGEN else {}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())


@pytest.mark.slow
def test_smoke_predictions_match_lightgbm(smoke_result):
    assert smoke_result["max_abs_diff_vs_lightgbm"] < 1e-9
    if HAS_TL2CGEN:  # reported, not held to LightGBM's exactness
        assert math.isfinite(smoke_result["tl2cgen_max_abs_diff_vs_lightgbm"])
