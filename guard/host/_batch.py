"""One batch as the client holds it: validated at the boundary, encoded once on the caller's
thread (the encoded bytes are the snapshot: the caller may reuse its buffer at once), turned
into a protocol message when it is sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast

import numpy as np
from numpy.typing import NDArray

from guard.decision import ROLE_NAMES, Phase, RowRole
from guard.errors import TooLarge
from guard.host._options import ClientOptions
from guard.host.shm import Lease
from guard.v1 import guard_pb2 as pb
from guard.wire import codec

PhaseName = Literal["prompt", "generation"]
#: Writes rows (in a datatype, so many bytes) into shared memory; None: send them as bytes.
Placer = Callable[[NDArray[np.floating], str, int], Lease | None]
Positions = Sequence[int] | NDArray[np.integer]
#: Per-row roles: :class:`guard.RowRole` members, their values, or their names ("user",
#: "template", ...), one per row; an integer array works too.
Roles = Sequence[RowRole | int | str] | NDArray[np.integer]

_PHASES: Final[dict[object, Phase]] = {
    "prompt": Phase.PROMPT, "generation": Phase.GENERATION,
    Phase.PROMPT: Phase.PROMPT, Phase.GENERATION: Phase.GENERATION,
}
_AUTO_DATATYPES: Final = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
EndReason = Literal["finished", "aborted", "preempted"]
_END_REASONS: Final[dict[object, pb.RequestEnded.Reason.ValueType]] = {
    "finished": pb.RequestEnded.REASON_FINISHED,
    "aborted": pb.RequestEnded.REASON_ABORTED,
    "preempted": pb.RequestEnded.REASON_PREEMPTED,
}


@dataclass(frozen=True)
class Segment:
    """One request's rows in a step (``inspect_step``): the next ``rows`` rows of the step's
    array are ``request_id``'s (the rows of one request are contiguous, as in vLLM's flat
    ``[tokens, hidden]`` layout). ``attributes`` go to the plugins with this request's rows
    (a key here wins over the same key in the step's attributes). ``prompt_complete``
    (prompt rows only): True when these rows end the request's prompt, False for an earlier
    chunk of it, None (default) when the host does not say (see :meth:`GuardClient.inspect
    <guard.host.GuardClient.inspect>`)."""

    request_id: str
    rows: int
    phase: PhaseName | Phase = "prompt"
    attributes: Mapping[str, str] | None = None
    prompt_complete: bool | None = None


@dataclass(frozen=True, slots=True)
class StepSegment:
    """A validated :class:`Segment`: where its rows start in the step, its resolved phase."""

    request_id: str
    start: int
    rows: int
    phase: Phase
    attributes: dict[str, str]
    prompt_complete: bool | None = None

    def to_proto(self) -> pb.Segment:
        return pb.Segment(request_id=self.request_id, rows=self.rows,
                          phase=pb.Phase.ValueType(int(self.phase)),
                          attributes=self.attributes, prompt_complete=self.prompt_complete)


@dataclass(slots=True)
class BatchItem:
    """A validated, encoded batch waiting to be sent."""

    request_id: str
    hook: str
    datatype: str
    shape: list[int]
    raw: bytes
    positions: list[int]
    token_ids: list[int]
    phase: Phase
    attributes: dict[str, str] = field(default_factory=dict)
    #: One :class:`RowRole` value per row, or empty (the host does not say).
    roles: list[int] = field(default_factory=list)
    #: Whether the rows end the request's prompt (None: the host does not say).
    prompt_complete: bool | None = None
    #: Set when the batch is given its place on a stream.
    sequence: int = 0
    #: MONITOR mode: batches dropped just before this one; its sequence number skips them,
    #: so the guard's ``skipped_sequences`` reports the host's drops.
    gap_before: int = 0
    #: The rows' slot in the shared-memory region (``raw`` is then empty).
    shm: Lease | None = None
    #: A step of several requests (``inspect_step``): the requests' rows, in row order
    #: (``request_id`` is then empty and ``phase`` unspecified). Empty: one request.
    segments: tuple[StepSegment, ...] = ()

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The requests whose rows the batch holds."""
        if self.segments:
            return tuple(s.request_id for s in self.segments)
        return (self.request_id,)

    def to_request(self) -> pb.InspectRequest:
        shm = self.shm
        return pb.InspectRequest(batch=pb.ActivationBatch(
            segments=[s.to_proto() for s in self.segments],
            request_id=self.request_id,
            sequence=self.sequence,
            hook=self.hook,
            activations=(pb.Tensor(datatype=self.datatype, shape=self.shape, raw=self.raw)
                         if shm is None else shm.tensor(self.datatype, self.shape)),
            steering_ref=None if shm is None else shm.steering_ref(),
            positions=self.positions,
            token_ids=self.token_ids,
            phase=pb.Phase.ValueType(int(self.phase)),
            attributes=self.attributes,
            roles=cast("list[pb.RowRole.ValueType]", self.roles),  # checked values
            prompt_complete=self.prompt_complete,
        ))


@dataclass(frozen=True, slots=True)
class EndItem:
    """A ``RequestEnded`` message waiting to be sent: no sequence number, no reply."""

    request_ids: tuple[str, ...]
    reason: pb.RequestEnded.Reason.ValueType

    def to_request(self) -> pb.InspectRequest:
        return pb.InspectRequest(ended=pb.RequestEnded(request_ids=self.request_ids,
                                                       reason=self.reason))


#: What a stream's outbox holds: a batch (numbered, answered) or a RequestEnded (neither).
Outgoing: TypeAlias = BatchItem | EndItem


def prepare_end(request_ids: Sequence[str], reason: str) -> EndItem:
    """Validate the arguments of ``end_requests``; errors name the argument."""
    if isinstance(request_ids, str) or not isinstance(request_ids, Sequence):
        raise TypeError(f"request_ids: expected a sequence of request ids, found "
                        f"{request_ids!r}")
    for index, request_id in enumerate(request_ids):
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_ids[{index}]: expected a non-empty string, found "
                             f"{request_id!r}")
    code = _END_REASONS.get(reason)
    if code is None:
        raise ValueError(f"reason: expected 'finished', 'aborted' or 'preempted', "
                         f"found {reason!r}")
    return EndItem(tuple(request_ids), code)


