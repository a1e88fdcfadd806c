"""The first-party steering plugin, through a real PluginSet, on synthetic feature batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from guard import ConfigError, FeatureBatch, FeatureEdit, FeatureRequest, Finding, Phase
from guard.engine.deltas import build_delta
from guard.engine.plugins import PluginSet, PluginSource
from guard_plugins.detectors import Detectors
from guard_plugins.steering import SteeringPlugin

HOOK = "blocks.6.hook_resid_post"
OTHER_HOOK = "blocks.9.hook_resid_post"

EDITS = [{"feature": 12, "pin": 0.0}, {"feature": 40, "nudge": -2.0},
         {"feature": 7, "scale": 0.5}]


def steering(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("steering", "test", SteeringPlugin)])
    plugins.configure({"steering": settings})
    return plugins


def feature_batch(n_rows: int = 4, hook: str = HOOK) -> FeatureBatch:
    ids = np.array([7, 12], dtype=np.int64)
    activations = np.arange(n_rows * 2, dtype=np.float32).reshape(n_rows, 2)
    return FeatureBatch(
        request_id="req-1", sequence=1, hook=hook, feature_ids=ids, activations=activations,
        positions=np.arange(10, 10 + n_rows, dtype=np.int64), token_ids=None,
        phase=Phase.GENERATION, feature_labels={}, sae_sha256="",
    )


def finding(detector: str, positions: Sequence[int] = ()) -> Finding:
    return Finding(detector=detector, score=3.0, threshold=2.5, positions=tuple(positions))


def steer(plugins: PluginSet, batch: FeatureBatch, findings: Sequence[Finding] = ()
          ) -> list[FeatureEdit]:
    edits, failures = plugins.steer(batch, findings)
    assert failures == []
    return edits


def expected(positions: tuple[int, ...] | None, hook: str = HOOK) -> list[FeatureEdit]:
    return [
        FeatureEdit(hook, 12, "pin", 0.0, positions, plugin="steering"),
        FeatureEdit(hook, 40, "nudge", -2.0, positions, plugin="steering"),
        FeatureEdit(hook, 7, "scale", 0.5, positions, plugin="steering"),
    ]


def test_unconditional_rule_edits_every_batch_of_its_hook_exactly_as_configured() -> None:
    plugins = steering({"calm": {"hook": HOOK, "edits": EDITS}})
    assert steer(plugins, feature_batch()) == expected(None)
    assert steer(plugins, feature_batch(hook=OTHER_HOOK)) == []


def test_conditional_rule_waits_for_its_detector() -> None:
    plugins = steering({"calm": {"hook": HOOK, "when": "jailbreak", "edits": EDITS}})
    assert steer(plugins, feature_batch()) == []
    assert steer(plugins, feature_batch(), [finding("other", [10])]) == []
    assert steer(plugins, feature_batch(), [finding("jailbreak", [12, 11])]) == expected((11, 12))


def test_conditional_rule_rows_all_edits_every_row() -> None:
    plugins = steering({"calm": {"hook": HOOK, "when": "jailbreak", "rows": "all",
                                 "edits": EDITS}})
    assert steer(plugins, feature_batch(), [finding("jailbreak", [12])]) == expected(None)


def test_several_triggers_give_the_union_of_their_positions() -> None:
    plugins = steering({"calm": {"hook": HOOK, "when": ["a", "b"], "edits": EDITS}})
    findings = [finding("a", [13]), finding("b", [11, 13]), finding("c", [10])]
    assert steer(plugins, feature_batch(), findings) == expected((11, 13))


def test_a_trigger_without_positions_covers_the_whole_batch() -> None:
    plugins = steering({"calm": {"hook": HOOK, "when": "jailbreak", "edits": EDITS}})
    findings = [finding("jailbreak", [11]), finding("jailbreak")]
    assert steer(plugins, feature_batch(), findings) == expected(None)


def test_rules_on_one_hook_all_apply_in_order() -> None:
    plugins = steering({
        "first": {"hook": HOOK, "edits": [{"feature": 1, "nudge": 1.0}]},
        "second": {"hook": HOOK, "when": "x", "edits": [{"feature": 2, "nudge": 2.0}]},
        "elsewhere": {"hook": OTHER_HOOK, "edits": [{"feature": 3, "nudge": 3.0}]},
    })
    edits = steer(plugins, feature_batch(), [finding("x", [10])])
    assert [(e.feature_id, e.positions) for e in edits] == [(1, None), (2, (10,))]


def test_subscriptions_name_the_features_pin_and_scale_need() -> None:
    settings = {
        "calm": {"hook": HOOK, "edits": EDITS},
        "push": {"hook": OTHER_HOOK, "edits": [{"feature": 3, "nudge": 1.0}]},
    }
    assert steering(settings).subscriptions({"steering": settings}) == [
        FeatureRequest(HOOK, [7, 12])
    ]


def test_when_x_fires_steer_y_with_the_detectors_plugin() -> None:
    """Both first-party plugins in one set; the engine's delta covers only the fired row."""
    config: dict[str, dict[str, Any]] = {
        "detectors": {"jailbreak": {"hook": HOOK, "features": [12], "threshold": 5.0}},
        "steering": {"calm": {"hook": HOOK, "when": "jailbreak",
                              "edits": [{"feature": 12, "pin": 0.0}]}},
    }
    plugins = PluginSet([PluginSource("detectors", "test", Detectors),
                         PluginSource("steering", "test", SteeringPlugin)])
    plugins.configure(config)
    batch = feature_batch()  # feature 12: 1, 3, 5, 7 at positions 10..13

    findings, _ = plugins.detect(batch)
    edits = steer(plugins, batch, findings)

    assert [f.positions for f in findings] == [(12, 13)]
    assert edits == [FeatureEdit(HOOK, 12, "pin", 0.0, (12, 13), plugin="steering")]
    direction = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)
    result = build_delta(batch, edits, lambda ids: np.repeat(direction, len(ids), axis=0))
    assert result.delta is not None
    np.testing.assert_allclose(result.delta, np.outer([0.0, 0.0, -5.0, -7.0], direction[0]))


