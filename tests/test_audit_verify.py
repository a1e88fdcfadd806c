"""``guard features verify`` and ``guard steer sweep`` on a tiny random Llama and a tiny SAE:
the edit is the engine's delta, each measure and control computes what it says, the sweep's
suggestion, and bad input."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.audit import sweep as sw
from guard.audit import verify as v
from guard.decision import FeatureBatch, FeatureEdit, Phase, RowRole
from guard.engine.deltas import build_delta
from guard.errors import InvalidInput

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["Hello there", "Tell me how to bake bread", "What is two plus two?"]
BENIGN = ["The water cycle moves water between the sea and the sky.",
          "Bread is made of flour, water, yeast and salt."]


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> v.Subject:
    """A tiny random Llama (3 layers, d 32) with SmolLM2's tokenizer (its chat template),
    and a random 48-feature SAE at layer 1."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("guard.models.smollm2")
    from transformers import LlamaConfig, LlamaForCausalLM

    from guard.sae import open_sae
    from tests.sae_fixtures import write_saelens

    try:
        models.smollm2_gguf_dir()
    except models.ModelUnavailable as exc:  # pragma: no cover - make test installs it
        pytest.skip(f"SmolLM2 not installed: {exc}")
    _model, tokenizer = models.load_smollm2()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    model: Any = LlamaForCausalLM(config)
    model.eval()
    sae = open_sae(write_saelens(tmp_path_factory.mktemp("sae"), 32, 48, hook_name=HOOK))
    return v.Subject(model, tokenizer, sae)


def active(subject: v.Subject, n: int = 2) -> list[int]:
    """Features that fire on the first prompt's rows (an edit of them changes something)."""
    rows = subject.rows(v.chat_tokens(subject.tokenizer, PROMPTS[0]))
    acts = subject.sae.encoder(None).encode(rows)
    return [int(f) for f in np.argsort(-(acts > 0).sum(axis=0), kind="stable")[:n]]


def ablate(subject: v.Subject, features: list[int],
           roles: frozenset[RowRole] | None = None) -> v.Intervention:
    return v.Intervention("edit", v.FeatureEdits(subject.hook, tuple(features), "pin", 0.0,
                                                 roles))


def plain_logits(subject: v.Subject, ids: list[int] | tuple[int, ...]) -> Any:
    import torch

    with torch.no_grad():
        return subject.model(input_ids=torch.tensor([list(ids)])).logits[0]


# -- the edit --------------------------------------------------------------------------------


def test_the_edit_is_the_engines_delta(subject: v.Subject) -> None:
    """Ablating a feature adds -a_f * d_f to each row but position 0: build_delta's answer on
    the batch the host sends; the hooked model gets exactly that at the layer's output."""
    import torch

    feature = active(subject, 1)[0]
    tokens = v.chat_tokens(subject.tokenizer, PROMPTS[1])
    rows = subject.rows(tokens)
    delta = ablate(subject, [feature]).sequence_delta(subject.sae, tokens, rows)
    assert delta is not None
    current = subject.sae.encoder([feature]).encode(rows)[:, 0]
    direction = subject.sae.decoder_directions([feature])[0]
    np.testing.assert_allclose(delta, -current[:, None] * direction[None, :], atol=1e-5)
    batch = FeatureBatch(
        request_id="x", sequence=1, hook=HOOK, feature_ids=np.array([feature]),
        activations=current[:, None], positions=np.arange(1, len(rows) + 1), token_ids=None,
        phase=Phase.PROMPT, feature_labels={}, sae_sha256="")
    engine = build_delta(batch, [FeatureEdit(HOOK, feature, "pin", 0.0)],
                         subject.sae.decoder_directions).delta
    assert engine is not None
    np.testing.assert_allclose(delta, engine, atol=1e-6)
    ids = torch.tensor([list(tokens.ids)])
    with torch.no_grad():
        clean = subject.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        with subject.hooked(ablate(subject, [feature]), tokens.roles):
            edited = subject.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(edited[1:].numpy(), clean[1:].numpy() + delta, atol=1e-4)
    np.testing.assert_array_equal(edited[0].numpy(), clean[0].numpy())


