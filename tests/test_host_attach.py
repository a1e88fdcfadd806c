"""The transformers integration on the real SmolLM2 with a real guard over gRPC."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard import FeatureBatch, FeatureEdit, FeatureRequest, Finding, hookimpl
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.sidecar.server import GuardServer
from tests.sae_fixtures import random_standard_weights, write_saelens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
models = pytest.importorskip("guard.models.smollm2")
try:
    models.smollm2_gguf_dir()
except models.ModelUnavailable as exc:  # pragma: no cover - make test installs it
    pytest.skip(f"SmolLM2 not installed: {exc}", allow_module_level=True)

from guard.host import GuardClient, Segment  # noqa: E402
from guard.host.attach import GuardAbort, attach  # noqa: E402

pytestmark = pytest.mark.slow

LAYER = 3
HOOK = f"blocks.{LAYER}.hook_resid_post"
D_IN, D_SAE = 576, 256
FEATURE = 7
NUDGE = 4.0


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    model, tokenizer = models.load_smollm2()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(smollm2: tuple[Any, Any]) -> Any:
    _model, tokenizer = smollm2
    return models.chat_input_ids(tokenizer, [{"role": "user", "content": "Name three colours."}])


@pytest.fixture(scope="module")
def sae_576(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_saelens(tmp_path_factory.mktemp("sae576") / "sae", D_IN, D_SAE,
                         hook_name=HOOK)


class Nudger:
    """Nudges FEATURE by NUDGE on every row (a known delta: NUDGE * W_dec[FEATURE])."""

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
        return [FeatureEdit(HOOK, FEATURE, "nudge", NUDGE)]


class AbortAt:
    """Aborts the batch that holds position ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, [FEATURE])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if self.at in batch.positions.tolist():
            return [Finding("stop-here", 1.0, 0.5, "abort", positions=(self.at,))]
        return []


class Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        time.sleep(self.seconds)


@pytest.fixture
def guard_factory(tmp_path: Path, sae_576: Path) -> Iterator[Any]:
    servers: list[GuardServer] = []

    def start(*plugins: tuple[str, object], timeout_ms: float = 5000) -> str:
        config = GuardConfig(
            server=ServerConfig(listen=f"unix://{tmp_path}/guard{len(servers)}.sock"),
            logging=LoggingConfig(level="warning"),
            saes=(SaeConfig(path=sae_576),),
            plugins=PluginsConfig(autoload=False, timeout_ms=timeout_ms),
        )
        server = GuardServer(config)
        server.start()
        sources = [PluginSource(name, "1", plugin) for name, plugin in plugins]
        server.set_ready(Engine.load(config, extra_plugins=sources))
        servers.append(server)
        return server.addresses[0]

    yield start
    for server in servers:
        server.stop(0)


def _greedy(model: Any, ids: Any, n: int = 8, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)


class Recorder:
    """Wraps a client and keeps what was sent."""

    def __init__(self, client: GuardClient) -> None:
        self.client = client
        self.sent: list[tuple[np.ndarray, list[int], list[int] | None, str]] = []

    def inspect(self, request_id: str, hook: str, rows: Any, positions: Sequence[int],
                token_ids: Sequence[int] | None = None, phase: Any = "prompt",
                attributes: Any = None, *, deadline_ms: float | None = None) -> Any:
        self.sent.append((np.array(rows), list(positions),
                          None if token_ids is None else list(token_ids), str(phase)))
        return self.client.inspect(request_id, hook, rows, positions, token_ids, phase)

    def describe(self, timeout: float = 5.0) -> Any:
        return self.client.describe(timeout)


def test_detach_restores_the_model_exactly(smollm2: tuple[Any, Any], prompt: Any,
                                           guard_factory: Any) -> None:
    model, _ = smollm2
    before = _greedy(model, prompt)
    with torch.no_grad():
        logits_before = model(prompt).logits
    with GuardClient(guard_factory(("nudger", Nudger())), hooks=[HOOK],
                     deadline_ms=5000) as client:
        attachment = attach(model, client, [HOOK])
        steered = _greedy(model, prompt)
        attachment.detach()
    after = _greedy(model, prompt)
    with torch.no_grad():
        logits_after = model(prompt).logits
    assert torch.equal(before, after)
    assert torch.equal(logits_before, logits_after)
    assert not torch.equal(steered, before)  # the nudge did change the output


