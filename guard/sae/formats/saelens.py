"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors``.

Conventions, as SAELens (5.x and 6.x, ``sae_lens/saes/*.py``, ``loading/pretrained_sae_loaders.py``)
computes them:

- ``sae_in = norm(x) - b_dec * apply_b_dec_to_input`` (``process_sae_in``), then the
  architecture's encoder; ``apply_b_dec_to_input`` defaults to true for pre-6.0 configs.
- ``normalize_activations``: ``none``; ``constant_norm_rescale`` (``x * sqrt(d_in) / |x|``,
  undone on the output); ``layer_norm`` (``(x - mean) / (std + 1e-5)`` with torch's unbiased
  std, undone on the output); ``expected_average_only_in`` multiplies inputs by a dataset
  scaling factor that SAELens folds into the weights (``fold_activation_norm_scaling_factor``:
  ``W_enc * s``, ``W_dec / s``, ``b_dec / s``) and does nothing at run time. We fold the factor
  stored next to the weights (``activation_scaler.json``, as the SAELens trainer writes it, or
  a ``norm_scaling_factor`` cfg field) and refuse a folder that asks for it but stores none:
  encoding raw activations would give plausible but wrong scores.
- a stored ``scaling_factor`` tensor (finetuning) scales activations before ``W_dec`` when
  ``finetuning_scaling_factor`` is set; an all-ones one is dropped, as SAELens does.
- TopK: ``k`` (6.x) or ``activation_fn_kwargs.k`` (5.x, also as ``architecture: standard``
  with ``activation_fn: topk``); ``rescale_acts_by_decoder_norm`` multiplies pre-activations
  by the decoder row norms before the selection and divides them out before ``W_dec``.
- JumpReLU: ``threshold`` (or an older ``log_threshold``, exponentiated). BatchTopK and
  Matryoshka BatchTopK SAEs are saved for inference as JumpReLU with one threshold broadcast
  to every latent (``batchtopk_sae.py``): read as any JumpReLU SAE.
- hook name: ``metadata.hook_name`` (6.x), ``hook_name`` or ``hook_point`` (older).
- transcoders (``transcoder.py``: ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
  ``jumprelu_skip_transcoder``): the ReLU or JumpReLU encoder of ``hook_name`` with no
  ``b_dec`` subtraction (``b_dec`` is ``d_out`` wide and belongs to the output; SAELens refuses
  ``apply_b_dec_to_input: true`` for them, and so do we); ``W_dec`` is ``[d_sae, d_out]``;
  the decoder writes ``metadata.hook_name_out`` and is not un-normalised; skip transcoders add
  ``x @ W_skip.T`` (``W_skip`` ``[d_out, d_in]``, ``x`` the raw input).
- ``temporal``, ``matching_pursuit`` and the training-only ``batchtopk`` names are refused
  with the reason (``guard.sae.architectures.refused``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import SaeFileError
from guard.sae.architectures import Architecture, TopKConfig
from guard.sae.formats.fields import (
    boolean,
    check_tensor_names,
    positive_int,
    read_json_object,
)
from guard.sae.model import (
    Decoder,
    InputNormalization,
    SaeModel,
    check_decoder,
    check_folded,
    check_skip,
    checked_params,
    finite_float32,
)
from guard.sae.neuronpedia import neuronpedia_id_field
from guard.sae.registry import get_architecture, known_architectures, refusal
from guard.sae.safetensors import SafetensorsFile, sha256_of_files

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"

_FINETUNING_SCALE_TENSORS = ("scaling_factor", "finetuning_scaling_factor")
#: exp() of anything larger overflows float32.
_MAX_R_MAG = float(np.log(np.finfo(np.float32).max))
#: SAELens transcoder architectures: the encoder each runs, and whether it adds ``W_skip``.
TRANSCODERS: dict[str, tuple[str, bool]] = {
    "transcoder": ("standard", False),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


def is_saelens_folder(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_saelens(folder: Path, hook: str | None = None, *, require_hook: bool = True,
                 sha256: str | None = None) -> SaeModel:
    """Load a SAELens SAE folder into the canonical form (``require_hook=False``: a config
    that names no hook loads with an empty one; ``sha256``: the weights file's, when the
    caller has just hashed it)."""
    cfg_path = folder / CFG_FILE
    weights_path = folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_path)
    arch_cls, transcoder = _architecture(cfg_path, cfg)
    skip = transcoder is not None and TRANSCODERS[transcoder][1]
    d_in = positive_int(cfg_path, cfg, "d_in")
    d_sae = positive_int(cfg_path, cfg, "d_sae")
    d_out = positive_int(cfg_path, cfg, "d_out") if transcoder else d_in
    config: Any
    if arch_cls.name == "topk":
        config = TopKConfig(d_in, d_sae, _topk_k(cfg_path, cfg, d_sae))
    else:
        config = arch_cls.config_type(d_in, d_sae)
    if arch_cls.name == "gated" and cfg.get("normalize_decoder"):
        raise SaeFileError(
            cfg_path, "field 'normalize_decoder': gated SAEs with it are not supported"
        )
    normalization, scaling_factor = _normalization(folder, cfg_path, cfg)
    if transcoder is None:
        apply_b_dec = boolean(cfg_path, cfg, "apply_b_dec_to_input", True)
    elif boolean(cfg_path, cfg, "apply_b_dec_to_input", False):
        raise SaeFileError(
            cfg_path,
            f"field 'apply_b_dec_to_input': expected false for a {transcoder} (its b_dec is "
            "d_out wide and belongs to the output hook; SAELens refuses it too), found true",
        )
    else:
        apply_b_dec = False
    hook_name = hook or _hook_name(cfg_path, cfg, require_hook)
    hook_name_out = _hook_name_out(cfg) if transcoder else None

    file = SafetensorsFile(weights_path)
    sha256 = sha256 or sha256_of_files([weights_path])
    encoder_names = set(arch_cls.param_shapes(config))
    required = encoder_names | {"W_dec", "b_dec"} | ({"W_skip"} if skip else set())
    optional = set(_FINETUNING_SCALE_TENSORS)
    if arch_cls.name == "jumprelu" and "threshold" not in file and "log_threshold" in file:
        required = (required - {"threshold"}) | {"log_threshold"}
    check_tensor_names(file, required, optional)

    raw = {name: file.float32(name) for name in required}
    if "log_threshold" in raw:
        raw["threshold"] = np.exp(raw.pop("log_threshold"))
    params = checked_params(weights_path, arch_cls, config, raw)
    w_dec, b_dec = check_decoder(weights_path, d_out, d_sae, raw["W_dec"], raw["b_dec"],
                                 width="d_out" if transcoder else "d_in")
    w_skip = check_skip(weights_path, "W_skip", raw["W_skip"], d_out, d_in) if skip else None
    if arch_cls.name == "jumprelu":
        params["threshold"] = np.maximum(params["threshold"], np.float32(0.0))
    if arch_cls.name == "gated":  # the magnitude path scales by exp(r_mag), in float32
        r_mag = params["r_mag"]
        if r_mag.size and float(r_mag.max()) > _MAX_R_MAG:
            raise SaeFileError(
                weights_path,
                f"tensor 'r_mag': expected values at most {_MAX_R_MAG:.2f} (exp(r_mag) must "
                f"fit in float32), found {float(r_mag.max())!r} at feature "
                f"{int(np.argmax(r_mag))}",
            )
    # Folding scales and b_dec into float32 weights can overflow (huge but finite factors):
    # checked once everything is folded, below.
    with np.errstate(over="ignore", invalid="ignore"):
        w_dec = _apply_finetuning_scale(weights_path, cfg_path, cfg, file, w_dec)

        rescale = boolean(cfg_path, cfg, "rescale_acts_by_decoder_norm", False)
        if arch_cls.name == "topk" and rescale:
            norms = np.linalg.norm(w_dec.astype(np.float64), axis=1)
            if not (norms > 0).all():
                raise SaeFileError(
                    weights_path,
                    f"tensor 'W_dec': row {int(np.argmin(norms))} has zero norm, but "
                    "rescale_acts_by_decoder_norm divides by it",
                )
            params["W_enc"] = (params["W_enc"] * norms).astype(np.float32)
            params["b_enc"] = (params["b_enc"] * norms).astype(np.float32)
            w_dec = (w_dec / norms[:, None]).astype(np.float32)

        architecture: Architecture[Any] = arch_cls(config, params)
        if apply_b_dec:
            architecture = architecture.shifted_input(b_dec.astype(np.float64))
        if scaling_factor is not None:
            architecture = architecture.scaled_input(scaling_factor)
            w_dec = (w_dec / scaling_factor).astype(np.float32)
            b_dec = (b_dec / scaling_factor).astype(np.float32)
    check_folded(weights_path, architecture, w_dec, b_dec)
    return SaeModel(
        architecture=architecture,
        normalization=normalization,
        decoder=Decoder(w_dec, b_dec, w_skip, hook_name_out),
        hook_name=hook_name,
        source_format="saelens",
        sha256=sha256,
        weights_file=weights_path,
        neuronpedia_id=_neuronpedia_id(cfg_path, cfg),
    )


def _architecture(
    cfg_path: Path, cfg: dict[str, Any]
) -> tuple[type[Architecture[Any]], str | None]:
    """The encoder's architecture class, and the SAELens transcoder name when it is one."""
    name = cfg.get("architecture", "standard")
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if activation_fn not in (None, "relu", "topk"):
        raise SaeFileError(
            cfg_path,
            f"field 'activation_fn': expected 'relu' or 'topk', found {activation_fn!r}",
        )
    # SAELens 5.x wrote TopK SAEs as a standard architecture with a topk activation.
    if activation_fn == "topk":
        if name not in ("standard", "topk"):
            raise SaeFileError(
                cfg_path, f"field 'activation_fn': 'topk' does not fit architecture {name!r}"
            )
        name = "topk"
    transcoder = name if isinstance(name, str) and name in TRANSCODERS else None
    if transcoder is not None:
        name = TRANSCODERS[transcoder][0]
    reason = refusal(name) if isinstance(name, str) else None
    if reason is not None:
        raise SaeFileError(cfg_path, f"field 'architecture': {name!r} is refused: {reason}")
    arch_cls = get_architecture(name) if isinstance(name, str) else None
    if arch_cls is None:
        raise SaeFileError(
            cfg_path,
            f"field 'architecture': unknown architecture {name!r}; known: "
            + ", ".join(known_architectures())
            + "; transcoders: "
            + ", ".join(TRANSCODERS),
        )
    return arch_cls, transcoder


def _topk_k(cfg_path: Path, cfg: dict[str, Any], d_sae: int) -> int:
    if "k" in cfg:
        k = positive_int(cfg_path, cfg, "k")
        field = "k"
    else:
        kwargs = cfg.get("activation_fn_kwargs")
        if not isinstance(kwargs, dict) or "k" not in kwargs:
            raise SaeFileError(
                cfg_path, "missing field 'k' (or 'activation_fn_kwargs.k') for a topk SAE"
            )
        k = positive_int(cfg_path, kwargs, "k")
        field = "activation_fn_kwargs.k"
    if k > d_sae:
        raise SaeFileError(cfg_path, f"field {field!r}: expected at most d_sae={d_sae}, found {k}")
    return k


def _normalization(
    folder: Path, cfg_path: Path, cfg: dict[str, Any]
) -> tuple[InputNormalization, float | None]:
    value = cfg.get("normalize_activations", "none")
    # Pre-6.0 configs stored a bool: true meant expected_average_only_in.
    if value is None or value is False or value == "none":
        return "none", None
    if value is True or value == "expected_average_only_in":
        return "none", _stored_scaling_factor(folder, cfg_path, cfg)
    if value == "constant_norm_rescale":
        return "constant_norm_rescale", None
    if value == "layer_norm":
        return "layer_norm", None
    raise SaeFileError(
        cfg_path,
        "field 'normalize_activations': expected one of none, expected_average_only_in, "
        f"constant_norm_rescale, layer_norm; found {value!r}",
    )


def _stored_scaling_factor(folder: Path, cfg_path: Path, cfg: dict[str, Any]) -> float:
    scaler_path = folder / SCALER_FILE
    if scaler_path.is_file():
        scaler = read_json_object(scaler_path)
        if scaler.get("has_whitening"):
            raise SaeFileError(
                scaler_path, "field 'has_whitening': activation whitening is not supported"
            )
        return _factor(scaler_path, scaler, "scaling_factor")
    if "norm_scaling_factor" in cfg:
        return _factor(cfg_path, cfg, "norm_scaling_factor")
    raise SaeFileError(
        cfg_path,
        "field 'normalize_activations' is 'expected_average_only_in' but no scaling factor is "
        f"stored (expected {SCALER_FILE} next to it or a 'norm_scaling_factor' field); fold "
        "the factor into the weights (SAELens fold_activation_norm_scaling_factor) and set "
        "normalize_activations to 'none'",
    )


def _factor(path: Path, values: dict[str, Any], key: str) -> float:
    value = values.get(key)
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        # float(): an integer beyond the float range (JSON allows 10**400) overflows.
        with contextlib.suppress(OverflowError):
            number = float(value)
    if number is None or not np.isfinite(number) or number <= 0:
        raise SaeFileError(path, f"field {key!r}: expected a positive number, found {value!r}")
    return number


def _hook_name(cfg_path: Path, cfg: dict[str, Any], required: bool) -> str:
    for section in ("metadata", "meta"):
        meta = cfg.get(section)
        if isinstance(meta, dict) and isinstance(meta.get("hook_name"), str):
            return str(meta["hook_name"])
    for key in ("hook_name", "hook_point"):
        if isinstance(cfg.get(key), str):
            return str(cfg[key])
    if not required:
        return ""
    raise SaeFileError(
        cfg_path, "missing field 'metadata.hook_name' (or 'hook_name'): pass the hook explicitly"
    )


def _hook_name_out(cfg: dict[str, Any]) -> str:
    """A transcoder's output hook (``metadata.hook_name_out`` in 6.x), or "" when unnamed."""
    for section in ("metadata", "meta"):
        meta = cfg.get(section)
        if isinstance(meta, dict) and isinstance(meta.get("hook_name_out"), str):
            return str(meta["hook_name_out"])
    value = cfg.get("hook_name_out")
    return value if isinstance(value, str) else ""


def _neuronpedia_id(cfg_path: Path, cfg: dict[str, Any]) -> str | None:
    """``metadata.neuronpedia_id`` (6.x) or ``neuronpedia_id`` (older); null: None."""
    meta = cfg.get("metadata")
    if isinstance(meta, dict) and meta.get("neuronpedia_id") is not None:
        return neuronpedia_id_field(cfg_path, meta["neuronpedia_id"], "metadata.neuronpedia_id")
    return neuronpedia_id_field(cfg_path, cfg.get("neuronpedia_id"))


def _apply_finetuning_scale(
    weights_path: Path,
    cfg_path: Path,
    cfg: dict[str, Any],
    file: SafetensorsFile,
    w_dec: np.ndarray[Any, np.dtype[np.float32]],
) -> np.ndarray[Any, np.dtype[np.float32]]:
    present = [name for name in _FINETUNING_SCALE_TENSORS if name in file]
    if not present:
        return w_dec
    name = present[0]
    scale = finite_float32(weights_path, name, file.float32(name))
    if scale.shape != (w_dec.shape[0],):
        raise SaeFileError(
            weights_path,
            f"tensor {name!r}: expected shape {[w_dec.shape[0]]} (d_sae), "
            f"found {list(scale.shape)}",
        )
    if np.allclose(scale, 1.0):
        return w_dec
    if not cfg.get("finetuning_scaling_factor"):
        raise SaeFileError(
            cfg_path,
            f"tensor {name!r} in {weights_path.name} is not all ones but field "
            "'finetuning_scaling_factor' is not true",
        )
    return (w_dec * scale[:, None]).astype(np.float32)
