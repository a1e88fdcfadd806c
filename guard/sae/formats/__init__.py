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
from guard.sae.formats.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS
from guard.sae.formats.saelens import is_saelens_folder, load_saelens
from guard.sae.formats.sparsify import WEIGHTS_FILE as SPARSIFY_WEIGHTS
from guard.sae.formats.sparsify import is_sparsify_folder, load_sparsify
from guard.sae.model import SaeModel

__all__ = ["Artifact", "identity_file", "load_any"]

Format = Literal["artifact", "saelens", "sparsify", "gemmascope"]


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
    if is_gemmascope_path(where):
        return "gemmascope"
    raise SaeFileError(
        where,
        "not a recognised SAE: expected an exported artifact (manifest.json), a SAELens folder "
        "(cfg.json + sae_weights.safetensors), a sparsify layer folder (cfg.json + "
        "sae.safetensors) or a Gemma Scope params.npz",
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
    if kind == "saelens":
        return where / SAELENS_WEIGHTS, False
    if kind == "sparsify":
        return where / SPARSIFY_WEIGHTS, False
    return (where if where.suffix == ".npz" else where / PARAMS_FILE), False


def load_any(path: str | os.PathLike[str], hook: str | None = None, *,
             require_hook: bool = True, weights_sha256: str | None = None
             ) -> SaeModel | Artifact:
    """Load an exported artifact, a SAELens folder, a sparsify layer folder or a Gemma Scope
    ``params.npz`` (or a folder holding one), recognised by the files present.

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
    return load_gemmascope(where, hook, require_hook=require_hook, sha256=weights_sha256)
