"""The sans-I/O core of the host clients, shared by :class:`guard.host.GuardClient` (threads)
and :class:`guard.host.AsyncGuardClient` (asyncio), as httpx's ``BaseClient`` is by its
``Client`` and ``AsyncClient``.

:class:`BaseClient` holds what does not depend on how the client waits: the options and
counters, the shared-memory region, the client's lifecycle state, the failure-policy verdicts
of an INLINE batch, MONITOR queue accounting, reply handling, reconnect backoff, and the close
summary. :class:`StreamState` holds what every stream keeps, whichever client and transport
it serves: sequence numbers, the INLINE batches waiting for replies, the region's view, and
how a stream ends. The client and stream subclasses add only the waiting and the I/O.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from types import TracebackType
from typing import ClassVar, Generic, Literal, Protocol, TypeVar

import grpc
import numpy as np
import structlog
from numpy.typing import NDArray

from guard.decision import Phase
from guard.host import tracing
from guard.host._batch import (
    BatchItem,
    EndItem,
    PhaseName,
    Positions,
    Roles,
    Segment,
    prepare_batch,
    prepare_end,
    prepare_step,
)
from guard.host._options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Backoff,
    ClientCounters,
    ClientOptions,
    CounterBox,
    MetadataHook,
    ReplyHook,
    TraceContextHook,
)
from guard.host._pending import PendingReplies
from guard.host._verdict import (
    Answer,
    Cause,
    StepVerdict,
    Verdict,
    error_text,
    monitor_reply_verdicts,
    monitor_verdict,
    policy_verdict,
    reply_to_verdict,
    unavailable_reason,
)
from guard.host.shm import HostRegion, SharedMemory, StreamShm, release_unsent
from guard.v1 import guard_pb2 as pb

log = structlog.get_logger("guard.host")

State = Literal["idle", "open", "down", "closed"]
Transport = Literal["grpc", "doorbell"]


class ClientClosedError(RuntimeError):
    """``inspect`` was called on a closed client."""


@dataclass(frozen=True)
class Failure:
    """Why an INLINE batch will get no reply."""

    cause: Cause
    reason: str


#: How an INLINE batch's wait ends: the guard's reply, or why none will come.
Outcome = pb.InspectResponse | Failure


class ReplyWaiter(Protocol):
    """Where an INLINE batch's outcome is left for its caller (a thread or a task)."""

    def resolve(self, outcome: Outcome) -> None:
        """Hand over the outcome; the first one stands."""


class GuardStream(Protocol):
    """What the client core needs of a stream, whichever client and transport it serves."""

    shm: StreamShm
    finished: threading.Event
    pending: PendingReplies[ReplyWaiter]
    replies: int
    end_reason: str

    @property
    def transport(self) -> Transport:
        """What carries the stream."""

    def reset(self, reason: str) -> None:
        """End the stream from this side (the guard fell behind, or the client closes)."""

    def send_ended(self, item: EndItem) -> bool:
        """Send (or queue) a RequestEnded; no reply comes and no sequence number is used.
        False when it could not be (the stream ended, MONITOR's queue is full)."""


#: What a stream calls with every reply it reads (the client's :meth:`BaseClient._on_reply`).
ReplyHandler = Callable[[GuardStream, pb.InspectResponse], None]


def status_text(error: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call (sync or asyncio)."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):
        text = f"{code().name}: {details()}"
        if code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in text:
            # gRPC's own transport limit (2 x server.max_message_bytes) ended the stream.
            text += (" (a message above the guard's transport limit, twice its "
                     "server.max_message_bytes: send fewer rows per batch, or raise "
                     "server.max_message_bytes and this client's max_message_bytes)")
        return text
    return str(error) or type(error).__name__


def call_metadata(options: ClientOptions) -> tuple[tuple[str, str | bytes], ...] | None:
    """The metadata hook's pairs for a new stream (None without a hook, or when it fails)."""
    if options.metadata is None:
        return None
    try:
        return tuple((str(key), value) for key, value in options.metadata())
    except Exception:  # a broken hook must not stop the guard client
        log.exception("metadata hook failed; opening the stream without it")
        return None


def deadline_seconds(options: ClientOptions, deadline_ms: float | None) -> float:
    if deadline_ms is None:
        return options.deadline_ms / 1e3
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int | float) or not (
            deadline_ms > 0):
        raise ValueError(f"deadline_ms: expected a number > 0 or None, found {deadline_ms!r}")
    return deadline_ms / 1e3


