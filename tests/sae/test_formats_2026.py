"""Issue 17's formats against independent float64 formulas, written here from each source's
code (not from guard.sae): SAELens transcoders and skip transcoders (``transcoder.py``),
sparsify transcoders (``sparse_coder.py``), Gemma Scope 2 (its tutorial's ``JumpReLUSAE``),
Llama Scope (SAELens's ``llama_scope`` loader), BatchTopK SAEs as SAELens saves them for
inference (``batchtopk_sae.py``); the refused architectures; steering through a transcoder;
``guard sae encode`` and the export round trip of each."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from structlog.testing import capture_logs

from guard.errors import InvalidInput, SaeFileError
from guard.sae import open_sae
from guard.sae.cli import register
from guard.sae.registry import refuse_architecture
from tests.sae_fixtures import (
    llamascope_hyperparams,
    random_gemmascope2_params,
    random_jumprelu_weights,
    random_llamascope_tensors,
    random_transcoder_weights,
    write_gemmascope2,
    write_llamascope,
    write_saelens,
    write_saelens_transcoder,
    write_sparsify,
)

D_IN, D_SAE, D_OUT, ROWS = 32, 128, 24, 40
F64 = NDArray[np.float64]
Params = dict[str, NDArray[Any]]
# fp32 rounding of a 32-term dot product of unit-scale values stays far below this.
ATOL = 3e-5


def main(argv: list[str]) -> int:
    """``guard <argv>`` for the ``sae`` commands (``guard.sae.cli``, as ``guard`` wires it)."""
    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def rows(seed: int = 7, n: int = ROWS, d: int = D_IN, scale: float = 1.0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, scale, size=(n, d)) + 0.3).astype(np.float32)


def w64(weights: Params) -> dict[str, F64]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}


def assert_close(found: NDArray[np.float32], expected: F64, atol: float = ATOL) -> None:
    assert found.dtype == np.float32
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=atol)


def both_states(acts: F64) -> None:
    """The case exercises features on and off (else a threshold mix-up could pass)."""
    assert 0 < np.count_nonzero(acts) < acts.size


# --- reference formulas (float64) -----------------------------------------------------------


def saelens_transcoder_encode(x: F64, w: dict[str, F64], arch: str, norm: str = "none") -> F64:
    """SAELens Transcoder.encode: process_sae_in without b_dec (normalisation only), then
    relu(pre), times (pre > threshold) for the JumpReLU ones."""
    if norm == "constant_norm_rescale":
        x = x * (math.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True))
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = np.maximum(pre, 0.0)
    if arch.startswith("jumprelu"):
        acts = acts * (pre > w["threshold"])
    return acts


def saelens_transcoder_forward(x: F64, w: dict[str, F64], acts: F64) -> F64:
    """Transcoder.decode (no norm_fn_out), plus SkipTranscoder's x @ W_skip.T on raw x."""
    out = acts @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return out


def gemmascope2_encode(x: F64, p: dict[str, F64]) -> F64:
    """Gemma Scope 2's JumpReLUSAE.encode: mask * relu(pre), no b_dec subtraction."""
    pre = x @ p["w_enc"] + p["b_enc"]
    return np.where(pre > p["threshold"], np.maximum(pre, 0.0), 0.0)


def gemmascope2_forward(x: F64, p: dict[str, F64], acts: F64) -> F64:
    """JumpReLUSAE.forward: decode, plus x @ affine_skip_connection (untransposed)."""
    out = acts @ p["w_dec"] + p["b_dec"]
    if "affine_skip_connection" in p:
        out = out + x @ p["affine_skip_connection"]
    return out


def llamascope_factors(hp: dict[str, Any]) -> tuple[float, float]:
    norms = hp["dataset_average_activation_norm"]
    root = math.sqrt(hp["d_model"])
    return root / norms["in"], root / norms.get("out", norms["in"])


def llamascope_encode(x: F64, t: dict[str, F64], hp: dict[str, Any]) -> F64:
    """SAELens llama_scope loader + fold_activation_norm_scaling_factor: W_enc * s_in, the
    scalar threshold * s_in, relu(pre) * (pre > threshold)."""
    s_in, _ = llamascope_factors(hp)
    pre = x @ (t["encoder.weight"].T * s_in) + t["encoder.bias"]
    threshold = float(hp["jump_relu_threshold"]) * s_in
    return np.where(pre > threshold, np.maximum(pre, 0.0), 0.0)


