"""The vLLM integration's parts that need no vLLM: its settings, the step manifest (which rows
are whose), the board that carries ABORTs from the worker to the scheduler, the start-up
refusals, and the SmolLM2 copy vLLM loads. The real engine is in tests/test_vllm.py."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from guard.decision import Action, RowRole
from guard.host import StepVerdict, Verdict
from guard.vllm.manifest import (
    ABORTS,
    AbortBoard,
    GuardAbort,
    build_manifest,
    client_request_id,
)
from guard.vllm.roles import (
    RoleStash,
    decode_runs,
    encode_runs,
    remember_chat,
    with_roles,
    without_client_roles,
)
from guard.vllm.settings import (
    RequestArgsError,
    RequestSettings,
    VllmGuardSettings,
    VllmSetupError,
    layer_of,
)


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


def test_a_recomputed_request_sends_its_generated_rows_in_a_second_batch_of_the_step() -> None:
    # After a preemption vLLM recomputes request A from its start: positions 0..11, of which
    # 0..7 are its prompt and 8..11 the tokens it had generated. B decodes at 20. A batch
    # holds a request once with one phase: A's generated rows go in the step's second batch.
    positions = np.array([*range(12), 20], dtype=np.int64)
    manifest = build_manifest(["a-00000000", "b-11111111"], ["A", "B"], [12, 1], [8, 15],
                              positions, np.arange(13, dtype=np.int64))
    assert [(s.request_id, s.rows, s.phase) for s in manifest.segments] == [
        ("A", 7, "prompt"), ("B", 1, "generation")]
    assert manifest.keep.tolist() == [*range(1, 8), 12] and manifest.part == 0
    then = manifest.then
    assert then is not None and then.then is None and then.part == 1
    assert [(s.request_id, s.rows, s.phase) for s in then.segments] == [("A", 4, "generation")]
    assert then.keep.tolist() == then.positions.tolist() == [8, 9, 10, 11]
    assert then.internal_ids == ("a-00000000",) and then.step_rows == manifest.step_rows == 13
    # A step without such a request is one batch.
    one = build_manifest(["b-11111111"], ["B"], [1], [15], positions[12:], positions[12:])
    assert one.then is None


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


# -- per-request arguments (vllm_xargs) ---------------------------------------------------------


def settings_with(**env: str) -> VllmGuardSettings:
    return VllmGuardSettings.from_env({"GUARD_VLLM_ADDRESS": "unix:///tmp/g.sock",
                                       **{f"GUARD_VLLM_{k.upper()}": v for k, v in env.items()}})


def test_a_request_may_name_itself_and_ask_for_what_the_server_does_anyway() -> None:
    server = settings_with()
    assert server.request_overrides == frozenset()
    assert server.request_settings(None) == RequestSettings(None, "inline", "open")
    assert server.request_settings({"guard_request_id": "mine", "guard_mode": "INLINE",
                                    "other_plugin_arg": 3}) == RequestSettings(
        "mine", "inline", "open")
    # A stricter failure policy needs no permission.
    assert server.request_settings({"guard_failure_policy": "closed"}).failure_policy == "closed"


def test_a_request_weakens_the_guard_only_where_the_operator_allows_it() -> None:
    strict = settings_with(failure_policy="closed")
    with pytest.raises(RequestArgsError, match="GUARD_VLLM_REQUEST_OVERRIDES does not name mode"):
        strict.request_settings({"guard_mode": "monitor"})
    with pytest.raises(RequestArgsError, match="does not name failure_policy"):
        strict.request_settings({"guard_failure_policy": "open"})
    allowed = settings_with(failure_policy="closed", request_overrides="mode, failure_policy")
    assert allowed.request_overrides == {"mode", "failure_policy"}
    assert allowed.request_settings({"guard_mode": "monitor"}).mode == "monitor"
    assert allowed.request_settings({"guard_failure_policy": "open"}).failure_policy == "open"
    only_mode = settings_with(failure_policy="closed", request_overrides="mode")
    assert only_mode.request_settings({"guard_mode": "monitor"}).mode == "monitor"
    with pytest.raises(RequestArgsError, match="does not name failure_policy"):
        only_mode.request_settings({"guard_failure_policy": "open"})


@pytest.mark.parametrize(("args", "message"), [
    ({"guard_mdoe": "monitor"}, "unknown guard argument 'guard_mdoe'"),
    ({"guard_mode": "off"}, "guard_mode: expected inline or monitor, found 'off'"),
    ({"guard_mode": 1}, "expected inline or monitor, found int 1"),
    ({"guard_failure_policy": ["open"]}, "expected open or closed, found a list"),
    ({"guard_request_id": 7}, "guard_request_id must be a non-empty string"),
    ({"guard_request_id": ""}, "guard_request_id must be a non-empty string"),
    ({"guard_request_id": "x" * 300}, "a string of 300 characters"),
    ({"guard_request_id": "a\nb"}, "printable"),
    ({"guard_mode": "monitor", "guard_failure_policy": "closed"}, "never aborted"),
])
def test_malformed_request_arguments_are_refused_with_what_was_expected(
        args: dict[str, object], message: str) -> None:
    server = settings_with(request_overrides="mode")
    with pytest.raises(RequestArgsError, match=re.escape(message)):
        server.request_settings(args)


def test_no_request_is_inline_on_a_monitor_server() -> None:
    server = settings_with(mode="monitor", request_overrides="mode")
    assert server.request_settings({"guard_mode": "monitor"}).mode == "monitor"
    with pytest.raises(RequestArgsError, match="MONITOR mode"):
        server.request_settings({"guard_mode": "inline"})


def test_unknown_overrides_fail_at_start_up() -> None:
    with pytest.raises(VllmSetupError, match="expected none or a comma-separated list of mode, "
                                             "failure_policy, found 'hooks'"):
        settings_with(request_overrides="mode,hooks")
    assert settings_with(request_overrides="none").request_overrides == frozenset()


# -- the worker's per-request handling (guard.vllm.attach, with stand-ins for vLLM and the
# -- client: the real engine and guard are in tests/test_vllm.py and tests/test_vllm_serve.py)


class StepClient:
    """Answers every step with the verdicts it is given (by request name) and a steering
    delta of ones over every row; records what the worker told it."""

    def __init__(self, actions: dict[str, Action], source: str = "guard") -> None:
        self.actions = actions
        self.source = source
        self.segments: list[tuple[str, int]] = []
        self.ended: list[tuple[tuple[str, ...], str]] = []
        #: Per step sent: each row's role, and each segment's prompt_complete.
        self.roles: list[list[int]] = []
        self.complete: list[list[bool | None]] = []

    def inspect_step(self, hook: str, rows: np.ndarray, segments: Any, positions: Any,
                     token_ids: Any, roles: Any = None) -> StepVerdict:
        self.segments = [(s.request_id, s.rows) for s in segments]
        self.roles.append([] if roles is None else [int(r) for r in roles])
        self.complete.append([s.prompt_complete for s in segments])
        verdicts = tuple(Verdict(self.actions.get(s.request_id, Action.CONTINUE),
                                 self.source, s.request_id,  # type: ignore[arg-type]
                                 decision_id=f"d-{s.request_id}", details="stand-in",
                                 reason="timeout" if self.source != "guard" else "")
                         for s in segments)
        steering = {hook: np.ones(rows.shape, dtype=np.float32)}
        return StepVerdict(verdicts, self.source, steering=steering)  # type: ignore[arg-type]

    def end_requests(self, names: Any, reason: str) -> None:
        self.ended.append((tuple(names), reason))


class Engine:
    """The few vLLM objects the worker reads, for one hooked layer of width 4."""

    def __init__(self, settings: VllmGuardSettings, client: StepClient) -> None:
        import torch

        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(16)])
        self.runner = SimpleNamespace(requests={}, input_batch=SimpleNamespace(
            req_ids=[], num_reqs=0, num_prompt_tokens=[]))
        from guard.vllm.attach import Attachment

        self.guard = Attachment(settings, self.runner, model, client,  # type: ignore[arg-type]
                                {15: "blocks.15.hook_resid_post"})

    def add(self, internal: str, prompt: int, **extra_args: object) -> None:
        self.runner.requests[internal] = SimpleNamespace(
            sampling_params=SimpleNamespace(extra_args=extra_args or None),
            num_prompt_tokens=prompt)
        batch = self.runner.input_batch
        batch.req_ids.append(internal)
        batch.num_prompt_tokens.append(prompt)
        batch.num_reqs += 1

    def step(self, scheduled: dict[str, int], finished: tuple[str, ...] = (),
             start: dict[str, int] | None = None) -> np.ndarray:
        """One step of ``scheduled`` rows per request (from position ``start[request]``,
        default 1); the delta the worker adds to layer 15's output."""
        import torch

        self.guard.begin_step(SimpleNamespace(num_scheduled_tokens=scheduled,
                                              finished_req_ids=set(finished)))
        total = sum(scheduled.values())
        first = start or {}
        positions = torch.cat([torch.arange(first.get(r, 1), first.get(r, 1) + n)
                               for r, n in scheduled.items()])
        self.guard._before_forward(None, (), {"positions": positions,
                                              "input_ids": torch.zeros(total, dtype=torch.long)})
        delta = self.guard.on_layer(15, torch.zeros(total, 4), torch.zeros(total, 4))
        self.guard.end_step()
        return delta.numpy()


