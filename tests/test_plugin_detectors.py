"""The first-party detectors plugin, through a real PluginSet, on synthetic feature batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from guard import ConfigError, FeatureBatch, FeatureRequest, Finding, Phase, RequestEndReason
from guard.engine.plugins import PluginSet, PluginSource
from guard.testing import PluginHarnessFactory
from guard_plugins.detectors import Detectors, RunTracker, SustainedDetector

HOOK = "blocks.6.hook_resid_post"
OTHER_HOOK = "blocks.9.hook_resid_post"


def detectors(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("detectors", "test", Detectors)])
    plugins.configure({"detectors": settings})
    return plugins


def feature_batch(
    columns: Mapping[int, Sequence[float]],
    *,
    positions: Sequence[int] | None = None,
    request_id: str = "req-1",
    hook: str = HOOK,
    phase: Phase = Phase.PROMPT,
) -> FeatureBatch:
    """Rows whose feature ``f`` has the activations ``columns[f]``; every other feature 0."""
    ids = sorted(columns)
    activations = np.array([columns[f] for f in ids], dtype=np.float32).T
    n = activations.shape[0]
    return FeatureBatch(
        request_id=request_id, sequence=1, hook=hook,
        feature_ids=np.array(ids, dtype=np.int64), activations=activations,
        positions=np.array(range(n) if positions is None else positions, dtype=np.int64),
        token_ids=None, phase=phase, feature_labels={}, sae_sha256="",
    )


def detect(plugins: PluginSet, batch: FeatureBatch) -> dict[str, Finding]:
    findings, failures = plugins.detect(batch)
    assert failures == []
    assert len({f.detector for f in findings}) == len(findings)
    return {f.detector: f for f in findings}


def threshold(features: list[Any], value: Any = 2.5, **extra: Any) -> dict[str, Any]:
    return {"type": "threshold", "hook": HOOK, "features": features, "threshold": value, **extra}


# -- threshold ------------------------------------------------------------------------------


def test_threshold_any_fires_exactly_on_the_rows_built_to_fire_it() -> None:
    plugins = detectors({"jailbreak": threshold([5, 9], action="abort")})
    batch = feature_batch({5: [3.0, 0.0, 0.0, 1.0, 2.5], 9: [0.0, 0.1, 2.6, 0.0, 0.0],
                           11: [9.0] * 5}, positions=[10, 11, 12, 13, 14])

    finding = detect(plugins, batch)["jailbreak"]

    assert finding.positions == (10, 12, 14)  # 2.5 itself reaches the threshold
    assert finding.feature_ids == (5, 9)
    assert finding.feature_activations == pytest.approx((3.0, 2.6))
    assert finding.score == pytest.approx(3.0)
    assert finding.threshold == 2.5
    assert finding.action == "abort"
    assert finding.plugin == "detectors"
    assert "2 of 2 features" in finding.message


def test_threshold_below_everywhere_gives_no_finding() -> None:
    plugins = detectors({"jailbreak": threshold([5, 9])})
    assert detect(plugins, feature_batch({5: [2.4, 0.0], 9: [0.0, 2.49]})) == {}


def test_threshold_any_names_only_the_features_over_the_threshold() -> None:
    plugins = detectors({"jailbreak": threshold([5, 9])})
    finding = detect(plugins, feature_batch({5: [0.0, 4.0], 9: [1.0, 2.0]}))["jailbreak"]
    assert finding.feature_ids == (5,)
    assert finding.feature_activations == pytest.approx((4.0,))
    assert finding.positions == (1,)


def test_threshold_all_needs_every_feature() -> None:
    plugins = detectors({"both": threshold([5, 9], combine="all")})

    only_one = feature_batch({5: [3.0, 3.0], 9: [0.0, 1.0]})
    assert detect(plugins, only_one) == {}

    finding = detect(plugins, feature_batch({5: [3.0, 3.0, 0.0], 9: [2.7, 1.0, 3.0]}))["both"]
    assert finding.positions == (0,)  # the only row with both features over
    assert finding.feature_ids == (5, 9)
    assert finding.feature_activations == pytest.approx((3.0, 3.0))
    assert finding.score == pytest.approx(3.0)  # the smaller reduced value


def test_threshold_all_with_features_peaking_on_different_rows() -> None:
    plugins = detectors({"both": threshold([5, 9], combine="all")})
    finding = detect(plugins, feature_batch({5: [3.0, 0.0, 0.0], 9: [0.0, 4.0, 0.0]}))["both"]
    assert finding.positions == (0, 1)  # no row alone: the rows where a feature is over
    assert finding.score == pytest.approx(3.0)


def test_threshold_max_and_mean_over_rows() -> None:
    plugins = detectors({"peak": threshold([5]), "average": threshold([5], reduce="mean")})

    assert set(detect(plugins, feature_batch({5: [3.0, 0.0, 0.0]}))) == {"peak"}

    found = detect(plugins, feature_batch({5: [3.0, 3.0, 2.4]}))
    assert set(found) == {"peak", "average"}
    assert found["average"].score == pytest.approx(8.4 / 3)
    assert found["average"].feature_activations == pytest.approx((8.4 / 3,))
    assert found["average"].positions == (0, 1)  # 2.4 is under the threshold
    assert found["peak"].score == pytest.approx(3.0)


def test_mean_positions_come_from_the_features_that_fired() -> None:
    plugins = detectors({"average": threshold([5, 9], reduce="mean")})
    # feature 5: mean 3.0 fires; feature 9 spikes on row 2 but its mean 1.0 does not
    finding = detect(plugins, feature_batch({5: [3.0, 3.0, 3.0], 9: [0.0, 0.0, 3.0]}))["average"]
    assert finding.feature_ids == (5,)
    assert finding.positions == (0, 1, 2)
    finding = detect(plugins, feature_batch({5: [4.0, 4.0, 1.0], 9: [0.0, 0.0, 3.0]}))["average"]
    assert finding.positions == (0, 1)


def test_feature_ids_in_any_order_are_found() -> None:
    plugins = detectors({"jailbreak": threshold([5, 9])})
    batch = dataclasses.replace(
        feature_batch({5: [0.0, 3.0], 9: [2.6, 0.0]}), feature_ids=np.array([9, 5])
    )  # columns swapped: feature 9 is now [0, 3] and feature 5 [2.6, 0]
    finding = detect(plugins, batch)["jailbreak"]
    assert finding.feature_ids == (5, 9)
    assert finding.feature_activations == pytest.approx((2.6, 3.0))


def test_a_feature_that_was_not_encoded_is_a_plugin_failure_naming_it() -> None:
    plugins = detectors({"jailbreak": threshold([5, 8])})
    findings, failures = plugins.detect(feature_batch({5: [3.0], 9: [0.0]}))
    assert findings == []
    assert [f.plugin for f in failures] == ["detectors"]
    assert "feature 8" in failures[0].error


def test_detectors_only_read_batches_of_their_hook() -> None:
    plugins = detectors({"jailbreak": threshold([5])})
    assert detect(plugins, feature_batch({5: [9.0]}, hook=OTHER_HOOK)) == {}


def test_phases_limit_a_detector_and_unlabelled_batches_always_run() -> None:
    plugins = detectors({"late": threshold([5], phases=["generation"])})
    rows = {5: [3.0]}
    assert detect(plugins, feature_batch(rows, phase=Phase.PROMPT)) == {}
    assert "late" in detect(plugins, feature_batch(rows, phase=Phase.GENERATION))
    assert "late" in detect(plugins, feature_batch(rows, phase=Phase.UNSPECIFIED))


def test_subscriptions_are_the_union_of_features_per_hook() -> None:
    settings = {
        "a": threshold([9, 5]),
        "b": {"type": "linear", "hook": HOOK, "weights": {"7": 1.0, 5: 2.0}, "threshold": 1},
        "c": {**threshold([3]), "hook": OTHER_HOOK},
    }
    requests = detectors(settings).subscriptions({"detectors": settings})
    assert sorted(requests, key=lambda r: r.hook) == [
        FeatureRequest(HOOK, [5, 7, 9]), FeatureRequest(OTHER_HOOK, [3])
    ]


def test_no_settings_means_no_detectors_and_no_subscriptions() -> None:
    plugins = detectors({})
    assert plugins.subscriptions({}) == []
    assert detect(plugins, feature_batch({5: [9.0]})) == {}


# -- linear ---------------------------------------------------------------------------------


def linear(**extra: Any) -> dict[str, Any]:
    return {"type": "linear", "hook": HOOK, "weights": {5: 0.7, 9: -0.2}, "bias": -1.0,
            "threshold": 0.5, **extra}


def test_linear_score_computed_by_hand() -> None:
    plugins = detectors({"deception": linear(action="log")})
    # rows: -1 + 0.7*3 - 0.2*1 = 0.9 ; -1 + 0.7*1 = -0.3 ; -1 + 0.7*2.5 = 0.75
    batch = feature_batch({5: [3.0, 1.0, 2.5], 9: [1.0, 0.0, 0.0]}, positions=[4, 5, 6])

    finding = detect(plugins, batch)["deception"]

    assert finding.score == pytest.approx(0.9)
    assert finding.positions == (4, 6)
    assert finding.feature_ids == (5, 9)
    assert finding.feature_activations == pytest.approx((3.0, 1.0))  # the top row's
    assert finding.action == "log"
    assert finding.threshold == 0.5


def test_linear_mean_reduces_the_scores() -> None:
    batch = feature_batch({5: [3.0, 1.0, 2.5], 9: [1.0, 0.0, 0.0]})
    # mean score (0.9 - 0.3 + 0.75) / 3 = 0.45
    assert detect(detectors({"d": linear(reduce="mean")}), batch) == {}
    finding = detect(detectors({"d": linear(reduce="mean", threshold=0.4)}), batch)["d"]
    assert finding.score == pytest.approx(0.45)
    assert finding.feature_activations == pytest.approx((6.5 / 3, 1 / 3))
    assert finding.positions == (0, 2)


def test_linear_bias_defaults_to_zero() -> None:
    settings = {"d": {"type": "linear", "hook": HOOK, "weights": {5: 1.0}, "threshold": 1.0}}
    assert detect(detectors(settings), feature_batch({5: [1.0]}))["d"].score == 1.0


# -- sustained ------------------------------------------------------------------------------


def sustained(window: int = 3, **extra: Any) -> dict[str, Any]:
    return {"type": "sustained", "hook": HOOK, "features": [5], "threshold": 1.0,
            "window": window, **extra}


def test_sustained_counts_consecutive_tokens_across_batches_of_one_request() -> None:
    plugins = detectors({"drift": sustained()})

    first = feature_batch({5: [2.0, 2.0, 0.0, 2.0]}, positions=[0, 1, 2, 3])
    assert detect(plugins, first) == {}  # runs 1, 2, 0, 1

    second = feature_batch({5: [2.0, 3.0, 2.0]}, positions=[4, 5, 6])
    finding = detect(plugins, second)["drift"]  # runs 2, 3, 4
    assert finding.positions == (5, 6)
    assert finding.score == pytest.approx(3.0)
    assert "4 consecutive tokens (window 3)" in finding.message

    broken = feature_batch({5: [0.0, 2.0]}, positions=[7, 8])
    assert detect(plugins, broken) == {}


def test_sustained_state_is_per_request() -> None:
    plugins = detectors({"drift": sustained()})
    assert detect(plugins, feature_batch({5: [2.0, 2.0]}, request_id="a")) == {}
    assert detect(plugins, feature_batch({5: [2.0, 2.0]}, request_id="b")) == {}
    # "b" at position 2 would be its third token, but "a" restarts at 0: a new run
    assert detect(plugins, feature_batch({5: [2.0]}, positions=[2], request_id="b")) != {}
    assert detect(plugins, feature_batch({5: [2.0]}, positions=[0], request_id="a")) == {}


def test_sustained_gap_in_positions_restarts_the_run() -> None:
    plugins = detectors({"drift": sustained()})
    assert detect(plugins, feature_batch({5: [2.0, 2.0]}, positions=[0, 1])) == {}
    finding = detect(plugins, feature_batch({5: [2.0] * 3}, positions=[10, 11, 12]))["drift"]
    assert finding.positions == (12,)


def test_sustained_sorts_rows_by_position() -> None:
    plugins = detectors({"drift": sustained()})
    finding = detect(plugins, feature_batch({5: [2.0, 2.0, 2.0, 0.0]},
                                            positions=[2, 0, 1, 3]))["drift"]
    assert finding.positions == (2,)


def test_sustained_all_needs_every_feature_on_each_token() -> None:
    settings = {"drift": {**sustained(2), "features": [5, 9], "combine": "all"}}
    plugins = detectors(settings)
    assert detect(plugins, feature_batch({5: [2.0, 2.0, 2.0], 9: [2.0, 0.0, 0.0]})) == {}
    finding = detect(plugins, feature_batch({5: [2.0, 2.0], 9: [2.0, 1.5]},
                                            positions=[3, 4]))["drift"]
    assert finding.positions == (4,)
    assert finding.score == pytest.approx(1.5)  # the weakest feature of the row


def reference_runs(carry: int, last: int | None, positions: list[int], met: list[bool]
                   ) -> list[int]:
    runs, run = [], carry
    for position, ok in zip(positions, met, strict=True):
        contiguous = last is not None and position == last + 1
        run = (run + 1 if contiguous else 1) if ok else 0
        runs.append(run)
        last = position
    return runs


def test_run_lengths_match_a_row_by_row_reference() -> None:
    rng = np.random.default_rng(7)
    tracker = RunTracker(max_requests=100, idle_seconds=1e9)
    carry, last = 0, None
    position = 0
    for _ in range(200):
        n = int(rng.integers(1, 9))
        steps = rng.choice([1, 1, 1, 2, 5], size=n)
        positions = position + np.cumsum(steps)
        position = int(positions[-1])
        met = rng.random(n) < 0.7
        runs = tracker.advance("r", positions.astype(np.int64), met, now=0.0)
        expected = reference_runs(carry, last, positions.tolist(), met.tolist())
        assert runs.tolist() == expected
        carry, last = expected[-1], position


def test_run_tracker_memory_is_bounded() -> None:
    tracker = RunTracker(max_requests=2, idle_seconds=10.0)
    one, met = np.array([0], dtype=np.int64), np.array([True])
    for request in ("a", "b", "c"):
        tracker.advance(request, one, met, now=0.0)
    assert len(tracker) == 2  # "a", least recently updated, was evicted
    assert tracker.advance("a", one + 1, met, now=1.0).tolist() == [1]

    tracker.advance("d", one, met, now=20.0)  # "c" and "a" idle too long
    assert len(tracker) == 1

    tracker.advance("d", one + 1, ~met, now=21.0)  # a broken run holds no state
    assert len(tracker) == 0

    tracker.advance("e", one, met, now=22.0)
    assert tracker.forget("e") and not tracker.forget("e")  # an ended request holds none
    assert len(tracker) == 0


@pytest.mark.parametrize("reason", ["finished", "aborted", "evicted", "stream_closed"])
def test_the_end_of_a_request_frees_its_run(
    guard_plugin_harness: PluginHarnessFactory, reason: RequestEndReason,
) -> None:
    harness = guard_plugin_harness("detectors", settings={"drift": sustained()})
    plugin = harness.plugin
    assert isinstance(plugin, Detectors)
    [tracker] = [d.runs for d in plugin.detectors if isinstance(d, SustainedDetector)]
    assert harness.detect(feature_batch({5: [2.0, 2.0]}, request_id="a")) == []
    assert harness.detect(feature_batch({5: [2.0, 2.0]}, request_id="b")) == []
    assert len(tracker) == 2

    harness.request_ended("a", reason)
    harness.request_ended("never-seen", reason)  # nothing to free: no error

    assert len(tracker) == 1  # "b" keeps its run
    # "a" at position 2 would be its third token: its count did not survive the end
    assert harness.detect(feature_batch({5: [2.0]}, positions=[2], request_id="a")) == []
    [finding] = harness.detect(feature_batch({5: [2.0]}, positions=[2], request_id="b"))
    assert finding.detector == "drift"


def test_a_preempted_request_is_counted_once_when_its_rows_are_resent(
    guard_plugin_harness: PluginHarnessFactory,
) -> None:
    # vLLM preempts a request, tells the guard, recomputes it and sends its rows again from
    # the start. The guard hears of the preemption on its sink thread, so the resent rows can
    # be counted before it does: the end must not wipe them (it did), and the resent rows
    # must restart the count rather than add to it.
    harness = guard_plugin_harness("detectors", settings={"drift": sustained(3)})
    met = [2.0, 2.0]
    assert harness.detect(feature_batch({5: met}, positions=[1, 2], request_id="a")) == []
    # Resent: positions 1..3 again. Counted afresh, the run reaches 3 at position 3 only.
    [resent] = harness.detect(feature_batch({5: [*met, 2.0]}, positions=[1, 2, 3],
                                            request_id="a"))
    assert resent.positions == (3,)
    harness.request_ended("a", "preempted")  # arrives late, behind the resent rows
    [going_on] = harness.detect(feature_batch({5: [2.0]}, positions=[4], request_id="a"))
    assert going_on.positions == (4,) and "for 4 consecutive tokens" in going_on.message


def test_a_request_ends_without_state_in_threshold_only_detectors(
    guard_plugin_harness: PluginHarnessFactory,
) -> None:
    harness = guard_plugin_harness("detectors", settings={"j": threshold([1])})
    harness.request_ended("a", "finished")  # nothing kept, nothing to free


# -- configuration --------------------------------------------------------------------------


BAD_SETTINGS: list[tuple[Any, str]] = [
    ({"j": {**threshold([1]), "bogus": 1}}, "j.bogus"),
    ({"j": {**threshold([1]), "treshold": 1}}, "j.treshold"),
    ({"j": {"hook": HOOK, "features": [1]}}, "j.threshold"),
    ({"j": threshold([1], "high")}, "j.threshold"),
    ({"j": threshold([1], True)}, "j.threshold"),
    ({"j": threshold([1], float("nan"))}, "j.threshold"),
    ({"j": {"features": [1], "threshold": 1}}, "j.hook"),
    ({"j": {**threshold([1]), "hook": 3}}, "j.hook"),
    ({"j": threshold([])}, "j.features"),
    ({"j": {**threshold([1]), "features": 1}}, "j.features"),
    ({"j": threshold([1, -2])}, "j.features[1]"),
    ({"j": threshold([1, 1])}, "j.features"),
    ({"j": {**threshold([1]), "type": "fancy"}}, "j.type"),
    ({"j": threshold([1], combine="some")}, "j.combine"),
    ({"j": threshold([1], reduce="median")}, "j.reduce"),
    ({"j": threshold([1], action="block")}, "j.action"),
    ({"j": threshold([1], phases=["decode"])}, "j.phases[0]"),
    ({"j": threshold([1], phases=[])}, "j.phases"),
    ({"j": threshold([1], window=3)}, "j.window"),
    ({"j": threshold([1], weights={1: 1.0})}, "j.weights"),
    ({"j": {k: v for k, v in sustained().items() if k != "window"}}, "j.window"),
    ({"j": sustained(0)}, "j.window"),
    ({"j": sustained(reduce="max")}, "j.reduce"),
    ({"j": sustained(max_requests=0)}, "j.max_requests"),
    ({"j": sustained(idle_seconds=-1)}, "j.idle_seconds"),
    ({"j": linear(features=[5, 9])}, "j.features"),
    ({"j": linear(combine="any")}, "j.combine"),
    ({"j": linear(weights={})}, "j.weights"),
    ({"j": linear(weights=[0.7])}, "j.weights"),
    ({"j": linear(weights={"x": 1.0})}, "j.weights.x"),
    ({"j": linear(weights={5: "a"})}, "j.weights.5"),
    ({"j": linear(weights={5: 1.0, "5": 2.0})}, "j.weights.5"),
    ({"j": linear(bias="low")}, "j.bias"),
    ({"j": [1, 2]}, "j"),
    ({5: threshold([1])}, "5"),
    ([threshold([1])], ""),
]


@pytest.mark.parametrize(("settings", "key"), BAD_SETTINGS)
def test_every_config_error_names_its_key(settings: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        detectors(settings)
    expected = f"plugins.config.detectors.{key}" if key else "plugins.config.detectors"
    assert caught.value.key == expected


def test_helm_style_string_feature_ids_are_accepted() -> None:
    settings = {"d": linear(weights={"5": 0.7, "9": -0.2}), "t": threshold(["5"])}
    found = detect(detectors(settings), feature_batch({5: [3.0], 9: [1.0]}))
    assert found["d"].score == pytest.approx(0.9)
    assert found["t"].feature_ids == (5,)


def test_reconfiguring_replaces_the_detectors() -> None:
    plugin = Detectors()
    plugin.guard_configure({"a": threshold([1])})
    plugin.guard_configure({"b": threshold([2]), "c": sustained()})
    assert [d.rule.name for d in plugin.detectors] == ["b", "c"]
