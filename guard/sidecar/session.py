"""One Inspect stream: the protocol's state machine, validation and message conversion.

The first message must be a StreamConfig; then each ActivationBatch gets exactly one
InspectResponse. A bad batch gets a per-batch error reply and the stream goes on; only a
protocol violation (a batch before the config, a second config, an unknown hook or an
unsupported version in the config) ends the stream with a status.

Rules for bad input, as docs/protocol.md documents them:

- unknown hook: NOT_FOUND listing the served hooks;
- unsupported datatype, a byte length that does not match shape and datatype, a width that
  is not the SAE's d_in, positions or token ids that do not match the rows: INVALID_ARGUMENT;
- NaN or infinite rows are rejected (INVALID_ARGUMENT naming the row positions), never
  encoded: a NaN feature score would silently pass every threshold test;
- sequence numbers increase by exactly 1 per batch; a repeat or a step back is rejected
  (ALREADY_EXISTS) and not processed twice; a gap is accepted and reported in
  ``skipped_sequences`` (a MONITOR-mode host may drop batches);
- a tensor above ``server.max_message_bytes``: RESOURCE_EXHAUSTED naming that option;
- a request id (batch or segment) or a hook longer than 256 UTF-8 bytes
  (``guard.wire.codec.MAX_REQUEST_ID_BYTES``, ``MAX_HOOK_BYTES``): INVALID_ARGUMENT naming
  the field and the length, and the id is neither echoed in the reply nor logged; in a
  StreamConfig (a hook, or a host name over ``MAX_HOST_BYTES``) the stream ends;
- shared memory (:mod:`guard.sidecar.regions`): a refused region in the config ends the
  stream; a bad reference in a batch (unknown region: NOT_FOUND; out of bounds, wrong length,
  misaligned, ``raw`` and ``shm`` both set: INVALID_ARGUMENT) gets a per-batch error reply;
- row roles (``batch.roles``): not none or one per row, or a value that is not a known
  ``RowRole``: INVALID_ARGUMENT naming ``batch.roles`` (``batch.roles[i]``);
- ``prompt_complete`` set on a batch (or segment) whose phase is not PROMPT: INVALID_ARGUMENT
  naming ``batch.prompt_complete`` (``batch.segments[i].prompt_complete``);
- segments (several requests in one batch): more than ``max_segments``: RESOURCE_EXHAUSTED;
  an empty or repeated request id, a segment of no rows, row counts that do not sum to the
  tensor's rows: INVALID_ARGUMENT naming ``batch.segments[i]...``. The reply then holds one
  verdict per segment (:func:`step_to_proto`).

A ``RequestEnded`` message gets no reply and does not touch the sequence numbers: it frees
the named requests' state in the stream's :class:`~guard.sidecar.requests.RequestTable`
(bounded by ``max_requests``); an id the table does not hold is ignored and counted. Before
the config it is a protocol violation, as a batch would be. Every request that leaves the
table reaches the plugins' ``guard_request_ended`` (:meth:`Engine.end_requests`, off the hot
path): with the host's reason, ``evicted`` when the table was full, ``stream_closed`` for the
requests still open when the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
import numpy as np
import structlog
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from guard.config import ServerConfig, SharedMemoryConfig
from guard.decision import (
    Action,
    ActivationRows,
    Decision,
    Phase,
    RequestEndReason,
    Segment,
    Steering,
    StepDecision,
    new_stream_id,
)
from guard.engine.core import Engine
from guard.errors import (
    AlreadySeen,
    GuardError,
    InvalidInput,
    ProtocolViolation,
    TooLarge,
    public_message,
)
from guard.sidecar.regions import RegionTable
from guard.sidecar.requests import RequestTable
from guard.sidecar.status import status_code
from guard.telemetry.conventions import DOORBELL_ATTRIBUTES, RPC_ATTRIBUTES
from guard.telemetry.instruments import (
    OTHER,
    BatchError,
    end_batch_span,
    extract_context,
    start_batch_span,
)
from guard.v1 import guard_pb2 as pb
from guard.wire import codec

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = "1.0"
_MODES = {pb.MODE_MONITOR: "monitor", pb.MODE_INLINE: "inline"}
_PHASES = {int(p): p for p in Phase}
_END_REASONS: dict[int, RequestEndReason] = {
    pb.RequestEnded.REASON_FINISHED: "finished",
    pb.RequestEnded.REASON_ABORTED: "aborted",
    pb.RequestEnded.REASON_PREEMPTED: "preempted"}
@dataclass(frozen=True)
class StreamLimits:
    """Per-stream limits of continuous batching (DescribeResponse reports them); the
    defaults are the configuration's (``server.max_segments_per_batch`` and
    ``server.max_requests_per_stream``)."""

    #: The most segments (requests) one batch may carry; more: RESOURCE_EXHAUSTED.
    max_segments: int = ServerConfig.max_segments_per_batch
    #: Requests a stream keeps state for; past it the least recently seen is forgotten.
    max_requests: int = ServerConfig.max_requests_per_stream

    @classmethod
    def of(cls, server: ServerConfig) -> StreamLimits:
        """The limits the ``server`` section sets."""
        return cls(max_segments=server.max_segments_per_batch,
                   max_requests=server.max_requests_per_stream)


class StreamEnded(Exception):
    """The stream must end with this status (a protocol violation)."""

    def __init__(self, error: GuardError) -> None:
        super().__init__(str(error))
        self.code = status_code(error)
        self.details = str(error)


@dataclass
class StreamCounters:
    """Per-stream counts, logged when the stream ends."""

    batches: int = 0
    rows: int = 0
    rejected: int = 0
    skipped_sequences: int = 0
    #: RequestEnded: requests freed, ids the stream did not hold; requests evicted (cap).
    requests_ended: int = 0
    requests_unknown: int = 0
    requests_evicted: int = 0
    counts_by_code: dict[str, int] = field(default_factory=dict)


class _Answered(NamedTuple):
    """A batch whose reply is built; its span and metrics wait for :meth:`after_reply`."""

    span: Span | None
    end_time_ns: int
    hook: str
    rows: int
    seconds: float
    #: The batch's decision, or one per request for a batch with segments (``step``).
    decisions: tuple[Decision, ...]
    step: bool
    error: BatchError | None
    token_ids: Any


class InspectStream:
    """Handles the messages of one Inspect stream, in order. Not shared between threads.

    Telemetry of a batch (ending its span, recording its metrics) is done by
    :meth:`after_reply`, which the server calls once the reply is on its way: it costs the
    host no latency. A caller that never calls it loses nothing: the next batch (or
    :meth:`close`) does it.
    """

    def __init__(self, engine: Engine, max_message_bytes: int, peer: str = "",
                 trace_context: Context | None = None, *,
                 shared_memory: SharedMemoryConfig | None = None,
                 doorbell: bool = False, alive: Callable[[], bool] | None = None,
                 peer_uid: int | None = None, limits: StreamLimits | None = None) -> None:
        self._engine = engine
        #: Scopes the plugins' per-request state (FeatureBatch.stream): ids are the host's.
        self.stream_id = new_stream_id()
        self.limits = limits if limits is not None else StreamLimits()
        #: Per-request state, freed by RequestEnded, bounded by ``limits.max_requests``.
        self.requests = RequestTable(self.limits.max_requests)
        #: Whether the host is still there (checked before writing into its region: once
        #: its stream ended, the host reuses the batch's slot for other rows).
        self._alive = alive
        #: The transport's span attributes: a gRPC call, or the doorbell socket.
        self._rpc = DOORBELL_ATTRIBUTES if doorbell else RPC_ATTRIBUTES
        self._max_message_bytes = max_message_bytes
        #: Shared-memory regions of this stream, unmapped by :meth:`close`.
        self.regions = RegionTable(shared_memory, peer_uid)
        self._config: pb.StreamConfig | None = None
        self._last_sequence: int | None = None
        self.peer = peer
        self.counters = StreamCounters()
        self._instruments = engine.instruments
        #: The parent of this stream's batch spans (from the call's gRPC metadata).
        self._trace_context = trace_context
        self._unsampled_parent = self._instruments.unsampled_parent(trace_context)
        self._answered: _Answered | None = None
        self._mode = "unset"
        self._labels: dict[str, dict[str, str]] = {}
        #: Telemetry work the engine left for after the reply (plugin call latencies).
        self._deferred: list[Callable[[], object]] = []

    @property
    def mode(self) -> str:
        return self._mode

    def handle(self, request: pb.InspectRequest) -> pb.InspectResponse | None:
        """Process one message; returns the reply (None for the config) or raises StreamEnded."""
        kind = request.WhichOneof("message")
        if kind == "config":
            self._configure(request.config)
            return None
        if kind not in ("batch", "ended"):
            raise StreamEnded(InvalidInput(
                "InspectRequest: expected a config or a batch (or a RequestEnded in `ended`), "
                "found none of them"))
        if self._config is None:
            if kind == "ended":
                found = f"a RequestEnded for {len(request.ended.request_ids)} request(s)"
            else:
                batch = request.batch
                found = (f"a batch (request_id={codec.shown(batch.request_id)}, "
                         f"sequence={batch.sequence})")
            raise StreamEnded(ProtocolViolation(
                f"the first message on an Inspect stream must be a StreamConfig; found {found}"))
        if kind == "ended":
            self._end_requests(request.ended)
            return None
        return self._inspect(request.batch)

    def _end_requests(self, ended: pb.RequestEnded) -> None:
        """Free the state of requests the host says are over (no reply)."""
        reason: RequestEndReason = _END_REASONS.get(ended.reason, "unspecified")
        freed, unknown = self.requests.end(ended.request_ids)
        if freed:
            self._engine.end_requests(list(freed), reason)
        counters = self.counters
        counters.requests_ended += len(freed)
        counters.requests_unknown += unknown
        if self._instruments.metering:
            self._instruments.requests_forgotten(reason, ended=len(freed), unknown=unknown)
        if unknown:
            log.debug("RequestEnded for requests this stream does not hold", peer=self.peer,
                      unknown=unknown, reason=reason)

    def _configure(self, config: pb.StreamConfig) -> None:
        if self._config is not None:
            raise StreamEnded(
                ProtocolViolation("a StreamConfig was already received on this stream; "
                                  "open a new stream to change it")
            )
        version = config.protocol_version or "1"
        if version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise StreamEnded(
                ProtocolViolation(
                    f"config.protocol_version: this guard speaks {PROTOCOL_VERSION}, "
                    f"found {version!r}"
                )
            )
        if config.mode not in _MODES:
            found = _enum_name(pb.Mode, config.mode)
            raise StreamEnded(
                InvalidInput(f"config.mode: expected MODE_MONITOR or MODE_INLINE, found {found}")
            )
        try:
            codec.check_identifier("config.host", config.host, codec.MAX_HOST_BYTES)
            for index, hook in enumerate(config.hooks):
                codec.check_identifier(f"config.hooks[{index}]", hook, codec.MAX_HOOK_BYTES)
                self._engine.hook(hook)
        except GuardError as exc:
            raise StreamEnded(exc) from exc
        try:
            self.regions.register([(r.name, r.path, r.size, r.writable)
                                   for r in config.shared_memory])
        except GuardError as exc:
            raise StreamEnded(exc) from exc
        self._config = config
        self._mode = _MODES[config.mode]
        log.info(
            "stream configured",
            peer=self.peer,
            mode=self.mode,
            hooks=list(config.hooks),
            failure_policy=_enum_name(pb.FailurePolicy, config.failure_policy),
            batch_deadline_ms=config.batch_deadline_ms,
            host=config.host,
        )

    def _inspect(self, batch: pb.ActivationBatch) -> pb.InspectResponse:
        if self._answered is not None:
            self.after_reply()
        self.counters.batches += 1
        started = time.perf_counter()
        skipped = 0
        span: Span | None = None
        token: Token[Context] | None = None
        # Before anything logs, traces or echoes them: ids and hook within their caps.
        too_long = _oversized_identifier(batch, self.limits.max_segments)
        tracer = self._instruments.tracer if too_long is None else None
        if tracer is not None:
            span, token = self._start_span(tracer, batch)
            if span is None:
                tracer = None  # not sampled: no child spans, nothing to end
        try:
            skipped = self._check_sequence(batch.sequence)
            if too_long is not None:
                raise too_long
            if tracer is None:
                rows = self._decode(batch)
            else:
                with tracer.start_as_current_span(
                        "guard.decode", record_exception=False, set_status_on_exception=False):
                    rows = self._decode(batch)
            timings = {"decode": time.perf_counter() - started}
            deferred = self._deferred if self._instruments.metering else None
            if rows.segments:
                step = self._engine.inspect_step(rows, timings, started, deferred=deferred)
            else:
                decision = self._engine.inspect(rows, timings, started, deferred=deferred)
        except Exception as exc:
            if not isinstance(exc, GuardError):  # a bug: the peer gets a generic message
                log.exception("batch failed", request_id=_echoed(batch.request_id),
                              sequence=batch.sequence)
            reply = self._reject(batch, exc, skipped)
            self._answer(span, started, batch, (), False, exc, reply.error)
            return reply
        finally:
            if token is not None:
                otel_context.detach(token)
        self.counters.rows += len(batch.positions)
        delta_out = self._delta_out(batch)
        if rows.segments:
            evicted = [gone for segment in rows.segments
                       if (gone := self.requests.seen(
                           segment.request_id, segment.stop - segment.start)) is not None]
            if evicted:
                self._evicted(evicted)
            if span is not None or self._instruments.metering:
                self._answer(span, started, batch, step.decisions, True, None, None)
            return step_to_proto(step, batch, skipped,
                                 delta_datatype=batch.activations.datatype,
                                 delta_out=delta_out)
        gone = self.requests.seen(rows.request_id, len(batch.positions))
        if gone is not None:
            self._evicted([gone])
        if span is not None or self._instruments.metering:
            self._answer(span, started, batch, (decision,), False, None, None)
        return decision_to_proto(decision, skipped, batch.positions,
                                 delta_datatype=batch.activations.datatype,
                                 delta_out=delta_out)

    def _evicted(self, request_ids: list[str]) -> None:
        """Count requests the full table forgot, and tell the plugins (one queue item)."""
        self.counters.requests_evicted += len(request_ids)
        if self._instruments.metering:
            self._instruments.requests_forgotten(evicted=len(request_ids))
        self._engine.end_requests(request_ids, "evicted")

    def _start_span(self, tracer: trace.Tracer, batch: pb.ActivationBatch
                    ) -> tuple[Span | None, Token[Context]]:
        """The batch's span (None when not sampled) and the token of its context, made
        current even when not sampled: plugins' own spans then follow the same decision."""
        parent, unsampled = self._trace_context, self._unsampled_parent
        attributes = batch.attributes
        if attributes and "traceparent" in attributes:  # a per-batch parent wins
            parent = extract_context(dict(attributes)) or parent
            unsampled = self._instruments.unsampled_parent(parent)
        if unsampled and parent is not None:  # the host's "not sampled" stands: no span
            return None, otel_context.attach(parent)
        segments = batch.segments
        span = start_batch_span(
            tracer, parent, batch.request_id, batch.sequence, batch.hook, self._mode, self._rpc,
            [s.request_id for s in segments[:self.limits.max_segments]] if segments else ())
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return (span if span.is_recording() else None), token

    def _answer(self, span: Span | None, started: float, batch: pb.ActivationBatch,
                decisions: tuple[Decision, ...], step: bool, exc: BaseException | None,
                error: pb.BatchError | None) -> None:
        seconds = time.perf_counter() - started
        rejected = None
        if exc is not None and error is not None:
            code = status_code(exc)
            rejected = BatchError(code.name, error.code, error.message, exc)
        token_ids = None
        if span is not None and self._instruments.record_sensitive:
            token_ids = list(batch.token_ids)
        self._answered = _Answered(
            span, time.time_ns() if span is not None else 0,
            decisions[0].hook if decisions else batch.hook,
            sum(len(d.positions) for d in decisions),
            seconds, decisions, step, rejected, token_ids)

    def after_reply(self) -> None:
        """End the last batch's span and record its metrics (after its reply was sent)."""
        answered, self._answered = self._answered, None
        if answered is None:
            return
        instruments = self._instruments
        try:
            deferred, self._deferred = self._deferred, []
            for work in deferred:
                work()
            if answered.span is not None:
                end_batch_span(answered.span, answered.end_time_ns, answered.decisions,
                               answered.error, answered.token_ids, instruments.record_sensitive,
                               step=answered.step)
            if instruments.metering:
                instruments.batch_measured(self._metric_labels(answered.hook), answered.rows,
                                           answered.seconds, answered.decisions, answered.error)
        except Exception:  # telemetry must never end a stream
            log.exception("batch telemetry failed", peer=self.peer)

    def _metric_labels(self, hook: str) -> dict[str, str]:
        labels = self._labels.get(hook)
        if labels is None:
            # A hook the guard does not serve is one label value: a peer cannot add series
            # (nor grow this cache).
            known = hook if hook in self._engine.hooks else OTHER
            labels = self._labels.get(known)
            if labels is None:
                labels = self._labels[known] = {"guard.hook": known,
                                                "guard.stream.mode": self._mode}
        return labels

    def close(self) -> None:
        """Finish the telemetry of the last batch, end the requests still open
        (``stream_closed``) and unmap the shared-memory regions (the stream ended)."""
        try:
            self.after_reply()
        finally:
            try:
                self._engine.end_requests(self.requests.clear(), "stream_closed")
            except Exception:  # the stream is over either way: never fail its close
                log.exception("ending the stream's open requests failed", peer=self.peer)
            finally:
                self.regions.close()

    def _check_sequence(self, sequence: int) -> int:
        last = self._last_sequence
        if last is not None and sequence <= last:
            raise AlreadySeen(
                f"batch.sequence: expected {last + 1} (sequence numbers increase by 1 per "
                f"batch on a stream), found {sequence}, which repeats or goes back; "
                "the batch was not processed"
            )
        self._last_sequence = sequence
        skipped = 0 if last is None else sequence - last - 1
        if skipped:
            self.counters.skipped_sequences += skipped
            log.warning("sequence gap", peer=self.peer, expected=last + 1 if last is not None
                        else None, found=sequence, skipped=skipped)
        return skipped

    def _decode(self, batch: pb.ActivationBatch) -> ActivationRows:
        # Fields are read once into locals: every access to a message field allocates.
        request_id = batch.request_id
        hook = batch.hook
        segment_field = batch.segments
        if not request_id and not segment_field:
            raise InvalidInput("batch.request_id: expected a non-empty request id (or "
                               "segments), found ''")
        d_in = self._engine.hook(hook).d_in
        tensor = batch.activations
        raw = tensor.raw
        shm = tensor.shm if tensor.HasField("shm") else None
        nbytes = len(raw) if shm is None else shm.length
        if nbytes > self._max_message_bytes:
            raise TooLarge(
                f"batch.activations: {nbytes} bytes exceed the limit of "
                f"{self._max_message_bytes}; raise server.max_message_bytes in the guard's "
                "config (and the host's max send size) or send fewer rows per batch"
            )
        shape = tensor.shape
        if len(shape) != 2:
            raise InvalidInput(
                f"batch.activations.shape: expected [rows, d_in], found {list(shape)}"
            )
        n_rows, width = shape
        if width != d_in:
            raise InvalidInput(
                f"batch.activations.shape: hook {hook!r} has d_in {d_in}, "
                f"found width {width} (shape {list(shape)})"
            )
        if n_rows < 1:
            raise InvalidInput(
                f"batch.activations.shape: expected at least one row, found {list(shape)}"
            )
        if shm is None:
            rows = codec.decode(tensor.datatype, (n_rows, width), raw)
        else:
            if raw:
                raise InvalidInput("batch.activations: expected raw or shm, found both set")
            rows = self.regions.rows("batch.activations.shm", shm.region, shm.offset,
                                     shm.length, tensor.datatype, (n_rows, width))
        if batch.HasField("steering_ref"):
            ref = batch.steering_ref
            self.regions.resolve("batch.steering_ref", ref.region, ref.offset, ref.length,
                                 tensor.datatype, rows.size * codec.DATATYPES[tensor.datatype],
                                 write=True)
        position_field = batch.positions
        if len(position_field) != n_rows:
            raise InvalidInput(
                f"batch.positions: expected one position per row ({n_rows}), "
                f"found {len(position_field)}"
            )
        token_field = batch.token_ids
        if token_field and len(token_field) != n_rows:
            raise InvalidInput(
                f"batch.token_ids: expected none or one per row ({n_rows}), "
                f"found {len(token_field)}"
            )
        roles = codec.row_roles("batch.roles", batch.roles, n_rows)
        phase = _PHASES.get(batch.phase, Phase.UNSPECIFIED)
        prompt_complete = None
        if not segment_field and batch.HasField("prompt_complete"):
            prompt_complete = codec.prompt_complete("batch.prompt_complete",
                                                    batch.prompt_complete, phase)
        attributes = batch.attributes
        batch_attributes = dict(attributes) if attributes else {}
        segments = (self._segments(segment_field, n_rows, batch_attributes)
                    if segment_field else ())
        positions = np.array(position_field, dtype=np.int64)
        bad = codec.nonfinite_rows(rows)
        if bad.size:
            shown = ", ".join(str(int(positions[i])) for i in bad[:8])
            more = f" and {bad.size - 8} more" if bad.size > 8 else ""
            raise InvalidInput(
                f"batch.activations: rows at positions {shown}{more} hold NaN or Inf; "
                "expected finite values (non-finite rows are rejected, never encoded)"
            )
        return ActivationRows(
            request_id=request_id,
            sequence=batch.sequence,
            hook=hook,
            rows=rows,
            positions=positions,
            token_ids=np.array(token_field, dtype=np.int64) if token_field else None,
            phase=phase,
            attributes=batch_attributes,
            segments=segments,
            roles=roles,
            prompt_complete=prompt_complete,
            stream=self.stream_id,
        )

    def _segments(self, field: Iterable[pb.Segment], n_rows: int,
                  batch_attributes: dict[str, str]) -> tuple[Segment, ...]:
        """Validate a batch's segments against its ``n_rows`` rows; each request's
        attributes are merged over the batch's."""
        wire = list(field)
        limit = self.limits.max_segments
        if len(wire) > limit:
            raise TooLarge(
                f"batch.segments: {len(wire)} segments exceed the limit of {limit} per batch "
                "(DescribeResponse.max_segments_per_batch); split the step into batches of "
                "fewer requests")
        segments: list[Segment] = []
        first_index: dict[str, int] = {}
        start = 0
        for index, segment in enumerate(wire):
            request_id = segment.request_id
            if not request_id:
                raise InvalidInput(f"batch.segments[{index}].request_id: expected a non-empty "
                                   "request id, found ''")
            earlier = first_index.setdefault(request_id, index)
            if earlier != index:
                raise InvalidInput(
                    f"batch.segments[{index}].request_id: {request_id!r} is already "
                    f"segments[{earlier}]'s; expected each request at most once per batch "
                    "(its rows contiguous)")
            count = segment.rows
            if count < 1:
                raise InvalidInput(f"batch.segments[{index}].rows: expected at least 1 row, "
                                   f"found {count}")
            own = segment.attributes
            attributes = {**batch_attributes, **own} if own else batch_attributes
            phase = _PHASES.get(segment.phase, Phase.UNSPECIFIED)
            complete = None
            if segment.HasField("prompt_complete"):
                complete = codec.prompt_complete(f"batch.segments[{index}].prompt_complete",
                                                 segment.prompt_complete, phase)
            segments.append(Segment(request_id, start, start + count, phase, attributes,
                                    complete))
            start += count
        if start != n_rows:
            raise InvalidInput(
                f"batch.segments: the segments' rows sum to {start}, expected the "
                f"{n_rows} rows of batch.activations")
        return tuple(segments)

    def _delta_out(self, batch: pb.ActivationBatch) -> DeltaOut | None:
        """Where a STEER reply's delta goes: the batch's ``steering_ref`` (checked by
        :meth:`_decode`), or None for the reply's bytes."""
        if not batch.HasField("steering_ref"):
            return None
        ref = batch.steering_ref
        hook, datatype = batch.hook, batch.activations.datatype
        regions = self.regions
        alive = self._alive

        def write(steering_hook: str, delta: np.ndarray[Any, Any]) -> pb.Tensor | None:
            if steering_hook != hook:
                return None
            if alive is not None and not alive():  # the slot may hold other rows by now
                return None
            try:
                target = regions.resolve("batch.steering_ref", ref.region, ref.offset,
                                         ref.length, datatype,
                                         delta.size * codec.DATATYPES[datatype], write=True)
            except GuardError as exc:  # e.g. the file shrank meanwhile: send the bytes
                log.warning("steering delta sent as bytes", peer=self.peer, reason=str(exc))
                return None
            target.region.write(target.offset, datatype, delta)
            return pb.Tensor(datatype=datatype, shape=delta.shape,
                             shm=pb.SharedMemoryRef(region=ref.region, offset=ref.offset,
                                                    length=ref.length))

        return write

    def _reject(self, batch: pb.ActivationBatch, error: BaseException, skipped: int
                ) -> pb.InspectResponse:
        code = status_code(error)
        self.counters.rejected += 1
        self.counters.counts_by_code[code.name] = self.counters.counts_by_code.get(code.name, 0) + 1
        message = public_message(error)
        request_id = _echoed(batch.request_id)  # an id over its cap is neither logged nor echoed
        if code is not grpc.StatusCode.INTERNAL:
            log.info("batch rejected", peer=self.peer, request_id=request_id,
                     sequence=batch.sequence, code=code.name, reason=message)
        return pb.InspectResponse(
            request_id=request_id,
            sequence=batch.sequence,
            error=pb.BatchError(code=code.value[0], message=message),
            skipped_sequences=skipped,
        )


