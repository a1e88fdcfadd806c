"""``guard sae train``: train a sparse autoencoder on one layer's residual stream.

The recipe (TopK, Gao et al. 2024, as EleutherAI sparsify and SAELens train it; ReLU with an
L1 penalty, Anthropic's April 2024 update, as the alternative):

1. Text: the built-in corpus (``guard.training.corpus``) or the user's files, split by document
   into training and held-out text; a share of it wrapped as chat turns.
2. Activations: ``blocks.L.hook_resid_post`` (the output of decoder layer ``L``, which is
   ``output_hidden_states[L + 1]`` in transformers), harvested once into memory; the forward
   pass stops after layer ``L``. Position 0 is never used: its residual norm is about 100x
   the others (an attention sink), and a dictionary fitted to it would waste features. Nor
   is any other row whose norm exceeds ``outlier_factor`` times the median (the same sink
   forms on the first tokens of a run of repeated tokens, such as "0000" in a table): two
   such rows in 4,096 carried 96% of the variance and made the variance explained a
   measure of them alone. Their count is reported.
3. Scale: rows are multiplied by ``s = sqrt(d_in) / mean |x|`` so the mean norm is
   ``sqrt(d_in)`` (SAELens ``expected_average_only_in``); the loss and the L1 coefficient mean
   the same on every model.
4. Train: decoder rows unit norm (the gradient part parallel to each row removed before the
   step, rows renormalised after it), ``b_dec`` initialised to the per-dimension median,
   encoder initialised to the decoder's transpose, Adam with warm-up and a linear decay over
   the last fifth. TopK adds the AuxK loss: the residual error reconstructed from the top
   ``aux_k`` latents that have not fired for ``dead_after`` rows, weight 1/32.
   The TopK backward pass is written out: every gradient except the encoder matmul touches
   only the ``k`` selected latents per row: a third of the matmul work autograd would do.
5. Save: SAELens format with ``s`` folded into the weights (SAELens
   ``fold_activation_norm_scaling_factor``) and ``normalize_activations: none``, so every
   SAELens reader encodes raw activations correctly; ``report.json`` keeps ``s``.
6. Report on held-out text: fraction of variance explained, normalised MSE, mean L0, dead
   features, and the model's next-token loss clean, with the SAE spliced in, and with the
   layer's output zeroed (for the fraction of loss recovered); the SAE evaluated is the saved
   one (after the fp16 rounding).

Checkpoints (``OUT/checkpoint/``, or ``--checkpoint-dir``) hold the harvested rows and the
training state; ``--resume`` continues from the last one, and Ctrl-C writes one before it
stops. Host side only: imports torch and transformers, never imported by the sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

# tqdm comes with transformers and has no type information: typed through `_progress`.
from tqdm import tqdm  # type: ignore[import-untyped]

from guard.errors import GuardError, InvalidInput
from guard.sae.formats.saelens import CFG_FILE, WEIGHTS_FILE
from guard.training import corpus

ArchitectureName = Literal["topk", "relu"]
SaveDtype = Literal["fp16", "fp32"]

MODEL_NAME = "SmolLM2-135M-Instruct"
REPORT_FILE = "report.json"
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_ROWS = "train_rows.pt"
_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {"fp16": "float16", "fp32": "float32"}


class TrainingInterrupted(GuardError):
    """Training stopped before the end (Ctrl-C); a checkpoint was written."""

    code = "CANCELLED"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained SAE (recorded in ``report.json``)."""

    layer: int
    """Decoder layer whose output (``blocks.L.hook_resid_post``) the SAE reads."""
    architecture: ArchitectureName = "topk"
    """``topk`` (keep the k largest latents) or ``relu`` (ReLU with an L1 penalty)."""
    k: int = 32
    """TopK: latents kept per row."""
    l1: float = 5.0
    """ReLU: L1 coefficient on the latents (decoder rows are unit norm, inputs scaled)."""
    expansion: int = 8
    """d_sae = expansion * d_in."""
    tokens: int = 200_000
    """Activation rows harvested for training (position 0 excluded)."""
    epochs: int = 1
    """Passes over the harvested rows."""
    context: int = 128
    """Tokens per sequence."""
    batch_size: int = 1024
    """Rows per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate (after warm-up, before the final decay)."""
    seed: int = 0
    """Seeds the split, the chat wrapping, the row order and the initial weights."""
    dtype: SaveDtype = "fp16"
    """dtype of the saved weights (training is always fp32)."""
    eval_tokens: int = 16_384
    """Held-out rows for the final report."""
    chat_share: float = 0.3
    """Share of paragraphs wrapped as chat turns with the tokenizer's template."""
    heldout_fraction: float = 0.05
    """Share of documents held out."""
    aux_k: int = 256
    """TopK: dead latents used by the AuxK loss."""
    aux_alpha: float = 1.0 / 32.0
    """TopK: weight of the AuxK loss."""
    dead_after: int = 200_000
    """A latent that has not fired for this many training rows counts as dead (AuxK)."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    outlier_factor: float = 10.0
    """Rows with a norm above this multiple of the median row norm (attention-sink rows) are
    left out of training and evaluation, and kept as they are when the SAE is spliced in."""
    corpus: tuple[str, ...] = ()
    """Text files (``.txt``: blank-line separated documents; ``.jsonl``: a ``text`` field);
    empty for the built-in corpus."""

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def check(self, n_layers: int) -> None:
        """Raise :class:`InvalidInput` naming the first setting out of range."""
        checks: list[tuple[bool, str]] = [
            (0 <= self.layer < n_layers, f"--layer: expected 0..{n_layers - 1}"),
            (self.k >= 1, "--k: expected at least 1"),
            (self.l1 >= 0, "--l1: expected a non-negative number"),
            (self.expansion >= 1, "--expansion: expected at least 1"),
            (self.tokens >= self.batch_size, "--tokens: expected at least --batch-size"),
            (self.epochs >= 1, "--epochs: expected at least 1"),
            (self.context >= 8, "--context: expected at least 8"),
            (self.batch_size >= 1, "--batch-size: expected at least 1"),
            (self.lr > 0, "--lr: expected a positive number"),
            (self.eval_tokens >= 1, "--eval-tokens: expected at least 1"),
            (0 <= self.chat_share <= 1, "--chat-share: expected 0..1"),
            (0 < self.heldout_fraction < 1, "heldout_fraction: expected 0..1"),
            (self.checkpoint_every >= 1, "--checkpoint-every: expected at least 1"),
            (self.outlier_factor > 1, "outlier_factor: expected more than 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(f"{message}, found {self._value_for(message)}")

    def _value_for(self, message: str) -> Any:
        name = message.split(":", 1)[0].lstrip("-").replace("-", "_")
        return getattr(self, name, "?")


@dataclasses.dataclass
class SaeState:
    """The SAE being trained, in the scaled space (rows multiplied by ``scale``).

    ``encoder`` is ``[d_sae, d_in]`` (nn.Linear layout); SAELens's ``W_enc`` is its transpose.
    """

    encoder: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    scale: float
    architecture: ArchitectureName
    k: int

    def parameters(self) -> list[Tensor]:
        return [self.encoder, self.b_enc, self.W_dec, self.b_dec]

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``[rows, d_sae]`` of raw (unscaled) rows, as training computes them."""
        pre = (x * self.scale - self.b_dec) @ self.encoder.T + self.b_enc
        if self.architecture == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, indices, values.clamp_min(0))

    def decode(self, acts: Tensor) -> Tensor:
        """Raw-space reconstruction of dense latents."""
        return (acts @ self.W_dec + self.b_dec) / self.scale

    def saelens_tensors(self, dtype: SaveDtype) -> dict[str, Tensor]:
        """SAELens tensors with the scale folded in: ``W_enc * s``, ``W_dec / s``, ``b_dec / s``."""
        s = self.scale
        tensors = {
            "W_enc": self.encoder.T * s,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
        }
        return {
            name: t.detach().to("cpu", _TORCH_DTYPES[dtype]).contiguous()
            for name, t in tensors.items()
        }


