"""An SAE in the runtime's canonical form, whatever format it came from.

Loaders turn SAELens, sparsify, Gemma Scope and exported artifacts into a :class:`SaeModel`:
an input normalisation, an architecture's encoder (with ``b_dec`` centering and scaling
factors already folded in), and the decoder. Everything downstream (ONNX graphs, the NumPy
reference encode, reconstructions, decoder directions) reads only this form, so each
convention lives in exactly one loader.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
from numpy.typing import NDArray

from guard.errors import InvalidInput, SaeFileError
from guard.sae.architectures.base import Architecture, FloatArray, IndexArray
from guard.sae.graph import INPUT_NAME, GraphBuilder, GraphDtype

InputNormalization = Literal["none", "constant_norm_rescale", "layer_norm"]
INPUT_NORMALIZATIONS: tuple[str, ...] = get_args(InputNormalization)

SourceFormat = Literal["saelens", "sparsify", "gemmascope", "artifact", "openai", "goodfire",
                       "gemmascope2", "llamascope"]

# SAELens's layer_norm adds this to the standard deviation before dividing.
LAYER_NORM_EPS = 1e-5
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Decoder parameters; ``W_dec`` rows already include any per-feature decode scale.

    An SAE's decoder writes back the hook its encoder reads (``d_out == d_in``); a
    transcoder's writes another one, ``hook_name_out``, ``d_out`` wide."""

    w_dec: FloatArray
    """``[d_sae, d_out]``: row ``i`` is what one unit of feature ``i`` adds to the output."""
    b_dec: FloatArray
    """``[d_out]``."""
    w_skip: FloatArray | None = None
    """``[d_out, d_in]`` skip connection (sparsify ``W_skip``, SAELens skip transcoders,
    Gemma Scope 2's ``affine_skip_connection`` transposed): the output gains
    ``x @ W_skip.T``, ``x`` the raw input row."""
    hook_name_out: str | None = None
    """Transcoders only: the hook the decoder writes (empty when the files do not name it).
    None for an SAE, whose decoder reconstructs the hook it reads."""

    @property
    def d_out(self) -> int:
        return int(self.w_dec.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None


@dataclasses.dataclass(frozen=True)
class SaeModel:
    """One SAE, canonical and validated."""

    architecture: Architecture[Any]
    normalization: InputNormalization
    decoder: Decoder
    hook_name: str
    """Where the SAE reads; empty when neither its files nor the caller name it (loaded with
    ``require_hook=False``: encoding rows offline needs no hook, serving and export do)."""
    source_format: SourceFormat
    sha256: str
    """sha256 of the source weights file (for artifacts: of the SAE they were exported from)."""
    weights_file: Path
    """The file ``sha256`` vouches for (for artifacts: their manifest, which records it)."""
    neuronpedia_id: str | None = None
    """Where Neuronpedia keeps the SAE's feature pages, ``model/<layer>-<set>`` (e.g.
    ``gemma-2-2b/20-gemmascope-res-16k``): SAELens's cfg, a converted folder's cfg or an
    artifact's manifest says; None when nothing does (see ``guard.sae.labels``)."""

    @property
    def d_in(self) -> int:
        return int(self.architecture.config.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.architecture.config.d_sae)

    def normalize(self, x: FloatArray) -> FloatArray:
        """The SAE's input normalisation (SAELens ``run_time_activation_norm_fn_in``)."""
        if self.normalization == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / np.linalg.norm(x, axis=-1, keepdims=True)
            return np.asarray(x * coeff, dtype=np.float32)
        if self.normalization == "layer_norm":
            mu = x.mean(axis=-1, keepdims=True)
            centered = x - mu
            std = centered.std(axis=-1, ddof=1, keepdims=True)
            return np.asarray(centered / (std + LAYER_NORM_EPS), dtype=np.float32)
        return x

    def input_limit(self, weight_dtype: str = "fp32") -> float:
        """The largest magnitude a value of an input row may have for the encode of every
        feature to stay finite: what :attr:`guard.sae.Sae.input_limit` documents. Sound for
        the float32 graphs (and int8 ones, whose rows are scaled before the product) with a
        margin of ``4 * d_in`` for rounding; ``fp16`` also keeps the graph's input (the
        normalised rows) within float16's range."""
        budget = FLOAT32_MAX / (4.0 * self.d_in)
        z_limit = self.architecture.input_limit(budget)
        if weight_dtype == "fp16":
            z_limit = min(z_limit, FLOAT16_MAX)
        if self.normalization == "none":
            return z_limit
        # The row's sum of squares (ReduceL2, ReduceSumSquare) must stay finite in float32:
        # d_in * max|x|^2 (layer_norm: of x - mean, up to twice max|x|) within float32 / 4.
        norm_limit = math.sqrt(FLOAT32_MAX / (4.0 * self.d_in))
        if self.normalization == "layer_norm":
            norm_limit /= 2.0
        # Normalised rows have |z_i| <= sqrt(d_in): the weights must take that.
        return norm_limit if math.sqrt(self.d_in) <= z_limit else 0.0

    def check_steerable(self) -> None:
        """Refuse steering through a transcoder: a steering edit adds decoder rows to the rows
        of the hook the SAE reads, and a transcoder's decoder rows belong to another hook
        (``hook_name_out``), so adding them there has no meaning."""
        if not self.decoder.is_transcoder:
            return
        out = self.decoder.hook_name_out or "a hook its files do not name"
        raise InvalidInput(
            f"steering through the SAE at {self.hook_name!r} is refused: it is a transcoder "
            f"({self.architecture.name} encoder, {self.source_format}), which reads the input "
            f"of a computation and whose decoder predicts its output ({out}, "
            f"d_out={self.decoder.d_out}), so its decoder rows are no direction in the rows "
            "being steered; steer with an SAE of the hook to change"
        )

    def encode(self, x: FloatArray) -> FloatArray:
        """Reference encode in NumPy float32 (the ONNX graph computes the same)."""
        acts: FloatArray = self.architecture.encode(self.normalize(x))
        return acts

    def decode(self, acts: FloatArray, x: FloatArray | None = None) -> FloatArray:
        """Reconstruct rows from full feature activations ``[rows, d_sae]``.

        ``x`` (the encoded rows) is needed when the SAE normalises its input (the output is
        un-normalised with the input's statistics) or has a skip connection. A transcoder's
        output (``[rows, d_out]``, at its output hook) is not un-normalised: SAELens's
        ``Transcoder.decode`` leaves it as the decoder writes it.
        """
        out = acts.astype(np.float32) @ self.decoder.w_dec + self.decoder.b_dec
        if self.decoder.w_skip is not None:
            if x is None:
                raise ValueError("this SAE has a skip connection: decode needs the input rows")
            out = out + x @ self.decoder.w_skip.T
        if self.normalization == "none" or self.decoder.is_transcoder:
            return np.asarray(out, dtype=np.float32)
        if x is None:
            raise ValueError(f"{self.normalization} SAEs need the input rows to decode")
        if self.normalization == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / np.linalg.norm(x, axis=-1, keepdims=True)
            return np.asarray(out / coeff, dtype=np.float32)
        mu = x.mean(axis=-1, keepdims=True)
        std = (x - mu).std(axis=-1, ddof=1, keepdims=True)
        return np.asarray(out * std + mu, dtype=np.float32)

    def encoder_model(
        self,
        columns: IndexArray | None,
        dtype: GraphDtype,
        *,
        approximate_topk: bool = False,
        for_int8: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX encoder over ``columns`` (None: all features) in ``dtype`` weights;
        ``for_int8`` shapes the matmul for dynamic quantization (see ``GraphBuilder.matmul``)."""
        g = GraphBuilder(dtype, row_scaled_matmul=for_int8)
        z = g.to_weight_dtype(self._normalization_graph(g))
        acts = self.architecture.encoder_graph(g, z, columns, approximate_topk=approximate_topk)
        n_out = self.d_sae if columns is None else len(columns)
        doc = (
            f"{self.architecture.name} SAE encoder for {self.hook_name}: d_in={self.d_in}, "
            f"d_sae={self.d_sae}, source sha256 {self.sha256}"
        )
        return g.model(g.to_float32(acts), self.d_in, n_out, doc)

    def _normalization_graph(self, g: GraphBuilder) -> str:
        x = INPUT_NAME
        if self.normalization == "constant_norm_rescale":
            norm = g.op("ReduceL2", [x], "row_norm", axes=[1], keepdims=1)
            root_d = g.const("sqrt_d_in", np.array(math.sqrt(self.d_in), dtype=np.float32))
            return g.op("Mul", [x, g.op("Div", [root_d, norm], "norm_coeff")], "z")
        if self.normalization == "layer_norm":
            mu = g.op("ReduceMean", [x], "row_mean", axes=[1], keepdims=1)
            centered = g.op("Sub", [x, mu], "centered")
            sum_sq = g.op("ReduceSumSquare", [centered], "sum_sq", axes=[1], keepdims=1)
            # torch's std is the unbiased one (divides by d_in - 1).
            dof = g.const("dof", np.array(self.d_in - 1, dtype=np.float32))
            std = g.op("Sqrt", [g.op("Div", [sum_sq, dof], "var")], "std")
            eps = g.const("eps", np.array(LAYER_NORM_EPS, dtype=np.float32))
            return g.op("Div", [centered, g.op("Add", [std, eps], "std_eps")], "z")
        return x


def checked_params(
    path: Path,
    architecture: type[Architecture[Any]],
    config: Any,
    params: Mapping[str, NDArray[Any]],
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, FloatArray]:
    """Float32 copies of ``params`` after checking their shapes against the config and that
    every value is finite. ``names`` maps canonical names to the names in the file, so errors
    name the field the user can find."""
    shapes = architecture.param_shapes(config)
    checked: dict[str, FloatArray] = {}
    for name, shape in shapes.items():
        field = (names or {}).get(name, name)
        array = params[name]
        if tuple(array.shape) != shape:
            raise SaeFileError(
                path,
                f"tensor {field!r}: expected shape {list(shape)} (d_in={config.d_in}, "
                f"d_sae={config.d_sae}), found {list(array.shape)}",
            )
        checked[name] = finite_float32(path, field, array)
    return checked


def finite_float32(path: Path, field: str, array: NDArray[Any]) -> FloatArray:
    """``array`` as float32, refusing NaN or infinite values (they poison every feature)."""
    with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes Inf: refused
        values = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        first = np.unravel_index(int(np.argmin(finite)), values.shape)
        overflow = "" if values.dtype == array.dtype else " or beyond the float32 range"
        raise SaeFileError(
            path,
            f"tensor {field!r}: expected finite values, found {bad} NaN/Inf{overflow} "
            f"(first at index {list(map(int, first))})",
        )
    return values


def check_decoder(
    path: Path,
    d_in: int,
    d_sae: int,
    w_dec: NDArray[Any],
    b_dec: NDArray[Any],
    *,
    w_dec_name: str = "W_dec",
    b_dec_name: str = "b_dec",
    width: str = "d_in",
) -> tuple[FloatArray, FloatArray]:
    """Shape- and value-checked float32 decoder weights; ``d_in`` is the decoder's output
    width, named ``width`` in errors (a transcoder's is ``d_out``)."""
    if tuple(w_dec.shape) != (d_sae, d_in):
        raise SaeFileError(
            path,
            f"tensor {w_dec_name!r}: expected shape {[d_sae, d_in]} (d_sae, {width}), "
            f"found {list(w_dec.shape)}",
        )
    if tuple(b_dec.shape) != (d_in,):
        raise SaeFileError(
            path,
            f"tensor {b_dec_name!r}: expected shape {[d_in]} ({width}), found {list(b_dec.shape)}",
        )
    return finite_float32(path, w_dec_name, w_dec), finite_float32(path, b_dec_name, b_dec)


def check_skip(path: Path, name: str, w_skip: NDArray[Any], d_out: int, d_in: int) -> FloatArray:
    """A shape- and value-checked ``[d_out, d_in]`` skip connection (``x @ W_skip.T``)."""
    if tuple(w_skip.shape) != (d_out, d_in):
        raise SaeFileError(
            path,
            f"tensor {name!r}: expected shape {[d_out, d_in]} (d_out, d_in: the output gains "
            f"x @ {name}.T), found {list(w_skip.shape)}",
        )
    return finite_float32(path, name, w_skip)


def check_folded(weights_path: Path, architecture: Architecture[Any], w_dec: FloatArray,
                 b_dec: FloatArray) -> None:
    """Every weight still finite after b_dec, scaling factors and norms were folded in."""
    folded = {**architecture.params, "W_dec": w_dec, "b_dec": b_dec}
    for name, array in folded.items():
        if not np.isfinite(array).all():
            raise SaeFileError(
                weights_path,
                f"tensor {name!r}: NaN/Inf once b_dec, the activation scaling factor and "
                "decoder norms are folded in (values too large for float32; check "
                "norm_scaling_factor, b_dec and W_dec)",
            )