def llamascope_forward(acts: F64, t: dict[str, F64], hp: dict[str, Any]) -> F64:
    """(acts @ decoder.weight.T + decoder.bias) / s_out (lm_saes's output standardisation)."""
    _, s_out = llamascope_factors(hp)
    return (acts @ t["decoder.weight"].T + t["decoder.bias"]) / s_out


# --- SAELens transcoders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]
)
def test_saelens_transcoders_match_reference(tmp_path: Path, arch: str) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT, jumprelu=arch.startswith("jumprelu"),
                                        skip="skip" in arch)
    folder = write_saelens_transcoder(tmp_path / arch, weights, architecture=arch)
    x = rows()
    w = w64(weights)
    expected = saelens_transcoder_encode(x.astype(np.float64), w, arch)
    both_states(expected)

    sae = open_sae(folder)
    info = sae.info
    assert (info.hook_name, info.hook_name_out) == (
        "blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out")
    assert (info.d_in, info.d_sae, info.d_out) == (D_IN, D_SAE, D_OUT)
    assert info.architecture == ("jumprelu" if arch.startswith("jumprelu") else "standard")
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    assert_close(sae.model.encode(x), expected)
    recon = sae.decode(acts, x)
    assert_close(recon, saelens_transcoder_forward(x.astype(np.float64), w, expected), 1e-4)


def test_saelens_transcoder_normalises_its_input_but_not_its_output(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT, jumprelu=True, seed=1)
    folder = write_saelens_transcoder(
        tmp_path, weights, architecture="jumprelu_transcoder",
        extra_cfg={"normalize_activations": "constant_norm_rescale"},
    )
    x = rows(scale=5.0)
    w = w64(weights)
    expected = saelens_transcoder_encode(x.astype(np.float64), w, "jumprelu_transcoder",
                                         "constant_norm_rescale")
    both_states(expected)
    sae = open_sae(folder)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    # Transcoder.decode writes the output hook as is: no division by the input's norm factor.
    assert_close(sae.decode(acts, x), expected @ w["W_dec"] + w["b_dec"], 1e-4)


def test_saelens_transcoder_square_skip_is_x_times_w_skip_transposed(tmp_path: Path) -> None:
    """d_out == d_in: the shape cannot tell W_skip's orientation, the formula does."""
    weights = random_transcoder_weights(D_IN, D_SAE, D_IN, skip=True, seed=2)
    sae = open_sae(write_saelens_transcoder(tmp_path, weights, architecture="skip_transcoder"))
    x = rows()
    w = w64(weights)
    acts = saelens_transcoder_encode(x.astype(np.float64), w, "skip_transcoder")
    recon = sae.decode(sae.encoder().encode(x), x)
    assert_close(recon, saelens_transcoder_forward(x.astype(np.float64), w, acts), 1e-4)
    wrong = acts @ w["W_dec"] + w["b_dec"] + x.astype(np.float64) @ w["W_skip"]
    assert np.abs(recon - wrong).max() > 0.1


# --- sparsify transcoders ---------------------------------------------------------------------


def test_sparsify_transcoder_is_recorded_and_decodes_with_its_skip(tmp_path: Path) -> None:
    folder = write_sparsify(tmp_path / "layers.5.mlp", D_IN, D_SAE, k=8, skip_connection=True,
                            extra_cfg={"transcode": True})
    sae = open_sae(folder)
    assert (sae.info.hook_name, sae.info.hook_name_out, sae.info.d_out) == (
        "layers.5.mlp", "layers.5.mlp", D_IN)
    with capture_logs() as logs:
        open_sae(write_sparsify(tmp_path / "layers.5", D_IN, D_SAE, k=8))
    (opened,) = [e for e in logs if e["event"] == "sae.opened"]
    assert opened["hook_out"] is None and opened["d_out"] is None  # an SAE


# --- Gemma Scope 2 ----------------------------------------------------------------------------