def test_a_monitor_request_is_sent_but_neither_steered_nor_aborted() -> None:
    client = StepClient({"watched": Action.ABORT, "steered": Action.STEER,
                         "blocked": Action.ABORT})
    engine = Engine(settings_with(request_overrides="mode"), client)
    engine.add("a-00000000", 10, guard_request_id="watched", guard_mode="monitor")
    engine.add("b-00000000", 10, guard_request_id="steered")
    engine.add("c-00000000", 10, guard_request_id="blocked")
    delta = engine.step({"a-00000000": 2, "b-00000000": 3, "c-00000000": 1})
    assert client.segments == [("watched", 2), ("steered", 3), ("blocked", 1)]
    assert delta[:2].sum() == 0  # the monitor request's rows
    assert (delta[2:] == 1).all()
    assert not ABORTS.pending("a-00000000")
    assert ABORTS.take("c-00000000") == GuardAbort("d-blocked", "stand-in", "guard")
    assert engine.guard.counters["aborts"] == 1


@pytest.mark.parametrize(("server", "asked", "aborted"), [
    ("open", "closed", True), ("closed", "open", False), ("open", None, False),
    ("closed", None, True),
])
def test_under_the_failure_policy_each_inline_request_gets_its_own(
        server: str, asked: str | None, aborted: bool) -> None:
    source = "fail_open" if server == "open" else "fail_closed"
    client = StepClient({"r": Action.ABORT if server == "closed" else Action.CONTINUE}, source)
    engine = Engine(settings_with(failure_policy=server, request_overrides="failure_policy"),
                    client)
    args = {"guard_failure_policy": asked} if asked else {}
    engine.add("r-00000000", 10, guard_request_id="r", **args)
    engine.step({"r-00000000": 2})
    taken = ABORTS.take("r-00000000")
    assert (taken is not None) is aborted
    if taken is not None:
        assert taken.stop_reason.startswith("guard:")


