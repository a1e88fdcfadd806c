"""``guard sae convert``: pickles are checked before anything in them runs, bad state dicts are
refused with errors naming the file, the field, what was expected and what was found, and the
sidecar's readers refuse a raw pickle, naming the command."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guard.errors import GuardError, SaeFileError
from guard.sae import open_sae
from guard.sae.cli import register
from guard.sae.export import export_artifact
from guard.training import convert as convert_module
from guard.training.cli import register as register_training
from guard.training.convert import check_pickle, convert
from tests.sae_fixtures import write_safetensors
from tests.sidecar import refused_start
from tests.torch_state_dicts import goodfire_state, openai_state, save

D_IN, D_SAE = 16, 48


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="guard")
    register_training(register(parser.add_subparsers(dest="command", required=True)))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


class Payload:
    """Unpickling this runs ``os.system``: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def torch_load_spy(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files handed to torch.load (the refused ones must never get there)."""
    calls: list[Path] = []
    real = torch.load

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(path))
        assert kwargs.get("weights_only") is True
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# --- pickles that would run code ------------------------------------------------------------


@pytest.mark.parametrize("container", ["torch.save", "bare pickle", "bare pickle protocol 2"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(
        tmp_path: Path, container: str, torch_load_spy: list[Path]) -> None:
    marker = tmp_path / "pwned"
    source = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    if container == "torch.save":
        state = goodfire_state(D_IN, D_SAE)
        state["encoder_linear.bias"] = Payload(marker)
        torch.save(state, source)
    else:
        payload = {"encoder_linear.bias": Payload(marker)}
        source.write_bytes(pickle.dumps(payload, protocol=5 if container == "bare pickle" else 2))
    with pytest.raises(SaeFileError) as raised:
        convert(source, tmp_path / "out")
    message = str(raised.value)
    assert str(source) in message
    assert "system" in message and "refused without unpickling" in message
    assert not marker.exists(), "the pickle ran"
    assert torch_load_spy == []
    assert not (tmp_path / "out").exists()
    # The CLI says the same and exits 1.
    assert run("sae", "convert", str(source), str(tmp_path / "out")) == 1
    assert not marker.exists()


def test_the_payload_in_these_tests_does_run_when_unpickled(tmp_path: Path) -> None:
    """The test above is not vacuous: the same bytes, unpickled, create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"x": Payload(marker)}))
    assert marker.exists()


