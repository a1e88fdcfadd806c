"""Decisions to sinks, off the hot path: a bounded queue and one sink thread.

The queue also carries the ends of requests (:class:`RequestsEnded`, for
``guard_request_ended``), so that plugins hear of a request's end after every decision of it
that the queue accepted, on the thread that hands them its decisions. The counters
``dropped`` and ``delivered`` count decisions; ends have their own ``ends_dropped``.

Policy when the queue is full: the new record is dropped (never the hot path blocked, never
an accepted record lost from the middle of the queue), ``dropped`` is incremented and a
warning is logged for the first drop and every 1000th after. Every record accepted into the
queue reaches the sinks: :meth:`RecordQueue.close` drains the queue before it returns (a sink
that hangs past the close timeout is given up on, and the records it holds up are logged).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from opentelemetry.context import Context

from guard.decision import Decision, RequestEndReason

log = structlog.get_logger(__name__)

_STOP = object()


@dataclass(frozen=True)
class RequestsEnded:
    """Requests of one stream that are over, and why (one queue item for all of them)."""

    request_ids: tuple[str, ...]
    reason: RequestEndReason


class RecordQueue:
    """A bounded queue of decisions (and request ends), drained by one daemon thread into
    ``deliver``.

    Each decision travels with the trace context of its batch (None when it was not traced),
    so that the sinks' spans join the batch's trace.
    """

    def __init__(self, deliver: Callable[[Decision, Context | None], None],
                 maxsize: int = 10_000, *,
                 deliver_end: Callable[[RequestsEnded], None] | None = None) -> None:
        self._deliver = deliver
        self._deliver_end = deliver_end
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)
        self.maxsize = maxsize
        self.dropped = 0
        self.delivered = 0
        #: Request ends not queued because the queue was full: the plugins did not hear of
        #: them (their own caps bound what they keep).
        self.ends_dropped = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="guard-records", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def offer(self, decision: Decision, trace_context: Context | None = None) -> bool:
        """Queue a decision without blocking; False (and counted) when full or closed."""
        with self._lock:  # so that nothing is queued behind the stop marker
            if not self._closed:
                try:
                    self._queue.put_nowait((decision, trace_context))
                    return True
                except queue.Full:
                    pass
            self.dropped += 1
            dropped = self.dropped
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("decision record dropped", reason="closed" if self._closed
                        else "record queue full", dropped=dropped, queue_size=self.maxsize,
                        decision_id=decision.decision_id)
        return False

    def offer_end(self, ended: RequestsEnded) -> bool:
        """Queue the end of requests for ``deliver_end`` without blocking; False when full
        (counted in ``ends_dropped``), closed (the plugins are shutting down: nothing to
        free) or without ``deliver_end``."""
        with self._lock:
            if self._closed or self._deliver_end is None:
                return False
            try:
                self._queue.put_nowait((ended, None))
                return True
            except queue.Full:
                self.ends_dropped += 1
                dropped = self.ends_dropped
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("request end dropped", reason="record queue full", dropped=dropped,
                        queue_size=self.maxsize, requests=len(ended.request_ids),
                        end_reason=ended.reason)
        return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            record, trace_context = item
            if isinstance(record, RequestsEnded):
                try:
                    if self._deliver_end is not None:
                        self._deliver_end(record)
                except Exception:  # a plugin bug must not stop later records
                    log.exception("request end delivery failed", reason=record.reason)
                continue
            try:
                self._deliver(record, trace_context)
            except Exception:  # a sink bug must not stop later records
                log.exception("record delivery failed", decision_id=record.decision_id)
            self.delivered += 1

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, deliver everything already accepted, then stop the thread.

        Waits at most ``timeout`` seconds (None: until drained). A sink that never returns
        must not keep the guard from exiting: past the timeout, what is still queued is
        logged as not delivered and left to the (daemon) thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # Blocks only while the queue is full, that is while the thread is delivering.
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        else:
            self._thread.join(None if deadline is None
                              else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("record queue did not drain in time", pending=self._queue.qsize(),
                      timeout_s=timeout)