def prepare_batch(
    options: ClientOptions,
    request_id: str,
    hook: str,
    rows: object,
    positions: Positions,
    token_ids: Positions | None,
    phase: PhaseName | Phase,
    attributes: Mapping[str, str] | None,
    *,
    place: Placer | None = None,
    roles: Roles | None = None,
    prompt_complete: bool | None = None,
) -> BatchItem:
    """Validate the arguments of ``inspect`` and encode the rows; errors name the argument.

    ``place`` (shared memory on) encodes the rows straight into a slot of the region instead.
    """
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id: expected a non-empty string, found {request_id!r}")
    resolved_phase = _PHASES.get(phase)
    if resolved_phase is None:
        raise ValueError(f"phase: expected 'prompt' or 'generation', found {phase!r}")
    _check_prompt_complete("prompt_complete", prompt_complete, resolved_phase)
    item = _encode(options, request_id, hook, rows, positions, token_ids, resolved_phase,
                   attributes, (), place, roles)
    item.prompt_complete = prompt_complete
    return item


def _check_prompt_complete(name: str, value: object, phase: Phase) -> None:
    """``prompt_complete``: None, or a bool on prompt rows only."""
    if value is None:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True, False or None, found {value!r}")
    if phase is not Phase.PROMPT:
        raise ValueError(f"{name}: only for prompt rows (phase 'prompt'), found "
                         f"{value!r} with phase {phase.name.lower()!r}")


