"""Bad files of issue 17's formats are refused with an error naming the file, the field, what
was expected and what was found; nothing is encoded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.errors import SaeFileError
from guard.sae import open_sae
from guard.sae.cli import register
from tests.sae_fixtures import (
    llamascope_hyperparams,
    random_gemmascope2_params,
    random_llamascope_tensors,
    random_transcoder_weights,
    write_gemmascope2,
    write_llamascope,
    write_saelens_transcoder,
)

D_IN, D_SAE, D_OUT = 32, 128, 24


def main(argv: list[str]) -> int:
    """``guard <argv>`` for the ``sae`` commands (``guard.sae.cli``, as ``guard`` wires it)."""
    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def refused(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(SaeFileError) as caught:
        open_sae(path, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- Gemma Scope 2 ----------------------------------------------------------------------------


def gemmascope2(tmp_path: Path, params: dict[str, Any], config: dict[str, Any] | None = None,
                site: str = "transcoder_all") -> Path:
    folder = tmp_path / site / "layer_3_width_16k_l0_small_affine"
    return write_gemmascope2(folder, params, config)


def test_gemmascope2_missing_tensor(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE)
    del params["threshold"]
    refused(gemmascope2(tmp_path, params), "params.safetensors", "missing tensor 'threshold'",
            "expected ['b_dec', 'b_enc', 'threshold', 'w_dec', 'w_enc']",
            "found ['b_dec', 'b_enc', 'w_dec', 'w_enc']")


def test_gemmascope2_shape_mismatch(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE)
    params["b_enc"] = params["b_enc"][:-1]
    refused(gemmascope2(tmp_path, params), "params.safetensors", "tensor 'b_enc'",
            f"expected shape [{D_SAE}]", f"found [{D_SAE - 1}]")
    params = random_gemmascope2_params(D_IN, D_SAE, D_OUT)
    params["b_dec"] = np.zeros(D_IN, dtype=np.float32)
    refused(gemmascope2(tmp_path / "b", params), "params.safetensors", "tensor 'b_dec'",
            f"expected shape [{D_OUT}] (d_out)", f"found [{D_IN}]")


def test_gemmascope2_affine_skip_in_the_wrong_orientation(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE, D_OUT, affine=True)
    params["affine_skip_connection"] = np.ascontiguousarray(params["affine_skip_connection"].T)
    refused(gemmascope2(tmp_path, params), "params.safetensors", "'affine_skip_connection'",
            f"expected shape [{D_IN}, {D_OUT}] (d_in, d_out", f"found [{D_OUT}, {D_IN}]",
            "transposed")
    params["affine_skip_connection"] = np.zeros((D_IN, D_IN), dtype=np.float32)
    message = refused(gemmascope2(tmp_path / "b", params), "'affine_skip_connection'",
                      f"expected shape [{D_IN}, {D_OUT}]", f"found [{D_IN}, {D_IN}]")
    assert "transposed" not in message


def test_gemmascope2_config_and_tensors_disagree(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE)
    refused(gemmascope2(tmp_path, params, {"affine_connection": True}), "config.json",
            "'affine_connection' is true", "no 'affine_skip_connection' tensor")
    refused(gemmascope2(tmp_path / "b", params, {"architecture": "topk"}), "config.json",
            "'architecture'", "expected 'jump_relu'", "found 'topk'")


def test_gemmascope2_cross_layer_transcoder_is_refused(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE)
    params["w_dec"] = np.zeros((D_SAE, 2, D_IN), dtype=np.float32)
    refused(gemmascope2(tmp_path, params), "params.safetensors", "tensor 'w_dec'",
            "expected 2 dimensions [d_sae, d_out]", f"found shape [{D_SAE}, 2, {D_IN}]")


# --- Llama Scope ------------------------------------------------------------------------------


def llamascope(tmp_path: Path, tensors: dict[str, Any] | None = None, **changes: Any) -> Path:
    return write_llamascope(
        tmp_path / "L15R",
        random_llamascope_tensors(D_IN, D_SAE) if tensors is None else tensors,
        llamascope_hyperparams(D_IN, D_SAE, **changes),
    )


def test_llamascope_missing_tensor(tmp_path: Path) -> None:
    tensors = random_llamascope_tensors(D_IN, D_SAE)
    del tensors["decoder.bias"]
    refused(llamascope(tmp_path, tensors), "final.safetensors", "missing tensor 'decoder.bias'",
            "found ['decoder.weight', 'encoder.bias', 'encoder.weight']")


def test_llamascope_shape_mismatch(tmp_path: Path) -> None:
    tensors = random_llamascope_tensors(D_IN, D_SAE)
    tensors["encoder.weight"] = np.ascontiguousarray(tensors["encoder.weight"].T)
    refused(llamascope(tmp_path, tensors), "final.safetensors", "'encoder.weight'",
            f"expected shape [{D_SAE}, {D_IN}] (d_sae, d_model)", f"found [{D_IN}, {D_SAE}]")
    tensors = random_llamascope_tensors(D_IN, D_SAE)
    tensors["decoder.weight"] = np.ascontiguousarray(tensors["decoder.weight"].T)
    refused(llamascope(tmp_path / "b", tensors), "final.safetensors", "'decoder.weight'",
            f"expected shape [{D_IN}, {D_SAE}] (d_model, d_sae)", f"found [{D_SAE}, {D_IN}]")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"dataset_average_activation_norm": None},
         ("'dataset_average_activation_norm'", "expected an object", "found None")),
        ({"dataset_average_activation_norm": {"in": 0}},
         ("'dataset_average_activation_norm.in'", "expected a positive number", "found 0")),
        ({"jump_relu_threshold": "0.3"},
         ("'jump_relu_threshold'", "expected a finite number", "found '0.3'")),
        ({"act_fn": "relu"}, ("'act_fn'", "expected 'jumprelu'", "found 'relu'")),
        ({"act_fn": "topk", "jump_relu_threshold": 0},
         ("'act_fn'", "positive jump_relu_threshold", "found 'topk'")),
        ({"norm_activation": "token-wise"},
         ("'norm_activation'", "expected 'dataset-wise'", "found 'token-wise'")),
        ({"apply_decoder_bias_to_pre_encoder": True},
         ("'apply_decoder_bias_to_pre_encoder'", "expected false", "found true")),
        ({"hook_point_in": None}, ("'hook_point_in'", "expected a hook name", "found None")),
        ({"d_model": 10**400}, ("'d_model'", "expected a model width", "401 digits")),
    ],
)
def test_llamascope_bad_hyperparams(
    tmp_path: Path, changes: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    refused(llamascope(tmp_path, **changes), "hyperparams.json", *fragments)


# --- SAELens transcoders ----------------------------------------------------------------------


def test_saelens_transcoder_missing_w_skip(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT)
    folder = write_saelens_transcoder(tmp_path, weights, architecture="skip_transcoder")
    refused(folder, "sae_weights.safetensors", "missing tensor 'W_skip'",
            "expected ['W_dec', 'W_enc', 'W_skip', 'b_dec', 'b_enc']")


def test_saelens_transcoder_shape_mismatch(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_IN)  # W_dec written d_in wide
    folder = write_saelens_transcoder(tmp_path, weights, architecture="transcoder",
                                      extra_cfg={"d_out": D_OUT})
    refused(folder, "sae_weights.safetensors", "tensor 'W_dec'",
            f"expected shape [{D_SAE}, {D_OUT}] (d_sae, d_out)", f"found [{D_SAE}, {D_IN}]")


def test_saelens_transcoder_w_skip_in_the_wrong_orientation(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT, skip=True)
    weights["W_skip"] = np.ascontiguousarray(weights["W_skip"].T)  # [d_in, d_out]
    folder = write_saelens_transcoder(tmp_path, weights, architecture="skip_transcoder")
    refused(folder, "sae_weights.safetensors", "tensor 'W_skip'",
            f"expected shape [{D_OUT}, {D_IN}] (d_out, d_in", f"found [{D_IN}, {D_OUT}]")


def test_saelens_transcoder_bad_config(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT)
    folder = write_saelens_transcoder(tmp_path, weights, architecture="transcoder",
                                      extra_cfg={"apply_b_dec_to_input": True})
    refused(folder, "cfg.json", "'apply_b_dec_to_input'", "expected false for a transcoder",
            "found true")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["d_out"], cfg["apply_b_dec_to_input"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    refused(folder, "cfg.json", "missing field 'd_out'", "expected a positive integer")


# --- artifacts --------------------------------------------------------------------------------


def test_transcoder_artifact_without_its_output_hook(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT)
    source = write_saelens_transcoder(tmp_path / "src", weights, architecture="transcoder")
    target = tmp_path / "artifact"
    assert main(["sae", "export", str(source), str(target)]) == 0
    manifest = json.loads((target / "manifest.json").read_text())
    assert (manifest["format_version"], manifest["d_out"], manifest["hook_name_out"]) == (
        2, D_OUT, "blocks.4.hook_mlp_out")
    del manifest["hook_name_out"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    refused(target, "manifest.json", "'hook_name_out'", "expected the transcoder's output hook",
            "found None")
    manifest["format_version"] = 3
    (target / "manifest.json").write_text(json.dumps(manifest))
    refused(target, "manifest.json", "'format_version'", "expected 1 (or 2 for a transcoder)",
            "found 3")
