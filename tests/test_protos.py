"""The committed stubs match a fresh generation from protos/guard/v1/guard.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generate(out: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files: list[Path] = module.generate(out)
    return files


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    fresh = _generate(tmp_path)
    assert {f.name for f in fresh} == {
        "guard_pb2.py", "guard_pb2.pyi", "guard_pb2_grpc.py", "guard_pb2_grpc.pyi"
    }
    stale = [
        f.name
        for f in fresh
        if (ROOT / "guard" / "v1" / f.name).read_bytes() != f.read_bytes()
    ]
    assert not stale, f"stubs out of date: {stale}; run `make protos` and commit the result"