def test_rows_sent_match_hidden_states(smollm2: tuple[Any, Any], prompt: Any,
                                       guard_factory: Any) -> None:
    model, _ = smollm2
    with GuardClient(guard_factory(), hooks=[HOOK], deadline_ms=5000) as client:
        recorder = Recorder(client)
        with attach(model, recorder, [HOOK]) as attachment:
            out = _greedy(model, prompt, n=4)
        assert all(v.action == Action.CONTINUE for v in attachment.verdicts)
    length = prompt.shape[1]
    rows, positions, token_ids, phase = recorder.sent[0]
    assert phase == "prompt"
    assert positions == list(range(1, length))  # BOS (position 0) is not sent
    assert token_ids == prompt[0, 1:].tolist()
    with torch.no_grad():
        hidden = model(out[:, :-1], output_hidden_states=True).hidden_states[LAYER + 1][0]
    np.testing.assert_allclose(rows, hidden[1:length].numpy(), rtol=1e-4, atol=1e-4)
    # Then one row per generated token, with its position and token id.
    for step, (rows, positions, token_ids, phase) in enumerate(recorder.sent[1:]):
        assert phase == "generation"
        assert positions == [length + step]
        assert token_ids == [int(out[0, length + step])]
        np.testing.assert_allclose(rows[0], hidden[length + step].numpy(), rtol=1e-3,
                                   atol=1e-3)