def _oversized_identifier(batch: pb.ActivationBatch, max_segments: int
                          ) -> InvalidInput | None:
    """The error for a batch whose request id, hook or a segment's request id is longer than
    its cap (:data:`guard.wire.codec.MAX_REQUEST_ID_BYTES`, ``MAX_HOOK_BYTES``); None when
    all fit. Only the segments a batch may carry are looked at (more are refused anyway)."""
    try:
        codec.check_identifier("batch.request_id", batch.request_id,
                               codec.MAX_REQUEST_ID_BYTES)
        codec.check_identifier("batch.hook", batch.hook, codec.MAX_HOOK_BYTES)
        for index, segment in enumerate(batch.segments[:max_segments]):
            codec.check_identifier(f"batch.segments[{index}].request_id", segment.request_id,
                                   codec.MAX_REQUEST_ID_BYTES)
    except InvalidInput as exc:
        return exc
    return None


def _echoed(request_id: str) -> str:
    """The request id a reply or a log line may carry: empty when over its cap."""
    return "" if codec.oversized(request_id, codec.MAX_REQUEST_ID_BYTES) else request_id


def _enum_name(enum: Any, value: int) -> str:
    """The name of a protobuf enum value, or the number for a value this guard does not know."""
    return str(enum.Name(value)) if value in enum.values() else str(value)


