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
