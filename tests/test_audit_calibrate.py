"""``guard detectors calibrate`` and ``shadow`` on synthetic data whose answer is known; the
written config loads through the detectors plugin and fires where calibration said it would."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard import FeatureBatch, Phase
from guard.audit import calibrate as cal
from guard.audit.data import group_key
from guard.audit.rank import PromptActivations
from guard.engine.plugins import PluginSet, PluginSource
from guard.errors import InvalidInput
from guard.testing import load_batches, save_batches
from guard_plugins.detectors import Detectors
from tests.test_audit_rank import acts_from_rows

HOOK = "blocks.6.hook_resid_post"
PLANTED = 7
SHIPPED = Path(__file__).resolve().parents[1] / "guard" / "defaults" / "detectors"


def planted_set(n_pos: int = 150, n_neg: int = 250, d_sae: int = 24, seed: int = 0,
                ) -> tuple[PromptActivations, list[str], list[str]]:
    """Positives: feature PLANTED fires on a few tokens (1.5-4); benign: it fires weakly
    (<= 1.6) on 10% of prompts; every other feature is noise on both classes."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(np.int64)
    rows_list, tokens = [], []
    for label in labels:
        n = int(rng.integers(5, 60))
        acts = np.where(rng.random((n, d_sae)) < 0.1, rng.random((n, d_sae)) * 2, 0.0)
        acts[:, PLANTED] = 0.0
        if label:
            hits = rng.integers(n, size=3)
            acts[hits, PLANTED] = 1.5 + 2.5 * rng.random(3)
        elif rng.random() < 0.1:
            acts[int(rng.integers(n)), PLANTED] = 1.6 * rng.random()
        rows_list.append(acts.astype(np.float32))
        tokens.append([f"t{j}" for j in range(n)])
    prompts = acts_from_rows(rows_list, labels, tokens, hook=HOOK)
    groups = [group_key(f"prompt {i}") for i in range(len(labels))]
    sources = ["bad" if y else "good" for y in labels]
    return prompts, groups, sources


def subscribed(plugins: PluginSet) -> list[int]:
    return sorted({int(f) for r in plugins.subscriptions({}) if r.feature_ids != "all"
                   for f in r.feature_ids})


def plugin(blocks: dict[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("detectors", "test", Detectors)])
    plugins.configure({"detectors": blocks})
    return plugins


def batch_of(acts: PromptActivations, i: int, features: list[int]) -> FeatureBatch:
    rows = acts.rows_of(i)[:, features]
    return FeatureBatch(request_id=f"r{i}", sequence=1, hook=HOOK,
                        feature_ids=np.array(features, dtype=np.int64),
                        activations=np.ascontiguousarray(rows, dtype=np.float32),
                        positions=np.arange(1, len(rows) + 1, dtype=np.int64), token_ids=None,
                        phase=Phase.PROMPT, feature_labels={}, sae_sha256="")


@pytest.fixture(scope="module")
def calibrated() -> tuple[cal.Calibration, PromptActivations]:
    acts, groups, sources = planted_set()
    rng = np.random.default_rng(1)
    order = rng.permutation(len(acts))
    train, test = np.sort(order[:280]), np.sort(order[280:])
    result = cal.calibrate(acts, train, test, name="planted", groups=groups, sources=sources,
                           target_fpr=0.02, top=6, probe=True)
    return result, acts


# -- operating points and metrics ----------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_the_threshold_meets_the_target_fpr_with_the_best_recall(target: float) -> None:
    rng = np.random.default_rng(4)
    benign = np.round(rng.normal(0, 1, 300), 1)  # rounded: ties at the boundary
    positive = rng.normal(1.5, 1, 200)
    t = cal.threshold_for_fpr(benign, target, np.r_[benign, positive])
    assert np.mean(benign >= t) <= target
    # any lower threshold that still meets the target would not catch more positives
    lower = [b for b in np.unique(np.r_[benign, positive]) if b < t
             and np.mean(benign >= b) <= target]
    assert all(np.sum(positive >= b) <= np.sum(positive >= t) for b in lower)