def prepare_step(
    options: ClientOptions,
    hook: str,
    rows: object,
    segments: Sequence[Segment],
    positions: Positions,
    token_ids: Positions | None,
    attributes: Mapping[str, str] | None,
    *,
    place: Placer | None = None,
    roles: Roles | None = None,
) -> BatchItem:
    """Validate the arguments of ``inspect_step`` (the segments cover the rows in order, ids
    non-empty and distinct, phases known) and encode the rows; errors name the argument."""
    if isinstance(segments, Segment) or not isinstance(segments, Sequence) or not segments:
        raise ValueError(f"segments: expected a non-empty sequence of guard.host.Segment, "
                         f"found {segments!r}")
    resolved: list[StepSegment] = []
    seen: dict[str, int] = {}
    start = 0
    for index, segment in enumerate(segments):
        name = f"segments[{index}]"
        if not isinstance(segment, Segment):
            raise TypeError(f"{name}: expected a guard.host.Segment, found "
                            f"{type(segment).__qualname__}")
        request_id = segment.request_id
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"{name}.request_id: expected a non-empty string, found "
                             f"{request_id!r}")
        if request_id in seen:
            raise ValueError(f"{name}.request_id: {request_id!r} is already "
                             f"segments[{seen[request_id]}]'s (one segment per request)")
        seen[request_id] = index
        count = segment.rows
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ValueError(f"{name}.rows: expected an integer >= 1, found {count!r}")
        phase = _PHASES.get(segment.phase)
        if phase is None:
            raise ValueError(f"{name}.phase: expected 'prompt' or 'generation', found "
                             f"{segment.phase!r}")
        own = dict(segment.attributes or {})
        _check_attributes(f"{name}.attributes", own)
        _check_prompt_complete(f"{name}.prompt_complete", segment.prompt_complete, phase)
        resolved.append(StepSegment(request_id, start, int(count), phase, own,
                                    segment.prompt_complete))
        start += int(count)
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and start != rows.shape[0]:
        raise ValueError(f"segments: the segments' rows sum to {start}, expected the "
                         f"{rows.shape[0]} rows of `rows`")
    return _encode(options, "", hook, rows, positions, token_ids, Phase.UNSPECIFIED,
                   attributes, tuple(resolved), place, roles)


def _check_attributes(name: str, attributes: Mapping[Any, Any]) -> None:
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{name}: expected str keys and values, found {key!r}: {value!r}")


