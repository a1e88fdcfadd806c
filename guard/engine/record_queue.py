"""Decisions to sinks, off the hot path: one bounded queue and one thread per sink.

A *sink* is a plugin that implements ``guard_record``. Each sink has its own
:class:`RecordQueue`: its own bounded queue, drained by its own daemon thread, so a sink
that is slow, blocked or failing (a full disk) only ever delays or loses its own records;
the decision log next to it keeps its pace. A sink that also implements
``guard_request_ended`` hears of the ends of requests (:class:`RequestsEnded`) on its own
thread too, after every decision of the request that its queue accepted. The other plugins
implementing ``guard_request_ended`` (detectors freeing their windows) share one more queue
and thread, and hear of each end in plugin order, as before.

Policy when a sink's queue is full: the new record is dropped for that sink (never the hot
path blocked, never an accepted record lost from the middle of the queue), the sink's
``dropped`` is incremented and a warning naming the sink is logged for its first drop and
every 1000th after. A sink whose call raises (an ``OSError`` ENOSPC from a full disk, any
exception, even ``BaseException``) loses that record, counted in its ``failed``; its thread
goes on with the next one. Every record accepted into a queue reaches its sink unless the
sink fails on it: :meth:`RecordSinks.close` stops every queue at once, lets each drain in
parallel with the same deadline (a slow sink never eats the decision log's time), and logs
per sink what was written, dropped, failed and left undelivered.

:class:`RecordSinks` keeps one queue per sink name for the engine's life: a reload that
drops a sink leaves its thread idle (the set of names is bounded by the installed plugins),
one that brings it back reuses it, with its counters. Threads: one per sink plugin, plus one
for the shared request ends, each started with the plugins (never on the hot path).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

import structlog
from opentelemetry.context import Context

from guard.decision import Decision, RequestEndReason
from guard.errors import GuardError

log = structlog.get_logger(__name__)

_STOP = object()
#: What a delivery did: the sink wrote the record, raised on it, or is no longer loaded
#: (a reload removed it). None counts as written.
Outcome = Literal["written", "failed", "gone"]
#: Log the first of a sink's drops or failures and every this many after.
_LOG_EVERY = 1000


@dataclass(frozen=True)
class RequestsEnded:
    """Requests of one stream that are over, and why (one queue item for all of them)."""

    request_ids: tuple[str, ...]
    reason: RequestEndReason


class RecordThreadError(GuardError):
    """A sink's record thread could not be started (the process or pod limit on tasks)."""

    code = "RESOURCE_EXHAUSTED"


