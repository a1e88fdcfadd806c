"""The asyncio host client: :class:`AsyncGuardClient`, the same protocol on ``grpc.aio``.

Same design as :mod:`guard.host.client`, with tasks for threads: a client task reads the
stream and reopens it with backoff, a writer task per stream takes batches from an outbox
(an ``asyncio.Queue``: bounded in MONITOR mode, where ``inspect`` only ``put_nowait``s and
never awaits the network). Create and use a client inside one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from types import TracebackType
from typing import Any, Final, Literal

import grpc
import numpy as np
import structlog
from grpc import aio
from numpy.typing import NDArray

from guard.decision import Phase
from guard.host import tracing
from guard.host._batch import BatchItem, PhaseName, Positions, prepare_batch, stream_config
from guard.host._options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TRANSPORT_HEADROOM,
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
    Cause,
    Verdict,
    error_text,
    monitor_verdict,
    policy_verdict,
    reply_to_verdict,
    stream_end_text,
    unavailable_reason,
)
from guard.host.client import (
    ClientClosedError,
    State,
    call_metadata,
    deadline_seconds,
    monitor_reply_verdict,
    status_text,
)
from guard.host.doorbell import CONNECT_TIMEOUT_S
from guard.host.shm import HostRegion, SharedMemory, StreamShm, release_unsent
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire.framing import HEADER_BYTES, FrameError, encode_frame, frame_length

log = structlog.get_logger("guard.host")

#: What an outbox holds: a batch, or None (send nothing more: half-close the stream).
_Outbox = asyncio.Queue[BatchItem | None]
#: The stream reader's buffer limit (frames are read with readexactly, not lines).
_READ_LIMIT: Final = 1 << 20


@dataclass(frozen=True)
class _Failure:
    """Why an INLINE batch will get no reply."""

    cause: Cause
    reason: str


_Outcome = pb.InspectResponse | _Failure


class _AioStream:
    """One Inspect call: a writer task sends the StreamConfig, then the outbox's batches."""

    def __init__(self, stub: pb_grpc.GuardAsyncStub | None, options: ClientOptions,
                 counters: CounterBox, outbox: _Outbox,
                 metadata: tuple[tuple[str, str | bytes], ...] | None,
                 shm: HostRegion | None = None) -> None:
        self.options = options
        self.shm = StreamShm(shm)
        self.counters = counters
        self.outbox = outbox
        self.finished = False
        self.pending: PendingReplies[asyncio.Future[_Outcome]] = PendingReplies()
        self.replies = 0
        self.end_reason = ""
        self._reset_reason = ""
        self._next_sequence = 1
        self.call = self._open_call(stub, metadata)

    def _open_call(self, stub: pb_grpc.GuardAsyncStub | None,
                   metadata: tuple[tuple[str, str | bytes], ...] | None) -> Any:
        assert stub is not None
        return stub.Inspect(None, metadata=metadata)  # no iterator: the write/read API

    def submit(self, item: BatchItem) -> asyncio.Future[_Outcome] | None:
        """INLINE: number the batch and queue it; None when the stream has ended."""
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        sequence = self._next_sequence
        if not self.pending.add(sequence, future):
            return None
        self._next_sequence += 1
        item.sequence = sequence
        self.shm.bind(sequence, item.shm)
        self.outbox.put_nowait(item)  # unbounded: each INLINE caller waits for its reply
        return future

    def _number(self, item: BatchItem) -> None:
        """MONITOR: a batch gets its sequence number as it is sent, after the drops before
        it (INLINE batches got theirs in :meth:`submit`)."""
        item.sequence = self._next_sequence + item.gap_before
        self._next_sequence = item.sequence + 1
        self.shm.bind(item.sequence, item.shm)

    def reset(self, reason: str) -> None:
        self._reset_reason = reason
        self.call.cancel()

    #: What a send raises once the call has ended (the reader reports why).
    _ENDED: tuple[type[BaseException], ...] = (aio.AioRpcError, aio.UsageError,
                                               asyncio.InvalidStateError)

    async def _send(self, request: pb.InspectRequest) -> None:
        await self.call.write(request)

    async def _done_sending(self) -> None:
        await self.call.done_writing()

    async def _write(self) -> None:
        """The writer task: the StreamConfig, then the outbox's batches; None half-closes."""
        monitor = self.options.mode == "monitor"
        try:
            await self._send(
                pb.InspectRequest(config=self.shm.configure(stream_config(self.options))))
            while True:
                item = await self.outbox.get()
                try:
                    if item is None:
                        await self._done_sending()
                        return
                    if monitor:
                        self._number(item)
                    self.counters.add("sent")
                    await self._send(item.to_request())
                finally:
                    self.outbox.task_done()
        except self._ENDED:
            return

    async def read(self, on_reply: Callable[[_AioStream, pb.InspectResponse], None]) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
        writer = asyncio.create_task(self._write(), name="guard-host-writer")
        try:
            while True:
                reply = await self.call.read()
                if not isinstance(reply, pb.InspectResponse):  # grpc.aio.EOF
                    reason = self._reset_reason or "the guard ended the stream"
                    break
                self.replies += 1
                self.counters.add("replies")
                on_reply(self, reply)
        except aio.AioRpcError as exc:
            reason = self._reset_reason or f"the stream to the guard ended: {status_text(exc)}"
        except Exception as exc:  # a client bug: end this stream; the next one starts clean
            log.exception("guard client failed reading a reply")
            self.reset(f"the client failed reading a reply: {type(exc).__name__}")
            reason = self._reset_reason
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the client task itself is stopping
                self._finish(writer, "the client was closed")
                raise
            reason = self._reset_reason or "the stream was cancelled"  # reset(): call cancelled
        self._finish(writer, reason)
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        return reason

    def _finish(self, writer: asyncio.Task[None] | None, reason: str) -> None:
        self.end_reason = reason
        self.finished = True
        if writer is not None:
            writer.cancel()
        for future in self.pending.close(reason):
            if not future.done():
                future.set_result(_Failure("unavailable", unavailable_reason(reason)))
        self.shm.close(reason, self.replies)


