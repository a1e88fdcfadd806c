"""Golden vectors for OpenAI's GPT-2 SAEs and Goodfire's Llama SAEs: state dicts saved with
torch as their code saves them, converted with ``guard sae convert``, encoded with ``guard
sae encode``, against float64 formulas written here from their source (openai/
sparse_autoencoder ``model.py``: ``LN``, ``Autoencoder.encode``/``decode``, ``TopK``; the
Goodfire model card's ``SparseAutoEncoder``), not from guard.sae."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from guard.sae import open_sae
from guard.sae.cli import register
from guard.training.cli import register as register_training
from tests.torch_state_dicts import f64, goodfire_state, openai_state, save

D_IN, D_SAE, ROWS, K = 32, 128, 48, 8
F64 = NDArray[np.float64]
ATOL = 3e-5  # fp32 rounding of 32-term dot products of unit-scale values


def rows(seed: int = 7) -> NDArray[np.float32]:
    """Rows with a nonzero mean and a scale far from 1: the layer norm changes them."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 3.0, size=(ROWS, D_IN)) + 0.8).astype(np.float32)


# --- reference formulas (float64) ------------------------------------------------------------


def openai_ln(x: F64) -> tuple[F64, F64, F64]:
    """``LN``: x - mean, divided by (torch's unbiased std + 1e-5); returns (x, mu, std)."""
    mu = x.mean(-1, keepdims=True)
    centered = x - mu
    std = centered.std(-1, ddof=1, keepdims=True)
    return centered / (std + 1e-5), mu, std


def openai_encode(x: F64, w: dict[str, F64], k: int | None) -> F64:
    """``Autoencoder.encode``: preprocess (LN exactly when the activation is TopK), then
    ``activation((x - pre_bias) @ encoder.weight.T + latent_bias)``; TopK keeps the k
    largest pre-activations, ReLU'd, and zeroes the rest."""
    if k is not None:
        x = openai_ln(x)[0]
    pre = (x - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"]
    return np.maximum(pre, 0.0) if k is None else topk_relu(pre, k)


def topk_relu(pre: F64, k: int) -> F64:
    """``TopK``: ``torch.topk`` of each row, ``postact_fn`` (ReLU) on the values, zeros
    elsewhere."""
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0.0), axis=1)
    return out


def openai_decode(latents: F64, x: F64, w: dict[str, F64], normalize: bool) -> F64:
    """``Autoencoder.decode``: ``latents @ decoder.weight.T + pre_bias``, then ``* std + mu``
    (the std without eps) when normalising."""
    out = latents @ w["decoder.weight"].T + w["pre_bias"]
    if normalize:
        _, mu, std = openai_ln(x)
        out = out * std + mu
    return out


def goodfire_encode(x: F64, w: dict[str, F64]) -> F64:
    """``relu(encoder_linear(x))``: nothing subtracted, nothing normalised."""
    return np.maximum(x @ w["encoder_linear.weight"].T + w["encoder_linear.bias"], 0.0)


def goodfire_decode(latents: F64, w: dict[str, F64]) -> F64:
    return latents @ w["decoder_linear.weight"].T + w["decoder_linear.bias"]


# --- the commands ------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``guard sae ...``: the real command group (convert comes with the training commands)."""
    parser = argparse.ArgumentParser(prog="guard")
    register_training(register(parser.add_subparsers(dest="command", required=True)))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def convert(source: Path, out: Path, *extra: str) -> Path:
    assert main(["sae", "convert", str(source), str(out), *extra]) == 0
    return out


def encode(sae: Path, x: NDArray[np.float32], tmp: Path) -> tuple[F64, F64]:
    """``guard sae encode`` of ``x``: (activations, reconstruction) as float64."""
    np.save(tmp / "x.npy", x)
    assert main(["sae", "encode", str(sae), "--input", str(tmp / "x.npy"), "--output",
                 str(tmp / "acts.npy"), "--recon", str(tmp / "recon.npy")]) == 0
    return (np.load(tmp / "acts.npy").astype(np.float64),
            np.load(tmp / "recon.npy").astype(np.float64))


# --- OpenAI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [K, None], ids=["topk", "relu"])
def test_openai_encode_and_decode_match_the_reference(tmp_path: Path, k: int | None) -> None:
    state = openai_state(D_IN, D_SAE, k=k)
    out = convert(save(state, tmp_path / "layer_8.pt"), tmp_path / "converted",
                  "--hook", "blocks.8.hook_resid_post")
    x = rows()
    acts, recon = encode(out, x, tmp_path)
    w = f64(state)
    expected = openai_encode(x.astype(np.float64), w, k)
    np.testing.assert_allclose(acts, expected, atol=ATOL, rtol=0)
    assert ((acts > 0) == (expected > 0)).all()
    if k is not None:
        assert ((acts > 0).sum(axis=1) <= k).all() and (acts > 0).sum() > ROWS
    # The decoder from the guard's own activations: checks W_dec, b_dec and the un-normalising.
    np.testing.assert_allclose(recon, openai_decode(acts, x.astype(np.float64), w, k is not None),
                               atol=1e-4, rtol=1e-5)


