"""The asyncio host client: :class:`AsyncGuardClient`, the same protocol on ``grpc.aio``.

Same design as :mod:`guard.host.client`, with tasks for threads: a client task reads the
stream and reopens it with backoff, a writer task per stream takes batches from an outbox
(an ``asyncio.Queue``: bounded in MONITOR mode, where ``inspect`` only ``put_nowait``s and
never awaits the network). Create and use a client inside one event loop. Like the sync
client, an I/O shell over the sans-I/O core (:mod:`guard.host._core`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Final

import numpy as np
from grpc import aio
from numpy.typing import NDArray

from guard.decision import Phase
from guard.host._batch import (
    BatchItem,
    EndItem,
    EndReason,
    Outgoing,
    PhaseName,
    Positions,
    Roles,
    Segment,
    stream_config,
)
from guard.host._core import (
    BaseClient,
    Outcome,
    ReplyHandler,
    StreamState,
    call_metadata,
    deadline_seconds,
    status_text,
)
from guard.host._options import TRANSPORT_HEADROOM, ClientOptions, CounterBox
from guard.host._verdict import Answer, StepVerdict, Verdict, stream_end_text
from guard.host.doorbell import CONNECT_TIMEOUT_S
from guard.host.shm import HostRegion
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire.framing import HEADER_BYTES, FrameError, encode_frame, frame_length

#: What an outbox holds: a batch, a RequestEnded, or None (send nothing more: half-close).
_Outbox = asyncio.Queue[Outgoing | None]
#: The stream reader's buffer limit (frames are read with readexactly, not lines).
_READ_LIMIT: Final = 1 << 20


class _ReplyFuture:
    """Where the reader task leaves an INLINE batch's outcome for the task awaiting it."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def resolve(self, outcome: Outcome) -> None:
        if not self.future.done():  # the first outcome stands
            self.future.set_result(outcome)