def test_rows_of_other_roles_are_not_edited(subject: v.Subject) -> None:
    features = active(subject, 3)
    tokens = v.chat_tokens(subject.tokenizer, PROMPTS[1])
    rows = subject.rows(tokens)
    delta = ablate(subject, features, frozenset({RowRole.USER})).sequence_delta(
        subject.sae, tokens, rows)
    assert delta is not None and tokens.roles is not None
    user = tokens.roles[1:] == RowRole.USER
    assert np.abs(delta[~user]).max() == 0.0
    assert np.abs(delta[user]).max() > 0.0


def shortcut(subject: v.Subject) -> bool | None:
    return subject.fast


def test_the_upper_layers_alone_give_the_whole_models_logits(subject: v.Subject) -> None:
    """The shortcut (the hook's rows once, then only the layers above it) against the whole
    model with the delta added by a forward hook, with padding and a continuation."""
    features = active(subject)
    sequences = [v.chat_tokens(subject.tokenizer, PROMPTS[0]),
                 v.continued(v.chat_tokens(subject.tokenizer, PROMPTS[1]), [11, 12, 13])]
    wanted = [list(range(len(s))) for s in sequences]
    subject.fast = None
    fast = subject.logits(sequences, wanted, ablate(subject, features))
    assert shortcut(subject) is True  # the check passed on a Llama
    subject.fast = False
    try:
        full = subject.logits(sequences, wanted, ablate(subject, features))
    finally:
        subject.fast = True
    for a, b in zip(fast, full, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4)
    clean = subject.logits(sequences[:1], wanted[:1], v.Intervention("none"))[0]
    np.testing.assert_allclose(clean.numpy(), plain_logits(subject, sequences[0].ids).numpy(),
                               atol=2e-4)
    assert not np.allclose(clean.numpy(), fast[0].numpy(), atol=1e-3)  # the edit did something


# -- measures --------------------------------------------------------------------------------


def log_prob(subject: v.Subject, prompt: str, text: str) -> float:
    import torch

    tokens = v.chat_tokens(subject.tokenizer, prompt)
    cont = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = plain_logits(subject, [*tokens.ids, *cont])
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(tokens) - 1 + i, t] for i, t in enumerate(cont)))


def test_logodds_is_the_log_probability_of_one_continuation_over_the_other(
        subject: v.Subject) -> None:
    measure = v.LogOdds(["Sorry, no."], ["Sure, here", "Of course"])
    measure.prepare(subject, PROMPTS)
    got = measure.values(subject, v.Intervention("none"))
    for i, prompt in enumerate(PROMPTS):
        away = np.logaddexp(log_prob(subject, prompt, "Sure, here"),
                            log_prob(subject, prompt, "Of course")) - math.log(2)
        assert got[i] == pytest.approx(log_prob(subject, prompt, "Sorry, no.") - away,
                                       abs=1e-3)
    edited = measure.values(subject, ablate(subject, active(subject)))
    assert np.abs(edited - got).max() > 1e-4


def test_kl_is_zero_without_an_edit_and_the_divergence_with_one(subject: v.Subject) -> None:
    import torch

    measure = v.NextTokenKL()
    measure.prepare(subject, PROMPTS)
    assert measure.values(subject, v.Intervention("none")) == pytest.approx(0.0, abs=1e-6)
    edit = ablate(subject, active(subject))
    kl = measure.values(subject, edit)
    tokens = v.chat_tokens(subject.tokenizer, PROMPTS[0])
    p = torch.log_softmax(plain_logits(subject, tokens.ids)[-1], -1)
    with subject.hooked(edit, tokens.roles):
        q = torch.log_softmax(plain_logits(subject, tokens.ids)[-1], -1)
    assert kl[0] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-3, abs=1e-6)
    assert (kl > 0).all()


