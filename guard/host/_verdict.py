"""What ``inspect`` and ``inspect_step`` return, and the one place where the failure policy
turns a fault into a verdict (counted and logged)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import grpc
import numpy as np
import structlog
from numpy.typing import NDArray

from guard.decision import Action, Phase
from guard.errors import GuardError
from guard.host._batch import BatchItem, StepSegment
from guard.host._options import ClientOptions, CounterBox
from guard.v1 import guard_pb2 as pb
from guard.wire import codec

log = structlog.get_logger("guard.host")

#: Who decided a verdict: the guard, the failure policy (open or closed), or nobody
#: (MONITOR mode: the batch was queued and the host goes on).
Source = Literal["guard", "fail_open", "fail_closed", "monitor"]
#: Why the failure policy decided.
Cause = Literal["unavailable", "timeout", "error", "protocol"]

_CAUSE_COUNTERS: Final[dict[str, str]] = {
    "unavailable": "unavailable", "timeout": "timeouts", "error": "errors", "protocol": "errors",
}
_CODE_NAMES: Final = {code.value[0]: code.name for code in grpc.StatusCode}
_ACTIONS: Final = {int(a): a for a in Action}


@dataclass(frozen=True)
class ReportedFinding:
    """One detector's verdict on a batch, as the guard reported it to the host (the plugin
    side's :class:`guard.Finding` is what a detector returns)."""

    detector: str
    score: float
    threshold: float
    #: The action this finding asks for (ABORT or CONTINUE).
    action: Action
    #: Features that contributed, with their activations and labels (parallel tuples).
    feature_ids: tuple[int, ...] = ()
    feature_activations: tuple[float, ...] = ()
    feature_labels: tuple[str, ...] = ()
    #: Positions of the rows that fired.
    positions: tuple[int, ...] = ()
    message: str = ""
    #: The SAE does not explain the request's residual (a ``reconstruction`` detector):
    #: feature-based verdicts on it read outside the SAE's distribution.
    out_of_distribution: bool = False


@dataclass(frozen=True)
class Verdict:
    """The answer to one batch: what the host does with its rows, and who decided."""

    action: Action
    #: ``guard``, ``fail_open``, ``fail_closed`` or ``monitor``.
    source: Source
    request_id: str
    #: The batch's sequence number on its stream; 0 when it never got one (guard known down,
    #: MONITOR mode).
    sequence: int = 0
    #: Names the guard's decision log record ("" when the guard did not decide).
    decision_id: str = ""
    findings: tuple[ReportedFinding, ...] = ()
    #: Hook -> residual delta ``[rows, d_in]`` (float32, read-only) to add; set on STEER.
    steering: Mapping[str, NDArray[np.float32]] = field(default_factory=dict)
    #: The guard's explanation; always set on ABORT (for a policy ABORT it is ``reason``).
    details: str = ""
    #: Positions of the rows this verdict covers.
    positions: tuple[int, ...] = ()
    #: Why the failure policy decided (the fault, with the guard's own message when it sent
    #: one); "" when the guard decided.
    reason: str = ""
    #: Why the failure policy decided: ``unavailable``, ``timeout``, ``error`` or
    #: ``protocol``; "" when the guard decided.
    cause: str = ""

    @property
    def decided_by_policy(self) -> bool:
        return self.source in ("fail_open", "fail_closed")


#: Most severe first wins: ABORT over STEER over CONTINUE.
_SEVERITY: Final = {Action.CONTINUE: 0, Action.STEER: 1, Action.ABORT: 2}


@dataclass(frozen=True)
class StepVerdict:
    """The answer to one step (``inspect_step``): a :class:`Verdict` per request, in segment
    order, and the step's steering over all its rows."""

    #: One per segment, in the segments' order; each with its request id and positions (on
    #: STEER, its ``steering`` is its own rows of the step's delta).
    verdicts: tuple[Verdict, ...]
    #: Who decided: the guard, the failure policy (every request then has the same verdict)
    #: or ``monitor``.
    source: Source
    #: The step's sequence number on its stream (0 when it never got one).
    sequence: int = 0
    #: Hook -> residual delta ``[rows, d_in]`` over every row of the step (rows of requests
    #: that are not steered are zero): ``hidden[rows] += delta`` once for the step.
    steering: Mapping[str, NDArray[np.float32]] = field(default_factory=dict)
    #: Why the failure policy decided, and its cause, as on :class:`Verdict`.
    reason: str = ""
    cause: str = ""

    @property
    def action(self) -> Action:
        """The most severe of the verdicts' actions (ABORT over STEER over CONTINUE)."""
        return max((v.action for v in self.verdicts), key=_SEVERITY.__getitem__,
                   default=Action.CONTINUE)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(v.request_id for v in self.verdicts)

    @property
    def decided_by_policy(self) -> bool:
        return self.source in ("fail_open", "fail_closed")

    def verdict(self, request_id: str) -> Verdict:
        """The verdict of one request of the step; KeyError when it is not in the step."""
        for verdict in self.verdicts:
            if verdict.request_id == request_id:
                return verdict
        raise KeyError(request_id)

    def __iter__(self) -> Iterator[Verdict]:
        return iter(self.verdicts)

    def __len__(self) -> int:
        return len(self.verdicts)


