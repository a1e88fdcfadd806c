"""Standard (ReLU) SAE: ``relu(z @ W_enc + b_enc)`` (SAELens ``standard_sae.py``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from guard.sae.architectures.base import Architecture, ArchitectureConfig, FloatArray, IndexArray
from guard.sae.graph import GraphBuilder
from guard.sae.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class StandardConfig(ArchitectureConfig):
    """A ReLU SAE has no settings beyond its sizes."""


@register_architecture
class StandardSae(Architecture[StandardConfig]):
    name = "standard"
    config_type = StandardConfig
    feature_params = ("b_enc",)
    pre_activation_biases = ("b_enc",)

    def encode(self, z: FloatArray) -> FloatArray:
        pre = z @ self.w_enc + self.params["b_enc"]
        acts: FloatArray = np.maximum(pre, np.float32(0.0))
        return acts

    def encoder_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, *, approximate_topk: bool
    ) -> str:
        return g.op("Relu", [self._pre_activation_graph(g, z, columns, "b_enc")], "acts")
