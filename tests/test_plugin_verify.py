"""The shadow-verification plugin (``guard_plugins.verify``): counterfactual detector scores
with named features ablated, through a real plugin manager, on synthetic feature batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard import ConfigError, FeatureRequest, Phase, RowRole
from guard.engine.plugins import PluginSet, discover
from guard.testing import FeatureBatchFactory, PluginHarnessFactory, make_feature_batch
from guard_plugins import verify as verify_plugin
from guard_plugins.verify import ShadowVerify, sampled

HOOK = "blocks.6.hook_resid_post"
LINEAR = {"type": "linear", "hook": HOOK, "weights": {1: 2.0, 2: 1.0, 3: 4.0}, "bias": -1.0,
          "threshold": 0.5, "reduce": "mean"}
LABELS = {1: "named one", 2: "named two"}


class Recorded:
    """Stands in for an OpenTelemetry instrument: keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []

    def record(self, value: float, attributes: dict[str, Any]) -> None:
        self.calls.append((value, dict(attributes)))

    def add(self, value: float, attributes: dict[str, Any]) -> None:
        self.calls.append((value, dict(attributes)))


@pytest.fixture
def instruments(monkeypatch: pytest.MonkeyPatch) -> tuple[Recorded, Recorded]:
    carried, checks = Recorded(), Recorded()
    monkeypatch.setattr(verify_plugin, "_carried", carried)
    monkeypatch.setattr(verify_plugin, "_checks", checks)
    return carried, checks


def test_off_without_settings(guard_plugin_harness: PluginHarnessFactory,
                              feature_batch: FeatureBatchFactory) -> None:
    harness = guard_plugin_harness(ShadowVerify, name="verify")
    assert harness.subscriptions() == []
    assert harness.detect(feature_batch(activations={1: [9.0]}, hook=HOOK)) == []


def test_installed_through_its_entry_point() -> None:
    (source,) = discover(["verify"], autoload=False, env={})
    assert source.target is ShadowVerify
    plugins = PluginSet([source])
    plugins.configure({"verify": {"detectors": {"lin": LINEAR}}})
    assert plugins.subscriptions({}) == [FeatureRequest(HOOK, [1, 2, 3])]


def test_linear_detector_with_its_labelled_features_ablated(
        guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory,
        instruments: tuple[Recorded, Recorded]) -> None:
    harness = guard_plugin_harness(ShadowVerify, name="verify",
                                   settings={"detectors": {"lin": LINEAR}, "sample": 1.0})
    assert harness.subscriptions() == [FeatureRequest(HOOK, [1, 2, 3])]
    # mean over rows: a1 = 1, a2 = 2, a3 = 0.5 -> score -1 + 2 + 2 + 2 = 5
    batch = feature_batch(activations={1: [2.0, 0.0], 2: [1.0, 3.0], 3: [0.5, 0.5]},
                          hook=HOOK, labels=LABELS, request_id="r1")
    (finding,) = harness.detect(batch)
    assert finding.detector == "verify:lin"
    assert finding.action == "log"
    assert finding.feature_ids == (1, 2)
    assert finding.score == pytest.approx(-1.0 + 4.0 * 0.5)  # only the unlabelled feature left
    assert finding.threshold == 0.5
    assert finding.feature_activations == ()  # no activations in the record
    # the named features carry (5 - 1) of the 6 points above the floor (bias -1)
    assert "score 5, 1 with 2 named features ablated (67% of the score above -1" in \
        finding.message
    assert "still fires" in finding.message
    carried, checks = instruments
    ((share, attributes),) = carried.calls
    assert share == pytest.approx(4.0 / 6.0)
    assert attributes == {"guard.detector": "lin"}
    assert checks.calls == [(1, {"guard.detector": "lin", "guard.verify.still_fires": True})]
    # the batch handed to every plugin is untouched
    assert batch.column(1).tolist() == [2.0, 0.0]


def test_the_features_given_and_would_not_fire(
        guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory,
        instruments: tuple[Recorded, Recorded]) -> None:
    detectors = {"peak": {"type": "threshold", "hook": HOOK, "features": [4, 5],
                          "threshold": 2.0}, "lin": LINEAR}
    harness = guard_plugin_harness(ShadowVerify, name="verify", settings={
        "detectors": detectors, "sample": 1.0, "features": {"peak": [4]}})
    batch = feature_batch(activations={1: [0.0], 2: [0.0], 3: [0.0], 4: [3.0], 5: [1.0]},
                          hook=HOOK)
    (finding,) = harness.detect(batch)  # lin does not fire (score -1)
    assert finding.detector == "verify:peak"
    assert finding.score == 1.0  # the max of feature 5 alone
    assert "would not fire without them" in finding.message
    assert "(67% of the score above 0 carried" in finding.message  # (3 - 1) / (3 - 0)
    assert instruments[1].calls == [
        (1, {"guard.detector": "peak", "guard.verify.still_fires": False})]


def test_no_finding_when_nothing_fired_or_nothing_is_named(
        guard_plugin_harness: PluginHarnessFactory,
        feature_batch: FeatureBatchFactory) -> None:
    harness = guard_plugin_harness(ShadowVerify, name="verify",
                                   settings={"detectors": {"lin": LINEAR}, "sample": 1.0})
    quiet = feature_batch(activations={1: [0.0], 2: [0.0], 3: [0.1]}, hook=HOOK,
                          labels=LABELS)
    assert harness.detect(quiet) == []  # score -0.6: not fired
    unlabelled = feature_batch(activations={1: [3.0], 2: [0.0], 3: [0.0]}, hook=HOOK)
    assert harness.detect(unlabelled) == []  # fired, but no feature has a label


