"""Gemma Scope ``params.npz`` files (JumpReLU).

Conventions, as Gemma Scope's reference ``JumpReLUSAE`` and SAELens's ``gemma_2`` loader
compute them: ``pre = x @ W_enc + b_enc`` with no ``b_dec`` subtraction
(``apply_b_dec_to_input`` false), ``acts = (pre > threshold) * relu(pre)``,
``recon = acts @ W_dec + b_dec``. Embedding SAEs (a folder named ``embedding``) were trained
on activations scaled by ``sqrt(d_model)``: SAELens divides ``W_enc`` and multiplies ``W_dec``
by ``sqrt(d_in)``, and so do we.

The file is read with ``allow_pickle=False``: an object array would need pickle, which runs
code from the file, so it is refused.

The hook comes from the path Gemma Scope publishes under
(``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz`` is
``blocks.20.hook_resid_post``); elsewhere it must be given, unless the caller needs none
(``require_hook=False``: encoding rows offline).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import SaeFileError
from guard.sae.architectures import JumpReluConfig, JumpReluSae
from guard.sae.model import Decoder, SaeModel, check_decoder, checked_params
from guard.sae.safetensors import sha256_of_files

PARAMS_FILE = "params.npz"
_REQUIRED = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def is_gemmascope_path(path: Path) -> bool:
    return (path.suffix == ".npz" and path.is_file()) or (path / PARAMS_FILE).is_file()


def load_gemmascope(path: Path, hook: str | None = None, *, require_hook: bool = True,
                    sha256: str | None = None) -> SaeModel:
    """Load a Gemma Scope ``params.npz`` (``sha256``: the file's, when the caller has just
    hashed it)."""
    npz_path = path if path.suffix == ".npz" else path / PARAMS_FILE
    arrays = _read_npz(npz_path)
    for name in _REQUIRED:
        if name not in arrays:
            raise SaeFileError(
                npz_path,
                f"missing array {name!r}; expected {list(_REQUIRED)}, found {sorted(arrays)}",
            )
    unexpected = sorted(set(arrays) - set(_REQUIRED))
    if unexpected:
        raise SaeFileError(
            npz_path, f"unexpected array(s) {unexpected}: expected only {list(_REQUIRED)}"
        )
    w_enc = arrays["W_enc"]
    if w_enc.ndim != 2:
        raise SaeFileError(
            npz_path,
            f"array 'W_enc': expected 2 dimensions [d_in, d_sae], found shape {list(w_enc.shape)}",
        )
    d_in, d_sae = (int(n) for n in w_enc.shape)
    config = JumpReluConfig(d_in, d_sae)
    params = checked_params(npz_path, JumpReluSae, config, arrays)
    w_dec, b_dec = check_decoder(npz_path, d_in, d_sae, arrays["W_dec"], arrays["b_dec"])
    params["threshold"] = np.maximum(params["threshold"], np.float32(0.0))
    parts = npz_path.resolve().parts
    if "embedding" in parts:
        root = np.sqrt(np.float64(d_in))
        params["W_enc"] = (params["W_enc"] / root).astype(np.float32)
        w_dec = (w_dec * root).astype(np.float32)
    hook_name = hook or _hook_from_path(npz_path, parts, require_hook)
    return SaeModel(
        architecture=JumpReluSae(config, params),
        normalization="none",
        decoder=Decoder(w_dec, b_dec),
        hook_name=hook_name,
        source_format="gemmascope",
        sha256=sha256 or sha256_of_files([npz_path]),
        weights_file=npz_path,
    )


def _read_npz(npz_path: Path) -> dict[str, NDArray[Any]]:
    arrays: dict[str, NDArray[Any]] = {}
    try:
        # Our own handle, so it is closed even when NumPy gives up on a corrupt archive.
        with npz_path.open("rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise SaeFileError(
                    npz_path, "expected an .npz archive of arrays, found a single array"
                )
            with data:
                for key in data.files:
                    arrays[_canonical_key(key)] = _float_array(npz_path, data, key)
    except FileNotFoundError as e:
        raise SaeFileError(npz_path, "file not found") from e
    except ValueError as e:
        # NumPy refuses pickled content when allow_pickle is False.
        raise SaeFileError(
            npz_path, f"holds pickled Python objects, refused (allow_pickle=False): {e}"
        ) from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise SaeFileError(npz_path, f"not a readable .npz file (truncated?): {e}") from e
    return arrays


def _canonical_key(key: str) -> str:
    # SAELens renames Gemma Scope's lower-case w_enc/w_dec keys.
    return "W_" + key[2:] if key.startswith("w_") else key


def _float_array(npz_path: Path, data: np.lib.npyio.NpzFile, key: str) -> NDArray[Any]:
    try:
        array: NDArray[Any] = data[key]
    except ValueError as e:
        raise SaeFileError(
            npz_path,
            f"array {key!r}: holds pickled Python objects, refused (allow_pickle=False); "
            "expected a float array",
        ) from e
    if array.dtype.kind != "f":
        raise SaeFileError(
            npz_path, f"array {key!r}: expected a float array, found dtype {array.dtype}"
        )
    return array


def _hook_from_path(npz_path: Path, parts: tuple[str, ...], required: bool) -> str:
    joined = "/".join(parts)
    if "embedding" in parts and "-res" in joined:
        return "hook_embed"
    layer = next((m for p in reversed(parts) if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    if layer is not None:
        n = int(layer.group(1))
        if "-res" in joined:
            return f"blocks.{n}.hook_resid_post"
        if "-mlp" in joined:
            return f"blocks.{n}.hook_mlp_out"
        if "-att" in joined:
            return f"blocks.{n}.attn.hook_z"
    if not required:
        return ""
    raise SaeFileError(
        npz_path,
        "cannot tell the hook from the path (expected .../gemma-scope-*-res/layer_N/...): "
        "pass the hook explicitly",
    )
