"""INLINE bookkeeping of one stream: which batches wait for a reply, matched by sequence.

The guard answers in order, one reply per batch. A batch whose deadline passed is
*abandoned*: its reply, when it comes, is recognised by its sequence number and discarded,
so it is never taken for the reply of a later batch. Shared by the sync and asyncio clients
(a plain lock: never held across a wait or an ``await``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Slot = TypeVar("Slot")


@dataclass
class Resolution(Generic[Slot]):
    """What a reply resolves: its waiting slot (None when it came too late), and earlier
    slots that the guard skipped (it answered a later batch first: never by the protocol)."""

    slot: Slot | None
    was_late: bool
    skipped: list[Slot] = field(default_factory=list)


class PendingReplies(Generic[Slot]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Slot] = {}  # insertion order is sequence order
        self._late: set[int] = set()
        self._closed_reason: str | None = None

    def add(self, sequence: int, slot: Slot) -> bool:
        """Register a slot; False once the stream has ended (the batch must not be sent)."""
        with self._lock:
            if self._closed_reason is not None:
                return False
            self._waiting[sequence] = slot
            return True

    def abandon(self, sequence: int) -> int | None:
        """The deadline passed: forget the slot. Returns how many abandoned batches are still
        unanswered, or None when the slot was resolved in the meantime (use its result)."""
        with self._lock:
            if self._waiting.pop(sequence, None) is None:
                return None
            self._late.add(sequence)
            return len(self._late)

    def remove(self, sequence: int) -> None:
        """The batch was never sent: no reply will come."""
        with self._lock:
            self._waiting.pop(sequence, None)

    def forget(self, sequence: int) -> None:
        """The caller went away (cancelled): drop the slot without counting it late."""
        with self._lock:
            if self._waiting.pop(sequence, None) is not None:
                self._late.add(sequence)

    def resolve(self, sequence: int) -> Resolution[Slot]:
        with self._lock:
            slot = self._waiting.pop(sequence, None)
            was_late = sequence in self._late
            self._late.discard(sequence)
            skipped: list[Slot] = []
            while self._waiting:
                first = next(iter(self._waiting))
                if first >= sequence:
                    break
                skipped.append(self._waiting.pop(first))
            return Resolution(slot, was_late, skipped)

    def close(self, reason: str) -> list[Slot]:
        """The stream ended: no more slots; returns the ones still waiting."""
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            slots = list(self._waiting.values())
            self._waiting.clear()
            return slots
