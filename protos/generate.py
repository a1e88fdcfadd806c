"""Regenerate the committed Python stubs for the wire contract.

Usage: python protos/generate.py [OUT_DIR]   (default: the repository root)

Writes guard/v1/guard_pb2.py, guard_pb2.pyi, guard_pb2_grpc.py and guard_pb2_grpc.pyi
under OUT_DIR. tests/test_protos.py regenerates into a temporary folder and fails when the
committed files differ, so edit protos/guard/v1/guard.proto and run `make protos`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "guard/v1/guard.proto"
PLUGIN_DIR = Path(sys.executable).parent


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with the mypy-protobuf plugins; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(PLUGIN_DIR)) or "protoc-gen-mypy"
    mypy_grpc_plugin = (
        shutil.which("protoc-gen-mypy_grpc", path=str(PLUGIN_DIR)) or "protoc-gen-mypy_grpc"
    )
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT / 'protos'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(ROOT / "protos" / PROTO),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    stem = out_dir / "guard" / "v1"
    return sorted(stem.glob("guard_pb2*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