def test_reads_the_detectors_rows(guard_plugin_harness: PluginHarnessFactory) -> None:
    """The check scores the rows the detector reads: the template row's spike is not."""
    harness = guard_plugin_harness(ShadowVerify, name="verify", settings={
        "detectors": {"peak": {"type": "threshold", "hook": HOOK, "features": [4, 5],
                               "threshold": 2.0}}, "sample": 1.0})
    batch = make_feature_batch(activations={4: [9.0, 2.5], 5: [0.0, 1.5]}, hook=HOOK,
                          labels={4: "four"}, roles=["template", "user"],
                          phase=Phase.PROMPT)
    (finding,) = harness.detect(batch)
    assert finding.score == 1.5  # feature 5 on the user's row; 9.0 is template markup
    assert "score 2.5, 1.5" in finding.message
    only_template = make_feature_batch(activations={4: [9.0], 5: [0.0]}, hook=HOOK,
                                  labels={4: "four"}, roles=[RowRole.TEMPLATE])
    assert harness.detect(only_template) == []


def test_sampling_is_per_request_and_near_the_share() -> None:
    ids = [f"request-{i}" for i in range(20_000)]
    share = sum(sampled(r, 0.25) for r in ids) / len(ids)
    assert 0.24 < share < 0.26  # a fixed hash: the same numbers every run
    assert all(sampled(r, 1.0) for r in ids[:100])
    assert not any(sampled(r, 0.0) for r in ids[:100])
    assert [sampled(r, 0.25) for r in ids[:50]] == [sampled(r, 0.25) for r in ids[:50]]


def test_unsampled_requests_are_not_checked(guard_plugin_harness: PluginHarnessFactory,
                                            feature_batch: FeatureBatchFactory) -> None:
    harness = guard_plugin_harness(ShadowVerify, name="verify",
                                   settings={"detectors": {"lin": LINEAR}, "sample": 0.5})
    ids = [f"r{i}" for i in range(40)]
    checked = [r for r in ids if harness.detect(feature_batch(
        activations={1: [3.0], 2: [0.0], 3: [0.0]}, hook=HOOK, labels=LABELS,
        request_id=r))]
    assert checked == [r for r in ids if sampled(r, 0.5)]
    assert 0 < len(checked) < len(ids)


def test_sustained_detectors_are_skipped(guard_plugin_harness: PluginHarnessFactory) -> None:
    harness = guard_plugin_harness(ShadowVerify, name="verify", settings={"detectors": {
        "drift": {"type": "sustained", "hook": HOOK, "features": [7], "threshold": 1.0,
                  "window": 3}, "lin": LINEAR}})
    plugin = harness.plugin
    assert isinstance(plugin, ShadowVerify)
    assert [c.name for c in plugin.checks] == ["lin"]


@pytest.mark.parametrize(("settings", "key", "expected"), [
    ({"detectors": {"lin": LINEAR}, "sample": 1.5}, "sample", "between 0 and 1"),
    ({"detectors": {"lin": LINEAR}, "features": {"other": [1]}}, "features.other",
     "a threshold or linear detector of verify.detectors (lin)"),
    ({"detectors": {"lin": LINEAR}, "features": {"lin": [1, 9]}}, "features.lin",
     "feature ids of detector 'lin'"),
    ({"detectors": {"lin": LINEAR}, "typo": 1}, "typo", "one of the keys"),
    ({"detectors": {"lin": {**LINEAR, "threshold": "high"}}}, "lin.threshold",
     "a finite number"),
])
def test_bad_settings_name_the_key(guard_plugin_harness: PluginHarnessFactory,
                                   settings: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        guard_plugin_harness(ShadowVerify, name="verify", settings=settings)
    assert info.value.key.endswith(key)
    assert expected in str(info.value)


def test_ablated_copy_leaves_the_batch(feature_batch: FeatureBatchFactory) -> None:
    batch = feature_batch(activations={1: [1.0, 2.0], 2: [3.0, 4.0]})
    out = verify_plugin.ablated(batch, [2])
    assert out.column(2).tolist() == [0.0, 0.0]
    assert out.column(1).tolist() == [1.0, 2.0]
    assert batch.column(2).tolist() == [3.0, 4.0]
    assert not np.shares_memory(out.activations, batch.activations)
    assert verify_plugin.ablated(batch, [9]) is batch  # nothing of it encoded: no copy


def test_a_pooling_detector_pools_the_ablated_rows_across_batches(
        guard_plugin_harness: PluginHarnessFactory) -> None:
    """The counterfactual of a request's second batch pools over its first batch too, with
    the feature ablated there as well."""
    harness = guard_plugin_harness(ShadowVerify, name="verify", settings={
        "detectors": {"peak": {"type": "threshold", "hook": HOOK, "features": [4, 5],
                               "threshold": 2.0}}, "sample": 1.0, "features": {"peak": [4]}})
    first = make_feature_batch(activations={4: [3.0], 5: [2.6]}, hook=HOOK, positions=[1],
                               request_id="pooled")
    second = make_feature_batch(activations={4: [0.0], 5: [2.1]}, hook=HOOK, positions=[2],
                                request_id="pooled", sequence=2)
    (one,) = harness.detect(first)
    assert one.score == pytest.approx(2.6)
    assert "score 3, 2.6" in one.message
    (two,) = harness.detect(second)
    assert two.score == pytest.approx(2.6)  # not 2.1: feature 5's peak came in the first batch
    assert "score 3, 2.6" in two.message
    harness.request_ended("pooled")
    (again,) = harness.detect(second)  # a new request of that id: nothing pooled before
    assert again.score == pytest.approx(2.1)
