"""JumpReLU SAE: ``pre * (pre > threshold)`` for positive ``pre`` (SAELens ``jumprelu_sae.py``,
Gemma Scope's reference ``JumpReLUSAE``).

SAELens computes ``relu(pre) * (pre > relu(threshold))`` and Gemma Scope
``relu(pre) * (pre > threshold)``: the two agree for every threshold (a negative threshold
lets exactly the positive pre-activations through either way). The loader stores
``relu(threshold)``, so a feature is on iff ``pre > threshold`` and then equals ``pre``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from guard.sae.architectures.base import Architecture, ArchitectureConfig, FloatArray, IndexArray
from guard.sae.graph import GraphBuilder
from guard.sae.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class JumpReluConfig(ArchitectureConfig):
    """Per-feature thresholds are parameters, not settings."""


@register_architecture
class JumpReluSae(Architecture[JumpReluConfig]):
    name = "jumprelu"
    config_type = JumpReluConfig
    feature_params = ("b_enc", "threshold")
    pre_activation_biases = ("b_enc",)

    def encode(self, z: FloatArray) -> FloatArray:
        pre = z @ self.w_enc + self.params["b_enc"]
        return np.where(pre > self.params["threshold"], pre, np.float32(0.0))

    def encoder_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, *, approximate_topk: bool
    ) -> str:
        pre = self._pre_activation_graph(g, z, columns, "b_enc")
        threshold = self.params["threshold"]
        if columns is not None:
            threshold = threshold[columns]
        on = g.op("Greater", [pre, g.weight("threshold", threshold)], "on")
        return g.op("Where", [on, pre, g.zero()], "acts")
