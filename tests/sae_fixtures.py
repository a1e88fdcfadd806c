"""Write small SAEs in the on-disk formats users have, for tests and benchmarks.

Weights are random with nonzero biases so that conventions (when b_dec is subtracted,
where thresholds apply) change the answer. Shared by every test that needs an SAE.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# uint16 arrays are written as raw bfloat16 bit patterns (NumPy has no bfloat16); see
# ``bf16_bits``.
_SAFETENSORS_DTYPES = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("uint16"): "BF16",
}


def write_safetensors(path: Path, tensors: dict[str, NDArray[Any]]) -> None:
    """Write tensors in the safetensors format (8-byte header length, JSON header, data)."""
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for blob in blobs:
            f.write(blob)


def random_standard_weights(
    d_in: int, d_sae: int, seed: int = 0
) -> dict[str, NDArray[np.float32]]:
    """W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec; nonzero biases."""
    rng = np.random.default_rng(seed)
    w_enc = rng.normal(0.0, 1.0 / np.sqrt(d_in), size=(d_in, d_sae)).astype(np.float32)
    return {
        "W_enc": w_enc,
        "b_enc": rng.normal(0.0, 0.1, size=d_sae).astype(np.float32),
        "W_dec": np.ascontiguousarray(w_enc.T),
        "b_dec": rng.normal(0.0, 0.1, size=d_in).astype(np.float32),
    }


def write_saelens(
    folder: Path,
    d_in: int,
    d_sae: int,
    *,
    hook_name: str = "blocks.6.hook_resid_post",
    seed: int = 0,
    architecture: str = "standard",
    extra_cfg: dict[str, Any] | None = None,
    weights: dict[str, NDArray[np.float32]] | None = None,
) -> Path:
    """A SAELens folder (cfg.json + sae_weights.safetensors) with random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = weights if weights is not None else random_standard_weights(d_in, d_sae, seed)
    if architecture == "jumprelu" and "threshold" not in tensors:
        tensors = dict(tensors, threshold=np.full(d_sae, 0.05, dtype=np.float32))
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "hook_name": hook_name,
        "hook_layer": int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else 0,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "model_name": "test-model",
    }
    cfg.update(extra_cfg or {})
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(folder / "sae_weights.safetensors", tensors)
    return folder


