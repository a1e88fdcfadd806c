"""The example plugin package (plugins/example-detector), installed with pip into a temporary
folder the way a user installs it, found by its entry point, run by the guard, and its own
tests passing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action, ActivationRows, Phase
from guard.engine.core import Engine
from guard.engine.plugins import AUTOLOAD_ENV, PluginSet, PluginSource, discover
from guard.testing import BatchRecorder, PluginHarness, load_batches, make_feature_batch
from tests.conftest import D_IN, D_SAE, HOOK
from tests.sae_fixtures import random_standard_weights

pytestmark = pytest.mark.slow  # pip builds the package: a few seconds

EXAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "example-detector"
MODULE = "guard_example_detector"


@dataclass(frozen=True)
class Installed:
    source: Path  # a copy of the package (building writes build/ and *.egg-info into it)
    site: Path  # what pip installed: the module and its .dist-info


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("example")
    source = root / "example-detector"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--disable-pip-version-check", "--no-input", "--target", str(site),
         str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return Installed(source, site)


@pytest.fixture
def on_path(installed: Installed, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed example on sys.path, as if pip had installed it into the environment."""
    monkeypatch.syspath_prepend(str(installed.site))
    yield installed.site
    for name in [m for m in sys.modules if m == MODULE or m.startswith(f"{MODULE}.")]:
        del sys.modules[name]


SETTINGS = {"hook": HOOK, "feature": 7, "threshold": 0.5}


def test_pip_installed_the_entry_point(installed: Installed) -> None:
    [info] = installed.site.glob("guard_example_detector-0.1.0.dist-info")
    entry_points = (info / "entry_points.txt").read_text()
    assert "[guard]" in entry_points
    assert "example_detector = guard_example_detector:ExampleDetector" in entry_points


def test_discover_finds_the_example(on_path: Path) -> None:
    [source] = discover(["example_detector"], autoload=False, env={})
    assert (source.name, source.version) == ("example_detector", "0.1.0")
    assert source.target.__module__ == MODULE and source.target.__name__ == "ExampleDetector"
    assert "example_detector" in [s.name for s in discover(env={})]  # autoload finds it too
    assert "example_detector" not in [s.name for s in discover(env={AUTOLOAD_ENV: "1"})]


def test_a_plugin_set_with_the_example_produces_findings(on_path: Path) -> None:
    plugins = PluginSet(discover(["example_detector"], autoload=False, env={}))
    plugins.configure({"example_detector": SETTINGS})
    assert [(r.hook, list(r.feature_ids)) for r in plugins.subscriptions(
        {"example_detector": SETTINGS})] == [(HOOK, [7])]
    batch = make_feature_batch(hook=HOOK, feature_ids=[3, 7],
                               activations=[[0.0, 0.25], [1.0, 1.0]], positions=[12, 13])

    findings, failures = plugins.detect(batch)

    assert failures == []
    [finding] = findings
    assert (finding.plugin, finding.detector, finding.action) == (
        "example_detector", "example_detector", "flag")
    assert finding.score == pytest.approx(0.625) and finding.positions == (13,)


def test_the_guard_runs_the_installed_example_and_recorded_batches_replay(
    on_path: Path, sae_dir: Path, tmp_path: Path
) -> None:
    """The engine on a real (small) SAE: the example's finding has the score computed by hand,
    and batches recorded from the engine give the same finding when replayed in the harness."""
    rows = np.random.default_rng(5).normal(size=(4, D_IN)).astype(np.float32)
    weights = random_standard_weights(D_IN, D_SAE, seed=0)  # the weights of sae_dir
    features = np.maximum((rows - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"], 0)
    feature = int(np.argmax(features.mean(axis=0)))
    expected = float(features[:, feature].mean())
    settings = {"hook": HOOK, "feature": feature, "threshold": expected / 2}
    recorded = tmp_path / "recorded.npz"
    config = GuardConfig(
        server=ServerConfig(listen="unix:///tmp/unused.sock"),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(autoload=False, enabled=("example_detector",), config={
            "example_detector": settings,
            "recorder": {"hook": HOOK, "features": [feature], "path": str(recorded)},
        }),
    )
    engine = Engine.load(config, extra_plugins=[PluginSource("recorder", "0", BatchRecorder)])
    try:
        assert engine.hook(HOOK).subscription.feature_ids == (feature,)
        decision = engine.inspect(ActivationRows("req-1", 1, HOOK, rows,
                                                 np.arange(4, dtype=np.int64), None,
                                                 Phase.GENERATION), {})
    finally:
        engine.close(timeout=10)

    assert decision.action is Action.CONTINUE  # a flag does not stop the model
    [finding] = decision.findings
    assert (finding.plugin, finding.action) == ("example_detector", "flag")
    assert finding.score == pytest.approx(expected, rel=1e-4)
    assert ("example_detector", "0.1.0") in [(p.name, p.version) for p in decision.plugins]

    [batch] = load_batches(recorded)
    harness = PluginHarness("example_detector", settings=settings)
    # the engine adds the SAE's feature labels (none here) after the plugins ran
    assert harness.detect(batch) == [replace(finding, feature_labels=())]


def test_the_examples_own_tests_pass(installed: Installed) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (AUTOLOAD_ENV, "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(installed.site),
                                                      env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=installed.source, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "skipped" not in result.stdout