def test_refused_arguments_end_that_request_with_the_reason_as_its_stop_reason() -> None:
    client = StepClient({})
    engine = Engine(settings_with(), client)  # no overrides allowed
    engine.add("x-00000000", 10, guard_request_id="x", guard_mode="monitor")
    engine.add("y-00000000", 10, guard_request_id="y")
    engine.step({"x-00000000": 2, "y-00000000": 2})
    refused = ABORTS.take("x-00000000")
    assert refused is not None and refused.source == "refused"
    assert refused.stop_reason.startswith("guard:refused: vllm_xargs: guard_mode=monitor")
    assert "GUARD_VLLM_REQUEST_OVERRIDES" in refused.stop_reason
    assert ABORTS.take("y-00000000") is None
    assert engine.guard.counters["refused"] == 1
    # The refused request was still inspected under the server's settings, as "x".
    assert client.segments == [("x", 2), ("y", 2)]


def test_requests_sharing_a_guard_request_id_get_their_own_names_and_never_crash_a_step(
) -> None:
    # A request with n=2 hands both its samples the same extra_args: vLLM ran them in one
    # step, where two segments of one name failed the step (and vLLM's engine with it).
    client = StepClient({})
    engine = Engine(settings_with(), client)
    engine.add("0_chat-1-00000000", 10, guard_request_id="same")
    engine.add("1_chat-1-00000000", 10, guard_request_id="same")
    engine.add("chat-2-11111111", 10)
    engine.step({"0_chat-1-00000000": 2, "1_chat-1-00000000": 2, "chat-2-11111111": 1})
    assert client.segments == [("same", 2), ("same#2", 2), ("chat-2", 1)]
    assert engine.guard.counters["renamed"] == 1
    # The names hold until vLLM finishes the requests; then a new request may take them.
    engine.runner.input_batch = SimpleNamespace(req_ids=[], num_reqs=0, num_prompt_tokens=[])
    engine.add("chat-3-22222222", 10, guard_request_id="same")
    engine.step({"chat-3-22222222": 1},
                finished=("0_chat-1-00000000", "1_chat-1-00000000", "chat-2-11111111"))
    assert client.segments == [("same", 1)]
    assert [(set(names), reason) for names, reason in client.ended] == [
        ({"same", "same#2", "chat-2"}, "finished")]