def gemmascope2_folder(root: Path, site: str = "resid_post_all", layer: int = 7,
                       suffix: str = "") -> Path:
    return root / "gemma-scope-2-1b-pt" / site / f"layer_{layer}_width_16k_l0_small{suffix}"


def test_gemmascope2_sae_matches_reference(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE)
    folder = write_gemmascope2(gemmascope2_folder(tmp_path), params,
                               {"hf_hook_point_in": "model.layers.7.output"})
    p = w64(params)
    x = rows()
    expected = gemmascope2_encode(x.astype(np.float64), p)
    both_states(expected)
    for path in (folder, folder / "params.safetensors"):
        sae = open_sae(path)
        assert (sae.info.hook_name, sae.info.hook_name_out, sae.info.d_out) == (
            "blocks.7.hook_resid_post", None, None)
        assert (sae.info.source_format, sae.info.architecture) == ("gemmascope2", "jumprelu")
        acts = sae.encoder().encode(x)
        assert_close(acts, expected)
        assert_close(sae.decode(acts), gemmascope2_forward(x.astype(np.float64), p, expected),
                     1e-4)


@pytest.mark.parametrize("d_out", [D_IN, D_OUT], ids=["square", "d_out<d_in"])
def test_gemmascope2_affine_transcoder_adds_x_times_the_affine_skip(
    tmp_path: Path, d_out: int
) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE, d_out, affine=True, seed=3)
    folder = write_gemmascope2(
        gemmascope2_folder(tmp_path, "transcoder_all", 5, "_affine"), params,
        {"hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
         "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
         "affine_connection": True, "type": "transcoder"},
    )
    p = w64(params)
    x = rows()
    x64 = x.astype(np.float64)
    expected = gemmascope2_encode(x64, p)
    both_states(expected)
    sae = open_sae(folder)
    assert (sae.info.hook_name, sae.info.hook_name_out, sae.info.d_out) == (
        "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out", d_out)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    recon = sae.decode(acts, x)
    assert_close(recon, gemmascope2_forward(x64, p, expected), 1e-4)
    if d_out == D_IN:  # the other orientation (SAELens's x @ W_skip.T) gives another output
        transposed = expected @ p["w_dec"] + p["b_dec"] + x64 @ p["affine_skip_connection"].T
        assert np.abs(recon - transposed).max() > 0.1