def _encode(options: ClientOptions, request_id: str, hook: str, rows: object,
            positions: Positions, token_ids: Positions | None, phase: Phase,
            attributes: Mapping[str, str] | None, segments: tuple[StepSegment, ...],
            place: Placer | None, roles: Roles | None = None) -> BatchItem:
    """What ``inspect`` and ``inspect_step`` check alike, then the rows encoded."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook: expected a hook name such as 'blocks.12.hook_resid_post', "
                         f"found {hook!r}")
    if options.hooks and hook not in options.hooks:
        raise ValueError(f"hook: {hook!r} is not one of this client's hooks "
                         f"({', '.join(options.hooks)}); add it to hooks=[...]")
    if not isinstance(rows, np.ndarray):
        kind = f"{type(rows).__module__}.{type(rows).__qualname__}"
        raise TypeError(f"rows: expected a numpy.ndarray [rows, d_in] of float32 or float16, "
                        f"found {kind} (convert a torch tensor with .float().cpu().numpy())")
    if rows.ndim != 2 or rows.shape[0] < 1:
        raise ValueError(f"rows: expected a 2-D array [rows, d_in] with at least one row, "
                         f"found shape {list(rows.shape)}")
    auto = _AUTO_DATATYPES.get(rows.dtype)
    if auto is None:
        raise TypeError(f"rows: expected dtype float32 or float16, found {rows.dtype} "
                        "(convert explicitly, e.g. rows.astype(numpy.float32))")
    n_rows = int(rows.shape[0])
    position_list = _integers("positions", positions, n_rows)
    token_list = [] if token_ids is None else _integers("token_ids", token_ids, n_rows)
    role_list = [] if roles is None else role_values("roles", roles, n_rows)
    merged: dict[str, str] = {}
    if attributes:
        merged.update(attributes)
    if options.trace_context is not None:  # on the caller's thread, where its span lives
        merged.update(options.trace_context())
    _check_attributes("attributes", merged)
    datatype = auto if options.wire_dtype == "auto" else options.wire_dtype
    nbytes = codec.expected_nbytes(datatype, rows.shape)
    if nbytes > options.max_message_bytes:
        raise TooLarge(
            f"rows: {nbytes} bytes of {datatype} activations ({n_rows} x {rows.shape[1]}) exceed "
            f"max_message_bytes={options.max_message_bytes}; send fewer rows per batch, or raise "
            "the client's max_message_bytes together with the guard's server.max_message_bytes"
        )
    lease = place(rows, datatype, nbytes) if place is not None else None
    if lease is None:
        shape, raw = codec.encode(rows, datatype)
    else:
        shape, raw = [int(d) for d in rows.shape], b""
    return BatchItem(request_id=request_id, hook=hook, datatype=datatype, shape=shape, raw=raw,
                     positions=position_list, token_ids=token_list, phase=phase,
                     attributes=merged, shm=lease, segments=segments, roles=role_list)


def _integers(name: str, values: Positions, n_rows: int) -> list[int]:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n_rows:
        raise ValueError(f"{name}: expected one integer per row ({n_rows}), "
                         f"found shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected integers, found dtype {array.dtype}")
    result: list[int] = array.tolist()
    return result


_ROLE_LIMIT: Final = int(max(RowRole))


def role_values(name: str, roles: Roles, n_rows: int) -> list[int]:
    """One :class:`RowRole` value per row, from members, values or names; errors name the
    argument, the row and what was expected."""
    if isinstance(roles, str | bytes) or not isinstance(roles, Sequence | np.ndarray):
        raise TypeError(f"{name}: expected one role per row (guard.RowRole, its value or "
                        f"its name), found {type(roles).__qualname__}")
    if isinstance(roles, np.ndarray):
        if roles.ndim != 1 or len(roles) != n_rows:
            raise ValueError(f"{name}: expected one role per row ({n_rows}), found shape "
                             f"{list(roles.shape)}")
        if not np.issubdtype(roles.dtype, np.integer):
            raise TypeError(f"{name}: expected integer RowRole values, found dtype "
                            f"{roles.dtype}")
        bad = np.flatnonzero((roles < 0) | (roles > _ROLE_LIMIT))
        if bad.size:
            raise ValueError(f"{name}[{int(bad[0])}]: expected a RowRole value (0 to "
                             f"{_ROLE_LIMIT}), found {int(roles[bad[0]])}")
        values: list[int] = roles.tolist()
        return values
    if len(roles) != n_rows:
        raise ValueError(f"{name}: expected one role per row ({n_rows}), found {len(roles)}")
    out: list[int] = []
    for index, role in enumerate(roles):
        if isinstance(role, str):
            known = ROLE_NAMES.get(role)
            if known is None:
                raise ValueError(f"{name}[{index}]: expected a role name "
                                 f"({', '.join(ROLE_NAMES)}), found {role!r}")
            out.append(int(known))
        elif isinstance(role, int | np.integer) and not isinstance(role, bool) and (
                0 <= role <= _ROLE_LIMIT):
            out.append(int(role))
        else:
            raise ValueError(f"{name}[{index}]: expected a guard.RowRole, its value (0 to "
                             f"{_ROLE_LIMIT}) or its name, found {role!r}")
    return out


#: Protocol version this client speaks (StreamConfig.protocol_version).
PROTOCOL_VERSION = "1.0"


def stream_config(options: ClientOptions) -> pb.StreamConfig:
    """The first message of every stream (either transport)."""
    return pb.StreamConfig(
        protocol_version=PROTOCOL_VERSION,
        mode=pb.MODE_INLINE if options.mode == "inline" else pb.MODE_MONITOR,
        hooks=options.hooks,
        failure_policy=(pb.FAILURE_POLICY_FAIL_OPEN if options.failure_policy == "open"
                        else pb.FAILURE_POLICY_FAIL_CLOSED),
        batch_deadline_ms=round(options.deadline_ms),
        host=options.host_name,
    )
