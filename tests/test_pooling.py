"""Pooling over a request's rows, across its batches: a prompt cut into chunks (vLLM's chunked
prefill) gets the decision the whole prompt gets; ``mean`` waits for the prompt to be
complete (``prompt_complete``, on the wire and in the host SDK); the per-request state is
bounded and freed."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from guard import ConfigError, FeatureBatch, Finding, Phase, RowRole, hookimpl
from guard.config import PluginsConfig, SaeConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSet, PluginSource
from guard.host import GuardClient, Segment
from guard.sidecar.server import GuardServer
from guard.testing import PluginHarnessFactory, make_feature_batch
from guard.v1 import guard_pb2 as pb
from guard_plugins.detectors import Detectors, Pool, PoolTracker
from tests.conftest import D_IN, HOOK, StreamClient, make_batch, make_config
from tests.sae_fixtures import random_standard_weights, write_saelens

MODES: list[dict[str, Any]] = [{"pooling": "mean"}, {"pooling": "max"},
                               {"pooling": "rolling_max", "window": 4}]


def plugin(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("detectors", "test", Detectors)])
    plugins.configure({"detectors": settings})
    return plugins


def detect(plugins: PluginSet, batch: FeatureBatch) -> dict[str, Finding]:
    findings, failures = plugins.detect(batch)
    assert failures == []
    return {f.detector: f for f in findings}


def batch(acts: NDArray[np.float64], positions: Sequence[int], *, complete: bool | None,
          phase: Phase = Phase.PROMPT, request_id: str = "r", roles: Any = None,
          residual: NDArray[np.float32] | None = None) -> FeatureBatch:
    return make_feature_batch(activations=acts, feature_ids=list(range(acts.shape[1])),
                              positions=list(positions), phase=phase, request_id=request_id,
                              roles=roles, prompt_complete=complete, residual=residual)


def chunks(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` rows cut into 2 to 5 chunks at random places."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(1, 5))),
                             replace=False))
    return list(itertools.pairwise([0, *[int(c) for c in cuts], n]))


def run(settings: Mapping[str, Any], acts: NDArray[np.float64],
        parts: list[tuple[int, int]]) -> list[dict[str, Finding]]:
    """The findings of each chunk of one prompt (positions 1...), the last one completing
    it, through a fresh plugin."""
    plugins = plugin(settings)
    found = []
    for start, stop in parts:
        found.append(detect(plugins, batch(acts[start:stop], range(start + 1, stop + 1),
                                           complete=stop == len(acts))))
    return found


DETECTORS: dict[str, dict[str, Any]] = {
    "threshold-any": {"hook": HOOK, "features": [0, 1, 2]},
    "threshold-all": {"hook": HOOK, "features": [0, 1], "combine": "all"},
    "linear": {"type": "linear", "hook": HOOK, "weights": {0: 0.8, 1: -0.5, 2: 0.3},
               "bias": -0.2},
}


def whole_scores(kind: str, mode: Mapping[str, Any], acts: NDArray[np.float64]) -> float:
    """A numpy reference of the pooled score over the whole prompt."""
    if kind == "linear":
        rows = -0.2 + acts @ np.array([0.8, -0.5, 0.3])
        return float(pool(rows[:, None], mode)[0])
    features = [0, 1, 2] if kind == "threshold-any" else [0, 1]
    pooled = pool(acts[:, features], mode)
    return float(pooled.max() if kind == "threshold-any" else pooled.min())


def pool(values: NDArray[np.float64], mode: Mapping[str, Any]) -> NDArray[np.float64]:
    window = int(mode.get("window", 1))
    pooled: NDArray[np.float64]
    if mode["pooling"] == "mean" or (mode["pooling"] == "rolling_max" and len(values) < window):
        pooled = values.mean(axis=0)
    elif mode["pooling"] == "max":
        pooled = values.max(axis=0)
    else:
        pooled = np.array([[values[i:i + window, j].mean() for j in range(values.shape[1])]
                           for i in range(len(values) - window + 1)]).max(axis=0)
    return pooled


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["pooling"])
@pytest.mark.parametrize("kind", list(DETECTORS))
@pytest.mark.parametrize("seed", range(6))
def test_a_prompt_in_chunks_gets_the_whole_prompts_decision_and_score(
        kind: str, mode: dict[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    acts = rng.gamma(1.0, 1.0, size=(n, 3)) * (rng.random((n, 3)) < 0.6)
    if seed % 3 == 0:
        acts = acts[:3]  # fewer rows than the rolling window: the mean of them all
    acts = acts.astype(np.float32).astype(np.float64)  # what the guard's features are
    reference = whole_scores(kind, mode, acts)
    for threshold in (reference - 0.05, reference + 0.05):  # fires, then just does not
        settings = {"d": {**DETECTORS[kind], **mode, "threshold": float(threshold)}}
        whole = run(settings, acts, [(0, len(acts))])[0]
        parts = run(settings, acts, chunks(len(acts), seed))
        fired = [f["d"] for f in parts if "d" in f]
        assert ("d" in whole) == bool(fired) == (threshold <= reference)
        if not fired:
            continue
        assert whole["d"].score == pytest.approx(reference)
        assert fired[-1].score == pytest.approx(reference)  # the pool so far, at its end
        if mode["pooling"] == "mean":
            assert "d" in parts[-1] and len(fired) == 1  # decided once, when complete
        elif kind != "threshold-all":  # (`all` names, per batch, the rows where any is)
            # A row (a window) over the threshold is in the finding of its chunk.
            found = {p for f in fired for p in f.positions}
            assert sorted(found) == list(whole["d"].positions)
        if kind == "linear":  # the features reported reproduce the score
            for finding in fired:
                a = np.array(finding.feature_activations)
                assert -0.2 + a @ np.array([0.8, -0.5, 0.3]) == pytest.approx(finding.score)


def linear(**extra: Any) -> dict[str, Any]:
    return {"type": "linear", "hook": HOOK, "weights": {0: 1.0}, "threshold": 1.0, **extra}


def test_mean_waits_for_the_prompt_and_the_old_fallback_is_per_batch_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    # A jailbreak-like prompt whose first chunk alone averages over the threshold (the
    # template's system prompt did that on vLLM's first chunk) and whose whole does not.
    acts = np.array([[3.0], [3.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    plugins = plugin({"d": linear(pooling="mean")})
    assert detect(plugins, batch(acts[:2], [1, 2], complete=False)) == {}
    assert detect(plugins, batch(acts[2:], range(3, 9), complete=True)) == {}  # mean 0.75
    # A host that never says (prompt_complete unset) gets a decision per batch, and a log.
    plugins = plugin({"d": linear(pooling="mean")})
    with caplog.at_level(logging.INFO, logger="guard_plugins.detectors"):
        early = detect(plugins, batch(acts[:2], [1, 2], complete=None))
        late = detect(plugins, batch(acts[2:], range(3, 9), complete=None))
    assert early["d"].score == pytest.approx(3.0) and late == {}
    assert len([r for r in caplog.records if "prompt_complete" in r.getMessage()]) == 1


def test_mean_decides_at_the_first_generated_row_when_no_batch_completed_the_prompt() -> None:
    acts = np.array([[2.0], [2.0]])
    plugins = plugin({"d": linear(pooling="mean")})
    assert detect(plugins, batch(acts, [1, 2], complete=False)) == {}
    found = detect(plugins, batch(np.array([[2.0]]), [3], complete=None,
                                  phase=Phase.GENERATION))
    assert found["d"].score == pytest.approx(2.0) and "over 3 rows" in found["d"].message


def test_a_last_chunk_of_template_rows_alone_still_completes_the_prompt() -> None:
    plugins = plugin({"d": linear(pooling="mean")})
    user, template = int(RowRole.USER), int(RowRole.TEMPLATE)
    assert detect(plugins, batch(np.array([[2.0], [2.0]]), [1, 2], complete=False,
                                 roles=[user, user])) == {}
    found = detect(plugins, batch(np.array([[-50.0]]), [3], complete=True, roles=[template]))
    assert found["d"].score == pytest.approx(2.0)  # the template row is not read
    assert found["d"].positions == ()  # none of this batch's rows is read


def test_max_and_rolling_max_decide_on_each_batch_and_do_not_repeat_a_finding() -> None:
    plugins = plugin({"peak": linear(), "run": linear(pooling="rolling_max", window=2)})
    first = detect(plugins, batch(np.array([[0.0], [1.5]]), [1, 2], complete=False))
    assert set(first) == {"peak"} and first["peak"].positions == (2,)
    second = detect(plugins, batch(np.array([[0.5], [0.0]]), [3, 4], complete=True))
    # The window (2, 3) straddles the chunks: mean 1.0 reaches the threshold in chunk 2.
    assert set(second) == {"run"} and second["run"].positions == (2, 3)
    assert second["run"].score == pytest.approx(1.0)
    quiet = detect(plugins, batch(np.array([[0.0]]), [5], complete=None,
                                  phase=Phase.GENERATION))
    assert quiet == {}  # nothing new over the threshold: no finding repeated
    again = detect(plugins, batch(np.array([[3.0]]), [6], complete=None,
                                  phase=Phase.GENERATION))
    assert again["peak"].score == pytest.approx(3.0) and again["peak"].positions == (6,)


def test_a_preempted_request_resent_from_its_start_is_pooled_once() -> None:
    plugins = plugin({"high": linear(pooling="mean", threshold=2.5),
                      "low": linear(pooling="mean", threshold=2.3)})
    rows = np.array([[3.0], [3.0], [1.0]])
    assert detect(plugins, batch(rows[:2], [1, 2], complete=False)) == {}
    plugins.request_ended("r", "preempted", "detectors")  # late, and kept: nothing freed
    # Recomputed from its start: pooled afresh (mean 7/3), not on top of the first two rows
    # (which would make 13/5 and fire "high").
    assert detect(plugins, batch(rows[:2], [1, 2], complete=False)) == {}
    found = detect(plugins, batch(rows[2:], [3], complete=True))
    assert set(found) == {"low"} and found["low"].score == pytest.approx(7 / 3)
    assert "over 3 rows" in found["low"].message


def pools_of(harness_plugin: object) -> PoolTracker:
    assert isinstance(harness_plugin, Detectors)
    [detector] = harness_plugin.detectors
    tracker = getattr(detector, "pools", None)
    assert isinstance(tracker, PoolTracker)
    return tracker


@pytest.mark.parametrize("reason", ["finished", "aborted", "evicted", "stream_closed"])
def test_the_end_of_a_request_frees_its_pool_and_a_preemption_does_not(
        guard_plugin_harness: PluginHarnessFactory, reason: Any) -> None:
    harness = guard_plugin_harness("detectors", settings={"d": linear(pooling="mean")})
    tracker = pools_of(harness.plugin)
    for request in ("a", "b"):
        harness.detect(batch(np.array([[0.5]]), [1], complete=False, request_id=request))
    assert len(tracker) == 2
    harness.request_ended("a", "preempted")
    assert len(tracker) == 2
    harness.request_ended("a", reason)
    assert len(tracker) == 1


def test_a_prompt_only_detector_frees_its_pool_once_the_prompt_is_decided(
        guard_plugin_harness: PluginHarnessFactory) -> None:
    for phases, kept in ((["prompt"], 0), (["prompt", "generation"], 1)):
        harness = guard_plugin_harness("detectors", settings={
            "d": linear(pooling="mean", phases=phases)})
        tracker = pools_of(harness.plugin)
        harness.detect(batch(np.array([[0.5]]), [1], complete=False))
        assert len(tracker) == 1
        harness.detect(batch(np.array([[0.5]]), [2], complete=True))
        assert len(tracker) == kept


def test_pool_memory_is_bounded_by_count_and_idleness() -> None:
    tracker = PoolTracker(Pool("rolling_max", 3, lead=True), max_requests=2, idle_seconds=10)
    one = np.array([[1.0, 2.0]])
    for index, request in enumerate(("a", "b", "c")):
        tracker.add(request, one, np.array([1]), now=float(index))
    assert len(tracker) == 2  # "a", least recently updated, was evicted
    assert tracker.add("a", one, np.array([2]), now=3.0).count == 1  # it starts over
    tracker.add("d", one, np.array([1]), now=20.0)  # "b" .. "a" idle too long
    assert len(tracker) == 1
    assert tracker.add("d", one[:0], np.array([], dtype=np.int64), now=21.0).count == 1
    assert tracker.forget("d") and not tracker.forget("d") and len(tracker) == 0
    assert tracker.add("e", one[:0], np.array([], dtype=np.int64)).count == 0
    assert len(tracker) == 0  # a batch without rows starts no state


@pytest.mark.parametrize(("extra", "key", "fragment"), [
    ({"pooling": "median"}, "pooling", "one of mean, max, rolling_max"),
    ({"pooling": "rolling_max"}, "window", "required"),
    ({"pooling": "rolling_max", "window": 0}, "window", "a positive integer"),
    ({"pooling": "max", "window": 3}, "window", "rolling_max"),
    ({"window": 3}, "window", "rolling_max"),
    ({"reduce": "mean", "pooling": "mean"}, "reduce", "not both"),
    ({"reduce": "rolling_max"}, "reduce", "one of max, mean"),
    ({"max_requests": 0}, "max_requests", "a positive integer"),
    ({"idle_seconds": 0}, "idle_seconds", "a number > 0"),
])
def test_bad_pooling_settings_name_their_key(extra: dict[str, Any], key: str,
                                             fragment: str) -> None:
    for settings in (linear(**extra), {"hook": HOOK, "features": [1], "threshold": 1.0,
                                       **extra}):
        with pytest.raises(ConfigError) as caught:
            plugin({"d": settings})
        assert caught.value.key == f"plugins.config.detectors.d.{key}"
        assert fragment in str(caught.value)


def test_reduce_keeps_its_meaning_as_an_alias_of_pooling() -> None:
    acts = np.array([[3.0], [0.0], [0.0]])
    for old, new in (("max", "max"), ("mean", "mean")):
        plugins = plugin({"old": linear(reduce=old), "new": linear(pooling=new)})
        found = detect(plugins, batch(acts, [1, 2, 3], complete=True))
        assert {k: f.score for k, f in found.items() if k == "old"} == {
            k.replace("new", "old"): f.score for k, f in found.items() if k == "new"}
    plugins = plugin({"d": {"hook": HOOK, "features": [0], "threshold": 2.0,
                            "reduce": "mean"}})
    assert detect(plugins, batch(acts, [1, 2, 3], complete=True)) == {}


# -- prompt_complete on the wire and in the host SDK -----------------------------------------


def test_the_wire_refuses_prompt_complete_outside_the_prompt(
        stream: StreamClient) -> None:
    stream.configure()
    generation = make_batch(sequence=1)
    generation.phase = pb.PHASE_GENERATION
    generation.prompt_complete = True
    reply = stream.ask(generation)
    assert reply.error.code == 3 and reply.error.message.startswith("batch.prompt_complete:")
    assert "PHASE_GENERATION" in reply.error.message
    step = make_batch(sequence=2)
    step.ClearField("request_id")
    step.segments.extend([pb.Segment(request_id="a", rows=2, phase=pb.PHASE_PROMPT,
                                     prompt_complete=False),
                          pb.Segment(request_id="b", rows=1, phase=pb.PHASE_GENERATION,
                                     prompt_complete=False)])
    reply = stream.ask(step)
    assert reply.error.message.startswith("batch.segments[1].prompt_complete:")
    fine = make_batch(sequence=3)
    fine.prompt_complete = True
    assert not stream.ask(fine).HasField("error")


def test_the_host_sdk_checks_prompt_complete(tmp_path: Path) -> None:
    with GuardClient(f"unix://{tmp_path}/none.sock", hooks=[HOOK]) as client:
        rows = np.zeros((1, D_IN), dtype=np.float32)
        with pytest.raises(ValueError, match="prompt_complete: only for prompt rows"):
            client.inspect("r", HOOK, rows, [1], phase="generation", prompt_complete=True)
        with pytest.raises(TypeError, match="prompt_complete: expected True, False or None"):
            client.inspect("r", HOOK, rows, [1], prompt_complete=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"segments\[0\].prompt_complete"):
            client.inspect_step(HOOK, rows, [Segment("r", 1, "generation",
                                                     prompt_complete=False)], [1])


# -- through a real guard: chunked prefill over gRPC ------------------------------------------


def test_a_chunked_prompt_is_judged_whole_through_a_real_guard(tmp_path: Path) -> None:
    # A linear detector on the sum of every feature, mean-pooled, that the first chunk of
    # this prompt alone fires and the whole prompt does not: what vLLM's chunked prefill did
    # to the demo's detector. Over gRPC, with the host SDK's segments.
    weights = random_standard_weights(D_IN, 64, seed=5)
    sae = write_saelens(tmp_path / "sae", D_IN, 64, hook_name=HOOK, weights=weights)
    rows = np.random.default_rng(3).normal(size=(8, D_IN)).astype(np.float32)
    per_row = np.maximum((rows - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"],
                         0.0).sum(axis=1).astype(np.float64)
    order = np.argsort(-per_row, kind="stable")  # the highest rows first: chunk 1 is high
    rows, per_row = rows[order], per_row[order]
    bias = -float((per_row[:3].mean() + per_row.mean()) / 2)
    assert per_row[:3].mean() + bias > 0 > per_row.mean() + bias
    detector = {"type": "linear", "hook": HOOK, "weights": {f: 1.0 for f in range(64)},
                "bias": bias, "threshold": 0.0, "pooling": "mean", "action": "abort"}
    config = dataclasses.replace(
        make_config(tmp_path, sae), saes=(SaeConfig(path=sae),),
        plugins=PluginsConfig(enabled=("detectors",), timeout_ms=30_000,
                              config={"detectors": {"avg": detector}}))
    server = GuardServer(config)
    server.start()
    try:
        server.set_ready(Engine.load(config))
        with GuardClient(server.addresses[0], hooks=[HOOK]) as client:
            def prompt(request: str, complete: tuple[bool | None, bool | None]
                       ) -> list[Any]:
                first = client.inspect_step(
                    HOOK, rows[:3], [Segment(request, 3, "prompt", prompt_complete=complete[0])],
                    [1, 2, 3])
                second = client.inspect_step(
                    HOOK, rows[3:], [Segment(request, 5, "prompt",
                                             prompt_complete=complete[1])], list(range(4, 9)))
                return [first.verdicts[0], second.verdicts[0]]

            judged = prompt("says", (False, True))
            unsaid = prompt("old-host", (None, None))
            whole = client.inspect_step(HOOK, rows, [Segment("whole", 8, "prompt",
                                                             prompt_complete=True)],
                                        list(range(1, 9))).verdicts[0]
    finally:
        server.stop(0)
    assert [v.action for v in judged] == [Action.CONTINUE, Action.CONTINUE]
    assert whole.action is Action.CONTINUE
    # A host that does not say gets a decision per batch: the first chunk alone aborts.
    assert unsaid[0].action is Action.ABORT and "avg" in unsaid[0].details


# -- what hosts send: the transformers attach, and what the engine hands to plugins -------------


class Seen:
    """A plugin that keeps, per batch, its request, phase, prompt_complete and raw rows."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, Phase, bool | None, NDArray[np.float32] | None]] = []

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        residual = None if batch.residual is None else batch.residual.copy()
        if batch.residual is not None:
            assert not batch.residual.flags.writeable  # shared by every plugin
        self.batches.append((batch.request_id, batch.phase, batch.prompt_complete, residual))