class _AioDoorbellStream(_AioStream):
    """One stream on the guard's doorbell socket (:mod:`guard.host.doorbell`): the same
    tasks as a gRPC call (a writer from the outbox, a reader), with frames on a Unix socket
    instead of gRPC messages."""

    def __init__(self, path: str, options: ClientOptions, counters: CounterBox,
                 outbox: _Outbox, shm: HostRegion | None) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None  # once connected (read() connects)
        super().__init__(None, options, counters, outbox, None, shm)

    def _open_call(self, stub: pb_grpc.GuardAsyncStub | None,
                   metadata: tuple[tuple[str, str | bytes], ...] | None) -> None:
        return None

    def reset(self, reason: str) -> None:
        self._reset_reason = reason
        if self._writer is not None:
            self._writer.transport.abort()  # the reader sees the connection end

    _ENDED = (OSError, RuntimeError)

    async def _send(self, request: pb.InspectRequest) -> None:
        assert self._writer is not None
        self._writer.write(encode_frame(request.SerializeToString()))
        await self._writer.drain()  # the socket's back-pressure, as gRPC's flow control

    async def _done_sending(self) -> None:
        assert self._writer is not None
        await self._writer.drain()
        self._writer.write_eof()  # the guard answers what it has, then closes

    async def read(self, on_reply: Callable[[_AioStream, pb.InspectResponse], None]) -> str:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=_READ_LIMIT), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            reason = (f"cannot open a stream on the guard's doorbell socket {self.path}: "
                      f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}")
            if self.shm.region is not None:
                self.shm.region.confirmed = False  # ask Describe again: the guard may change
            self._finish(None, reason)
            return reason
        self._writer = writer
        limit = self.options.max_message_bytes * TRANSPORT_HEADROOM
        return await self._read_frames(reader, writer, limit, on_reply)

    async def _read_frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           limit: int,
                           on_reply: Callable[[_AioStream, pb.InspectResponse], None]) -> str:
        writer_task = asyncio.create_task(self._write(), name="guard-host-doorbell-writer")
        try:
            while True:
                try:
                    header = await reader.readexactly(HEADER_BYTES)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    reason = self._reset_reason or "the guard ended the stream"
                    break
                length = frame_length(header, limit)
                frame = pb.DoorbellFrame.FromString(await reader.readexactly(length))
                kind = frame.WhichOneof("frame")
                if kind == "end":
                    reason = self._reset_reason or stream_end_text(frame.end)
                    break
                if kind != "reply":
                    raise FrameError("a DoorbellFrame with neither a reply nor an end")
                self.replies += 1
                self.counters.add("replies")
                on_reply(self, frame.reply)
        except (OSError, asyncio.IncompleteReadError, FrameError) as exc:
            reason = self._reset_reason or (f"the doorbell connection to the guard failed: "
                                            f"{exc or type(exc).__name__}")
        except Exception as exc:  # a client bug, or a frame protobuf cannot decode
            log.exception("guard client failed reading a doorbell reply")
            self.reset(f"the client failed reading a reply: {type(exc).__name__}")
            reason = self._reset_reason
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the client task itself is stopping
                self._finish(writer_task, "the client was closed")
                writer.transport.abort()
                raise
            reason = self._reset_reason or "the stream was cancelled"
        self._finish(writer_task, reason)
        writer.transport.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await writer_task
        return reason


