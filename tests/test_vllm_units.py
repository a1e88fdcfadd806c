"""The vLLM integration's parts that need no vLLM: its settings, the step manifest (which rows
are whose), the board that carries ABORTs from the worker to the scheduler, the start-up
refusals, and the SmolLM2 copy vLLM loads. The real engine is in tests/test_vllm.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from guard.vllm.manifest import AbortBoard, GuardAbort, build_manifest, client_request_id
from guard.vllm.settings import VllmGuardSettings, VllmSetupError, layer_of


def test_the_client_sees_its_own_request_id() -> None:
    assert client_request_id("chatcmpl-42-0a1b2c3d", None, "guard_request_id") == "chatcmpl-42"
    assert client_request_id("7-0a1b2c3d", {"guard_request_id": "mine"},
                             "guard_request_id") == "mine"
    assert client_request_id("no-suffix", {}, "guard_request_id") == "no-suffix"


def test_a_step_of_a_prefill_chunk_and_a_decode_row() -> None:
    # Request A's first 31-row prompt chunk (positions 0..30: the BOS row is not sent), then
    # request B's decode row at 40 (prompt 12 long); C is in the batch with no rows this step.
    positions = np.array([*range(31), 40, 99], dtype=np.int64)  # a padding row at the end
    manifest = build_manifest(["a-00000000", "b-11111111", "c-22222222"], ["A", "B", "C"],
                              [31, 1, 0], [50, 12, 5], positions,
                              np.arange(33, dtype=np.int64))
    assert [s.request_id for s in manifest.segments] == ["A", "B"]
    assert [s.rows for s in manifest.segments] == [30, 1]
    assert [s.phase for s in manifest.segments] == ["prompt", "generation"]
    assert manifest.rows == 31 and manifest.step_rows == 32
    assert manifest.keep.tolist() == list(range(1, 32))
    assert manifest.positions.tolist() == [*range(1, 31), 40]
    assert manifest.token_ids.tolist() == list(range(1, 32))
    assert manifest.internal_ids == ("a-00000000", "b-11111111")


def test_every_row_is_sent_when_asked_and_a_lone_bos_row_is_not() -> None:
    positions = np.array([0, 5], dtype=np.int64)
    every = build_manifest(["a", "b"], ["A", "B"], [1, 1], [1, 3], positions, positions, 0)
    assert every.keep.tolist() == [0, 1]
    assert [s.phase for s in every.segments] == ["prompt", "generation"]
    default = build_manifest(["a", "b"], ["A", "B"], [1, 1], [1, 3], positions, positions)
    assert [s.request_id for s in default.segments] == ["B"] and default.keep.tolist() == [1]


def test_two_requests_named_alike_for_the_guard_are_refused() -> None:
    with pytest.raises(ValueError, match="guard_request_id"):
        build_manifest(["x-00000000", "x-11111111"], ["x", "x"], [1, 1], [5, 5],
                       np.ones(2, dtype=np.int64), np.ones(2, dtype=np.int64))


def test_the_abort_board_hands_each_abort_over_once() -> None:
    board = AbortBoard()
    assert board.take("r") is None
    board.post("r", GuardAbort("d1", "jailbreak", "guard"))
    board.post("r", GuardAbort("d2", "later", "guard"))  # the first stands
    assert board.pending("r")
    taken = board.take("r")
    assert taken is not None and taken.stop_reason == "guard:d1"
    assert board.take("r") is None
    board.post("s", GuardAbort("", "policy", "fail_closed"))
    board.forget(["s"])
    assert board.take("s") is None
    assert GuardAbort("", "", "fail_closed").stop_reason == "guard:fail_closed"


def test_settings_come_from_the_environment() -> None:
    settings = VllmGuardSettings.from_env({
        "GUARD_VLLM_ADDRESS": "unix:///tmp/g.sock", "GUARD_VLLM_HOOKS": "blocks.3.hook_resid_post,"
        " blocks.15.hook_resid_post", "GUARD_VLLM_MODE": "MONITOR",
        "GUARD_VLLM_DEADLINE_MS": "25", "GUARD_VLLM_FAILURE_POLICY": "closed"})
    assert settings.hooks == ("blocks.3.hook_resid_post", "blocks.15.hook_resid_post")
    assert settings.mode == "monitor" and settings.deadline_ms == 25
    assert settings.failure_policy == "closed" and settings.prefix_caching == "refuse"
    assert layer_of("blocks.15.hook_resid_post") == 15


@pytest.mark.parametrize(("env", "message"), [
    ({}, "GUARD_VLLM_ADDRESS is not set"),
    ({"GUARD_VLLM_HOOKS": "blocks.3.hook_mlp_out"}, "not a hook"),
    ({"GUARD_VLLM_MODE": "sometimes"}, "inline or monitor"),
    ({"GUARD_VLLM_DEADLINE_MS": "-1"}, "positive"),
    ({"GUARD_VLLM_PREFIX_CACHING": "maybe"}, "refuse or allow"),
])
def test_bad_settings_fail_at_start_up(env: dict[str, str], message: str) -> None:
    full = {"GUARD_VLLM_ADDRESS": "unix:///tmp/g.sock", **env} if env else {}
    with pytest.raises(VllmSetupError, match=message):
        VllmGuardSettings.from_env(full)


# -- start-up refusals (guard.vllm.attach, with stand-ins for vLLM's objects) -------------------


def vllm_config(**changes: object) -> SimpleNamespace:
    values: dict[str, object] = {
        "world_size": 1, "backend": "uni",
        "scheduler_cls": "guard.vllm.scheduler.GuardScheduler", "prefix_caching": False,
    }
    values.update(changes)
    return SimpleNamespace(
        parallel_config=SimpleNamespace(world_size=values["world_size"],
                                        distributed_executor_backend=values["backend"]),
        scheduler_config=SimpleNamespace(scheduler_cls=values["scheduler_cls"]),
        cache_config=SimpleNamespace(enable_prefix_caching=values["prefix_caching"]))


RUNNER = SimpleNamespace(input_batch=object(), requests={})
SETTINGS = VllmGuardSettings(address="unix:///tmp/no-guard-here.sock",
                             hooks=("blocks.15.hook_resid_post",))


@pytest.mark.parametrize(("version", "config", "runner", "message"), [
    ("0.33.0", vllm_config(), RUNNER, "supports vLLM 0.32"),
    ("0.32.0", vllm_config(), SimpleNamespace(), "Model Runner V2"),
    ("0.32.0", vllm_config(world_size=2), RUNNER, "one worker"),
    ("0.32.0", vllm_config(backend="mp"), RUNNER, "'uni'"),
    ("0.32.0", vllm_config(scheduler_cls=None), RUNNER, "GuardScheduler"),
    ("0.32.0", vllm_config(prefix_caching=True), RUNNER, "prefix caching is on"),
])
def test_the_worker_refuses_what_it_cannot_guard(version: str, config: SimpleNamespace,
                                                 runner: SimpleNamespace, message: str) -> None:
    from guard.vllm.attach import attach

    with pytest.raises(VllmSetupError, match=message):
        attach(config, runner, version, SETTINGS)


# -- the SmolLM2 copy vLLM loads ----------------------------------------------------------------


def test_the_smollm2_copy_for_vllm_has_its_embeddings_and_names_its_architecture() -> None:
    from safetensors import safe_open

    from guard.models.smollm2 import smollm2_for_vllm

    folder = smollm2_for_vllm()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 272
    assert (folder / "tokenizer.json").is_file()
