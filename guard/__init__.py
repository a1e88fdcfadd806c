"""Activation Guard: a gRPC sidecar that reads an LLM's activations through sparse
autoencoders and lets plugins detect, steer and record.

The public plugin API is what this module exports: the ``hookimpl`` marker, the data types
handed to and returned from hooks, and :class:`Settings`, the strict reader of a plugin's
settings. Everything else is internal.
"""

from __future__ import annotations

from guard.decision import (
    Action,
    Decision,
    EditKind,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    FindingAction,
    Phase,
    PluginRun,
    Reconstruction,
    RequestEndReason,
    RowRole,
    Steering,
)
from guard.errors import ConfigError
from guard.hookspecs import hookimpl
from guard.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ConfigError",
    "Decision",
    "EditKind",
    "FeatureBatch",
    "FeatureEdit",
    "FeatureRequest",
    "Finding",
    "FindingAction",
    "Phase",
    "PluginRun",
    "Reconstruction",
    "RequestEndReason",
    "RowRole",
    "Settings",
    "Steering",
    "__version__",
    "hookimpl",
]