def test_gemmascope2_transcoder_without_affine_and_hooks_from_folders(tmp_path: Path) -> None:
    params = random_gemmascope2_params(D_IN, D_SAE, seed=4)
    plain = write_gemmascope2(gemmascope2_folder(tmp_path, "transcoder", 3), params)
    sae = open_sae(plain)  # no config.json: hooks from the folder names
    assert (sae.info.hook_name, sae.info.hook_name_out) == (
        "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    x = rows()
    p = w64(params)
    acts = sae.encoder().encode(x)
    assert_close(acts, gemmascope2_encode(x.astype(np.float64), p))
    assert_close(sae.decode(acts), gemmascope2_forward(x.astype(np.float64), p,
                                                       acts.astype(np.float64)), 1e-4)
    for site, hook in (("mlp_out", "blocks.2.hook_mlp_out"),
                       ("attn_out_all", "blocks.2.attn.hook_z"),
                       ("resid_post", "blocks.2.hook_resid_post")):
        folder = write_gemmascope2(gemmascope2_folder(tmp_path, site, 2), params)
        assert open_sae(folder).info.hook_name == hook
    # Hooks from config.json's module names where the folders say nothing (Gemma 3's
    # multimodal sizes prefix them with language_model).
    renamed = write_gemmascope2(tmp_path / "mine", params, {
        "hf_hook_point_in": "model.language_model.layers.9.self_attn.o_proj.input"})
    assert open_sae(renamed).info.hook_name == "blocks.9.attn.hook_z"
    nowhere = write_gemmascope2(tmp_path / "nowhere", params)
    with pytest.raises(SaeFileError, match="pass the hook explicitly"):
        open_sae(nowhere)
    assert open_sae(nowhere, hook="blocks.1.hook_resid_post").info.hook_name == (
        "blocks.1.hook_resid_post")


# --- Llama Scope ------------------------------------------------------------------------------


def test_llamascope_sae_matches_reference(tmp_path: Path) -> None:
    tensors = random_llamascope_tensors(D_IN, D_SAE)
    hp = llamascope_hyperparams(D_IN, D_SAE, jump_relu_threshold=0.4,
                                dataset_average_activation_norm={"in": 3.0, "out": 3.0})
    folder = write_llamascope(tmp_path / "Llama3_1-8B-Base-L15R-8x", tensors, hp)
    t = w64(tensors)
    x = rows(scale=2.0)
    expected = llamascope_encode(x.astype(np.float64), t, hp)
    both_states(expected)
    sae = open_sae(folder)
    assert (sae.info.hook_name, sae.info.hook_name_out) == ("blocks.15.hook_resid_post", None)
    assert (sae.info.source_format, sae.info.architecture) == ("llamascope", "jumprelu")
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    assert_close(sae.decode(acts), llamascope_forward(expected, t, hp), 1e-4)
    # The norm really is applied: without it (s_in = 1) the features differ.
    unscaled = llamascope_encode(x.astype(np.float64), t, dict(
        hp, dataset_average_activation_norm={"in": math.sqrt(D_IN)}))
    assert np.abs(unscaled - expected).max() > 0.1


def test_llamascope_transcoder_and_topk_converted_to_jumprelu(tmp_path: Path) -> None:
    tensors = random_llamascope_tensors(D_IN, D_SAE, seed=1)
    hp = llamascope_hyperparams(
        D_IN, D_SAE, act_fn="topk", jump_relu_threshold=0.3,
        hook_point_in="blocks.9.ln2.hook_normalized", hook_point_out="blocks.9.hook_mlp_out",
        dataset_average_activation_norm={"in": 4.0, "out": 1.5},
    )
    folder = write_llamascope(tmp_path / "Llama3_1-8B-Base-L9TC-8x", tensors, hp)
    t = w64(tensors)
    x = rows(scale=2.0)
    expected = llamascope_encode(x.astype(np.float64), t, hp)
    both_states(expected)
    sae = open_sae(folder)
    assert (sae.info.hook_name, sae.info.hook_name_out, sae.info.d_out) == (
        "blocks.9.ln2.hook_normalized", "blocks.9.hook_mlp_out", D_IN)
    acts = sae.encoder().encode(x)
    assert_close(acts, expected)
    assert_close(sae.decode(acts), llamascope_forward(expected, t, hp), 1e-4)


# --- BatchTopK and Matryoshka BatchTopK, as SAELens saves them for inference ------------------


def test_batchtopk_saved_for_inference_reads_as_jumprelu(tmp_path: Path) -> None:
    """BatchTopKTrainingSAE.process_state_dict_for_saving_inference: threshold =
    ones_like(b_enc) * topk_threshold, cfg from JumpReLUSAEConfig (MatryoshkaBatchTopK
    inherits both, its matryoshka_widths dropped with the other training fields)."""
    weights = random_jumprelu_weights(D_IN, D_SAE, seed=5)
    topk_threshold = 0.37
    weights["threshold"] = np.full(D_SAE, topk_threshold, dtype=np.float32)
    folder = write_saelens(tmp_path, D_IN, D_SAE, architecture="jumprelu", weights=weights,
                           extra_cfg={"metadata": {"hook_name": "blocks.6.hook_resid_post",
                                                   "sae_lens_version": "6.20.0"}})
    w = w64(weights)
    x = rows()
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = np.maximum(pre, 0.0) * (pre > topk_threshold)
    both_states(expected)
    assert_close(open_sae(folder).encoder().encode(x), expected)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "why"),
    [("temporal", "earlier tokens"), ("matching_pursuit", "depends on the data"),
     ("batchtopk", "save_inference_model"), ("matryoshka_batchtopk", "save_inference_model")],
)
def test_refused_architectures_say_why(tmp_path: Path, arch: str, why: str) -> None:
    folder = write_saelens(tmp_path, D_IN, D_SAE, extra_cfg={"architecture": arch})
    with pytest.raises(SaeFileError) as caught:
        open_sae(folder)
    message = str(caught.value)
    for fragment in ("cfg.json", "'architecture'", repr(arch), "refused", why):
        assert fragment in message, message


