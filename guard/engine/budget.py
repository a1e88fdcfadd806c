"""The guard-wide encode budget: how much memory batches being encoded may hold at once.

A batch's encode holds its float32 features (``rows x features``) until it is decided, and
while ONNX Runtime runs, one chunk's intermediates (:meth:`guard.sae.Encoder.peak_bytes`).
Without a bound, a few concurrent maximum-size batches from different streams hold several
times the container's memory (measured: three ``[14563, 576]`` batches of a 4608-feature
TopK SAE took a guard from 0.2 to 1.8 GB). :class:`EncodeBudget` admits a batch only while
the bytes of the batches in progress, its own included, stay within
``server.max_inflight_encode_bytes``:

- a batch needing more than the whole budget is refused at once (RESOURCE_EXHAUSTED naming
  the key, the batch's rows and the bytes it needs);
- one that does not fit beside the batches in progress waits, first come first served, up to
  ``server.encode_queue_seconds``, then is refused the same way.

Messages carry sizes and the hook name, never activation values.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from guard.config import ServerConfig
from guard.errors import TooLarge
from guard.sae import Encoder
from guard.wire.codec import DATATYPES

log = structlog.get_logger(__name__)

_MIB = 1024 * 1024
#: Longest single wait on the condition (threading refuses timeouts past TIMEOUT_MAX).
_WAIT_SLICE = 60.0


class EncodeBudgetExhausted(TooLarge):
    """A batch could not get ``server.max_inflight_encode_bytes`` (RESOURCE_EXHAUSTED)."""


@dataclass
class BudgetCounts:
    """What the budget did since start (for tests and debugging)."""

    admitted: int = 0
    #: Admitted after waiting for room.
    waited: int = 0
    #: Refused at once: the batch alone needs more than the budget.
    refused_too_large: int = 0
    #: Refused after waiting ``encode_queue_seconds`` for room.
    refused_timeout: int = 0
    #: The most bytes held at once.
    peak_bytes: int = 0


class EncodeBudget:
    """Bytes of encodes in progress across every stream, at most ``limit_bytes``. Thread-safe.

    ``hold(nbytes, ...)`` is a context manager: it returns once the batch is admitted (or
    raises :class:`EncodeBudgetExhausted`) and gives the bytes back on exit. Waiters are
    served in arrival order, so a large batch is not starved by a stream of small ones.
    """

    def __init__(self, limit_bytes: int = ServerConfig.max_inflight_encode_bytes,
                 wait_seconds: float = ServerConfig.encode_queue_seconds) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes: expected a positive number, found {limit_bytes}")
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds: expected >= 0, found {wait_seconds}")
        self.limit_bytes = limit_bytes
        self.wait_seconds = wait_seconds
        self.counts = BudgetCounts()
        self._in_use = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition(threading.Lock())

    @classmethod
    def of(cls, server: ServerConfig) -> EncodeBudget:
        """The budget the ``server`` section sets."""
        return cls(server.max_inflight_encode_bytes, server.encode_queue_seconds)

    def warn_unless_fits(self, encoders: Mapping[str, Encoder | None],
                         max_message_bytes: int) -> None:
        """Log a warning for each hook whose largest legal batch (``max_message_bytes`` of
        rows in the narrowest wire type) needs more than the whole budget: such batches
        will be refused, so the operator learns it at start rather than from hosts."""
        narrowest = min(DATATYPES.values())
        for hook, encoder in sorted(encoders.items()):
            if encoder is None:
                continue
            rows = max_message_bytes // (narrowest * encoder.d_in)
            needs = encoder.peak_bytes(rows)
            if needs > self.limit_bytes:
                fits = _most_rows(encoder, rows, self.limit_bytes)
                log.warning("encode budget below the largest batch", hook=hook,
                            rows=rows, needs_bytes=needs,
                            max_inflight_encode_bytes=self.limit_bytes, rows_that_fit=fits,
                            note="such batches get RESOURCE_EXHAUSTED; raise "
                                 "server.max_inflight_encode_bytes (and the memory limit) "
                                 "or lower server.max_message_bytes")

    @property
    def in_use(self) -> int:
        """Bytes held by the batches in progress."""
        with self._changed:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Batches waiting for room."""
        with self._changed:
            return len(self._queue)

    @contextmanager
    def hold(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the body; ``what`` names the batch in errors
        (its rows and hook: never its values)."""
        self._acquire(nbytes, what)
        try:
            yield
        finally:
            self._release(nbytes)

    def _acquire(self, nbytes: int, what: str) -> None:
        if nbytes > self.limit_bytes:
            with self._changed:
                self.counts.refused_too_large += 1
            raise EncodeBudgetExhausted(
                f"{what}: encoding it needs about {_size(nbytes)}, more than "
                f"server.max_inflight_encode_bytes ({_size(self.limit_bytes)}) allows for all "
                "batches at once; send fewer rows per batch (or subscribe fewer features), or "
                "raise server.max_inflight_encode_bytes together with the container's memory "
                "limit")
        ticket = object()
        with self._changed:
            if not self._queue and self._in_use + nbytes <= self.limit_bytes:
                self._admit(nbytes)
                return
            self._queue.append(ticket)
            deadline = time.monotonic() + self.wait_seconds
            try:
                while not (self._queue[0] is ticket
                           and self._in_use + nbytes <= self.limit_bytes):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.counts.refused_timeout += 1
                        in_use = self._in_use
                        raise EncodeBudgetExhausted(
                            f"{what}: encoding it needs about {_size(nbytes)} and "
                            f"server.max_inflight_encode_bytes ({_size(self.limit_bytes)}) "
                            f"stayed taken by batches in progress ({_size(in_use)}) for "
                            f"server.encode_queue_seconds ({self.wait_seconds:g} s); retry, "
                            "send smaller batches, or raise server.max_inflight_encode_bytes "
                            "together with the container's memory limit")
                    self._changed.wait(min(remaining, _WAIT_SLICE))
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now (or this one gave up its place at the head).
                self._changed.notify_all()
            self.counts.waited += 1
            self._admit(nbytes)

    def _admit(self, nbytes: int) -> None:
        self._in_use += nbytes
        self.counts.admitted += 1
        self.counts.peak_bytes = max(self.counts.peak_bytes, self._in_use)

    def _release(self, nbytes: int) -> None:
        with self._changed:
            self._in_use -= nbytes
            self._changed.notify_all()


def _most_rows(encoder: Encoder, rows: int, limit_bytes: int) -> int:
    """The most rows (at most ``rows``) whose encode fits ``limit_bytes`` (bisection: the
    bytes grow with the rows)."""
    low, high = 0, rows
    while low < high:
        middle = (low + high + 1) // 2
        if encoder.peak_bytes(middle) <= limit_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def _size(nbytes: int) -> str:
    """Bytes, with MiB for people (``352321536 bytes (336.0 MiB)``)."""
    return f"{nbytes} bytes ({nbytes / _MIB:.1f} MiB)"
