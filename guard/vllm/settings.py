"""The vLLM integration's settings, from ``GUARD_VLLM_*`` environment variables (vLLM builds
the worker itself, so its settings cannot be constructor arguments). Imports no vLLM."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from guard.errors import GuardError

PREFIX: Final = "GUARD_VLLM_"
#: The hooks the integration reads: the residual stream after decoder layer L.
HOOK_PATTERN: Final = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
#: ``SamplingParams.extra_args`` key (``vllm_xargs`` in the OpenAI server) naming the request
#: to the guard; without it the guard sees the id the client gave vLLM.
REQUEST_ID_ARG: Final = "guard_request_id"


class VllmSetupError(GuardError):
    """The guard cannot attach to this vLLM engine as configured (raised at start-up, so that
    an engine never runs believing it is guarded when it is not)."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class VllmGuardSettings:
    """What the worker attaches with.

    - ``GUARD_VLLM_ADDRESS`` (required): the guard, ``unix:///path/guard.sock`` or host:port.
    - ``GUARD_VLLM_HOOKS``: comma-separated ``blocks.L.hook_resid_post`` (default: the hooks
      the guard serves, from its Describe; the guard must then be up at start-up).
    - ``GUARD_VLLM_MODE``: ``inline`` (default: wait for verdicts, steer, abort) or
      ``monitor`` (send and go on: the guard observes and records only).
    - ``GUARD_VLLM_DEADLINE_MS`` (default 200): INLINE wait per layer per step.
    - ``GUARD_VLLM_FAILURE_POLICY``: ``open`` (default; CONTINUE) or ``closed`` (ABORT every
      request of a step the guard did not answer in time).
    - ``GUARD_VLLM_QUEUE_SIZE`` (default 256): MONITOR steps waiting to be sent.
    - ``GUARD_VLLM_PREFIX_CACHING``: ``refuse`` (default: start-up fails when vLLM's prefix
      cache is on, since cached prompt rows are never computed, so never inspected nor
      steered) or ``allow``.
    - ``GUARD_VLLM_SKIP_POSITIONS`` (default 1): rows at positions below it are not sent
      (position 0 is BOS: in SmolLM2 its residual norm is about 100x the others' and it says
      nothing of the request), as the transformers attachment does.
    - ``GUARD_VLLM_TAP``: a folder; every step's rows, as sent, are also written there
      (``.npz`` per layer and step). For tests and debugging only.
    """

    address: str
    hooks: tuple[str, ...] = ()
    mode: Literal["inline", "monitor"] = "inline"
    deadline_ms: float = 200.0
    failure_policy: Literal["open", "closed"] = "open"
    queue_size: int = 256
    prefix_caching: Literal["refuse", "allow"] = "refuse"
    skip_positions: int = 1
    tap: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VllmGuardSettings:
        values = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return values.get(PREFIX + name, default).strip()

        address = get("ADDRESS")
        if not address:
            raise VllmSetupError(f"{PREFIX}ADDRESS is not set: name the guard "
                                 "(unix:///path/guard.sock or host:port)")
        hooks = tuple(h.strip() for h in get("HOOKS").split(",") if h.strip())
        for hook in hooks:
            layer_of(hook)
        mode = get("MODE", "inline").lower()
        if mode not in ("inline", "monitor"):
            raise VllmSetupError(f"{PREFIX}MODE: expected inline or monitor, found {mode!r}")
        policy = get("FAILURE_POLICY", "open").lower()
        if policy not in ("open", "closed"):
            raise VllmSetupError(f"{PREFIX}FAILURE_POLICY: expected open or closed, found "
                                 f"{policy!r}")
        caching = get("PREFIX_CACHING", "refuse").lower()
        if caching not in ("refuse", "allow"):
            raise VllmSetupError(f"{PREFIX}PREFIX_CACHING: expected refuse or allow, found "
                                 f"{caching!r}")
        return cls(address=address, hooks=hooks,
                   mode="inline" if mode == "inline" else "monitor",
                   deadline_ms=_number(get("DEADLINE_MS", "200"), "DEADLINE_MS"),
                   failure_policy="open" if policy == "open" else "closed",
                   queue_size=int(_number(get("QUEUE_SIZE", "256"), "QUEUE_SIZE")),
                   prefix_caching="refuse" if caching == "refuse" else "allow",
                   skip_positions=_count(get("SKIP_POSITIONS", "1"), "SKIP_POSITIONS"),
                   tap=get("TAP"))


def layer_of(hook: str) -> int:
    """The decoder layer of ``blocks.L.hook_resid_post``; VllmSetupError for other hooks."""
    match = HOOK_PATTERN.match(hook)
    if match is None:
        raise VllmSetupError(f"{PREFIX}HOOKS: {hook!r} is not a hook the vLLM integration reads "
                             "(blocks.L.hook_resid_post)")
    return int(match.group(1))


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise VllmSetupError(f"{PREFIX}{name}: expected a number, found {text!r}") from None
    if value <= 0:
        raise VllmSetupError(f"{PREFIX}{name}: expected a positive number, found {text!r}")
    return value


def _count(text: str, name: str) -> int:
    if not text.isdigit():
        raise VllmSetupError(f"{PREFIX}{name}: expected a whole number >= 0, found {text!r}")
    return int(text)