def test_registry_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered as refused"):
        refuse_architecture("temporal", "again")
    with pytest.raises(ValueError, match="already registered by JumpReluSae"):
        refuse_architecture("jumprelu", "a registered architecture cannot be refused")


# --- steering, logs ---------------------------------------------------------------------------


def test_steering_through_a_transcoder_is_refused(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_IN, jumprelu=True)
    sae = open_sae(write_saelens_transcoder(tmp_path, weights,
                                            architecture="jumprelu_transcoder"))
    with pytest.raises(InvalidInput) as caught:
        sae.decoder_directions([3])
    message = str(caught.value)
    for fragment in ("'blocks.4.ln2.hook_normalized'", "transcoder", "blocks.4.hook_mlp_out",
                     f"d_out={D_IN}"):
        assert fragment in message, message
    plain = open_sae(write_saelens(tmp_path / "sae", D_IN, D_SAE))
    assert plain.decoder_directions([3]).shape == (1, D_IN)


def test_sae_opened_log_line_names_the_output_hook(tmp_path: Path) -> None:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT)
    folder = write_saelens_transcoder(tmp_path, weights, architecture="transcoder")
    with capture_logs() as logs:
        open_sae(folder)
    (opened,) = [e for e in logs if e["event"] == "sae.opened"]
    assert (opened["hook"], opened["hook_out"], opened["d_out"]) == (
        "blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out", D_OUT)


# --- guard sae encode and guard sae export, per format -----------------------------------------


Reference = tuple[Path, Callable[[F64], tuple[F64, F64]], str | None]


def _saelens_skip(tmp: Path) -> Reference:
    weights = random_transcoder_weights(D_IN, D_SAE, D_OUT, jumprelu=True, skip=True, seed=6)
    w = w64(weights)

    def ref(x: F64) -> tuple[F64, F64]:
        acts = saelens_transcoder_encode(x, w, "jumprelu_skip_transcoder")
        return acts, saelens_transcoder_forward(x, w, acts)

    return (write_saelens_transcoder(tmp / "src", weights,
                                     architecture="jumprelu_skip_transcoder"),
            ref, "blocks.4.hook_mlp_out")


def _gemmascope2_affine(tmp: Path) -> Reference:
    params = random_gemmascope2_params(D_IN, D_SAE, D_OUT, affine=True, seed=7)
    p = w64(params)

    def ref(x: F64) -> tuple[F64, F64]:
        acts = gemmascope2_encode(x, p)
        return acts, gemmascope2_forward(x, p, acts)

    folder = write_gemmascope2(gemmascope2_folder(tmp, "transcoder_all", 1, "_affine"), params,
                               {"affine_connection": True})
    return folder, ref, "blocks.1.hook_mlp_out"


def _gemmascope2_sae(tmp: Path) -> Reference:
    params = random_gemmascope2_params(D_IN, D_SAE, seed=8)
    p = w64(params)

    def ref(x: F64) -> tuple[F64, F64]:
        acts = gemmascope2_encode(x, p)
        return acts, gemmascope2_forward(x, p, acts)

    return write_gemmascope2(gemmascope2_folder(tmp, "mlp_out", 4), params, {}), ref, None


def _llamascope(tmp: Path) -> Reference:
    tensors = random_llamascope_tensors(D_IN, D_SAE, seed=9)
    hp = llamascope_hyperparams(D_IN, D_SAE, jump_relu_threshold=0.4,
                                dataset_average_activation_norm={"in": 3.0, "out": 2.0},
                                hook_point_out="blocks.15.hook_mlp_out")
    t = w64(tensors)

    def ref(x: F64) -> tuple[F64, F64]:
        acts = llamascope_encode(x, t, hp)
        return acts, llamascope_forward(acts, t, hp)

    return write_llamascope(tmp / "src", tensors, hp), ref, "blocks.15.hook_mlp_out"


