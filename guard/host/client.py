"""The synchronous host client: one long-lived Inspect stream per client.

Threads: the caller's (validates and encodes a batch, waits for its reply in INLINE mode),
one client thread per client (reads replies, and reopens the stream with backoff when it
breaks), and gRPC's own sender thread, which takes batches from an outbox.

- INLINE: ``inspect`` gives the batch the stream's next sequence number, puts it in the
  stream's outbox and waits for the reply with that sequence number within the deadline.
  Calls from several threads pipeline on the one stream. A reply that comes after its
  deadline is recognised by its sequence number and discarded.
- MONITOR: ``inspect`` offers the batch to a bounded outbox and returns at once; gRPC's sender
  thread drains it (so gRPC flow control, not memory, absorbs a slow guard). When the outbox
  is full the newest batch is dropped and counted; its sequence number is skipped, so the
  guard's ``skipped_sequences`` reports the drop.
- While the stream is down, INLINE calls get the failure policy at once (no wait), and the
  client thread reopens the stream after an exponential backoff with jitter. A new stream
  sends the StreamConfig again and numbers batches from 1.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import Literal

import grpc
import numpy as np
import structlog
from numpy.typing import NDArray

from guard.decision import Action, Phase
from guard.errors import GuardError
from guard.host import tracing
from guard.host._batch import BatchItem, PhaseName, Positions, prepare_batch, stream_config
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
from guard.host._outbox import HostStream, Outbox, ReplySlot, StreamState
from guard.host._verdict import (
    Verdict,
    decision_verdict,
    error_text,
    monitor_verdict,
    policy_verdict,
    reply_to_verdict,
    unavailable_reason,
)
from guard.host.doorbell import DoorbellStream
from guard.host.shm import HostRegion, SharedMemory, release_unsent
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc

log = structlog.get_logger("guard.host")

State = Literal["idle", "open", "down", "closed"]


class ClientClosedError(RuntimeError):
    """``inspect`` was called on a closed client."""


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


class _GrpcStream(StreamState):
    """One Inspect call: the StreamConfig, then batches from the outbox."""

    def __init__(self, stub: pb_grpc.GuardStub, options: ClientOptions, counters: CounterBox,
                 outbox: Outbox, metadata: tuple[tuple[str, str | bytes], ...] | None,
                 shm: HostRegion | None = None) -> None:
        super().__init__(options, counters, outbox, shm)
        self._submit_lock = threading.Lock()
        self.call = stub.Inspect(self._requests(), metadata=metadata)

    def _requests(self) -> Iterator[pb.InspectRequest]:
        yield pb.InspectRequest(config=self.shm.configure(stream_config(self.options)))
        monitor = self.options.mode == "monitor"
        while (item := self.outbox.take(self.finished)) is not None:
            if monitor:  # INLINE batches got theirs in submit()
                self._number(item)
            self.counters.add("sent")
            yield item.to_request()

    def submit(self, item: BatchItem, timeout: float) -> ReplySlot | None:
        """INLINE: number the batch and queue it; None when the stream has ended. (Queueing
        never waits: ``timeout`` is for the doorbell's interface.)"""
        slot = ReplySlot()
        with self._submit_lock:  # sequence order is outbox order
            if not self._assign(item, slot):
                return None
            if not self.outbox.offer(item):  # the client is closing
                self._unassign(item)
                return None
        return slot

    def wait(self, slot: ReplySlot, timeout: float) -> bool:
        """INLINE: the client thread delivers the reply; wait for it."""
        return slot.done.wait(timeout)

    def reset(self, reason: str) -> None:
        """End the stream from this side (the guard fell behind, or the client closes)."""
        self._reset_reason = reason
        self.call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def close_sending(self) -> None:
        """gRPC's sender sends what is queued, then half-closes the call."""
        self.outbox.close()

    def read(self, on_reply: Callable[[HostStream, pb.InspectResponse], None]) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
        try:
            for reply in self.call:
                self.replies += 1
                self.counters.add("replies")
                on_reply(self, reply)
            reason = self._reset_reason or "the guard ended the stream"
        except grpc.RpcError as exc:
            reason = self._reset_reason or f"the stream to the guard ended: {status_text(exc)}"
        except Exception as exc:  # a client bug: end this stream; the next one starts clean
            log.exception("guard client failed reading a reply")
            self.reset(f"the client failed reading a reply: {type(exc).__name__}")
            reason = self._reset_reason
        self.end_reason = reason
        self.finished.set()
        self.outbox.wake()
        for slot in self.pending.close(reason):
            slot.fail("unavailable", unavailable_reason(reason))
        self.shm.close(reason, self.replies)
        return reason


class GuardClient:
    """Sends activation rows to an Activation Guard and returns its verdicts.

    :param target: the guard's address: ``unix:///path/guard.sock`` or ``host:port``.
    :param mode: ``inline`` (wait for each verdict) or ``monitor`` (never wait).
    :param hooks: the hooks this host sends (sent in the StreamConfig; the guard ends the
        stream if it does not serve one). Empty: any hook.
    :param failure_policy: ``open`` (CONTINUE) or ``closed`` (ABORT) when the guard is down,
        late, or rejects a batch.
    :param deadline_ms: INLINE: how long ``inspect`` waits for a reply.
    :param queue_size: MONITOR: batches waiting to be sent; when full the newest is dropped.
    :param host_name: free-form name of this host, for the guard's records.
    :param reconnect_backoff_ms: first delay before reopening a broken stream; it doubles
        per failed attempt up to ``reconnect_backoff_max_ms``, each spread by
        +-``reconnect_jitter``.
    :param max_message_bytes: the largest activation tensor sent; match the guard's
        ``server.max_message_bytes``.
    :param wire_dtype: ``auto`` (float32 rows as F32, float16 as F16), or F32, F16, BF16.
    :param reset_after_late: INLINE: when this many timed-out batches are still unanswered,
        the guard is falling behind: the stream is reset instead of queueing more behind them.
    :param metadata: called when a stream opens; its pairs go in the Inspect call's gRPC
        metadata (the stream is shared by many requests: per-request context belongs in
        ``trace_context``).
    :param trace_context: called on the caller's thread for every batch; its entries (W3C
        ``traceparent``/``tracestate``) are added to the batch's attributes. Not needed with
        OpenTelemetry: each batch gets a ``guard.host.inspect`` span whose context travels
        in the batch's attributes (:mod:`guard.host.tracing`); a ``traceparent`` from this
        hook wins over it (for applications that trace with something else).
    :param on_reply: MONITOR: called with each guard verdict, on the client's thread.
    :param credentials: TLS for a guard's TCP listener with ``server.tls``
        (:func:`guard.host.tls_credentials` builds them from PEM files: the CA, and for mutual
        TLS this host's certificate and key); None: plaintext (the in-pod Unix socket).
    :param shared_memory: the in-pod fast path (opt-in): a memory-backed folder that the
        guard also sees (``"/dev/shm"``) or a :class:`guard.host.shm.SharedMemory`. Rows then
        travel in a region file (created here, unlinked by :meth:`close`) and only a reference
        goes over gRPC; see :mod:`guard.host.shm`.
    """

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
        self._counters = CounterBox()
        #: The shared-memory region (``shared_memory=``), or None: rows travel as bytes.
        self._shm = HostRegion(shm_spec, self._counters) if shm_spec is not None else None
        self._place = self._shm.place if self._shm is not None else None
        # gRPC channels connect lazily: nothing happens on the network until the first batch.
        self._channel = self._options.open_channel()
        self._stub = pb_grpc.GuardStub(self._channel)
        self._lock = threading.Lock()
        self._closed = False
        self._stream: HostStream | None = None
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._monitor_outbox = Outbox(queue_size) if self._options.mode == "monitor" else None
        self._dropping = False

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
        if stream is None:
            return ""
        return "doorbell" if isinstance(stream, DoorbellStream) else "grpc"

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

    def inspect(
        self,
        request_id: str,
        hook: str,
        rows: NDArray[np.floating],
        positions: Positions,
        token_ids: Positions | None = None,
        phase: PhaseName | Phase = "prompt",
        attributes: Mapping[str, str] | None = None,
        *,
        deadline_ms: float | None = None,
    ) -> Verdict:
        """Send one batch ``rows [n, d_in]`` of one hook of one request; returns its verdict.

        INLINE: waits for the guard's verdict up to the deadline (``deadline_ms`` overrides
        the client's for this call); on a fault the failure policy decides. MONITOR: returns
        CONTINUE with source ``monitor`` at once. Raises ValueError or TypeError for bad
        arguments, :class:`guard.errors.TooLarge` for a batch above ``max_message_bytes``,
        :class:`ClientClosedError` after :meth:`close`.
        """
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            self._check_shm()  # before the first batch is placed in the region
        item = prepare_batch(self._options, request_id, hook, rows, positions, token_ids,
                             phase, attributes, place=self._place)
        stream = self._live_stream()  # opened on the first batch; None while the guard is down
        span = tracing.start_inspect_span(request_id, hook, len(item.positions),
                                          self._options.mode,
                                          isinstance(stream, DoorbellStream))
        tracing.inject(span, item.attributes)  # the guard's batch span becomes its child
        started = time.perf_counter()
        try:
            verdict = self._decide(stream, item, timeout)
        except BaseException as exc:
            tracing.fail_inspect_span(span, exc)
            raise
        tracing.end_inspect_span(span, verdict, self._options.mode,
                                 time.perf_counter() - started)
        return verdict

    def _decide(self, stream: HostStream | None, item: BatchItem, timeout: float) -> Verdict:
        """The verdict on one prepared batch: the guard's, or the failure policy's."""
        if self._monitor_outbox is not None:
            return self._enqueue(self._monitor_outbox, item)
        slot = stream.submit(item, timeout) if stream is not None else None
        if stream is None or slot is None:
            release_unsent(item.shm)
            why = stream.end_reason if stream is not None else self._down_reason()
            return policy_verdict(self._options, self._counters, item, "unavailable",
                                  unavailable_reason(why))
        if not stream.wait(slot, timeout):
            unanswered = stream.pending.abandon(item.sequence)
            if unanswered is not None:
                if unanswered >= self._options.reset_after_late:
                    stream.reset(f"{unanswered} batches past their deadline are still "
                                 "unanswered: the guard is falling behind")
                return policy_verdict(
                    self._options, self._counters, item, "timeout",
                    f"no reply from the guard within {timeout * 1e3:g} ms "
                    f"(sequence {item.sequence})")
            slot.done.wait()  # resolved just as the deadline passed: it is being delivered
        if slot.failure is not None:
            cause, reason = slot.failure
            return policy_verdict(self._options, self._counters, item, cause, reason)
        assert slot.reply is not None
        return reply_to_verdict(self._options, self._counters, item, slot.reply)

    def describe(self, timeout: float = 5.0) -> pb.DescribeResponse:
        """What the guard serves (hooks with their d_in, SAEs, plugins, limits). Raises
        grpc.RpcError when the guard is down."""
        return self._stub.Describe(pb.DescribeRequest(), timeout=timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: MONITOR batches still queued get ``timeout`` seconds to go out (the rest are
        counted as dropped); INLINE calls in flight get their replies or the policy."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stream, keeper = self._stream, self._keeper
        if self._monitor_outbox is not None:
            self._monitor_outbox.close()
        if stream is not None:
            stream.close_sending()  # what is queued goes out, then the guard ends the stream
        self._wake.set()
        if keeper is not None:
            keeper.join(timeout)
            current = self._stream
            if keeper.is_alive() and current is not None:
                current.reset("the client was closed")
                keeper.join(timeout)
        if self._monitor_outbox is not None:
            left = self._monitor_outbox.drain()
            if left:
                self._counters.add("dropped", left)
        self._channel.close()
        if self._shm is not None:
            self._shm.close()  # unmapped and unlinked
        counts = self._counters.snapshot()
        log.info("guard client closed", target=self._options.target, sent=counts.sent,
                 fail_open=counts.fail_open, fail_closed=counts.fail_closed,
                 timeouts=counts.timeouts, errors=counts.errors, dropped=counts.dropped,
                 reconnects=counts.reconnects)

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, outbox: Outbox, item: BatchItem) -> Verdict:
        if outbox.offer(item):
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
                            request_id=item.request_id, hook=item.hook)
        return monitor_verdict(item)

    def _live_stream(self) -> HostStream | None:
        """The open stream (opened on the first call), or None while the guard is down."""
        with self._lock:
            if self._closed:
                raise ClientClosedError("GuardClient.inspect: the client is closed")
            if self._keeper is None:
                self._stream = self._open_stream()
                self._keeper = threading.Thread(target=self._keep, name="guard-host-stream",
                                                daemon=True)
                self._keeper.start()
            stream = self._stream
        if stream is None or stream.finished.is_set():
            return None
        return stream

    def _down_reason(self) -> str:
        stream = self._stream
        return stream.end_reason if stream is not None else "no stream"

    def _check_shm(self) -> None:
        """Ask the guard (Describe) whether it takes the region, before a stream registers
        it; when the guard is down, the next stream asks again."""
        region = self._shm
        if region is not None and region.needs_check:
            with contextlib.suppress(grpc.RpcError):
                region.check_guard(self._stub.Describe(pb.DescribeRequest(), timeout=5.0))

    def _open_stream(self) -> HostStream:
        """A new stream: on the guard's doorbell socket when the region is in use and the
        guard serves one, otherwise a gRPC call."""
        self._check_shm()
        outbox = self._monitor_outbox or Outbox(None)
        region = self._shm
        if region is not None and region.enabled and region.doorbell:
            stream = DoorbellStream(region.doorbell, self._options, self._counters, outbox,
                                    region, self._on_reply)
            if stream.connect_error:  # ask Describe again: the guard may have changed
                region.confirmed = False
            return stream
        return _GrpcStream(self._stub, self._options, self._counters, outbox,
                           call_metadata(self._options), region)

    def _is_closed(self) -> bool:
        with self._lock:
            return self._closed

    def _keep(self) -> None:
        """The client thread: read the stream; when it breaks, back off and reopen it."""
        options = self._options
        backoff = Backoff(options.reconnect_backoff_ms / 1e3,
                          options.reconnect_backoff_max_ms / 1e3, options.reconnect_jitter)
        stream = self._stream
        while stream is not None:
            reason = stream.read(self._on_reply)
            if stream.replies:
                backoff.reset()
            delay = backoff.next()
            if self._is_closed():
                return
            log.warning("guard stream down", target=options.target, reason=reason,
                        replies=stream.replies, retry_in_ms=round(delay * 1e3))
            if self._wake.wait(delay):  # set by close()
                return
            with self._lock:
                if self._closed:
                    return
                stream = self._stream = self._open_stream()
            reconnects = self._counters.add("reconnects")
            log.info("guard stream reopened", target=options.target, reconnects=reconnects)

    def _on_reply(self, stream: HostStream, reply: pb.InspectResponse) -> None:
        stream.shm.on_reply(reply)  # a delta in shared memory is copied out, the slot freed
        if self._options.mode == "monitor":
            self._on_monitor_reply(reply)
            return
        resolution = stream.pending.resolve(reply.sequence)
        for skipped in resolution.skipped:
            skipped.fail("protocol", f"the guard answered sequence {reply.sequence} before "
                                     "this batch's and never answered this one")
        if resolution.slot is not None:
            resolution.slot.deliver(reply)
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
        try:
            callback(monitor_reply_verdict(reply))
        except Exception:  # the user's callback must not stop the reader
            log.exception("on_reply callback failed", request_id=reply.request_id,
                          sequence=reply.sequence)


def monitor_reply_verdict(reply: pb.InspectResponse) -> Verdict:
    """What ``on_reply`` gets: the guard's decision, or a CONTINUE naming its error."""
    if reply.HasField("error"):
        return Verdict(action=Action.CONTINUE, source="monitor", request_id=reply.request_id,
                       sequence=reply.sequence, positions=tuple(reply.positions),
                       reason=f"the guard rejected the batch: {error_text(reply.error)}")
    try:
        return decision_verdict(reply)
    except (GuardError, ValueError) as exc:
        return Verdict(action=Action.CONTINUE, source="monitor", request_id=reply.request_id,
                       sequence=reply.sequence, reason=f"invalid reply from the guard: {exc}")