@dataclasses.dataclass(frozen=True)
class SavedSae:
    """An SAE as saved (SAELens tensors, read back as fp32): what the report evaluates."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    architecture: ArchitectureName
    k: int

    @classmethod
    def of(cls, tensors: dict[str, Tensor], architecture: ArchitectureName, k: int) -> SavedSae:
        f32 = {name: t.float() for name, t in tensors.items()}
        return cls(f32["W_enc"], f32["b_enc"], f32["W_dec"], f32["b_dec"], architecture, k)

    def to(self, device: torch.device) -> SavedSae:
        return dataclasses.replace(
            self, **{n: getattr(self, n).to(device) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        )

    def encode(self, x: Tensor) -> Tensor:
        """SAELens: ``act((x - b_dec) @ W_enc + b_enc)``."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.architecture == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, indices, values.clamp_min(0))

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Token sequences of one split, with what they were made of."""

    ids: list[list[int]]
    documents: int
    chat_sequences: int

    @property
    def rows(self) -> int:
        """Activation rows they give (every position but the first)."""
        return sum(len(s) - 1 for s in self.ids)


# ---------------------------------------------------------------------------------------------
# Entry point


def train_sae(
    settings: TrainSettings,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    keep_checkpoint: bool = False,
    command: str = "",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Train, save the SAELens folder and ``report.json`` into ``out``; return the report.

    ``on_step(step)`` runs after every optimiser step (tests interrupt through it).
    ``model_and_tokenizer`` defaults to :func:`guard.models.smollm2.load_smollm2`.
    """
    started = time.monotonic()
    checkpoints = checkpoint_dir if checkpoint_dir is not None else out / "checkpoint"
    torch_device = _device(device)
    if model_and_tokenizer is None:
        from guard.models.smollm2 import load_smollm2

        model_and_tokenizer = load_smollm2()
    model, tokenizer = model_and_tokenizer
    settings.check(len(_decoder_layers(model)))
    _prepare_out(out, checkpoints, resume=resume, force=force)
    model.to(torch_device)

    state_path = checkpoints / CHECKPOINT_STATE
    checkpoint = _load_checkpoint(state_path, settings) if resume else None
    train_seq, heldout_seq, corpus_info = _sequences(settings, tokenizer)

    rows_path = checkpoints / CHECKPOINT_ROWS
    harvest_seconds = 0.0
    if checkpoint is not None and rows_path.is_file():
        stored = torch.load(rows_path, map_location="cpu", weights_only=True)
        rows, max_norm, excluded = stored["rows"], stored["max_norm"], stored["excluded"]
    else:
        t0 = time.monotonic()
        rows = harvest(
            model,
            train_seq.ids,
            settings.layer,
            settings.tokens,
            batch_size=16,
            device=torch_device,
            progress=progress,
            what="harvest",
        )
        harvest_seconds = time.monotonic() - t0
        norms = rows.float().norm(dim=1)
        max_norm = float(norms.median()) * settings.outlier_factor
        keep = norms <= max_norm
        rows, excluded = rows[keep], int((~keep).sum())
        checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"rows": rows, "max_norm": max_norm, "excluded": excluded}, rows_path)
    if rows.shape[0] < settings.batch_size:
        raise InvalidInput(
            f"the corpus gave {rows.shape[0]} training rows, fewer than --batch-size "
            f"{settings.batch_size}: lower it or add text"
        )

    trainer = Trainer(settings, rows, torch_device, checkpoints, checkpoint)
    if checkpoint is not None:
        harvest_seconds = float(checkpoint.get("harvest_seconds", 0.0))
    trainer.harvest_seconds = harvest_seconds
    trainer.run(progress=progress, on_step=on_step)

    tensors = trainer.state.saelens_tensors(settings.dtype)
    saved = SavedSae.of(tensors, settings.architecture, settings.k)
    heldout = evaluate(
        model,
        saved.to(torch_device),
        heldout_seq.ids,
        settings.layer,
        settings.eval_tokens,
        max_norm=max_norm,
        device=torch_device,
        progress=progress,
    )
    report = {
        "hook_name": settings.hook_name,
        "model_name": MODEL_NAME,
        "architecture": settings.architecture,
        "d_in": int(rows.shape[1]),
        "d_sae": int(trainer.state.encoder.shape[0]),
        "k": settings.k if settings.architecture == "topk" else None,
        "weights_dtype": settings.dtype,
        "heldout": heldout,
        "training": {
            **trainer.summary(),
            "harvest_seconds": round(harvest_seconds, 1),
            "outlier_rows_excluded": excluded,
            "outlier_max_norm": max_norm,
            "wall_seconds": round(time.monotonic() - started, 1),
            "device": str(torch_device),
            "threads": torch.get_num_threads(),
        },
        "corpus": corpus_info,
        "norm_scaling_factor": trainer.state.scale,
        "command": command,
        "settings": dataclasses.asdict(settings),
        "versions": _versions(),
    }
    write_saelens(out, tensors, settings, trainer.state.scale, int(rows.shape[1]))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if not keep_checkpoint:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return report


