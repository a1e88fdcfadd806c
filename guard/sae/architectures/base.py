"""What every SAE architecture provides: a config dataclass and an encoder.

Parameters are held in the runtime's canonical form, after the loader has folded in what
the source format does around the encoder (subtracting ``b_dec``, a stored activation
scaling factor, TopK decoder-norm rescaling). What is left per architecture is the
pre-activation (``z @ W_enc + bias``) and the activation function, in NumPy (the reference
used by export reports and benchmarks) and as ONNX nodes (the runtime).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from guard.sae.graph import GraphBuilder

FloatArray = NDArray[np.float32]
IndexArray = NDArray[np.int64]


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes shared by every architecture."""

    d_in: int
    """Width of the activation rows the SAE reads (the model's residual width)."""

    d_sae: int
    """Number of features (the dictionary size)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


ConfigT = TypeVar("ConfigT", bound=ArchitectureConfig)


class Architecture(ABC, Generic[ConfigT]):
    """An SAE encoder of one architecture over canonical float32 parameters.

    ``W_enc`` is ``[d_in, d_sae]``. Subclasses name their per-feature vectors in
    ``feature_params``; every one of them has shape ``[d_sae]``.
    """

    name: ClassVar[str]
    config_type: ClassVar[type[ArchitectureConfig]]
    feature_params: ClassVar[tuple[str, ...]]
    pre_activation_biases: ClassVar[tuple[str, ...]]
    """The biases added to ``z @ W_enc``: folding an input shift moves them."""

    exact_subsets: ClassVar[bool] = True
    """Whether a feature's activation depends on that feature's column alone."""

    def __init__(self, config: ConfigT, params: Mapping[str, FloatArray]) -> None:
        self.config = config
        self.params: dict[str, FloatArray] = dict(params)

    @classmethod
    def param_shapes(cls, config: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
        """The shape each canonical parameter must have."""
        shapes: dict[str, tuple[int, ...]] = {"W_enc": (config.d_in, config.d_sae)}
        shapes.update({name: (config.d_sae,) for name in cls.feature_params})
        return shapes

    @property
    def w_enc(self) -> FloatArray:
        return self.params["W_enc"]

    def shifted_input(self, shift: NDArray[np.float64]) -> Self:
        """The same encoder for inputs ``z + shift``: encoding ``z`` here equals encoding
        ``z - shift`` before. Loaders use it to fold ``x - b_dec`` into the biases, which
        saves a subtraction over every row on the hot path."""
        moved = shift @ self.w_enc.astype(np.float64)
        params = dict(self.params)
        for name in self.pre_activation_biases:
            params[name] = (params[name] - moved * self.bias_gain(name)).astype(np.float32)
        return type(self)(self.config, params)

    def bias_gain(self, bias: str) -> NDArray[np.float64] | float:
        """How much of ``z @ W_enc`` the pre-activation that ``bias`` belongs to sees."""
        del bias
        return 1.0

    def scaled_input(self, factor: float) -> Self:
        """The same encoder for inputs divided by ``factor`` (folds a stored activation
        scaling factor: SAELens ``fold_activation_norm_scaling_factor``)."""
        params = dict(self.params)
        params["W_enc"] = (self.w_enc.astype(np.float64) * factor).astype(np.float32)
        return type(self)(self.config, params)

    def input_limit(self, budget: float) -> float:
        """The largest ``max|z|`` (over a row's values) for which every pre-activation of
        every feature, and every partial sum of ``z @ W_enc`` on the way to it, stays within
        ``budget`` in magnitude: ``|gain_j * (z @ W_enc)_j + b_j| <= max|z| * L1_j *
        max(1, gain_j) + |b_j|``, with ``L1_j`` the L1 norm of column ``j`` of ``W_enc``
        (float64, in slices of rows: no copy of the whole matrix). Infinite when no column
        has weight; 0 when even ``z = 0`` would not fit (weights beyond any use)."""
        w_enc = self.w_enc
        d_in, d_sae = w_enc.shape
        l1 = np.zeros(d_sae, dtype=np.float64)
        step = max(1, (1 << 22) // max(1, d_sae))  # about 32 MiB of float64 per slice
        for start in range(0, d_in, step):
            l1 += np.abs(np.asarray(w_enc[start:start + step], dtype=np.float64)).sum(axis=0)
        limit = float("inf")
        for bias in self.pre_activation_biases:
            gain = np.maximum(1.0, np.abs(np.asarray(self.bias_gain(bias), dtype=np.float64)))
            slope = l1 * gain
            room = budget - np.abs(self.params[bias].astype(np.float64))
            if (room < 0).any():
                return 0.0
            weighted = slope > 0
            if weighted.any():
                limit = min(limit, float(np.min(room[weighted] / slope[weighted])))
        return limit

    @abstractmethod
    def encode(self, z: FloatArray) -> FloatArray:
        """Feature activations ``[rows, d_sae]`` of normalised rows ``z`` (NumPy, float32)."""

    @abstractmethod
    def encoder_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, *, approximate_topk: bool
    ) -> str:
        """Add the encoder to ``g`` for input ``z`` (weight dtype); return the output name.

        ``columns`` None means all features; otherwise the output has one column per id,
        in the order given.
        """

    def _pre_activation_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, bias: str
    ) -> str:
        w_enc = self.w_enc if columns is None else self.w_enc[:, columns]
        b = self.params[bias] if columns is None else self.params[bias][columns]
        h = g.matmul(z, g.weight("W_enc", w_enc))
        return g.op("Add", [h, g.weight(bias, b)], "pre")
