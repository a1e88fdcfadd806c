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
#: Per-request overrides in ``extra_args``: the request's mode and failure policy.
MODE_ARG: Final = "guard_mode"
FAILURE_POLICY_ARG: Final = "guard_failure_policy"
#: The prompt's row roles as runs (:mod:`guard.vllm.roles`): set by the guard's hook on vLLM's
#: front end from the chat's messages, never by a client (the front end drops a client's).
ROLES_ARG: Final = "guard_roles"
#: The ``extra_args`` keys the guard reads; any other ``guard_*`` key is refused (a typo must
#: not pass for a setting).
REQUEST_ARGS: Final = (REQUEST_ID_ARG, MODE_ARG, FAILURE_POLICY_ARG)
#: What ``GUARD_VLLM_REQUEST_OVERRIDES`` may let a request weaken, and the key it uses.
OVERRIDABLE: Final = {"mode": MODE_ARG, "failure_policy": FAILURE_POLICY_ARG}
#: The longest ``guard_request_id`` accepted.
MAX_REQUEST_ID: Final = 256

Mode = Literal["inline", "monitor"]
FailurePolicy = Literal["open", "closed"]


class VllmSetupError(GuardError):
    """The guard cannot attach to this vLLM engine as configured (raised at start-up, so that
    an engine never runs believing it is guarded when it is not)."""

    code = "FAILED_PRECONDITION"


class RequestArgsError(ValueError):
    """A request's ``guard_*`` extra arguments are malformed or ask for more than the operator
    allows. A ``ValueError``: vLLM's admission check (:mod:`guard.vllm.admission`) turns it
    into an HTTP 400 for the client; without that check the worker ends the request with the
    message as its stop reason."""


@dataclass(frozen=True)
class RequestSettings:
    """What the guard does with one request: the settings a request may change, resolved
    against the server's."""

    #: ``guard_request_id`` when the client gave one.
    name: str | None
    mode: Mode
    failure_policy: FailurePolicy


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
    - ``GUARD_VLLM_REQUEST_OVERRIDES``: ``none`` (default) or a comma-separated subset of
      ``mode,failure_policy``: what a request may weaken for itself through ``guard_mode`` /
      ``guard_failure_policy`` in its extra arguments (:meth:`request_settings`). Asking for
      the server's own setting, or for a stricter failure policy, needs no permission.
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
    request_overrides: frozenset[str] = frozenset()

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
                   tap=get("TAP"),
                   request_overrides=_overrides(get("REQUEST_OVERRIDES", "none")))

    def request_settings(self, extra_args: Mapping[str, object] | None) -> RequestSettings:
        """One request's settings from its ``extra_args`` (``vllm_xargs``).

        A request may always name itself (``guard_request_id``), ask for the server's own
        mode or failure policy, and ask for a stricter failure policy (``closed``) while it
        is INLINE. It may weaken the guard for itself (``guard_mode: monitor`` on an INLINE
        server: observed, never steered nor aborted; ``guard_failure_policy: open`` on a
        ``closed`` server) only when ``GUARD_VLLM_REQUEST_OVERRIDES`` names that setting. It
        cannot ask for INLINE on a MONITOR server (its steps do not wait for verdicts).
        RequestArgsError, naming the key and what was expected, for anything else."""
        args = extra_args or {}
        unknown = sorted(k for k in args if isinstance(k, str) and k.startswith("guard_")
                         and k not in REQUEST_ARGS and k != ROLES_ARG)
        if unknown:
            raise RequestArgsError(f"vllm_xargs: unknown guard argument {unknown[0]!r}; the "
                                   f"guard reads {', '.join(REQUEST_ARGS)}")
        name = args.get(REQUEST_ID_ARG)
        if name is not None and not (isinstance(name, str) and 0 < len(name) <= MAX_REQUEST_ID
                                     and name.isprintable()):
            raise RequestArgsError(f"vllm_xargs: {REQUEST_ID_ARG} must be a non-empty string of "
                                   f"at most {MAX_REQUEST_ID} printable characters, found "
                                   f"{_shown(name)}")
        mode = self._choice(args, MODE_ARG, ("inline", "monitor"), self.mode)
        if mode != self.mode:
            if mode == "inline":
                raise RequestArgsError(f"vllm_xargs: {MODE_ARG}=inline: this server runs the "
                                       "guard in MONITOR mode (GUARD_VLLM_MODE): its steps do "
                                       "not wait for verdicts, so no request can be INLINE")
            self._allowed("mode", f"{MODE_ARG}=monitor")
        policy = self._choice(args, FAILURE_POLICY_ARG, ("open", "closed"),
                              self.failure_policy)
        if FAILURE_POLICY_ARG in args and mode == "monitor" and policy == "closed":
            raise RequestArgsError(f"vllm_xargs: {FAILURE_POLICY_ARG}=closed: a MONITOR "
                                   "request is never aborted; the failure policy applies to "
                                   "INLINE requests")
        if policy == "open" and self.failure_policy == "closed":
            self._allowed("failure_policy", f"{FAILURE_POLICY_ARG}=open")
        return RequestSettings(name=name, mode="inline" if mode == "inline" else "monitor",
                               failure_policy="open" if policy == "open" else "closed")

    def _choice(self, args: Mapping[str, object], key: str, choices: tuple[str, ...],
                default: str) -> str:
        value = args.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            raise RequestArgsError(f"vllm_xargs: {key}: expected {' or '.join(choices)}, found "
                                   f"{_shown(value)}")
        return value.lower()

    def _allowed(self, setting: str, asked: str) -> None:
        if setting not in self.request_overrides:
            raise RequestArgsError(
                f"vllm_xargs: {asked}: this server does not let a request weaken the guard "
                f"for itself (GUARD_VLLM_REQUEST_OVERRIDES does not name {setting})")


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


def _overrides(text: str) -> frozenset[str]:
    names = {n.strip().lower() for n in text.split(",") if n.strip()}
    if names in (set(), {"none"}):
        return frozenset()
    unknown = sorted(names - set(OVERRIDABLE))
    if unknown:
        raise VllmSetupError(f"{PREFIX}REQUEST_OVERRIDES: expected none or a comma-separated "
                             f"list of {', '.join(OVERRIDABLE)}, found {unknown[0]!r}")
    return frozenset(names)


def _shown(value: object) -> str:
    """A value a client sent, for an error message: its type, and short text as is."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    if isinstance(value, int | float | bool):
        return f"{type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"


def _count(text: str, name: str) -> int:
    if not text.isdigit():
        raise VllmSetupError(f"{PREFIX}{name}: expected a whole number >= 0, found {text!r}")
    return int(text)
