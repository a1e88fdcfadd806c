"""vLLM's ``vllm.general_plugins`` entry point (``activation_guard``): vLLM calls
:func:`register` in each of its processes at start-up. It registers the guard's custom op, so
that a compiled graph that calls it (from vLLM's compile cache) finds it in any process, and,
where the guard is configured (``GUARD_VLLM_ADDRESS`` is set), the hooks that give chat
requests their row roles (:mod:`guard.vllm.roles`). Attaching the guard takes the worker and
scheduler classes (docs/vllm.md)."""

from __future__ import annotations

import os


def register() -> None:
    import guard.vllm.attach  # noqa: F401  # registers activation_guard::inspect
    from guard.vllm.settings import PREFIX

    if os.environ.get(PREFIX + "ADDRESS", "").strip():
        from guard.vllm.roles import install_or_warn

        install_or_warn()
