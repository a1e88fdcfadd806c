"""vLLM's ``vllm.general_plugins`` entry point (``activation_guard``): vLLM calls
:func:`register` in each of its processes at start-up. It registers the guard's custom op, so
that a compiled graph that calls it (from vLLM's compile cache) finds it in any process.
Attaching the guard takes the worker and scheduler classes (docs/vllm.md)."""

from __future__ import annotations


def register() -> None:
    import guard.vllm.attach  # noqa: F401  # registers activation_guard::inspect
