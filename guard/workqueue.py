"""The work queue the guard's two thread pools serve: gRPC's pre-started workers
(:class:`guard.sidecar.threads.StartedPool`) and the plugin runs' workers
(:class:`guard.engine.core.DaemonExecutor`).

The pools differ on purpose (one fixed and started at start-up, one grown on demand with
stuck workers replaced); what they share is here: the queue of ``(future, call)`` items with
``None`` telling a worker to stop, running one item into its future, and cancelling the items
still waiting at a shutdown. A top-level module, since the engine must not import the sidecar.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent import futures
from typing import Any

#: One piece of work: the future to settle and the call that settles it.
Work = tuple[futures.Future[Any], Callable[[], Any]]
#: The queue: work items, and ``None`` for "stop" (one per worker).
WorkQueue = queue.SimpleQueue[Work | None]


def settle(future: futures.Future[Any], call: Callable[[], Any]) -> None:
    """Run ``call`` into ``future`` (already set running): its result, or whatever it
    raised, ``BaseException`` included, so that no exception ends a worker."""
    try:
        result = call()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


def cancel_waiting(work: WorkQueue) -> None:
    """Cancel every item still in ``work`` (a shutdown with ``cancel_futures``)."""
    while True:
        try:
            item = work.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            item[0].cancel()