def _prepare_out(out: Path, checkpoints: Path, *, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out}: exists and is not a folder")
    if resume:
        if not (checkpoints / CHECKPOINT_STATE).is_file():
            raise InvalidInput(
                f"{checkpoints / CHECKPOINT_STATE}: no checkpoint to resume from; run without "
                "--resume to start"
            )
        return
    if (checkpoints / CHECKPOINT_STATE).is_file() and not force:
        raise InvalidInput(
            f"{checkpoints}: a checkpoint of an unfinished run is there; pass --resume to "
            "continue it or --force to start over"
        )
    if (out / CFG_FILE).exists() and not force:
        raise InvalidInput(f"{out}: already holds an SAE ({CFG_FILE}); pass --force to replace it")
    if force:
        shutil.rmtree(checkpoints, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: torch sees no CUDA device (a CPU build, or no GPU)")
    if name not in ("cpu", "cuda"):
        raise InvalidInput(f"--device: expected cpu or cuda, found {name!r}")
    return torch.device(name)


def _versions() -> dict[str, str]:
    import transformers

    from guard import __version__

    return {
        "guard": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Text to token sequences


def _sequences(
    settings: TrainSettings, tokenizer: Any
) -> tuple[Sequences, Sequences, dict[str, Any]]:
    if settings.corpus:
        documents = [d for path in settings.corpus for d in corpus.text_file_documents(Path(path))]
    else:
        from guard.models.smollm2 import cache_dir

        documents = corpus.builtin_documents(cache_dir())
    train_docs, heldout_docs = corpus.split_documents(
        documents, settings.heldout_fraction, settings.seed
    )
    train = tokenize_documents(train_docs, tokenizer, settings, seed=settings.seed)
    heldout = tokenize_documents(heldout_docs, tokenizer, settings, seed=settings.seed + 1)
    sources: dict[str, int] = {}
    for d in documents:
        sources[d.source] = sources.get(d.source, 0) + 1
    info = {
        "source": list(settings.corpus) or ["gensim wheel: enwiki shortened", "lee_background"],
        "documents": sources,
        "train": {
            "documents": train.documents,
            "sequences": len(train.ids),
            "chat_sequences": train.chat_sequences,
            "rows_available": train.rows,
        },
        "heldout": {
            "documents": heldout.documents,
            "sequences": len(heldout.ids),
            "chat_sequences": heldout.chat_sequences,
            "rows_available": heldout.rows,
        },
    }
    return train, heldout, info


def tokenize_documents(
    documents: Sequence[corpus.Document], tokenizer: Any, settings: TrainSettings, *, seed: int
) -> Sequences:
    """Sequences of at most ``context`` tokens, in a seeded random order: each document's
    plain paragraphs packed into windows, and each paragraph picked for chat (with
    probability ``chat_share``) as one chat-formatted sequence of its own."""
    rng = random.Random(seed)
    plain: list[str] = []
    chats: list[str] = []
    for document in documents:
        kept: list[str] = []
        for paragraph in document.text.split("\n\n"):
            if rng.random() < settings.chat_share:
                part = corpus.Document(document.source, document.title, paragraph)
                chats.append(corpus.chat_text(part, tokenizer, rng))
            else:
                kept.append(paragraph)
        if kept:
            plain.append("\n\n".join(kept))
    sequences: list[list[int]] = []
    window = settings.context
    for ids in _token_ids(tokenizer, plain):
        sequences.extend(ids[i : i + window] for i in range(0, len(ids), window))
    chat_ids = [ids[:window] for ids in _token_ids(tokenizer, chats)]
    sequences.extend(chat_ids)
    sequences = [s for s in sequences if len(s) >= 8]
    rng.shuffle(sequences)
    return Sequences(sequences, len(documents), len(chat_ids))


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # The chat template already carries the special tokens; plain text gets none.
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in encoded]


# ---------------------------------------------------------------------------------------------
# The model: harvesting rows and splicing the SAE in


class _StopForward(Exception):
    """Raised by a hook once layer L ran: the rest of the model is not needed."""


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InvalidInput(
            f"{type(model).__name__}: expected a decoder model with model.layers "
            "(Llama-like transformers models)"
        )
    return layers


def _layer_output(output: Any) -> Tensor:
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, Tensor):
        raise InvalidInput(f"decoder layer output: expected a tensor, found {type(hidden)}")
    return hidden


