"""vLLM's admission check of the guard's per-request arguments:
``--logits-processors guard.vllm.admission:GuardArgsCheck``.

vLLM asks every custom logits processor to validate each request's ``SamplingParams`` before
the request reaches the engine (in the OpenAI server's own process), and answers a
``ValueError`` with HTTP 400 and its message. This one checks the request's ``guard_*`` extra
arguments (``vllm_xargs``) against the server's ``GUARD_VLLM_*`` settings
(:meth:`guard.vllm.settings.VllmGuardSettings.request_settings`), so that a request asking for
an override the operator did not allow is refused before it runs. It changes no logits.

Without it the worker applies the same rules when it first sees the request and ends a refused
request at once (finish reason ``abort``, stop reason ``guard:refused: <why>``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor

from guard.vllm.settings import ROLES_ARG, RequestArgsError, VllmGuardSettings


@cache
def _settings() -> VllmGuardSettings:
    return VllmGuardSettings.from_env()


class GuardArgsCheck(LogitsProcessor):  # type: ignore[misc]  # vLLM is untyped here
    """Refuses requests whose ``guard_*`` arguments the server does not accept; a no-op on
    logits."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None)
        if extra and ROLES_ARG in extra:  # the front end's hook drops it before this check
            raise RequestArgsError(f"vllm_xargs: {ROLES_ARG} is set by the guard from the "
                                   "chat's messages, not by a client")
        _settings().request_settings(extra)

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: Any) -> Any:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        pass
