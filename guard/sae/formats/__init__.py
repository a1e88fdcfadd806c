"""On-disk SAE formats: detection and one loader per format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from guard.errors import SaeFileError
from guard.sae.formats.artifact import (
    MANIFEST_FILE,
    Artifact,
    is_artifact_folder,
    load_artifact,
)
from guard.sae.formats.gemmascope import PARAMS_FILE, is_gemmascope_path, load_gemmascope
from guard.sae.formats.gemmascope2 import is_gemmascope2_path, load_gemmascope2, params_file
from guard.sae.formats.goodfire import WEIGHTS_FILE as GOODFIRE_WEIGHTS
from guard.sae.formats.goodfire import is_goodfire_folder, load_goodfire
from guard.sae.formats.llamascope import WEIGHTS_FILE as LLAMASCOPE_WEIGHTS
from guard.sae.formats.llamascope import is_llamascope_folder, load_llamascope
from guard.sae.formats.openai import WEIGHTS_FILE as OPENAI_WEIGHTS
from guard.sae.formats.openai import is_openai_folder, load_openai
from guard.sae.formats.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS
from guard.sae.formats.saelens import is_saelens_folder, load_saelens
from guard.sae.formats.sparsify import WEIGHTS_FILE as SPARSIFY_WEIGHTS
from guard.sae.formats.sparsify import is_sparsify_folder, load_sparsify
from guard.sae.formats.state_dict import pickle_files, refuse_pickle
from guard.sae.model import SaeModel

__all__ = ["Artifact", "identity_file", "load_any"]

Format = Literal["artifact", "saelens", "sparsify", "gemmascope", "openai", "goodfire",
                 "gemmascope2", "llamascope"]


def _detect(where: Path) -> Format:
    """Which format ``where`` holds, recognised by the files present (nothing parsed)."""
    if not where.exists():
        raise SaeFileError(where, "no such file or folder")
    if where.is_dir():
        if is_artifact_folder(where):
            return "artifact"
        if is_saelens_folder(where):
            return "saelens"
        if is_sparsify_folder(where):
            return "sparsify"
        if is_openai_folder(where):
            return "openai"
        if is_goodfire_folder(where):
            return "goodfire"
        if is_llamascope_folder(where):
            return "llamascope"
    if is_gemmascope_path(where):
        return "gemmascope"
    if is_gemmascope2_path(where):
        return "gemmascope2"
    pickles = pickle_files(where)
    if pickles:
        raise refuse_pickle(where, pickles)
    raise SaeFileError(
        where,
        "not a recognised SAE: expected an exported artifact (manifest.json), a SAELens folder "
        "(cfg.json + sae_weights.safetensors), a sparsify layer folder (cfg.json + "
        "sae.safetensors), a Gemma Scope params.npz, a Gemma Scope 2 params.safetensors, a "
        "Llama Scope folder (hyperparams.json + checkpoints/final.safetensors) or a folder "
        "written by guard sae convert (cfg.json + openai_sae.safetensors or "
        "goodfire_sae.safetensors)",
    )


def identity_file(path: str | os.PathLike[str]) -> tuple[Path, bool]:
    """The file whose sha256 is the SAE's identity (what a ``sha256`` pin must equal), and
    whether the SAE is an exported artifact (then the file is its ``manifest.json``).

    Found from the file names alone, as :func:`load_any` recognises the format, so that a pin
    can be checked on the raw bytes before anything is parsed."""
    where = Path(path)
    kind = _detect(where)
    if kind == "artifact":
        return where / MANIFEST_FILE, True
    if kind == "gemmascope2":
        return params_file(where), False
    if kind in _WEIGHTS_FILE:
        return where / _WEIGHTS_FILE[kind], False
    return (where if where.suffix == ".npz" else where / PARAMS_FILE), False


#: A folder format -> its weights file (the SAE's identity; see :func:`identity_file`).
_WEIGHTS_FILE: dict[str, str] = {
    "saelens": SAELENS_WEIGHTS, "sparsify": SPARSIFY_WEIGHTS, "openai": OPENAI_WEIGHTS,
    "goodfire": GOODFIRE_WEIGHTS, "llamascope": LLAMASCOPE_WEIGHTS,
}


def load_any(path: str | os.PathLike[str], hook: str | None = None, *,
             require_hook: bool = True, weights_sha256: str | None = None
             ) -> SaeModel | Artifact:
    """Load an exported artifact, a SAELens folder, a sparsify layer folder, a Gemma Scope
    ``params.npz`` or Gemma Scope 2 ``params.safetensors`` (or a folder holding one), a Llama
    Scope folder or a converted folder, recognised by the files present.

    ``require_hook=False``: an SAE whose files name no hook (a ``params.npz`` outside Gemma
    Scope's folder layout) loads with an empty hook name instead of an error; for encoding
    rows offline, which needs none. ``weights_sha256``: the sha256 of the weights file
    (:func:`identity_file`) when the caller has just computed it, so that a large file is not
    hashed twice (an artifact hashes its manifest itself)."""
    where = Path(path)
    kind = _detect(where)
    if kind == "artifact":
        return load_artifact(where, hook)
    if kind == "saelens":
        return load_saelens(where, hook, require_hook=require_hook, sha256=weights_sha256)
    if kind == "sparsify":
        return load_sparsify(where, hook, sha256=weights_sha256)
    if kind == "openai":
        return load_openai(where, hook, require_hook=require_hook, sha256=weights_sha256)
    if kind == "goodfire":
        return load_goodfire(where, hook, require_hook=require_hook, sha256=weights_sha256)
    if kind == "llamascope":
        return load_llamascope(where, hook, sha256=weights_sha256)
    if kind == "gemmascope2":
        return load_gemmascope2(where, hook, require_hook=require_hook, sha256=weights_sha256)
    return load_gemmascope(where, hook, require_hook=require_hook, sha256=weights_sha256)