def test_a_recomputed_request_goes_to_the_guard_in_two_batches_each_steered() -> None:
    sent: list[tuple[list[tuple[str, int, str]], list[int]]] = []

    class Recording(StepClient):
        def inspect_step(self, hook: str, rows: np.ndarray, segments: Any, positions: Any,
                         token_ids: Any, roles: Any = None) -> StepVerdict:
            sent.append(([(s.request_id, s.rows, str(s.phase)) for s in segments],
                         positions.tolist()))
            return super().inspect_step(hook, rows, segments, positions, token_ids, roles)

    engine = Engine(settings_with(), Recording({"A": Action.STEER}))
    engine.add("a-00000000", 4, guard_request_id="A")  # a 4-token prompt, recomputed
    delta = engine.step({"a-00000000": 6})  # with the 3 tokens it had generated
    assert sent == [([("A", 3, "prompt")], [1, 2, 3]), ([("A", 3, "generation")], [4, 5, 6])]
    assert (delta == 1).all()  # both batches' steering, each on its own rows
    assert engine.guard.counters["batches"] == 2 and engine.guard.counters["steps"] == 1


def test_reconnecting_reaches_the_guard_with_the_new_settings_from_the_next_step() -> None:
    closed: list[bool] = []

    class Closable(StepClient):
        def close(self) -> None:
            closed.append(True)

    client = Closable({})
    engine = Engine(settings_with(), client)
    engine.add("a-00000000", 10)
    engine.step({"a-00000000": 2})
    assert client.segments == [("a", 2)]
    # A real client, for a guard that is not there, with the closed policy: a request that
    # joins the next step is aborted by the policy ("a" keeps the policy it was seen with).
    engine.guard.reconnect(settings_with(address="unix:///nonexistent/guard.sock",
                                         failure_policy="closed", deadline_ms="200"))
    try:
        assert closed == [True] and engine.guard.settings.failure_policy == "closed"
        engine.add("b-11111111", 10)
        engine.step({"a-00000000": 1, "b-11111111": 2})
        abort = ABORTS.take("b-11111111")
        assert abort is not None and abort.stop_reason == "guard:fail_closed"
        assert ABORTS.take("a-00000000") is None
        assert engine.guard.counters["policy_verdicts"] == 1
    finally:
        engine.guard.close()


