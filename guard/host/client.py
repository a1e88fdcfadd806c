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

This module is the threads' I/O shell: options, counters, failure-policy verdicts, reply
handling and queue accounting live in the sans-I/O core shared with the asyncio client
(:mod:`guard.host._core`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

import grpc
import numpy as np
from numpy.typing import NDArray

from guard.decision import Phase
from guard.host._batch import (
    BatchItem,
    EndItem,
    EndReason,
    PhaseName,
    Positions,
    Roles,
    Segment,
    stream_config,
)
from guard.host._core import (
    BaseClient,
    ClientClosedError,
    ReplyHandler,
    State,
    StreamState,
    call_metadata,
    deadline_seconds,
    status_text,
)
from guard.host._options import ClientOptions, CounterBox
from guard.host._outbox import HostStream, Outbox, ReplySlot
from guard.host._verdict import Answer, StepVerdict, Verdict
from guard.host.doorbell import DoorbellStream
from guard.host.shm import HostRegion
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc

__all__ = ["ClientClosedError", "GuardClient", "State"]


class _GrpcStream(StreamState[Outbox]):
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
            if isinstance(item, BatchItem):  # a RequestEnded takes no number, gets no reply
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

    def send_ended(self, item: EndItem) -> bool:
        """Queue a RequestEnded for gRPC's sender, behind the batches already queued."""
        return self.outbox.offer(item)

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

    def read(self, on_reply: ReplyHandler) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
        try:
            for reply in self.call:
                self._received(reply, on_reply)
            reason = self._reset_reason or "the guard ended the stream"
        except grpc.RpcError as exc:
            reason = self._reset_reason or f"the stream to the guard ended: {status_text(exc)}"
        except Exception as exc:  # a client bug: end this stream; the next one starts clean
            reason = self._failed_reading("guard client failed reading a reply", exc)
        self._finish(reason)
        return reason

    def _stop_sending(self) -> None:
        self.outbox.wake()


class GuardClient(BaseClient[HostStream, threading.Thread]):
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

    def _set_up(self) -> None:
        # gRPC channels connect lazily: nothing happens on the network until the first batch.
        self._channel = self._options.open_channel()
        self._stub = pb_grpc.GuardStub(self._channel)
        self._wake = threading.Event()
        self._monitor_outbox = Outbox(self._options.queue_size) if self._monitor else None

    # -- public ---------------------------------------------------------------------------

    def inspect(self, request_id: str, hook: str, rows: NDArray[np.floating],
                positions: Positions, token_ids: Positions | None = None,
                phase: PhaseName | Phase = "prompt", attributes: Mapping[str, str] | None = None,
                *, deadline_ms: float | None = None, roles: Roles | None = None,
                prompt_complete: bool | None = None) -> Verdict:
        """Send one batch ``rows [n, d_in]`` of one hook of one request; returns its verdict.

        INLINE: waits for the guard's verdict up to the deadline (``deadline_ms`` overrides
        the client's for this call); on a fault the failure policy decides. MONITOR: returns
        CONTINUE with source ``monitor`` at once. ``roles`` (optional): what each row's token
        is, one :class:`guard.RowRole` (or its name, e.g. ``"user"``) per row, as
        :func:`guard.host.chat.render` gives them; detectors read the roles they chose.
        ``prompt_complete`` (prompt rows only): True when the rows end the request's prompt
        (a whole prompt in one batch, or its last chunk), False for an earlier chunk; None
        (default) does not say, and detectors that average the prompt then decide on every
        batch with the rows so far. Raises ValueError or TypeError for bad arguments,
        :class:`guard.errors.TooLarge` for a batch above ``max_message_bytes``,
        :class:`ClientClosedError` after :meth:`close`.
        """
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            self._check_shm()  # before the first batch is placed in the region
        item = self._prepare(request_id, hook, rows, positions, token_ids, phase, attributes,
                             roles, prompt_complete)
        return self._single(self._run(item, timeout))

    def inspect_step(self, hook: str, rows: NDArray[np.floating], segments: Sequence[Segment],
                     positions: Positions, token_ids: Positions | None = None,
                     attributes: Mapping[str, str] | None = None,
                     *, deadline_ms: float | None = None,
                     roles: Roles | None = None) -> StepVerdict:
        """Send one engine step of one hook: ``rows [n, d_in]`` of several requests, the
        ``segments`` (a :class:`guard.host.Segment` per request, in row order, their ``rows``
        summing to ``n``); ``positions`` (and ``token_ids``) one per row. Returns a
        :class:`guard.host.StepVerdict`: a verdict per request in segment order, the most
        severe ``action``, and ``steering`` over every row of the step (zero on the rows of
        requests that are not steered). INLINE, MONITOR and the failure policy as for
        :meth:`inspect`: when the guard is down, late or rejects the step, every request gets
        the policy's verdict. ``roles`` as for :meth:`inspect`: one per row of the step (each
        request's rows take their slice). Raises ValueError or TypeError for bad arguments
        (segments that do not cover the rows, empty or repeated request ids, unknown phases
        or roles).
        """
        timeout = deadline_seconds(self._options, deadline_ms)
        if self._keeper is None:
            self._check_shm()
        item = self._prepare_step(hook, rows, segments, positions, token_ids, attributes,
                                  roles)
        return self._step(self._run(item, timeout))

    def end_requests(self, request_ids: Sequence[str],
                     reason: EndReason = "finished") -> bool:
        """Tell the guard that these requests are over (``finished``, ``aborted`` by the host,
        or ``preempted``: their rows will be sent again), so it frees their state. Never
        waits for a reply (none comes). Returns False when no stream is up to take it (the
        guard forgets a stream's requests when it ends anyway)."""
        return self._end(request_ids, reason)

    def _run(self, item: BatchItem, timeout: float) -> Answer:
        stream = self._live_stream()  # opened on the first batch; None while the guard is down
        with self._traced(item, stream) as span:
            return span.ended(self._decide(stream, item, timeout))

    def _decide(self, stream: HostStream | None, item: BatchItem, timeout: float) -> Answer:
        """The verdict on one prepared batch: the guard's, or the failure policy's."""
        if self._monitor:
            return self._enqueue(item)
        slot = stream.submit(item, timeout) if stream is not None else None
        if stream is None or slot is None:
            return self._unavailable(item, stream)
        if not stream.wait(slot, timeout):
            late = self._late(stream, item, timeout)
            if late is not None:
                return late
            slot.done.wait()  # resolved just as the deadline passed: it is being delivered
        assert slot.outcome is not None
        return self._answer(item, slot.outcome)

    def describe(self, timeout: float = 5.0) -> pb.DescribeResponse:
        """What the guard serves (hooks with their d_in, SAEs, plugins, limits). Raises
        grpc.RpcError when the guard is down."""
        return self._stub.Describe(pb.DescribeRequest(), timeout=timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: MONITOR batches still queued get ``timeout`` seconds to go out (the rest are
        counted as dropped); INLINE calls in flight get their replies or the policy."""
        if not self._begin_close():
            return
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
        left = self._monitor_outbox.drain() if self._monitor_outbox is not None else 0
        self._channel.close()
        self._closed_summary(left)

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _offer(self, item: BatchItem) -> bool:
        assert self._monitor_outbox is not None
        return self._monitor_outbox.offer(item)  # counts the gap itself

    def _check_shm(self) -> None:
        """Ask the guard (Describe) whether it takes the region, before a stream registers
        it; when the guard is down, the next stream asks again."""
        region = self._region_to_check()
        if region is not None:
            with contextlib.suppress(grpc.RpcError):
                region.check_guard(self.describe())

    def _open_stream(self) -> HostStream:
        self._check_shm()
        outbox = self._monitor_outbox or Outbox(None)
        path = self._doorbell_path()
        if path is not None:
            return DoorbellStream(path, self._options, self._counters, outbox, self._shm,
                                  self._on_reply)
        return _GrpcStream(self._stub, self._options, self._counters, outbox,
                           call_metadata(self._options), self._shm)

    def _start_keeper(self) -> threading.Thread:
        keeper = threading.Thread(target=self._keep, name="guard-host-stream", daemon=True)
        keeper.start()
        return keeper

    def _keep(self) -> None:
        """The client thread: read the stream; when it breaks, back off and reopen it."""
        stream = self._stream
        while stream is not None:
            delay = self._retry_delay(stream, stream.read(self._on_reply))
            if delay is None or self._wake.wait(delay):  # the wake-up is set by close()
                return
            with self._lock:
                if self._closed:
                    return
                stream = self._stream = self._open_stream()
            self._reopened()
