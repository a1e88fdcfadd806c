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

from guard.host import GuardClient  # noqa: E402
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