def test_the_transformers_attach_says_its_prompts_are_whole_and_plugins_get_the_rows(
        tmp_path: Path, sae_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from guard.host.attach import attach

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=D_IN, intermediate_size=32, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)).eval()
    seen = Seen()
    config = dataclasses.replace(make_config(tmp_path, sae_dir, drain_grace_seconds=1),
                                 plugins=PluginsConfig(autoload=False, timeout_ms=30_000))
    server = GuardServer(config)
    server.start()
    try:
        server.set_ready(Engine.load(config, extra_plugins=[PluginSource("seen", "0", seen)]))
        with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=30_000) as client, \
                attach(model, client, [HOOK]) as attachment, torch.no_grad():
            prompt = torch.tensor([[1, 5, 9, 13, 17]])
            with attachment.request("one"):
                model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
            with attachment.requests(["a", "b"]):
                model.generate(torch.tensor([[1, 5, 9], [1, 7, 11]]), max_new_tokens=2,
                               do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones(2, 3, dtype=torch.long))
            hidden = model(prompt, output_hidden_states=True).hidden_states[7][0, 1:].numpy()
    finally:
        server.stop(0)
    said = [(r, p, c) for r, p, c, _ in seen.batches]
    assert said[0] == ("one", Phase.PROMPT, True)
    assert ("one", Phase.GENERATION, None) in said
    assert {("a", Phase.PROMPT, True), ("b", Phase.PROMPT, True)} <= set(said)
    assert all(c is None for _, p, c in said if p is Phase.GENERATION)
    residual = seen.batches[0][3]
    assert residual is not None
    np.testing.assert_allclose(residual, hidden, rtol=1e-5, atol=1e-6)  # the rows sent