# -- row roles and prompt completeness (guard.vllm.roles, the manifest, the worker) ----------

T, U, G, X = (int(RowRole.TEMPLATE), int(RowRole.USER), int(RowRole.GENERATED),
              int(RowRole.UNSPECIFIED))
#: A 10-token chat prompt: template 0..3, user 4..6, template 7..9.
PROMPT_ROLES = np.array([T, T, T, T, U, U, U, T, T, T], dtype=np.int8)


def test_prefill_chunks_take_their_rows_roles_by_position_and_the_last_one_completes() -> None:
    # Request A's 10-token prompt in two chunks (positions 0..5, then 6..9); B decodes.
    first = build_manifest(["a", "b"], ["A", "B"], [6, 1], [10, 4],
                           np.array([*range(6), 7], dtype=np.int64), np.zeros(7, np.int64),
                           prompt_roles=[PROMPT_ROLES, None])
    assert first.roles.tolist() == [T, T, T, U, U, G]  # BOS (position 0) is not sent
    assert [s.prompt_complete for s in first.segments] == [False, None]
    second = build_manifest(["a", "c"], ["A", "C"], [4, 3], [10, 3],
                            np.array([6, 7, 8, 9, 0, 1, 2], dtype=np.int64),
                            np.zeros(7, np.int64), prompt_roles=[PROMPT_ROLES, None])
    assert second.roles.tolist() == [U, T, T, T, X, X]  # C has no roles: unspecified
    assert [s.prompt_complete for s in second.segments] == [True, True]


def test_a_recomputed_request_completes_its_prompt_and_labels_its_generated_rows() -> None:
    manifest = build_manifest(["a"], ["A"], [13], [10], np.arange(13, dtype=np.int64),
                              np.zeros(13, np.int64), prompt_roles=[PROMPT_ROLES])
    assert manifest.segments[0].prompt_complete is True
    assert manifest.roles.tolist() == PROMPT_ROLES[1:].tolist()
    assert manifest.then is not None
    assert manifest.then.roles.tolist() == [G, G, G]
    assert manifest.then.segments[0].prompt_complete is None


def test_roles_travel_as_runs_and_come_back_only_when_they_fit_the_prompt() -> None:
    runs = encode_runs(PROMPT_ROLES)
    assert runs == [T, 4, U, 3, T, 3]
    assert decode_runs(runs, 10).tolist() == PROMPT_ROLES.tolist()
    assert encode_runs([]) == []
    for bad, fragment in [([T, 4, U], "pairs"), ("5,4", "pairs"), ([T, 4.0], "integers"),
                          ([99, 10], "RowRole"), ([T, 0, U, 10], "counts >= 1"),
                          ([T, 4, U, 3], "cover 7 tokens, the prompt has 10"),
                          ([True, 10], "integers")]:
        with pytest.raises(ValueError, match=fragment):
            decode_runs(bad, 10)


def test_the_stash_hands_roles_over_for_the_exact_token_ids_only_once() -> None:
    stash = RoleStash(size=2)
    stash.put([1, 2, 3], PROMPT_ROLES[:3])
    assert stash.take([1, 2]) is None and stash.take(None) is None
    taken = stash.take([1, 2, 3])
    assert taken is not None and taken.tolist() == PROMPT_ROLES[:3].tolist()
    assert stash.take([1, 2, 3]) is None
    for key in ([1], [2], [3]):
        stash.put(key, PROMPT_ROLES[:1])
    assert len(stash) == 2 and stash.take([1]) is None  # the oldest went first


