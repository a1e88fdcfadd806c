"""The ``probe`` detector: a linear probe on the raw residual rows, pooled over a request's rows,
explained by the SAE features whose decoder directions align with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from guard import ConfigError, FeatureBatch, FeatureRequest, Finding, Phase
from guard.config import PluginsConfig, SaeConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSet, PluginSource
from guard.host import GuardClient, Segment
from guard.sidecar.server import GuardServer
from guard.testing import PluginHarnessFactory, make_feature_batch
from guard_plugins.detectors import Detectors
from tests.conftest import D_IN, HOOK, make_config
from tests.sae_fixtures import random_standard_weights, write_saelens

RNG = np.random.default_rng(7)
W = RNG.normal(size=D_IN)
BIAS = -0.3


def plugin(settings: dict[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("detectors", "test", Detectors)])
    plugins.configure({"detectors": settings})
    return plugins


def probe(**extra: Any) -> dict[str, Any]:
    return {"type": "probe", "hook": HOOK, "weights": [float(w) for w in W], "bias": BIAS,
            "threshold": 0.0, **extra}


def residual_batch(rows: NDArray[np.float32], positions: list[int], *,
                   acts: NDArray[np.float32] | None = None, feature_ids: list[int] | None = None,
                   complete: bool | None = True, request_id: str = "r") -> FeatureBatch:
    if acts is None:
        acts = np.zeros((len(rows), 0), dtype=np.float32)
    return make_feature_batch(activations=acts, feature_ids=feature_ids or [],
                              positions=positions, phase=Phase.PROMPT, request_id=request_id,
                              prompt_complete=complete, residual=rows)


def only(plugins: PluginSet, batch: FeatureBatch) -> Finding | None:
    findings, failures = plugins.detect(batch)
    assert failures == []
    assert len(findings) <= 1
    return findings[0] if findings else None


def reference(rows: NDArray[np.float32], pooling: str, window: int = 1) -> float:
    scores = BIAS + rows.astype(np.float64) @ W
    if pooling == "mean":
        return float(scores.mean())
    if pooling == "max":
        return float(scores.max())
    if len(scores) < window:
        return float(scores.mean())
    return float(max(scores[i:i + window].mean() for i in range(len(scores) - window + 1)))


@pytest.mark.parametrize(("pooling", "window"), [("mean", 1), ("max", 1), ("rolling_max", 3),
                                                 ("rolling_max", 20)])
def test_probe_scores_equal_a_numpy_reference(pooling: str, window: int) -> None:
    rows = RNG.normal(size=(12, D_IN)).astype(np.float32)
    expected = reference(rows, pooling, window)
    extra: dict[str, Any] = {"pooling": pooling}
    if pooling == "rolling_max":
        extra["window"] = window
    finding = only(plugin({"p": probe(**extra, threshold=expected - 1e-6)}),
                   residual_batch(rows, list(range(1, 13))))
    assert finding is not None and finding.detector == "p"
    assert finding.score == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert f"probe score {expected:.4g}" in finding.message
    assert only(plugin({"p": probe(**extra, threshold=expected + 1e-6)}),
                residual_batch(rows, list(range(1, 13)))) is None
    # The same prompt in three chunks, the last completing it: the same score.
    plugins = plugin({"p": probe(**extra, threshold=expected - 1e-6)})
    found = [only(plugins, residual_batch(rows[a:b], list(range(a + 1, b + 1)),
                                          complete=b == 12))
             for a, b in ((0, 5), (5, 7), (7, 12))]
    assert [f.score for f in found if f is not None][-1] == pytest.approx(expected, rel=1e-9)


def test_max_pooling_names_the_top_row() -> None:
    rows = RNG.normal(size=(6, D_IN)).astype(np.float32)
    scores = BIAS + rows.astype(np.float64) @ W
    top = int(np.argmax(scores))
    finding = only(plugin({"p": probe(threshold=float(scores[top]))}),
                   residual_batch(rows, [10, 11, 12, 13, 14, 15]))
    assert finding is not None and finding.positions == (10 + top,)


def test_explain_lists_the_features_that_contribute_most_on_the_firing_rows() -> None:
    rows = RNG.normal(size=(4, D_IN)).astype(np.float32)
    scores = BIAS + rows.astype(np.float64) @ W
    top = int(np.argmax(scores))
    # Features 5, 12, 30, 41 (the batch's columns): 41 is aligned against the probe, 12 is
    # silent on the top row.
    acts = np.zeros((4, 4), dtype=np.float32)
    acts[top] = [3.0, 0.0, 1.0, 2.0]
    acts[(top + 1) % 4] = [9.0, 9.0, 9.0, 9.0]  # another row: not the one that fired
    settings = probe(threshold=float(scores[top]) - 1e-6,
                     explain={"features": [30, 5, 12, 41], "alignment": [0.5, 0.4, 0.9, -1.0]})
    finding = only(plugin({"p": settings}),
                   residual_batch(rows, [1, 2, 3, 4], acts=acts, feature_ids=[5, 12, 30, 41]))
    assert finding is not None
    # contributions on the top row: 30 -> 1.0 * 0.5, 5 -> 3.0 * 0.4, 12 -> 0, 41 -> -2.0
    assert finding.feature_ids == (5, 30)
    assert finding.feature_activations == pytest.approx((3.0, 1.0))
    assert finding.message.endswith("features by contribution: 5, 30")
    # Mean pooling explains with the mean over every row.
    mean = probe(pooling="mean", threshold=-100.0,
                 explain={"features": [30, 5], "alignment": [0.5, 0.4]})
    finding = only(plugin({"p": mean}),
                   residual_batch(rows, [1, 2, 3, 4], acts=acts, feature_ids=[5, 12, 30, 41]))
    assert finding is not None
    # means: 5 -> (3 + 9) / 4 = 3.0, 30 -> (1 + 9) / 4 = 2.5; 2.5 * 0.5 > 3.0 * 0.4
    assert finding.feature_ids == (30, 5)
    assert finding.feature_activations == pytest.approx((2.5, 3.0))


def test_subscriptions_ask_for_the_explaining_features_and_the_hooks_width() -> None:
    plugins = plugin({"p": probe(explain={"features": [9, 3], "alignment": [1.0, 2.0]}),
                      "q": probe(), "t": {"hook": HOOK, "features": [4], "threshold": 1.0}})
    assert plugins.subscriptions({}) == [
        FeatureRequest(HOOK, [4]),
        FeatureRequest(HOOK, [3, 9], d_in=D_IN, key="p.weights"),
        FeatureRequest(HOOK, [], approximate_topk=True, d_in=D_IN, key="q.weights")]


@pytest.mark.parametrize(("settings", "key", "fragment"), [
    (probe(weights=[]), "p.weights", "a non-empty list of numbers"),
    (probe(weights={"0": 1.0}), "p.weights", "a non-empty list of numbers"),
    (probe(weights=[1.0, "x", 2.0]), "p.weights[1]", "a finite number"),
    (probe(weights=[1.0, float("nan")]), "p.weights[1]", "a finite number"),
    (probe(features=[1]), "p.features", "one of the keys of a probe detector"),
    (probe(reduce="max"), "p.reduce", "one of the keys of a probe detector"),
    (probe(explain={"features": [1, 2], "alignment": [0.5]}), "p.explain.alignment",
     "2 numbers (one per feature)"),
    (probe(explain={"features": [1], "alignment": [0.5], "top": 3}), "p.explain.top",
     "one of the keys of a probe's explain"),
    (probe(explain={"features": [1, 1], "alignment": [0.5, 0.5]}), "p.explain.features",
     "distinct feature ids"),
    (probe(explain={"alignment": [0.5]}), "p.explain.features", "a non-empty list"),
    (probe(explain=[1, 2]), "p.explain", "a mapping with features and alignment"),
    (probe(pooling="rolling_max"), "p.window", "required"),
])
def test_bad_probe_settings_name_their_key(settings: dict[str, Any], key: str,
                                           fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plugin({"p": settings})
    assert caught.value.key == f"plugins.config.detectors.{key}"
    assert fragment in str(caught.value)


def test_weights_of_the_wrong_width_are_refused_where_the_sae_is_known(
        tmp_path: Path, sae_dir: Path,
        guard_plugin_harness: PluginHarnessFactory) -> None:
    settings = {"p": probe(weights=[0.1] * (D_IN - 1))}
    config = dataclasses.replace(make_config(tmp_path, sae_dir), plugins=PluginsConfig(
        enabled=("detectors",), config={"detectors": settings}))
    with pytest.raises(ConfigError) as caught:
        Engine.load(config)
    assert caught.value.key == "plugins.config.detectors.p.weights"
    assert f"expected {D_IN} values (d_in of the SAE served for hook {HOOK})" in str(
        caught.value)
    # Without the guard (a plugin harness), the first batch says what is wrong.
    harness = guard_plugin_harness("detectors", settings=settings)
    with pytest.raises(ValueError, match=rf"detectors.p.weights: expected {D_IN} values"):
        harness.detect(residual_batch(np.zeros((1, D_IN), np.float32), [1]))


def test_a_batch_without_residual_rows_is_a_plugin_error_naming_the_detector() -> None:
    plugins = plugin({"p": probe()})
    made = make_feature_batch(activations=np.zeros((1, 0)), feature_ids=[], positions=[1])
    findings, failures = plugins.detect(made)
    assert findings == [] and len(failures) == 1
    assert "probe detector 'p' needs the residual rows" in failures[0].error


def test_the_residual_stays_out_of_a_batchs_repr() -> None:
    batch = residual_batch(np.full((1, D_IN), 1234.5, np.float32), [1])
    assert "1234.5" not in repr(batch)


def test_a_probe_is_served_on_the_rows_the_host_sends(tmp_path: Path) -> None:
    """Through a real guard over gRPC: the probe scores the rows the host sent (its score is
    the numpy reference's), explains itself with the SAE's features (encoded by the guard),
    and aborts."""
    weights = random_standard_weights(D_IN, 64, seed=2)
    sae = write_saelens(tmp_path / "sae", D_IN, 64, hook_name=HOOK, weights=weights)
    rows = RNG.normal(size=(5, D_IN)).astype(np.float32)
    scores = BIAS + rows.astype(np.float64) @ W
    alignment = weights["W_dec"].astype(np.float64) @ W  # what calibration computes
    explain = [int(j) for j in np.argsort(-alignment)[:4]]
    settings = probe(threshold=float(scores.max()) - 1e-4, action="abort",
                     explain={"features": explain,
                              "alignment": [float(alignment[j]) for j in explain]})
    config = dataclasses.replace(
        make_config(tmp_path, sae), saes=(SaeConfig(path=sae),),
        plugins=PluginsConfig(enabled=("detectors",), timeout_ms=30_000,
                              config={"detectors": {"p": settings}}))
    server = GuardServer(config)
    server.start()
    try:
        server.set_ready(Engine.load(config))
        with GuardClient(server.addresses[0], hooks=[HOOK]) as client:
            verdict = client.inspect_step(
                HOOK, rows, [Segment("r", 5, "prompt", prompt_complete=True)],
                [1, 2, 3, 4, 5]).verdicts[0]
    finally:
        server.stop(0)
    assert verdict.action is Action.ABORT
    [finding] = verdict.findings
    assert finding.score == pytest.approx(float(scores.max()), rel=1e-5)
    top = rows[int(np.argmax(scores))]
    acts = np.maximum((top - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"], 0.0)
    contributing = sorted((j for j in explain if acts[j] * alignment[j] > 0),
                          key=lambda j: -acts[j] * alignment[j])
    assert list(finding.feature_ids) == contributing
    assert finding.feature_activations == pytest.approx([acts[j] for j in contributing],
                                                        rel=1e-4, abs=1e-5)