class _AioStream(StreamState[_Outbox]):
    """One Inspect call: a writer task sends the StreamConfig, then the outbox's batches;
    :meth:`read` hands on the replies until the stream ends."""

    #: What a send raises once the call has ended (the reader reports why).
    _ENDED: ClassVar[tuple[type[BaseException], ...]] = (
        aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError)
    #: What a read raises when the stream breaks (not a client bug).
    _BROKEN: ClassVar[tuple[type[Exception], ...]] = (aio.AioRpcError,)
    _WRITER_NAME: ClassVar[str] = "guard-host-writer"
    _READ_FAILED: ClassVar[str] = "guard client failed reading a reply"

    def __init__(self, call: Any, options: ClientOptions, counters: CounterBox,
                 outbox: _Outbox, region: HostRegion | None) -> None:
        super().__init__(options, counters, outbox, region)
        self.call = call  # grpc.aio's stream-stream call, used with write() and read()
        self._writer_task: asyncio.Task[None] | None = None

    def submit(self, item: BatchItem) -> _ReplyFuture | None:
        """INLINE: number the batch and queue it; None when the stream has ended."""
        waiter = _ReplyFuture()
        if not self._assign(item, waiter):
            return None
        self.outbox.put_nowait(item)  # unbounded: each INLINE caller waits for its reply
        return waiter

    def send_ended(self, item: EndItem) -> bool:
        """Queue a RequestEnded for the writer (no sequence number, no reply); False when
        MONITOR's queue is full."""
        try:
            self.outbox.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    def reset(self, reason: str) -> None:
        self._reset_reason = reason
        self.call.cancel()

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
                    if isinstance(item, BatchItem):  # a RequestEnded: no number, no reply
                        if monitor:
                            self._number(item)
                        self.counters.add("sent")
                    await self._send(item.to_request())
                finally:
                    self.outbox.task_done()
        except self._ENDED:
            return

    async def read(self, on_reply: ReplyHandler) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
        if not await self._connect():
            return self.end_reason
        self._writer_task = asyncio.create_task(self._write(), name=self._WRITER_NAME)
        try:
            reason = await self._read_replies(on_reply)
        except self._BROKEN as exc:
            reason = self._reset_reason or self._broken(exc)
        except Exception as exc:  # a client bug: end this stream; the next one starts clean
            reason = self._failed_reading(self._READ_FAILED, exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the client task itself is stopping
                self._finish("the client was closed")
                self._disconnect()
                raise
            reason = self._reset_reason or "the stream was cancelled"  # reset(): call cancelled
        self._finish(reason)
        self._disconnect()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer_task
        return reason

    async def _connect(self) -> bool:
        """Ready to send and read; False (the stream ended, with the reason) when not."""
        return True  # the gRPC call is open from the start

    async def _read_replies(self, on_reply: ReplyHandler) -> str:
        """Hand on replies until the guard ends the stream; returns why it ended."""
        while True:
            reply = await self.call.read()
            if not isinstance(reply, pb.InspectResponse):  # grpc.aio.EOF
                return self._reset_reason or "the guard ended the stream"
            self._received(reply, on_reply)

    def _broken(self, exc: Exception) -> str:
        """Why the stream ended, from what reading it raised."""
        assert isinstance(exc, aio.AioRpcError)
        return f"the stream to the guard ended: {status_text(exc)}"

    def _disconnect(self) -> None:
        """After the stream ended: drop the connection under it (gRPC's call is done)."""

    def _stop_sending(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()


class _AioDoorbellStream(_AioStream):
    """One stream on the guard's doorbell socket (:mod:`guard.host.doorbell`): the same
    tasks as a gRPC call (a writer from the outbox, a reader), with frames on a Unix socket
    instead of gRPC messages."""

    transport = "doorbell"
    _ENDED = (OSError, RuntimeError)
    _BROKEN = (OSError, asyncio.IncompleteReadError, FrameError)
    _WRITER_NAME = "guard-host-doorbell-writer"
    _READ_FAILED = "guard client failed reading a doorbell reply"

    def __init__(self, path: str, options: ClientOptions, counters: CounterBox,
                 outbox: _Outbox, region: HostRegion | None) -> None:
        super().__init__(None, options, counters, outbox, region)
        self.path = path
        # Once connected (read() connects).
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def reset(self, reason: str) -> None:
        self._reset_reason = reason
        if self._writer is not None:
            self._writer.transport.abort()  # the reader sees the connection end

    async def _send(self, request: pb.InspectRequest) -> None:
        assert self._writer is not None
        self._writer.write(encode_frame(request.SerializeToString()))
        await self._writer.drain()  # the socket's back-pressure, as gRPC's flow control

    async def _done_sending(self) -> None:
        assert self._writer is not None
        await self._writer.drain()
        self._writer.write_eof()  # the guard answers what it has, then closes

    async def _connect(self) -> bool:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=_READ_LIMIT), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            if self.shm.region is not None:
                self.shm.region.confirmed = False  # ask Describe again: the guard may change
            self._finish(f"cannot open a stream on the guard's doorbell socket {self.path}: "
                         f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}")
            return False
        return True

    async def _read_replies(self, on_reply: ReplyHandler) -> str:
        reader = self._reader
        assert reader is not None
        limit = self.options.max_message_bytes * TRANSPORT_HEADROOM
        while True:
            try:
                header = await reader.readexactly(HEADER_BYTES)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return self._reset_reason or "the guard ended the stream"
            frame = pb.DoorbellFrame.FromString(
                await reader.readexactly(frame_length(header, limit)))
            kind = frame.WhichOneof("frame")
            if kind == "end":
                return self._reset_reason or stream_end_text(frame.end)
            if kind != "reply":
                raise FrameError("a DoorbellFrame with neither a reply nor an end")
            self._received(frame.reply, on_reply)

    def _broken(self, exc: Exception) -> str:
        return f"the doorbell connection to the guard failed: {exc or type(exc).__name__}"

    def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()


class AsyncGuardClient(BaseClient[_AioStream, asyncio.Task[None]]):
    """The asyncio twin of :class:`guard.host.GuardClient`; same parameters and verdicts.

    ``await inspect(...)`` waits for the guard's verdict in INLINE mode; in MONITOR mode it
    queues the batch without awaiting anything and returns at once. ``shared_memory`` as on
    the sync client (the region file is created here, unlinked by :meth:`close`).
    """

    def _set_up(self) -> None:
        # The channel belongs to an event loop: it is made on the first call, inside it.
        self._channel: aio.Channel | None = None
        self._stub: pb_grpc.GuardAsyncStub | None = None
        self._wake = asyncio.Event()
        self._monitor_outbox: _Outbox | None = (
            asyncio.Queue(self._options.queue_size) if self._monitor else None)
        self._gap = 0  # MONITOR batches dropped since the last one queued

    # -- public ---------------------------------------------------------------------------

    async def inspect(self, request_id: str, hook: str, rows: NDArray[np.floating],
                      positions: Positions, token_ids: Positions | None = None,
                      phase: PhaseName | Phase = "prompt",
                      attributes: Mapping[str, str] | None = None,
                      *, deadline_ms: float | None = None,
                      roles: Roles | None = None,
                      prompt_complete: bool | None = None) -> Verdict:
        """See :meth:`guard.host.GuardClient.inspect`."""
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            await self._check_shm()  # before the first batch is placed in the region
        item = self._prepare(request_id, hook, rows, positions, token_ids, phase, attributes,
                             roles, prompt_complete)
        return self._single(await self._run(item, timeout))

    async def inspect_step(self, hook: str, rows: NDArray[np.floating],
                           segments: Sequence[Segment], positions: Positions,
                           token_ids: Positions | None = None,
                           attributes: Mapping[str, str] | None = None,
                           *, deadline_ms: float | None = None,
                           roles: Roles | None = None) -> StepVerdict:
        """See :meth:`guard.host.GuardClient.inspect_step`."""
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            await self._check_shm()
        item = self._prepare_step(hook, rows, segments, positions, token_ids, attributes,
                                  roles)
        return self._step(await self._run(item, timeout))

    async def end_requests(self, request_ids: Sequence[str],
                           reason: EndReason = "finished") -> bool:
        """See :meth:`guard.host.GuardClient.end_requests` (queues it; never awaits a reply)."""
        return self._end(request_ids, reason)

    async def _run(self, item: BatchItem, timeout: float) -> Answer:
        with self._traced(item, None) as span:
            return span.ended(await self._decide(item, timeout))

    async def _decide(self, item: BatchItem, timeout: float) -> Answer:
        """The verdict on one prepared batch: the guard's, or the failure policy's."""
        stream = self._live_stream()  # opened on the first batch; None while the guard is down
        if self._monitor:
            return self._enqueue(item)
        waiter = stream.submit(item) if stream is not None else None
        if stream is None or waiter is None:
            return self._unavailable(item, stream)
        try:
            done, _ = await asyncio.wait((waiter.future,), timeout=timeout)
        except asyncio.CancelledError:
            stream.pending.forget(item.sequence)
            raise
        if not done:
            late = self._late(stream, item, timeout)
            if late is not None:
                return late
        return self._answer(item, waiter.future.result())

    async def describe(self, timeout: float = 5.0) -> pb.DescribeResponse:
        """What the guard serves. Raises grpc.aio.AioRpcError when the guard is down."""
        return await self._ensure_stub().Describe(pb.DescribeRequest(), timeout=timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """Stop: MONITOR batches still queued get ``timeout`` seconds to go out (the rest are
        counted as dropped); INLINE calls in flight get their replies or the policy."""
        if not self._begin_close():
            return
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
        left = 0
        if self._monitor_outbox is not None:
            left = sum(1 for _ in range(self._monitor_outbox.qsize())
                       if isinstance(self._monitor_outbox.get_nowait(), BatchItem))
        if self._channel is not None:
            await self._channel.close(None)
        self._closed_summary(left)

    async def __aenter__(self) -> AsyncGuardClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------

    def _offer(self, item: BatchItem) -> bool:
        assert self._monitor_outbox is not None
        item.gap_before = self._gap
        try:
            self._monitor_outbox.put_nowait(item)
        except asyncio.QueueFull:
            self._gap += 1
            return False
        self._gap = 0
        return True

    def _ensure_stub(self) -> pb_grpc.GuardAsyncStub:
        if self._stub is None:
            self._channel = self._options.open_aio_channel()
            self._stub = pb_grpc.GuardStub(self._channel)
        return self._stub

    def _open_stream(self) -> _AioStream:
        outbox: _Outbox = self._monitor_outbox or asyncio.Queue()
        path = self._doorbell_path()
        if path is not None:
            return _AioDoorbellStream(path, self._options, self._counters, outbox, self._shm)
        call = self._ensure_stub().Inspect(None, metadata=call_metadata(self._options))
        return _AioStream(call, self._options, self._counters, outbox, self._shm)

    async def _check_shm(self) -> None:
        """Ask the guard (Describe) whether it takes the region (and where its doorbell is),
        before a stream registers it; when the guard is down, the next stream asks again."""
        region = self._region_to_check()
        if region is not None:
            with contextlib.suppress(aio.AioRpcError):
                region.check_guard(await self.describe())

    def _start_keeper(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._keep(), name="guard-host-stream")

    async def _keep(self) -> None:
        """The client task: read the stream; when it breaks, back off and reopen it."""
        stream = self._stream
        while stream is not None:
            delay = self._retry_delay(stream, await stream.read(self._on_reply))
            if delay is None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)  # set by close()
            if self._is_closed():
                return
            await self._check_shm()
            if self._is_closed():
                return
            stream = self._stream = self._open_stream()
            self._reopened()
