"""On-disk SAE formats: detection and one loader per format."""

from __future__ import annotations

import os
from pathlib import Path

from guard.errors import SaeFileError
from guard.sae.formats.artifact import Artifact, is_artifact_folder, load_artifact
from guard.sae.formats.gemmascope import is_gemmascope_path, load_gemmascope
from guard.sae.formats.saelens import is_saelens_folder, load_saelens
from guard.sae.formats.sparsify import is_sparsify_folder, load_sparsify
from guard.sae.model import SaeModel

__all__ = ["Artifact", "load_any"]


def load_any(path: str | os.PathLike[str], hook: str | None = None, *,
             require_hook: bool = True) -> SaeModel | Artifact:
    """Load an exported artifact, a SAELens folder, a sparsify layer folder or a Gemma Scope
    ``params.npz`` (or a folder holding one), recognised by the files present.

    ``require_hook=False``: an SAE whose files name no hook (a ``params.npz`` outside Gemma
    Scope's folder layout) loads with an empty hook name instead of an error; for encoding
    rows offline, which needs none."""
    where = Path(path)
    if not where.exists():
        raise SaeFileError(where, "no such file or folder")
    if where.is_dir():
        if is_artifact_folder(where):
            return load_artifact(where, hook)
        if is_saelens_folder(where):
            return load_saelens(where, hook, require_hook=require_hook)
        if is_sparsify_folder(where):
            return load_sparsify(where, hook)
    if is_gemmascope_path(where):
        return load_gemmascope(where, hook, require_hook=require_hook)
    raise SaeFileError(
        where,
        "not a recognised SAE: expected an exported artifact (manifest.json), a SAELens folder "
        "(cfg.json + sae_weights.safetensors), a sparsify layer folder (cfg.json + "
        "sae.safetensors) or a Gemma Scope params.npz",
    )
