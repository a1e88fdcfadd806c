"""SAE architectures, one module each; importing this package registers them all."""

from __future__ import annotations

from guard.sae.architectures import refused  # noqa: F401  (registers the refusals)
from guard.sae.architectures.base import Architecture, ArchitectureConfig
from guard.sae.architectures.gated import GatedConfig, GatedSae
from guard.sae.architectures.jumprelu import JumpReluConfig, JumpReluSae
from guard.sae.architectures.standard import StandardConfig, StandardSae
from guard.sae.architectures.topk import TopKConfig, TopKSae

__all__ = [
    "Architecture",
    "ArchitectureConfig",
    "GatedConfig",
    "GatedSae",
    "JumpReluConfig",
    "JumpReluSae",
    "StandardConfig",
    "StandardSae",
    "TopKConfig",
    "TopKSae",
]
