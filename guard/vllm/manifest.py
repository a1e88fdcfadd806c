"""Who owns which rows of a vLLM step: the manifest the worker builds before the first hooked
layer runs, and the registry through which the worker hands ABORTs to the scheduler. Imports
no vLLM and no torch (so it is tested in the main environment)."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from guard.host import Segment

#: vLLM 0.32 makes a request's internal id from the client's: ``<id>-<8 hex digits>``.
_INTERNAL_SUFFIX: Final = re.compile(r"-[0-9a-f]{8}$")


def client_request_id(internal_id: str, extra_args: Mapping[str, object] | None,
                      key: str) -> str:
    """The request id the guard sees: ``extra_args[key]`` when the client set it, otherwise
    vLLM's internal id without the random suffix vLLM adds (the id the client gave)."""
    given = (extra_args or {}).get(key)
    if isinstance(given, str) and given:
        return given
    return _INTERNAL_SUFFIX.sub("", internal_id)


@dataclass(frozen=True)
class StepManifest:
    """The rows of one step sent to the guard: requests in row order (vLLM's persistent-batch
    order), each with its internal id, the id the guard knows it by, its row count and phase.
    Rows at positions below ``skip_positions`` (the BOS row) are not sent.

    A request recomputed after a preemption can have prompt and generated rows in one step;
    a batch holds a request once, with one phase, so its generated rows go in a second batch
    of the step, ``then`` (sent after this one, so that positions still arrive in order)."""

    internal_ids: tuple[str, ...]
    segments: tuple[Segment, ...]
    #: Which of the step's rows are sent, in order ``[sent]``.
    keep: NDArray[np.int64]
    #: Position and token id of each sent row ``[sent]``.
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64]
    #: Rows of the step (sent or not).
    step_rows: int
    #: The step's second batch (generated rows of requests recomputed across their prompt's
    #: end), or None; ``part`` numbers the batches of a step from 0.
    then: StepManifest | None = None
    part: int = 0

    @property
    def rows(self) -> int:
        """Rows sent (in this batch)."""
        return int(self.keep.shape[0])


def build_manifest(internal_ids: Sequence[str], client_ids: Sequence[str],
                   scheduled: Sequence[int], prompt_lengths: Sequence[int],
                   positions: NDArray[np.int64], token_ids: NDArray[np.int64],
                   skip_positions: int = 1) -> StepManifest:
    """The manifest of a step whose rows hold, in order, ``scheduled[i]`` rows of request
    ``internal_ids[i]`` (vLLM lays a step out in its input batch's order). A request's rows
    are prompt rows while their positions are inside its prompt, generation rows after (a
    request with both, recomputed after a preemption, has its generation rows in ``then``).
    Requests with no rows to send this step are left out."""
    if not len(internal_ids) == len(client_ids) == len(scheduled) == len(prompt_lengths):
        raise ValueError("internal_ids, client_ids, scheduled and prompt_lengths differ in "
                         "length")
    total = int(sum(scheduled))
    if positions.shape[0] < total or token_ids.shape[0] < total:
        raise ValueError(f"the step has {total} scheduled rows but {positions.shape[0]} "
                         "positions")
    first = _Batch()
    second = _Batch()
    seen: set[str] = set()
    start = 0
    for i, count in enumerate(int(n) for n in scheduled):
        rows = np.arange(start, start + count, dtype=np.int64)
        start += count
        rows = rows[positions[rows] >= skip_positions]
        if rows.shape[0] == 0:
            continue
        name = client_ids[i]
        if name in seen:
            raise ValueError(f"two requests of one step are both named {name!r} for the "
                             "guard: give each its own guard_request_id")
        seen.add(name)
        # A request's rows are consecutive positions: its prompt rows come first.
        prompt = int(np.count_nonzero(positions[rows] < int(prompt_lengths[i])))
        if prompt:
            first.add(internal_ids[i], Segment(name, prompt, "prompt"), rows[:prompt])
        if prompt < rows.shape[0]:
            generation = Segment(name, int(rows.shape[0]) - prompt, "generation")
            (second if prompt else first).add(internal_ids[i], generation, rows[prompt:])
    then = second.manifest(positions, token_ids, total, 1, None) if second.kept else None
    return first.manifest(positions, token_ids, total, 0, then)


class _Batch:
    """The requests and rows of one batch of a step, as :func:`build_manifest` finds them."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.segments: list[Segment] = []
        self.keep: list[NDArray[np.int64]] = []

    def add(self, internal_id: str, segment: Segment, rows: NDArray[np.int64]) -> None:
        self.kept.append(internal_id)
        self.segments.append(segment)
        self.keep.append(rows)

    def manifest(self, positions: NDArray[np.int64], token_ids: NDArray[np.int64],
                 step_rows: int, part: int, then: StepManifest | None) -> StepManifest:
        index = np.concatenate(self.keep) if self.keep else np.zeros(0, dtype=np.int64)
        return StepManifest(internal_ids=tuple(self.kept), segments=tuple(self.segments),
                            keep=index, positions=positions[index].astype(np.int64),
                            token_ids=token_ids[index].astype(np.int64), step_rows=step_rows,
                            then=then, part=part)


@dataclass(frozen=True)
class GuardAbort:
    """The guard's ABORT of one request, waiting for the scheduler to end it."""

    decision_id: str
    details: str
    source: str

    @property
    def stop_reason(self) -> str:
        """What the client sees as the request's ``stop_reason``: ``guard:<decision id>``,
        ``guard:fail_closed``, or ``guard:refused: <why>`` for arguments the server refused."""
        if self.source == "refused":
            return f"guard:refused: {self.details}"
        return f"guard:{self.decision_id or self.source}"


class AbortBoard:
    """Requests the guard aborted (by internal id), from the worker to the scheduler. Both
    run in the engine-core process when vLLM runs one worker in it (``uni`` executor), which
    the integration requires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, GuardAbort] = {}

    def post(self, internal_id: str, abort: GuardAbort) -> None:
        with self._lock:
            self._pending.setdefault(internal_id, abort)

    def take(self, internal_id: str) -> GuardAbort | None:
        if not self._pending:  # the common case, without the lock
            return None
        with self._lock:
            return self._pending.pop(internal_id, None)

    def pending(self, internal_id: str) -> bool:
        return internal_id in self._pending

    def any(self) -> bool:
        """Whether an abort waits (without the lock: a hint for the scheduler's fast path)."""
        return bool(self._pending)

    def forget(self, internal_ids: Sequence[str]) -> None:
        with self._lock:
            for internal_id in internal_ids:
                self._pending.pop(internal_id, None)


#: The process's board (one engine core per process).
ABORTS: Final = AbortBoard()
