"""The sync client's stream plumbing shared by its two transports (a gRPC call and the
doorbell socket): where an INLINE batch's reply is left for its waiting thread, the outbox of
batches waiting to be sent, and what the sync client needs of a stream (:class:`HostStream`).
What every stream keeps, sync or asyncio, is :class:`guard.host._core.StreamState`."""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

from guard.host._batch import BatchItem, EndItem, Outgoing
from guard.host._core import GuardStream, Outcome, ReplyHandler


class ReplySlot:
    """Where the reading thread leaves an INLINE batch's outcome (the reply, or why none
    will come) for the thread waiting on ``done``."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Outcome | None = None

    def resolve(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()


class Outbox:
    """Batches (and RequestEnded messages) waiting for a sender thread; bounded (MONITOR) or
    not (INLINE, where each caller waits for its reply). ``offer`` never blocks."""

    def __init__(self, capacity: int | None) -> None:
        self._items: deque[Outgoing] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self._gap = 0

    def offer(self, item: Outgoing) -> bool:
        """Queue a batch; False (and the batch dropped) when full or closed. A dropped
        RequestEnded leaves no gap: it has no sequence number."""
        with self._cond:
            if self._closed or (self._capacity is not None
                                and len(self._items) >= self._capacity):
                if isinstance(item, BatchItem):
                    self._gap += 1
                return False
            if isinstance(item, BatchItem):
                item.gap_before, self._gap = self._gap, 0
            self._items.append(item)
            self._cond.notify()
            return True

    def take(self, stop: threading.Event) -> Outgoing | None:
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
            count = sum(1 for item in self._items if not isinstance(item, EndItem))
            self._items.clear()
            return count


class HostStream(GuardStream, Protocol):
    """One stream of a :class:`guard.host.GuardClient`, whichever transport carries it."""

    def submit(self, item: BatchItem, timeout: float) -> ReplySlot | None:
        """INLINE: number the batch and send (or queue) it; None when the stream has ended.
        ``timeout``: how long sending may take (the caller's deadline)."""

    def wait(self, slot: ReplySlot, timeout: float) -> bool:
        """INLINE: wait up to ``timeout`` seconds for ``slot``'s reply; True once resolved."""

    def send_ended(self, item: EndItem) -> bool:
        """Send (or queue) a RequestEnded: no sequence number, no reply; False when not."""

    def close_sending(self) -> None:
        """Send what is queued, then no more: the guard answers the rest and ends the stream."""

    def read(self, on_reply: ReplyHandler) -> str:
        """Hand every reply to ``on_reply`` until the stream ends; returns why it ended."""
