"""The manual (README.md and docs/) keeps up with the code: the configuration reference is the
one generated from guard/config.py, links resolve, examples parse, every command and metric is
documented, and no text is kept in two places (as datasette's test_docs does for its docs)."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.cli import build_parser
from guard.config import GuardConfig, parse_config
from guard.errors import ConfigError
from guard.testing import PluginHarness

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
#: Every Markdown file of the manual, and the pointers and package READMEs around it.
MARKDOWN = [path for path in (
    README, *PAGES, ROOT / "charts" / "activation-guard" / "README.md",
    ROOT / "plugins" / "README.md", ROOT / "plugins" / "example-detector" / "README.md",
    ROOT / "guard" / "audit" / "README.md", ROOT / "guard" / "host" / "README.md",
    ROOT / "guard" / "training" / "TRAINING.md") if path.exists()]
#: The README's limit: what it is, the diagram, status, the commands, the detector, links.
README_LIMIT_BYTES = 15_000


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def generator() -> types.ModuleType:
    """docs/generate_config_reference.py, loaded as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "generate_config_reference", DOCS / "generate_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def without_code(text: str) -> str:
    """The text with fenced code blocks blanked out (links and headings in them are not)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


# -- the configuration reference ------------------------------------------------------------


def test_the_configuration_reference_is_up_to_date() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert generator().render(page) == page, (
        "docs/configuration.md: the configuration reference differs from guard/config.py; "
        f"run {generator().COMMAND}")


def test_every_key_of_the_reference_has_a_meaning() -> None:
    missing = [row.key for row in generator().rows(GuardConfig) if not row.meaning]
    assert missing == [], "give these fields a #: comment in guard/config.py"


def keys_the_parser_accepts(path: tuple[str, ...]) -> set[str]:
    """The keys the parser lists when the section at ``path`` gets an unknown one."""
    section: dict[str, Any] = {"not_a_key": 1}
    for name in reversed(path):
        section = ({"saes": [{"path": "sae", **section}]} if name == "saes"
                   else {name: section})
    with pytest.raises(ConfigError) as error:
        parse_config(yaml.safe_dump(section), env={})
    match = re.search(r"one of the keys (.+?), found", str(error.value))
    assert match is not None, f"the parser named no keys for {path}: {error.value}"
    return set(match.group(1).split(", "))


@pytest.mark.parametrize("path", [(), ("server",), ("server", "tls"),
                                  ("server", "shared_memory"), ("logging",), ("saes",),
                                  ("plugins",), ("telemetry",)], ids=".".join)
def test_the_reference_lists_the_keys_the_parser_accepts(path: tuple[str, ...]) -> None:
    prefix = "".join(f"{name}[]." if name == "saes" else f"{name}." for name in path)
    documented = {row.key[len(prefix):].split(".")[0].removesuffix("[]")
                  for row in generator().rows(GuardConfig) if row.key.startswith(prefix)}
    assert documented == keys_the_parser_accepts(path)


def test_every_environment_override_is_in_the_reference() -> None:
    from guard.config import ENV_OVERRIDES

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert [v for v in ENV_OVERRIDES if f"`{v}`" not in page] == []


# -- the README and the pages ---------------------------------------------------------------


def test_the_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size} bytes: keep it under {README_LIMIT_BYTES} and move the rest "
        "to docs/")


def test_the_readme_gives_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text
    assert "make test" in text  # .ci/run runs the README's test command


def test_every_page_is_in_the_index_and_the_index_in_the_readme() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES if p.name != "index.md" and f"]({p.name})" not in index] == []
    assert "](docs/index.md)" in README.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(path.read_text(encoding="utf-8")),
                              flags=re.M):
        anchor, n = slug(heading), 1
        while anchor in found:  # a repeated heading gets -1, -2, ...
            anchor, n = f"{slug(heading)}-{n}", n + 1
        found.add(anchor)
    return found


def links(path: Path) -> Iterator[str]:
    text = re.sub(r"`[^`\n]*`", "", without_code(path.read_text(encoding="utf-8")))
    yield from re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", MARKDOWN, ids=relative)
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for link in links(path):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked here
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link} (no heading #{anchor} in {relative(file)})")
    assert broken == [], f"{relative(path)}: broken links"


def paragraphs(path: Path) -> Iterator[str]:
    """Prose paragraphs of a page, whitespace normalised."""
    for block in re.split(r"\n\s*\n", without_code(path.read_text(encoding="utf-8"))):
        text = " ".join(block.split())
        if len(text) >= 160 and not text.startswith("|"):
            yield text


def test_no_paragraph_is_kept_in_two_places() -> None:
    seen: dict[str, str] = {}
    repeated = []
    for path in MARKDOWN:
        for text in paragraphs(path):
            if text in seen and seen[text] != relative(path):
                repeated.append(f"{seen[text]} and {relative(path)}: {text[:80]}...")
            seen.setdefault(text, relative(path))
    assert repeated == [], "one home per section: link to it instead of copying it"


# -- examples --------------------------------------------------------------------------------


SECTIONS = {"server", "logging", "saes", "plugins", "telemetry"}


def config_examples() -> Iterator[tuple[str, str]]:
    """YAML blocks of the manual that are (part of) a guard configuration file."""
    for path in [README, *PAGES]:
        for block in fenced(path.read_text(encoding="utf-8"), "yaml"):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and data and set(data) <= SECTIONS:
                yield relative(path), block


FIRST_PARTY = ("detectors", "steering", "decision_log")


@pytest.mark.parametrize(("page", "block"), list(config_examples()),
                         ids=lambda v: v if v.endswith(".md") else "")
def test_configuration_examples_are_valid(page: str, block: str) -> None:
    config = parse_config(block, source=page, env={})
    for name in FIRST_PARTY:
        if name in config.plugins.config:
            harness = PluginHarness(name, settings=config.plugins.config[name])
            harness.close()


def python_examples() -> Iterator[tuple[str, ast.Module]]:
    for path in [README, *PAGES]:
        for block in fenced(path.read_text(encoding="utf-8"), "python"):
            try:
                yield relative(path), ast.parse(block)
            except SyntaxError:
                continue  # a hook signature (tests/test_plugin_docs.py checks those)


@pytest.mark.parametrize(("page", "tree"), list(python_examples()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_python_examples_import_what_exists(page: str, tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "guard":
            module = importlib.import_module(node.module or "")
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert missing == [], f"{page}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "guard":
                    importlib.import_module(alias.name)


def commands(parser: argparse.ArgumentParser, prefix: str = "guard") -> Iterator[str]:
    """Every leaf command of the CLI: ``guard serve``, ``guard sae export``, ..."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield prefix
        return
    for name, sub in actions[0].choices.items():
        yield from commands(sub, f"{prefix} {name}")
    if not actions[0].required:
        yield prefix


@pytest.mark.parametrize("command", list(commands(build_parser())))
def test_every_command_is_in_the_quickstarts_table(command: str) -> None:
    table = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert re.search(rf"^\| `{command}\b", table, flags=re.M) or f"/ `{command}" in table, (
        f"docs/quickstart.md: the Commands table has no row for `{command}`")


def metric_names(path: Path) -> list[str]:
    return re.findall(r'create_[a-z_]+\(\s*"(guard\.[a-z_.]+)"', path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("source", ["guard/telemetry/instruments.py", "guard/host/tracing.py"])
def test_every_metric_is_documented(source: str) -> None:
    names = metric_names(ROOT / source)
    assert names, f"no metric found in {source}"
    page = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert [n for n in names if f"`{n}`" not in page] == [], "metrics missing from operations.md"


def test_the_plugin_quick_start_shows_the_example_package_as_it_is() -> None:
    code = (ROOT / "plugins" / "example-detector" / "guard_example_detector" / "__init__.py"
            ).read_text(encoding="utf-8")
    guide = (DOCS / "plugins.md").read_text(encoding="utf-8")
    assert code in fenced(guide, "python"), (
        "docs/plugins.md: copy guard_example_detector/__init__.py into the quick start")