#: What a batch gets: a verdict (``inspect``), or a verdict per request (``inspect_step``).
Answer = Verdict | StepVerdict


def _segment_positions(item: BatchItem, segment: StepSegment) -> tuple[int, ...]:
    return tuple(item.positions[segment.start:segment.start + segment.rows])


def monitor_verdict(item: BatchItem) -> Answer:
    if item.segments:
        return StepVerdict(verdicts=tuple(
            Verdict(action=Action.CONTINUE, source="monitor", request_id=s.request_id,
                    positions=_segment_positions(item, s)) for s in item.segments),
            source="monitor")
    return Verdict(action=Action.CONTINUE, source="monitor", request_id=item.request_id,
                   positions=tuple(item.positions))


def policy_verdict(
    options: ClientOptions, counters: CounterBox, item: BatchItem, cause: Cause, reason: str,
) -> Answer:
    """The failure policy's verdict on a batch (for a step, the same verdict for each of its
    requests); counts the cause and the outcome once per batch, logs both."""
    cause_count = counters.add(_CAUSE_COUNTERS[cause])
    source: Source = "fail_open" if options.failure_policy == "open" else "fail_closed"
    action = Action.CONTINUE if source == "fail_open" else Action.ABORT
    decided = counters.add(source)
    log.warning("guard failure policy applied", policy=source, cause=cause,
                request_id=item.request_id or list(item.request_ids), hook=item.hook,
                sequence=item.sequence, rows=len(item.positions), reason=reason,
                policy_count=decided, cause_count=cause_count)
    details = reason if action is Action.ABORT else ""
    if item.segments:
        return StepVerdict(verdicts=tuple(
            Verdict(action=action, source=source, request_id=s.request_id,
                    sequence=item.sequence, details=details,
                    positions=_segment_positions(item, s), reason=reason, cause=cause)
            for s in item.segments),
            source=source, sequence=item.sequence, reason=reason, cause=cause)
    return Verdict(action=action, source=source, request_id=item.request_id,
                   sequence=item.sequence, details=details,
                   positions=tuple(item.positions), reason=reason, cause=cause)


def reply_to_verdict(
    options: ClientOptions, counters: CounterBox, item: BatchItem, reply: pb.InspectResponse,
) -> Answer:
    """The verdict for an INLINE batch's reply: the guard's decision, or the policy's when the
    reply carries a per-batch error or does not make sense."""
    if reply.HasField("error"):
        return policy_verdict(options, counters, item, "error",
                              f"the guard rejected the batch: {error_text(reply.error)}")
    if item.segments:
        answered = [v.request_id for v in reply.verdicts]
        if answered != list(item.request_ids):
            return policy_verdict(
                options, counters, item, "protocol",
                f"the guard's reply to sequence {reply.sequence} has verdicts for "
                f"{answered!r}, expected one per segment: {list(item.request_ids)!r}")
        try:
            return step_verdict(reply, item.segments)
        except (GuardError, ValueError) as exc:
            return policy_verdict(options, counters, item, "protocol",
                                  f"the guard's reply to sequence {reply.sequence} is "
                                  f"invalid: {exc}")
    if reply.request_id != item.request_id:
        return policy_verdict(
            options, counters, item, "protocol",
            f"the guard's reply to sequence {reply.sequence} names request "
            f"{reply.request_id!r}, expected {item.request_id!r}")
    try:
        return decision_verdict(reply)
    except (GuardError, ValueError) as exc:
        return policy_verdict(options, counters, item, "protocol",
                              f"the guard's reply to sequence {reply.sequence} is invalid: "
                              f"{exc}")


def decision_verdict(reply: pb.InspectResponse) -> Verdict:
    """The guard's decision in a reply without ``error``; ValueError or InvalidInput when
    the reply is malformed (no action, a bad steering tensor)."""
    return Verdict(action=_action(reply.action), source="guard", request_id=reply.request_id,
                   sequence=reply.sequence, decision_id=reply.decision_id,
                   findings=_findings(reply.findings), steering=_steering(reply),
                   details=reply.details, positions=tuple(reply.positions))


