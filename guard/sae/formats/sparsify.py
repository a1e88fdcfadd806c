"""EleutherAI sparsify layer folders: ``cfg.json`` + ``sae.safetensors``.

Conventions, as ``sparsify/sparse_coder.py`` computes them:

- ``encoder`` is an ``nn.Linear``: ``encoder.weight`` is ``[num_latents, d_in]`` (the
  transpose of SAELens's ``W_enc``), ``encoder.bias`` is ``[num_latents]``.
- ``encode``: ``x - b_dec`` (skipped for transcoders), ``relu(linear(x))``, then ``topk``
  over the ReLU'd pre-activations (same dense result as SAELens's topk-then-ReLU).
- ``decode``: ``top_acts @ W_dec + b_dec``, ``W_dec`` ``[num_latents, d_in]``; with
  ``skip_connection`` the output gains ``x @ W_skip.T`` (``x`` the raw input).
- ``num_latents`` 0 means ``d_in * expansion_factor``. ``normalize_decoder`` and
  ``multi_topk`` only shape training (a unit-norm constraint, an extra loss): inference
  ignores them, as sparsify does.
- the hook is the folder's name (sparsify names layer folders by hookpoint, ``layers.6``).
- ``transcode``: a transcoder reads the input of the hooked module and predicts its output
  (``d_out == d_in``); the encoder is the same, minus the ``b_dec`` subtraction, and the
  decoder is recorded as writing the module's output (``hook_name_out``: the same name), so
  steering through it is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures import Architecture, TopKConfig, TopKSae
from guard.sae.formats.fields import (
    boolean,
    check_tensor_names,
    positive_int,
    read_json_object,
)
from guard.sae.model import (
    Decoder,
    SaeModel,
    check_decoder,
    check_folded,
    checked_params,
    finite_float32,
)
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# Options that need inputs the sidecar does not have (embedding activations, n-gram tables).
_UNSUPPORTED = ("embed_skip", "gram_lookup")


def is_sparsify_folder(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_sparsify(folder: Path, hook: str | None = None, *, sha256: str | None = None
                  ) -> SaeModel:
    """Load a sparsify layer folder (``sha256``: the weights file's, when the caller has
    just hashed it)."""
    cfg_path = folder / CFG_FILE
    weights_path = folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_path)
    d_in = positive_int(cfg_path, cfg, "d_in")
    num_latents = cfg.get("num_latents", 0)
    if num_latents in (0, None):
        d_sae = d_in * positive_int(cfg_path, cfg, "expansion_factor", 32)
    else:
        d_sae = positive_int(cfg_path, cfg, "num_latents")
    k = positive_int(cfg_path, cfg, "k", 32)
    if k > d_sae:
        raise SaeFileError(cfg_path, f"field 'k': expected at most num_latents={d_sae}, found {k}")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SaeFileError(
            cfg_path, f"field 'activation': only 'topk' is supported, found {activation!r}"
        )
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise SaeFileError(cfg_path, f"field {key!r}: sparse coders with it are not supported")
    transcode = boolean(cfg_path, cfg, "transcode", False)
    skip_connection = boolean(cfg_path, cfg, "skip_connection", False)

    file = SafetensorsFile(weights_path)
    sha256 = sha256 or sha256_of_files([weights_path])
    required = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if skip_connection:
        required.add("W_skip")
    check_tensor_names(file, required)
    encoder_weight = file.float32("encoder.weight")
    if encoder_weight.shape != (d_sae, d_in):
        raise SaeFileError(
            weights_path,
            f"tensor 'encoder.weight': expected shape {[d_sae, d_in]} (num_latents, d_in), "
            f"found {list(encoder_weight.shape)}",
        )
    config = TopKConfig(d_in, d_sae, k)
    params = checked_params(
        weights_path,
        TopKSae,
        config,
        {"W_enc": np.ascontiguousarray(encoder_weight.T), "b_enc": file.float32("encoder.bias")},
        names={"W_enc": "encoder.weight", "b_enc": "encoder.bias"},
    )
    w_dec, b_dec = check_decoder(
        weights_path, d_in, d_sae, file.float32("W_dec"), file.float32("b_dec")
    )
    w_skip = None
    if skip_connection:
        w_skip = file.float32("W_skip")
        if w_skip.shape != (d_in, d_in):
            raise SaeFileError(
                weights_path,
                f"tensor 'W_skip': expected shape {[d_in, d_in]}, found {list(w_skip.shape)}",
            )
        w_skip = finite_float32(weights_path, "W_skip", w_skip)
    architecture: Architecture[TopKConfig] = TopKSae(config, params)
    hook_name = hook or folder.resolve().name
    if not transcode:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            architecture = architecture.shifted_input(b_dec.astype(np.float64))
        check_folded(weights_path, architecture, w_dec, b_dec)
    return SaeModel(
        architecture=architecture,
        normalization="none",
        # A transcoder predicts the hooked module's output from its input: same name.
        decoder=Decoder(w_dec, b_dec, w_skip, hook_name if transcode else None),
        hook_name=hook_name,
        source_format="sparsify",
        sha256=sha256,
        weights_file=weights_path,
    )
