"""OpenAI's GPT-2 SAEs (``openai/sparse_autoencoder``), as ``guard sae convert`` writes them:
``cfg.json`` + ``openai_sae.safetensors`` (see ``guard.sae.formats.state_dict``).

Conventions, as ``sparse_autoencoder/model.py`` computes them (``Autoencoder``):

- state dict: ``pre_bias`` ``[d_in]``, ``latent_bias`` ``[d_sae]``, ``encoder.weight``
  ``[d_sae, d_in]`` and ``decoder.weight`` ``[d_in, d_sae]`` (``nn.Linear`` without bias);
  buffers ``stats_last_nonzero``, ``latents_activation_frequency``, ``latents_mean_square``
  only count during training (the converter leaves them out); ``activation`` (``"TopK"`` or
  ``"ReLU"``, default ``"ReLU"``) and ``activation_state_dict`` (``k``, ``postact_fn``) are
  plain entries next to the tensors.
- ``normalize`` is set exactly when the activation is TopK (``from_state_dict``): the input
  is then layer-normalised first, ``LN(x) = (x - mean) / (std + 1e-5)`` with torch's unbiased
  std, and the reconstruction is un-normalised (``* std + mean``, no eps) at the end.
- ``encode``: ``latents_pre_act = (LN(x) - pre_bias) @ encoder.weight.T + latent_bias``; TopK
  keeps the ``k`` largest pre-activations (``torch.topk``), applies ``postact_fn`` (ReLU) to
  them and zeroes the rest; the ReLU SAEs (v1, v4) apply ReLU to every pre-activation.
- ``decode``: ``latents @ decoder.weight.T + pre_bias``, then un-normalised.

In the runtime's form: ``W_enc = encoder.weight.T``, ``b_enc = latent_bias`` with ``pre_bias``
folded in (``shifted_input``), input normalisation ``layer_norm`` (the same formula as
SAELens's), ``W_dec = decoder.weight.T``, ``b_dec = pre_bias``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures import (
    Architecture,
    StandardConfig,
    StandardSae,
    TopKConfig,
    TopKSae,
)
from guard.sae.formats.fields import check_tensor_names, positive_int, read_json_object
from guard.sae.formats.state_dict import CFG_FILE, OPENAI, is_converted_folder
from guard.sae.model import (
    Decoder,
    InputNormalization,
    SaeModel,
    check_decoder,
    check_folded,
    checked_params,
    finite_float32,
)
from guard.sae.neuronpedia import neuronpedia_id_field
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

WEIGHTS_FILE = OPENAI.weights_file
#: cfg ``architecture`` -> whether it is TopK, and its default input normalisation.
ARCHITECTURES: dict[str, tuple[bool, InputNormalization]] = {
    "openai_topk": (True, "layer_norm"),
    "openai_relu": (False, "none"),
}


def is_openai_folder(path: Path) -> bool:
    return is_converted_folder(path, OPENAI)


def load_openai(folder: Path, hook: str | None = None, *, require_hook: bool = True,
                sha256: str | None = None) -> SaeModel:
    """Load a converted OpenAI SAE folder (``sha256``: the weights file's, when the caller has
    just hashed it)."""
    cfg_path = folder / CFG_FILE
    weights_path = folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_path)
    check_format(cfg_path, cfg, OPENAI.format)
    name = cfg.get("architecture")
    if name not in ARCHITECTURES:
        raise SaeFileError(cfg_path, f"field 'architecture': expected one of "
                                     f"{sorted(ARCHITECTURES)}, found {name!r}")
    topk, default_normalization = ARCHITECTURES[name]
    normalization = cfg.get("input_normalization", default_normalization)
    if normalization not in ("none", "layer_norm"):
        raise SaeFileError(cfg_path, "field 'input_normalization': expected 'layer_norm' (OpenAI's "
                                     f"normalize=True) or 'none', found {normalization!r}")

    file = SafetensorsFile(weights_path)
    sha256 = sha256 or sha256_of_files([weights_path])
    check_tensor_names(file, set(OPENAI.tensors))
    d_in, d_sae = OPENAI.check_shapes(
        weights_path, {n: file.entries[n].shape for n in file.names()}
    )
    check_sizes(cfg_path, cfg, d_in, d_sae)
    encoder_weight = file.float32("encoder.weight")
    pre_bias = finite_float32(weights_path, "pre_bias", file.float32("pre_bias"))
    architecture: Architecture[Any]
    names = {"W_enc": "encoder.weight", "b_enc": "latent_bias"}
    raw = {"W_enc": np.ascontiguousarray(encoder_weight.T), "b_enc": file.float32("latent_bias")}
    if topk:
        k = positive_int(cfg_path, cfg, "k")
        if k > d_sae:
            raise SaeFileError(cfg_path, f"field 'k': expected at most d_sae={d_sae}, found {k}")
        config = TopKConfig(d_in, d_sae, k)
        architecture = TopKSae(config, checked_params(weights_path, TopKSae, config, raw,
                                                      names=names))
    else:
        plain = StandardConfig(d_in, d_sae)
        architecture = StandardSae(plain, checked_params(weights_path, StandardSae, plain, raw,
                                                         names=names))
    w_dec, b_dec = check_decoder(
        weights_path, d_in, d_sae, np.ascontiguousarray(file.float32("decoder.weight").T),
        pre_bias, w_dec_name="decoder.weight", b_dec_name="pre_bias",
    )
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        architecture = architecture.shifted_input(pre_bias.astype(np.float64))
    check_folded(weights_path, architecture, w_dec, b_dec)
    return SaeModel(
        architecture=architecture,
        normalization=normalization,
        decoder=Decoder(w_dec, b_dec),
        hook_name=hook_field(cfg_path, cfg, hook, require_hook),
        source_format="openai",
        sha256=sha256,
        weights_file=weights_path,
        neuronpedia_id=neuronpedia_id_field(cfg_path, cfg.get("neuronpedia_id")),
    )


def check_format(cfg_path: Path, cfg: dict[str, Any], expected: str) -> None:
    if cfg.get("format") != expected:
        raise SaeFileError(cfg_path, f"field 'format': expected {expected!r} (written by guard "
                                     f"sae convert), found {cfg.get('format')!r}")


def check_sizes(cfg_path: Path, cfg: dict[str, Any], d_in: int, d_sae: int) -> None:
    """The cfg's ``d_in``/``d_sae``, when it records them, must be the tensors'."""
    for key, found in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != found:
            raise SaeFileError(cfg_path, f"field {key!r}: expected {found} (the tensors' size), "
                                         f"found {cfg[key]!r}")


def hook_field(cfg_path: Path, cfg: dict[str, Any], hook: str | None, require_hook: bool) -> str:
    """The caller's hook, else the cfg's ``hook_name``; empty only when none is required."""
    if hook:
        return hook
    recorded = cfg.get("hook_name")
    if recorded is not None and not isinstance(recorded, str):
        raise SaeFileError(cfg_path, f"field 'hook_name': expected a string, found {recorded!r}")
    if recorded:
        return recorded
    if require_hook:
        raise SaeFileError(cfg_path, "missing field 'hook_name': expected the hook the SAE "
                                     "reads (give saes[].hook, or convert with --hook)")
    return ""
