"""``guard sae export``, ``guard sae encode`` and ``guard sae train``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import GuardError, InvalidInput
from guard.sae.export import export_artifact
from guard.sae.sae import open_sae


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sae`` command group to the ``guard`` CLI."""
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
        description="Export a SAELens folder, sparsify layer folder, Gemma Scope params.npz or "
        "artifact to an artifact folder (encoder.onnx, weights.safetensors, manifest.json), "
        "and print the encoder's accuracy against fp32 on sample rows.",
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
        metavar="FILE",
        help='JSON object of feature labels: {"12": "deception"}',
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
        "--hook", help="hook name, needed for a params.npz outside Gemma Scope's layout"
    )
    encode.add_argument("--sha256", help="refuse to run unless the SAE has this sha256 (its "
                        "weights file; an artifact's manifest.json)")
    encode.set_defaults(func=_encode)

    _register_train(commands)


def _register_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Defaults live in guard.sae.train.TrainSettings; that module imports torch, so the
    # parser repeats them rather than import it (the sidecar's CLI must stay torch-free).
    train = commands.add_parser(
        "train",
        help="train an SAE on SmolLM2's residual stream (needs torch and the host extra)",
        description="Train a sparse autoencoder (TopK, or ReLU with an L1 penalty) on "
        "blocks.L.hook_resid_post of SmolLM2-135M-Instruct over a text corpus (by default "
        "Wikipedia and news text from the gensim wheel, with chat-formatted prompts), and "
        "write a SAELens folder with a held-out quality report (report.json). Checkpoints go "
        "to OUT/checkpoint; --resume continues an interrupted run.",
    )
    train.add_argument("--layer", type=int, required=True, help="decoder layer L (0-based)")
    train.add_argument("--out", type=Path, required=True, help="SAELens folder to write")
    train.add_argument(
        "--architecture",
        choices=("topk", "relu"),
        default="topk",
        help="TopK, or ReLU with an L1 penalty (default: %(default)s)",
    )
    train.add_argument("--k", type=int, default=32, help="TopK: latents per row (default: 32)")
    train.add_argument(
        "--l1", type=float, default=5.0, help="ReLU: L1 coefficient on scaled inputs (default: 5.0)"
    )
    train.add_argument("--expansion", type=int, default=8, help="d_sae / d_in (default: 8)")
    train.add_argument(
        "--tokens",
        type=int,
        default=200_000,
        help="training rows to harvest, position 0 excluded (default: 200000)",
    )
    train.add_argument("--epochs", type=int, default=1, help="passes over them (default: 1)")
    train.add_argument(
        "--context", type=int, default=128, help="tokens per sequence (default: 128)"
    )
    train.add_argument("--batch-size", type=int, default=1024, help="rows per step (default: 1024)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    train.add_argument("--seed", type=int, default=0, help="(default: 0)")
    train.add_argument(
        "--dtype",
        choices=("fp16", "fp32"),
        default="fp16",
        help="saved weight dtype (default: %(default)s)",
    )
    train.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)"
    )
    train.add_argument(
        "--eval-tokens",
        type=int,
        default=16_384,
        help="held-out rows in the report (default: 16384)",
    )
    train.add_argument(
        "--chat-share",
        type=float,
        default=0.3,
        help="share of paragraphs wrapped as chat turns (default: 0.3)",
    )
    train.add_argument(
        "--corpus",
        type=Path,
        action="append",
        metavar="FILE",
        help="text corpus instead of the built-in one (repeatable): .txt with "
        "blank-line separated documents, or .jsonl with a 'text' field",
    )
    train.add_argument(
        "--checkpoint-every", type=int, default=200, help="steps between checkpoints (default: 200)"
    )
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="where checkpoints go (default: OUT/checkpoint)",
    )
    train.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep the checkpoint folder after a finished run",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint (same settings)"
    )
    train.add_argument(
        "--force", action="store_true", help="replace an SAE or an unfinished run in OUT"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)


def _export(args: argparse.Namespace) -> int:
    try:
        sample = _load_rows(args.sample) if args.sample is not None else None
        export_artifact(
            args.source,
            args.out,
            dtype=args.dtype,
            labels=args.labels,
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
        sae = open_sae(args.source, hook=args.hook, sha256=args.sha256, dtype=args.dtype)
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


def _train(args: argparse.Namespace) -> int:
    try:
        from guard.sae.train import TrainingInterrupted, TrainSettings, train_sae
    except ImportError as e:
        print(
            f"error: guard sae train needs torch and transformers ({e}); install the "
            "host extra: pip install 'activation-guard[host]'",
            file=sys.stderr,
        )
        return 1
    settings = TrainSettings(
        layer=args.layer,
        architecture=args.architecture,
        k=args.k,
        l1=args.l1,
        expansion=args.expansion,
        tokens=args.tokens,
        epochs=args.epochs,
        context=args.context,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dtype=args.dtype,
        eval_tokens=args.eval_tokens,
        chat_share=args.chat_share,
        checkpoint_every=args.checkpoint_every,
        corpus=tuple(str(p) for p in args.corpus or ()),
    )
    try:
        report = train_sae(
            settings,
            args.out,
            resume=args.resume,
            force=args.force,
            device=args.device,
            checkpoint_dir=args.checkpoint_dir,
            keep_checkpoint=args.keep_checkpoint,
            command=_train_command(args),
            progress=not args.quiet,
        )
    except TrainingInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first checkpoint (harvest) or after the last
        print(
            "error: interrupted; --resume continues from a checkpoint if one was written",
            file=sys.stderr,
        )
        return 130
    except GuardError as e:
        return _fail(e)
    held = report["heldout"]
    print(
        json.dumps(
            {
                "out": str(args.out),
                "hook_name": report["hook_name"],
                "d_sae": report["d_sae"],
                "heldout": held,
            },
            indent=2,
        )
    )
    return 0


def _train_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that decides the result)."""
    words = ["guard", "sae", "train", "--layer", str(args.layer), "--out", str(args.out)]
    for name in (
        "architecture",
        "k",
        "l1",
        "expansion",
        "tokens",
        "epochs",
        "context",
        "batch_size",
        "lr",
        "seed",
        "dtype",
        "device",
        "eval_tokens",
        "chat_share",
        "checkpoint_every",
    ):
        words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for path in args.corpus or ():
        words += ["--corpus", str(path)]
    return shlex.join(words)


def _load_rows(path: Path) -> NDArray[np.float32]:
    try:
        raw: Any = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
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
