"""Saying when the SAE does not explain the traffic (issue 15, point 6): the reconstruction
error measured on sampled batches, its histogram, ``FeatureBatch.reconstruction``, the
``reconstruction`` detector, the decision record's ``out_of_distribution``, and
``guard detectors reconstruction``."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from numpy.typing import NDArray

from guard import ConfigError, FeatureRequest, Phase, Reconstruction
from guard.config import (
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    ReconstructionConfig,
    SaeConfig,
    parse_config,
)
from guard.decision import CONTENT_ROLES, ActivationRows, Segment, role_mask
from guard.engine.core import Engine
from guard.errors import InvalidInput
from guard.host import GuardClient
from guard.host import Segment as HostSegment
from guard.sae import open_sae
from guard.sae.reconstruction import squared_errors
from guard.testing import PluginHarnessFactory, make_feature_batch
from tests.conftest import D_IN, HOOK
from tests.sae_fixtures import (
    random_standard_weights,
    random_transcoder_weights,
    write_saelens,
    write_saelens_transcoder,
)
from tests.sidecar import Sidecar, parse_prometheus, poll

#: The subspace SAE explains the first KEPT dimensions of the residual and nothing else.
KEPT = 8
RNG = np.random.default_rng(15)
MEAN = RNG.normal(0.0, 0.5, size=D_IN).astype(np.float32)


def subspace_weights() -> dict[str, NDArray[np.float32]]:
    """A ReLU SAE with features +e_i and -e_i for the first KEPT dimensions, tied, b_dec the
    traffic's mean: it reconstructs ``x`` as ``mean + P(x - mean)``, P the projection on those
    dimensions. Its "training traffic" varies in them; rows varying elsewhere are outside."""
    basis = np.eye(D_IN, dtype=np.float32)[:KEPT]
    w_dec = np.concatenate([basis, -basis])  # [2 * KEPT, D_IN]
    return {"W_enc": np.ascontiguousarray(w_dec.T), "b_enc": np.zeros(2 * KEPT, np.float32),
            "W_dec": w_dec, "b_dec": MEAN.copy()}


def traffic(n: int, *, inside: bool, seed: int = 0) -> NDArray[np.float32]:
    """``n`` rows around MEAN: spread in the SAE's dimensions (``inside``) or out of them."""
    rng = np.random.default_rng(seed)
    spread = np.full(D_IN, 0.05)
    if inside:
        spread[:KEPT] = 1.0
    else:
        spread[KEPT:] = 1.0
    rows: NDArray[np.float32] = (MEAN + rng.normal(size=(n, D_IN)) * spread).astype(np.float32)
    return rows


@pytest.fixture(scope="module")
def subspace_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_saelens(tmp_path_factory.mktemp("subspace") / "sae", D_IN, 2 * KEPT,
                         hook_name=HOOK, weights=subspace_weights())


# -- the math ----------------------------------------------------------------------------------


