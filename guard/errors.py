"""Domain errors: what went wrong, in the guard's own terms (no gRPC here).

Raise the most specific class; the sidecar turns it into a status (or a per-batch error
reply) through :func:`guard.sidecar.status.status_code`, the one place that maps them.
Anything that is not a :class:`GuardError` is a bug: the client gets INTERNAL with a generic
message and the details go to the log only.
"""

from __future__ import annotations

import reprlib


class GuardError(Exception):
    """Base class of every error the guard raises on purpose.

    ``code`` names the gRPC status (``grpc.StatusCode`` member) the error maps to.
    """

    code: str = "INTERNAL"


class InvalidInput(GuardError):
    """The peer sent something malformed (bad tensor, bad shape, bad field)."""

    code = "INVALID_ARGUMENT"


class NotFound(GuardError):
    """The peer named something the guard does not serve (a hook, a feature)."""

    code = "NOT_FOUND"


class AlreadySeen(GuardError):
    """A sequence number was repeated or went backwards on a stream."""

    code = "ALREADY_EXISTS"


class ProtocolViolation(GuardError):
    """Messages arrived in an order the protocol forbids (a batch before the config)."""

    code = "FAILED_PRECONDITION"


class TooLarge(GuardError):
    """A message exceeds a configured size limit."""

    code = "RESOURCE_EXHAUSTED"


class NotReady(GuardError):
    """The guard is starting or draining and cannot take the call."""

    code = "UNAVAILABLE"


class ConfigError(GuardError):
    """The configuration file is invalid; the message names the key path."""

    code = "INVALID_ARGUMENT"

    def __init__(self, key: str, expected: str, found: object, *, source: str = "") -> None:
        self.key = key
        self.expected = expected
        self.found = found
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: expected {expected}, found {bounded_repr(found)}")


#: Longest ``found`` value a ConfigError message quotes; longer ones are cut with ``...``.
MAX_FOUND_CHARS = 200


class _BoundedRepr(reprlib.Repr):
    """reprlib with room for a config value: whole short strings, a few items per level."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = limit
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 16
        self.maxlevel = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # repr may raise past Python's digit limit, and is slow
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


def bounded_repr(value: object, limit: int = MAX_FOUND_CHARS) -> str:
    """``repr(value)`` with bounded work and length: long strings and containers are cut
    (``...``), a huge integer is described by its size, a repr that fails by its type."""
    try:
        text = _BoundedRepr(limit).repr(value)
    except Exception:  # a value whose repr fails still gets a message
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


class ListenError(GuardError):
    """An address could not be bound (a listener of the sidecar or its metrics endpoint)."""


class SaeFileError(GuardError):
    """An SAE file on disk is unreadable or inconsistent; the message names file and field."""

    code = "FAILED_PRECONDITION"

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def public_message(error: BaseException) -> str:
    """What the peer may read: the message of a GuardError, a generic text otherwise."""
    if isinstance(error, GuardError):
        return str(error)
    return "internal error in the guard; see the guard's log"
