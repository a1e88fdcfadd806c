"""Rows carry their role (issue 22): the wire field and its validation, the host SDK, the
chat renderer on SmolLM2's real tokenizer, and the detectors' and steering's ``rows``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from guard import ConfigError, FeatureBatch, Finding, Phase, RowRole, hookimpl
from guard.config import PluginsConfig
from guard.decision import CONTENT_ROLES, role_mask
from guard.engine.core import Engine
from guard.engine.plugins import PluginSet, PluginSource
from guard.errors import InvalidInput
from guard.host import GuardClient, Segment
from guard.host.chat import render
from guard.recording import load_batches, save_batches
from guard.sidecar.server import GuardServer
from guard.testing import make_feature_batch
from guard.v1 import guard_pb2 as pb
from guard.wire import codec
from guard_plugins.detectors import DEFAULT_ROWS, Detectors
from guard_plugins.steering import SteeringPlugin
from tests.conftest import D_IN, HOOK, StreamClient, make_batch, make_config

U, T, G, S, A, X = (RowRole.USER, RowRole.TEMPLATE, RowRole.GENERATED, RowRole.SYSTEM,
                    RowRole.ASSISTANT, RowRole.UNSPECIFIED)


# -- the wire: codec and server validation ---------------------------------------------------


def test_codec_reads_roles_as_int8_and_none_when_absent() -> None:
    assert codec.row_roles("batch.roles", [], 3) is None
    roles = codec.row_roles("batch.roles", [2, 5, 6], 3)
    assert roles is not None
    assert roles.dtype == np.int8 and roles.tolist() == [2, 5, 6]


@pytest.mark.parametrize(("values", "fragment"), [
    ([2, 5], "batch.roles: expected none or one per row (3), found 2"),
    ([2, 5, 6, 6], "batch.roles: expected none or one per row (3), found 4"),
    ([2, 9, 5], "batch.roles[1]: expected a RowRole (0 to 6"),
    ([2, 5, -1], "batch.roles[2]: expected a RowRole"),
])
def test_codec_refuses_roles_naming_the_field(values: list[int], fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        codec.row_roles("batch.roles", values, 3)
    assert fragment in str(caught.value)


class Seen:
    """A plugin that keeps what the engine hands to guard_detect (copies)."""

    def __init__(self) -> None:
        self.batches: list[FeatureBatch] = []

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        self.batches.append(dataclasses.replace(
            batch, roles=None if batch.roles is None else batch.roles.copy()))


@pytest.fixture
def seen_server(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, Seen]]:
    """A real guard (gRPC on a Unix socket) with the :class:`Seen` plugin."""
    seen = Seen()
    config = dataclasses.replace(
        make_config(tmp_path, sae_dir, drain_grace_seconds=1),
        plugins=PluginsConfig(autoload=False, timeout_ms=30_000))
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config, extra_plugins=[PluginSource("seen", "0", seen)]))
    yield server, seen
    server.stop(0)


def test_roles_reach_the_plugins_as_the_host_sent_them(
        seen_server: tuple[GuardServer, Seen]) -> None:
    server, seen = seen_server
    rows = np.random.default_rng(0).normal(size=(5, D_IN)).astype(np.float32)
    with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=30_000) as client:
        verdict = client.inspect("r1", HOOK, rows, [1, 2, 3, 4, 5],
                                 roles=["template", "user", RowRole.USER, 5, "template"])
        assert verdict.source == "guard", verdict.reason
        client.inspect("r2", HOOK, rows, [1, 2, 3, 4, 5])  # an old host: no roles
        step = client.inspect_step(
            HOOK, rows, [Segment("a", 3), Segment("b", 2, "generation")], [1, 2, 3, 40, 41],
            roles=np.array([T, U, T, G, G], dtype=np.int8))
        assert [v.source for v in step.verdicts] == ["guard", "guard"]
    by_request = {b.request_id: b for b in seen.batches}
    first = by_request["r1"].roles
    assert first is not None and first.dtype == np.int8
    assert first.tolist() == [T, U, U, T, T]
    assert by_request["r2"].roles is None
    a_roles, b_roles = by_request["a"].roles, by_request["b"].roles
    assert a_roles is not None and a_roles.tolist() == [T, U, T]  # each request its slice
    assert b_roles is not None and b_roles.tolist() == [G, G]


@pytest.mark.parametrize(("roles", "fragment"), [
    ([2, 2], "batch.roles: expected none or one per row (3), found 2"),
    ([2, 7, 2], "batch.roles[1]: expected a RowRole"),
])
def test_bad_roles_get_an_error_reply_naming_the_field_and_the_stream_goes_on(
        stream: StreamClient, roles: list[int], fragment: str) -> None:
    stream.configure()
    bad = make_batch(sequence=1)
    # unknown enum values survive the wire (proto3 enums are open)
    bad.roles.extend(pb.RowRole.ValueType(r) for r in roles)
    reply = stream.ask(bad)
    assert reply.HasField("error")
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert fragment in reply.error.message
    good = make_batch(sequence=2)
    good.roles.extend([pb.ROLE_TEMPLATE, pb.ROLE_USER, pb.ROLE_USER])
    reply = stream.ask(good)
    assert not reply.HasField("error"), reply.error.message
    assert reply.action == pb.ACTION_CONTINUE


@pytest.mark.parametrize(("roles", "error", "fragment"), [
    (["user", "nobody", "user"], ValueError, "roles[1]: expected a role name"),
    (["user"], ValueError, "roles: expected one role per row (3), found 1"),
    ([2, 7, 2], ValueError, "roles[1]: expected a guard.RowRole"),
    ([2, True, 2], ValueError, "roles[1]"),
    ("user", TypeError, "roles: expected one role per row"),
    (np.array([2, 9, 2]), ValueError, "roles[1]: expected a RowRole value"),
    (np.array([2.0, 2.0, 2.0]), TypeError, "roles: expected integer RowRole values"),
])
def test_the_host_sdk_refuses_bad_roles_naming_the_argument(
        roles: Any, error: type[Exception], fragment: str) -> None:
    rows = np.zeros((3, D_IN), dtype=np.float32)
    with GuardClient("unix:///nonexistent/guard.sock", hooks=[HOOK]) as client, \
            pytest.raises(error) as caught:
        client.inspect("r", HOOK, rows, [1, 2, 3], roles=roles)
    assert fragment in str(caught.value)


def test_recorded_batches_keep_their_roles(tmp_path: Path) -> None:
    batch = make_feature_batch(activations=[[1.0], [2.0], [3.0]], roles=["template", "user",
                                                                           RowRole.GENERATED])
    bare = make_feature_batch(activations=[[1.0]])
    save_batches(tmp_path / "b.npz", [batch, bare])
    loaded, loaded_bare = load_batches(tmp_path / "b.npz")
    assert loaded.roles is not None and loaded.roles.tolist() == [T, U, G]
    assert loaded_bare.roles is None


# -- which rows a reader reads ----------------------------------------------------------------


def test_unlabelled_rows_are_read_whatever_the_choice() -> None:
    roles = np.array([T, U, X, G, S], dtype=np.int8)
    mask = role_mask(roles, frozenset({U}))
    assert mask is not None and mask.tolist() == [False, True, True, False, False]
    assert role_mask(roles, None) is None  # `all`
    assert role_mask(None, frozenset({U})) is None  # a batch without roles: every row
    assert role_mask(np.array([U, G], dtype=np.int8), CONTENT_ROLES) is None  # all chosen


def test_the_plugin_default_is_the_content_roles() -> None:
    # System messages are read: on an OpenAI-compatible server the client writes them.
    assert DEFAULT_ROWS == CONTENT_ROLES == {RowRole.SYSTEM, RowRole.USER, RowRole.ASSISTANT,
                                              RowRole.TOOL, RowRole.GENERATED}
    assert RowRole.TEMPLATE not in DEFAULT_ROWS


# -- detectors choose their rows --------------------------------------------------------------


def detectors(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("detectors", "test", Detectors)])
    plugins.configure({"detectors": settings})
    return plugins


def detect(plugins: PluginSet, batch: FeatureBatch) -> dict[str, Finding]:
    findings, failures = plugins.detect(batch)
    assert failures == []
    return {f.detector: f for f in findings}


def linear(**extra: Any) -> dict[str, Any]:
    return {"type": "linear", "hook": "blocks.0.hook_resid_post", "weights": {7: 1.0},
            "threshold": 1.0, "reduce": "mean", **extra}


#: Template rows score high (the assistant-turn opener), the user's words low: the shape of
#: issue 22's false positives.
SCORES = [9.0, 0.5, 0.5, 9.0, 9.0, 0.0]
ROLES = ["template", "user", "user", "template", "template", "generated"]


def chat_batch(roles: Sequence[str] | None = ROLES) -> FeatureBatch:
    return make_feature_batch(activations={7: SCORES}, positions=[10, 11, 12, 13, 14, 15],
                              hook="blocks.0.hook_resid_post", phase=Phase.PROMPT,
                              roles=roles)


def test_by_default_a_detector_pools_over_content_rows_only() -> None:
    plugins = detectors({"content": linear(threshold=0.3), "everything": linear(rows="all"),
                         "template": linear(rows=["template"])})
    found = detect(plugins, chat_batch())
    # content: the mean over the user and generated rows (0.5, 0.5, 0.0)
    assert found["content"].score == pytest.approx(1.0 / 3.0)
    assert found["content"].positions == (11, 12)  # the rows at or above the threshold
    assert found["everything"].score == pytest.approx(sum(SCORES) / 6)
    assert found["template"].score == pytest.approx(9.0)
    assert found["template"].positions == (10, 13, 14)
    assert "over 3 rows" in found["template"].message


def test_the_default_would_not_fire_where_template_rows_alone_do() -> None:
    plugins = detectors({"jb": linear()})
    assert detect(plugins, chat_batch()) == {}
    assert set(detect(detectors({"jb": linear(rows="all")}), chat_batch())) == {"jb"}


def test_rows_of_a_role_that_the_batch_lacks_give_no_finding() -> None:
    plugins = detectors({"sys": linear(rows=["system"], threshold=-5.0)})
    assert detect(plugins, chat_batch()) == {}


def test_threshold_and_sustained_detectors_read_their_rows_too() -> None:
    plugins = detectors({
        "peak": {"hook": "blocks.0.hook_resid_post", "features": [7], "threshold": 5.0},
        "peak-all": {"hook": "blocks.0.hook_resid_post", "features": [7], "threshold": 5.0,
                     "rows": "all"},
        "run": {"type": "sustained", "hook": "blocks.0.hook_resid_post", "features": [7],
                "threshold": 5.0, "window": 2, "rows": ["template"]},
    })
    found = detect(plugins, chat_batch())
    assert "peak" not in found  # the peaks are template rows
    assert found["peak-all"].positions == (10, 13, 14)
    # template rows 13 and 14 are consecutive positions; 10 alone is a run of one
    assert found["run"].positions == (14,)


def test_a_batch_without_roles_is_read_whole_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    plugins = detectors({"jb": linear()})
    with caplog.at_level(logging.INFO, logger="guard_plugins.detectors"):
        first = detect(plugins, chat_batch(roles=None))
        detect(plugins, chat_batch(roles=None))
    assert first["jb"].score == pytest.approx(sum(SCORES) / 6)  # every row, as before
    lines = [r for r in caplog.records if "without row roles" in r.getMessage()]
    assert len(lines) == 1


def test_unspecified_rows_are_read_by_every_detector() -> None:
    plugins = detectors({"jb": linear(rows=["user"], threshold=0.0)})
    batch = chat_batch(roles=["unspecified", "user", "user", "template", "template",
                              "generated"])
    assert detect(plugins, batch)["jb"].score == pytest.approx((9.0 + 0.5 + 0.5) / 3)


@pytest.mark.parametrize(("rows", "key", "fragment"), [
    ("some", "rows", "'all' or a non-empty list of row roles"),
    ([], "rows", "'all' or a non-empty list of row roles"),
    (["user", "templates"], "rows[1]", "a row role (system, user, assistant, tool, "
                                      "template, generated)"),
    (["user", "user"], "rows[1]", "each role once"),
    (["unspecified"], "rows[0]", "a row role"),
    (7, "rows", "'all' or a non-empty list"),
])
def test_bad_rows_settings_name_the_key(rows: Any, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        detectors({"jb": linear(rows=rows)})
    assert caught.value.key == f"plugins.config.detectors.jb.{key}"
    assert fragment in str(caught.value)


def test_rows_settings_that_parse() -> None:
    plugin = Detectors()
    plugin.guard_configure({"a": linear(rows="user"), "b": linear(rows=["user", "generated"]),
                            "c": linear(rows="all"), "d": linear()})
    roles = {d.rule.name: d.rule.roles for d in plugin.detectors}
    assert roles == {"a": {RowRole.USER}, "b": {RowRole.USER, RowRole.GENERATED},
                     "c": None, "d": DEFAULT_ROWS}


# -- steering chooses its rows ----------------------------------------------------------------


def steering(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("steering", "test", SteeringPlugin)])
    plugins.configure({"steering": settings})
    return plugins


EDIT = [{"feature": 7, "nudge": 1.0}]


def edited_positions(settings: Mapping[str, Any], batch: FeatureBatch,
                     findings: Sequence[Finding] = ()) -> list[tuple[int, ...] | None]:
    edits, failures = steering(settings).steer(batch, list(findings))
    assert failures == []
    return [e.positions for e in edits]


def test_steering_edits_content_rows_by_default_and_every_row_when_asked() -> None:
    hook = "blocks.0.hook_resid_post"
    batch = chat_batch()
    assert edited_positions({"r": {"hook": hook, "edits": EDIT}}, batch) == [(11, 12, 15)]
    assert edited_positions({"r": {"hook": hook, "edits": EDIT, "rows": "all"}},
                            batch) == [None]
    assert edited_positions({"r": {"hook": hook, "edits": EDIT, "rows": ["template"]}},
                            batch) == [(10, 13, 14)]
    assert edited_positions({"r": {"hook": hook, "edits": EDIT, "rows": ["system"]}},
                            batch) == []
    assert edited_positions({"r": {"hook": hook, "edits": EDIT}}, chat_batch(None)) == [None]
    fired = Finding("jb", 1.0, 0.5, positions=(12,))
    assert edited_positions({"r": {"hook": hook, "edits": EDIT, "when": "jb"}}, batch,
                            [fired]) == [(12,)]
    assert edited_positions({"r": {"hook": hook, "edits": EDIT, "when": "jb",
                                   "rows": ["user"]}}, batch, [fired]) == [(11, 12)]


def test_steering_rows_errors_name_the_key() -> None:
    hook = "blocks.0.hook_resid_post"
    with pytest.raises(ConfigError) as caught:
        steering({"r": {"hook": hook, "edits": EDIT, "rows": "fired"}})
    assert caught.value.key == "plugins.config.steering.r.rows"
    assert "fired needs `when`" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        steering({"r": {"hook": hook, "edits": EDIT, "rows": ["user", "nope"]}})
    assert caught.value.key == "plugins.config.steering.r.rows[1]"


# -- the chat renderer ------------------------------------------------------------------------


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
        models.load_smollm2()  # writes the cache once
    return transformers.AutoTokenizer.from_pretrained(folder)


def decoded(tokenizer: Any, ids: Sequence[int], roles: Any, role: RowRole) -> str:
    return str(tokenizer.decode([i for i, r in zip(ids, roles, strict=True) if r == role]))


def test_render_gives_the_template_ids_and_marks_only_the_message_as_user(
        tokenizer: Any) -> None:
    from guard.models.smollm2 import chat_input_ids

    messages = [{"role": "user", "content": "How tall is Mount Everest?"}]
    ids, roles = render(tokenizer, messages)
    assert ids == chat_input_ids(tokenizer, messages)[0].tolist()
    assert roles.dtype == np.int8 and len(roles) == len(ids)
    assert decoded(tokenizer, ids, roles, U) == "How tall is Mount Everest?"
    assert set(roles.tolist()) == {U, T}
    # the 6 rows that open the assistant's turn (issue 22) are the template's
    assert tokenizer.decode(ids[-6:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert roles[-6:].tolist() == [T] * 6
    # SmolLM2's default system prompt is written by the template, not by a message
    assert "You are a helpful AI assistant" in decoded(tokenizer, ids, roles, T)


def test_render_marks_every_message_of_a_conversation(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "user"},  # the role's own name as content
                {"role": "assistant", "content": "  Bonjour ! "},  # kept as it is
                {"role": "user", "content": "Merci, et 2+2 ?"}]
    ids, roles = render(tokenizer, messages, add_generation_prompt=False)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True,
                                                add_generation_prompt=False)["input_ids"]
    assert decoded(tokenizer, ids, roles, S) == "Answer in French."
    assert decoded(tokenizer, ids, roles, U) == "userMerci, et 2+2 ?"
    # the header's newline and the content's leading spaces merge into one token, which
    # straddles template and content: it counts as content (as documented)
    assert decoded(tokenizer, ids, roles, A) == "\n  Bonjour ! "
    assert "You are a helpful" not in tokenizer.decode(ids)  # a system message was given
    header = ids.index(tokenizer.convert_tokens_to_ids("user"))  # '<|im_start|>user' header
    assert roles[header] == T


class FakeTokenizer:
    """A tokenizer whose template does what a test needs (no offsets by default)."""

    def __init__(self, template: Any, offsets: bool = True) -> None:
        self.template = template
        self.offsets = offsets

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.template(messages)

    def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
        if not self.offsets:
            raise NotImplementedError("return_offset_mapping is not available")
        return {"input_ids": [ord(c) for c in text],
                "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_render_trims_with_the_template_and_refuses_a_template_that_rewrites_content() -> None:
    trimming = FakeTokenizer(lambda ms: "".join(f"[{m['role']}]{m['content'].strip()}|"
                                                for m in ms))
    ids, roles = render(trimming, [{"role": "user", "content": "  hi  "}])
    assert "".join(chr(i) for i, r in zip(ids, roles, strict=True) if r == U) == "hi"
    shouting = FakeTokenizer(lambda ms: "".join(m["content"].upper() for m in ms) + "!")
    with pytest.raises(ValueError, match=r"messages\[0\].content: the chat template changes"):
        render(shouting, [{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="expected a fast tokenizer"):
        render(FakeTokenizer(lambda ms: "x", offsets=False), [{"role": "user", "content": "x"}])
    with pytest.raises(TypeError, match=r"messages\[1\].content: expected a string"):
        render(trimming, [{"role": "user", "content": "a"}, {"role": "user", "content": [1]}])
    unknown = render(trimming, [{"role": "narrator", "content": "once"}])
    assert RowRole.UNSPECIFIED in unknown.roles.tolist()


# -- the transformers attach labels the rows --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tokenizer: Any) -> Any:
    """A random Llama as wide as the test SAE (d_in 16) and deep enough for its hook."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_IN, intermediate_size=32,
                         num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1)
    model: Any = LlamaForCausalLM(config)
    model.eval()
    return model