def reference(weights: dict[str, NDArray[np.float32]], x: NDArray[np.float32],
              normalization: str, scale: float = 1.0) -> tuple[NDArray[np.float64], float]:
    """Per-row squared errors and the NMSE, all in float64, from SAELens's definitions."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x64 = x.astype(np.float64)
    if normalization == "constant_norm_rescale":
        coeff = math.sqrt(D_IN) / np.linalg.norm(x64, axis=1, keepdims=True)
        z = x64 * coeff
    elif normalization == "layer_norm":
        mu = x64.mean(axis=1, keepdims=True)
        std = (x64 - mu).std(axis=1, ddof=1, keepdims=True)
        z = (x64 - mu) / (std + 1e-5)
    else:
        z = x64 * scale
    acts = np.maximum((z - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)
    out = acts @ w["W_dec"] + w["b_dec"]
    if normalization == "constant_norm_rescale":
        out = out / coeff
    elif normalization == "layer_norm":
        out = out * std + mu
    else:
        out = out / scale
    errors = ((x64 - out) ** 2).sum(axis=1)
    return errors, float(errors.sum() / ((x64 - x64.mean(axis=0)) ** 2).sum())


@pytest.mark.parametrize("normalization", ["none", "constant_norm_rescale", "layer_norm",
                                           "expected_average_only_in"])
def test_squared_errors_and_nmse_match_a_float64_reference(
        tmp_path: Path, normalization: str) -> None:
    weights = random_standard_weights(D_IN, 48, seed=3)
    extra: dict[str, Any] = {"normalize_activations": normalization}
    scale = 1.0
    if normalization == "expected_average_only_in":
        scale = 0.37
        extra["norm_scaling_factor"] = scale
    sae = open_sae(write_saelens(tmp_path / "sae", D_IN, 48, hook_name=HOOK, weights=weights,
                                 extra_cfg=extra), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(4).normal(size=(37, D_IN)) * 2.0 + 0.5).astype(np.float32)
    errors, nmse = reference(weights, x, "none" if scale != 1.0 else normalization, scale)
    found = squared_errors(sae, x, chunk=5)  # chunks: 8 runs, the same values
    assert found == pytest.approx(errors, rel=1e-4, abs=1e-6)
    assert Reconstruction.of(x, found).nmse == pytest.approx(nmse, rel=1e-4)
    # The features of a full encode are reused as they are.
    acts = sae.encoder(None).encode(x)
    assert squared_errors(sae, x, activations=acts) == pytest.approx(found, rel=1e-6)


def test_rows_left_out_are_nan_and_do_not_count(subspace_sae: Path) -> None:
    sae = open_sae(subspace_sae, providers=["CPUExecutionProvider"])
    x = traffic(12, inside=True)
    measured = np.ones(12, dtype=np.bool_)
    measured[[0, 5]] = False
    errors = squared_errors(sae, x, measured=measured)
    assert np.isnan(errors[[0, 5]]).all() and np.isfinite(errors[measured]).all()
    whole = squared_errors(sae, x)
    assert errors[measured] == pytest.approx(whole[measured])
    rec = Reconstruction.of(x, errors)
    assert rec.rows == 10
    assert rec.nmse == pytest.approx(Reconstruction.of(x[measured], whole[measured]).nmse)


def test_the_subspace_sae_explains_its_traffic_and_not_the_rest(subspace_sae: Path) -> None:
    sae = open_sae(subspace_sae, providers=["CPUExecutionProvider"])
    inside, outside = traffic(40, inside=True), traffic(40, inside=False, seed=1)
    assert Reconstruction.of(inside, squared_errors(sae, inside)).nmse < 0.01
    assert Reconstruction.of(outside, squared_errors(sae, outside)).nmse > 0.9


def test_fewer_than_two_rows_have_no_nmse_and_a_selection_recomputes_it() -> None:
    x = traffic(6, inside=True)
    assert math.isnan(Reconstruction.of(x[:1], np.array([0.5])).nmse)
    assert math.isnan(Reconstruction.of(x[:2], np.array([0.5, np.nan])).nmse)
    errors = np.arange(1.0, 7.0)
    batch = make_feature_batch(activations=np.zeros((6, 0)), positions=range(1, 7),
                               residual=x, squared_error=errors)
    assert batch.reconstruction is not None
    assert "0.5" not in repr(batch.reconstruction)  # per-row errors stay out of reprs
    mask = np.array([True, False, True, True, False, True])
    kept = batch.select(mask)
    assert kept.reconstruction is not None and kept.reconstruction.rows == 4
    assert kept.reconstruction.nmse == pytest.approx(
        Reconstruction.of(x[mask], errors[mask]).nmse)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, -0.1, "often", True, None])
def test_a_bad_sample_names_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump({"saes": [{"path": "/sae", "reconstruction":
                                               {"sample": value}}]}))
    assert caught.value.key == "saes[0].reconstruction.sample"
    assert "a fraction of batches from 0 (off) to 1 (every batch)" in str(caught.value)


def test_sample_is_read_and_unknown_keys_refused() -> None:
    config = parse_config("saes:\n  - path: /sae\n    reconstruction: {sample: 0.05}\n")
    assert config.saes[0].reconstruction.sample == 0.05
    assert parse_config("saes:\n  - path: /sae\n").saes[0].reconstruction.sample == 0.0
    with pytest.raises(ConfigError) as caught:
        parse_config("saes:\n  - path: /sae\n    reconstruction: {rate: 0.05}\n")
    assert caught.value.key == "saes[0].reconstruction.rate"


def config_for(tmp_path: Path, sae: Path, *, sample: float, detectors: dict[str, Any],
               features: tuple[int, ...] | str = ()) -> GuardConfig:
    return GuardConfig(
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae, features=features,  # type: ignore[arg-type]
                        reconstruction=ReconstructionConfig(sample=sample)),),
        plugins=PluginsConfig(enabled=("detectors",), timeout_ms=30_000,
                              config={"detectors": detectors}))


def coverage(**extra: Any) -> dict[str, Any]:
    return {"type": "reconstruction", "hook": HOOK, "threshold": 0.2, "percentile": 99,
            **extra}


def test_a_transcoder_cannot_be_sampled(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, 32, 12)
    folder = write_saelens_transcoder(tmp_path / "tc", weights, architecture="transcoder",
                                      hook_name=HOOK)
    with pytest.raises(ConfigError) as caught:
        Engine.load(config_for(tmp_path, folder, sample=0.5, detectors={}))
    assert caught.value.key == "saes[0].reconstruction.sample"
    assert "is a transcoder" in str(caught.value)


def test_a_reconstruction_detector_needs_a_sampled_sae(tmp_path: Path,
                                                       subspace_sae: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Engine.load(config_for(tmp_path, subspace_sae, sample=0.0,
                               detectors={"coverage": coverage()}))
    assert caught.value.key == "plugins.config.detectors.coverage"
    assert "saes[].reconstruction.sample > 0" in str(caught.value)


@pytest.mark.parametrize(("settings", "key", "fragment"), [
    ({"threshold": 0}, "threshold", "a normalised MSE > 0"),
    ({"percentile": 120}, "percentile", "a percentile in (0, 100]"),
    ({"min_rows": 1}, "min_rows", "at least 2 rows"),
    ({"features": [1]}, "features", "unknown key 'features'"),
])
def test_bad_detector_settings_name_their_key(
        guard_plugin_harness: PluginHarnessFactory, settings: dict[str, Any], key: str,
        fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        guard_plugin_harness("detectors", settings={"coverage": coverage(**settings)})
    assert caught.value.key == f"plugins.config.detectors.coverage.{key}"
    assert fragment in str(caught.value)


# -- the detector --------------------------------------------------------------------------


def test_the_detector_flags_an_unexplained_request_and_says_why(
        guard_plugin_harness: PluginHarnessFactory) -> None:
    harness = guard_plugin_harness("detectors", settings={"coverage": coverage()})
    assert harness.subscriptions() == [FeatureRequest(HOOK, [], approximate_topk=True,
                                                      reconstruction=True, key="coverage")]
    x = traffic(10, inside=True)
    spread = float(((x - x.mean(axis=0)) ** 2).sum())
    errors = np.full(10, spread * 0.3 / 9)  # NMSE 0.3 over the 9 rows measured
    errors[0] = np.nan  # position 0: not measured
    kwargs: dict[str, Any] = {"activations": np.zeros((10, 0)), "positions": range(10),
                              "residual": x, "phase": Phase.PROMPT}
    [finding] = harness.detect(make_feature_batch(squared_error=errors, **kwargs))
    nmse = Reconstruction.of(x, errors).nmse
    assert finding.score == pytest.approx(nmse) and finding.threshold == 0.2
    assert finding.action == "log" and finding.out_of_distribution
    assert finding.positions == tuple(range(1, 10)) and finding.feature_ids == ()
    assert ("the SAE explains this request's residual worse than the 99th percentile of its "
            "training traffic") in finding.message
    assert "feature-based verdicts on it read outside the SAE's distribution" in finding.message
    # Explained well enough, not sampled, or too few rows: no finding.
    assert harness.detect(make_feature_batch(squared_error=errors * 0.5, **kwargs)) == []
    assert harness.detect(make_feature_batch(**kwargs)) == []
    few = np.full(10, np.nan)
    few[:7] = errors[1:8]
    assert harness.detect(make_feature_batch(squared_error=few, **kwargs)) == []


# -- in the engine -------------------------------------------------------------------------


def step(rows: list[NDArray[np.float32]]) -> ActivationRows:
    """One step of one request per array, positions from 1 (position 0 is never sent)."""
    segments, start = [], 0
    for i, r in enumerate(rows):
        segments.append(Segment(f"r{i}", start, start + len(r), Phase.PROMPT))
        start += len(r)
    positions = np.concatenate([np.arange(1, len(r) + 1) for r in rows]).astype(np.int64)
    return ActivationRows(request_id="", sequence=1, hook=HOOK, rows=np.concatenate(rows),
                          positions=positions, token_ids=None, phase=Phase.PROMPT,
                          segments=tuple(segments))


@pytest.mark.parametrize("features", [(), "all", (1, 3)])
def test_the_engine_measures_each_request_whatever_it_encodes(
        tmp_path: Path, subspace_sae: Path, features: tuple[int, ...] | str) -> None:
    """Every feature encoded (reused), a subset or none (a full encode of its own): the same
    NMSE per request, the reference's; a one-row request has none; with sample 0, none."""
    sae = open_sae(subspace_sae, providers=["CPUExecutionProvider"])
    inside, outside, single = (traffic(20, inside=True), traffic(20, inside=False, seed=2),
                               traffic(1, inside=True, seed=3))
    engine = Engine.load(config_for(tmp_path, subspace_sae, sample=1.0, features=features,
                                    detectors={"coverage": coverage()}))
    try:
        decided = engine.inspect_step(step([inside, outside, single]), {})
    finally:
        engine.close()
    first, second, third = decided.decisions
    for decision, rows in ((first, inside), (second, outside)):
        assert decision.reconstruction_nmse == pytest.approx(
            Reconstruction.of(rows, squared_errors(sae, rows)).nmse, rel=1e-5)
    assert third.reconstruction_nmse is None
    assert not first.out_of_distribution and second.out_of_distribution
    assert [f.detector for f in second.findings] == ["coverage"]
    assert "reconstruct" in second.timings
    engine = Engine.load(config_for(tmp_path, subspace_sae, sample=0.0, features=features,
                                    detectors={}))
    try:
        quiet = engine.inspect_step(step([outside]), {}).decisions[0]
    finally:
        engine.close()
    assert quiet.reconstruction_nmse is None and "reconstruct" not in quiet.timings


