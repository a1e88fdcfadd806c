"""Llama Scope folders: ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Llama Scope (OpenMOSS ``lm_saes``, ``fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8,32}x``) SAEs are
JumpReLU with one scalar threshold (``jump_relu_threshold``) and a dataset-wise input norm:
inputs are scaled by ``s_in = sqrt(d_model) / dataset_average_activation_norm.in`` before the
encoder. The checkpoint holds ``nn.Linear`` weights: ``encoder.weight`` ``[d_sae, d_model]``,
``encoder.bias``, ``decoder.weight`` ``[d_model, d_sae]``, ``decoder.bias``.

Conventions, as SAELens's ``llama_scope`` loader computes them (it folds the norm with
``fold_activation_norm_scaling_factor`` and scales the threshold by the same factor; the fix
came from Llama Scope's authors, SAELens PR #483):

- ``pre = s_in * x @ encoder.weight.T + encoder.bias``, no ``b_dec`` subtraction;
- ``acts = relu(pre) * (pre > jump_relu_threshold * s_in)``;
- ``out = (acts @ decoder.weight.T + decoder.bias) / s_out``, with
  ``s_out = sqrt(d_model) / dataset_average_activation_norm.out`` (``lm_saes``'s
  ``standardize_parameters_of_dataset_activation_scaling``; SAELens divides by ``s_in``, the
  same factor for every Llama Scope SAE but the transcoders, whose output is another hook).

``lm_saes`` itself reports ``acts / s_in`` (times each decoder column's norm, which it folds
into the encoder for ``sparsity_include_decoder_norm``) and thresholds that; with unit decoder
columns both give the same features, ours on SAELens's scale. Transcoders (``hook_point_out``
differing from ``hook_point_in``, the ``TC`` releases) are recorded as such. Files asking for
another input norm (``norm_activation`` other than ``dataset-wise``), ``b_dec`` subtracted
before the encoder (``apply_decoder_bias_to_pre_encoder``), a GLU encoder, or an activation
other than JumpReLU (TopK with a positive threshold is converted to JumpReLU, as ``lm_saes``
does at load) are refused.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import SaeFileError, bounded_repr
from guard.sae.architectures import JumpReluConfig, JumpReluSae
from guard.sae.formats.fields import (
    boolean,
    check_tensor_names,
    positive_int,
    read_json_object,
)
from guard.sae.model import Decoder, SaeModel, check_decoder, check_folded, checked_params
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

HYPERPARAMS_FILE = "hyperparams.json"
WEIGHTS_FILE = "checkpoints/final.safetensors"
_NAMES = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "threshold": "jump_relu_threshold"}


def is_llamascope_folder(path: Path) -> bool:
    return (path / HYPERPARAMS_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_llamascope(folder: Path, hook: str | None = None, *, sha256: str | None = None
                    ) -> SaeModel:
    """Load a Llama Scope SAE folder (``sha256``: the checkpoint's, when the caller has just
    hashed it)."""
    cfg_path = folder / HYPERPARAMS_FILE
    weights_path = folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_path)
    d_model = positive_int(cfg_path, cfg, "d_model")
    if "d_sae" in cfg:
        d_sae = positive_int(cfg_path, cfg, "d_sae")
    else:
        d_sae = d_model * positive_int(cfg_path, cfg, "expansion_factor")
    _check_supported(cfg_path, cfg)
    threshold = _number(cfg_path, cfg, "jump_relu_threshold", positive=False)
    s_in, s_out = _norm_factors(cfg_path, cfg, d_model)
    hook_in = _hook(cfg_path, cfg, "hook_point_in")
    hook_out = _hook(cfg_path, cfg, "hook_point_out") if "hook_point_out" in cfg else hook_in
    use_decoder_bias = boolean(cfg_path, cfg, "use_decoder_bias", True)

    file = SafetensorsFile(weights_path)
    sha256 = sha256 or sha256_of_files([weights_path])
    required = {"encoder.weight", "encoder.bias", "decoder.weight"}
    check_tensor_names(file, required | ({"decoder.bias"} if use_decoder_bias else set()))
    encoder_weight = file.float32("encoder.weight")
    if encoder_weight.shape != (d_sae, d_model):
        raise SaeFileError(
            weights_path,
            f"tensor 'encoder.weight': expected shape {[d_sae, d_model]} (d_sae, d_model), "
            f"found {list(encoder_weight.shape)}",
        )
    config = JumpReluConfig(d_model, d_sae)
    params = checked_params(
        weights_path, JumpReluSae, config,
        {"W_enc": np.ascontiguousarray(encoder_weight.T), "b_enc": file.float32("encoder.bias"),
         "threshold": np.full(d_sae, max(threshold, 0.0), dtype=np.float64)},
        names=_NAMES,
    )
    decoder_weight = file.float32("decoder.weight")
    if decoder_weight.shape != (d_model, d_sae):
        raise SaeFileError(
            weights_path,
            f"tensor 'decoder.weight': expected shape {[d_model, d_sae]} (d_model, d_sae), "
            f"found {list(decoder_weight.shape)}",
        )
    b_dec_raw = (file.float32("decoder.bias") if use_decoder_bias
                 else np.zeros(d_model, dtype=np.float32))
    w_dec, b_dec = check_decoder(weights_path, d_model, d_sae, decoder_weight.T, b_dec_raw,
                                 w_dec_name="decoder.weight", b_dec_name="decoder.bias",
                                 width="d_model")
    with np.errstate(over="ignore", invalid="ignore"):  # checked by check_folded below
        params["W_enc"] = (params["W_enc"].astype(np.float64) * s_in).astype(np.float32)
        params["threshold"] = (params["threshold"].astype(np.float64) * s_in).astype(np.float32)
        w_dec = np.ascontiguousarray(w_dec.astype(np.float64) / s_out, dtype=np.float32)
        b_dec = (b_dec.astype(np.float64) / s_out).astype(np.float32)
    architecture = JumpReluSae(config, params)
    check_folded(weights_path, architecture, w_dec, b_dec)
    return SaeModel(
        architecture=architecture,
        normalization="none",
        decoder=Decoder(w_dec, b_dec, None, hook_out if hook_out != hook_in else None),
        hook_name=hook or hook_in,
        source_format="llamascope",
        sha256=sha256,
        weights_file=weights_path,
    )


def _check_supported(cfg_path: Path, cfg: dict[str, Any]) -> None:
    act_fn = cfg.get("act_fn", "jumprelu")
    topk_as_jumprelu = act_fn == "topk" and _number(
        cfg_path, cfg, "jump_relu_threshold", positive=False) > 0
    if act_fn != "jumprelu" and not topk_as_jumprelu:
        raise SaeFileError(
            cfg_path,
            "field 'act_fn': expected 'jumprelu' (or 'topk' with a positive "
            f"jump_relu_threshold, converted to JumpReLU as lm_saes does), found {act_fn!r}",
        )
    norm = cfg.get("norm_activation", "dataset-wise")
    if norm != "dataset-wise":
        raise SaeFileError(
            cfg_path,
            f"field 'norm_activation': expected 'dataset-wise' (Llama Scope's input norm), "
            f"found {norm!r}",
        )
    for key, why in (("apply_decoder_bias_to_pre_encoder", "subtracting b_dec before the "
                      "encoder"), ("use_glu_encoder", "a GLU encoder")):
        if boolean(cfg_path, cfg, key, False):
            raise SaeFileError(
                cfg_path, f"field {key!r}: expected false ({why} is not supported), found true"
            )


def _norm_factors(cfg_path: Path, cfg: dict[str, Any], d_model: int) -> tuple[float, float]:
    """``s_in`` and ``s_out``: ``sqrt(d_model)`` over the dataset-average norms."""
    norms = cfg.get("dataset_average_activation_norm")
    if not isinstance(norms, dict):
        raise SaeFileError(
            cfg_path,
            "field 'dataset_average_activation_norm': expected an object "
            f'{{"in": <norm>, "out": <norm>}}, found {norms!r}',
        )
    norm_in = _number(cfg_path, norms, "in", positive=True,
                      field="dataset_average_activation_norm.in")
    norm_out = (_number(cfg_path, norms, "out", positive=True,
                        field="dataset_average_activation_norm.out")
                if "out" in norms else norm_in)
    try:
        root = math.sqrt(d_model)
    except OverflowError:  # an int beyond the float range; no tensor could be that wide
        raise SaeFileError(cfg_path, "field 'd_model': expected a model width, found "
                                     f"{bounded_repr(d_model)}") from None
    return root / norm_in, root / norm_out


def _number(path: Path, values: dict[str, Any], key: str, *, positive: bool,
            field: str | None = None) -> float:
    value = values.get(key)
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
    if number is None or not math.isfinite(number) or (positive and number <= 0):
        expected = "a positive number" if positive else "a finite number"
        raise SaeFileError(path, f"field {field or key!r}: expected {expected}, found {value!r}")
    return number


def _hook(cfg_path: Path, cfg: dict[str, Any], key: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise SaeFileError(cfg_path, f"field {key!r}: expected a hook name, found {value!r}")
    return value
