"""Goodfire's Llama SAEs (``Goodfire/Llama-3.1-8B-Instruct-SAE-l19``,
``Goodfire/Llama-3.3-70B-Instruct-SAE-l50``), as ``guard sae convert`` writes them:
``cfg.json`` + ``goodfire_sae.safetensors`` (see ``guard.sae.formats.state_dict``).

Conventions, as the model cards' ``SparseAutoEncoder`` computes them (and SAELens's Goodfire
loader maps them: ``architecture: standard``, ``apply_b_dec_to_input: false``):

- state dict: ``encoder_linear.weight`` ``[d_sae, d_in]``, ``encoder_linear.bias``
  ``[d_sae]``, ``decoder_linear.weight`` ``[d_in, d_sae]``, ``decoder_linear.bias`` ``[d_in]``
  (two ``nn.Linear`` with bias).
- ``encode``: ``relu(x @ encoder_linear.weight.T + encoder_linear.bias)``: nothing is
  subtracted from the input and nothing normalises it.
- ``decode``: ``latents @ decoder_linear.weight.T + decoder_linear.bias``.
- the hook: the residual stream after decoder layer L (``model.layers.L`` output, SAELens
  ``blocks.L.hook_resid_post``); the file names say L (``...-SAE-l19.pth``).

In the runtime's form: a standard (ReLU) SAE with ``W_enc = encoder_linear.weight.T``,
``b_enc = encoder_linear.bias``, ``W_dec = decoder_linear.weight.T``,
``b_dec = decoder_linear.bias``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures import StandardConfig, StandardSae
from guard.sae.formats.fields import check_tensor_names, read_json_object
from guard.sae.formats.openai import check_format, check_sizes, hook_field
from guard.sae.formats.state_dict import CFG_FILE, GOODFIRE, is_converted_folder
from guard.sae.model import Decoder, SaeModel, check_decoder, checked_params
from guard.sae.neuronpedia import neuronpedia_id_field
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

WEIGHTS_FILE = GOODFIRE.weights_file
ARCHITECTURE = "goodfire_relu"


def is_goodfire_folder(path: Path) -> bool:
    return is_converted_folder(path, GOODFIRE)


def load_goodfire(folder: Path, hook: str | None = None, *, require_hook: bool = True,
                  sha256: str | None = None) -> SaeModel:
    """Load a converted Goodfire SAE folder (``sha256``: the weights file's, when the caller
    has just hashed it)."""
    cfg_path = folder / CFG_FILE
    weights_path = folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_path)
    check_format(cfg_path, cfg, GOODFIRE.format)
    if cfg.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise SaeFileError(cfg_path, f"field 'architecture': expected {ARCHITECTURE!r}, found "
                                     f"{cfg.get('architecture')!r}")
    if cfg.get("input_normalization", "none") != "none":
        raise SaeFileError(cfg_path, "field 'input_normalization': expected 'none' (Goodfire's "
                                     "SAEs read raw activations), found "
                                     f"{cfg.get('input_normalization')!r}")

    file = SafetensorsFile(weights_path)
    sha256 = sha256 or sha256_of_files([weights_path])
    check_tensor_names(file, set(GOODFIRE.tensors))
    d_in, d_sae = GOODFIRE.check_shapes(
        weights_path, {n: file.entries[n].shape for n in file.names()}
    )
    check_sizes(cfg_path, cfg, d_in, d_sae)
    config = StandardConfig(d_in, d_sae)
    params = checked_params(
        weights_path,
        StandardSae,
        config,
        {"W_enc": np.ascontiguousarray(file.float32("encoder_linear.weight").T),
         "b_enc": file.float32("encoder_linear.bias")},
        names={"W_enc": "encoder_linear.weight", "b_enc": "encoder_linear.bias"},
    )
    w_dec, b_dec = check_decoder(
        weights_path, d_in, d_sae,
        np.ascontiguousarray(file.float32("decoder_linear.weight").T),
        file.float32("decoder_linear.bias"),
        w_dec_name="decoder_linear.weight", b_dec_name="decoder_linear.bias",
    )
    return SaeModel(
        architecture=StandardSae(config, params),
        normalization="none",
        decoder=Decoder(w_dec, b_dec),
        hook_name=hook_field(cfg_path, cfg, hook, require_hook),
        source_format="goodfire",
        sha256=sha256,
        weights_file=weights_path,
        neuronpedia_id=neuronpedia_id_field(cfg_path, cfg.get("neuronpedia_id")),
    )