def test_a_harmless_but_foreign_object_is_refused_naming_it(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    state["trained_on"] = datetime.date(2024, 12, 1)
    source = save(state, tmp_path / "sae.pth")
    with pytest.raises(SaeFileError, match=r"refers to datetime\.date .*expected only tensors"):
        convert(source, tmp_path / "out")


def test_a_stack_global_built_from_unknown_strings_is_refused() -> None:
    """STACK_GLOBAL takes its module and name from the stack: when they are not two plain
    strings pushed just before, the scan cannot know what it names and refuses."""
    # PROTO 4, the string "posix", an empty tuple (not a string), STACK_GLOBAL, STOP.
    data = b"\x80\x04\x8c\x05posix)\x93."
    with pytest.raises(SaeFileError, match=r"STACK_GLOBAL .* not plain strings"):
        convert_module.scan_pickle(Path("x.pth"), data, "data.pkl")
    memoized = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93."
    with pytest.raises(SaeFileError, match=r"posix\.system"):
        convert_module.scan_pickle(Path("x.pth"), memoized, "data.pkl")
    # Names fetched back from the memo are resolved, too.
    from_memo = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x940h\x00h\x01\x93."
    with pytest.raises(SaeFileError, match=r"posix\.system"):
        convert_module.scan_pickle(Path("x.pth"), from_memo, "data.pkl")


def test_legacy_and_torchscript_files_are_refused(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(SaeFileError, match=r"legacy\.pth: expected a torch zip archive .* "
                                           "found another format"):
        check_pickle(legacy)
    scripted = tmp_path / "scripted.pt"  # torch.jit.save's layout: code and constants
    with zipfile.ZipFile(scripted, "w") as archive:
        archive.writestr("scripted/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("scripted/code/__torch__.py", "def forward(self): pass\n")
        archive.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(SaeFileError, match="TorchScript archive"):
        check_pickle(scripted)


def test_a_clean_state_dict_passes_the_scan_and_loads(tmp_path: Path,
                                                      torch_load_spy: list[Path]) -> None:
    source = save(openai_state(D_IN, D_SAE), tmp_path / "l.pt")
    check_pickle(source)
    done = convert(source, tmp_path / "out")
    assert torch_load_spy == [source]
    assert (done.architecture, done.k, done.d_in, done.d_sae) == ("openai_topk", 8, D_IN, D_SAE)


# --- bad state dicts ---------------------------------------------------------------------------


def refused(tmp_path: Path, state: Any, *patterns: str, name: str = "sae.pt") -> str:
    source = save(state, tmp_path / name)
    with pytest.raises(SaeFileError) as raised:
        convert(source, tmp_path / "out")
    message = str(raised.value)
    assert message.startswith(f"{source}: "), message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert not (tmp_path / "out").exists()
    return message


def test_missing_tensor(tmp_path: Path) -> None:
    state = openai_state(D_IN, D_SAE)
    del state["latent_bias"]
    refused(tmp_path, state, r"missing tensor 'latent_bias'",
            r"state dict has \['decoder.weight', 'encoder.weight', 'latent_bias', 'pre_bias'\]",
            r"found \[.*'pre_bias'.*\]")


def test_shape_mismatch(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    state["encoder_linear.weight"] = torch.zeros(D_SAE, D_IN + 1)
    refused(tmp_path, state, r"tensor 'encoder_linear.weight': expected shape \[48, 16\]",
            r"\[d_sae, d_in\]", r"found \[48, 17\]")


@pytest.mark.parametrize(("fmt", "tensor"), [("openai", "encoder.weight"),
                                             ("openai", "decoder.weight"),
                                             ("goodfire", "decoder_linear.weight")])
def test_wrong_orientation(tmp_path: Path, fmt: str, tensor: str) -> None:
    state = openai_state(D_IN, D_SAE) if fmt == "openai" else goodfire_state(D_IN, D_SAE)
    state[tensor] = state[tensor].T.contiguous()
    expected = [D_SAE, D_IN] if tensor.startswith("encoder") else [D_IN, D_SAE]
    refused(tmp_path, state, rf"tensor '{re.escape(tensor)}': expected shape "
                             rf"{re.escape(str(expected))}",
            rf"found {re.escape(str(expected[::-1]))}", r"transpose .*\[out_features, "
                                                         r"in_features\]")


def test_a_size_tensor_of_the_wrong_rank(tmp_path: Path) -> None:
    state = openai_state(D_IN, D_SAE)
    state["pre_bias"] = torch.zeros(1, D_IN)
    refused(tmp_path, state, r"tensor 'pre_bias': expected shape \[d_in\]",
            rf"found \[1, {D_IN}\]")


def test_non_tensor_entries_and_unknown_tensors(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    state["note"] = "hello"
    refused(tmp_path, state, r"unexpected entries \['note'\]: a Goodfire state dict holds only "
                             "tensors")
    state = openai_state(D_IN, D_SAE)
    state["W_skip"] = torch.zeros(D_IN, D_IN)
    refused(tmp_path, state, r"unexpected tensor\(s\) \['W_skip'\]")
    state = openai_state(D_IN, D_SAE)
    state["encoder.weight"] = torch.zeros(D_SAE, D_IN, dtype=torch.int32)
    refused(tmp_path, state, r"tensor 'encoder.weight': expected a dense floating-point",
            r"found torch.int32")


def test_a_list_is_not_a_state_dict(tmp_path: Path) -> None:
    refused(tmp_path, [torch.zeros(3)], r"expected a state dict \(a mapping of names to "
                                        r"tensors\), found list")


@pytest.mark.parametrize(("activation", "act_state", "pattern"), [
    ("Identity", {}, r"entry 'activation': expected 'TopK' or 'ReLU', found 'Identity' "
                     r"\(an Identity activation is not sparse\)"),
    ("TopK", {"postact_fn": "ReLU"}, r"entry 'activation_state_dict.k': expected an integer "
                                     r"in \[1, 48\] \(d_sae\), found None"),
    ("TopK", {"k": 49, "postact_fn": "ReLU"}, r"found 49"),
    ("TopK", {"k": 4, "postact_fn": "Identity"}, r"postact_fn': expected 'ReLU'.*'Identity'"),
])
def test_openai_activation_entries(tmp_path: Path, activation: str, act_state: dict[str, Any],
                                   pattern: str) -> None:
    state = openai_state(D_IN, D_SAE)
    state["activation"] = activation
    state["activation_state_dict"] = OrderedDict(act_state)
    refused(tmp_path, state, pattern)


def test_not_a_known_sae(tmp_path: Path) -> None:
    refused(tmp_path, {"W_enc": torch.zeros(D_IN, D_SAE)},
            r"expected the state dict of a known SAE: OpenAI's .* Goodfire's",
            r"found tensors \['W_enc'\]")


def test_non_finite_weights_are_refused_by_the_reader(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    state["encoder_linear.bias"][3] = float("nan")
    refused(tmp_path, state, r"tensor 'encoder_linear.bias': expected finite values, found 1 "
                             r"NaN/Inf", r"in the converted goodfire_sae.safetensors")


def test_an_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    source = save(goodfire_state(D_IN, D_SAE), tmp_path / "sae.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SaeFileError, match="use --force"):
        convert(source, out)
    assert (out / "keep").exists()
    convert(source, out, force=True, hook="blocks.3.hook_resid_post")
    assert not (out / "keep").exists() and open_sae(out).info.hook_name == (
        "blocks.3.hook_resid_post")


def test_a_bad_neuronpedia_id_is_refused_before_reading(tmp_path: Path) -> None:
    source = save(goodfire_state(D_IN, D_SAE), tmp_path / "sae.pth")
    with pytest.raises(GuardError, match=r"--neuronpedia-id: expected a Neuronpedia id "
                                         r"'model/<layer>-<set>'.*found 'llama3.1-8b-it'"):
        convert(source, tmp_path / "out", neuronpedia_id="llama3.1-8b-it")


# --- the converted folder's reader ---------------------------------------------------------


def converted(tmp_path: Path) -> Path:
    return convert(save(openai_state(D_IN, D_SAE), tmp_path / "l.pt"), tmp_path / "conv",
                   hook="blocks.1.hook_resid_post").out


def test_the_reader_checks_the_converted_folder(tmp_path: Path) -> None:
    folder = converted(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": D_SAE + 1}))
    with pytest.raises(SaeFileError, match=rf"cfg.json: field 'k': expected at most "
                                           rf"d_sae={D_SAE}, found {D_SAE + 1}"):
        open_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "openai_gated"}))
    with pytest.raises(SaeFileError, match=r"field 'architecture': expected one of "
                                           r"\['openai_relu', 'openai_topk'\]"):
        open_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "neuronpedia_id": "gpt2-small"}))
    with pytest.raises(SaeFileError, match=r"field 'neuronpedia_id': expected a Neuronpedia id"):
        open_sae(folder)
    # A weights file written by hand in SAELens's orientation is refused, naming the tensor.
    rng = np.random.default_rng(0)
    f32 = np.float32
    write_safetensors(folder / "openai_sae.safetensors", {
        "pre_bias": rng.normal(size=D_IN).astype(f32),
        "latent_bias": rng.normal(size=D_SAE).astype(f32),
        "encoder.weight": rng.normal(size=(D_IN, D_SAE)).astype(f32),
        "decoder.weight": rng.normal(size=(D_IN, D_SAE)).astype(f32),
    })
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeFileError, match=r"openai_sae.safetensors: tensor 'encoder.weight': "
                                           r"expected shape \[48, 16\].*found \[16, 48\]: "
                                           "the transpose"):
        open_sae(folder)


# --- the sidecar never unpickles -------------------------------------------------------------


def test_the_sidecar_readers_refuse_a_raw_pickle_naming_the_command(
        tmp_path: Path, torch_load_spy: list[Path]) -> None:
    source = save(goodfire_state(D_IN, D_SAE), tmp_path / "sae" / "Llama-SAE-l19.pth")
    for where in (source, source.parent):  # the file, or a folder holding it
        with pytest.raises(SaeFileError) as raised:
            open_sae(where, hook="blocks.19.hook_resid_post")
        message = str(raised.value)
        assert "never unpickles" in message and f"guard sae convert {source} OUT" in message
    with pytest.raises(SaeFileError, match="guard sae convert"):
        export_artifact(source, tmp_path / "art", dtype="fp32", stream=None)
    np.save(tmp_path / "x.npy", np.zeros((2, D_IN), dtype=np.float32))
    assert run("sae", "encode", str(source), "--input", str(tmp_path / "x.npy"),
               "--output", str(tmp_path / "a.npy")) == 1
    assert not (tmp_path / "a.npy").exists()
    assert torch_load_spy == []


def test_guard_serve_refuses_a_raw_pickle_naming_the_command(tmp_path: Path) -> None:
    source = save(goodfire_state(D_IN, D_SAE), tmp_path / "sae.pth")
    log = refused_start(tmp_path, {"path": str(source), "hook": "blocks.19.hook_resid_post"})
    assert "never unpickles" in log and "guard sae convert" in log


def test_encode_refuses_an_empty_rows_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An empty --input file is an error naming it (it raised EOFError out of the CLI)."""
    (tmp_path / "x.npy").write_bytes(b"")
    assert run("sae", "encode", str(converted(tmp_path)), "--input", str(tmp_path / "x.npy"),
               "--output", str(tmp_path / "a.npy")) == 1
    assert f"{tmp_path / 'x.npy'}: cannot read a .npy array" in capsys.readouterr().err