def test_recorded_batches_keep_prompt_complete_and_never_the_residual(tmp_path: Path) -> None:
    from guard.recording import load_batches, save_batches

    rows = np.full((2, D_IN), 7.25, dtype=np.float32)
    saved = [batch(np.ones((2, 1)), [1, 2], complete=value, residual=rows)
             for value in (False, True, None)]
    save_batches(tmp_path / "b.npz", saved)
    loaded = load_batches(tmp_path / "b.npz")
    assert [b.prompt_complete for b in loaded] == [False, True, None]
    assert all(b.residual is None for b in loaded)
    with np.load(tmp_path / "b.npz") as data:
        assert not any((data[k] == 7.25).any() for k in data.files
                       if data[k].dtype.kind == "f")


def test_two_streams_naming_a_request_alike_keep_their_own_pools(
        guard_plugin_harness: PluginHarnessFactory) -> None:
    harness = guard_plugin_harness("detectors", settings={
        "d": linear(pooling="mean", threshold=2.0)})
    host_a = dataclasses.replace(batch(np.array([[3.0], [3.0]]), [1, 2], complete=False),
                                 stream="a")
    host_b = dataclasses.replace(batch(np.array([[1.0]]), [3], complete=True), stream="b")
    assert harness.detect(host_a) == []
    assert harness.detect(host_b) == []  # its own mean: 1.0 (not 7/3 with host a's rows)
    [finding] = harness.detect(dataclasses.replace(
        batch(np.array([[3.0]]), [3], complete=True), stream="a"))
    assert finding.score == pytest.approx(3.0) and "over 3 rows" in finding.message
    tracker = pools_of(harness.plugin)
    harness.detect(dataclasses.replace(batch(np.array([[1.0]]), [1], complete=False),
                                       stream="c"))
    harness.detect(dataclasses.replace(batch(np.array([[1.0]]), [1], complete=False,
                                             request_id="other"), stream="c"))
    assert len(tracker) == 4
    harness.request_ended("r", "finished")  # the end names the request: every stream's
    assert len(tracker) == 1
