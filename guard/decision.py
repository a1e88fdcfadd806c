"""What the guard decides about a batch: the domain types the engine produces.

These are plain data, independent of gRPC; the server turns them into protocol messages.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


class Action(enum.IntEnum):
    """What the host does with the rows; values match ``guard.v1.Action``."""

    CONTINUE = 1
    STEER = 2
    ABORT = 3


class Phase(enum.IntEnum):
    """Where the rows come from; values match ``guard.v1.Phase``."""

    UNSPECIFIED = 0
    PROMPT = 1
    GENERATION = 2


@dataclass(frozen=True)
class ActivationRows:
    """One validated batch: ``rows`` is float32 ``[n, d_in]`` of one hook of one request."""

    request_id: str
    sequence: int
    hook: str
    rows: NDArray[np.float32]
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64] | None
    phase: Phase
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on a batch."""

    detector: str
    score: float
    threshold: float
    action: Action
    feature_ids: tuple[int, ...] = ()
    feature_activations: tuple[float, ...] = ()
    feature_labels: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    message: str = ""


@dataclass(frozen=True)
class Steering:
    """A residual delta ``[n, d_in]`` for one hook, aligned with the batch's rows."""

    hook: str
    delta: NDArray[np.float32]


@dataclass(frozen=True)
class Decision:
    """The guard's answer to one batch."""

    decision_id: str
    action: Action
    request_id: str
    sequence: int
    positions: NDArray[np.int64]
    findings: tuple[Finding, ...] = ()
    steering: tuple[Steering, ...] = ()
    details: str = ""
    #: Stage name -> seconds (decode, encode, ...).
    timings: Mapping[str, float] = field(default_factory=dict)


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_decision_id() -> str:
    """A unique, opaque decision id (names the decision log record).

    64 random bits per process plus a counter: unique across restarts and replicas, and
    cheaper than uuid4 on the hot path. ``next`` on itertools.count is atomic under the GIL.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
