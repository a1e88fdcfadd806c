"""Row roles for vLLM's chat requests: computed where the messages are known, carried to the
worker in the request's ``extra_args``.

Where: vLLM's front end (``LLM.chat`` offline, the OpenAI chat endpoint online) renders a
chat through its renderer (``HfRenderer.render_messages``), then builds the engine request
(``InputProcessor.process_inputs``); the engine core never sees the messages. :func:`install`
(run in every vLLM process by the ``vllm.general_plugins`` entry point, :mod:`guard.vllm.plugin`)
wraps both:

1. after vLLM renders a conversation, the same conversation goes through
   :func:`guard.host.chat.render`, the one path from messages to rows (the transformers
   attach, the demo and calibration use it too), which gives its token ids and each token's
   role; they wait in a small bounded table, keyed by the token ids;
2. when the engine request is built, its prompt's token ids are looked up there: only an
   exact match gets roles (a prompt vLLM tokenised otherwise, truncated, or that was never a
   chat gets none), put into the request's ``extra_args[ROLES_ARG]`` as runs
   (:func:`encode_runs`). A ``guard_roles`` the client sent itself (``vllm_xargs``) is
   dropped first: a client must not say which of its rows detectors skip.

The worker reads the runs back (:func:`decode_runs`, against the prompt's length) and labels
each prompt row by its position, so chunked prefill and recomputation after a preemption get
the same roles; generated rows are :attr:`RowRole.GENERATED`. A request without roles has
its prompt rows :attr:`RowRole.UNSPECIFIED` (every detector reads them).

Only :func:`install` imports vLLM.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import structlog
from numpy.typing import NDArray

from guard.decision import RowRole
from guard.vllm.settings import ROLES_ARG

log = structlog.get_logger("guard.vllm")

#: Rendered chats waiting for their engine request (a request is built right after its
#: chat is rendered; the bound only matters for renders that never become one).
STASH_SIZE: Final = 1024
_MAX_ROLE: Final = int(max(RowRole))


def encode_runs(roles: NDArray[np.integer] | Sequence[int]) -> list[int]:
    """Per-token roles as runs ``[role, count, role, count, ...]`` (a chat prompt is a few
    runs: template, system, template, user, template...)."""
    values = np.asarray(roles, dtype=np.int64)
    if values.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    counts = np.diff(np.r_[starts, values.size])
    return [int(v) for pair in zip(values[starts], counts, strict=True) for v in pair]


def decode_runs(runs: object, prompt_length: int) -> NDArray[np.int8]:
    """The per-position roles of a prompt of ``prompt_length`` tokens from
    :func:`encode_runs`'s list; ValueError saying what is wrong (not a list of integer
    pairs, an unknown role, a count below 1, counts that do not add up to the prompt)."""
    if not isinstance(runs, list | tuple) or len(runs) % 2:
        raise ValueError(f"{ROLES_ARG}: expected a list of [role, count] pairs")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in runs):
        raise ValueError(f"{ROLES_ARG}: expected integers")
    values = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    roles, counts = values[:, 0], values[:, 1]
    if ((roles < 0) | (roles > _MAX_ROLE)).any():
        raise ValueError(f"{ROLES_ARG}: expected RowRole values (0 to {_MAX_ROLE})")
    if (counts < 1).any():
        raise ValueError(f"{ROLES_ARG}: expected counts >= 1")
    if int(counts.sum()) != prompt_length:
        raise ValueError(f"{ROLES_ARG}: the runs cover {int(counts.sum())} tokens, the prompt "
                         f"has {prompt_length}")
    return np.repeat(roles, counts).astype(np.int8)


class RoleStash:
    """Rendered chats' roles by token ids, from the render to the engine request. Bounded
    (the oldest go first); thread-safe (the OpenAI server renders on worker threads)."""

    def __init__(self, size: int = STASH_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[int, ...], NDArray[np.int8]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, token_ids: Sequence[int], roles: NDArray[np.int8]) -> None:
        key = tuple(int(t) for t in token_ids)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = roles
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def take(self, token_ids: Sequence[int] | None) -> NDArray[np.int8] | None:
        """The roles rendered for exactly these token ids (removed), or None."""
        if not token_ids or not self._entries:
            return None
        key = tuple(int(t) for t in token_ids)
        with self._lock:
            return self._entries.pop(key, None)


#: The process's stash (the front end renders and builds requests in one process).
STASH: Final = RoleStash()
_logged_failure = False


def remember_chat(tokenizer: Any, conversation: Sequence[Mapping[str, Any]],
                  template_kwargs: Mapping[str, Any], stash: RoleStash = STASH) -> bool:
    """Render ``conversation`` through :func:`guard.host.chat.render` with vLLM's template
    arguments and keep its roles by token ids; whether it could (a conversation whose
    content is not plain text, or that the template changes, gets no roles; logged once)."""
    global _logged_failure
    from guard.host.chat import render

    kwargs = {k: v for k, v in template_kwargs.items()
              if k not in ("tokenize", "return_dict", "add_generation_prompt")}
    try:
        rendered = render(tokenizer, conversation,
                          add_generation_prompt=bool(template_kwargs.get(
                              "add_generation_prompt", True)), **kwargs)
    except Exception as exc:  # never fail a request for its roles
        if not _logged_failure:
            _logged_failure = True
            log.info("a chat request's rows get no roles (its rows are read by every "
                     "detector; logged once)", reason=type(exc).__name__)
        return False
    stash.put(rendered.token_ids, rendered.roles)
    return True


def with_roles(request: Any, stash: RoleStash = STASH) -> Any:
    """Put the roles rendered for ``request``'s prompt (an ``EngineCoreRequest``) into its
    sampling params' ``extra_args``, if there are any."""
    roles = stash.take(getattr(request, "prompt_token_ids", None))
    params = getattr(request, "sampling_params", None)
    if roles is not None and params is not None:
        # A new dict: the one there may be the caller's, shared between requests.
        params.extra_args = {**(params.extra_args or {}), ROLES_ARG: encode_runs(roles)}
    return request


