"""perf/bench_auth.py ``--smoke``: every number it promises exists, no request failed.

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
def test_bench_auth_smoke(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "perf" / "bench_auth.py"), "--smoke", "--json"]
    command += ["--models", str(models_dir), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("throughput_cost", "p99_cost"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["errors"] == 0
    for mode in ("off", "on"):
        row = summary["by_mode"][mode]
        for key in ("rps", "p99_ms"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
    on_log = (out / "riskwire-on-r1.log").read_text()
    key = json.loads((out / "keys.json").read_text())["keys"][0]
    assert key["key_id"] and "UNAUTHENTICATED" not in on_log
    assert json.loads((out / "bench_auth.json").read_text())["errors"] == 0