def bf16_bits(array: NDArray[np.float32]) -> NDArray[np.uint16]:
    """bfloat16 bit patterns of ``array``, truncated (the top 16 bits of each float32)."""
    return (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def random_jumprelu_weights(d_in: int, d_sae: int, seed: int = 0) -> dict[str, NDArray[np.float32]]:
    """Standard weights plus per-feature thresholds spread around typical pre-activations."""
    weights = random_standard_weights(d_in, d_sae, seed)
    rng = np.random.default_rng(seed + 1)
    weights["threshold"] = rng.uniform(0.0, 0.8, size=d_sae).astype(np.float32)
    return weights


def random_gated_weights(d_in: int, d_sae: int, seed: int = 0) -> dict[str, NDArray[np.float32]]:
    """W_enc, b_gate, b_mag, r_mag, W_dec, b_dec with nonzero biases and gains."""
    weights = random_standard_weights(d_in, d_sae, seed)
    rng = np.random.default_rng(seed + 2)
    del weights["b_enc"]
    weights["b_gate"] = rng.normal(0.0, 0.2, size=d_sae).astype(np.float32)
    weights["b_mag"] = rng.normal(0.0, 0.2, size=d_sae).astype(np.float32)
    weights["r_mag"] = rng.normal(0.0, 0.3, size=d_sae).astype(np.float32)
    return weights


def write_sparsify(
    folder: Path,
    d_in: int,
    d_sae: int,
    *,
    k: int = 8,
    seed: int = 0,
    extra_cfg: dict[str, Any] | None = None,
    skip_connection: bool = False,
) -> Path:
    """A sparsify layer folder (cfg.json + sae.safetensors); encoder.weight is [d_sae, d_in]."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_standard_weights(d_in, d_sae, seed)
    rng = np.random.default_rng(seed + 3)
    tensors: dict[str, NDArray[Any]] = {
        "encoder.weight": np.ascontiguousarray(weights["W_enc"].T),
        "encoder.bias": weights["b_enc"],
        # An independent decoder, so that a transposition mix-up cannot go unnoticed.
        "W_dec": rng.normal(0.0, 1.0 / np.sqrt(d_in), size=(d_sae, d_in)).astype(np.float32),
        "b_dec": weights["b_dec"],
    }
    if skip_connection:
        tensors["W_skip"] = rng.normal(0.0, 0.05, size=(d_in, d_in)).astype(np.float32)
    cfg: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": d_sae,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip_connection,
        "transcode": False,
        "d_in": d_in,
    }
    cfg.update(extra_cfg or {})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "sae.safetensors", tensors)
    return folder


def write_gemmascope(
    path: Path, d_in: int, d_sae: int, *, seed: int = 0, extra: dict[str, Any] | None = None
) -> Path:
    """A Gemma Scope params.npz (W_enc, W_dec, b_enc, b_dec, threshold) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = random_jumprelu_weights(d_in, d_sae, seed)
    arrays: dict[str, Any] = {
        k: weights[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    }
    arrays.update(extra or {})
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


# --- transcoders, Gemma Scope 2, Llama Scope (issue 17) ------------------------------------


def random_transcoder_weights(
    d_in: int, d_sae: int, d_out: int, *, jumprelu: bool = False, skip: bool = False,
    seed: int = 0,
) -> dict[str, NDArray[np.float32]]:
    """W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out] (an independent
    decoder: it writes another hook), thresholds when ``jumprelu``, W_skip [d_out, d_in] when
    ``skip``; nonzero biases."""
    rng = np.random.default_rng(seed + 20)
    weights = {
        "W_enc": rng.normal(0.0, 1.0 / np.sqrt(d_in), size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(0.0, 0.1, size=d_sae).astype(np.float32),
        "W_dec": rng.normal(0.0, 1.0 / np.sqrt(d_sae), size=(d_sae, d_out)).astype(np.float32),
        "b_dec": rng.normal(0.0, 0.1, size=d_out).astype(np.float32),
    }
    if jumprelu:
        weights["threshold"] = rng.uniform(0.0, 0.8, size=d_sae).astype(np.float32)
    if skip:
        weights["W_skip"] = rng.normal(0.0, 0.1, size=(d_out, d_in)).astype(np.float32)
    return weights


def write_saelens_transcoder(
    folder: Path, weights: dict[str, NDArray[np.float32]], *, architecture: str,
    hook_name: str = "blocks.4.ln2.hook_normalized", hook_name_out: str = "blocks.4.hook_mlp_out",
    extra_cfg: dict[str, Any] | None = None,
) -> Path:
    """A SAELens 6 transcoder folder, as ``Transcoder.save_model`` writes it: ``d_out`` at the
    top level, the hooks in ``metadata``, ``apply_b_dec_to_input`` false."""
    folder.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = weights["W_enc"].shape
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "d_out": int(weights["W_dec"].shape[1]),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "test-model",
            "hook_name": hook_name,
            "hook_name_out": hook_name_out,
            "sae_lens_version": "6.5.0",
        },
    }
    cfg.update(extra_cfg or {})
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(folder / "sae_weights.safetensors", dict(weights))
    return folder


def random_gemmascope2_params(
    d_in: int, d_sae: int, d_out: int | None = None, *, affine: bool = False, seed: int = 0
) -> dict[str, NDArray[np.float32]]:
    """Gemma Scope 2 ``params.safetensors`` tensors: w_enc [d_in, d_sae], w_dec [d_sae, d_out],
    b_enc, b_dec, threshold, and affine_skip_connection [d_in, d_out] when ``affine``."""
    d_out = d_in if d_out is None else d_out
    rng = np.random.default_rng(seed + 30)
    params = {
        "w_enc": rng.normal(0.0, 1.0 / np.sqrt(d_in), size=(d_in, d_sae)).astype(np.float32),
        "w_dec": rng.normal(0.0, 1.0 / np.sqrt(d_sae), size=(d_sae, d_out)).astype(np.float32),
        "b_enc": rng.normal(0.0, 0.1, size=d_sae).astype(np.float32),
        "b_dec": rng.normal(0.0, 0.1, size=d_out).astype(np.float32),
        "threshold": rng.uniform(0.0, 0.8, size=d_sae).astype(np.float32),
    }
    if affine:  # not symmetric, so that x @ A and x @ A.T differ
        params["affine_skip_connection"] = rng.normal(0.0, 0.2, size=(d_in, d_out)).astype(
            np.float32)
    return params


def write_gemmascope2(
    folder: Path, params: dict[str, NDArray[Any]], config: dict[str, Any] | None = None
) -> Path:
    """A Gemma Scope 2 folder: ``params.safetensors`` and, unless ``config`` is None, a
    ``config.json`` with the keys Gemma Scope 2 publishes (given ones replace the defaults)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "params.safetensors", dict(params))
    if config is not None:
        published: dict[str, Any] = {
            "architecture": "jump_relu",
            "model_name": "google/gemma-3-1b-pt",
            "width": int(params["w_enc"].shape[1]),
            "l0": 20,
        }
        published.update(config)
        (folder / "config.json").write_text(json.dumps(published))
    return folder


def random_llamascope_tensors(
    d_model: int, d_sae: int, seed: int = 0
) -> dict[str, NDArray[np.float32]]:
    """Llama Scope ``checkpoints/final.safetensors``: nn.Linear weights, encoder.weight
    [d_sae, d_model], decoder.weight [d_model, d_sae], and their biases; nonzero biases."""
    rng = np.random.default_rng(seed + 40)
    return {
        "encoder.weight": rng.normal(0.0, 1.0 / np.sqrt(d_model), size=(d_sae, d_model)).astype(
            np.float32),
        "encoder.bias": rng.normal(0.0, 0.1, size=d_sae).astype(np.float32),
        "decoder.weight": rng.normal(0.0, 1.0 / np.sqrt(d_sae), size=(d_model, d_sae)).astype(
            np.float32),
        "decoder.bias": rng.normal(0.0, 0.1, size=d_model).astype(np.float32),
    }


def llamascope_hyperparams(d_model: int, d_sae: int, /, **changes: Any) -> dict[str, Any]:
    """A Llama Scope ``hyperparams.json`` (the fields lm_saes writes for Llama3_1-8B-Base-L15R;
    ``changes`` replace them, None removes one)."""
    hyperparams: dict[str, Any] = {
        "d_model": d_model,
        "d_sae": d_sae,
        "expansion_factor": d_sae // d_model,
        "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.35546875,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 10.8125, "out": 10.8125},
        "sparsity_include_decoder_norm": True,
        "use_glu_encoder": False,
        "top_k": 50,
    }
    for key, value in changes.items():
        if value is None:
            hyperparams.pop(key, None)
        else:
            hyperparams[key] = value
    return hyperparams


def write_llamascope(
    folder: Path, tensors: dict[str, NDArray[Any]], hyperparams: dict[str, Any]
) -> Path:
    """A Llama Scope folder: ``hyperparams.json`` + ``checkpoints/final.safetensors``."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    write_safetensors(folder / "checkpoints" / "final.safetensors", dict(tensors))
    return folder