def without_client_roles(params: Any) -> Any:
    """``params`` without a ``guard_roles`` the client set (a copy when it had one)."""
    extra = getattr(params, "extra_args", None)
    if not extra or ROLES_ARG not in extra:
        return params
    params = params.clone()
    params.extra_args = {k: v for k, v in extra.items() if k != ROLES_ARG} or None
    return params


_installed = False


def install() -> None:
    """Wrap vLLM's chat renderer and request builder (idempotent; vLLM 0.32)."""
    global _installed
    if _installed:
        return
    from vllm.renderers.hf import HfRenderer
    from vllm.v1.engine.input_processor import InputProcessor

    render_messages = HfRenderer.render_messages
    render_messages_async = HfRenderer.render_messages_async
    process_inputs = InputProcessor.process_inputs

    @functools.wraps(render_messages)
    def rendered(self: Any, messages: Any, params: Any) -> Any:
        result = render_messages(self, messages, params)
        _remember(self, result[0], params)
        return result

    @functools.wraps(render_messages_async)
    async def rendered_async(self: Any, messages: Any, params: Any) -> Any:
        result = await render_messages_async(self, messages, params)
        _remember(self, result[0], params)
        return result

    @functools.wraps(process_inputs)
    def processed(self: Any, request_id: str, prompt: Any, params: Any, *args: Any,
                  **kwargs: Any) -> Any:
        request = process_inputs(self, request_id, prompt, without_client_roles(params),
                                 *args, **kwargs)
        return with_roles(request)

    HfRenderer.render_messages = rendered
    HfRenderer.render_messages_async = rendered_async
    InputProcessor.process_inputs = processed
    _installed = True


def _remember(renderer: Any, conversation: Any, params: Any) -> None:
    try:
        kwargs = params.get_apply_chat_template_kwargs()
        tokenizer = renderer.get_tokenizer()
    except Exception as exc:  # never fail a request for its roles
        log.info("a chat request's rows get no roles", reason=type(exc).__name__)
        return
    remember_chat(tokenizer, conversation, kwargs)


def install_or_warn() -> None:
    """:func:`install`, or a warning when this vLLM cannot take it (requests then carry no
    roles: every detector reads every prompt row, template markup included)."""
    try:
        install()
    except Exception as exc:
        log.warning("guard.vllm: cannot hook vLLM's chat rendering; requests get no row roles",
                    error=f"{type(exc).__name__}: {exc}")