@contextmanager
def _hook(layer: torch.nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    handle = layer.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _take(sequences: Sequence[list[int]], max_rows: int) -> list[list[int]]:
    """The first sequences that give ``max_rows`` rows, longest first: batches of equal
    lengths need no padding, and a batch without padding runs without a mask (faster)."""
    taken: list[list[int]] = []
    rows = 0
    for s in sequences:
        if rows >= max_rows:
            break
        taken.append(s)
        rows += len(s) - 1
    return sorted(taken, key=len, reverse=True)


def _batches(
    sequences: Sequence[list[int]], batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids, attention_mask) right-padded batches."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        yield ids.to(device), mask.to(device)


def _mask_or_none(mask: Tensor) -> Tensor | None:
    return None if bool(mask.all()) else mask


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        unit_scale=True,
    )


@torch.no_grad()
def harvest(
    model: Any,
    sequences: Sequence[list[int]],
    layer: int,
    max_rows: int,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    what: str = "harvest",
) -> Tensor:
    """Rows ``[n, d_in]`` (fp16, CPU) of layer ``layer``'s output at every position but the
    first, until ``max_rows``; the forward pass stops after that layer."""
    target = _decoder_layers(model)[layer]
    captured: list[Tensor] = []

    def stop(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_layer_output(output))
        raise _StopForward

    chunks: list[Tensor] = []
    total = 0
    bar = _progress(max_rows, what, "tok", progress)
    with _hook(target, stop), bar:
        for ids, mask in _batches(_take(sequences, max_rows), batch_size, device):
            captured.clear()
            with suppress(_StopForward):
                model(input_ids=ids, attention_mask=_mask_or_none(mask), use_cache=False)
            hidden = captured[0][:, 1:]
            rows = hidden[mask[:, 1:].bool()].to("cpu", torch.float16)
            rows = rows[: max_rows - total]
            chunks.append(rows)
            total += rows.shape[0]
            bar.update(rows.shape[0])
            if total >= max_rows:
                break
    if not chunks:
        raise InvalidInput("the corpus gave no sequences to harvest")
    return torch.cat(chunks)


