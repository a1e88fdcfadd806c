"""``guard sae convert SRC OUT``: PyTorch state-dict pickles (OpenAI's GPT-2 SAEs, Goodfire's
Llama SAEs) into safetensors folders the guard reads without torch.

The sidecar never unpickles anything (``guard.sae.formats`` refuses a ``.pt``/``.pth`` and
names this command). Here, on the host side, a pickle is read in two steps, and a file that
fails the first is never handed to the second:

1. **Static check, nothing executed.** The file must be a torch zip archive (what
   ``torch.save`` has written since torch 1.6) with one ``data.pkl``. Every opcode of that
   pickle is read with :func:`pickletools.genops` (which decodes, never runs): every global it
   names (``GLOBAL``, ``INST``, and ``STACK_GLOBAL`` whose two operands must be plain strings
   pushed just before) must be one of the functions and classes that rebuild tensors and
   ordered dicts (:data:`ALLOWED_GLOBALS`); extension-registry opcodes are refused. A pickle
   that would call ``os.system`` names ``posix system`` and is refused here.
2. **``torch.load(weights_only=True)``** (torch's restricted unpickler, memory-mapped) of the
   file that passed, then a check that it is a mapping of names to tensors (plus the few
   plain entries the format defines, e.g. OpenAI's ``activation``), with the shapes the
   format's module needs.

The tensors are written under their own names, orientation and dtype to
``OUT/<format>_sae.safetensors`` (training statistics left out), with ``OUT/cfg.json``
recording what the module needs besides its tensors; then OUT is opened with the guard's own
reader before it is put in place. See ``guard.sae.formats.state_dict``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickletools
import re
import shutil
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard import __version__
from guard.errors import GuardError, InvalidInput, SaeFileError
from guard.sae.formats.state_dict import CFG_FILE, CONVERTER, GOODFIRE, OPENAI, SPECS
from guard.sae.neuronpedia import parse_neuronpedia_id
from guard.sae.safetensors import sha256_of_files

#: The globals a state-dict pickle may name: what rebuilds tensors, parameters, their
#: storages and ordered dicts. Anything else (``posix system``, ``builtins eval``, a class
#: with a ``__reduce__``) is refused before any unpickling.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    *(("torch", f"{kind}Storage") for kind in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    )),
})
#: A state dict's pickle holds names and tensor metadata: kilobytes. Beyond this it is not one.
MAX_PICKLE_BYTES = 64 << 20
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NO_STACK = frozenset({"PROTO", "FRAME", "STOP"})
_REFUSED_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_LAYER_IN_NAME = re.compile(r"(?:^|[-_.])l(\d+)(?:$|[-_.])", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Step 1: the static check


def check_pickle(path: Path) -> None:
    """Refuse ``path`` unless it is a torch zip archive whose pickle names only
    :data:`ALLOWED_GLOBALS`; nothing in it is executed."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise SaeFileError(path, f"cannot read file: {e.strerror or e}") from e
    if not is_zip:
        # Not what torch.save writes; scan what a plain pickle would run, for a precise error.
        try:
            with path.open("rb") as f:
                head = f.read(MAX_PICKLE_BYTES)
        except OSError as e:
            raise SaeFileError(path, f"cannot read file: {e.strerror or e}") from e
        scan_pickle(path, head, "the file")
        raise SaeFileError(
            path,
            "expected a torch zip archive (what torch.save writes since torch 1.6: a zip with "
            "<name>/data.pkl), found another format (a bare pickle or torch's legacy format); "
            "this converter does not read those: re-save the state dict with a current "
            "torch.save in an environment you trust",
        )
    data = _archive_pickle(path)
    scan_pickle(path, data, "data.pkl")


