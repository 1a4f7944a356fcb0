"""perf/bench_shadow.py ``--smoke``: every number it promises exists and mirroring happened.

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


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_bench_shadow_smoke(models_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "perf" / "bench_shadow.py"), "--smoke", "--json"]
    command += ["--models", str(models_dir), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("throughput_cost_full", "p99_cost_full", "throughput_cost_10", "p99_cost_10"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["errors"] == 0 and summary["shadow_failed"] == 0
    assert summary["mirrored"] > 0  # the 10% and 100% runs really mirrored
    for rate in ("off", "10%", "100%"):
        assert summary["by_rate"][rate]["rps"] > 0
    assert (tmp_path / "out" / "bench_shadow.json").is_file()
    assert list((tmp_path / "out" / "shadow" / "records").glob("part-*.parquet"))
    assert not (models_dir / ".shadow" / "records").exists()  # no records in the models
