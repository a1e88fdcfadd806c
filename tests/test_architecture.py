"""The floor plan's rules that the import contracts alone cannot see.

The contracts themselves live in pyproject.toml ([tool.importlinter]) and run as
``make contracts``. These tests keep them complete (a new room of ``guard`` must be named in
the plugins' contract) and check what only a running interpreter shows: the modules that
``guard serve`` loads, lazy imports included, never pull in torch or transformers.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import guard

ROOT = Path(__file__).resolve().parents[1]


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_the_plugins_contract_names_every_room_of_guard() -> None:
    (plugins,) = [c for c in contracts() if c["source_modules"] == ["guard_plugins"]]
    forbidden = plugins["forbidden_modules"]
    assert isinstance(forbidden, list)
    rooms = {f"guard.{m.name}" for m in pkgutil.iter_modules(guard.__path__)
             if m.name not in {"__main__"}}
    missing = sorted(rooms - set(forbidden))
    assert missing == [], (
        f"pyproject.toml: the contract {plugins['name']!r} must forbid {missing} "
        "(plugins import only `from guard import ...`)")


def test_every_sidecar_room_is_in_the_torch_free_contract() -> None:
    (sidecar,) = [c for c in contracts() if str(c["name"]).startswith("The sidecar path")]
    sources = sidecar["source_modules"]
    assert isinstance(sources, list)
    for room in ("guard.wire", "guard.sidecar", "guard.engine", "guard.telemetry", "guard.sae",
                 "guard.config", "guard.settings"):
        assert room in sources, f"pyproject.toml: {sidecar['name']!r} must cover {room}"


def test_guard_serve_loads_no_torch_even_through_lazy_imports() -> None:
    # The CLI registers every command group (demo and audit included) before it serves, so
    # the parser's imports count as much as the server's.
    code = (
        "import sys\n"
        "from guard.cli import build_parser\n"
        "build_parser()\n"
        "import guard.sidecar.server, guard.sidecar.reload, guard.engine.core\n"
        "import guard.telemetry.setup, guard.sae\n"
        "bad = [m for m in ('torch', 'transformers', 'guard.training.train', 'guard.host',\n"
        "                   'guard.demo.chat_server', 'pytest') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