def test_openai_conventions_change_the_answer(tmp_path: Path) -> None:
    """The test above can fail: the same weights read without the layer norm, or without
    subtracting pre_bias, give other activations."""
    state = openai_state(D_IN, D_SAE, k=K)
    out = convert(save(state, tmp_path / "l.pt"), tmp_path / "converted")
    x = rows().astype(np.float64)
    acts, _ = encode(out, x.astype(np.float32), tmp_path)
    w = f64(state)
    without_ln = topk_relu((x - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"], K)
    assert np.abs(acts - without_ln).max() > 0.1
    without_pre_bias = openai_encode(x, {**w, "pre_bias": np.zeros_like(w["pre_bias"])}, K)
    assert np.abs(acts - without_pre_bias).max() > 1e-3


def test_openai_conversion_records_what_the_module_needs(tmp_path: Path) -> None:
    state = openai_state(D_IN, D_SAE, k=K)
    out = convert(save(state, tmp_path / "8.pt"), tmp_path / "converted",
                  "--hook", "blocks.8.hook_resid_post",
                  "--neuronpedia-id", "gpt2-small/8-res_post_32k-oai")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["format"] == "openai" and cfg["architecture"] == "openai_topk"
    assert (cfg["k"], cfg["input_normalization"], cfg["d_in"], cfg["d_sae"]) == (
        K, "layer_norm", D_IN, D_SAE)
    assert cfg["source"]["training_statistics_left_out"] == [
        "latents_activation_frequency", "latents_mean_square", "stats_last_nonzero"]
    assert "pre_bias" in cfg["encode"] and "1e-5" in cfg["encode"]
    sae = open_sae(out)
    assert (sae.info.hook_name, sae.info.source_format, sae.info.architecture) == (
        "blocks.8.hook_resid_post", "openai", "topk")
    assert sae.info.neuronpedia_id == "gpt2-small/8-res_post_32k-oai"
    assert sae.model.normalization == "layer_norm"
    assert {p.name for p in out.iterdir()} == {"cfg.json", "openai_sae.safetensors"}


def test_openai_export_round_trip(tmp_path: Path) -> None:
    """``guard sae export`` turns the converted folder into an artifact that encodes the same
    and keeps the Neuronpedia id."""
    state = openai_state(D_IN, D_SAE, k=K)
    out = convert(save(state, tmp_path / "l.pt"), tmp_path / "converted",
                  "--hook", "blocks.8.hook_resid_post",
                  "--neuronpedia-id", "gpt2-small/8-res_post_32k-oai")
    artifact = tmp_path / "artifact"
    assert main(["sae", "export", str(out), str(artifact)]) == 0
    x = rows()
    acts, recon = encode(artifact, x, tmp_path)
    w = f64(state)
    np.testing.assert_allclose(recon, openai_decode(acts, x.astype(np.float64), w, True),
                               atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(acts, openai_encode(x.astype(np.float64), w, K),
                               atol=ATOL, rtol=0)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["source_format"], manifest["input_normalization"]) == ("openai",
                                                                            "layer_norm")
    assert manifest["neuronpedia_id"] == "gpt2-small/8-res_post_32k-oai"
    assert open_sae(artifact).info.neuronpedia_id == "gpt2-small/8-res_post_32k-oai"


# --- Goodfire ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_goodfire_encode_and_decode_match_the_reference(tmp_path: Path,
                                                        dtype: torch.dtype) -> None:
    state = goodfire_state(D_IN, D_SAE, dtype=dtype)
    source = save(state, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    out = convert(source, tmp_path / "converted")
    x = rows()
    acts, recon = encode(out, x, tmp_path)
    w = f64(state)  # the stored (bf16: rounded) values, widened exactly
    expected = goodfire_encode(x.astype(np.float64), w)
    np.testing.assert_allclose(acts, expected, atol=ATOL * 3, rtol=0)
    assert ((acts > 0) == (expected > 0)).all() and (acts > 0).any() and (acts == 0).any()
    np.testing.assert_allclose(recon, goodfire_decode(acts, w), atol=1e-4, rtol=1e-5)
    # Subtracting b_dec from the input (SAELens's default) would give other activations.
    shifted = goodfire_encode(x.astype(np.float64) - w["decoder_linear.bias"], w)
    assert np.abs(acts - shifted).max() > 1e-3
    sae = open_sae(out)
    assert (sae.info.hook_name, sae.info.architecture, sae.info.source_format) == (
        "blocks.19.hook_resid_post", "standard", "goodfire")
    stored = json.loads((out / "cfg.json").read_text())
    assert stored["architecture"] == "goodfire_relu"
    header_len = int.from_bytes((out / "goodfire_sae.safetensors").read_bytes()[:8], "little")
    header = json.loads((out / "goodfire_sae.safetensors").read_bytes()[8:8 + header_len])
    assert header["encoder_linear.weight"]["dtype"] == ("BF16" if dtype == torch.bfloat16
                                                        else "F32")
    assert header["encoder_linear.weight"]["shape"] == [D_SAE, D_IN]  # the source's orientation


def test_goodfire_export_round_trip(tmp_path: Path) -> None:
    state = goodfire_state(D_IN, D_SAE)
    out = convert(save(state, tmp_path / "sae.pth"), tmp_path / "converted",
                  "--hook", "blocks.50.hook_resid_post")
    artifact = tmp_path / "artifact"
    assert main(["sae", "export", str(out), str(artifact), "--dtype", "fp16"]) == 0
    x = rows()
    acts, _ = encode(artifact, x, tmp_path)
    # fp16 weights: the activations agree to fp16 precision.
    np.testing.assert_allclose(acts, goodfire_encode(x.astype(np.float64), f64(state)),
                               atol=0.02, rtol=0.01)
    assert open_sae(artifact).info.hook_name == "blocks.50.hook_resid_post"
