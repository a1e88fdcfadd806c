"""The host side of Activation Guard: a client SDK for inference servers.

``GuardClient`` (threads) and ``AsyncGuardClient`` (asyncio) send residual-stream rows to a
guard over one long-lived Inspect stream and return a :class:`Verdict` per batch (or, for an
engine step of several requests, ``inspect_step``'s :class:`StepVerdict`): CONTINUE,
STEER (with residual deltas to add) or ABORT, decided by the guard, or by the failure policy
when the guard is down, late or rejects the batch. See ``guard/host/README.md``.

This package imports neither torch nor the guard's server side.
"""

from __future__ import annotations

from guard.decision import Action, Phase
from guard.errors import TooLarge
from guard.host._batch import Segment
from guard.host._options import ClientCounters, ClientOptions, tls_credentials
from guard.host._verdict import ReportedFinding, Source, StepVerdict, Verdict
from guard.host.aio import AsyncGuardClient
from guard.host.client import ClientClosedError, GuardClient

__all__ = [
    "Action",
    "AsyncGuardClient",
    "ClientClosedError",
    "ClientCounters",
    "ClientOptions",
    "GuardClient",
    "Phase",
    "ReportedFinding",
    "Segment",
    "Source",
    "StepVerdict",
    "TooLarge",
    "Verdict",
    "tls_credentials",
]
