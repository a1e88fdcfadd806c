"""Thread pools whose threads all start at start-up: serving never has to start a thread.

grpcio hands each RPC to the executor it was given. With ``ThreadPoolExecutor`` the pool
grows on demand, and a ``submit`` that cannot start a thread (a pod's pids limit reached,
``RuntimeError: can't start new thread``) raises inside gRPC's own serving loop, which then
dies for good while the process stays alive (issue 21). :class:`StartedPool` starts every
worker in its constructor, so a pids limit that is too small fails ``guard serve`` at
start-up, with a message naming the key that sized the pool, and a full pool only queues.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from guard.errors import GuardError
from guard.workqueue import WorkQueue, cancel_waiting, settle

P = ParamSpec("P")
T = TypeVar("T")


class ThreadBudgetError(GuardError):
    """A thread the guard needs could not be started (the process or pod thread limit)."""

    code = "RESOURCE_EXHAUSTED"


def start_thread(thread: threading.Thread, what: str) -> None:
    """``thread.start()``, with a failure to start turned into a :class:`ThreadBudgetError`
    that says which part of the guard needed it."""
    try:
        thread.start()
    except RuntimeError as exc:
        raise ThreadBudgetError(
            f"cannot start a thread for {what}: {exc} (the process or pod limit on tasks, "
            "e.g. the pids cgroup, is lower than the guard's thread budget: see "
            "docs/operations.md, \"Threads\")") from exc


class StartedPool(futures.Executor):
    """A fixed pool of ``workers`` daemon threads, all started by the constructor.

    ``submit`` only queues: it never starts a thread, so it cannot fail on a thread limit.
    Daemon threads: a call that never returns cannot keep the process from exiting after its
    drain. ``what`` names the setting that sized the pool, for the start-up error.
    """

    def __init__(self, workers: int, name: str, what: str) -> None:
        if workers < 1:
            raise ValueError(f"{what}: expected at least one worker, got {workers}")
        self._work: WorkQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self.threads: list[threading.Thread] = []
        try:
            for index in range(workers):
                thread = threading.Thread(target=self._worker, name=f"{name}_{index}",
                                          daemon=True)
                start_thread(thread, f"{what} ({workers} threads)")
                self.threads.append(thread)
        except BaseException:
            self.shutdown(wait=False)
            raise

    @property
    def workers(self) -> int:
        return len(self.threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
               ) -> futures.Future[T]:
        future: futures.Future[T] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.put((future, lambda: fn(*args, **kwargs)))
        return future

    def _worker(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn = item
            del item
            if future.set_running_or_notify_cancel():
                settle(future, fn)
            del future, fn  # no reference kept while idle

    def alive(self) -> int:
        """How many workers are running (all of them, unless one died)."""
        return sum(thread.is_alive() for thread in self.threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                cancel_waiting(self._work)
            for _ in self.threads:
                self._work.put(None)
        if wait:
            for thread in self.threads:
                thread.join()


def tasks_now() -> int:
    """The process's tasks (threads, Python's and native ones) now, from /proc; 0 where there
    is no /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


@dataclass(frozen=True)
class ThreadBudget:
    """What ``guard serve`` runs and the most it may grow to: the figure for a pod's pids
    limit. ``now`` counts every task at start-up (gRPC's worker pools are all started by
    then); ``on_demand`` adds the threads started later, each bounded: doorbell streams
    (``server.max_concurrent_rpcs``), the plugin pool (its workers, and as many again to
    replace workers stuck in a plugin) and one per server at a drain."""

    now: int
    doorbell_streams: int
    plugin_threads: int
    drain: int = 2

    @property
    def on_demand(self) -> int:
        return self.doorbell_streams + self.plugin_threads + self.drain

    @property
    def most(self) -> int:
        return self.now + self.on_demand
