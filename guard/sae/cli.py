"""``guard sae export`` and ``guard sae encode`` (``guard sae train`` and ``guard sae convert``,
which need torch: guard.training.cli and guard.training.convert)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import GuardError, InvalidInput
from guard.sae.export import export_artifact
from guard.sae.sae import open_sae


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add the ``sae`` command group to the ``guard`` CLI; returns its subcommands (``guard sae
    train`` is added there by :mod:`guard.training.cli`)."""
    sae = subparsers.add_parser(
        "sae",
        help="export SAEs to ONNX artifacts and encode activations offline",
        description="Work with sparse autoencoders: export them for the sidecar, or encode "
        "activation rows offline to check conventions against other tools.",
    )
    commands = sae.add_subparsers(dest="sae_command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export",
        help="write an ONNX artifact folder the sidecar loads",
        description="Export a SAELens folder, sparsify layer folder, Gemma Scope params.npz, "
        "folder from guard sae convert or artifact to an artifact folder (encoder.onnx, "
        "weights.safetensors, manifest.json), and print the encoder's accuracy against fp32 "
        "on sample rows.",
    )
    export.add_argument("source", metavar="SRC", type=Path, help="the SAE to export")
    export.add_argument("out", metavar="OUT", type=Path, help="artifact folder to create")
    export.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="encoder weight dtype: fp16 for GPUs, int8 for CPUs (default: %(default)s)",
    )
    export.add_argument(
        "--labels",
        type=Path,
        nargs="+",
        metavar="FILE",
        help='feature labels: a JSON object ({"12": "deception"}), or Neuronpedia explanation '
        "exports (batch-N.jsonl.gz or .jsonl files, or folders of them) kept for the SAE's "
        "neuronpedia_id",
    )
    export.add_argument(
        "--neuronpedia-id",
        metavar="MODEL/SOURCE",
        help="the SAE's Neuronpedia id (e.g. gemma-2-2b/20-gemmascope-res-16k), recorded in "
        "the manifest and used to pick its --labels records; default: the SAE's own "
        "(SAELens cfg neuronpedia_id, guard sae convert --neuronpedia-id)",
    )
    export.add_argument("--hook", help="hook name to record, overriding the one in the files")
    export.add_argument(
        "--sample",
        type=Path,
        metavar="X.npy",
        help="real activation rows [rows, d_in] for the accuracy report (default: synthetic rows)",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=_export)

    encode = commands.add_parser(
        "encode",
        help="encode activation rows from a .npy file",
        description="Encode activation rows with an SAE (any format) on ONNX Runtime, for "
        "debugging and conformance checks against other tools.",
    )
    encode.add_argument("source", metavar="SRC_OR_ARTIFACT", type=Path, help="the SAE to use")
    encode.add_argument(
        "--input", required=True, type=Path, metavar="X.npy", help="rows [rows, d_in]"
    )
    encode.add_argument(
        "--output",
        required=True,
        type=Path,
        metavar="ACTS.npy",
        help="feature activations to write",
    )
    encode.add_argument(
        "--recon", type=Path, metavar="RECON.npy", help="also write the reconstruction [rows, d_in]"
    )
    encode.add_argument(
        "--features",
        metavar="IDS",
        help="comma-separated feature ids to encode (default: all); not with --recon",
    )
    encode.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "int8"),
        default="auto",
        help="encoder dtype (default: %(default)s: an artifact's own, else fp32 on CPU)",
    )
    encode.add_argument(
        "--hook", help="hook name to report, overriding the files' (encoding needs none)"
    )
    encode.add_argument("--sha256", help="refuse to run unless the SAE has this sha256 (its "
                        "weights file; an artifact's manifest.json)")
    encode.set_defaults(func=_encode)
    return commands


def _export(args: argparse.Namespace) -> int:
    try:
        sample = _load_rows(args.sample) if args.sample is not None else None
        export_artifact(
            args.source,
            args.out,
            dtype=args.dtype,
            labels=args.labels,
            neuronpedia_id=args.neuronpedia_id,
            hook=args.hook,
            sample=sample,
            force=args.force,
            stream=sys.stderr,
        )
    except GuardError as e:
        return _fail(e)
    print(f"exported {args.source} to {args.out} ({args.dtype})")
    return 0


def _encode(args: argparse.Namespace) -> int:
    try:
        features = _feature_ids(args.features)
        if features is not None and args.recon is not None:
            raise InvalidInput("--recon needs all features: drop --features")
        x = _load_rows(args.input)
        # Encoding reads no hook: a params.npz outside Gemma Scope's layout needs no --hook.
        sae = open_sae(args.source, hook=args.hook, sha256=args.sha256, dtype=args.dtype,
                       require_hook=False)
        if x.shape[1] != sae.info.d_in:
            raise InvalidInput(
                f"{args.input}: expected rows of width d_in={sae.info.d_in}, found {x.shape[1]}"
            )
        acts = sae.encoder(features).encode(x)
        np.save(args.output, acts)
        if args.recon is not None:
            np.save(args.recon, sae.decode(acts, x))
    except GuardError as e:
        return _fail(e)
    print(f"encoded {x.shape[0]} rows into {acts.shape[1]} features: {args.output}")
    return 0


def _load_rows(path: Path) -> NDArray[np.float32]:
    try:
        raw: Any = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInput(f"{path}: cannot read a .npy array: {e}") from e
    if not isinstance(raw, np.ndarray) or raw.ndim != 2 or raw.dtype.kind != "f":
        shape = list(raw.shape) if isinstance(raw, np.ndarray) else type(raw).__name__
        raise InvalidInput(f"{path}: expected a float array [rows, d_in], found {shape}")
    return np.ascontiguousarray(raw, dtype=np.float32)


def _feature_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidInput(
            f"--features: expected comma-separated integers, found {text!r}"
        ) from None


def _fail(error: GuardError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1