def test_attach_sends_the_prompts_roles_and_marks_generated_tokens(
        seen_server: tuple[GuardServer, Seen], tiny_llama: Any, tokenizer: Any) -> None:
    import torch

    from guard.host.attach import attach

    server, seen = seen_server
    chat = render(tokenizer, [{"role": "user", "content": "Name three colours."}])
    ids = torch.tensor([chat.token_ids])
    with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=30_000) as client, \
            attach(tiny_llama, client, [HOOK]) as guard, torch.no_grad():
        with guard.request("labelled", roles=chat.roles):
            tiny_llama.generate(ids, max_new_tokens=3, do_sample=False)
        with guard.request("bare"):  # no roles given: none sent, as before
            tiny_llama.generate(ids, max_new_tokens=2, do_sample=False)
    labelled = [b for b in seen.batches if b.request_id == "labelled"]
    prompt, *generated = labelled
    assert prompt.roles is not None
    np.testing.assert_array_equal(prompt.roles, chat.roles[1:])  # position 0 is not sent
    assert [b.roles.tolist() for b in generated if b.roles is not None] == [[G], [G]]
    assert len(generated) == 2
    assert all(b.roles is None for b in seen.batches if b.request_id == "bare")


def test_attach_labels_each_sequence_of_a_batch_from_its_own_roles(
        seen_server: tuple[GuardServer, Seen], tiny_llama: Any, tokenizer: Any) -> None:
    import torch

    from guard.host.attach import attach

    server, seen = seen_server
    chats = [render(tokenizer, [{"role": "user", "content": text}])
             for text in ("Hi", "What is the capital of France?")]
    width = max(len(c.token_ids) for c in chats)
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, chat in enumerate(chats):  # padded on the left, as generation wants
        ids[b, width - len(chat.token_ids):] = torch.tensor(chat.token_ids)
        mask[b, width - len(chat.token_ids):] = 1
    with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=30_000) as client, \
            attach(tiny_llama, client, [HOOK]) as guard, torch.no_grad(), \
            guard.requests(["short", "long"], roles=[chats[0].roles, None]):
        tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                            do_sample=False)
    short = [b for b in seen.batches if b.request_id == "short"]
    long = [b for b in seen.batches if b.request_id == "long"]
    assert short[0].roles is not None and long[0].roles is not None
    np.testing.assert_array_equal(short[0].roles, chats[0].roles[1:])
    assert set(long[0].roles.tolist()) == {X}  # its roles were not given
    assert [b.roles.tolist() for b in short[1:] if b.roles is not None] == [[G]]
    assert [b.roles.tolist() for b in long[1:] if b.roles is not None] == [[G]]


