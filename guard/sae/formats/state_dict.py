"""SAEs published as PyTorch state dicts (``.pt``/``.pth`` pickles): OpenAI's GPT-2 SAEs and
Goodfire's Llama SAEs.

The guard never unpickles anything. ``guard sae convert SRC OUT`` (host side, with torch:
``guard.training.convert``) checks the pickle, loads it with ``torch.load(weights_only=True)``
and writes a folder the readers here open without torch:

    cfg.json                 what the state dict's module needs besides its tensors
                             (``format``, ``architecture``, ``k``, ``input_normalization``,
                             ``hook_name``, ``neuronpedia_id``, and where it came from)
    <format>_sae.safetensors the state dict's tensors, under their own names and in their
                             own orientation and dtype (training statistics left out)

Keeping the source's names and layout makes the converter a change of container only: each
library's conventions are applied in one place, its reader, to exactly what the library's
own ``load_state_dict`` would load. This module holds what the converter and the readers
share: which tensors each format has and the shapes they must have, checked with errors that
name the file, the tensor, the shape expected and the shape found (and whether it looks
transposed: ``nn.Linear`` stores ``[out_features, in_features]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from guard.errors import SaeFileError

CFG_FILE = "cfg.json"
#: What ``guard sae convert`` writes as the cfg's ``converted_by``.
CONVERTER = "guard sae convert"
#: The suffixes of files the guard refuses to read (pickles), pointing at the converter.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")

Dim = Literal["d_in", "d_sae"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[Dim, ...]
    meaning: str


@dataclasses.dataclass(frozen=True)
class StateDictSpec:
    """The tensors of one library's SAE module, as its ``state_dict()`` names them."""

    format: str
    """``openai`` or ``goodfire``: the cfg's ``format`` and the weights file's prefix."""
    library: str
    tensors: Mapping[str, TensorSpec]
    sizes: Mapping[Dim, str]
    """The 1-D tensor whose length is each size (checked first, then every other shape)."""
    training_buffers: frozenset[str] = frozenset()
    """Tensors of the state dict that only training reads: the converter leaves them out."""
    metadata: frozenset[str] = frozenset()
    """Non-tensor entries of the state dict (strings, numbers) the converter reads into cfg."""

    @property
    def weights_file(self) -> str:
        return f"{self.format}_sae.safetensors"

    def check_shapes(self, path: Path, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
        """``(d_in, d_sae)`` after checking that every tensor is present with its shape;
        ``shapes`` maps the tensors found to their shapes."""
        present = set(shapes)
        required = set(self.tensors)
        missing = sorted(required - present)
        if missing:
            spec = self.tensors[missing[0]]
            raise SaeFileError(
                path,
                f"missing tensor {missing[0]!r} ({spec.meaning}, shape "
                f"[{', '.join(spec.shape)}]); a {self.library} state dict has "
                f"{sorted(required)}, found {sorted(present)}",
            )
        dims: dict[Dim, int] = {}
        for dim, name in self.sizes.items():
            shape = list(shapes[name])
            if len(shape) != 1:
                raise SaeFileError(
                    path,
                    f"tensor {name!r}: expected shape [{dim}] ({self.tensors[name].meaning}), "
                    f"found {shape}",
                )
            dims[dim] = int(shape[0])
        for name, spec in self.tensors.items():
            expected = [dims[d] for d in spec.shape]
            found = [int(n) for n in shapes[name]]
            if found == expected:
                continue
            hint = ""
            if len(found) == 2 and found == expected[::-1]:
                hint = (": the transpose of what it should be (nn.Linear stores its weight as "
                        "[out_features, in_features])")
            raise SaeFileError(
                path,
                f"tensor {name!r}: expected shape {expected} ([{', '.join(spec.shape)}]: "
                f"{spec.meaning}; d_in={dims['d_in']} from {self.sizes['d_in']!r}, "
                f"d_sae={dims['d_sae']} from {self.sizes['d_sae']!r}), found {found}{hint}",
            )
        return dims["d_in"], dims["d_sae"]


OPENAI = StateDictSpec(
    format="openai",
    library="openai/sparse_autoencoder",
    tensors={
        "pre_bias": TensorSpec(("d_in",), "subtracted from the input before the encoder"),
        "latent_bias": TensorSpec(("d_sae",), "added to the encoder's output"),
        "encoder.weight": TensorSpec(("d_sae", "d_in"), "nn.Linear(d_in, d_sae).weight"),
        "decoder.weight": TensorSpec(("d_in", "d_sae"), "nn.Linear(d_sae, d_in).weight"),
    },
    sizes={"d_in": "pre_bias", "d_sae": "latent_bias"},
    training_buffers=frozenset(
        {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
    ),
    metadata=frozenset({"activation", "activation_state_dict"}),
)

GOODFIRE = StateDictSpec(
    format="goodfire",
    library="Goodfire",
    tensors={
        "encoder_linear.weight": TensorSpec(("d_sae", "d_in"), "nn.Linear(d_in, d_sae).weight"),
        "encoder_linear.bias": TensorSpec(("d_sae",), "nn.Linear(d_in, d_sae).bias"),
        "decoder_linear.weight": TensorSpec(("d_in", "d_sae"), "nn.Linear(d_sae, d_in).weight"),
        "decoder_linear.bias": TensorSpec(("d_in",), "nn.Linear(d_sae, d_in).bias"),
    },
    sizes={"d_in": "decoder_linear.bias", "d_sae": "encoder_linear.bias"},
)

SPECS: dict[str, StateDictSpec] = {spec.format: spec for spec in (OPENAI, GOODFIRE)}


def is_converted_folder(path: Path, spec: StateDictSpec) -> bool:
    return (path / CFG_FILE).is_file() and (path / spec.weights_file).is_file()


def pickle_files(where: Path) -> list[Path]:
    """``where`` itself when it is a pickle, or the pickles directly in a folder."""
    if where.is_file():
        return [where] if where.suffix.lower() in PICKLE_SUFFIXES else []
    if where.is_dir():
        return sorted(p for p in where.iterdir()
                      if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    return []


def refuse_pickle(where: Path, pickles: Sequence[Path]) -> SaeFileError:
    """The error for a PyTorch pickle given to the sidecar: it names the converter."""
    first = pickles[0]
    return SaeFileError(
        where,
        f"{first.name} is a PyTorch pickle, which the guard never unpickles (loading one can "
        "run any code it holds): convert it on a host with torch, `guard sae convert "
        f"{first} OUT` (it checks the file holds only tensors and writes a safetensors "
        "folder), then use OUT",
    )