def test_detector_score_on_the_generated_tokens(subject: v.Subject) -> None:
    """The detector's own score (max pooling over the generated tokens' rows, as the plugin
    computes it) equals the max of its features on the rows of the greedy tokens."""
    import torch

    features = active(subject, 2)
    block = {"type": "threshold", "hook": HOOK, "features": features, "threshold": 99.0,
             "phases": ["prompt"], "action": "abort"}
    measure = v.DetectorScore("d", block, new_tokens=4)
    measure.prepare(subject, PROMPTS[:2])
    got = measure.values(subject, v.Intervention("none"))
    for i, prompt in enumerate(PROMPTS[:2]):
        tokens = v.chat_tokens(subject.tokenizer, prompt)
        ids = torch.tensor([list(tokens.ids)])
        with torch.no_grad():
            out = subject.model.generate(ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=4, min_new_tokens=4, do_sample=False)
            hidden = subject.model(input_ids=out, output_hidden_states=True).hidden_states[2][0]
        rows = np.ascontiguousarray(hidden[len(tokens):len(tokens) + 3].numpy())
        expected = subject.sae.encoder(features).encode(rows).max()
        assert got[i] == pytest.approx(float(expected), abs=1e-4)
    weights = np.random.default_rng(5).standard_normal(32).round(3).tolist()
    probe = v.DetectorScore("p", {"type": "probe", "hook": HOOK, "weights": weights,
                                  "bias": 0.5, "threshold": 9.0, "pooling": "mean"},
                            new_tokens=4)
    probe.prepare(subject, PROMPTS[:1])
    tokens = v.chat_tokens(subject.tokenizer, PROMPTS[0])
    _ids, capture = subject.generate(tokens, v.Intervention("none"), 4)
    rows = np.concatenate([r for p, r in capture if p[0] >= len(tokens)])
    assert probe.values(subject, v.Intervention("none"))[0] == pytest.approx(
        float((0.5 + rows.astype(np.float64) @ np.array(weights)).mean()), abs=1e-4)
    with pytest.raises(InvalidInput, match="sustained detector"):
        v.DetectorScore("s", {"type": "sustained", "hook": HOOK, "features": [1],
                              "threshold": 1.0, "window": 2})
    with pytest.raises(InvalidInput, match="include generated"):
        v.DetectorScore("u", {**block, "rows": ["user"]})
    other = v.DetectorScore("o", {**block, "hook": "blocks.2.hook_resid_post"})
    with pytest.raises(InvalidInput, match=r"the detector reads 'blocks\.2\.hook_resid_post'"):
        other.prepare(subject, PROMPTS)


def test_marker_counts_matching_answers(subject: v.Subject) -> None:
    everything = v.MarkerRate(re.compile(r"."), new_tokens=3)
    everything.prepare(subject, PROMPTS[:2])
    assert everything.values(subject, v.Intervention("none")).tolist() == [1.0, 1.0]
    assert len(everything.answers["none"]) == 2
    nothing = v.MarkerRate(re.compile(r"(?!)"), new_tokens=3)
    nothing.prepare(subject, PROMPTS[:2])
    assert nothing.values(subject, v.Intervention("none")).tolist() == [0.0, 0.0]


def last_logit(model: Any, tokenizer: Any, prompt: str) -> float:
    """A user's measure: the logit of token 5 after the chat prompt."""
    import torch

    from guard.models.smollm2 import chat_input_ids

    with torch.no_grad():
        return float(model(input_ids=chat_input_ids(
            tokenizer, [{"role": "user", "content": prompt}])).logits[0, -1, 5])


def broken(model: Any, tokenizer: Any, prompt: str) -> float:
    raise ZeroDivisionError("no measure today")


def not_a_number(model: Any, tokenizer: Any, prompt: str) -> Any:
    return "high"


def test_a_callable_measure_runs_with_the_edit_in_place(subject: v.Subject) -> None:
    measure = v.CallableMeasure(f"{__name__}:last_logit")
    measure.prepare(subject, PROMPTS)
    clean = measure.values(subject, v.Intervention("none"))
    assert clean.tolist() == pytest.approx(
        [last_logit(subject.model, subject.tokenizer, p) for p in PROMPTS], abs=1e-5)
    edited = measure.values(subject, ablate(subject, active(subject)))
    assert np.abs(edited - clean).max() > 1e-5