@torch.no_grad()
def evaluate(
    model: Any,
    sae: SavedSae,
    sequences: Sequence[list[int]],
    layer: int,
    max_rows: int,
    *,
    max_norm: float,
    device: torch.device,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """The held-out report: reconstruction over the rows of ``sequences`` (position 0 and
    rows with a norm above ``max_norm`` excluded; whole sequences until ``max_rows``) and
    the next-token loss clean, spliced and zero-ablated.

    Splicing replaces the layer's output at every position but the first (and but the
    excluded rows) with the SAE's reconstruction; the loss counts the predictions made from
    positions 1 on."""
    target = _decoder_layers(model)[layer]
    mode: list[str] = ["clean"]
    captured: list[Tensor] = []

    def splice(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _layer_output(output)
        if mode[0] == "clean":
            captured.append(hidden)
            return None
        edited = hidden.clone()
        rows = hidden[:, 1:].reshape(-1, hidden.shape[-1])
        spliced = mode[0] == "spliced"
        replaced = sae.decode(sae.encode(rows)) if spliced else torch.zeros_like(rows)
        outlier = (rows.norm(dim=1) > max_norm).unsqueeze(1)
        edited[:, 1:] = torch.where(outlier, rows, replaced).reshape(hidden[:, 1:].shape)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    d_sae = sae.W_enc.shape[1]
    sums = {"err": 0.0, "sq": 0.0, "l0": 0.0, "rows": 0, "excluded": 0}
    row_sum = torch.zeros(sae.W_enc.shape[0], dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    losses = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero_ablation": [0.0, 0]}
    bar = _progress(max_rows, "evaluate", "tok", progress)
    with _hook(target, splice), bar:
        for ids, mask in _batches(_take(sequences, max_rows), batch_size, device):
            valid = mask[:, 1:].bool()
            for name in ("clean", "spliced", "zero_ablation"):
                mode[0] = name
                captured.clear()
                logits = model(
                    input_ids=ids, attention_mask=_mask_or_none(mask), use_cache=False
                ).logits
                # Predictions from positions 1..T-2 of the next token (targets 2..T-1).
                loss_mask = (mask[:, 2:] & mask[:, 1:-1]).bool()
                ce = F.cross_entropy(
                    logits[:, 1:-1].float().transpose(1, 2), ids[:, 2:], reduction="none"
                )
                losses[name][0] += float(ce[loss_mask].double().sum())
                losses[name][1] += int(loss_mask.sum())
                if name == "clean":
                    x = captured[0][:, 1:][valid].float()
                    inlier = x.norm(dim=1) <= max_norm
                    sums["excluded"] += int((~inlier).sum())
                    x = x[inlier]
                    acts = sae.encode(x)
                    err = (sae.decode(acts) - x).double()
                    sums["err"] += float(err.pow(2).sum())
                    sums["sq"] += float(x.double().pow(2).sum())
                    sums["l0"] += float((acts > 0).sum())
                    sums["rows"] += int(x.shape[0])
                    row_sum += x.double().sum(0).cpu()
                    fired |= (acts > 0).any(0).cpu()
                    bar.update(int(x.shape[0]))
    n = int(sums["rows"])
    if n == 0:
        raise InvalidInput("the held-out split gave no rows to evaluate")
    total_variance = sums["sq"] - float(row_sum.pow(2).sum()) / n
    mean_ce = {name: total / max(count, 1) for name, (total, count) in losses.items()}
    recovered_span = mean_ce["zero_ablation"] - mean_ce["clean"]
    dead = int((~fired).sum())
    return {
        "tokens": n,
        "fraction_variance_explained": 1.0 - sums["err"] / total_variance,
        "normalized_mse": sums["err"] / sums["sq"],
        "mean_l0": sums["l0"] / n,
        "dead_features": dead,
        "dead_fraction": dead / d_sae,
        "ce_loss_clean": mean_ce["clean"],
        "ce_loss_spliced": mean_ce["spliced"],
        "ce_loss_zero_ablation": mean_ce["zero_ablation"],
        "ce_loss_increase": mean_ce["spliced"] - mean_ce["clean"],
        "loss_recovered": (
            (mean_ce["zero_ablation"] - mean_ce["spliced"]) / recovered_span
            if recovered_span
            else None
        ),
        "loss_tokens": int(losses["clean"][1]),
        "outlier_rows_excluded": int(sums["excluded"]),
    }


# ---------------------------------------------------------------------------------------------
# Training


class Trainer:
    """Adam over the SAE's parameters on harvested rows, with checkpoints."""

    def __init__(
        self,
        settings: TrainSettings,
        rows: Tensor,
        device: torch.device,
        checkpoints: Path,
        checkpoint: dict[str, Any] | None,
    ) -> None:
        self.settings = settings
        self.rows = rows
        self.device = device
        self.checkpoints = checkpoints
        self.steps_per_epoch = rows.shape[0] // settings.batch_size
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.harvest_seconds = 0.0
        d_in = int(rows.shape[1])
        d_sae = settings.expansion * d_in
        if checkpoint is None:
            self.state = _initial_state(settings, rows, d_sae, device)
            self.step = 0
            self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
            self.train_seconds = 0.0
            self.history: list[dict[str, float]] = []
        else:
            params = checkpoint["params"]
            self.state = SaeState(
                encoder=params["encoder"].to(device),
                b_enc=params["b_enc"].to(device),
                W_dec=params["W_dec"].to(device),
                b_dec=params["b_dec"].to(device),
                scale=float(checkpoint["scale"]),
                architecture=settings.architecture,
                k=settings.k,
            )
            self.step = int(checkpoint["step"])
            self.since_fired = checkpoint["since_fired"].to(device)
            self.train_seconds = float(checkpoint["train_seconds"])
            self.history = list(checkpoint["history"])
        for p in self.state.parameters():
            p.requires_grad_(settings.architecture == "relu")
        self.optimizer = torch.optim.Adam(self.state.parameters(), lr=settings.lr)
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self._order: Tensor | None = None
        self._order_epoch = -1

    # -- the loop ----------------------------------------------------------------------------

    def run(self, *, progress: bool, on_step: Callable[[int], None] | None) -> None:
        bar = _progress(self.total_steps, "train", "step", progress)
        bar.update(self.step)
        window: list[dict[str, float]] = []
        t_start = time.monotonic()
        base_seconds = self.train_seconds
        try:
            with bar:
                while self.step < self.total_steps:
                    x = self._batch(self.step)
                    lr = self._lr(self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    if self.settings.architecture == "topk":
                        metrics = self._topk_step(x)
                    else:
                        metrics = self._relu_step(x)
                    self.step += 1
                    self.train_seconds = base_seconds + time.monotonic() - t_start
                    window.append(metrics)
                    if self.step % 20 == 0 or self.step == self.total_steps:
                        mean = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                        self.history.append({"step": float(self.step), **mean})
                        window = []
                        bar.set_postfix(
                            fvu=f"{mean['fvu']:.3f}",
                            l0=f"{mean['l0']:.1f}",
                            dead=int(mean["dead"]),
                            refresh=False,
                        )
                    bar.update(1)
                    if self.step % self.settings.checkpoint_every == 0:
                        self.save_checkpoint()
                    if on_step is not None:
                        on_step(self.step)
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise TrainingInterrupted(
                f"interrupted at step {self.step}/{self.total_steps}; checkpoint written to "
                f"{self.checkpoints}: run the same command with --resume to continue"
            ) from None
        self.save_checkpoint()

    def _batch(self, step: int) -> Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.settings.seed * 1000 + epoch)
            self._order = torch.randperm(self.rows.shape[0], generator=generator)
            self._order_epoch = epoch
        assert self._order is not None
        size = self.settings.batch_size
        index = self._order[offset * size : (offset + 1) * size]
        return self.rows[index].to(self.device, torch.float32) * self.state.scale

    def _lr(self, step: int) -> float:
        warmup = max(1, min(100, self.total_steps // 20))
        decay_start = int(self.total_steps * 0.8)
        factor = min(1.0, (step + 1) / warmup)
        if step >= decay_start:
            factor *= max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_start))
        return self.settings.lr * factor

    # -- TopK: forward and backward by hand --------------------------------------------------

    @torch.no_grad()
    def _topk_step(self, x: Tensor) -> dict[str, float]:
        st, cfg = self.state, self.settings
        batch = x.shape[0]
        z = x - st.b_dec
        pre = torch.addmm(st.b_enc, z, st.encoder.T)
        values, indices = pre.topk(cfg.k, dim=1)
        acts = values.clamp_min(0)
        recon = F.embedding_bag(indices, st.W_dec, per_sample_weights=acts, mode="sum") + st.b_dec
        err = recon - x
        total_variance = float((x - x.mean(0)).pow(2).sum())
        fvu = float(err.pow(2).sum()) / total_variance

        grads = _Grads.zeros_like(st)
        g_recon = err * (2.0 / total_variance)
        grads.b_dec += g_recon.sum(0)
        grads.add_latents(st, z, indices, acts, values > 0, g_recon)

        # Which latents fired: the dead ones feed the AuxK loss.
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[indices[acts > 0]] = True
        self.since_fired += batch
        self.since_fired[fired] = 0
        dead = self.since_fired >= cfg.dead_after
        n_dead = int(dead.sum())
        aux_loss = 0.0
        if n_dead and cfg.aux_alpha > 0:
            k_aux = min(cfg.aux_k, n_dead)
            a_values, a_indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
            a_acts = a_values.clamp_min(0)
            e_hat = F.embedding_bag(a_indices, st.W_dec, per_sample_weights=a_acts, mode="sum")
            residual = -err  # the target: what the live latents missed
            weight = cfg.aux_alpha * min(1.0, n_dead / k_aux)
            aux_err = e_hat - residual
            aux_loss = float(aux_err.pow(2).sum()) / total_variance
            grads.add_latents(
                st, z, a_indices, a_acts, a_values > 0, aux_err * (2.0 * weight / total_variance)
            )
        self._apply(grads)
        return {
            "fvu": fvu,
            "aux": aux_loss,
            "l0": float((acts > 0).sum()) / batch,
            "dead": float(n_dead),
        }

    # -- ReLU + L1: autograd ----------------------------------------------------------------

    def _relu_step(self, x: Tensor) -> dict[str, float]:
        st, cfg = self.state, self.settings
        warm = min(1.0, (self.step + 1) / max(1, self.total_steps // 20))
        pre = (x - st.b_dec) @ st.encoder.T + st.b_enc
        acts = torch.relu(pre)
        recon = acts @ st.W_dec + st.b_dec
        err = recon - x
        mse = err.pow(2).sum(1).mean()
        # Anthropic's convention: squared error summed over d_in, L1 scaled by decoder norms
        # (unit here), the coefficient warmed up over the first 5% of steps.
        l1 = acts.sum(1).mean()
        loss = mse + cfg.l1 * warm * l1
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        with torch.no_grad():
            assert st.W_dec.grad is not None
            _remove_parallel(st.W_dec.grad, st.W_dec)
            self.optimizer.step()
            _unit_rows(st.W_dec)
            fired = (acts > 0).any(0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            total_variance = float((x - x.mean(0)).pow(2).sum())
            return {
                "fvu": float(err.pow(2).sum()) / total_variance,
                "l1": float(l1),
                "l0": float((acts > 0).sum()) / x.shape[0],
                "dead": float((self.since_fired >= cfg.dead_after).sum()),
            }

    def _apply(self, grads: _Grads) -> None:
        st = self.state
        _remove_parallel(grads.W_dec, st.W_dec)
        for param, grad in zip(st.parameters(), grads.as_list(), strict=True):
            param.grad = grad
        self.optimizer.step()
        _unit_rows(st.W_dec)

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        st = self.state
        state = {
            "settings": dataclasses.asdict(self.settings),
            "step": self.step,
            "params": {
                n: getattr(st, n).detach().cpu() for n in ("encoder", "b_enc", "W_dec", "b_dec")
            },
            "scale": st.scale,
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired.cpu(),
            "train_seconds": self.train_seconds,
            "harvest_seconds": self.harvest_seconds,
            "history": self.history,
        }
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(state, self.checkpoints / CHECKPOINT_STATE)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        rows_trained = self.step * self.settings.batch_size
        return {
            "rows": int(self.rows.shape[0]),
            "steps": self.step,
            "rows_trained": rows_trained,
            "train_seconds": round(self.train_seconds, 1),
            "rows_per_second": round(rows_trained / self.train_seconds)
            if self.train_seconds
            else None,
            "final_train_fvu": last.get("fvu"),
            "final_train_l0": last.get("l0"),
            "final_dead_latents": int(last.get("dead", 0)),
            "history": [
                {k: round(v, 5) for k, v in h.items()}
                for h in self.history[:: max(1, len(self.history) // 25)]
            ],
        }


@dataclasses.dataclass
class _Grads:
    encoder: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor

    @classmethod
    def zeros_like(cls, st: SaeState) -> _Grads:
        return cls(*(torch.zeros_like(p) for p in st.parameters()))

    def as_list(self) -> list[Tensor]:
        return [self.encoder, self.b_enc, self.W_dec, self.b_dec]

    def add_latents(
        self,
        st: SaeState,
        z: Tensor,
        indices: Tensor,
        acts: Tensor,
        active: Tensor,
        g_out: Tensor,
    ) -> None:
        """Gradients of ``sum(g_out * decode(acts at indices))`` through a TopK selection of
        ``pre = z @ encoder.T + b_enc`` (``z = x - b_dec``), touching only the selected
        latents: decoder rows, the latents' values, then their encoder rows and biases."""
        batch, k = indices.shape
        d_sae = st.encoder.shape[0]
        latent_of = indices.reshape(-1)
        row_of = torch.arange(batch, device=z.device).repeat_interleave(k)
        where = torch.stack([latent_of, row_of])
        # d/dW_dec[j] = sum over rows that selected j of act * g_out[row]
        self.W_dec += _sparse_rows(where, acts.reshape(-1), (d_sae, batch)) @ g_out
        # d/dact[b, i] = <g_out[b], W_dec[indices[b, i]]>; zero where the ReLU clipped it
        g_acts = torch.bmm(st.W_dec[indices], g_out.unsqueeze(2)).squeeze(2) * active
        g_flat = g_acts.reshape(-1)
        self.encoder += _sparse_rows(where, g_flat, (d_sae, batch)) @ z
        g_b_enc = torch.zeros(d_sae, dtype=z.dtype, device=z.device).index_add_(
            0, latent_of, g_flat
        )
        self.b_enc += g_b_enc
        # z = x - b_dec: b_dec's encoder-side gradient is -(sum of dpre over rows) @ encoder
        self.b_dec -= g_b_enc @ st.encoder


def _sparse_rows(where: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(where, values, size, check_invariants=False)


def _remove_parallel(grad: Tensor, rows: Tensor) -> None:
    """Drop the part of each decoder row's gradient along the (unit) row: the norm is fixed."""
    grad -= (grad * rows).sum(1, keepdim=True) * rows


def _unit_rows(rows: Tensor) -> None:
    rows /= rows.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _initial_state(
    settings: TrainSettings, rows: Tensor, d_sae: int, device: torch.device
) -> SaeState:
    generator = torch.Generator().manual_seed(settings.seed)
    sample = rows[torch.randperm(rows.shape[0], generator=generator)[:65_536]].float()
    # SAELens expected_average_only_in: the mean row norm becomes sqrt(d_in).
    scale = math.sqrt(rows.shape[1]) / float(sample.norm(dim=1).mean())
    w_dec = torch.randn(d_sae, rows.shape[1], generator=generator)
    _unit_rows(w_dec)
    return SaeState(
        encoder=w_dec.clone().to(device),
        b_enc=torch.zeros(d_sae, device=device),
        W_dec=w_dec.to(device),
        b_dec=(sample * scale).median(dim=0).values.to(device),
        scale=scale,
        architecture=settings.architecture,
        k=settings.k,
    )


def _load_checkpoint(path: Path, settings: TrainSettings) -> dict[str, Any]:
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged file
        raise InvalidInput(f"{path}: cannot read the checkpoint: {e}") from e
    stored = checkpoint.get("settings", {})
    current = dataclasses.asdict(settings)
    stored["corpus"] = tuple(stored.get("corpus", ()))
    changed = sorted(k for k in current if stored.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in changed)
        raise InvalidInput(
            f"{path}: --resume needs the settings the checkpoint was made with; changed: {details}"
        )
    return checkpoint


def _atomic_torch_save(obj: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    partial.replace(path)


# ---------------------------------------------------------------------------------------------
# SAELens output


def write_saelens(
    out: Path, tensors: dict[str, Tensor], settings: TrainSettings, scale: float, d_in: int
) -> None:
    """``cfg.json`` (SAELens 6 layout, with the 5.x top-level fields older readers look for)
    and ``sae_weights.safetensors``; the scaling factor is folded into the tensors."""
    d_sae = int(tensors["W_enc"].shape[1])
    metadata: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "hook_name": settings.hook_name,
        "hook_head_index": None,
        "hook_layer": settings.layer,
        "context_size": settings.context,
        "prepend_bos": False,
        "dataset_path": "gensim test data (enwiki shortened, lee_background) + chat prompts"
        if not settings.corpus
        else ", ".join(settings.corpus),
        "model_from_pretrained_kwargs": {},
        "sae_lens_training_version": None,
        "trained_with": "guard sae train",
        "norm_scaling_factor_folded": scale,
    }
    cfg: dict[str, Any] = {
        "architecture": "topk" if settings.architecture == "topk" else "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": _DTYPE_NAMES[settings.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        # SAELens 5.x and other readers take these from the top level.
        "model_name": MODEL_NAME,
        "hook_name": settings.hook_name,
        "hook_layer": settings.layer,
        "hook_head_index": None,
        "context_size": settings.context,
        "prepend_bos": False,
        "finetuning_scaling_factor": False,
    }
    if settings.architecture == "topk":
        cfg["k"] = settings.k
        cfg["rescale_acts_by_decoder_norm"] = False
        cfg["activation_fn"] = "topk"
        cfg["activation_fn_kwargs"] = {"k": settings.k}
    else:
        cfg["activation_fn"] = "relu"
        cfg["activation_fn_kwargs"] = {}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