#: Writes a steering delta (hook, array) into shared memory; returns the reply's tensor, or
#: None to send the delta's bytes in the reply.
DeltaOut = Callable[[str, "np.ndarray[Any, Any]"], "pb.Tensor | None"]


def step_to_proto(
    step: StepDecision, batch: pb.ActivationBatch, skipped_sequences: int = 0, *,
    delta_datatype: str = "F32", delta_out: DeltaOut | None = None,
) -> pb.InspectResponse:
    """The wire form of a batch with segments: one verdict per request, the most severe
    action at the batch level (for hosts that read no verdicts), and one delta per hook over
    every row (as :func:`decision_to_proto` sends it)."""
    response = pb.InspectResponse(
        request_id=batch.request_id,
        sequence=step.sequence,
        action=pb.Action.ValueType(step.action.value),
        skipped_sequences=skipped_sequences,
    )
    response.positions.extend(batch.positions)
    aborted: list[str] = []
    for decision in step.decisions:
        verdict = response.verdicts.add(
            request_id=decision.request_id,
            action=pb.Action.ValueType(decision.action.value),
            decision_id=decision.decision_id,
            details=decision.details,
        )
        verdict.positions.extend(decision.positions.tolist())
        _add_findings(verdict.findings, decision)
        if decision.action is Action.ABORT:
            aborted.append(f"request {decision.request_id}: {decision.details}")
    if aborted:
        response.details = "; ".join(aborted)
    _add_steering(response, step.steering, delta_datatype, delta_out)
    return response


