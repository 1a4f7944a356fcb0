"""Package writing and verification: atomic versions, tamper detection."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from riskwire.pipeline.errors import PackageIntegrityError
from riskwire.pipeline.package import (
    MANIFEST_NAME,
    PACKAGE_FILES,
    list_versions,
    models_dir,
    verify_package,
    write_package,
)


def fake_files() -> dict:
    files: dict = {name: f"content of {name}\n".encode() for name in PACKAGE_FILES}
    files["metadata.json"] = lambda version: f'{{"version": {version}}}'.encode()
    return files


def test_versions_increase_and_manifest_verifies(tmp_path: Path) -> None:
    v1, p1 = write_package(tmp_path, "fraud", fake_files())
    v2, p2 = write_package(tmp_path, "fraud", fake_files())
    assert (v1, v2) == (1, 2) and p2 == tmp_path / "fraud" / "2"
    assert (p2 / "metadata.json").read_text() == '{"version": 2}'
    hashes = verify_package(p2)
    assert set(hashes) == set(PACKAGE_FILES)
    assert list_versions(tmp_path, "fraud") == [1, 2]
    # no staging directories left behind
    assert sorted(p.name for p in (tmp_path / "fraud").iterdir() if p.is_dir()) == ["1", "2"]


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    versions: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: versions.append(write_package(tmp_path, "m", fake_files())[0])
        )
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("tamper", "pattern"),
    [
        (lambda p: (p / "model.txt").write_text("evil"), "model.txt does not match"),
        (lambda p: (p / "profile.json").unlink(), "profile.json is missing"),
        (lambda p: (p / "payload.py").write_text("import os"), "unexpected file payload.py"),
        (lambda p: (p / MANIFEST_NAME).unlink(), "MANIFEST.sha256 is missing"),
        (lambda p: (p / MANIFEST_NAME).write_text("garbage\n"), "line 1 is malformed"),
        (
            lambda p: (p / MANIFEST_NAME).write_text(
                "\n".join(
                    line
                    for line in (p / MANIFEST_NAME).read_text().splitlines()
                    if not line.endswith("card.md")
                )
            ),
            "card.md is not listed",
        ),
    ],
)
def test_tampered_packages_are_refused_naming_the_file(tmp_path: Path, tamper, pattern) -> None:
    _, path = write_package(tmp_path, "fraud", fake_files())
    tamper(path)
    with pytest.raises(PackageIntegrityError, match=pattern):
        verify_package(path)


def test_write_refuses_incomplete_file_set(tmp_path: Path) -> None:
    files = fake_files()
    del files["card.md"]
    with pytest.raises(ValueError, match="card.md"):
        write_package(tmp_path, "fraud", files)
    assert list_versions(tmp_path, "fraud") == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    files = fake_files()
    files["card.md"] = lambda version: 1 / 0
    with pytest.raises(ZeroDivisionError):
        write_package(tmp_path, "fraud", files)
    assert [p for p in (tmp_path / "fraud").iterdir() if p.is_dir()] == []


def test_models_dir_resolution(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RISKWIRE_MODELS", raising=False)
    assert models_dir() == Path("models")
    monkeypatch.setenv("RISKWIRE_MODELS", str(tmp_path))
    assert models_dir() == tmp_path
    assert models_dir("explicit") == Path("explicit")