def test_metrics_at_a_threshold() -> None:
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.1, 0.0])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = cal.metrics_at(scores, labels, 0.5)
    assert (m.tp, m.fp, m.positives, m.benign) == (2, 1, 3, 3)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.fpr == pytest.approx(1 / 3)
    assert m.auroc == pytest.approx(8 / 9)
    assert m.fpr_ci95 is not None and m.fpr_ci95[0] < 1 / 3 < m.fpr_ci95[1]
    fpr, tpr = cal.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)


# -- logistic regression -------------------------------------------------------------------


def test_logistic_fit_recovers_the_planted_direction() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (600, 5)) * np.array([1, 10, 0.1, 1, 1])  # unequal scales
    direction = np.array([2.0, 0.0, -30.0, 0.0, 0.5])
    y = (rng.random(600) < 1 / (1 + np.exp(-(x @ direction - 0.3)))).astype(np.int64)
    model = cal.logistic_fit(x, y, l2=1e-4)
    assert np.sign(model.weights[[0, 2, 4]]).tolist() == [1, -1, 1]
    assert abs(model.weights[1]) < 0.1 and abs(model.weights[3]) < 0.5
    # at the optimum the gradient of the (raw-space) loss vanishes for the bias
    p = 1 / (1 + np.exp(-model.logits(x)))
    assert abs(np.mean(p - y)) < 1e-4
    strong = cal.logistic_fit(x, y, l2=10.0)
    assert np.linalg.norm(strong.weights * x.std(axis=0)) < np.linalg.norm(
        model.weights * x.std(axis=0))


def test_cross_validation_picks_a_strength_from_the_grid() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (200, 3))
    y = (x[:, 0] + rng.normal(0, 1, 200) > 0).astype(np.int64)
    model, losses = cal.fit_logistic_cv(x, y, [str(i) for i in range(200)])
    assert set(losses) == set(cal.L2_GRID)
    assert model.l2 == min(losses, key=lambda k: losses[k])


# -- the whole calibration -----------------------------------------------------------------


def test_calibration_finds_the_planted_feature_and_meets_the_target_on_training(
    calibrated: tuple[cal.Calibration, PromptActivations],
) -> None:
    result, _ = calibrated
    assert result.threshold_fit.features[0] == PLANTED
    assert result.threshold_fit.per_feature
    assert 0.0 < result.threshold_fit.thresholds[0] <= 1.5  # below every planted value
    assert result.results["threshold"].train.recall == 1.0
    assert PLANTED in result.linear_fit.features
    planted_weight = result.linear_fit.weights[result.linear_fit.features.index(PLANTED)]
    assert planted_weight == max(result.linear_fit.weights) > 0
    for kind in ("threshold", "linear", "probe"):
        r = result.results[kind]
        assert r.train.fpr is not None and r.train.fpr <= 0.02
    held = result.results["threshold"].test
    assert held.recall == 1.0
    assert held.fpr is not None and held.fpr <= 0.1  # benign prompts reach 1.6 on 10%
    assert held.auroc is not None and held.auroc > 0.95
    assert result.results["linear"].test.auroc is not None
    assert result.results["linear"].test.auroc > 0.95


def test_explicit_features_are_used_as_given() -> None:
    acts, groups, sources = planted_set(n_pos=60, n_neg=60)
    train, test = np.arange(0, 120, 2), np.arange(1, 120, 2)
    result = cal.calibrate(acts, train, test, name="x", groups=groups, sources=sources,
                           features=[3, PLANTED], combine="all", target_fpr=0.05)
    assert result.threshold_fit.features == (3, PLANTED)
    assert result.threshold_fit.combine == "all"
    assert not result.threshold_fit.per_feature
    assert list(cal.detector_blocks(result)) == ["x", "x-linear"]
    with pytest.raises(InvalidInput, match="--features"):
        cal.calibrate(acts, train, test, name="x", groups=groups, sources=sources,
                      features=[999])


