"""Activation Guard: a gRPC sidecar that reads an LLM's activations through sparse
autoencoders and lets plugins detect, steer and record."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