# -- through a real `guard serve` ----------------------------------------------------------


def test_a_served_guard_exports_the_histogram_and_flags_the_request_outside(
        tmp_path: Path, subspace_sae: Path) -> None:
    sidecar = Sidecar(tmp_path / "guard", {
        "logging": {"level": "info"},
        "saes": [{"path": str(subspace_sae), "reconstruction": {"sample": 1}}],
        "plugins": {"enabled": ["detectors", "decision_log"], "watch_interval_seconds": 0,
                    "config": {"detectors": {"coverage": coverage(),
                                             "coverage-flag": coverage(action="flag")},
                               "decision_log": {"path": str(tmp_path / "guard" /
                                                            "decisions.jsonl")}}},
        "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False},
    }, tag="recon")
    sidecar.start()
    try:
        inside, outside = traffic(24, inside=True), traffic(24, inside=False, seed=5)
        with GuardClient(sidecar.address, hooks=[HOOK]) as client:
            verdicts = client.inspect_step(
                HOOK, np.concatenate([inside, outside]),
                [HostSegment("inside", 24, "prompt", prompt_complete=True),
                 HostSegment("outside", 24, "prompt", prompt_complete=True)],
                list(range(1, 25)) * 2).verdicts
            assert {v.request_id: v.action.name for v in verdicts} == {
                "inside": "CONTINUE", "outside": "CONTINUE"}  # log and flag: a caveat only
            told = {v.request_id: v.findings for v in verdicts}
            assert told["inside"] == ()
            # the host hears of the flag (not of the log-only finding), marked as such
            [reported] = told["outside"]
            assert reported.detector == "coverage-flag" and reported.out_of_distribution
        poll(lambda: len(sidecar.decisions()) == 2, 30, "two decision records")
        records = {r["request_id"]: r for r in sidecar.decisions()}
        assert records["inside"]["out_of_distribution"] is False
        assert records["inside"]["findings"] == []
        assert records["inside"]["reconstruction_nmse"] < 0.01
        assert records["outside"]["out_of_distribution"] is True
        finding, flagged = records["outside"]["findings"]
        assert finding["detector"] == "coverage" and finding["out_of_distribution"] is True
        assert flagged["detector"] == "coverage-flag" and flagged["out_of_distribution"]
        assert records["outside"]["reconstruction_nmse"] == pytest.approx(finding["score"])
        assert finding["score"] > 0.9
        assert "read outside the SAE's distribution" in finding["message"]
        # The histogram: one sample per request, labelled by hook only.
        assert sidecar.metric("guard_sae_reconstruction_nmse_count", guard_hook=HOOK) == 2
        assert sidecar.metric("guard_sae_reconstruction_nmse_bucket", guard_hook=HOOK,
                              le="0.01") == 1
        with urllib.request.urlopen(f"http://{sidecar.metrics_address()}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        labels = {k for name, found, _v in parse_prometheus(text)
                  if name.startswith("guard_sae_reconstruction_nmse") for k in found
                  if not k.startswith("otel_scope_")}
        assert labels == {"guard_hook", "le"}  # never a request id
    finally:
        sidecar.stop()