def test_a_callable_that_raises_or_returns_junk_is_named(subject: v.Subject) -> None:
    measure = v.CallableMeasure(f"{__name__}:broken")
    measure.prepare(subject, PROMPTS)
    with pytest.raises(InvalidInput, match=r"--measure tests\.test_audit_verify:broken: raised "
                       r"ZeroDivisionError on prompt 0 \(none\): no measure today"):
        measure.values(subject, v.Intervention("none"))
    junk = v.CallableMeasure(f"{__name__}:not_a_number")
    junk.prepare(subject, PROMPTS)
    with pytest.raises(InvalidInput, match="expected a finite number, found 'high'"):
        junk.values(subject, v.Intervention("none"))
    with pytest.raises(InvalidInput, match="cannot import 'no_such_module_x'"):
        v.CallableMeasure("no_such_module_x:f")
    with pytest.raises(InvalidInput, match="has no function 'missing'"):
        v.CallableMeasure(f"{__name__}:missing")
    with pytest.raises(InvalidInput, match="expected logodds, refusal, kl"):
        v.parse_measure("nonsense")


def test_benign_loss_is_the_mean_next_token_loss(subject: v.Subject) -> None:
    import torch

    loss = v.BenignLoss(BENIGN)
    loss.prepare(subject)
    got = loss.values(subject, v.Intervention("none"))
    for i, text in enumerate(BENIGN):
        ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
        logits = plain_logits(subject, ids)
        expected = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
        assert got[i] == pytest.approx(float(expected), abs=1e-4)
    with pytest.raises(InvalidInput, match="--benign"):
        v.BenignLoss([])


# -- controls and statistics ---------------------------------------------------------------


def test_matched_features_come_from_the_targets_firing_rate_neighbourhood() -> None:
    rates = np.linspace(0.0, 1.0, 101)  # feature i fires at i %
    rng = np.random.default_rng(0)
    for _ in range(20):
        picks = v.matched_features(rates, [50, 90], exclude={49, 51}, rng=rng, window=3)
        assert picks[0] not in {49, 50, 51, 90} and abs(picks[0] - 50) <= 4
        assert picks[1] not in {50, 90} and abs(picks[1] - 90) <= 4
        assert picks[0] != picks[1]
    with pytest.raises(InvalidInput, match="no feature left to match feature 1"):
        v.matched_features(np.array([0.1, 0.2]), [1], exclude={0},
                           rng=np.random.default_rng(0))


def test_random_direction_keeps_each_rows_norm() -> None:
    rng = np.random.default_rng(3)
    delta = rng.standard_normal((5, 16)).astype(np.float32)
    delta[2] = 0.0
    moved = v.random_direction(16, rng)(delta)
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), np.linalg.norm(delta, axis=1),
                               rtol=1e-5)
    unit = moved[0] / np.linalg.norm(moved[0])
    for row in (1, 3, 4):  # one direction for every row
        np.testing.assert_allclose(moved[row] / np.linalg.norm(moved[row]), unit, atol=1e-5)
    other = v.random_direction(16, rng)(delta)
    assert abs(float(other[0] @ moved[0])) < 0.99 * float(moved[0] @ moved[0])


def test_bootstrap_interval() -> None:
    values = np.arange(20, dtype=np.float64)
    est = v.bootstrap(values, resamples=4000, seed=1)
    assert est.mean == 9.5
    assert 6.5 < est.low < 9.5 < est.high < 12.5
    assert v.bootstrap(np.full(7, 2.0)) == v.Estimate(2.0, 2.0, 2.0)
    draws = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan]])  # a NaN drops that prompt
    assert v.bootstrap(draws).mean == pytest.approx(2.5)
    assert math.isnan(v.bootstrap(np.array([np.nan])).mean)


