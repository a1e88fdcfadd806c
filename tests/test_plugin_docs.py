"""The plugin guide (docs/plugins.md) keeps up with the hook specs, and every hook has a test
(as datasette's test_docs and test_plugin_hooks_have_tests do)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import guard
from guard import hookspecs
from guard.config import PluginsConfig
from guard.engine.plugins import AUTOLOAD_ENV, PluginSet

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "plugins" / "example-detector"


def hook_specs() -> dict[str, Callable[..., Any]]:
    """The hook specifications: the functions that carry pluggy's ``guard_spec`` marker."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: spec for name, spec in vars(hookspecs).items()
            if callable(spec) and hasattr(spec, marker)}


HOOKS = sorted(hook_specs())


@cache
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


@cache
def sections() -> dict[str, str]:
    """``### guard_x`` heading -> the text up to the next heading."""
    parts = re.split(r"^(#{2,3} .+)$", guide(), flags=re.MULTILINE)
    return {heading[4:].strip(): body for heading, body in zip(parts[1::2], parts[2::2],
                                                                 strict=True)
            if heading.startswith("### guard_")}


def signature_text(name: str) -> str:
    """``guard_x(a: T) -> R`` as the spec declares it (annotations are strings here)."""
    signature = inspect.signature(hook_specs()[name])

    def text(annotation: object) -> str:
        return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    parameters = ", ".join(f"{p.name}: {text(p.annotation)}"
                           for p in signature.parameters.values())
    return f"{name}({parameters}) -> {text(signature.return_annotation)}"


def test_the_spec_functions_are_the_plugin_managers_hooks() -> None:
    assert PluginSet.hook_names() == HOOKS
    assert all(name.startswith("guard_") for name in HOOKS)


def test_every_hook_spec_has_a_docstring() -> None:
    undocumented = [name for name, spec in hook_specs().items() if not inspect.getdoc(spec)]
    assert undocumented == []


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook: str) -> None:
    assert hook in sections(), f"docs/plugins.md has no '### {hook}' section"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_section_has_the_signature_parameters_and_an_example(hook: str) -> None:
    body = sections().get(hook, "")
    assert f"```python\n{signature_text(hook)}\n```" in body, (
        f"the section of {hook} must show its signature as `{signature_text(hook)}`")
    for parameter in inspect.signature(hook_specs()[hook]).parameters:
        assert f"- `{parameter}`:" in body, f"{hook}: parameter {parameter!r} is not described"
    assert re.search(rf"@hookimpl\n(?:    )?def {hook}\(", body), f"{hook} has no example"


def test_no_section_documents_a_hook_that_does_not_exist() -> None:
    assert sorted(sections()) == HOOKS


def test_the_guides_python_examples_parse() -> None:
    blocks = re.findall(r"```python\n(.*?)```", guide(), flags=re.DOTALL)
    signatures = [b for b in blocks if re.fullmatch(r"guard_\w+\(.*\) -> .+\n", b)]
    assert len(signatures) == len(HOOKS)
    examples = [b for b in blocks if b not in signatures]
    assert len(examples) > len(HOOKS)
    for block in examples:
        ast.parse(block)


@pytest.mark.parametrize("name", [n for n in guard.__all__ if n not in ("__version__",)])
def test_every_public_name_is_documented(name: str) -> None:
    assert re.search(rf"\b{name}\b", guide()), f"guard.{name} is not in docs/plugins.md"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(PluginsConfig)])
def test_every_plugins_setting_is_documented(field: str) -> None:
    assert f"`plugins.{field}" in guide(), f"plugins.{field} is not in docs/plugins.md"


def test_the_autoload_variable_is_documented() -> None:
    assert f"`{AUTOLOAD_ENV}=1`" in guide()


def test_the_guide_shows_the_example_packages_entry_point() -> None:
    line = 'example_detector = "guard_example_detector:ExampleDetector"'
    assert line in guide()
    assert line in (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")


def implemented_hooks(path: Path) -> set[str]:
    """Names of the ``@hookimpl`` (or ``@guard.hookimpl(...)``) functions in a test file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("guard_"):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                name = target.attr if isinstance(target, ast.Attribute) else (
                    target.id if isinstance(target, ast.Name) else "")
                if name == "hookimpl":
                    found.add(node.name)
    return found


@cache
def hooks_with_tests() -> set[str]:
    tests = Path(__file__).resolve().parent
    return set().union(*(implemented_hooks(p) for p in sorted(tests.rglob("test_*.py"))))


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook: str) -> None:
    assert hook in hooks_with_tests(), f"no test in tests/ implements {hook} with @hookimpl"