def _archive_pickle(path: Path) -> bytes:
    """The bytes of the archive's one ``<name>/data.pkl``, after checking the layout torch's
    reader will see is the one read here (one top folder, no duplicate names)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise SaeFileError(path, "expected a torch zip archive, found duplicate entry "
                                         "names (a crafted archive)")
            tops = {n.split("/", 1)[0] for n in names}
            pickles = [i for i in infos if i.filename.endswith(".pkl")]
            expected = [f"{next(iter(tops))}/data.pkl"] if len(tops) == 1 else []
            if not expected or [i.filename for i in pickles] != expected:
                kind = ("a TorchScript archive (torch.jit.save), not a state dict"
                        if any("/code/" in n or n.endswith("constants.pkl") for n in names)
                        else f"entries {sorted(names)[:8]}")
                raise SaeFileError(path, "expected a torch zip archive with one folder holding "
                                         f"one data.pkl (torch.save), found {kind}")
            info = pickles[0]
            if info.file_size > MAX_PICKLE_BYTES:
                raise SaeFileError(path, f"data.pkl: expected the pickle of a state dict (kB), "
                                         f"found {info.file_size} bytes")
            return archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as e:
        raise SaeFileError(path, f"not a readable zip archive: {e}") from e


def scan_pickle(path: Path, data: bytes, part: str) -> None:
    """Read every opcode of the pickle in ``data`` without running it; refuse any global
    outside :data:`ALLOWED_GLOBALS`, and any opcode that reaches a callable otherwise."""
    memo: dict[int, str | None] = {}
    # The values the last two stack-changing opcodes pushed (a string, or None for anything
    # else): what STACK_GLOBAL pops when both were pushes.
    pushed: deque[str | None] = deque([None, None], maxlen=2)
    try:
        for opcode, arg, pos in pickletools.genops(data):
            name = opcode.name
            if name in _REFUSED_OPS:
                raise SaeFileError(path, f"{part}: opcode {name} at byte {pos} (a callable from "
                                         "the extension registry): not a state dict of tensors; "
                                         "refused without unpickling")
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _check_global(path, part, module, attr, pos)
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module_s, attr_s = pushed
                if module_s is None or attr_s is None:
                    raise SaeFileError(path, f"{part}: STACK_GLOBAL at byte {pos} whose module "
                                             "and name are not plain strings: refused without "
                                             "unpickling")
                _check_global(path, part, module_s, attr_s, pos)
                pushed.append(None)
            elif name in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif name in _MEMO_PUTS:
                index = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
                memo[index] = pushed[-1]
            elif name in _MEMO_GETS:
                pushed.append(memo.get(int(arg)))  # type: ignore[arg-type]
            elif name not in _NO_STACK:
                pushed.append(None)
    except SaeFileError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as e:  # genops on a broken pickle
        raise SaeFileError(path, f"{part}: not a valid pickle ({e}); refused without "
                                 "unpickling") from e


def _check_global(path: Path, part: str, module: str, attr: str, pos: int | None) -> None:
    if (module, attr) not in ALLOWED_GLOBALS:
        raise SaeFileError(
            path,
            f"{part} refers to {module}.{attr} (at byte {pos}): expected only tensors in a "
            "mapping (a state dict), which name nothing but torch's tensor and storage rebuild "
            "functions and collections.OrderedDict; refused without unpickling",
        )


# ---------------------------------------------------------------------------------------------
# Step 2: torch.load of what passed, and the state dict's contents


def load_state_dict(path: Path) -> Mapping[str, Any]:
    """The state dict in ``path``: checked statically, then ``torch.load(weights_only=True)``."""
    check_pickle(path)
    torch = _torch()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, ...)
        raise SaeFileError(path, f"torch.load(weights_only=True) refused the file: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from e
    if not isinstance(loaded, Mapping):
        raise SaeFileError(path, "expected a state dict (a mapping of names to tensors), found "
                                 f"{type(loaded).__name__}")
    for key in loaded:
        if not isinstance(key, str):
            raise SaeFileError(path, f"expected a state dict with string keys, found {key!r}")
    return loaded


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise InvalidInput(
            f"guard sae convert needs torch ({e}); install the host extra: pip install "
            "'activation-guard[host]' (on the host, not the sidecar)"
        ) from e
    return torch


@dataclasses.dataclass(frozen=True)
class Converted:
    """What :func:`convert` wrote."""

    out: Path
    format: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    hook_name: str | None
    neuronpedia_id: str | None
    dropped: tuple[str, ...]
    weights_sha256: str

    def describe(self) -> str:
        kind = {"openai_topk": f"OpenAI TopK SAE (k={self.k}, layer-normalised input)",
                "openai_relu": "OpenAI ReLU SAE",
                "goodfire_relu": "Goodfire ReLU SAE"}[self.architecture]
        return f"{kind}, d_in {self.d_in}, d_sae {self.d_sae}"


def convert(
    source: Path, out: Path, *, format: str = "auto", hook: str | None = None,
    neuronpedia_id: str | None = None, force: bool = False,
) -> Converted:
    """Convert the state dict in ``source`` into the folder ``out`` (see the module doc)."""
    if neuronpedia_id is not None:
        parse_neuronpedia_id(neuronpedia_id, "--neuronpedia-id")
    if not source.is_file():
        raise SaeFileError(source, "no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SaeFileError(out, "output exists and is not an empty folder (use --force to "
                                "replace)")
    if sys.byteorder != "little":
        raise InvalidInput("guard sae convert writes little-endian safetensors: run it on a "
                           "little-endian host")
    state = load_state_dict(source)
    torch = _torch()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    spec = SPECS[format] if format != "auto" else _detect(source, tensors)
    unknown = sorted(set(tensors) - set(spec.tensors) - spec.training_buffers)
    if unknown:
        raise SaeFileError(source, f"unexpected tensor(s) {unknown}: a {spec.library} state "
                                   f"dict has {sorted(spec.tensors)} (and training statistics "
                                   f"{sorted(spec.training_buffers) or 'none'})")
    d_in, d_sae = spec.check_shapes(source, {k: tuple(v.shape) for k, v in tensors.items()})
    for name in spec.tensors:
        tensor = tensors[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES or tensor.layout != torch.strided or tensor.is_quantized:
            raise SaeFileError(source, f"tensor {name!r}: expected a dense floating-point tensor "
                                       f"({', '.join(_DTYPES)}), found {tensor.dtype} "
                                       f"{tensor.layout}")
    cfg: dict[str, Any] = {"format": spec.format}
    if spec is OPENAI:
        cfg.update(_openai_cfg(source, plain, d_sae))
    else:
        if plain:
            raise SaeFileError(source, f"unexpected entries {sorted(plain)}: a {spec.library} "
                                       "state dict holds only tensors")
        cfg.update(architecture="goodfire_relu", input_normalization="none",
                   encode=("latents = relu(x @ encoder_linear.weight.T + encoder_linear.bias); "
                           "recons = latents @ decoder_linear.weight.T + decoder_linear.bias"))
        if hook is None:
            hook = _goodfire_hook(source)
    dropped = tuple(sorted(set(tensors) & spec.training_buffers))
    cfg.update(
        d_in=d_in, d_sae=d_sae, hook_name=hook, neuronpedia_id=neuronpedia_id,
        converted_by=f"{CONVERTER} (activation-guard {__version__})",
        source={"file": source.name, "sha256": sha256_of_files([source]),
                "training_statistics_left_out": list(dropped)},
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent.resolve()))
    try:
        _write_safetensors(staging / spec.weights_file, {n: tensors[n] for n in spec.tensors})
        (staging / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        weights_sha256 = sha256_of_files([staging / spec.weights_file])
        try:
            _verify(staging)
        except SaeFileError as e:  # name the file the user has, not the staging folder
            raise SaeFileError(source, f"{e.problem} (in the converted "
                                       f"{Path(e.path).name})") from e
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Converted(out, spec.format, cfg["architecture"], d_in, d_sae, cfg.get("k"), hook,
                     neuronpedia_id, dropped, weights_sha256)


def _detect(source: Path, tensors: Mapping[str, Any]) -> Any:
    names = set(tensors)
    if names & {"pre_bias", "latent_bias"}:
        return OPENAI
    if any(n.startswith(("encoder_linear.", "decoder_linear.")) for n in names):
        return GOODFIRE
    raise SaeFileError(
        source,
        "expected the state dict of a known SAE: OpenAI's (pre_bias, latent_bias, "
        "encoder.weight, decoder.weight) or Goodfire's (encoder_linear.weight/bias, "
        f"decoder_linear.weight/bias), found tensors {sorted(names)[:12]}",
    )


def _openai_cfg(source: Path, plain: Mapping[str, Any], d_sae: int) -> dict[str, Any]:
    """What ``Autoencoder.from_state_dict`` reads besides the tensors: ``activation``
    (default ``ReLU``; ``normalize`` is set exactly for ``TopK``) and, for TopK,
    ``activation_state_dict`` = ``{k, postact_fn}``."""
    unknown = sorted(set(plain) - OPENAI.metadata)
    if unknown:
        raise SaeFileError(source, f"unexpected entries {unknown}: an {OPENAI.library} state "
                                   f"dict has tensors and {sorted(OPENAI.metadata)}")
    activation = plain.get("activation", "ReLU")
    act_state = plain.get("activation_state_dict", {})
    if not isinstance(act_state, Mapping):
        raise SaeFileError(source, "entry 'activation_state_dict': expected a mapping "
                                   f"({{'k': ..., 'postact_fn': ...}}), found {act_state!r:.80}")
    if activation == "ReLU":
        return {"architecture": "openai_relu", "input_normalization": "none",
                "encode": "latents = relu((x - pre_bias) @ encoder.weight.T + latent_bias); "
                          "recons = latents @ decoder.weight.T + pre_bias"}
    if activation != "TopK":
        raise SaeFileError(source, f"entry 'activation': expected 'TopK' or 'ReLU', found "
                                   f"{activation!r:.80}"
                                   + (" (an Identity activation is not sparse)"
                                      if activation == "Identity" else ""))
    k = act_state.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
        raise SaeFileError(source, f"entry 'activation_state_dict.k': expected an integer in "
                                   f"[1, {d_sae}] (d_sae), found {k!r:.80}")
    postact = act_state.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise SaeFileError(source, "entry 'activation_state_dict.postact_fn': expected 'ReLU' "
                                   f"(the TopK SAEs OpenAI published), found {postact!r:.80}")
    extra = sorted(set(act_state) - {"k", "postact_fn"})
    if extra:
        raise SaeFileError(source, f"entry 'activation_state_dict': unexpected keys {extra}: "
                                   "expected only k and postact_fn")
    return {"architecture": "openai_topk", "k": k, "input_normalization": "layer_norm",
            "encode": "latents = relu(topk_k((LN(x) - pre_bias) @ encoder.weight.T + "
                      "latent_bias)), the k largest pre-activations kept; LN(x) = (x - mean(x)) "
                      "/ (std(x, unbiased) + 1e-5); recons = (latents @ decoder.weight.T + "
                      "pre_bias) * std(x) + mean(x)"}


def _goodfire_hook(source: Path) -> str | None:
    """Goodfire names its files by layer (``Llama-3.1-8B-Instruct-SAE-l19.pth``): the residual
    stream after that decoder layer, as SAELens's Goodfire loader reads it."""
    match = _LAYER_IN_NAME.search(source.stem)
    return f"blocks.{int(match.group(1))}.hook_resid_post" if match else None


