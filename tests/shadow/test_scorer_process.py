"""The shadow scorer process records exactly what the in-worker scorer thread records."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from riskwire.kernels.schema import NUM_FEATURES
from riskwire.shadow import scorer_process
from riskwire.shadow.config import ShadowConfig
from riskwire.shadow.mirror import MirrorSettings, PairRecorder, ShadowMirror, TargetSpec
from riskwire.shadow.records import read_records
from riskwire.shadow.scorer_process import ScorerProcess
from riskwire.shadow.targets import LocalTarget

FILTER_VALUES = ("ecommerce", "DE", "DE", "EUR", 5411, 120.0)
ROWS = 300


@pytest.fixture(scope="module")
def package_target(models_dir: Path) -> LocalTarget:
    """The demo package as a local shadow target (with its directory, for the process)."""
    path = sorted((models_dir / "fraud").iterdir())[-1]
    return TargetSpec(package_dir=str(path)).build()


def mirror_settings(root: Path) -> MirrorSettings:
    return MirrorSettings(
        records_dir=root / "records",
        stats_path=root / "stats.json",
        flush_seconds=0.05,
        batch_rows=64,
    )


def offer_traffic(mirror: ShadowMirror, features: np.ndarray) -> None:
    """Single calls and one batch call, as the data plane offers them."""
    for i in range(ROWS - 20):
        mirror.offer_one(
            "fraud", "1", f"req-{i}", f"tx-{i}", 1_700_000_000_000 + i, i * 7919,
            float(i % 100) / 100, "approve" if i % 3 else "review", 40.0,
            features[i].copy(), FILTER_VALUES, None, "client-a" if i % 2 else "",
        )  # fmt: skip
    rows = np.arange(20)
    mirror.offer_batch(
        "fraud", "1", "batch", [f"btx-{i}" for i in rows],
        np.full(20, 1_700_000_000_000), np.arange(20, dtype=np.uint64),
        np.linspace(0, 1, 20), np.array(["decline"] * 20, dtype=object), 900.0,
        features[ROWS - 20 :], {}, rows,
    )  # fmt: skip


def make_mirror(settings: MirrorSettings, target: LocalTarget, recorder) -> ShadowMirror:  # noqa: ANN001
    """A mirror of worker 0 shadowing to ``target`` through ``recorder``."""
    config = ShadowConfig(enabled=True, version=target.version)
    return ShadowMirror(
        0, settings, lambda name, version: target, "fraud", config, recorder=recorder
    )


def run_mirror(root: Path, target: LocalTarget, recorder) -> tuple:  # noqa: ANN001
    settings = mirror_settings(root)
    recorder = recorder(settings)
    mirror = make_mirror(settings, target, recorder)
    features = np.random.default_rng(3).normal(size=(ROWS, NUM_FEATURES)) * 50
    offer_traffic(mirror, features)
    mirror.start()
    mirror.stop(timeout_s=30)
    table = read_records(root).sort_by("request_id")
    return table, json.loads(settings.stats_path.read_text())


def test_process_records_equal_the_thread_records(package_target, tmp_path) -> None:
    thread, thread_stats = run_mirror(
        tmp_path / "thread", package_target, lambda s: PairRecorder(0, s)
    )
    process, process_stats = run_mirror(
        tmp_path / "process",
        package_target,
        lambda s: ScorerProcess(0, s, idle_priority=True),
    )
    assert thread.num_rows == process.num_rows == ROWS
    timing = {"primary_latency_us", "shadow_latency_us"}
    for name in thread.column_names:
        if name not in timing:
            assert process[name].to_pylist() == thread[name].to_pylist(), name
    assert all(v > 0 for v in process["shadow_latency_us"].to_pylist())
    assert process_stats["pid"] == os.getpid()  # the worker's, wherever the recorder runs
    assert process_stats["pairs"] == thread_stats["pairs"]
    assert process_stats["active"] and process_stats["queued"] == 0
    assert process_stats["records_written"] == ROWS
    segments = list((tmp_path / "process" / "records").glob(f"part-*-w0-{os.getpid()}-*"))
    assert segments  # named after the worker, not the scorer process


def test_a_killed_process_is_restarted_and_loses_no_row_of_the_ring(
    package_target, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(scorer_process, "RESTART_INTERVAL_S", 0.0)
    settings = mirror_settings(tmp_path)
    recorder = ScorerProcess(0, settings, idle_priority=False)
    mirror = make_mirror(settings, package_target, recorder)
    first = recorder.process_pid
    assert first is not None and recorder.restarts == 0
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while recorder._process.poll() is None and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    features = np.random.default_rng(4).normal(size=(ROWS, NUM_FEATURES))
    offer_traffic(mirror, features)  # into the ring, while no process runs
    mirror.start()
    mirror.stop(timeout_s=30)
    assert recorder.process_pid not in (None, first)
    assert recorder.restarts == 1
    stats = json.loads(settings.stats_path.read_text())
    (pair,) = stats["pairs"]
    # The new process took over the ring where the dead one stopped.
    assert read_records(tmp_path).num_rows == pair["stats"]["mirrored"] == ROWS
    assert pair["stats"]["dropped"] == 0
