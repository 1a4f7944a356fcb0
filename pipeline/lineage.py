"""Model lineage: which model a build retrains, and on which window of data.

``riskwire build --parent fraud/7`` names the package the new model replaces. The build
records the reference in the package metadata (``lineage``), the model card and the run
registry; when the parent package is in the models directory it is verified and its
manifest SHA-256 and training data (hash and event-time window) are recorded too, so a
chain of retrains can be followed back even after old packages are deleted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BuildConfigError
from .package import manifest_sha256, verify_package

# Model names as the registry and governance accept them; versions are positive integers.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class ModelRef:
    """A model version named as ``NAME/VERSION``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    def path(self, root: Path) -> Path:
        """The package directory of this version under the models directory ``root``."""
        return root / self.name / str(self.version)


def parse_model_ref(text: str) -> ModelRef:
    """``"fraud/7"`` → ``ModelRef("fraud", 7)``; anything else is a BuildConfigError."""
    name, sep, version = str(text).strip().partition("/")
    if not sep or not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        raise BuildConfigError(
            f"parent model {text!r} is not NAME/VERSION (for example fraud/7): NAME is "
            "letters, digits, '.', '_' or '-', VERSION a positive integer"
        )
    return ModelRef(name, int(version))


def data_window(first_event_time: str, last_event_time: str) -> dict[str, str]:
    """The event-time window of a data set (ISO-8601 UTC, inclusive)."""
    return {"first_event_time": first_event_time, "last_event_time": last_event_time}


def lineage_record(root: Path, parent: ModelRef | None, window: dict[str, str]) -> dict[str, Any]:
    """The ``lineage`` entry of metadata.json and of the run registry.

    ``window`` is the training data's event-time window. A parent package present under
    ``root`` must pass its manifest check (a tampered parent is refused); a parent that
    is not there is recorded by name and version only (``found: false``).
    """
    return {"parent": _parent_record(root, parent), "data_window": window}


def _parent_record(root: Path, parent: ModelRef | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    record: dict[str, Any] = {"name": parent.name, "version": parent.version, "found": False}
    path = parent.path(root)
    if not path.is_dir():
        return record
    verify_package(path)
    metadata = json.loads((path / "metadata.json").read_text())
    data = metadata.get("data", {})
    record.update(
        found=True,
        manifest_sha256=manifest_sha256(path),
        data_sha256=data.get("sha256"),
        data_window=data_window(data.get("first_event_time"), data.get("last_event_time")),
        built_at=metadata.get("build", {}).get("built_at"),
    )
    return record