def test_verify_reports_the_edit_against_the_controls(subject: v.Subject) -> None:
    features = active(subject, 2)
    measure = v.LogOdds(["Sorry"], ["Sure"])
    result = v.verify(subject, targets=[[features[0]], features], measure=measure,
                      prompts=PROMPTS, benign=BENIGN, draws=2, resamples=500, seed=4,
                      exclude=[47], labels={features[0]: "first"})
    assert [t.features for t in result.targets] == [[features[0]], features]
    assert result.targets[0].labels == ["first"]
    clean = measure.values(subject, v.Intervention("none"))
    assert result.clean.mean == pytest.approx(float(clean.mean()))
    for target in result.targets:
        random_features = target.controls["random features"]
        assert len(random_features.draw_features) == 2 == len(random_features.draws)
        for drawn in random_features.draw_features:
            assert len(drawn) == len(target.features)
            assert not set(drawn) & {*features, 47}
        assert len(target.controls["random direction"].draws) == 2
        none = target.controls["none"]
        assert none.effect == v.Estimate(0.0, 0.0, 0.0) and none.per_prompt == [0.0] * 3
        # the effect is the edited measure minus the clean one, prompt by prompt
        edited = measure.values(subject, ablate(subject, target.features))
        assert target.edit.per_prompt == pytest.approx((edited - clean).tolist(), abs=1e-6)
        difference = np.array(target.edit.per_prompt) - np.array(random_features.per_prompt)
        assert target.over_features.mean == pytest.approx(float(difference.mean()))
        assert target.edit.loss_relative.mean == pytest.approx(
            target.edit.loss_delta.mean / result.clean_loss)
    record = result.as_dict()
    assert record["targets"][1]["controls"]["random features"]["draw_features"]
    text = v.format_verify(result)
    assert "random direction" in text and "first" in text


def test_verify_refuses_bad_input(subject: v.Subject) -> None:
    measure = v.NextTokenKL()
    with pytest.raises(InvalidInput, match="--prompts: expected at least one prompt, found an "
                       "empty set"):
        v.verify(subject, targets=[[1]], measure=measure, prompts=[], benign=BENIGN)
    with pytest.raises(InvalidInput, match=r"feature 4800 is not a feature of the SAE at "
                       r"blocks\.1\.hook_resid_post \(expected ids in \[0, 48\)\)"):
        v.verify(subject, targets=[[1, 4800]], measure=measure, prompts=PROMPTS,
                 benign=BENIGN)
    with pytest.raises(InvalidInput, match="--draws"):
        v.verify(subject, targets=[[1]], measure=measure, prompts=PROMPTS, benign=BENIGN,
                 draws=0)


def test_detector_files_and_their_features(tmp_path: Path) -> None:
    config = tmp_path / "detectors.yaml"
    config.write_text(
        "plugins:\n  config:\n    detectors:\n"
        "      jb-f1: {type: threshold, hook: h, features: [1], threshold: 1}\n"
        "      jb-f2: {type: threshold, hook: h, features: [2, 1], threshold: 1}\n"
        "      lin: {type: linear, hook: h, weights: {3: 0.5, 1: -4.0}, threshold: 0}\n")
    chosen, everything = v.read_detectors(f"{config}:jb-f*")
    assert list(chosen) == ["jb-f1", "jb-f2"] and len(everything) == 3
    assert v.detector_features(chosen) == {1: 1.0, 2: 1.0}
    both, _ = v.read_detectors(f"{config}:lin,jb-f1")
    assert v.detector_features(both) == {3: 0.5, 1: -4.0}
    with pytest.raises(InvalidInput, match="no detector 'nope' in"):
        v.read_detectors(f"{config}:nope")
    with pytest.raises(InvalidInput, match="expected FILE:NAME"):
        v.read_detectors(str(config))
    with pytest.raises(InvalidInput, match="needs the file the detector is read from"):
        v.parse_measure("detector:lin")
    with pytest.raises(InvalidInput, match="no detector 'x' in --detector"):
        v.parse_measure("detector:x", detectors=everything)


# -- the sweep -------------------------------------------------------------------------------