def expected_firing(result: cal.Calibration, acts: PromptActivations) -> dict[str, Any]:
    """Per config entry, the prompts calibration says it fires on."""
    reduced = acts.max_acts if result.threshold_fit.reduce == "max" else acts.mean_acts
    entries = cal.threshold_entries(result)
    expected = {name: cal.combined(reduced[:, features], result.threshold_fit.combine)
                >= threshold for name, (features, threshold) in entries.items()}
    expected[f"{result.name}-linear"] = (cal.linear_scores(result.linear_fit, acts.mean_acts)
                                         >= result.linear_fit.threshold)
    return expected


def test_the_written_block_loads_through_the_plugin_and_fires_as_calibrated(
    calibrated: tuple[cal.Calibration, PromptActivations],
) -> None:
    result, acts = calibrated
    blocks = cal.detector_blocks(result, action="abort")
    assert f"planted-f{PLANTED}" in blocks
    text = cal.detector_yaml(blocks, header=["test"], labels={PLANTED: "planted"})
    assert f"# feature {PLANTED}: planted" in text
    loaded = cal.detectors_block(yaml.safe_load(text), "detector.yaml")
    plugins = plugin(loaded)
    features = subscribed(plugins)
    expected = expected_firing(result, acts)
    group = np.zeros(len(acts), dtype=np.bool_)
    for name, fires in expected.items():
        if name != "planted-linear":
            group |= fires
    # the group's score (value over own threshold) fires exactly when some entry does
    np.testing.assert_array_equal(group, cal.threshold_scores(result.threshold_fit, acts) >= 1)
    for i in range(len(acts)):
        findings, failures = plugins.detect(batch_of(acts, i, features))
        assert failures == []
        fired = {f.detector for f in findings}
        assert fired == {name for name, fires in expected.items() if fires[i]}, i
        assert all(f.action == "abort" for f in findings)
    assert group[acts.labels == 1].all()  # the planted positives are caught


def test_shadow_mode_logs_only_and_counts_the_same_prompts(
    calibrated: tuple[cal.Calibration, PromptActivations], tmp_path: Path,
) -> None:
    result, acts = calibrated
    blocks = cal.detector_blocks(result, action="abort")
    shadow = cal.shadow_prompts(blocks, acts)
    assert shadow.failures == []
    expected = expected_firing(result, acts)
    for name, fires in expected.items():
        assert shadow.fired[name] == [int(i) for i in np.flatnonzero(fires)]
    summary = cal.format_shadow(shadow, acts.labels)
    assert "planted-linear" in summary and "benign" in summary
    # recorded batches: a request fires when any of its batches does
    plugins = plugin(blocks)
    features = subscribed(plugins)
    batches = []
    for i in range(20):
        whole = batch_of(acts, i, features)
        half = len(whole.positions) // 2
        for seq, part in enumerate((slice(0, half), slice(half, None)), 1):
            batches.append(FeatureBatch(
                request_id=whole.request_id, sequence=seq, hook=HOOK,
                feature_ids=whole.feature_ids, activations=whole.activations[part],
                positions=whole.positions[part], token_ids=None, phase=Phase.PROMPT,
                feature_labels={}, sae_sha256=""))
    path = tmp_path / "batches.npz"
    save_batches(path, batches)
    recorded = cal.shadow_batches(blocks, load_batches(path))
    assert recorded.requests == 20
    name = f"planted-f{PLANTED}"
    assert recorded.fired[name] == [i for i in range(20) if expected[name][i]]


def test_metrics_record_has_every_field(
    calibrated: tuple[cal.Calibration, PromptActivations],
) -> None:
    result, _ = calibrated
    record = json.loads(json.dumps(cal.metrics_record(result)))
    check_metrics(record, probe=True)


def check_metrics(record: dict[str, Any], *, probe: bool) -> None:
    for key in ("name", "hook", "sae_sha256", "target_fpr", "train_prompts", "heldout_prompts",
                "heldout_positive", "heldout_benign", "detectors"):
        assert key in record, key
    kinds = {"threshold", "linear", *(("probe",) if probe else ())}
    assert kinds <= set(record["detectors"])
    for kind in kinds:
        d = record["detectors"][kind]
        for split in ("train", "heldout"):
            for field in ("threshold", "precision", "recall", "f1", "auroc", "fpr", "fpr_ci95",
                          "tp", "fp", "positives", "benign"):
                assert field in d[split], (kind, split, field)
        assert d["heldout_by_length_bucket"]
        assert d["heldout_by_source"]


