"""The sync client's stream plumbing shared by its two transports (a gRPC call and the
doorbell socket): where an INLINE batch's reply is left, the outbox of batches waiting to be
sent, and what the client needs of a stream (:class:`HostStream`)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from guard.host._batch import BatchItem
from guard.host._options import ClientOptions, CounterBox
from guard.host._pending import PendingReplies
from guard.host._verdict import Cause
from guard.host.shm import HostRegion, StreamShm
from guard.v1 import guard_pb2 as pb


class ReplySlot:
    """Where the client thread leaves an INLINE batch's reply (or why none will come)."""

    __slots__ = ("done", "failure", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: pb.InspectResponse | None = None
        self.failure: tuple[Cause, str] | None = None

    def deliver(self, reply: pb.InspectResponse) -> None:
        self.reply = reply
        self.done.set()

    def fail(self, cause: Cause, reason: str) -> None:
        self.failure = (cause, reason)
        self.done.set()


class Outbox:
    """Batches waiting for gRPC's sender thread; bounded (MONITOR) or not (INLINE, where each
    caller waits for its reply). ``offer`` never blocks."""

    def __init__(self, capacity: int | None) -> None:
        self._items: deque[BatchItem] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self._gap = 0

    def offer(self, item: BatchItem) -> bool:
        """Queue a batch; False (and the batch dropped) when full or closed."""
        with self._cond:
            if self._closed or (self._capacity is not None
                                and len(self._items) >= self._capacity):
                self._gap += 1
                return False
            item.gap_before, self._gap = self._gap, 0
            self._items.append(item)
            self._cond.notify()
            return True

    def take(self, stop: threading.Event) -> BatchItem | None:
        """The next batch; None once ``stop`` is set, or once closed and empty."""
        with self._cond:
            while not self._items and not self._closed and not stop.is_set():
                self._cond.wait()
            if stop.is_set() or not self._items:
                return None
            return self._items.popleft()

    def wake(self) -> None:
        """Let every waiting ``take`` look at its ``stop`` again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Accept no more; ``take`` hands out what is queued, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> int:
        """Discard what is queued; returns how many batches that was."""
        with self._cond:
            count = len(self._items)
            self._items.clear()
            return count


class StreamState:
    """What both transports keep of one stream: the region's view, the counters, the
    outbox, the INLINE batches waiting for replies, and the sequence numbers."""

    def __init__(self, options: ClientOptions, counters: CounterBox, outbox: Outbox,
                 region: HostRegion | None) -> None:
        self.options = options
        self.shm = StreamShm(region)
        self.counters = counters
        self.outbox = outbox
        self.finished = threading.Event()
        self.pending: PendingReplies[ReplySlot] = PendingReplies()
        self.replies = 0
        self.end_reason = ""
        self._reset_reason = ""
        self._next_sequence = 1

    def _assign(self, item: BatchItem, slot: ReplySlot) -> bool:
        """INLINE (under the caller's send lock): the batch takes the next sequence number
        and waits for its reply in ``slot``; False once the stream has ended."""
        sequence = self._next_sequence
        if not self.pending.add(sequence, slot):
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


class HostStream(Protocol):
    """One stream of a :class:`guard.host.GuardClient`, whichever transport carries it."""

    shm: StreamShm
    finished: threading.Event
    pending: PendingReplies[ReplySlot]
    replies: int
    end_reason: str

    def submit(self, item: BatchItem, timeout: float) -> ReplySlot | None:
        """INLINE: number the batch and send (or queue) it; None when the stream has ended.
        ``timeout``: how long sending may take (the caller's deadline)."""

    def wait(self, slot: ReplySlot, timeout: float) -> bool:
        """INLINE: wait up to ``timeout`` seconds for ``slot``'s reply; True once resolved."""

    def reset(self, reason: str) -> None:
        """End the stream from this side (the guard fell behind, or the client closes)."""

    def close_sending(self) -> None:
        """Send what is queued, then no more: the guard answers the rest and ends the stream."""

    def read(self, on_reply: Callable[[HostStream, pb.InspectResponse], None]) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
