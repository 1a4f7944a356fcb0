"""The committed protos/*_pb2*.py* files are what scripts/gen_protos.py generates today.

Lines that only carry tool versions (protoc / grpcio-tools) are ignored, so a newer
grpcio-tools does not fail the check; anything else that differs means the .proto
sources changed without regenerating.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
SCRIPT = ROOT / "scripts" / "gen_protos.py"
HOW_TO_FIX = "regenerate with: python scripts/gen_protos.py  (then commit protos/*_pb2*)"

_VERSION_LINES = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)
_RUNTIME_CHECK = re.compile(
    r"(_runtime_version\.ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,)"
    r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
)


def normalise(text: str) -> str:
    """Generated code with the tool-version details blanked out."""
    for pattern in _VERSION_LINES:
        text = pattern.sub("<version line>", text)
    return _RUNTIME_CHECK.sub(r"\1 <runtime version>,", text)


def load_script() -> ModuleType:
    """scripts/gen_protos.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("riskwire_gen_protos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serialized_descriptor(path: Path) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers, read without importing."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            return ast.literal_eval(node.args[0])
    pytest.fail(f"{path}: no AddSerializedFile(...) call")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh generation into a temporary directory."""
    out = tmp_path_factory.mktemp("protos")
    produced = load_script().generate(out)
    assert produced, "gen_protos.generate produced no files"
    return out


def test_same_set_of_files(regenerated: Path) -> None:
    """Every generated file is committed and nothing generated-looking is extra."""
    fresh = sorted(p.name for p in regenerated.iterdir())
    committed = sorted(p.name for p in PROTOS.glob("*_pb2*.py*"))
    assert fresh == committed, f"generated {fresh} vs committed {committed}; {HOW_TO_FIX}"
    assert {"scoring_pb2.py", "scoring_pb2_grpc.py", "inference_pb2.py"} <= set(fresh)


def test_committed_code_is_up_to_date(regenerated: Path) -> None:
    """Each committed file equals the regenerated one, tool-version lines aside."""
    stale = []
    for fresh in sorted(regenerated.iterdir()):
        committed = PROTOS / fresh.name
        if not committed.exists():
            stale.append(f"{fresh.name}: missing")
            continue
        want, have = normalise(fresh.read_text()), normalise(committed.read_text())
        if want != have:
            diff = difflib.unified_diff(
                have.splitlines(), want.splitlines(), "committed", "regenerated", lineterm="", n=1
            )
            stale.append(f"{fresh.name}:\n" + "\n".join(list(diff)[:40]))
    assert not stale, f"stale generated code; {HOW_TO_FIX}\n" + "\n\n".join(stale)


@pytest.mark.parametrize("name", ["scoring_pb2.py", "inference_pb2.py"])
def test_embedded_descriptor_matches(regenerated: Path, name: str) -> None:
    """The serialized FileDescriptorProto in the committed module equals a fresh one."""
    assert serialized_descriptor(PROTOS / name) == serialized_descriptor(regenerated / name), (
        f"{name} embeds an outdated descriptor; {HOW_TO_FIX}"
    )


def test_imported_scoring_descriptor_matches(regenerated: Path) -> None:
    """What the installed riskwire.protos.scoring_pb2 registers is the fresh descriptor."""
    from riskwire.protos import scoring_pb2

    assert scoring_pb2.DESCRIPTOR.serialized_pb == serialized_descriptor(
        regenerated / "scoring_pb2.py"
    ), f"riskwire.protos.scoring_pb2 is stale; {HOW_TO_FIX}"
    assert scoring_pb2.DESCRIPTOR.name == "riskwire/protos/scoring.proto"
    assert scoring_pb2.DESCRIPTOR.package == "riskwire.v1"


def test_normalise_ignores_only_version_details() -> None:
    """The version filter blanks versions but keeps every other difference visible."""
    a = (
        "# Protobuf Python Version: 6.31.1\nGRPC_GENERATED_VERSION = '1.70.0'\n"
        "_runtime_version.ValidateProtobufRuntimeVersion(\n    _runtime_version.Domain.PUBLIC,"
        "\n    6,\n    31,\n    1,\n    '',\n    'riskwire/protos/scoring.proto'\n)\n"
    )
    b = a.replace("6.31.1", "7.35.1").replace("1.70.0", "1.85.1").replace("    31,", "    35,")
    assert normalise(a) == normalise(b)
    assert normalise(a) != normalise(a.replace("scoring.proto", "other.proto"))
