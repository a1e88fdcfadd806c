"""Tests of the example detector, with the guard.testing fixtures (no server needed)."""

from pathlib import Path
from typing import Any

import pytest
from guard import ConfigError, FeatureRequest
from guard.testing import (
    FeatureBatchFactory,
    PluginHarnessFactory,
    load_batches,
    save_batches,
)

from guard_example_detector import ExampleDetector

HOOK = "blocks.6.hook_resid_post"
SETTINGS = {"hook": HOOK, "feature": 7, "threshold": 0.5}


def test_flags_when_the_mean_exceeds_the_threshold(
    guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory
) -> None:
    harness = guard_plugin_harness(ExampleDetector, name="example_detector", settings=SETTINGS)
    batch = feature_batch(hook=HOOK, feature_ids=[7], activations=[0.25, 1.0, 0.75])

    [finding] = harness.detect(batch)

    assert finding.score == pytest.approx(2.0 / 3.0)
    assert (finding.action, finding.threshold, finding.feature_ids) == ("flag", 0.5, (7,))
    assert finding.positions == (1, 2)  # the rows above the threshold
    assert finding.plugin == "example_detector"


@pytest.mark.parametrize("activations", [[0.25, 0.75], [0.0, 0.0]])
def test_quiet_at_or_below_the_threshold(
    guard_plugin_harness: PluginHarnessFactory,
    feature_batch: FeatureBatchFactory,
    activations: list[float],
) -> None:
    harness = guard_plugin_harness(ExampleDetector, name="example_detector", settings=SETTINGS)
    assert harness.detect(feature_batch(feature_ids=[7], activations=activations)) == []


def test_ignores_other_hooks(
    guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory
) -> None:
    harness = guard_plugin_harness(ExampleDetector, name="example_detector", settings=SETTINGS)
    batch = feature_batch(hook="blocks.2.hook_resid_post", feature_ids=[7], activations=[9.0])
    assert harness.detect(batch) == []


def test_subscribes_to_its_feature(guard_plugin_harness: PluginHarnessFactory) -> None:
    harness = guard_plugin_harness(ExampleDetector, name="example_detector", settings=SETTINGS)
    assert harness.subscriptions() == [FeatureRequest(HOOK, [7])]


@pytest.mark.parametrize(
    ("change", "key"),
    [({"hook": ""}, "hook"), ({"feature": -1}, "feature"), ({"feature": "7"}, "feature"),
     ({"threshold": None}, "threshold"), ({"threshold": True}, "threshold")],
)
def test_rejects_bad_settings(
    guard_plugin_harness: PluginHarnessFactory, change: dict[str, Any], key: str
) -> None:
    harness = guard_plugin_harness(ExampleDetector, name="example_detector")
    with pytest.raises(ConfigError, match=rf"^plugins\.config\.example_detector\.{key}: "):
        harness.configure({**SETTINGS, **change})


def test_loads_from_its_entry_point(
    guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory
) -> None:
    """Needs the package installed (``pip install -e .``): the guard finds it this way."""
    harness = guard_plugin_harness("example_detector", settings=SETTINGS)
    assert harness.name == "example_detector"
    assert harness.version == "0.1.0"
    assert len(harness.detect(feature_batch(feature_ids=[7], activations=[1.0]))) == 1


def test_recorded_batches_keep_their_verdicts(
    tmp_path: Path,
    guard_plugin_harness: PluginHarnessFactory,
    feature_batch: FeatureBatchFactory,
) -> None:
    """A regression test on saved batches (here made up; record yours with BatchRecorder)."""
    path = tmp_path / "batches.npz"
    save_batches(path, [feature_batch(feature_ids=[7, 9], activations=[[0.9, 0.0]] * 2),
                        feature_batch(feature_ids=[7, 9], activations=[[0.1, 5.0]] * 2)])
    harness = guard_plugin_harness(ExampleDetector, name="example_detector", settings=SETTINGS)

    verdicts = [len(harness.detect(batch)) for batch in load_batches(path)]

    assert verdicts == [1, 0]
