"""Gemma Scope 2 folders (every Gemma 3 size): ``config.json`` + ``params.safetensors``.

Layout, as ``google/gemma-scope-2-*`` publishes it: ``{site}/layer_{L}_width_{W}_l0_{X}/``,
``site`` one of ``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder`` (each also with an
``_all`` suffix); affine transcoders end in ``_affine``. ``params.safetensors`` holds
``w_enc`` ``[d_in, d_sae]``, ``w_dec`` ``[d_sae, d_out]``, ``b_enc`` ``[d_sae]``, ``b_dec``
``[d_out]``, ``threshold`` ``[d_sae]`` and, for affine transcoders, ``affine_skip_connection``
``[d_in, d_out]``; ``config.json`` says ``architecture: jump_relu`` and names the Hugging Face
modules read and written (``hf_hook_point_in``, ``hf_hook_point_out``).

Conventions, as the reference ``JumpReLUSAE`` of Gemma Scope 2's tutorial computes them:
``pre = x @ w_enc + b_enc`` (no ``b_dec`` subtraction), ``acts = (pre > threshold) *
relu(pre)``, ``out = acts @ w_dec + b_dec`` plus ``x @ affine_skip_connection`` for affine
transcoders (SAELens's ``gemma_3`` loader computes the same features).

``affine_skip_connection`` orientation: we accept the reference's, ``x @ A`` with ``A``
``[d_in, d_out]``, and store it as the canonical ``W_skip = A.T``. SAELens's loader copies
``A`` into its ``W_skip`` and computes ``x @ A.T``; for the square matrices Gemma Scope 2
ships (``d_in == d_out``) the two disagree on the output while the file cannot tell which was
meant, so we keep the publisher's formula (the golden tests check ``x @ A``). A matrix stored
the other way round is refused when ``d_in != d_out`` (its shape is ``[d_out, d_in]``), as is
any other shape. Features never depend on it: only ``guard sae encode --recon`` does.

Hooks (TransformerLens names, as SAELens gives them), from ``config.json``'s Hugging Face
module names, else from the folder names: ``model.layers.L.output`` (``resid_post``) is
``blocks.L.hook_resid_post``; ``...pre_feedforward_layernorm.output`` (a transcoder's input)
is ``blocks.L.ln2.hook_normalized``; ``...post_feedforward_layernorm.output`` (``mlp_out``, a
transcoder's output) is ``blocks.L.hook_mlp_out``; ``...self_attn.o_proj.input``
(``attn_out``: the heads' concatenated outputs, ``d_in`` = heads x head size, not the model
width) is ``blocks.L.attn.hook_z``. Elsewhere the hook must be given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures import JumpReluConfig, JumpReluSae
from guard.sae.architectures.base import FloatArray
from guard.sae.formats.fields import check_tensor_names, read_json_object
from guard.sae.model import Decoder, SaeModel, check_decoder, checked_params, finite_float32
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
SKIP_TENSOR = "affine_skip_connection"
_REQUIRED = frozenset({"w_enc", "w_dec", "b_enc", "b_dec", "threshold"})
_NAMES = {"W_enc": "w_enc", "b_enc": "b_enc", "threshold": "threshold"}

#: Hugging Face module names of Gemma 3 (``model.layers.L.<part>``, ``model.language_model``
#: in the multimodal sizes) and the TransformerLens hook each is.
_HF_HOOKS = {
    "output": "blocks.{layer}.hook_resid_post",
    "pre_feedforward_layernorm.output": "blocks.{layer}.ln2.hook_normalized",
    "post_feedforward_layernorm.output": "blocks.{layer}.hook_mlp_out",
    "self_attn.o_proj.input": "blocks.{layer}.attn.hook_z",
}
_HF_HOOK = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(map(re.escape, _HF_HOOKS)) + ")$")
#: Folder names (``_all`` suffix dropped) and the hooks read and written.
_SITES = {
    "resid_post": ("blocks.{layer}.hook_resid_post", None),
    "attn_out": ("blocks.{layer}.attn.hook_z", None),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", None),
    "transcoder": ("blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"),
}


def is_gemmascope2_path(path: Path) -> bool:
    return (path.name == PARAMS_FILE and path.is_file()) or (path / PARAMS_FILE).is_file()


def params_file(path: Path) -> Path:
    """The ``params.safetensors`` of a Gemma Scope 2 folder (or the file itself)."""
    return path if path.name == PARAMS_FILE else path / PARAMS_FILE


def load_gemmascope2(path: Path, hook: str | None = None, *, require_hook: bool = True,
                     sha256: str | None = None) -> SaeModel:
    """Load a Gemma Scope 2 SAE or transcoder (``sha256``: the params file's, when the caller
    has just hashed it)."""
    weights_path = params_file(path)
    config_path = weights_path.parent / CONFIG_FILE
    config = read_json_object(config_path) if config_path.is_file() else {}
    if config.get("architecture", "jump_relu") != "jump_relu":
        raise SaeFileError(
            config_path,
            f"field 'architecture': expected 'jump_relu' (Gemma Scope 2 publishes JumpReLU "
            f"SAEs and transcoders only), found {config.get('architecture')!r}",
        )
    file = SafetensorsFile(weights_path)
    check_tensor_names(file, _REQUIRED, {SKIP_TENSOR})
    w_enc = file.float32("w_enc")
    w_dec = file.float32("w_dec")
    for name, array, dims in (("w_enc", w_enc, "[d_in, d_sae]"),
                              ("w_dec", w_dec, "[d_sae, d_out]")):
        if array.ndim != 2:
            raise SaeFileError(
                weights_path,
                f"tensor {name!r}: expected 2 dimensions {dims}, found shape "
                f"{list(array.shape)} (cross-layer transcoders are not supported)",
            )
    d_in, d_sae = (int(n) for n in w_enc.shape)
    d_out = int(w_dec.shape[1])
    arch_config = JumpReluConfig(d_in, d_sae)
    params = checked_params(
        weights_path, JumpReluSae, arch_config,
        {"W_enc": w_enc, "b_enc": file.float32("b_enc"), "threshold": file.float32("threshold")},
        names=_NAMES,
    )
    params["threshold"] = np.maximum(params["threshold"], np.float32(0.0))
    hook_in, hook_out = _hooks(weights_path, config)
    affine = SKIP_TENSOR in file
    _check_affine_flag(config_path, config, affine)
    transcoder = affine or hook_out is not None or d_out != d_in
    w_dec, b_dec = check_decoder(weights_path, d_out, d_sae, w_dec, file.float32("b_dec"),
                                 w_dec_name="w_dec", width="d_out" if transcoder else "d_in")
    w_skip = _skip(weights_path, file, d_in, d_out) if affine else None
    hook_name = hook or hook_in
    if hook_name is None:
        if require_hook:
            raise SaeFileError(
                weights_path,
                "cannot tell the hook: config.json names no known hf_hook_point_in and the path "
                "is not .../<site>/layer_N_width_..._l0_.../ (site resid_post, attn_out, "
                "mlp_out or transcoder): pass the hook explicitly",
            )
        hook_name = ""
    return SaeModel(
        architecture=JumpReluSae(arch_config, params),
        normalization="none",
        decoder=Decoder(w_dec, b_dec, w_skip, (hook_out or "") if transcoder else None),
        hook_name=hook_name,
        source_format="gemmascope2",
        sha256=sha256 or sha256_of_files([weights_path]),
        weights_file=weights_path,
    )


def _skip(weights_path: Path, file: SafetensorsFile, d_in: int, d_out: int
          ) -> FloatArray:
    """The canonical ``W_skip`` ``[d_out, d_in]``: ``affine_skip_connection`` transposed."""
    affine = file.float32(SKIP_TENSOR)
    shape = tuple(affine.shape)
    if shape != (d_in, d_out):
        transposed = shape == (d_out, d_in)
        raise SaeFileError(
            weights_path,
            f"tensor {SKIP_TENSOR!r}: expected shape {[d_in, d_out]} (d_in, d_out: the output "
            f"gains x @ {SKIP_TENSOR}, as Gemma Scope 2's reference computes it), found "
            f"{list(shape)}"
            + (" (transposed: stored as SAELens's W_skip [d_out, d_in]; transpose it back)"
               if transposed else ""),
        )
    return np.ascontiguousarray(finite_float32(weights_path, SKIP_TENSOR, affine).T)


def _check_affine_flag(config_path: Path, config: dict[str, Any], affine: bool) -> None:
    flag = config.get("affine_connection")
    if flag is None:
        return
    if not isinstance(flag, bool):
        raise SaeFileError(
            config_path, f"field 'affine_connection': expected true or false, found {flag!r}"
        )
    if flag != affine:
        raise SaeFileError(
            config_path,
            f"field 'affine_connection' is {str(flag).lower()} but {PARAMS_FILE} "
            + (f"holds {SKIP_TENSOR!r}" if affine else f"has no {SKIP_TENSOR!r} tensor"),
        )


def _hooks(weights_path: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The hooks read and written (written: None for an SAE, "" for a transcoder whose
    output we cannot name), from config.json's module names, else from the folder names;
    the hook read is None where neither tells."""
    in_name, out_name = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    writes_elsewhere = out_name is not None and out_name != in_name
    hook_in = _hf_hook(in_name)
    hook_out = _hf_hook(out_name) if writes_elsewhere else None
    folder = weights_path.resolve().parent
    layer = re.match(r"layer_(\d+)(?:_|$)", folder.name)
    site = _SITES.get(folder.parent.name.removesuffix("_all"))
    if layer is not None and site is not None:
        site_in, site_out = (h.format(layer=int(layer.group(1))) if h else None for h in site)
        hook_in = hook_in or site_in
        if site_out is not None:
            writes_elsewhere = True
            hook_out = hook_out or site_out
    if writes_elsewhere and hook_out is None:
        hook_out = ""
    return hook_in, hook_out


def _hf_hook(name: object) -> str | None:
    match = _HF_HOOK.search(name) if isinstance(name, str) else None
    if match is None:
        return None
    return _HF_HOOKS[match.group(2)].format(layer=int(match.group(1)))
