"""Exported artifact folders: what ``guard sae export`` writes and the sidecar loads.

Layout::

    manifest.json        what the SAE is (hook, sizes, architecture, source sha256, dtype,
                         labels) and the sha256 of every other file here
    encoder.onnx         the full encoder graph in the artifact's weight dtype
    weights.safetensors  canonical float32 parameters: the encoder's (for building subset
                         encoders) and the decoder's (W_dec, b_dec, optional W_skip), read
                         memory-mapped so steering can fetch a few decoder rows cheaply

Every file the manifest lists is hashed once at load and checked against the sha256 it
records there: an artifact whose files changed after export is refused, pin or no pin.

A transcoder's manifest also records its decoder side, ``d_out`` and ``hook_name_out`` (the
hook its decoder writes; ``W_dec`` is ``[d_sae, d_out]``), under ``format_version`` 2 so that
guards which predate transcoders refuse it.

Identity and pins: an artifact *is* its manifest. Its sha256 (:attr:`Artifact.sha256`, what
``saes[].sha256`` must equal, what ``guard sae export`` prints and what ``Describe``, decision
logs and spans report) is the sha256 of ``manifest.json``'s bytes (``sha256sum
manifest.json``). The manifest records the sha256 of every other file and everything else the
artifact serves (hook, architecture and its config, input normalisation, labels), so that one
digest covers it all: swapping ``encoder.onnx`` or ``weights.safetensors`` either fails the
file check or, with the manifest's hashes rewritten to match, changes the manifest's digest.
The manifest's ``sha256`` field (the weights the artifact was exported from) is lineage only:
it is a claim anyone editing the folder can copy, so it is not accepted as a pin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures.base import FloatArray
from guard.sae.formats.fields import positive_int
from guard.sae.model import (
    INPUT_NORMALIZATIONS,
    Decoder,
    SaeModel,
    SourceFormat,
)
from guard.sae.neuronpedia import neuronpedia_id_field
from guard.sae.registry import get_architecture, known_architectures
from guard.sae.safetensors import SafetensorsFile, sha256_of_files, write_safetensors

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_NAME = "activation-guard-sae"
FORMAT_VERSION = 1
#: The version of a transcoder's artifact (its manifest adds ``d_out`` and ``hook_name_out``):
#: a guard that knows only version 1 refuses it rather than serve it as an SAE, whose decoder
#: rows would then steer the hook it reads.
TRANSCODER_FORMAT_VERSION = 2
WEIGHT_DTYPES = ("fp32", "fp16", "int8")
_SOURCE_FORMATS = tuple(f for f in get_args(SourceFormat) if f != "artifact")
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded artifact: the canonical SAE plus what only artifacts carry."""

    folder: Path
    model: SaeModel
    """``source_format`` is the format the SAE was exported from."""
    weight_dtype: str
    feature_labels: dict[int, str]
    encoder_path: Path
    manifest: dict[str, Any]
    sha256: str
    """The artifact's identity and what a pin of it must equal: the sha256 of ``manifest.json``
    (see the module docstring). ``model.sha256`` is the source weights' (lineage only)."""
    files: Mapping[str, str]
    """The sha256 of each file the manifest lists, as verified at load."""


