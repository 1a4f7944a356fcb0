"""Where a build came from: code commit, library versions, exact requirements."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Libraries whose versions can change a model's bytes or its predictions.
TRACKED_LIBRARIES = (
    "riskwire",
    "numpy",
    "numba",
    "llvmlite",
    "lightgbm",
    "pyarrow",
    "scipy",
    "grpcio",
    "protobuf",
    "opentelemetry-sdk",
)
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str]:
    """Installed versions of the tracked libraries (missing ones are left out)."""
    found = {}
    for name in TRACKED_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def requirements_txt() -> str:
    """Exact pins for requirements.txt (riskwire itself is pinned by version too)."""
    lines = [f"{name}=={ver}" for name, ver in sorted(library_versions().items())]
    return "# exact versions this package was built with\n" + "\n".join(lines) + "\n"


def code_version() -> dict[str, object]:
    """Git commit of the riskwire source tree and whether it had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=_SOURCE_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def python_version() -> str:
    """The running Python version, e.g. ``3.11.7``."""
    return platform.python_version()
