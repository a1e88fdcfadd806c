"""``guard sae train``: the command line of SAE training (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from guard.errors import GuardError
from guard.training.convert import register as register_convert


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``guard sae train`` and ``guard sae convert`` to the ``sae`` command group."""
    # Defaults live in guard.training.train.TrainSettings; that module imports torch, so the
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
    register_convert(commands)


def _train(args: argparse.Namespace) -> int:
    try:
        from guard.training.train import TrainingInterrupted, TrainSettings, train_sae
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
        print(f"error: {e}", file=sys.stderr)
        return 1
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