def test_steering_through_the_guard_equals_steering_by_hand(
    smollm2: tuple[Any, Any], prompt: Any, guard_factory: Any
) -> None:
    model, _ = smollm2
    direction = torch.from_numpy(random_standard_weights(D_IN, D_SAE, seed=0)["W_dec"][FEATURE])

    def by_hand(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 1 if hidden.shape[1] > 1 else 0:] += NUDGE * direction
        return output

    layer = model.model.layers[LAYER]
    handle = layer.register_forward_hook(by_hand)
    try:
        expected = _greedy(model, prompt)
        with torch.no_grad():
            expected_logits = model(prompt).logits
    finally:
        handle.remove()
    with GuardClient(guard_factory(("nudger", Nudger())), hooks=[HOOK],
                     deadline_ms=5000) as client, attach(model, client, [HOOK]) as attachment:
        steered = _greedy(model, prompt)
        with torch.no_grad():
            steered_logits = model(prompt).logits
        assert {v.action for v in attachment.verdicts} == {Action.STEER}
    assert torch.equal(steered, expected)
    torch.testing.assert_close(steered_logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("on_abort", ["raise", "stop"])
def test_abort_stops_generation_at_the_right_step(
    smollm2: tuple[Any, Any], prompt: Any, guard_factory: Any, on_abort: str
) -> None:
    model, _ = smollm2
    length = prompt.shape[1]
    at = length + 2  # the third generated token's position
    with GuardClient(guard_factory(("abort", AbortAt(at))), hooks=[HOOK],
                     deadline_ms=5000) as client:
        with attach(model, client, [HOOK], on_abort=on_abort) as attachment:  # type: ignore[arg-type]
            if on_abort == "raise":
                with pytest.raises(GuardAbort) as caught:
                    _greedy(model, prompt, n=10)
                assert caught.value.decision_id
                assert "stop-here" in str(caught.value)
            else:
                out = _greedy(model, prompt, n=10,
                              stopping_criteria=attachment.stopping_criteria())
                # Tokens at positions length..at were produced; the abort on the row of
                # position `at` stops generation after that step.
                assert out.shape[1] == at + 2
            assert attachment.aborted is not None
            assert attachment.aborted.action == Action.ABORT
        positions = [v.positions for v in attachment.verdicts]
        assert positions[-1] == (at,)


def test_monitor_mode_never_blocks(smollm2: tuple[Any, Any], prompt: Any,
                                   guard_factory: Any) -> None:
    model, _ = smollm2
    sleep = 1.0
    tokens = 6
    address = guard_factory(("sleeper", Sleeper(sleep)), timeout_ms=0)
    started = time.monotonic()
    _greedy(model, prompt, n=tokens)
    unguarded = time.monotonic() - started
    with GuardClient(address, mode="monitor", hooks=[HOOK]) as client, attach(
        model, client, [HOOK], check=False
    ):
        started = time.monotonic()
        _greedy(model, prompt, n=tokens)
        monitored = time.monotonic() - started
    # Waiting for the sleeping guard would add tokens * sleep = 6 s to the unguarded time;
    # the margin is half of that, so machine noise cannot make this fail.
    assert monitored < unguarded + tokens * sleep / 2


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_failure_policy_with_the_guard_stopped(
    smollm2: tuple[Any, Any], prompt: Any, tmp_path: Path, policy: str
) -> None:
    model, _ = smollm2
    with GuardClient(f"unix://{tmp_path}/nobody.sock", hooks=[HOOK], deadline_ms=200,
                     failure_policy=policy) as client:  # type: ignore[arg-type]
        with attach(model, client, [HOOK], check=False) as attachment:
            if policy == "open":
                out = _greedy(model, prompt, n=3)
                assert out.shape[1] == prompt.shape[1] + 3
                assert {v.source for v in attachment.verdicts} == {"fail_open"}
            else:
                with pytest.raises(GuardAbort, match="failure policy"):
                    _greedy(model, prompt, n=3)
        counters = client.counters
    assert (counters.fail_open if policy == "open" else counters.fail_closed) >= 1


def test_attach_refuses_a_width_mismatch(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    model, _ = smollm2
    sae = write_saelens(tmp_path / "narrow", 64, 32, hook_name=HOOK)
    config = GuardConfig(server=ServerConfig(listen=f"unix://{tmp_path}/n.sock"),
                         logging=LoggingConfig(level="warning"), saes=(SaeConfig(path=sae),),
                         plugins=PluginsConfig(autoload=False))
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    try:
        with GuardClient(server.addresses[0], hooks=[HOOK]) as client:
            with pytest.raises(ValueError, match=rf"{HOOK}: the guard's SAE expects d_in 64, "
                                                 "the model's residual width is 576"):
                attach(model, client, [HOOK])
            with pytest.raises(ValueError, match="does not serve this hook"):
                attach(model, client, ["blocks.5.hook_resid_post"])
    finally:
        server.stop(0)


def test_request_ids_label_each_generation(smollm2: tuple[Any, Any], prompt: Any,
                                          guard_factory: Any) -> None:
    model, _ = smollm2
    with GuardClient(guard_factory(), hooks=[HOOK], deadline_ms=5000) as client:
        recorder = Recorder(client)
        with attach(model, recorder, [HOOK]) as attachment:
            with attachment.request("chat-1"):
                _greedy(model, prompt, n=2)
            _greedy(model, prompt, n=2)
        ids = [v.request_id for v in attachment.verdicts]
    assert ids[:2] == ["chat-1"] * 2  # prefill, then one step per token after the first
    assert len(set(ids[2:])) == 1
    assert ids[2] != "chat-1"  # a new generation outside the block gets a fresh id


# -- batches of several sequences (padded; one step per layer, one request per sequence) ----

CHATS = ("Name three colours.", "Hi", "What is the capital of France? Answer briefly.")


class StepRecorder:
    """Wraps a client and keeps the steps (and RequestEnded messages) it sent."""

    def __init__(self, client: GuardClient) -> None:
        self.client = client
        self.steps: list[tuple[np.ndarray, list[Segment], list[int], list[int] | None]] = []
        self.ended: list[tuple[list[str], str]] = []

    def inspect(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.inspect(*args, **kwargs)

    def inspect_step(self, hook: str, rows: Any, segments: Sequence[Segment],
                     positions: Sequence[int], token_ids: Sequence[int] | None = None,
                     attributes: Any = None, *, deadline_ms: float | None = None) -> Any:
        self.steps.append((np.array(rows), list(segments), list(positions),
                           None if token_ids is None else list(token_ids)))
        return self.client.inspect_step(hook, rows, segments, positions, token_ids)

    def end_requests(self, request_ids: Sequence[str], reason: Any = "finished") -> bool:
        self.ended.append((list(request_ids), str(reason)))
        return self.client.end_requests(request_ids, reason)

    def describe(self, timeout: float = 5.0) -> Any:
        return self.client.describe(timeout)


def _padded(tokenizer: Any, side: str, chats: Sequence[str] = CHATS) -> tuple[Any, Any, list[Any]]:
    """The chats' token ids as one batch padded on ``side``, its attention mask, and each
    chat's own ids ``[1, T]``."""
    alone = [models.chat_input_ids(tokenizer, [{"role": "user", "content": c}]) for c in chats]
    width = max(ids.shape[1] for ids in alone)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(alone), width), pad, dtype=torch.long)
    mask = torch.zeros((len(alone), width), dtype=torch.long)
    for b, one in enumerate(alone):
        n = one.shape[1]
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[b, span] = one[0]
        mask[b, span] = 1
    return ids, mask, alone


class SteerRequest:
    """Nudges FEATURE by NUDGE on every row of one request."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
        return [FeatureEdit(HOOK, FEATURE, "nudge", NUDGE)] if (
            batch.request_id == self.request_id) else []


class AbortRequests:
    """Aborts the requests named, at their rows of position ``at`` or later."""

    def __init__(self, request_ids: Sequence[str], at: int) -> None:
        self.request_ids, self.at = set(request_ids), at

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, [FEATURE])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        late = [p for p in batch.positions.tolist() if p >= self.at]
        if batch.request_id in self.request_ids and late:
            return [Finding("stop-here", 1.0, 0.5, "abort", positions=(late[0],))]
        return []


def _layer_output(model: Any) -> tuple[list[Any], Any]:
    """A hook (registered after attach's, so it sees the steered output) that keeps the
    hooked layer's outputs."""
    seen: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        seen.append(hidden.detach().clone())

    return seen, model.model.layers[LAYER].register_forward_hook(keep)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_sends_each_sequences_real_tokens_as_its_own_request(
    smollm2: tuple[Any, Any], guard_factory: Any, side: str
) -> None:
    model, tokenizer = smollm2
    ids, mask, alone = _padded(tokenizer, side)
    with GuardClient(guard_factory(), hooks=[HOOK], deadline_ms=5000) as client:
        recorder = StepRecorder(client)
        with attach(model, recorder, [HOOK]) as attachment:
            with attachment.requests(["chat-a", "chat-b", "chat-c"]), torch.no_grad():
                model(ids, attention_mask=mask)
            verdicts = list(attachment.verdicts)
        assert recorder.ended == [(["chat-a", "chat-b", "chat-c"], "finished")]
    ((rows, segments, positions, token_ids),) = recorder.steps
    assert [s.request_id for s in segments] == ["chat-a", "chat-b", "chat-c"]
    assert [s.rows for s in segments] == [one.shape[1] - 1 for one in alone]  # no BOS, no pads
    assert {s.phase for s in segments} == {"prompt"}
    assert [v.request_id for v in verdicts] == ["chat-a", "chat-b", "chat-c"]
    assert {v.action for v in verdicts} == {Action.CONTINUE}
    start = 0
    for segment, one in zip(segments, alone, strict=True):
        n = segment.rows
        assert positions[start:start + n] == list(range(1, n + 1))
        assert token_ids is not None and token_ids[start:start + n] == one[0, 1:].tolist()
        with torch.no_grad():  # the same rows as the sequence computed alone, unpadded
            hidden = model(one, output_hidden_states=True).hidden_states[LAYER + 1][0]
        np.testing.assert_allclose(rows[start:start + n], hidden[1:].numpy(), rtol=1e-3,
                                   atol=1e-3)
        start += n
    assert start == len(rows)


def test_generating_a_left_padded_batch_sends_one_row_per_sequence_and_step(
    smollm2: tuple[Any, Any], guard_factory: Any
) -> None:
    model, tokenizer = smollm2
    ids, mask, alone = _padded(tokenizer, "left")
    with GuardClient(guard_factory(), hooks=[HOOK], deadline_ms=5000) as client:
        recorder = StepRecorder(client)
        with attach(model, recorder, [HOOK]):
            out = _greedy(model, ids, n=3, attention_mask=mask)
            first = [s.request_id for s in recorder.steps[0][1]]
            _greedy(model, ids, n=1, attention_mask=mask)  # a new generation: new requests
    assert len(set(first)) == 3
    assert not set(first) & {s.request_id for s in recorder.steps[-1][1]}
    assert (first, "finished") in [(list(r), why) for r, why in recorder.ended]
    width = ids.shape[1]
    for step, (rows, segments, positions, token_ids) in enumerate(recorder.steps[1:3]):
        assert [s.request_id for s in segments] == first
        assert [(s.rows, s.phase) for s in segments] == [(1, "generation")] * 3
        assert positions == [one.shape[1] + step for one in alone]
        assert token_ids == out[:, width + step].tolist()
        assert rows.shape == (3, D_IN)


def test_steering_one_request_of_a_batch_changes_only_its_rows(
    smollm2: tuple[Any, Any], guard_factory: Any
) -> None:
    model, tokenizer = smollm2
    ids, mask, alone = _padded(tokenizer, "left")
    direction = torch.from_numpy(random_standard_weights(D_IN, D_SAE, seed=0)["W_dec"][FEATURE])
    with GuardClient(guard_factory(("steer-b", SteerRequest("chat-b"))), hooks=[HOOK],
                     deadline_ms=5000) as client, attach(model, client, [HOOK]) as attachment:
        seen, handle = _layer_output(model)
        try:
            with attachment.requests(["chat-a", "chat-b", "chat-c"]), torch.no_grad():
                model(ids, attention_mask=mask)
            with attachment.paused(), torch.no_grad():
                model(ids, attention_mask=mask)
        finally:
            handle.remove()
        actions = {v.request_id: v.action for v in attachment.verdicts}
    assert actions == {"chat-a": Action.CONTINUE, "chat-b": Action.STEER,
                       "chat-c": Action.CONTINUE}
    steered, plain = seen
    change = steered - plain
    width = ids.shape[1]
    real_b = slice(width - alone[1].shape[1] + 1, width)  # chat-b's rows but its first
    torch.testing.assert_close(change[1, real_b], (NUDGE * direction).expand_as(change[1, real_b]),
                               rtol=1e-4, atol=1e-4)
    change[1, real_b] = 0
    assert not change.any()  # other requests' rows, chat-b's first row and the padding


@pytest.mark.parametrize("on_abort", ["raise", "stop"])
def test_an_abort_stops_only_its_own_sequence(
    smollm2: tuple[Any, Any], guard_factory: Any, on_abort: str
) -> None:
    model, tokenizer = smollm2
    ids, mask, alone = _padded(tokenizer, "left")
    at = alone[1].shape[1] + 1  # chat-b's second generated token
    with GuardClient(guard_factory(("abort-b", AbortRequests(["chat-b"], at))), hooks=[HOOK],
                     deadline_ms=5000) as client:
        recorder = StepRecorder(client)
        with attach(model, recorder, [HOOK], on_abort=on_abort) as attachment:  # type: ignore[arg-type]
            with attachment.requests(["chat-a", "chat-b", "chat-c"]):
                out = _greedy(model, ids, n=6, attention_mask=mask,
                              stopping_criteria=attachment.stopping_criteria())
            assert set(attachment.aborted_requests) == {"chat-b"}
            abort = attachment.aborted_requests["chat-b"]
            assert abort.action == Action.ABORT and abort.decision_id
            assert abort.positions == (at,)
            assert attachment.aborted is None  # the batch as a whole was not stopped
        assert (["chat-b"], "aborted") in recorder.ended
        assert (["chat-a", "chat-c"], "finished") in recorder.ended
    width = ids.shape[1]
    assert out.shape[1] == width + 6  # the others generated every token
    # The step that read chat-b's row at `at` still produced its next token; then the
    # stopping criterion finished chat-b alone (padding after), and its rows were not sent.
    produced = at - alone[1].shape[1] + 2
    assert (out[1, width + produced:] == tokenizer.pad_token_id).all()
    assert (out[1, width:width + produced] != tokenizer.pad_token_id).all()
    sent_b: list[int] = []
    for _rows, segments, positions, _tokens in recorder.steps:
        starts = np.cumsum([0] + [s.rows for s in segments]).tolist()
        for segment, start in zip(segments, starts, strict=False):
            if segment.request_id == "chat-b":
                sent_b += positions[start:start + segment.rows]
    assert sent_b == list(range(1, at + 1))
    assert [s.request_id for s in recorder.steps[-1][1]] == ["chat-a", "chat-c"]


def test_a_batch_raises_once_every_sequence_is_aborted(
    smollm2: tuple[Any, Any], guard_factory: Any
) -> None:
    model, tokenizer = smollm2
    ids, mask, _ = _padded(tokenizer, "left", CHATS[:2])
    everyone = AbortRequests(["chat-a", "chat-b"], 0)
    with GuardClient(guard_factory(("abort", everyone)), hooks=[HOOK],
                     deadline_ms=5000) as client, attach(model, client, [HOOK]) as attachment:
        with attachment.requests(["chat-a", "chat-b"]), pytest.raises(GuardAbort) as caught:
            _greedy(model, ids, n=4, attention_mask=mask)
        assert caught.value.decision_id
        assert set(attachment.aborted_requests) == {"chat-a", "chat-b"}
        assert attachment.aborted is caught.value.verdict


def test_a_single_request_id_labels_each_row_of_a_batch(
    smollm2: tuple[Any, Any], guard_factory: Any
) -> None:
    model, tokenizer = smollm2
    ids, mask, _ = _padded(tokenizer, "right", CHATS[:2])
    with GuardClient(guard_factory(), hooks=[HOOK], deadline_ms=5000) as client, attach(
        model, client, [HOOK]
    ) as attachment:
        with attachment.request("chat") as rid, torch.no_grad():
            model(ids, attention_mask=mask)
        assert rid == "chat"
        assert [v.request_id for v in attachment.verdicts] == ["chat/0", "chat/1"]