Box = TypeVar("Box")


class StreamState(ABC, Generic[Box]):
    """What every stream keeps of itself (sync or asyncio, gRPC call or doorbell socket):
    the region's view, the counters, its outbox (``Box``: the client's kind of queue), the
    INLINE batches waiting for replies, the sequence numbers, and how it ended."""

    #: What carries the stream (:attr:`BaseClient.transport`).
    transport: ClassVar[Transport] = "grpc"

    def __init__(self, options: ClientOptions, counters: CounterBox, outbox: Box,
                 region: HostRegion | None) -> None:
        self.options = options
        self.shm = StreamShm(region)
        self.counters = counters
        self.outbox = outbox
        self.finished = threading.Event()
        self.pending: PendingReplies[ReplyWaiter] = PendingReplies()
        self.replies = 0
        self.end_reason = ""
        self._reset_reason = ""
        self._next_sequence = 1

    @abstractmethod
    def reset(self, reason: str) -> None:
        """End the stream from this side (the guard fell behind, or the client closes)."""

    @abstractmethod
    def send_ended(self, item: EndItem) -> bool:
        """Send (or queue) a RequestEnded: no sequence number, no reply; False when not."""

    def _assign(self, item: BatchItem, waiter: ReplyWaiter) -> bool:
        """INLINE (under the caller's send lock, if any): the batch takes the next sequence
        number and waits for its reply in ``waiter``; False once the stream has ended."""
        sequence = self._next_sequence
        if not self.pending.add(sequence, waiter):
            return False
        self._next_sequence += 1
        item.sequence = sequence
        self.shm.bind(sequence, item.shm)
        return True

    def _unassign(self, item: BatchItem) -> None:
        """The batch was not sent after all: no reply will come, its slot is free."""
        self.pending.remove(item.sequence)
        self.shm.release(item.sequence)

    def _number(self, item: BatchItem) -> None:
        """MONITOR: a batch gets its sequence number as it is sent, after the drops before
        it (its gap)."""
        item.sequence = self._next_sequence + item.gap_before
        self._next_sequence = item.sequence + 1
        self.shm.bind(item.sequence, item.shm)

    def _received(self, reply: pb.InspectResponse, on_reply: ReplyHandler) -> None:
        self.replies += 1
        self.counters.add("replies")
        on_reply(self, reply)

    def _failed_reading(self, event: str, exc: Exception) -> str:
        """A client bug while reading (called in the ``except``, so the log has the traceback):
        end this stream, the next one starts clean; returns why it ended."""
        log.exception(event)
        self.reset(f"the client failed reading a reply: {type(exc).__name__}")
        return self._reset_reason

    def _finish(self, reason: str) -> bool:
        """The stream is over (the first reason stands): the sender stops, batches still
        waiting get the failure policy, their slots are freed. False when it already was."""
        if self.finished.is_set():
            return False
        self.end_reason = reason
        self.finished.set()
        self._stop_sending()
        for waiter in self.pending.close(reason):
            waiter.resolve(Failure("unavailable", unavailable_reason(reason)))
        self.shm.close(reason, self.replies)
        return True

    def _stop_sending(self) -> None:
        """Let the sender see that the stream is over (each transport knows how)."""


class InspectSpan:
    """The ``guard.host.inspect`` span of one batch (or one step of several requests), as a
    ``with`` block: ended with the verdict handed to :meth:`ended`, or as an error when the
    block raises (a cancelled task, a client bug)."""

    def __init__(self, item: BatchItem, mode: str, doorbell: bool) -> None:
        self._mode = mode
        self._verdict: Answer | None = None
        if item.segments:
            self._span = tracing.start_step_span(item.request_ids, item.hook,
                                                 len(item.positions), mode, doorbell)
        else:
            self._span = tracing.start_inspect_span(item.request_id, item.hook,
                                                    len(item.positions), mode, doorbell)
        tracing.inject(self._span, item.attributes)  # the guard's batch span becomes its child
        self._started = time.perf_counter()

    def __enter__(self) -> InspectSpan:
        return self

    def ended(self, verdict: Answer) -> Answer:
        self._verdict = verdict
        return verdict

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            tracing.fail_inspect_span(self._span, exc)
        elif self._verdict is not None:
            tracing.end_inspect_span(self._span, self._verdict, self._mode,
                                     time.perf_counter() - self._started)