def _sparsify_transcoder(tmp: Path) -> Reference:
    folder = write_sparsify(tmp / "layers.2.mlp", D_IN, D_SAE, k=8, skip_connection=True,
                            extra_cfg={"transcode": True})
    header_len = int.from_bytes((folder / "sae.safetensors").read_bytes()[:8], "little")
    raw = (folder / "sae.safetensors").read_bytes()
    header = json.loads(raw[8:8 + header_len])
    t = {name: np.frombuffer(raw[8 + header_len + a:8 + header_len + b], dtype="<f4")
         .reshape(spec["shape"]).astype(np.float64)
         for name, spec in header.items() for a, b in [spec["data_offsets"]]}

    def ref(x: F64) -> tuple[F64, F64]:
        # sparse_coder.py: no x - b_dec for transcoders; relu(linear); top k; skip on raw x.
        pre = np.maximum(x @ t["encoder.weight"].T + t["encoder.bias"], 0.0)
        top = np.argsort(-pre, axis=-1, kind="stable")[:, :8]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, top, np.take_along_axis(pre, top, -1), -1)
        return acts, acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T

    return folder, ref, "layers.2.mlp"


SOURCES = {
    "saelens-jumprelu-skip-transcoder": _saelens_skip,
    "gemmascope2-affine-transcoder": _gemmascope2_affine,
    "gemmascope2-sae": _gemmascope2_sae,
    "llamascope-transcoder": _llamascope,
    "sparsify-skip-transcoder": _sparsify_transcoder,
}


@pytest.mark.parametrize("name", SOURCES)
def test_guard_sae_encode_reproduces_the_format(tmp_path: Path, name: str) -> None:
    source, ref, _ = SOURCES[name](tmp_path)
    x = rows(scale=2.0)
    np.save(tmp_path / "x.npy", x)
    out, recon = tmp_path / "acts.npy", tmp_path / "recon.npy"
    assert main(["sae", "encode", str(source), "--input", str(tmp_path / "x.npy"),
                 "--output", str(out), "--recon", str(recon)]) == 0
    acts, forward = ref(x.astype(np.float64))
    both_states(acts)
    assert_close(np.load(out), acts)
    assert_close(np.load(recon), forward, 1e-4)


@pytest.mark.parametrize("name", SOURCES)
def test_export_round_trip(tmp_path: Path, name: str) -> None:
    source, ref, hook_out = SOURCES[name](tmp_path)
    target = tmp_path / "artifact"
    assert main(["sae", "export", str(source), str(target), "--dtype", "fp32",
                 *(["--hook", "blocks.2.hook_resid_post"] if name == "gemmascope2-sae" else [])
                 ]) == 0
    manifest = json.loads((target / "manifest.json").read_text())
    original, exported = open_sae(source, require_hook=False), open_sae(target)
    assert manifest["format_version"] == (1 if hook_out is None else 2)
    assert manifest.get("hook_name_out") == hook_out
    assert exported.info.source_format == "artifact"
    assert manifest["source_format"] == original.info.source_format
    for field in ("d_in", "d_sae", "architecture", "hook_name_out", "d_out"):
        assert getattr(exported.info, field) == getattr(original.info, field), field
    x = rows(seed=11, scale=2.0)
    acts, forward = ref(x.astype(np.float64))
    found = exported.encoder().encode(x)
    assert_close(found, acts)
    assert_close(exported.encoder([5, 1, 9]).encode(x), acts[:, [5, 1, 9]])
    assert_close(exported.decode(found, x), forward, 1e-4)


WEIGHTS_FILES = {
    "saelens-jumprelu-skip-transcoder": "sae_weights.safetensors",
    "gemmascope2-affine-transcoder": "params.safetensors",
    "gemmascope2-sae": "params.safetensors",
    "llamascope-transcoder": "checkpoints/final.safetensors",
    "sparsify-skip-transcoder": "sae.safetensors",
}


@pytest.mark.parametrize("name", SOURCES)
def test_pins_are_the_weights_files_sha256(tmp_path: Path, name: str) -> None:
    source, _, _ = SOURCES[name](tmp_path)
    digest = hashlib.sha256((source / WEIGHTS_FILES[name]).read_bytes()).hexdigest()
    assert open_sae(source, sha256=digest, require_hook=False).info.sha256 == digest
    with pytest.raises(SaeFileError, match=f"sha256 expected {'0' * 64} \\(pinned\\), found "
                                           f"{digest}"):
        open_sae(source, sha256="0" * 64, require_hook=False)
