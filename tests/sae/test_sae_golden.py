"""Golden vectors: the runtime against independent float64 implementations of each library's
formula, written here from the libraries' source (not from guard.sae), on random weights
with nonzero biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from guard.sae import open_sae
from tests.sae_fixtures import (
    bf16_bits,
    random_gated_weights,
    random_jumprelu_weights,
    random_standard_weights,
    write_gemmascope,
    write_saelens,
    write_safetensors,
    write_sparsify,
)

D_IN, D_SAE, ROWS, K = 32, 128, 48, 8
F64 = NDArray[np.float64]

# fp32 rounding of a 32-term dot product of unit-scale values stays far below this.
ATOL = 3e-5


def rows(seed: int = 7, n: int = ROWS, scale: float = 1.0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, scale, size=(n, D_IN)) + 0.3).astype(np.float32)


def w64(weights: dict[str, NDArray[np.float32]]) -> dict[str, F64]:
    return {k: v.astype(np.float64) for k, v in weights.items()}


# --- reference formulas (float64), transcribed from the libraries -----------------------


def saelens_sae_in(x: F64, w: dict[str, F64], cfg: dict[str, Any]) -> F64:
    """SAELens process_sae_in: normalisation, then minus b_dec * apply_b_dec_to_input."""
    norm = cfg.get("normalize_activations", "none")
    if norm == "constant_norm_rescale":
        x = x * (np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True))
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        x = x - mu
        x = x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    if cfg.get("apply_b_dec_to_input", True):
        x = x - w["b_dec"]
    return x


def topk_dense(hidden_pre: F64, k: int) -> F64:
    """SAELens TopK: top k of the pre-activations, ReLU on the kept values, zeros elsewhere."""
    idx = np.argsort(-hidden_pre, axis=-1, kind="stable")[:, :k]
    out = np.zeros_like(hidden_pre)
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(hidden_pre, idx, -1), 0), -1)
    return out


def saelens_encode(x: F64, w: dict[str, F64], cfg: dict[str, Any]) -> F64:
    sae_in = saelens_sae_in(x, w, cfg)
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        mag = np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
        return np.where(gate, mag, 0.0)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return np.maximum(hidden_pre, 0)
    if arch == "jumprelu":
        return np.maximum(hidden_pre, 0) * (hidden_pre > np.maximum(w["threshold"], 0))
    assert arch == "topk"
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * np.linalg.norm(w["W_dec"], axis=-1)
    return topk_dense(hidden_pre, cfg["k"])


def saelens_decode(acts: F64, x: F64, w: dict[str, F64], cfg: dict[str, Any]) -> F64:
    if cfg.get("rescale_acts_by_decoder_norm"):
        acts = acts / np.linalg.norm(w["W_dec"], axis=-1)
    if cfg.get("finetuning_scaling_factor"):
        acts = acts * w["scaling_factor"]
    out = acts @ w["W_dec"] + w["b_dec"]
    norm = cfg.get("normalize_activations", "none")
    if norm == "constant_norm_rescale":
        out = out / (np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True))
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        out = out * (x - mu).std(-1, ddof=1, keepdims=True) + mu
    return out


def weights_for(arch: str, seed: int = 0) -> dict[str, NDArray[np.float32]]:
    if arch == "jumprelu":
        return random_jumprelu_weights(D_IN, D_SAE, seed)
    if arch == "gated":
        return random_gated_weights(D_IN, D_SAE, seed)
    return random_standard_weights(D_IN, D_SAE, seed)


def assert_close(found: NDArray[np.float32], expected: F64) -> None:
    assert found.dtype == np.float32
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=ATOL)


# --- SAELens -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_architectures_match_reference(
    tmp_path: Path, arch: str, apply_b_dec: bool
) -> None:
    weights = weights_for(arch)
    cfg = {"apply_b_dec_to_input": apply_b_dec, **({"k": K} if arch == "topk" else {})}
    write_saelens(tmp_path, D_IN, D_SAE, architecture=arch, extra_cfg=cfg, weights=weights)
    x = rows()
    expected = saelens_encode(x.astype(np.float64), w64(weights), {"architecture": arch, **cfg})
    assert 0 < np.count_nonzero(expected) < expected.size  # the case exercises both states

    sae = open_sae(tmp_path)
    assert sae.info.architecture == arch
    assert sae.info.source_format == "saelens"
    assert_close(sae.encoder().encode(x), expected)
    assert_close(sae.model.encode(x), expected)  # the NumPy reference used by reports


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_saelens_runtime_normalisation_encode_and_decode(
    tmp_path: Path, norm: str, arch: str
) -> None:
    weights = weights_for(arch, seed=3)
    cfg = {"normalize_activations": norm}
    write_saelens(tmp_path, D_IN, D_SAE, architecture=arch, extra_cfg=cfg, weights=weights)
    x = rows(scale=4.0)
    full_cfg = {"architecture": arch, **cfg}
    expected = saelens_encode(x.astype(np.float64), w64(weights), full_cfg)
    sae = open_sae(tmp_path)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    recon = saelens_decode(expected, x.astype(np.float64), w64(weights), full_cfg)
    np.testing.assert_allclose(sae.decode(acts, x), recon, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["activation_scaler.json", "cfg"])
def test_saelens_expected_average_scaling_factor_is_folded(tmp_path: Path, where: str) -> None:
    weights = weights_for("topk", seed=4)
    factor = 0.37
    cfg: dict[str, Any] = {"normalize_activations": "expected_average_only_in", "k": K}
    if where == "cfg":
        cfg["norm_scaling_factor"] = factor
    write_saelens(tmp_path, D_IN, D_SAE, architecture="topk", extra_cfg=cfg, weights=weights)
    if where != "cfg":
        (tmp_path / where).write_text(json.dumps({"scaling_factor": factor}))
    x = rows(scale=3.0)
    # SAELens's trainer scales inputs by the factor; from_pretrained folds it into W_enc.
    expected = saelens_encode(
        factor * x.astype(np.float64), w64(weights), {"architecture": "topk", "k": K}
    )
    sae = open_sae(tmp_path)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    recon = (expected @ weights["W_dec"].astype(np.float64) + weights["b_dec"]) / factor
    np.testing.assert_allclose(sae.decode(acts), recon, rtol=1e-4, atol=1e-4)


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    weights = weights_for("topk", seed=5)
    rng = np.random.default_rng(9)
    weights["W_dec"] = (weights["W_dec"] * rng.uniform(0.2, 3.0, size=(D_SAE, 1))).astype(
        np.float32
    )
    cfg = {"k": K, "rescale_acts_by_decoder_norm": True}
    write_saelens(tmp_path, D_IN, D_SAE, architecture="topk", extra_cfg=cfg, weights=weights)
    x = rows()
    full_cfg = {"architecture": "topk", **cfg}
    expected = saelens_encode(x.astype(np.float64), w64(weights), full_cfg)
    sae = open_sae(tmp_path)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    recon = saelens_decode(expected, x.astype(np.float64), w64(weights), full_cfg)
    np.testing.assert_allclose(sae.decode(acts), recon, rtol=1e-4, atol=1e-4)


def test_saelens_pre_6_config_forms(tmp_path: Path) -> None:
    """SAELens 5.x: hook_point, topk as a standard architecture with activation_fn kwargs,
    normalize_activations as a bool."""
    weights = weights_for("topk", seed=6)
    write_saelens(tmp_path, D_IN, D_SAE, architecture="standard", weights=weights)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["hook_name"]
    cfg.update(
        hook_point="blocks.3.hook_resid_pre",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": K},
        normalize_activations=False,
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    x = rows()
    expected = saelens_encode(x.astype(np.float64), w64(weights), {"architecture": "topk", "k": K})
    sae = open_sae(tmp_path)
    assert sae.info.hook_name == "blocks.3.hook_resid_pre"
    assert sae.info.architecture == "topk"
    assert_close(sae.encoder().encode(x), expected)


def test_saelens_6_metadata_hook_name_and_override(tmp_path: Path) -> None:
    write_saelens(tmp_path, D_IN, D_SAE)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["hook_name"]
    cfg["metadata"] = {"hook_name": "blocks.9.hook_resid_post", "sae_lens_version": "6.5.0"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert open_sae(tmp_path).info.hook_name == "blocks.9.hook_resid_post"
    assert open_sae(tmp_path, hook="layer9").info.hook_name == "layer9"


def test_saelens_finetuning_scaling_factor_scales_the_decoder(tmp_path: Path) -> None:
    weights: dict[str, NDArray[Any]] = dict(weights_for("standard", seed=8))
    weights["scaling_factor"] = np.random.default_rng(1).uniform(0.5, 2, D_SAE).astype(np.float32)
    write_saelens(
        tmp_path, D_IN, D_SAE, weights=weights, extra_cfg={"finetuning_scaling_factor": True}
    )
    x = rows()
    cfg = {"architecture": "standard", "finetuning_scaling_factor": True}
    expected = saelens_encode(x.astype(np.float64), w64(weights), cfg)
    sae = open_sae(tmp_path)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    recon = saelens_decode(expected, x.astype(np.float64), w64(weights), cfg)
    np.testing.assert_allclose(sae.decode(acts), recon, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        sae.decoder_directions([4, 2]),
        weights["W_dec"][[4, 2]] * weights["scaling_factor"][[4, 2], None],
        rtol=1e-6,
    )


def test_saelens_jumprelu_log_threshold_and_negative_thresholds(tmp_path: Path) -> None:
    weights: dict[str, NDArray[Any]] = dict(weights_for("jumprelu", seed=10))
    threshold = weights.pop("threshold")
    threshold[:20] = -0.5  # a negative threshold lets every positive pre-activation through
    weights["log_threshold"] = np.log(np.abs(threshold)).astype(np.float32)
    write_saelens(tmp_path, D_IN, D_SAE, architecture="jumprelu")
    write_safetensors(tmp_path / "sae_weights.safetensors", weights)
    x = rows()
    w = w64(weights)
    w["threshold"] = np.exp(w["log_threshold"])
    expected = saelens_encode(x.astype(np.float64), w, {"architecture": "jumprelu"})
    assert_close(open_sae(tmp_path).encoder().encode(x), expected)

    # And a stored negative threshold (as a plain "threshold" tensor).
    weights = dict(weights_for("jumprelu", seed=10))
    weights["threshold"][:20] = -0.5
    write_saelens(tmp_path / "neg", D_IN, D_SAE, architecture="jumprelu", weights=weights)
    expected = saelens_encode(x.astype(np.float64), w64(weights), {"architecture": "jumprelu"})
    assert_close(open_sae(tmp_path / "neg").encoder().encode(x), expected)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_saelens_half_precision_weights(tmp_path: Path, dtype: str) -> None:
    weights = weights_for("standard", seed=11)
    if dtype == "F16":
        stored: dict[str, NDArray[Any]] = {k: v.astype(np.float16) for k, v in weights.items()}
        exact = {k: v.astype(np.float64) for k, v in stored.items()}
    else:
        stored = {k: bf16_bits(v) for k, v in weights.items()}
        exact = {
            k: (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            for k, v in stored.items()
        }
    tmp_path.mkdir(exist_ok=True)
    write_saelens(tmp_path, D_IN, D_SAE)
    write_safetensors(tmp_path / "sae_weights.safetensors", stored)
    x = rows()
    expected = saelens_encode(x.astype(np.float64), exact, {"architecture": "standard"})
    assert_close(open_sae(tmp_path).encoder().encode(x), expected)


# --- sparsify ------------------------------------------------------------------------------


def sparsify_encode(x: F64, t: dict[str, F64], k: int, transcode: bool) -> F64:
    """sparsify SparseCoder.encode: x - b_dec, relu(linear), topk of the ReLU'd values."""
    if not transcode:
        x = x - t["b_dec"]
    pre = np.maximum(x @ t["encoder.weight"].T + t["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=-1, kind="stable")[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return out


def read_tensors(path: Path) -> dict[str, F64]:
    """Independent read of the fixture file: the fixture writes F32 only."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return {
        name: np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4")
        .reshape(spec["shape"])
        .astype(np.float64)
        for name, spec in header.items()
        for a, b in [spec["data_offsets"]]
    }


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_topk_matches_reference(tmp_path: Path, transcode: bool) -> None:
    folder = write_sparsify(
        tmp_path / "layers.4", D_IN, D_SAE, k=K, extra_cfg={"transcode": transcode}
    )
    t = read_tensors(folder / "sae.safetensors")
    x = rows()
    expected = sparsify_encode(x.astype(np.float64), t, K, transcode)
    sae = open_sae(folder)
    assert sae.info.source_format == "sparsify"
    assert sae.info.hook_name == "layers.4"
    assert (sae.info.d_in, sae.info.d_sae, sae.info.architecture) == (D_IN, D_SAE, "topk")
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    assert (np.count_nonzero(acts, axis=1) <= K).all()
    np.testing.assert_allclose(sae.model.decoder.w_dec[[0, 5]], t["W_dec"][[0, 5]], rtol=1e-6)
    if not transcode:  # a transcoder's decoder rows are no steering direction: refused
        np.testing.assert_allclose(sae.decoder_directions([0, 5]), t["W_dec"][[0, 5]],
                                   rtol=1e-6)


def test_sparsify_skip_connection_reconstruction(tmp_path: Path) -> None:
    folder = write_sparsify(tmp_path / "layers.2", D_IN, D_SAE, k=K, skip_connection=True)
    t = read_tensors(folder / "sae.safetensors")
    x = rows()
    x64 = x.astype(np.float64)
    acts64 = sparsify_encode(x64, t, K, False)
    recon = acts64 @ t["W_dec"] + t["b_dec"] + x64 @ t["W_skip"].T
    sae = open_sae(folder)
    acts = sae.encoder().encode(x)
    np.testing.assert_allclose(sae.decode(acts, x), recon, rtol=1e-4, atol=1e-4)


def test_sparsify_num_latents_from_expansion_factor(tmp_path: Path) -> None:
    folder = write_sparsify(
        tmp_path / "layers.1",
        D_IN,
        D_IN * 4,
        k=K,
        extra_cfg={"num_latents": 0, "expansion_factor": 4},
    )
    assert open_sae(folder).info.d_sae == D_IN * 4


# --- Gemma Scope ---------------------------------------------------------------------------


def gemmascope_encode(x: F64, p: dict[str, F64]) -> F64:
    """Gemma Scope's JumpReLUSAE.encode: no b_dec subtraction, mask * relu(pre)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    return np.where(pre > p["threshold"], np.maximum(pre, 0), 0.0)


def test_gemmascope_npz_matches_reference(tmp_path: Path) -> None:
    npz = write_gemmascope(
        tmp_path
        / "gemma-scope-2b-pt-res"
        / "layer_12"
        / "width_16k"
        / "average_l0_82"
        / "params.npz",
        D_IN,
        D_SAE,
    )
    with np.load(npz) as data:
        p = {k: data[k].astype(np.float64) for k in data.files}
    x = rows()
    expected = gemmascope_encode(x.astype(np.float64), p)
    for path in (npz, npz.parent):
        sae = open_sae(path)
        assert sae.info.hook_name == "blocks.12.hook_resid_post"
        assert sae.info.source_format == "gemmascope"
        assert sae.info.architecture == "jumprelu"
        acts = sae.encoder().encode(x)
        assert_close(acts, expected)
        np.testing.assert_allclose(
            sae.decode(acts), expected @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4
        )


def test_gemmascope_hooks_from_path_and_embedding_scaling(tmp_path: Path) -> None:
    mlp = write_gemmascope(
        tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "params.npz", D_IN, D_SAE
    )
    assert open_sae(mlp).info.hook_name == "blocks.3.hook_mlp_out"
    att = write_gemmascope(
        tmp_path / "gemma-scope-9b-pt-att" / "layer_5" / "params.npz", D_IN, D_SAE
    )
    assert open_sae(att).info.hook_name == "blocks.5.attn.hook_z"
    emb = write_gemmascope(
        tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "params.npz", D_IN, D_SAE
    )
    sae = open_sae(emb)
    assert sae.info.hook_name == "hook_embed"
    with np.load(emb) as data:
        p = {k: data[k].astype(np.float64) for k in data.files}
    # SAELens's gemma_2 loader: W_enc / sqrt(d_in) for embedding SAEs.
    p["W_enc"] = p["W_enc"] / np.sqrt(D_IN)
    x = rows(scale=np.sqrt(D_IN))
    assert_close(sae.encoder().encode(x), gemmascope_encode(x.astype(np.float64), p))
    plain = write_gemmascope(tmp_path / "elsewhere" / "params.npz", D_IN, D_SAE)
    assert (
        open_sae(plain, hook="blocks.1.hook_resid_post").info.hook_name
        == "blocks.1.hook_resid_post"
    )