BAD_SETTINGS: list[tuple[Any, str]] = [
    ({"calm": {"hook": HOOK}}, "calm.edits"),
    ({"calm": {"edits": EDITS}}, "calm.hook"),
    ({"calm": {"hook": HOOK, "edits": EDITS, "bogus": 1}}, "calm.bogus"),
    ({"calm": {"hook": HOOK, "edits": []}}, "calm.edits"),
    ({"calm": {"hook": HOOK, "edits": {"feature": 1, "pin": 0}}}, "calm.edits"),
    ({"calm": {"hook": HOOK, "edits": [3]}}, "calm.edits[0]"),
    ({"calm": {"hook": HOOK, "edits": [{"feature": 1}]}}, "calm.edits[0]"),
    ({"calm": {"hook": HOOK, "edits": [{"feature": 1, "pin": 0, "scale": 2}]}},
     "calm.edits[0]"),
    ({"calm": {"hook": HOOK, "edits": [{"pin": 0}]}}, "calm.edits[0].feature"),
    ({"calm": {"hook": HOOK, "edits": [{"feature": -1, "pin": 0}]}}, "calm.edits[0].feature"),
    ({"calm": {"hook": HOOK, "edits": [*EDITS, {"feature": 1, "nudge": "up"}]}},
     "calm.edits[3].nudge"),
    ({"calm": {"hook": HOOK, "edits": [{"feature": 1, "scale": float("inf")}]}},
     "calm.edits[0].scale"),
    ({"calm": {"hook": HOOK, "edits": [{"feature": 1, "clamp": 0}]}}, "calm.edits[0].clamp"),
    ({"calm": {"hook": HOOK, "when": 5, "edits": EDITS}}, "calm.when"),
    ({"calm": {"hook": HOOK, "when": [], "edits": EDITS}}, "calm.when"),
    ({"calm": {"hook": HOOK, "when": ["a", ""], "edits": EDITS}}, "calm.when[1]"),
    ({"calm": {"hook": HOOK, "when": [{"a": 1}], "edits": EDITS}}, "calm.when[0]"),
    ({"calm": {"hook": HOOK, "rows": "fired", "edits": EDITS}}, "calm.rows"),
    ({"calm": {"hook": HOOK, "when": "a", "rows": "some", "edits": EDITS}}, "calm.rows"),
    ({"calm": "pin it"}, "calm"),
    ("calm", ""),
]


@pytest.mark.parametrize(("settings", "key"), BAD_SETTINGS)
def test_every_config_error_names_its_key(settings: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        steering(settings)
    expected_key = f"plugins.config.steering.{key}" if key else "plugins.config.steering"
    assert caught.value.key == expected_key