class Params(SimpleNamespace):
    def clone(self) -> Params:
        return Params(**vars(self))


def test_the_front_end_puts_rendered_roles_in_and_a_clients_own_out() -> None:
    stash = RoleStash()
    stash.put([7, 8, 9], np.array([T, U, T], dtype=np.int8))
    shared = {"guard_request_id": "r"}
    request = SimpleNamespace(prompt_token_ids=[7, 8, 9], sampling_params=Params(
        extra_args=shared))
    with_roles(request, stash)
    assert request.sampling_params.extra_args == {"guard_request_id": "r",
                                                  "guard_roles": [T, 1, U, 1, T, 1]}
    assert shared == {"guard_request_id": "r"}  # the caller's dict is not changed
    other = SimpleNamespace(prompt_token_ids=[1, 2], sampling_params=Params(extra_args=None))
    assert with_roles(other, stash).sampling_params.extra_args is None  # never rendered
    spoofed = Params(extra_args={"guard_roles": [T, 3], "x": 1})
    cleaned = without_client_roles(spoofed)
    assert cleaned.extra_args == {"x": 1} and spoofed.extra_args == {"guard_roles": [T, 3],
                                                                      "x": 1}
    plain = Params(extra_args=None)
    assert without_client_roles(plain) is plain


def test_a_request_may_carry_roles_that_the_server_set() -> None:
    assert settings_with().request_settings({"guard_roles": [T, 3]}).name is None


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """SmolLM2's real tokenizer (fast, with its chat template); skips without the model."""
    models = pytest.importorskip("guard.models.smollm2")
    transformers = pytest.importorskip("transformers")
    try:
        models.smollm2_gguf_dir()
    except models.ModelUnavailable as exc:  # pragma: no cover - make test installs it
        pytest.skip(f"SmolLM2 not installed: {exc}")
    folder = models.cache_dir() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        models.load_smollm2()
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_a_rendered_chat_waits_for_its_request_with_render_s_roles(tokenizer: Any) -> None:
    from guard.host.chat import render

    stash = RoleStash()
    messages = [{"role": "user", "content": "How tall is Mount Everest?"}]
    # What vLLM's renderer hands over: its template arguments, tokenize and return_dict too.
    assert remember_chat(tokenizer, messages, {"chat_template": None, "return_dict": False,
                                               "tokenize": False,
                                               "add_generation_prompt": True}, stash)
    ids, roles = render(tokenizer, messages)
    taken = stash.take(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
    assert taken is not None and taken.tolist() == roles.tolist()
    assert int((taken == RowRole.USER).sum()) == len(
        tokenizer("How tall is Mount Everest?", add_special_tokens=False)["input_ids"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert not remember_chat(tokenizer, parts, {}, stash)  # not plain text: no roles
    assert len(stash) == 0 and ids


def test_the_worker_labels_each_chunk_by_position_and_says_when_the_prompt_is_whole() -> None:
    client = StepClient({})
    engine = Engine(settings_with(), client)
    engine.add("a-00000000", 10, guard_request_id="A", guard_roles=encode_runs(PROMPT_ROLES))
    engine.add("b-00000000", 10, guard_request_id="B", guard_roles=[T, 3])  # does not fit
    engine.step({"a-00000000": 5, "b-00000000": 2})  # positions 1..5 and 1..2
    engine.step({"a-00000000": 4, "b-00000000": 2}, start={"a-00000000": 6,
                                                           "b-00000000": 3})
    assert client.roles == [[T, T, T, U, U, X, X], [U, T, T, T, X, X]]
    assert client.complete == [[False, False], [True, False]]
    assert engine.guard.counters["with_roles"] == 1
    assert engine.guard.counters["roles_dropped"] == 1
