"""perf/cpu_split.py: the perf-report and /proc parsers, and a short run of both servers.

No timing assertions: the run checks that every row exists, that both servers answered
every call at the fixed rate and that their CPU per request is positive.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

cpu_split = importlib.import_module("perf.cpu_split")

PERF_REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
    48.54%  libpython3.11.so.1.0
    20.67%  [kernel.kallsyms]
    17.39%  cygrpc.cpython-311-x86_64-linux-gnu.so
     4.19%  [JIT] tid 9282
     3.50%  libc.so.6
     1.58%  _multiarray_umath.cpython-311-x86_64-linux-gnu.so
     1.33%  _dispatcher.cpython-311-x86_64-linux-gnu.so
     0.86%  [vdso]
     0.30%  _pickle.cpython-311-x86_64-linux-gnu.so
"""


def test_parse_perf_report_groups_dsos_by_code_kind() -> None:
    shares = cpu_split.parse_perf_report(PERF_REPORT)
    expected = {
        "Python interpreter": 0.4854,
        "kernel": 0.2067,
        "grpc core": 0.1739,
        "Numba kernels (JIT code)": 0.0419,
        "libc": 0.0436,
        "NumPy": 0.0158,
        "Numba dispatcher": 0.0133,
        "other": 0.0030,
    }
    assert shares == pytest.approx(expected)
    assert sum(shares.values()) == pytest.approx(0.9836)


def test_cpu_rows_take_each_workers_busiest_thread_as_its_serving_thread() -> None:
    tick = cpu_split.os.sysconf("SC_CLK_TCK")
    before = {
        (10, 10): ("supervisor", 5),
        (11, 11): ("worker", 0),
        (11, 12): ("worker", 0),
        (11, 13): ("worker", 0),
        (21, 21): ("worker", 0),
        (21, 22): ("worker", 0),
        (30, 30): ("helper", 1),
    }
    after = {
        (10, 10): ("supervisor", 5 + tick),
        (11, 11): ("worker", tick),
        (11, 12): ("worker", 8 * tick),
        (11, 13): ("worker", 2 * tick),
        (21, 21): ("worker", 6 * tick),
        (21, 22): ("worker", tick),
        (21, 23): ("worker", tick),  # a thread started inside the window counts whole
        (30, 30): ("helper", 1 + 3 * tick),
    }
    rows = cpu_split.cpu_rows(before, after)
    assert rows == {
        "worker serving threads": pytest.approx(14.0),
        "worker other threads": pytest.approx(5.0),
        "helper processes": pytest.approx(3.0),
        "supervisor": pytest.approx(1.0),
    }


def test_group_threads_finds_this_process_by_its_group() -> None:
    import os

    threads = cpu_split.group_threads(os.getpgrp())
    mine = [key for key in threads if key[0] == os.getpid()]
    assert (os.getpid(), os.getpid()) in mine
    assert all(role in ("worker", "supervisor", "helper") for role, _ in threads.values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_cpu_split_short_run(models_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "perf" / "cpu_split.py"), "--json", "--perf", "off"]
    command += ["--rate", "400", "--warmup", "1", "--duration", "2"]
    command += ["--models", str(models_dir), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["servers"]) == {"echo", "riskwire"}, output
    for name, result in summary["servers"].items():
        assert result["h2load_errors"] == result["grpc_errors"] == 0, (name, result)
        assert "check" not in result, (name, result)
        assert result["rps"] > 300, (name, result)  # the fixed rate was served
        assert set(result["rows"]) == set(cpu_split.ROWS), (name, result)
        assert result["rows"]["worker serving threads"] > 0, (name, result)
        assert result["cpu_us_per_request"] == pytest.approx(sum(result["rows"].values()), 0.01)
        assert "code" not in result  # --perf off
    assert summary["cpu_ratio"] > 0
    assert "riskwire / echo CPU per request" in done.stdout