def is_artifact_folder(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def load_artifact(folder: Path, hook: str | None = None) -> Artifact:
    manifest_path = folder / MANIFEST_FILE
    manifest, digest = _read_manifest(manifest_path)
    if manifest.get("format") != FORMAT_NAME:
        raise SaeFileError(
            manifest_path,
            f"field 'format': expected {FORMAT_NAME!r}, found {manifest.get('format')!r}",
        )
    version = manifest.get("format_version")
    if version not in (FORMAT_VERSION, TRANSCODER_FORMAT_VERSION) or isinstance(version, bool):
        raise SaeFileError(
            manifest_path,
            f"field 'format_version': expected {FORMAT_VERSION} (or {TRANSCODER_FORMAT_VERSION} "
            f"for a transcoder), found {version!r} (exported by another guard version: "
            "re-export)",
        )
    files = _verify_files(folder, manifest_path, manifest)
    d_in = positive_int(manifest_path, manifest, "d_in")
    d_sae = positive_int(manifest_path, manifest, "d_sae")
    arch_name = manifest.get("architecture")
    arch_cls = get_architecture(arch_name) if isinstance(arch_name, str) else None
    if arch_cls is None:
        raise SaeFileError(
            manifest_path,
            f"field 'architecture': unknown architecture {arch_name!r}; known: "
            + ", ".join(known_architectures()),
        )
    arch_config = manifest.get("architecture_config")
    if not isinstance(arch_config, dict):
        raise SaeFileError(manifest_path, "missing field 'architecture_config': expected an object")
    config = arch_cls.config_type.from_dict({**arch_config, "d_in": d_in, "d_sae": d_sae})
    normalization = manifest.get("input_normalization")
    if normalization not in INPUT_NORMALIZATIONS:
        raise SaeFileError(
            manifest_path,
            f"field 'input_normalization': expected one of {list(INPUT_NORMALIZATIONS)}, "
            f"found {normalization!r}",
        )
    source_format = manifest.get("source_format")
    if source_format not in _SOURCE_FORMATS:
        raise SaeFileError(
            manifest_path,
            f"field 'source_format': expected one of {list(_SOURCE_FORMATS)}, "
            f"found {source_format!r}",
        )
    weight_dtype = manifest.get("weight_dtype")
    if weight_dtype not in WEIGHT_DTYPES:
        raise SaeFileError(
            manifest_path,
            f"field 'weight_dtype': expected one of {list(WEIGHT_DTYPES)}, found {weight_dtype!r}",
        )
    if not isinstance(manifest.get("hook_name"), str):
        raise SaeFileError(manifest_path, "missing field 'hook_name': expected a string")
    source_sha256 = manifest.get("sha256")
    if not isinstance(source_sha256, str) or not _DIGEST.fullmatch(source_sha256):
        raise SaeFileError(
            manifest_path,
            f"field 'sha256': expected the source weights' sha256 (64 lowercase hex "
            f"characters), found {source_sha256!r}",
        )

    hook_name_out: str | None = None
    d_out = d_in
    if version == TRANSCODER_FORMAT_VERSION:
        d_out = positive_int(manifest_path, manifest, "d_out")
        hook_name_out = manifest.get("hook_name_out")
        if not isinstance(hook_name_out, str):
            raise SaeFileError(
                manifest_path,
                f"field 'hook_name_out': expected the transcoder's output hook (a string), "
                f"found {hook_name_out!r}",
            )

    weights_path = folder / WEIGHTS_FILE
    weights = SafetensorsFile(weights_path)
    shapes = arch_cls.param_shapes(config)
    shapes.update({"W_dec": (d_sae, d_out), "b_dec": (d_out,)})
    if manifest.get("skip_connection"):
        shapes["W_skip"] = (d_out, d_in)
    params: dict[str, FloatArray] = {}
    for name, shape in shapes.items():
        array = weights.raw(name)
        if tuple(array.shape) != shape or weights.entries[name].dtype != "F32":
            raise SaeFileError(
                weights_path,
                f"tensor {name!r}: expected F32 {list(shape)}, found {weights.entries[name].dtype} "
                f"{list(array.shape)}",
            )
        # Memory-mapped: the hashes above vouch for the values, and pages load on first use.
        params[name] = array
    decoder = Decoder(params.pop("W_dec"), params.pop("b_dec"), params.pop("W_skip", None),
                      hook_name_out)
    model = SaeModel(
        architecture=arch_cls(config, params),
        normalization=normalization,
        decoder=decoder,
        hook_name=hook or manifest["hook_name"],
        source_format=cast(SourceFormat, source_format),
        sha256=source_sha256,
        weights_file=manifest_path,
        neuronpedia_id=neuronpedia_id_field(manifest_path, manifest.get("neuronpedia_id")),
    )
    return Artifact(
        folder=folder,
        model=model,
        weight_dtype=weight_dtype,
        feature_labels=_labels(manifest_path, manifest.get("feature_labels", {}), d_sae),
        encoder_path=folder / ENCODER_FILE,
        manifest=manifest,
        sha256=digest,
        files=files,
    )


def _read_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The manifest and the sha256 of its bytes, from a single read: what is hashed is what
    is parsed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SaeFileError(path, f"cannot read file: {e.strerror or e}") from e
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SaeFileError(
            path, f"not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    except json.JSONDecodeError as e:
        raise SaeFileError(path, f"not valid JSON: {e}") from e
    except RecursionError as e:  # nesting deeper than Python's recursion limit
        raise SaeFileError(path, "not valid JSON: nested too deeply") from e
    if not isinstance(value, dict):
        raise SaeFileError(path, f"expected a JSON object, found {type(value).__name__}")
    return value, hashlib.sha256(data).hexdigest()


#: Largest manifest read only to explain a wrong pin (manifests with labels are megabytes).
_HINT_MAX_BYTES = 64 << 20


def recorded_source_sha256(manifest_path: Path) -> str | None:
    """The ``sha256`` field of a manifest (the weights it records it was exported from), to
    explain a wrong pin; None when unreadable, not a manifest, or too large to bother."""
    try:
        if manifest_path.stat().st_size > _HINT_MAX_BYTES:
            return None
        value = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    recorded = value.get("sha256") if isinstance(value, dict) else None
    return recorded if isinstance(recorded, str) else None


def _verify_files(folder: Path, manifest_path: Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Hash every file ``manifest["files"]`` lists (once, 1 MiB reads: about as long as reading
    them) and check it against the recorded sha256; returns the verified hashes."""
    files = manifest.get("files")
    if not isinstance(files, dict) or ENCODER_FILE not in files or WEIGHTS_FILE not in files:
        raise SaeFileError(
            manifest_path,
            f"field 'files': expected the sha256 of {ENCODER_FILE} and {WEIGHTS_FILE}, "
            f"found {files!r}",
        )
    verified: dict[str, str] = {}
    for name, expected in files.items():
        if name in ("", ".", "..", MANIFEST_FILE) or "/" in name or "\\" in name:
            raise SaeFileError(
                manifest_path,
                f"field 'files': expected names of files next to {MANIFEST_FILE}, found {name!r}",
            )
        if not isinstance(expected, str) or not _DIGEST.fullmatch(expected):
            raise SaeFileError(
                manifest_path,
                f"field 'files.{name}': expected a sha256 (64 lowercase hex characters), "
                f"found {expected!r}",
            )
        path = folder / name
        if not path.is_file():
            raise SaeFileError(path, f"file listed in {MANIFEST_FILE} is missing")
        found = sha256_of_files([path])
        if found != expected:
            raise SaeFileError(
                path,
                f"sha256 expected {expected} (from {MANIFEST_FILE}), found {found}: the file "
                "changed after export",
            )
        verified[name] = found
    return verified


def verify_file(path: Path, expected: str) -> None:
    """Hash ``path`` again and check it against the sha256 verified at load (for a file read
    long after load, such as the prebuilt ``encoder.onnx``)."""
    found = sha256_of_files([path])
    if found != expected:
        raise SaeFileError(
            path,
            f"sha256 expected {expected} (verified at load, from {MANIFEST_FILE}), found {found}: "
            "the file changed while the SAE was open",
        )


def _labels(path: Path, raw: object, d_sae: int) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise SaeFileError(path, f"field 'feature_labels': expected an object, found {raw!r}")
    return parse_feature_labels(path, raw, d_sae)


def parse_feature_labels(path: Path, raw: Mapping[str, Any], d_sae: int) -> dict[int, str]:
    """``{"12": "deception"}`` as ``{12: "deception"}``, ids checked against ``d_sae``."""
    labels: dict[int, str] = {}
    for key, label in raw.items():
        try:
            feature = int(key)
        except ValueError:
            raise SaeFileError(path, f"feature label key {key!r}: expected a feature id") from None
        if not 0 <= feature < d_sae:
            raise SaeFileError(path, f"feature label key {key!r}: expected an id in [0, {d_sae})")
        if not isinstance(label, str):
            raise SaeFileError(path, f"feature label {key!r}: expected a string, found {label!r}")
        labels[feature] = label
    return labels


def write_artifact(
    folder: Path,
    model: SaeModel,
    encoder_bytes: bytes,
    *,
    weight_dtype: str,
    feature_labels: Mapping[int, str],
    accuracy: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the three files into an existing empty ``folder``; returns the manifest."""
    (folder / ENCODER_FILE).write_bytes(encoder_bytes)
    tensors: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = dict(model.architecture.params)
    tensors["W_dec"] = model.decoder.w_dec
    tensors["b_dec"] = model.decoder.b_dec
    if model.decoder.w_skip is not None:
        tensors["W_skip"] = model.decoder.w_skip
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    config = model.architecture.config.to_dict()
    transcoder = model.decoder.is_transcoder
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": TRANSCODER_FORMAT_VERSION if transcoder else FORMAT_VERSION,
        "hook_name": model.hook_name,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        # A transcoder's decoder side: what it writes, and where.
        **({"d_out": model.decoder.d_out, "hook_name_out": model.decoder.hook_name_out}
           if transcoder else {}),
        "architecture": model.architecture.name,
        "architecture_config": {k: v for k, v in config.items() if k not in ("d_in", "d_sae")},
        "input_normalization": model.normalization,
        "skip_connection": model.decoder.w_skip is not None,
        "source_format": model.source_format,
        "sha256": model.sha256,
        "weight_dtype": weight_dtype,
        "feature_labels": {str(k): v for k, v in sorted(feature_labels.items())},
        # Only when known, so that the manifest (the artifact's identity) of an SAE without
        # one is what earlier versions wrote.
        **({"neuronpedia_id": model.neuronpedia_id} if model.neuronpedia_id else {}),
        "accuracy_vs_fp32": dict(accuracy),
        "files": {name: sha256_of_files([folder / name]) for name in (ENCODER_FILE, WEIGHTS_FILE)},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