def test_a_detectors_block_is_found_in_any_document() -> None:
    block = {"x": {"type": "threshold", "hook": HOOK, "features": [1], "threshold": 1.0}}
    assert cal.detectors_block({"plugins": {"config": {"detectors": block}}}, "f") == block
    assert cal.detectors_block(block, "f") == block
    with pytest.raises(InvalidInput, match=r"plugins\.config\.detectors"):
        cal.detectors_block({"plugins": {}}, "f.yaml")


# -- the shipped worked example ------------------------------------------------------------


def test_the_shipped_detector_loads_and_its_metrics_are_complete() -> None:
    config = SHIPPED / "jailbreak.yaml"
    blocks = cal.detectors_block(yaml.safe_load(config.read_text()), str(config))
    plugins = plugin(blocks)
    assert "jailbreak-linear" in blocks
    record = json.loads((SHIPPED / "metrics.json").read_text())
    record_entries = record["detectors"]["threshold"]["entries"]
    assert {*record_entries, "jailbreak-linear"} == set(blocks)
    hooks = {r.hook for r in plugins.subscriptions({})}
    assert hooks == {"blocks.15.hook_resid_post"}
    check_metrics(record, probe=True)
    for name, entry in record_entries.items():
        assert blocks[name]["threshold"] == entry["threshold"]
        assert blocks[name]["features"] == entry["features"]
    assert "guard detectors calibrate" in record["run"]["command"]
    # the numbers belong to the shipped SAE: a retrained SAE needs a new calibration
    weights = SHIPPED.parent / "saes" / "smollm2-135m-instruct" / "blocks.15.hook_resid_post"
    digest = hashlib.sha256((weights / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert record["sae_sha256"] == digest, "recalibrate: see guard/audit/README.md"


# -- the command line ----------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    """The audit commands on a parser of their own (``guard.cli`` adds the same groups)."""
    import argparse

    from guard.audit.cli import register

    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_shadow_command_over_recorded_batches(
    calibrated: tuple[cal.Calibration, PromptActivations], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result, acts = calibrated
    config = tmp_path / "detector.yaml"
    config.write_text(cal.detector_yaml(cal.detector_blocks(result, action="abort")))
    features = subscribed(plugin(cal.detectors_block(yaml.safe_load(config.read_text()), "")))
    path = tmp_path / "batches.npz"
    save_batches(path, [batch_of(acts, i, features) for i in range(len(acts))])
    assert run_cli("detectors", "shadow", "--config", str(config), "--batches", str(path)) == 0
    out = capsys.readouterr().out
    fired = int((cal.threshold_scores(result.threshold_fit, acts) >= 1).sum())
    assert f"{len(acts)} requests, every detector in log-only mode" in out
    assert re.search(rf"planted \(any -f entry\) +fired on +{fired} ", out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: {}\n")
    assert run_cli("detectors", "shadow", "--config", str(bad), "--batches", str(path)) == 1
    assert "plugins.config.detectors" in capsys.readouterr().err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (("features", "rank"), ("features", "steer"), ("detectors", "calibrate"),
                    ("detectors", "shadow"), ("detectors", "example-data")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*command, "--help")
        assert exit_info.value.code == 0
        assert "usage: guard " + " ".join(command) in capsys.readouterr().out


def test_reports_render(calibrated: tuple[cal.Calibration, PromptActivations]) -> None:
    from guard.audit.rank import rank_features
    from guard.audit.report import calibration_html, ranking_html, roc_png

    result, acts = calibrated
    png = roc_png(result)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    record = cal.metrics_record(result)
    page = calibration_html(result, record, "plugins: {}", png=png)
    assert "data:image/png;base64," in page
    assert "by length bucket" in page and "planted" in page
    ranks = rank_features(acts.max_acts, acts.mean_acts, acts.labels, top=2,
                          feature_labels={PLANTED: "<planted>"})
    html_page = ranking_html(ranks, acts, title="t")
    assert "&lt;planted&gt;" in html_page  # labels and prompt text are escaped
    assert "class='tok'" in html_page