# -- calibration ---------------------------------------------------------------------------

DEMO_SAE = (Path(__file__).resolve().parent.parent / "guard" / "defaults" / "saes"
            / "smollm2-135m-instruct" / "blocks.15.hook_resid_post")
PROMPTS = ["How do I bake sourdough bread at home?",
           "Explain the difference between TCP and UDP in simple terms.",
           "Write a short poem about autumn leaves falling in the park.",
           "What are good habits for staying focused while studying?",
           "Summarise the plot of a detective story set in Paris.",
           "Give me three tips for planting tomatoes in a small garden."]


def run_cli(*argv: str) -> int:
    """The audit commands on a parser of their own (``guard.cli`` adds the same groups)."""
    import argparse

    from guard.audit.cli import register

    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_the_calibration_command_writes_a_block_the_guard_serves(
        tmp_path: Path, guard_plugin_harness: PluginHarnessFactory) -> None:
    """SmolLM2 (the cached model) and the demo SAE: each prompt's NMSE is the SAE's own
    reconstruction of the rows the host sends, the threshold their percentile, and the
    block loads in the detectors plugin and flags the prompts above it."""
    models = pytest.importorskip("guard.models.smollm2")
    pytest.importorskip("transformers")
    try:
        models.smollm2_gguf_dir()
    except models.ModelUnavailable as exc:  # pragma: no cover - make test installs it
        pytest.skip(f"SmolLM2 not installed: {exc}")
    from guard.audit.probe import cached_residuals

    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out, record = tmp_path / "coverage.yaml", tmp_path / "coverage.json"
    assert run_cli("detectors", "reconstruction", "--prompts", str(prompts), "--sae",
                   str(DEMO_SAE), "--percentile", "50", "--min-rows", "4", "--cache", "none",
                   "--out", str(out), "--json", str(record)) == 0
    text = out.read_text(encoding="utf-8")
    assert "# NMSE of 6 calibration prompts" in text and "p99" in text
    block = yaml.safe_load(text)["plugins"]["config"]["detectors"]["sae-coverage"]
    summary = yaml.safe_load(record.read_text(encoding="utf-8"))
    nmse = np.array(summary["prompt_nmse"], dtype=np.float64)
    assert block["threshold"] == pytest.approx(float(np.percentile(nmse, 50)), rel=1e-5)
    assert nmse.min() > 0.0 and nmse.max() < 1.0  # the SAE explains most of its traffic
    # The same number the guard computes on the rows a host sends for the first prompt.
    model, tokenizer = models.load_smollm2()
    resid = cached_residuals(None, PROMPTS[:1], model, tokenizer, 15, 256)
    sae = open_sae(DEMO_SAE, providers=["CPUExecutionProvider"])
    read = role_mask(resid.roles, CONTENT_ROLES)
    rows = resid.rows if read is None else resid.rows[read]
    assert nmse[0] == pytest.approx(Reconstruction.of(rows, squared_errors(sae, rows)).nmse,
                                    rel=1e-5)
    # The block is a valid detector, flagging what is over its threshold.
    harness = guard_plugin_harness("detectors", settings={"sae-coverage": block})
    x = traffic(10, inside=True)
    spread = float(((x - x.mean(axis=0)) ** 2).sum())
    over = make_feature_batch(activations=np.zeros((10, 0)), positions=range(1, 11),
                              residual=x, phase=Phase.PROMPT, hook=block["hook"],
                              squared_error=np.full(10, spread * nmse.max() * 1.01 / 10))
    [finding] = harness.detect(over)
    assert finding.out_of_distribution and "the 50th percentile" in finding.message


