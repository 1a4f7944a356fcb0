"""The run registry: one JSON line per build in ``<models>/runs.jsonl``.

A run records its parameters, data hash, code version, library versions, metrics and
the package it produced, so any package can be traced back to how it was made, and a
build with the same config and data can be recognised and skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

RUNS_FILE = "runs.jsonl"


def append_run(root: Path, record: dict[str, Any]) -> None:
    """Append one run record (a single write under an exclusive lock, then fsync)."""
    root.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    with open(root / RUNS_FILE, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_runs(root: Path) -> list[dict[str, Any]]:
    """All run records, oldest first (a torn last line from a crash is skipped)."""
    path = root / RUNS_FILE
    if not path.exists():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def find_matching_run(
    root: Path, *, name: str, config_hash: str, data_sha256: str, parent: str | None = None
) -> dict[str, Any] | None:
    """The latest run of ``name`` with this config, data and parent (``NAME/VERSION`` or
    None) whose package still exists."""
    for run in reversed(read_runs(root)):
        if (
            run.get("name") == name
            and run.get("config_hash") == config_hash
            and run.get("data_sha256") == data_sha256
            and run.get("parent") == parent
            and Path(run.get("package_path", "")).is_dir()
        ):
            return run
    return None


def format_runs(runs: list[dict[str, Any]]) -> str:
    """A fixed-width table of runs for the terminal (``parent``: the model retrained)."""
    header = (
        f"{'run_id':<14} {'model':<10} {'ver':>4} {'parent':<14} {'roc_auc':>8} {'pr_auc':>8} "
        f"{'rows':>9}  {'data':<12} {'code':<12} built_at"
    )
    lines = [header]
    for run in runs:
        metrics = run.get("metrics", {})
        lines.append(
            f"{run.get('run_id', '?'):<14} {run.get('name', '?'):<10} "
            f"{run.get('version', '?'):>4} {run.get('parent') or '-':<14} "
            f"{metrics.get('roc_auc', float('nan')):>8.4f} "
            f"{metrics.get('pr_auc', float('nan')):>8.4f} {run.get('data_rows', 0):>9} "
            f" {run.get('data_sha256', '')[:12]:<12} {run.get('code_commit', '')[:12]:<12} "
            f"{run.get('built_at', '')}"
        )
    return "\n".join(lines)