class AsyncGuardClient:
    """The asyncio twin of :class:`guard.host.GuardClient`; same parameters and verdicts.

    ``await inspect(...)`` waits for the guard's verdict in INLINE mode; in MONITOR mode it
    queues the batch without awaiting anything and returns at once. ``shared_memory`` as on
    the sync client (the region file is created here, unlinked by :meth:`close`).
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
        # The channel belongs to an event loop: it is made on the first call, inside it.
        self._channel: aio.Channel | None = None
        self._stub: pb_grpc.GuardAsyncStub | None = None
        self._closed = False
        self._stream: _AioStream | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._monitor_outbox: _Outbox | None = (
            asyncio.Queue(queue_size) if self._options.mode == "monitor" else None)
        self._gap = 0
        self._dropping = False

    # -- public ---------------------------------------------------------------------------

    @property
    def options(self) -> ClientOptions:
        return self._options

    @property
    def counters(self) -> ClientCounters:
        return self._counters.snapshot()

    @property
    def state(self) -> State:
        if self._closed:
            return "closed"
        if self._keeper is None:
            return "idle"
        stream = self._stream
        return "open" if stream is not None and not stream.finished else "down"

    async def inspect(
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
        """See :meth:`guard.host.GuardClient.inspect`."""
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            await self._check_shm()  # before the first batch is placed in the region
        item = prepare_batch(self._options, request_id, hook, rows, positions, token_ids,
                             phase, attributes, place=self._place)
        span = tracing.start_inspect_span(request_id, hook, len(item.positions),
                                          self._options.mode)
        tracing.inject(span, item.attributes)  # the guard's batch span becomes its child
        started = time.perf_counter()
        try:
            verdict = await self._decide(item, timeout)
        except BaseException as exc:
            tracing.fail_inspect_span(span, exc)
            raise
        tracing.end_inspect_span(span, verdict, self._options.mode,
                                 time.perf_counter() - started)
        return verdict

    async def _decide(self, item: BatchItem, timeout: float) -> Verdict:
        """The verdict on one prepared batch: the guard's, or the failure policy's."""
        if self._monitor_outbox is not None:
            return self._enqueue(self._monitor_outbox, item)
        stream = self._live_stream()
        future = stream.submit(item) if stream is not None else None
        if stream is None or future is None:
            release_unsent(item.shm)
            why = stream.end_reason if stream is not None else self._down_reason()
            return policy_verdict(self._options, self._counters, item, "unavailable",
                                  unavailable_reason(why))
        try:
            done, _ = await asyncio.wait((future,), timeout=timeout)
        except asyncio.CancelledError:
            stream.pending.forget(item.sequence)
            raise
        if not done:
            unanswered = stream.pending.abandon(item.sequence)
            if unanswered is not None:
                if unanswered >= self._options.reset_after_late:
                    stream.reset(f"{unanswered} batches past their deadline are still "
                                 "unanswered: the guard is falling behind")
                return policy_verdict(
                    self._options, self._counters, item, "timeout",
                    f"no reply from the guard within {timeout * 1e3:g} ms "
                    f"(sequence {item.sequence})")
        outcome = future.result()
        if isinstance(outcome, _Failure):
            return policy_verdict(self._options, self._counters, item, outcome.cause,
                                  outcome.reason)
        return reply_to_verdict(self._options, self._counters, item, outcome)

    async def describe(self, timeout: float = 5.0) -> pb.DescribeResponse:
        """What the guard serves. Raises grpc.aio.AioRpcError when the guard is down."""
        return await self._ensure_stub().Describe(pb.DescribeRequest(), timeout=timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """Stop: MONITOR batches still queued get ``timeout`` seconds to go out (the rest are
        counted as dropped); INLINE calls in flight get their replies or the policy."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        stream, keeper = self._stream, self._keeper
        if self._monitor_outbox is not None and keeper is not None and not keeper.done():
            # Until the queue is sent, or the stream breaks (the client task then stops).
            flushed = asyncio.create_task(self._monitor_outbox.join())
            await asyncio.wait((flushed, keeper), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()
        outbox = self._monitor_outbox or (stream.outbox if stream is not None else None)
        if outbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                outbox.put_nowait(None)  # the writer half-closes the stream
        if keeper is not None:
            try:
                await asyncio.wait_for(asyncio.shield(keeper), timeout)
            except TimeoutError:
                if self._stream is not None:
                    self._stream.reset("the client was closed")
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
        if self._monitor_outbox is not None:
            left = sum(1 for _ in range(self._monitor_outbox.qsize())
                       if self._monitor_outbox.get_nowait() is not None)
            if left:
                self._counters.add("dropped", left)
        if self._channel is not None:
            await self._channel.close(None)
        if self._shm is not None:
            self._shm.close()  # unmapped and unlinked
        counts = self._counters.snapshot()
        log.info("guard client closed", target=self._options.target, sent=counts.sent,
                 fail_open=counts.fail_open, fail_closed=counts.fail_closed,
                 timeouts=counts.timeouts, errors=counts.errors, dropped=counts.dropped,
                 reconnects=counts.reconnects)

    async def __aenter__(self) -> AsyncGuardClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, outbox: _Outbox, item: BatchItem) -> Verdict:
        self._live_stream()  # opens the stream on the first batch
        item.gap_before = self._gap
        try:
            outbox.put_nowait(item)
        except asyncio.QueueFull:
            release_unsent(item.shm)
            self._gap += 1
            dropped = self._counters.add("dropped")
            tracing.instruments().monitor_dropped.add(1)
            if not self._dropping:  # one line per episode, not one per batch
                self._dropping = True
                log.warning("monitor queue full: dropping the newest batches",
                            queue_size=self._options.queue_size, dropped=dropped,
                            request_id=item.request_id, hook=item.hook)
        else:
            self._gap = 0
            if self._dropping:
                self._dropping = False
                log.info("monitor queue accepting batches again",
                         dropped=self._counters.snapshot().dropped)
        return monitor_verdict(item)

    def _ensure_stub(self) -> pb_grpc.GuardAsyncStub:
        if self._stub is None:
            self._channel = self._options.open_aio_channel()
            self._stub = pb_grpc.GuardStub(self._channel)
        return self._stub

    def _live_stream(self) -> _AioStream | None:
        """The open stream (opened on the first call), or None while the guard is down."""
        if self._closed:
            raise ClientClosedError("AsyncGuardClient.inspect: the client is closed")
        if self._keeper is None:
            self._stream = self._open_stream()
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name="guard-host-stream")
        stream = self._stream
        return stream if stream is not None and not stream.finished else None

    def _down_reason(self) -> str:
        return self._stream.end_reason if self._stream is not None else "no stream"

    def _open_stream(self) -> _AioStream:
        """A new stream: on the guard's doorbell socket when the region is in use and the
        guard serves one, otherwise a gRPC call."""
        outbox: _Outbox = self._monitor_outbox or asyncio.Queue()
        region = self._shm
        if region is not None and region.enabled and region.doorbell:
            return _AioDoorbellStream(region.doorbell, self._options, self._counters, outbox,
                                      region)
        return _AioStream(self._ensure_stub(), self._options, self._counters, outbox,
                          call_metadata(self._options), region)

    async def _check_shm(self) -> None:
        """Ask the guard (Describe) whether it takes the region (and where its doorbell is),
        before a stream registers it; when the guard is down, the next stream asks again."""
        region = self._shm
        if region is not None and region.needs_check:
            with contextlib.suppress(aio.AioRpcError):
                region.check_guard(await self._ensure_stub().Describe(pb.DescribeRequest(),
                                                                      timeout=5.0))

    @property
    def transport(self) -> Literal["grpc", "doorbell", ""]:
        """What carries the current stream (see :attr:`guard.host.GuardClient.transport`)."""
        stream = self._stream
        if stream is None:
            return ""
        return "doorbell" if isinstance(stream, _AioDoorbellStream) else "grpc"

    def _is_closed(self) -> bool:
        return self._closed

    async def _keep(self) -> None:
        """The client task: read the stream; when it breaks, back off and reopen it."""
        options = self._options
        backoff = Backoff(options.reconnect_backoff_ms / 1e3,
                          options.reconnect_backoff_max_ms / 1e3, options.reconnect_jitter)
        stream = self._stream
        while stream is not None:
            reason = await stream.read(self._on_reply)
            if stream.replies:
                backoff.reset()
            delay = backoff.next()
            if self._is_closed():
                return
            log.warning("guard stream down", target=options.target, reason=reason,
                        replies=stream.replies, retry_in_ms=round(delay * 1e3))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._is_closed():
                return
            await self._check_shm()
            if self._is_closed():
                return
            stream = self._stream = self._open_stream()
            reconnects = self._counters.add("reconnects")
            log.info("guard stream reopened", target=options.target, reconnects=reconnects)

    def _on_reply(self, stream: _AioStream, reply: pb.InspectResponse) -> None:
        stream.shm.on_reply(reply)  # a delta in shared memory is copied out, the slot freed
        if self._options.mode == "monitor":
            self._on_monitor_reply(reply)
            return
        resolution = stream.pending.resolve(reply.sequence)
        for skipped in resolution.skipped:
            if not skipped.done():
                skipped.set_result(_Failure(
                    "protocol", f"the guard answered sequence {reply.sequence} before this "
                                "batch's and never answered this one"))
        if resolution.slot is not None:
            if not resolution.slot.done():
                resolution.slot.set_result(reply)
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