def test_suggested_strength_is_the_last_within_budget() -> None:
    assert sw.suggest_strength([0, 1, 2, 3], [0.0, 0.05, 0.09, 0.2], 0.10) == 2
    assert sw.suggest_strength([3, 0, 2, 1], [0.2, 0.0, 0.09, 0.05], 0.10) == 2  # any order
    assert sw.suggest_strength([0, 1, 2, 3], [0.0, 0.2, 0.05, 0.05], 0.10) == 0  # stops at 1
    assert sw.suggest_strength([1, 2], [0.3, 0.01], 0.10) is None
    assert sw.suggest_strength([0, -1, 1, 2], [0.0, 0.12, 0.01, 0.01], 0.10) == 0  # |1| together
    assert sw.suggest_strength([0, -2, -4], [0.0, 0.01, 0.02], 0.10) == -4
    assert sw.suggest_strength([0, 1], [0.0, math.nan], 0.10) == 0
    with pytest.raises(InvalidInput, match="--budget"):
        sw.suggest_strength([0], [0.0], -0.1)


def test_strengths_parse() -> None:
    assert sw.parse_strengths("0,0.5,2") == [0.0, 0.5, 2.0]
    assert sw.parse_strengths("0:2:5") == [0.0, 0.5, 1.0, 1.5, 2.0]
    for bad in ("", "a,b", "1,1", "0,inf"):
        with pytest.raises(InvalidInput, match="--strengths"):
            sw.parse_strengths(bad)


def test_sweep_scales_the_rules_delta(subject: v.Subject) -> None:
    feature = active(subject, 1)[0]
    rule = sw.edit_rule(HOOK, feature, "nudge", 3.0)
    policy = v.PluginPolicy(HOOK, rule)
    try:
        result = sw.sweep(subject, policy, rule=sw.describe_rule(rule), strengths=[0, 1, 4],
                          measure=v.NextTokenKL(), prompts=PROMPTS, benign=BENIGN,
                          budget=1e9, resamples=200)
    finally:
        policy.close()
    zero, one, four = result.points
    assert zero.effect == v.Estimate(0.0, 0.0, 0.0)
    assert zero.loss_delta.mean == pytest.approx(0.0, abs=1e-6)
    assert 0 < one.effect.mean < four.effect.mean
    assert result.suggested == 4  # the budget is out of reach
    assert sw.describe_rule(rule) == f"cli: nudge f{feature} by 3.0"
    # strength s is the nudge of s * 3 through the steering plugin: the same as a rule of 12
    big = v.PluginPolicy(HOOK, sw.edit_rule(HOOK, feature, "nudge", 12.0))
    try:
        measure = v.NextTokenKL()
        measure.prepare(subject, PROMPTS)
        direct = measure.values(subject, v.Intervention("12", big))
    finally:
        big.close()
    assert four.per_prompt == pytest.approx(direct.tolist(), rel=1e-4, abs=1e-7)
    assert "suggested strength: 4" in sw.format_sweep(result)


def test_a_conditional_rule_only_steers_when_its_detector_fires(subject: v.Subject,
                                                                tmp_path: Path) -> None:
    feature = active(subject, 1)[0]
    config = tmp_path / "guard.yaml"
    config.write_text(
        "plugins:\n  config:\n    detectors:\n"
        f"      never: {{hook: {HOOK}, features: [{feature}], threshold: 1000000000}}\n"
        f"      always: {{hook: {HOOK}, features: [{feature}], threshold: -1.0}}\n"
        "    steering:\n"
        f"      quiet: {{hook: {HOOK}, when: never, edits: [{{feature: {feature}, "
        "nudge: 5}]}\n"
        f"      loud: {{hook: {HOOK}, when: always, edits: [{{feature: {feature}, "
        "nudge: 5}]}\n")
    for name, moves in (("quiet", False), ("loud", True)):
        rule, detectors = sw.rule_blocks(config, name)
        assert set(detectors) == {"never", "always"}
        policy = v.PluginPolicy(HOOK, rule, detectors)
        try:
            result = sw.sweep(subject, policy, rule=sw.describe_rule(rule), strengths=[1.0],
                              measure=v.NextTokenKL(), prompts=PROMPTS, benign=BENIGN,
                              resamples=100)
        finally:
            policy.close()
        assert (result.points[0].effect.mean > 1e-6) is moves
    with pytest.raises(InvalidInput, match="no steering rule 'nope'"):
        sw.rule_blocks(config, "nope")
    with pytest.raises(InvalidInput, match=r"steering rule: plugins\.config\.steering\.bad"):
        v.PluginPolicy(HOOK, {"bad": {"hook": HOOK, "edits": []}})