def test_the_calibration_command_refuses_bad_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "benign.txt"
    prompts.write_text("hello there\n", encoding="utf-8")
    assert run_cli("detectors", "reconstruction", "--prompts", str(prompts), "--sae",
                   str(DEMO_SAE), "--min-rows", "1") == 1
    assert "--min-rows: expected at least 2 rows" in capsys.readouterr().err


def test_spans_carry_the_nmse_and_the_out_of_distribution_flag_not_the_rows() -> None:
    """A sampled batch's span (and a step's verdict event) has the request's NMSE and, when
    a reconstruction finding said so, ``guard.decision.out_of_distribution``."""
    from dataclasses import replace

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from guard import Finding
    from guard.telemetry.instruments import decision_attributes, step_attributes
    from guard.testing import make_decision

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    outside = replace(make_decision(findings=[Finding(
        "coverage", 0.93, 0.46, "log", out_of_distribution=True)]), reconstruction_nmse=0.93)
    unsampled = make_decision()
    with tracer.start_as_current_span("batch") as span:
        decision_attributes(span, outside, record_sensitive=False)
    with tracer.start_as_current_span("quiet") as span:
        decision_attributes(span, unsampled, record_sensitive=False)
    with tracer.start_as_current_span("step") as span:
        step_attributes(span, [outside, unsampled], record_sensitive=False)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    batch = dict(spans["batch"].attributes or {})
    assert batch["guard.sae.reconstruction.nmse"] == pytest.approx(0.93)
    assert batch["guard.decision.out_of_distribution"] is True
    quiet = dict(spans["quiet"].attributes or {})
    assert "guard.sae.reconstruction.nmse" not in quiet
    assert "guard.decision.out_of_distribution" not in quiet
    verdicts = [dict(e.attributes or {}) for e in spans["step"].events
                if e.name == "guard.verdict"]
    assert verdicts[0]["guard.decision.out_of_distribution"] is True
    assert "guard.sae.reconstruction.nmse" not in verdicts[1]


@pytest.mark.parametrize("features", [(), (1, 3)])
def test_a_sampled_batch_out_of_the_input_range_is_refused_whatever_is_encoded(
        tmp_path: Path, subspace_sae: Path, features: tuple[int, ...]) -> None:
    """The range check runs once per batch: in the encode when features are subscribed, in
    the reconstruction when only it reads the rows; either way a NaN row is refused."""
    rows = traffic(6, inside=True)
    rows[2, 0] = np.nan
    engine = Engine.load(config_for(tmp_path, subspace_sae, sample=1.0, features=features,
                                    detectors={"coverage": coverage()}))
    try:
        with pytest.raises(InvalidInput, match=r"1 of 6 rows .* out of the range .* positions 3\)"):
            engine.inspect_step(step([rows]), {})
    finally:
        engine.close()