def _write_safetensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """Tensors in their own dtype, little-endian, in the order given (header padded to 8)."""
    torch = _torch()
    header: dict[str, Any] = {}
    offset = 0
    ready = []
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[str(t.dtype).removeprefix("torch.")],
                        "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        ready.append(t)
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in ready:
            if t.numel():
                t.reshape(-1).view(torch.uint8).numpy().tofile(f)


def _verify(folder: Path) -> None:
    """Open what was written with the guard's reader (shapes, finite values, cfg)."""
    from guard.sae.formats import load_any

    load_any(folder, require_hook=False)


# ---------------------------------------------------------------------------------------------
# The command


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``guard sae convert`` to the ``sae`` command group."""
    parser = commands.add_parser(
        "convert",
        help="convert a PyTorch .pt/.pth SAE state dict into a folder the guard reads "
        "(host side, needs torch)",
        description="Convert OpenAI's GPT-2 SAEs and Goodfire's Llama SAEs, published as "
        "PyTorch state-dict pickles, into a folder (cfg.json + <format>_sae.safetensors) the "
        "guard and its sidecar read without torch. The pickle is checked without running it "
        "(only tensor rebuild functions may appear) and then loaded with "
        "torch.load(weights_only=True); anything else is refused.",
    )
    parser.add_argument("source", metavar="SRC", type=Path, help="the .pt/.pth file")
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to create")
    parser.add_argument("--format", choices=("auto", *SPECS), default="auto",
                        help="whose state dict it is (default: %(default)s, by its tensor names)")
    parser.add_argument("--hook", help="the hook the SAE reads, recorded in cfg.json "
                        "(Goodfire: blocks.L.hook_resid_post from the file name's -lL)")
    parser.add_argument("--neuronpedia-id", metavar="MODEL/SOURCE",
                        help="the SAE's Neuronpedia id (e.g. gpt2-small/8-res_post_32k-oai), "
                        "recorded in cfg.json: labels and decision records use it")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    try:
        done = convert(args.source, args.out, format=args.format, hook=args.hook,
                       neuronpedia_id=args.neuronpedia_id, force=args.force)
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.source} ({done.describe()}) to {done.out}")
    if done.dropped:
        print(f"left out training statistics: {', '.join(done.dropped)}")
    if done.hook_name is None:
        print("no hook recorded: give saes[].hook when serving it (or convert with --hook)")
    else:
        print(f"hook: {done.hook_name}")
    weights = done.out / f"{done.format}_sae.safetensors"
    print(f"weights sha256 {done.weights_sha256} (of {weights}): pin this as saes[].sha256")
    return 0