# -- reports and the command line ----------------------------------------------------------


def test_reports_render(subject: v.Subject) -> None:
    features = active(subject, 2)
    result = v.verify(subject, targets=[features], measure=v.NextTokenKL(), prompts=PROMPTS,
                      benign=BENIGN, draws=1, resamples=100, labels={features[0]: "<b>x</b>"})
    png = v.verify_png(result)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
    page = v.verify_html(result, png, "guard features verify ...")
    assert "data:image/png;base64," in page and "&lt;b&gt;x&lt;/b&gt;" in page
    rule = sw.edit_rule(HOOK, features[0], "nudge", 2.0)
    policy = v.PluginPolicy(HOOK, rule)
    try:
        swept = sw.sweep(subject, policy, rule=sw.describe_rule(rule), strengths=[0, 1, 2],
                         measure=v.MarkerRate(re.compile("."), new_tokens=3),
                         prompts=PROMPTS[:2], benign=BENIGN, resamples=100)
    finally:
        policy.close()
    curve = sw.sweep_png(swept)
    assert curve.startswith(b"\x89PNG\r\n\x1a\n") and len(curve) < 200_000
    page = sw.sweep_html(swept, curve)
    assert "Suggested strength" in page and "strength 2" in page  # answers per strength


def run_cli(*argv: str) -> int:
    from guard.audit.cli import register

    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


SAE = "guard/defaults/saes/smollm2-135m-instruct/blocks.15.hook_resid_post"


def test_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (("features", "verify"), ("steer", "sweep")):
        with pytest.raises(SystemExit) as info:
            run_cli(*command, "--help")
        assert info.value.code == 0
        assert "usage: guard " + " ".join(command) in capsys.readouterr().out


def test_commands_name_bad_input_before_running_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        (("features", "verify", "--sae", SAE, "--features", "12,99999"),
         "feature 99999 is not a feature of the SAE at blocks.15.hook_resid_post"),
        (("features", "verify", "--sae", SAE, "--features", "12", "--prompts", str(empty)),
         "expected at least one prompt"),
        (("features", "verify", "--sae", SAE, "--features", "12", "--measure",
          "no_such_module_x:score"), "cannot import 'no_such_module_x'"),
        (("features", "verify", "--sae", SAE, "--features", "1,x"),
         "--features: expected comma-separated integers"),
        (("steer", "sweep", "--sae", SAE, "--feature", "3", "--nudge", "2", "--strengths",
          "1,1"), "--strengths: each strength once"),
        (("steer", "sweep", "--sae", SAE, "--feature", "3"), "needs one of --nudge"),
        (("steer", "sweep", "--sae", SAE, "--rule", "guard/defaults/demo.yaml:nope"),
         "no steering rule 'nope'"),
    ]
    for argv, message in cases:
        assert run_cli(*argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_draws_of_random_features_do_not_repeat_while_they_can() -> None:
    rates = np.linspace(0.0, 1.0, 101)
    picks = v._draws(rates, [50], {50}, np.random.default_rng(0), window=2, draws=4)
    assert len({p[0] for p in picks}) == 4  # no feature twice
    assert picks[0][0] in {48, 49, 51, 52}  # the nearest in firing rate first
    assert all(abs(p[0] - 50) <= 5 for p in picks)  # then the nearest left
    few = np.array([0.1, 0.2, 0.3])
    again = v._draws(few, [1], {1}, np.random.default_rng(0), window=2, draws=4)
    assert {p[0] for p in again} == {0, 2}  # two candidates: they repeat after that

