"""Gated SAE (SAELens ``gated_sae.py``): a gate path decides which features fire, a
magnitude path (the same ``W_enc`` scaled per feature by ``exp(r_mag)``) says how much:

``acts = (z @ W_enc + b_gate > 0) * relu(z @ W_enc * exp(r_mag) + b_mag)``

The runtime multiplies ``z @ W_enc`` once and scales the product per feature, which is the
same sum as SAELens's ``z @ (W_enc * exp(r_mag))`` and half the matmul work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from guard.sae.architectures.base import Architecture, ArchitectureConfig, FloatArray, IndexArray
from guard.sae.graph import GraphBuilder
from guard.sae.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class GatedConfig(ArchitectureConfig):
    """Gate and magnitude biases and ``r_mag`` are parameters, not settings."""


@register_architecture
class GatedSae(Architecture[GatedConfig]):
    name = "gated"
    config_type = GatedConfig
    feature_params = ("b_gate", "b_mag", "r_mag")
    pre_activation_biases = ("b_gate", "b_mag")

    def bias_gain(self, bias: str) -> NDArray[np.float64] | float:
        if bias == "b_mag":
            return np.exp(self.params["r_mag"].astype(np.float64))
        return 1.0

    def encode(self, z: FloatArray) -> FloatArray:
        h = z @ self.w_enc
        gate = h + self.params["b_gate"] > 0
        magnitude = h * np.exp(self.params["r_mag"]) + self.params["b_mag"]
        return np.where(gate, np.maximum(magnitude, np.float32(0.0)), np.float32(0.0))

    def encoder_graph(
        self, g: GraphBuilder, z: str, columns: IndexArray | None, *, approximate_topk: bool
    ) -> str:
        def per_feature(name: str) -> NDArray[np.float32]:
            values = self.params[name]
            return values if columns is None else values[columns]

        w_enc = self.w_enc if columns is None else self.w_enc[:, columns]
        h = g.matmul(z, g.weight("W_enc", w_enc))
        gate_pre = g.op("Add", [h, g.weight("b_gate", per_feature("b_gate"))], "gate_pre")
        gate = g.op("Greater", [gate_pre, g.zero()], "gate")
        r_mag = np.exp(per_feature("r_mag").astype(np.float64)).astype(np.float32)
        scaled = g.op("Mul", [h, g.weight("exp_r_mag", r_mag)], "mag_h")
        magnitude = g.op("Add", [scaled, g.weight("b_mag", per_feature("b_mag"))], "mag_pre")
        return g.op("Where", [gate, g.op("Relu", [magnitude], "mag"), g.zero()], "acts")