def step_verdict(reply: pb.InspectResponse, segments: tuple[StepSegment, ...]) -> StepVerdict:
    """The guard's decisions in a step's reply (one RequestVerdict per segment, checked by
    the caller); ValueError or InvalidInput when the reply is malformed."""
    steering = _steering(reply)
    rows = sum(s.rows for s in segments)
    for hook, delta in steering.items():
        if delta.ndim != 2 or delta.shape[0] != rows:
            raise ValueError(f"steering[{hook!r}]: expected a delta over the step's {rows} "
                             f"rows, found shape {list(delta.shape)}")
    verdicts = []
    for segment, verdict in zip(segments, reply.verdicts, strict=True):
        action = _action(verdict.action)
        own = ({hook: delta[segment.start:segment.start + segment.rows]
                for hook, delta in steering.items()} if action is Action.STEER else {})
        verdicts.append(Verdict(
            action=action, source="guard", request_id=verdict.request_id,
            sequence=reply.sequence, decision_id=verdict.decision_id,
            findings=_findings(verdict.findings), steering=own, details=verdict.details,
            positions=tuple(verdict.positions)))
    return StepVerdict(verdicts=tuple(verdicts), source="guard", sequence=reply.sequence,
                       steering=steering)


def _action(value: int) -> Action:
    action = _ACTIONS.get(value)
    if action is None:
        raise ValueError(f"action: expected CONTINUE, STEER or ABORT, found {value}")
    return action


def _steering(reply: pb.InspectResponse) -> dict[str, NDArray[np.float32]]:
    return {s.hook: codec.decode(s.delta.datatype, s.delta.shape, s.delta.raw)
            for s in reply.steering}


def _findings(findings: Iterable[pb.Finding]) -> tuple[ReportedFinding, ...]:
    return tuple(
        ReportedFinding(
            detector=f.detector, score=f.score, threshold=f.threshold,
            action=_ACTIONS.get(f.action, Action.CONTINUE),
            feature_ids=tuple(f.feature_ids), feature_activations=tuple(f.feature_activations),
            feature_labels=tuple(f.feature_labels), positions=tuple(f.positions),
            message=f.message, out_of_distribution=f.out_of_distribution,
        )
        for f in findings
    )


def monitor_reply_verdicts(reply: pb.InspectResponse) -> list[Verdict]:
    """What MONITOR's ``on_reply`` gets: :func:`monitor_reply_verdict`, or for a step's reply
    (verdicts set) one verdict per request (each with its own rows of the step's delta)."""
    if not reply.verdicts or reply.HasField("error"):
        return [monitor_reply_verdict(reply)]
    positions = [len(v.positions) for v in reply.verdicts]
    starts = np.cumsum([0, *positions]).tolist()
    segments = tuple(StepSegment(v.request_id, start, count, Phase.UNSPECIFIED, {})
                     for v, start, count in zip(reply.verdicts, starts, positions, strict=False))
    try:
        return list(step_verdict(reply, segments).verdicts)
    except (GuardError, ValueError) as exc:
        return [Verdict(action=Action.CONTINUE, source="monitor", request_id=v.request_id,
                        sequence=reply.sequence, reason=f"invalid reply from the guard: {exc}")
                for v in reply.verdicts]


def monitor_reply_verdict(reply: pb.InspectResponse) -> Verdict:
    """What MONITOR's ``on_reply`` gets: the guard's decision, or a CONTINUE naming its error."""
    if reply.HasField("error"):
        return Verdict(action=Action.CONTINUE, source="monitor", request_id=reply.request_id,
                       sequence=reply.sequence, positions=tuple(reply.positions),
                       reason=f"the guard rejected the batch: {error_text(reply.error)}")
    try:
        return decision_verdict(reply)
    except (GuardError, ValueError) as exc:
        return Verdict(action=Action.CONTINUE, source="monitor", request_id=reply.request_id,
                       sequence=reply.sequence, reason=f"invalid reply from the guard: {exc}")


def error_text(error: pb.BatchError) -> str:
    """``CODE_NAME: message`` of a per-batch error."""
    return f"{_CODE_NAMES.get(error.code, str(error.code))}: {error.message}"


def stream_end_text(end: pb.StreamEnd) -> str:
    """Why the guard ended a doorbell stream, as a gRPC status reads (``status_text``)."""
    return (f"the stream to the guard ended: {_CODE_NAMES.get(end.code, str(end.code))}: "
            f"{end.message}")


def unavailable_reason(why: str) -> str:
    """Why an INLINE batch got the failure policy while the stream is down."""
    return f"the guard is unavailable ({why}); reconnecting in the background"
