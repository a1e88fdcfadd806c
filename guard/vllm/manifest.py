"""Who owns which rows of a vLLM step: the manifest the worker builds before the first hooked
layer runs, and the registry through which the worker hands ABORTs to the scheduler. Imports
no vLLM and no torch (so it is tested in the main environment)."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from guard.decision import RowRole
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
    of the step, ``then`` (sent after this one, so that positions still arrive in order).

    Each row has its role: a prompt row the role of its position in the request's prompt
    (``UNSPECIFIED`` when the request has none), a generated row ``GENERATED``. A prompt
    segment says whether it ends the prompt (``prompt_complete``: its last row is the
    prompt's last position), so that a prompt prefilled in chunks is decided once whole."""

    internal_ids: tuple[str, ...]
    segments: tuple[Segment, ...]
    #: Which of the step's rows are sent, in order ``[sent]``.
    keep: NDArray[np.int64]
    #: Position and token id of each sent row ``[sent]``.
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64]
    #: Rows of the step (sent or not).
    step_rows: int
    #: The :class:`RowRole` value of each sent row ``[sent]``.
    roles: NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
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
                   skip_positions: int = 1,
                   prompt_roles: Sequence[NDArray[np.int8] | None] | None = None
                   ) -> StepManifest:
    """The manifest of a step whose rows hold, in order, ``scheduled[i]`` rows of request
    ``internal_ids[i]`` (vLLM lays a step out in its input batch's order). A request's rows
    are prompt rows while their positions are inside its prompt, generation rows after (a
    request with both, recomputed after a preemption, has its generation rows in ``then``).
    ``prompt_roles[i]``: the role of each position of request ``i``'s prompt, or None.
    Requests with no rows to send this step are left out."""
    if not len(internal_ids) == len(client_ids) == len(scheduled) == len(prompt_lengths):
        raise ValueError("internal_ids, client_ids, scheduled and prompt_lengths differ in "
                         "length")
    if prompt_roles is not None and len(prompt_roles) != len(internal_ids):
        raise ValueError("prompt_roles: expected one entry per request")
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
        length = int(prompt_lengths[i])
        prompt = int(np.count_nonzero(positions[rows] < length))
        if prompt:
            ends = int(positions[rows[prompt - 1]]) == length - 1
            known = prompt_roles[i] if prompt_roles is not None else None
            first.add(internal_ids[i], Segment(name, prompt, "prompt", prompt_complete=ends),
                      rows[:prompt], _prompt_row_roles(known, positions[rows[:prompt]]))
        if prompt < rows.shape[0]:
            generation = Segment(name, int(rows.shape[0]) - prompt, "generation")
            (second if prompt else first).add(
                internal_ids[i], generation, rows[prompt:],
                np.full(rows.shape[0] - prompt, RowRole.GENERATED, dtype=np.int8))
    then = second.manifest(positions, token_ids, total, 1, None) if second.kept else None
    return first.manifest(positions, token_ids, total, 0, then)


def _prompt_row_roles(known: NDArray[np.int8] | None, at: NDArray[np.int64]
                      ) -> NDArray[np.int8]:
    """The roles of prompt rows at positions ``at``: the prompt's where it has them."""
    out = np.full(at.shape[0], RowRole.UNSPECIFIED, dtype=np.int8)
    if known is not None:
        inside = (at >= 0) & (at < known.shape[0])
        out[inside] = known[at[inside]]
    return out


class _Batch:
    """The requests and rows of one batch of a step, as :func:`build_manifest` finds them."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.segments: list[Segment] = []
        self.keep: list[NDArray[np.int64]] = []
        self.roles: list[NDArray[np.int8]] = []

    def add(self, internal_id: str, segment: Segment, rows: NDArray[np.int64],
            roles: NDArray[np.int8]) -> None:
        self.kept.append(internal_id)
        self.segments.append(segment)
        self.keep.append(rows)
        self.roles.append(roles)

    def manifest(self, positions: NDArray[np.int64], token_ids: NDArray[np.int64],
                 step_rows: int, part: int, then: StepManifest | None) -> StepManifest:
        index = np.concatenate(self.keep) if self.keep else np.zeros(0, dtype=np.int64)
        roles = np.concatenate(self.roles) if self.roles else np.zeros(0, dtype=np.int8)
        return StepManifest(internal_ids=tuple(self.kept), segments=tuple(self.segments),
                            keep=index, positions=positions[index].astype(np.int64),
                            token_ids=token_ids[index].astype(np.int64), step_rows=step_rows,
                            roles=roles, then=then, part=part)


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