# -- calibration reads the rows a detector reads ----------------------------------------------


def test_calibration_reduces_over_the_chosen_rows_and_shadow_scores_them_alike(
        sae_dir: Path) -> None:
    from guard.audit.calibrate import shadow_prompts
    from guard.audit.rank import ResidualRows, encode_prompts
    from guard.sae import open_sae

    rng = np.random.default_rng(3)
    roles = np.array([T, T, U, U, U, T, T, T, U, U, T], dtype=np.int8)  # prompts of 6 and 5
    resid = ResidualRows(
        layer=6, rows=rng.normal(size=(11, D_IN)).astype(np.float32),
        offsets=np.array([0, 6, 11]), prompt_tokens=np.array([3, 2]),
        tokens=[[f"t{i}" for i in range(6)], [f"t{i}" for i in range(5)]], roles=roles,
        token_ids=np.arange(100, 111))
    sae = open_sae(sae_dir, providers=["CPUExecutionProvider"])
    acts = encode_prompts(resid, [1, 0], sae)
    full = sae.encoder(None).encode(resid.rows)
    first, second = full[:6], full[6:]
    np.testing.assert_allclose(acts.mean_acts[0], first[roles[:6] == U].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(acts.max_acts[1], second[roles[6:] == U].max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(acts.resid_mean[0], resid.rows[2:5].mean(axis=0), rtol=1e-6)
    everything = encode_prompts(resid, [1, 0], sae, rows=None)
    np.testing.assert_allclose(everything.mean_acts[0], first.mean(axis=0), rtol=1e-6)

    weights = {3: 1.5, 10: -0.5, 40: 2.0}
    block = {"type": "linear", "hook": HOOK, "weights": weights, "bias": 0.25,
             "threshold": -1e9, "reduce": "mean"}
    shadow = shadow_prompts({"content": block, "all": {**block, "rows": "all"}}, acts)
    for prompt in range(2):
        fitted = 0.25 + sum(w * float(acts.mean_acts[prompt, f]) for f, w in weights.items())
        whole = 0.25 + sum(w * float(everything.mean_acts[prompt, f])
                           for f, w in weights.items())
        assert shadow.scores["content"][prompt] == pytest.approx(fitted, rel=1e-5, abs=1e-6)
        assert shadow.scores["all"][prompt] == pytest.approx(whole, rel=1e-5, abs=1e-6)


def test_the_written_block_names_the_rows_it_was_fitted_on() -> None:
    import guard.audit.calibrate as cal
    from guard.audit.calibrate import detector_blocks
    from guard.audit.rank import parse_rows
    from tests.test_audit_calibrate import planted_set

    acts, groups, sources = planted_set(n_pos=40, n_neg=40)
    order = np.random.default_rng(0).permutation(len(acts))
    train, test = np.sort(order[:56]), np.sort(order[56:])
    unlabelled = cal.calibrate(acts, train, test, name="x", groups=groups, sources=sources)
    assert {b["rows"] for b in detector_blocks(unlabelled).values()} == {"all"}
    labelled = dataclasses.replace(acts, roles=np.full(sum(len(t) for t in acts.tokens), U,
                                                       dtype=np.int8),
                                   rows=parse_rows("user,generated"))
    result = cal.calibrate(labelled, train, test, name="x", groups=groups, sources=sources)
    blocks = detector_blocks(result)
    assert all(b["rows"] == ["user", "generated"] for b in blocks.values())
    assert cal.metrics_record(result)["rows"] == ["user", "generated"]
    plugins = detectors(blocks)  # the plugin reads what calibration wrote
    plugins.shutdown()


@pytest.mark.parametrize(("text", "expected"), [
    ("all", None), ("user", frozenset({U})), (" user , generated ", frozenset({U, G})),
])
def test_the_rows_option_parses(text: str, expected: frozenset[RowRole] | None) -> None:
    from guard.audit.rank import parse_rows

    assert parse_rows(text) == expected


@pytest.mark.parametrize("text", ["", "users", "user,unspecified", ","])
def test_a_bad_rows_option_names_itself(text: str) -> None:
    from guard.audit.rank import parse_rows

    with pytest.raises(InvalidInput, match="--rows: expected 'all' or comma-separated row "
                                           "roles"):
        parse_rows(text)