class RecordQueue:
    """One sink's bounded queue of decisions (and request ends), drained by its own daemon
    thread into ``deliver``.

    Each decision travels with the trace context of its batch (None when it was not traced),
    so that the sink's span joins the batch's trace. Counters: ``delivered`` (written),
    ``dropped`` (queue full, closed, or the sink gone by the time its turn came),
    ``failed`` (the sink raised), ``ends_dropped`` (request ends not queued: the queue was
    full).
    """

    def __init__(self, deliver: Callable[[Decision, Context | None], Outcome | None],
                 maxsize: int = 10_000, *,
                 deliver_end: Callable[[RequestsEnded], object] | None = None,
                 name: str = "records") -> None:
        self.name = name
        self._deliver = deliver
        self._deliver_end = deliver_end
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)
        self.maxsize = maxsize
        self.dropped = 0
        self.delivered = 0
        self.failed = 0
        #: Request ends not queued because the queue was full: the plugin did not hear of
        #: them (its own caps bound what it keeps).
        self.ends_dropped = 0
        self._lock = threading.Lock()
        self._closed = False
        self._stop_queued = False
        self._thread = threading.Thread(target=self._run, name=f"guard-records-{name}",
                                        daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": a pids limit
            raise RecordThreadError(
                f"cannot start the record thread of sink {name!r}: {exc} (one thread per "
                "plugin implementing guard_record or guard_request_ended; see "
                "docs/operations.md)") from exc

    @property
    def depth(self) -> int:
        """Records waiting for the sink (the stop marker of a closed queue not counted)."""
        waiting = self._queue.qsize()
        if self._stop_queued and self._thread.is_alive():
            waiting -= 1
        return max(0, waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
        if dropped == 1 or dropped % _LOG_EVERY == 0:
            log.warning("decision record dropped", sink=self.name,
                        reason="closed" if self._closed else "record queue full",
                        dropped=dropped, queue_size=self.maxsize,
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
        if dropped == 1 or dropped % _LOG_EVERY == 0:
            log.warning("request end dropped", sink=self.name, reason="record queue full",
                        dropped=dropped, queue_size=self.maxsize,
                        requests=len(ended.request_ids), end_reason=ended.reason)
        return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            record, trace_context = item
            del item
            if isinstance(record, RequestsEnded):
                self._end(record)
            else:
                self._record(record, trace_context)
            del record, trace_context  # nothing kept while idle
            # Closed with the queue full, the stop marker found no room: stop once drained.
            with self._lock:
                if self._closed and self._queue.empty():
                    return

    def _record(self, decision: Decision, trace_context: Context | None) -> None:
        try:
            outcome = self._deliver(decision, trace_context)
        except BaseException as exc:  # a sink's bug, even SystemExit, never ends the thread
            log.error("record delivery failed", sink=self.name,
                      decision_id=decision.decision_id, error=type(exc).__name__)
            outcome = "failed"
        failed = 0
        with self._lock:  # offer() counts drops from other threads
            if outcome == "failed":
                self.failed += 1
                failed = self.failed
            elif outcome == "gone":
                self.dropped += 1
            else:
                self.delivered += 1
        if outcome == "failed" and (failed == 1 or failed % _LOG_EVERY == 0):
            log.warning("decision record not written: the sink failed on it", sink=self.name,
                        failed=failed, decision_id=decision.decision_id)

    def _end(self, ended: RequestsEnded) -> None:
        try:
            if self._deliver_end is not None:
                self._deliver_end(ended)
        except BaseException as exc:  # a plugin bug must not stop later records
            log.error("request end delivery failed", sink=self.name, reason=ended.reason,
                      error=type(exc).__name__)

    def stop_accepting(self) -> None:
        """Refuse new records; the thread stops once the queue is drained (never blocks)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._queue.put_nowait(_STOP)  # wakes an idle thread
                self._stop_queued = True
            except queue.Full:
                pass  # the thread is busy: it stops when it finds the queue empty

    def join(self, deadline: float | None) -> bool:
        """Wait until the thread stopped or ``deadline`` (a ``time.monotonic()`` value; None:
        no limit) passed; whether it stopped."""
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def report(self, timeout: float | None, drained: bool) -> None:
        """Log what the drain did for this sink: written, dropped, failed, left."""
        left = self.depth
        if drained:
            log.info("records drained", sink=self.name, written=self.delivered,
                     dropped=self.dropped, failed=self.failed, left=left,
                     deadline_s=timeout)
        else:
            # A sink that never returns must not keep the guard from exiting: what is still
            # queued is left to the (daemon) thread, and said so.
            log.error("record queue did not drain in time", sink=self.name, pending=left,
                      written=self.delivered, dropped=self.dropped, failed=self.failed,
                      timeout_s=timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, deliver everything already accepted, then stop the thread; waits
        at most ``timeout`` seconds (None: until drained). Whether it drained in time."""
        self.stop_accepting()
        drained = self.join(None if timeout is None else time.monotonic() + timeout)
        self.report(timeout, drained)
        return drained


#: The name of the queue shared by the plugins that implement ``guard_request_ended`` but
#: are no sinks (in logs; it is not a key of :attr:`RecordSinks.sinks`).
SHARED_ENDS: str = "request-ends"


def _no_records(_decision: Decision, _context: Context | None) -> Outcome:
    return "gone"  # the shared queue of request ends is never offered a decision


class RecordSinks:
    """Every sink's :class:`RecordQueue`, by sink (plugin) name, and the queue of request
    ends shared by the other plugins.

    ``deliver(sink, decision, context)`` and ``deliver_end(sink, ended)`` hand one item to
    the sink of that name (on that sink's thread); ``deliver_end(None, ended)`` is the shared
    queue's. :meth:`route` returns the queues of a pipeline's sinks and :meth:`shared_ends`
    the shared one (made and started on first use, at start-up or reload: never on the hot
    path); :meth:`offer` and :meth:`offer_end` put an item in each queue given.
    """

    def __init__(self, deliver: Callable[[str, Decision, Context | None], Outcome | None],
                 deliver_end: Callable[[str | None, RequestsEnded], object],
                 maxsize: int = 10_000) -> None:
        self._deliver = deliver
        self._deliver_end = deliver_end
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._queues: dict[str, RecordQueue] = {}
        self._shared: RecordQueue | None = None
        self._closed = False

    def shared_ends(self) -> RecordQueue:
        """The queue (and thread) of request ends for plugins that are no sinks."""
        with self._lock:
            if self._shared is None:
                self._shared = RecordQueue(_no_records, self.maxsize,
                                           deliver_end=partial(self._deliver_end, None),
                                           name=SHARED_ENDS)
                if self._closed:
                    self._shared.stop_accepting()
            return self._shared

    def route(self, names: Iterable[str]) -> tuple[RecordQueue, ...]:
        """The queues of these sinks, each started on first use."""
        with self._lock:
            queues = []
            for name in names:
                sink = self._queues.get(name)
                if sink is None:
                    sink = self._queues[name] = RecordQueue(
                        partial(self._deliver, name), self.maxsize,
                        deliver_end=partial(self._deliver_end, name), name=name)
                    if self._closed:
                        sink.stop_accepting()
                queues.append(sink)
            return tuple(queues)

    @property
    def sinks(self) -> Mapping[str, RecordQueue]:
        """Every sink's queue by name (sinks a reload removed included: their counts stay)."""
        with self._lock:
            return dict(self._queues)

    @staticmethod
    def offer(sinks: Iterable[RecordQueue], decision: Decision,
              trace_context: Context | None = None) -> bool:
        """Queue a decision for each of ``sinks`` without blocking; False when some sink's
        queue was full or closed (counted there)."""
        accepted = True
        for sink in sinks:
            accepted = sink.offer(decision, trace_context) and accepted
        return accepted

    @staticmethod
    def offer_end(sinks: Iterable[RecordQueue], ended: RequestsEnded) -> bool:
        """Queue request ends for each of ``sinks``; False when none took them."""
        queued = False
        for sink in sinks:
            queued = sink.offer_end(ended) or queued
        return queued

    def _all(self) -> list[RecordQueue]:
        with self._lock:
            return [*self._queues.values(), *([self._shared] if self._shared else [])]

    def _total(self, counter: str) -> int:
        return sum(getattr(sink, counter) for sink in self._all())

    @property
    def dropped(self) -> int:
        return self._total("dropped")

    @property
    def delivered(self) -> int:
        return self._total("delivered")

    @property
    def failed(self) -> int:
        return self._total("failed")

    @property
    def ends_dropped(self) -> int:
        return self._total("ends_dropped")

    @property
    def depth(self) -> int:
        return self._total("depth")

    def close(self, timeout: float | None = None) -> None:
        """Stop every queue, let them all drain at once for up to ``timeout`` seconds (the
        same deadline for each sink), and log each sink's outcome."""
        with self._lock:
            self._closed = True
        queues = self._all()
        for sink in queues:
            sink.stop_accepting()
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = [sink.join(deadline) for sink in queues]
        for sink, done in zip(queues, drained, strict=True):
            sink.report(timeout, done)
