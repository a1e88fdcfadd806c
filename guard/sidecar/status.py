"""The one place that maps the guard's domain errors to gRPC status codes (KServe's shape).

Each :class:`~guard.errors.GuardError` names its status in ``code``; anything else is a bug in
the guard and maps to INTERNAL (the peer then reads a generic message, see
:func:`guard.errors.public_message`).
"""

from __future__ import annotations

import grpc

from guard.errors import GuardError


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception: its own code for a GuardError, else INTERNAL."""
    if isinstance(error, GuardError):
        return getattr(grpc.StatusCode, error.code)  # type: ignore[no-any-return]
    return grpc.StatusCode.INTERNAL
