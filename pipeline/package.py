"""The model package: write it atomically, verify its manifest, load it without running code.

Layout (see DESIGN.md)::

    models/<name>/<version>/
      model.txt  forest.npz  schema.json  profile.json  metrics.json  metadata.json
      card.md    requirements.txt         MANIFEST.sha256

``MANIFEST.sha256`` lists ``<sha256>  <file>`` for every other file, in the format of
``sha256sum``, so ``sha256sum -c MANIFEST.sha256`` checks a package by hand too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskwire.kernels.forest import Forest

from .errors import PackageIntegrityError

PACKAGE_FORMAT = 1
MANIFEST_NAME = "MANIFEST.sha256"
PACKAGE_FILES = (
    "model.txt",
    "forest.npz",
    "schema.json",
    "profile.json",
    "metrics.json",
    "metadata.json",
    "card.md",
    "requirements.txt",
)


@dataclass(frozen=True)
class ModelPackage:
    """A verified, loaded model package."""

    path: Path
    name: str
    version: int
    forest: Forest
    schema: dict[str, Any]
    profile: dict[str, Any]
    metrics: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def thresholds(self) -> dict[str, Any]:
        """Decision thresholds (``review``, ``decline``) stored by the build."""
        return self.metadata["thresholds"]


def models_dir(explicit: str | Path | None = None) -> Path:
    """The models directory: explicit argument > ``RISKWIRE_MODELS`` > ``./models``."""
    return Path(explicit or os.environ.get("RISKWIRE_MODELS") or "models")


def manifest_text(directory: Path, names: tuple[str, ...] = PACKAGE_FILES) -> str:
    """sha256sum-style manifest of the named files, sorted by name."""
    lines = [f"{_sha256(directory / name)}  {name}" for name in sorted(names)]
    return "\n".join(lines) + "\n"


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of a package's MANIFEST.sha256: one hash that pins every file of it."""
    return _sha256(Path(path) / MANIFEST_NAME)


def list_versions(root: Path, name: str) -> list[int]:
    """Integer versions present under ``root/name`` (ascending)."""
    base = root / name
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def write_package(root: Path, name: str, files: Mapping[str, bytes | Any]) -> tuple[int, Path]:
    """Write a package as the next integer version of ``name``; return (version, path).

    ``files`` maps each of :data:`PACKAGE_FILES` to bytes, or to a callable that takes
    the version number and returns bytes (for files that record their own version).
    Files are written into a temporary directory beside the target and renamed into
    place under a lock, so readers never see a half-written package.
    """
    missing = [f for f in PACKAGE_FILES if f not in files]
    if missing:
        raise ValueError(f"package is missing {', '.join(missing)}")
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / ".lock"):
        version = (list_versions(root, name) or [0])[-1] + 1
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=base))
        try:
            for file_name in PACKAGE_FILES:
                content = files[file_name]
                data = content(version) if callable(content) else content
                (staging / file_name).write_bytes(data)
            (staging / MANIFEST_NAME).write_text(manifest_text(staging))
            _fsync_dir(staging)
            target = base / str(version)
            os.rename(staging, target)
            _fsync_dir(base)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return version, target


def verify_package(path: str | Path) -> dict[str, str]:
    """Check MANIFEST.sha256 against the files; return {file: sha256}.

    Raises PackageIntegrityError naming the first missing, extra or altered file.
    """
    path = Path(path)
    if not path.is_dir():
        raise PackageIntegrityError(f"{path}: no model package here (not a directory)")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageIntegrityError(f"{path}: {MANIFEST_NAME} is missing")
    expected: dict[str, str] = {}
    for number, line in enumerate(manifest_path.read_text().splitlines(), start=1):
        digest, sep, file_name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise PackageIntegrityError(f"{manifest_path}: line {number} is malformed")
        expected[file_name] = digest
    for file_name in PACKAGE_FILES:
        if file_name not in expected:
            raise PackageIntegrityError(f"{path}: {file_name} is not listed in {MANIFEST_NAME}")
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST_NAME}
    extra = sorted(present - set(expected))
    if extra:
        raise PackageIntegrityError(f"{path}: unexpected file {extra[0]} (not in the manifest)")
    for file_name, digest in expected.items():
        file_path = path / file_name
        if not file_path.is_file():
            raise PackageIntegrityError(f"{path}: {file_name} is missing")
        if _sha256(file_path) != digest:
            raise PackageIntegrityError(
                f"{path}: {file_name} does not match its SHA-256 in {MANIFEST_NAME} "
                "(the file was altered or corrupted)"
            )
    return expected


def load_package(path: str | Path) -> ModelPackage:
    """Verify and load a package. Nothing in it is executed: JSON, text and plain arrays."""
    path = Path(path)
    verify_package(path)
    metadata = _read_json(path / "metadata.json")
    if metadata.get("package_format") != PACKAGE_FORMAT:
        raise PackageIntegrityError(
            f"{path}: package format {metadata.get('package_format')!r} is not supported "
            f"(this riskwire reads format {PACKAGE_FORMAT})"
        )
    try:
        forest = Forest.load(path / "forest.npz")
    except (ValueError, KeyError, OSError) as exc:
        raise PackageIntegrityError(f"{path}: forest.npz cannot be loaded: {exc}") from exc
    return ModelPackage(
        path=path,
        name=metadata["name"],
        version=int(metadata["version"]),
        forest=forest,
        schema=_read_json(path / "schema.json"),
        profile=_read_json(path / "profile.json"),
        metrics=_read_json(path / "metrics.json"),
        metadata=metadata,
    )


def canonical_json(value: Any) -> bytes:
    """Deterministic, human-readable JSON bytes (sorted keys, fixed indentation)."""
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageIntegrityError(f"{path}: not valid JSON: {exc}") from exc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
