"""Regenerate the Python modules in protos/ from protos/proto/riskwire/protos/*.proto.

The generated files are committed (so installing riskwire needs no protoc) and a test
runs this generation into a temporary directory and fails when the committed copies
are stale. Usage: ``python scripts/gen_protos.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos" / "proto"
PROTO_DIR = PROTO_ROOT / "riskwire" / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py into out_dir; return the files."""
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *sources,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        produced = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "riskwire" / "protos").iterdir()):
            target = out_dir / path.name
            shutil.copyfile(path, target)
            produced.append(target)
        return produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "protos")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
