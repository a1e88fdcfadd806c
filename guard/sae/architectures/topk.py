"""TopK SAE: keep the ``k`` largest pre-activations of each row, ReLU them, zero the rest
(SAELens ``topk_sae.py``; EleutherAI sparsify applies the ReLU before ``topk``, which gives
the same dense activations).

SAELens's ``rescale_acts_by_decoder_norm`` multiplies the pre-activations by each feature's
decoder norm before the selection; the loader folds that product into ``W_enc`` and
``b_enc`` (and divides ``W_dec`` rows by it), so this encoder never sees the flag.

Subsets: whether a feature survives depends on every other feature's pre-activation of the
same row, so an exact subset needs the full pre-activations. The exact subset encoder
therefore runs the full encoder and selects columns: it saves nothing on the matmul. A caller
may opt into ``approximate_topk``: only the requested columns are computed and each is
reported as ``relu(pre)``. That is exact whenever the feature is among the row's top ``k``
and otherwise over-reports (a feature that TopK would have zeroed shows its positive
pre-activation), so it suits detectors that threshold high activations, not reconstruction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import numpy_helper

from guard.sae.architectures.base import Architecture, ArchitectureConfig, FloatArray, IndexArray
from guard.sae.graph import GraphBuilder
from guard.sae.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class TopKConfig(ArchitectureConfig):
    k: int = 32
    """Number of features kept per row."""


@register_architecture
class TopKSae(Architecture[TopKConfig]):
    name = "topk"
    config_type = TopKConfig
    feature_params = ("b_enc",)
    pre_activation_biases = ("b_enc",)
    exact_subsets = False

    def encode(self, z: FloatArray) -> FloatArray:
        pre = z @ self.w_enc + self.params["b_enc"]
        k = self.config.k
        top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        acts = np.zeros_like(pre)
        values = np.maximum(np.take_along_axis(pre, top, axis=1), np.float32(0.0))
        np.put_along_axis(acts, top, values, axis=1)
        return acts

    def encoder_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, *, approximate_topk: bool
    ) -> str:
        if columns is not None and approximate_topk:
            return g.op("Relu", [self._pre_activation_graph(g, z, columns, "b_enc")], "acts")
        pre = self._pre_activation_graph(g, z, None, "b_enc")
        k = g.const("k", np.array([self.config.k], dtype=np.int64))
        values, indices = g.op_multi("TopK", [pre, k], 2, "top", axis=-1, largest=1, sorted=0)
        zeros = g.op(
            "ConstantOfShape",
            [g.op("Shape", [pre], "pre_shape")],
            "zeros",
            value=numpy_helper.from_array(np.zeros(1, dtype=g.np_dtype), "zero_value"),
        )
        acts = g.op(
            "ScatterElements", [zeros, indices, g.op("Relu", [values], "top_relu")], "acts", axis=1
        )
        if columns is None:
            return acts
        return g.op("Gather", [acts, g.const("columns", columns)], "subset", axis=1)