def decision_to_proto(
    decision: Decision, skipped_sequences: int = 0, positions: Iterable[int] | None = None,
    *, delta_datatype: str = "F32", delta_out: DeltaOut | None = None,
) -> pb.InspectResponse:
    """The wire form of a decision; ``positions`` may pass the request's own field (faster).

    Steering deltas travel in the batch's own datatype (``delta_datatype``): the host adds
    them to a residual of that dtype, and an F16 batch's reply then stays as small as the
    batch (an F32 delta would be twice the size and could exceed the message limit).
    ``delta_out`` (the batch asked for its delta in shared memory) may write a delta there
    and return the tensor that refers to it.
    """
    response = pb.InspectResponse(
        request_id=decision.request_id,
        sequence=decision.sequence,
        decision_id=decision.decision_id,
        action=pb.Action.ValueType(decision.action.value),
        details=decision.details,
        skipped_sequences=skipped_sequences,
    )
    response.positions.extend(decision.positions.tolist() if positions is None else positions)
    _add_findings(response.findings, decision)
    _add_steering(response, decision.steering, delta_datatype, delta_out)
    return response


def _add_findings(findings: RepeatedCompositeFieldContainer[pb.Finding],
                  decision: Decision) -> None:
    """The decision's findings for the host (a reply's, or a verdict's)."""
    for finding in decision.findings:
        if finding.action == "log":  # log-only findings go to the decision log, not the host
            continue
        findings.add(
            detector=finding.detector,
            score=finding.score,
            threshold=finding.threshold,
            action=pb.ACTION_ABORT if finding.action == "abort" else pb.ACTION_CONTINUE,
            feature_ids=finding.feature_ids,
            feature_activations=finding.feature_activations,
            feature_labels=finding.feature_labels,
            positions=finding.positions,
            message=finding.message,
            out_of_distribution=finding.out_of_distribution,
        )


def _add_steering(response: pb.InspectResponse, steerings: Iterable[Steering],
                  delta_datatype: str, delta_out: DeltaOut | None) -> None:
    for steering in steerings:
        if delta_out is not None:
            tensor = delta_out(steering.hook, steering.delta)
            if tensor is not None:  # written into the host's shared memory
                response.steering.add(hook=steering.hook, delta=tensor)
                continue
        shape, raw = codec.encode(steering.delta, delta_datatype)
        response.steering.add(
            hook=steering.hook, delta=pb.Tensor(datatype=delta_datatype, shape=shape, raw=raw)
        )