StreamT = TypeVar("StreamT", bound=GuardStream)
KeeperT = TypeVar("KeeperT")


class BaseClient(ABC, Generic[StreamT, KeeperT]):
    """What the sync and asyncio clients share; see :class:`guard.host.GuardClient` for the
    parameters. ``StreamT``: the client's streams; ``KeeperT``: what runs its client loop
    (a thread or a task), started with the first batch."""

    def __init__(
        self,
        target: str,
        *,
        mode: Literal["inline", "monitor"] = "inline",
        hooks: Sequence[str] = (),
        failure_policy: Literal["open", "closed"] = "open",
        deadline_ms: float = 50.0,
        queue_size: int = 256,
        host_name: str = "",
        reconnect_backoff_ms: float = 100.0,
        reconnect_backoff_max_ms: float = 5000.0,
        reconnect_jitter: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        wire_dtype: Literal["auto", "F32", "F16", "BF16"] = "auto",
        reset_after_late: int = 2,
        metadata: MetadataHook | None = None,
        trace_context: TraceContextHook | None = None,
        on_reply: ReplyHook | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        shared_memory: str | PathLike[str] | SharedMemory | None = None,
    ) -> None:
        shm_spec = SharedMemory.of(shared_memory)
        self._options = ClientOptions.build(
            target, mode=mode, hooks=hooks, failure_policy=failure_policy,
            deadline_ms=deadline_ms, queue_size=queue_size, host_name=host_name,
            reconnect_backoff_ms=reconnect_backoff_ms,
            reconnect_backoff_max_ms=reconnect_backoff_max_ms,
            reconnect_jitter=reconnect_jitter, max_message_bytes=max_message_bytes,
            wire_dtype=wire_dtype, reset_after_late=reset_after_late, metadata=metadata,
            trace_context=trace_context, on_reply=on_reply, credentials=credentials,
        )
        self._monitor = self._options.mode == "monitor"
        self._counters = CounterBox()
        #: The shared-memory region (``shared_memory=``), or None: rows travel as bytes.
        self._shm = HostRegion(shm_spec, self._counters) if shm_spec is not None else None
        self._place = self._shm.place if self._shm is not None else None
        # A plain lock (never held across a wait or an await) for the lifecycle fields, so the
        # sync client's threads and the asyncio client's tasks read them the same way.
        self._lock = threading.Lock()
        self._closed = False
        self._stream: StreamT | None = None
        self._keeper: KeeperT | None = None
        self._backoff = Backoff(self._options.reconnect_backoff_ms / 1e3,
                                self._options.reconnect_backoff_max_ms / 1e3,
                                self._options.reconnect_jitter)
        self._dropping = False
        self._set_up()

    @abstractmethod
    def _set_up(self) -> None:
        """The client's own I/O state (channel, outbox, wake-up), made at the end of
        ``__init__``."""

    @abstractmethod
    def _open_stream(self) -> StreamT:
        """A new stream: on the doorbell socket when :meth:`_doorbell_path` names one,
        otherwise a gRPC call."""

    @abstractmethod
    def _start_keeper(self) -> KeeperT:
        """Start the client loop that reads the stream and reopens it when it breaks."""

    @abstractmethod
    def _offer(self, item: BatchItem) -> bool:
        """MONITOR: queue the batch without waiting; False when the queue is full (the batch
        is dropped: the next queued one records the gap)."""

    # -- public ---------------------------------------------------------------------------

    @property
    def options(self) -> ClientOptions:
        return self._options

    @property
    def counters(self) -> ClientCounters:
        """A snapshot of the counts (sent, fail_open, fail_closed, timeouts, ...)."""
        return self._counters.snapshot()

    @property
    def transport(self) -> Literal["grpc", "doorbell", ""]:
        """What carries the current stream: a gRPC call, the guard's doorbell socket (shared
        memory, :mod:`guard.host.doorbell`), or nothing yet ("")."""
        stream = self._stream
        return "" if stream is None else stream.transport

    @property
    def state(self) -> State:
        """``idle`` (no batch yet), ``open`` (a stream is up), ``down`` (reconnecting),
        ``closed``."""
        with self._lock:
            if self._closed:
                return "closed"
            if self._keeper is None:
                return "idle"
            stream = self._stream
        return "open" if stream is not None and not stream.finished.is_set() else "down"

    # -- one batch ------------------------------------------------------------------------

    def _prepare(self, request_id: str, hook: str, rows: NDArray[np.floating],
                 positions: Positions, token_ids: Positions | None, phase: PhaseName | Phase,
                 attributes: Mapping[str, str] | None, roles: Roles | None = None,
                 prompt_complete: bool | None = None) -> BatchItem:
        """Validate and encode ``inspect``'s arguments (into the region when there is one)."""
        return prepare_batch(self._options, request_id, hook, rows, positions, token_ids,
                             phase, attributes, place=self._place, roles=roles,
                             prompt_complete=prompt_complete)

    @staticmethod
    def _single(answer: Answer) -> Verdict:
        """``inspect``'s verdict (a batch without segments gets a :class:`Verdict`)."""
        assert isinstance(answer, Verdict), answer
        return answer

    @staticmethod
    def _step(answer: Answer) -> StepVerdict:
        """``inspect_step``'s verdict (a batch with segments gets a :class:`StepVerdict`)."""
        assert isinstance(answer, StepVerdict), answer
        return answer

    def _prepare_step(self, hook: str, rows: NDArray[np.floating], segments: Sequence[Segment],
                      positions: Positions, token_ids: Positions | None,
                      attributes: Mapping[str, str] | None, roles: Roles | None = None
                      ) -> BatchItem:
        """Validate and encode ``inspect_step``'s arguments (into the region when there is
        one)."""
        return prepare_step(self._options, hook, rows, segments, positions, token_ids,
                            attributes, place=self._place, roles=roles)

    def _end(self, request_ids: Sequence[str], reason: str) -> bool:
        """``end_requests``: a RequestEnded on the open stream (never one of its own: the
        guard forgets a stream's requests when the stream ends). No reply is awaited; it
        takes no sequence number. False when no stream took it."""
        item = prepare_end(request_ids, reason)
        with self._lock:
            if self._closed:
                raise ClientClosedError(
                    f"{type(self).__name__}.end_requests: the client is closed")
            stream = self._stream
        if not item.request_ids or stream is None or stream.finished.is_set():
            return False
        if not stream.send_ended(item):
            return False
        self._counters.add("requests_ended", len(item.request_ids))
        return True

    def _traced(self, item: BatchItem, stream: StreamT | None) -> InspectSpan:
        return InspectSpan(item, self._options.mode,
                           stream is not None and stream.transport == "doorbell")

    def _live_stream(self) -> StreamT | None:
        """The open stream (opened on the first call), or None while the guard is down."""
        with self._lock:
            if self._closed:
                raise ClientClosedError(f"{type(self).__name__}.inspect: the client is closed")
            if self._keeper is None:
                self._stream = self._open_stream()
                self._keeper = self._start_keeper()
            stream = self._stream
        return stream if stream is not None and not stream.finished.is_set() else None

    def _unavailable(self, item: BatchItem, stream: StreamT | None) -> Answer:
        """INLINE: no stream took the batch: the failure policy decides."""
        release_unsent(item.shm)
        if stream is not None:
            why = stream.end_reason
        else:
            current = self._stream
            why = current.end_reason if current is not None else "no stream"
        return policy_verdict(self._options, self._counters, item, "unavailable",
                              unavailable_reason(why))

    def _late(self, stream: StreamT, item: BatchItem, timeout: float) -> Answer | None:
        """INLINE: the deadline passed: the failure policy's verdict, or None when the reply
        was resolved in the meantime (use it). Resets a stream the guard fell behind on."""
        unanswered = stream.pending.abandon(item.sequence)
        if unanswered is None:
            return None
        if unanswered >= self._options.reset_after_late:
            stream.reset(f"{unanswered} batches past their deadline are still "
                         "unanswered: the guard is falling behind")
        return policy_verdict(self._options, self._counters, item, "timeout",
                              f"no reply from the guard within {timeout * 1e3:g} ms "
                              f"(sequence {item.sequence})")

    def _answer(self, item: BatchItem, outcome: Outcome) -> Answer:
        """INLINE: the verdict on the batch's outcome: the guard's, or the failure policy's."""
        if isinstance(outcome, Failure):
            return policy_verdict(self._options, self._counters, item, outcome.cause,
                                  outcome.reason)
        return reply_to_verdict(self._options, self._counters, item, outcome)

    def _enqueue(self, item: BatchItem) -> Answer:
        """MONITOR: queue the batch (or drop it when the queue is full); CONTINUE at once."""
        if self._offer(item):
            if self._dropping:
                self._dropping = False
                log.info("monitor queue accepting batches again",
                         dropped=self._counters.snapshot().dropped)
        else:
            release_unsent(item.shm)
            dropped = self._counters.add("dropped")
            tracing.instruments().monitor_dropped.add(1)
            if not self._dropping:  # one line per episode, not one per batch
                self._dropping = True
                log.warning("monitor queue full: dropping the newest batches",
                            queue_size=self._options.queue_size, dropped=dropped,
                            request_id=item.request_id or list(item.request_ids),
                            hook=item.hook)
        return monitor_verdict(item)

    # -- the stream -----------------------------------------------------------------------

    def _doorbell_path(self) -> str | None:
        """The guard's doorbell socket when the region is in use and the guard serves one."""
        region = self._shm
        if region is not None and region.enabled and region.doorbell:
            return region.doorbell
        return None

    def _region_to_check(self) -> HostRegion | None:
        """The region, when the guard has yet to say (Describe) whether it takes it."""
        region = self._shm
        return region if region is not None and region.needs_check else None

    def _is_closed(self) -> bool:
        with self._lock:
            return self._closed

    def _retry_delay(self, stream: StreamT, reason: str) -> float | None:
        """The stream ended: how long to wait before reopening it; None once closed."""
        if stream.replies:
            self._backoff.reset()
        delay = self._backoff.next()
        if self._is_closed():
            return None
        log.warning("guard stream down", target=self._options.target, reason=reason,
                    replies=stream.replies, retry_in_ms=round(delay * 1e3))
        return delay

    def _reopened(self) -> None:
        reconnects = self._counters.add("reconnects")
        log.info("guard stream reopened", target=self._options.target, reconnects=reconnects)

    def _on_reply(self, stream: GuardStream, reply: pb.InspectResponse) -> None:
        stream.shm.on_reply(reply)  # a delta in shared memory is copied out, the slot freed
        if self._monitor:
            self._on_monitor_reply(reply)
            return
        resolution = stream.pending.resolve(reply.sequence)
        for skipped in resolution.skipped:
            skipped.resolve(Failure(
                "protocol", f"the guard answered sequence {reply.sequence} before this "
                            "batch's and never answered this one"))
        if resolution.slot is not None:
            resolution.slot.resolve(reply)
        elif resolution.was_late:
            late = self._counters.add("late_replies")
            log.info("late reply discarded", request_id=reply.request_id,
                     sequence=reply.sequence, late_replies=late)
        else:
            log.warning("reply to an unknown batch discarded", request_id=reply.request_id,
                        sequence=reply.sequence)

    def _on_monitor_reply(self, reply: pb.InspectResponse) -> None:
        if reply.HasField("error"):
            errors = self._counters.add("errors")
            log.warning("guard rejected a monitored batch", request_id=reply.request_id,
                        sequence=reply.sequence, reason=error_text(reply.error), errors=errors)
        callback = self._options.on_reply
        if callback is None:
            return
        for verdict in monitor_reply_verdicts(reply):  # one per request of a step
            try:
                callback(verdict)
            except Exception:  # the user's callback must not stop the reader
                log.exception("on_reply callback failed", request_id=verdict.request_id,
                              sequence=reply.sequence)

    # -- closing --------------------------------------------------------------------------

    def _begin_close(self) -> bool:
        """Mark the client closed (no stream opens after this); False when it already was."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def _closed_summary(self, left: int) -> None:
        """The last step of ``close``: MONITOR batches ``left`` unsent count as dropped, the
        region is unmapped and unlinked, and one line sums the client's life up."""
        if left:
            self._counters.add("dropped", left)
        if self._shm is not None:
            self._shm.close()
        counts = self._counters.snapshot()
        log.info("guard client closed", target=self._options.target, sent=counts.sent,
                 fail_open=counts.fail_open, fail_closed=counts.fail_closed,
                 timeouts=counts.timeouts, errors=counts.errors, dropped=counts.dropped,
                 reconnects=counts.reconnects)
