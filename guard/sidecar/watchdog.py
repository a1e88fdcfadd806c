"""Never alive and deaf: notice when a part of ``guard serve`` has died, so the process exits.

A guard whose gRPC serving loop has died (grpcio's loop dies for good when it cannot start a
thread), whose doorbell acceptor is gone, or that stopped answering on its own socket, must
not stay alive: its health listener would go on saying SERVING and no probe would ever restart
it (issue 21). The watchdog checks every part it was given once a second, hears of threads
killed by an exception (``threading.excepthook``), including any thread start that failed
anywhere in the process, and asks the main listener's health service, over the socket, whether
it still answers. The first failure is reported once to ``on_failure(part, reason)``; ``guard
serve`` then reports NOT_SERVING, flushes accepted decisions to their sinks and exits non-zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.errors import bounded_repr

log = structlog.get_logger(__name__)

#: Seconds between two rounds of checks.
INTERVAL_S = 1.0
#: How long one health probe may take before it counts as unanswered.
PROBE_TIMEOUT_S = 2.0

Check = Callable[[], str | None]


def thread_check(thread: threading.Thread, what: str) -> Check:
    """A check that fails once ``thread`` is no longer running."""
    def check() -> str | None:
        return None if thread.is_alive() else f"{what} ended"
    return check


def thread_start_failed(exc: BaseException | None) -> bool:
    """Whether ``exc`` is CPython's failure to start a thread (a thread or pids limit)."""
    return isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)


class HealthProbe:
    """Asks a listener's health service whether it answers; any answer counts, even
    RESOURCE_EXHAUSTED (every stream slot taken) or NOT_SERVING: only silence is deaf."""

    def __init__(self, address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.address = address
        self._timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._check = health_pb2_grpc.HealthStub(self._channel).Check

    def __call__(self) -> bool:
        try:
            self._check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            return code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    def close(self) -> None:
        self._channel.close()


class Watchdog:
    """Watches the parts of a running guard; reports the first one that died, once.

    ``liveness_timeout``: how long the main listener may go without answering its health
    probe (``server.liveness_timeout_seconds``) before the guard counts as deaf.
    """

    def __init__(self, on_failure: Callable[[str, str], None], *,
                 probe: Callable[[], bool] | None = None,
                 liveness_timeout: float = 10.0, interval: float = INTERVAL_S) -> None:
        self._on_failure = on_failure
        self._probe = probe
        self._liveness_timeout = liveness_timeout
        self._interval = interval
        self._checks: dict[str, Check] = {}
        self._threads: dict[threading.Thread, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed: tuple[str, str] | None = None
        self._thread: threading.Thread | None = None
        self._previous_hook: Callable[[threading.ExceptHookArgs], object] | None = None

    @property
    def failed(self) -> tuple[str, str] | None:
        """The part that died and why, once one has."""
        return self._failed

    def watch(self, part: str, check: Check) -> None:
        """Check ``part`` every round: ``check`` returns why it is dead, or None."""
        with self._lock:
            self._checks[part] = check

    def watch_thread(self, part: str, thread: threading.Thread) -> None:
        """``part`` dies with ``thread``; an exception that ends it names the cause."""
        with self._lock:
            self._threads[thread] = part
        self.watch(part, thread_check(thread, "its thread"))

    def start(self) -> None:
        """Install the thread-exception hook and start checking (one thread)."""
        self._previous_hook = threading.excepthook
        threading.excepthook = self._excepthook
        self._thread = threading.Thread(target=self._run, name="guard-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking (a drain is not a death): parts may end from now on."""
        self._stop.set()
        if self._previous_hook is not None and threading.excepthook == self._excepthook:
            threading.excepthook = self._previous_hook
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._interval + PROBE_TIMEOUT_S + 1.0)

    def _fail(self, part: str, reason: str) -> None:
        with self._lock:
            if self._failed is not None or self._stop.is_set():
                return
            self._failed = (part, reason)
        self._stop.set()
        self._on_failure(part, reason)

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        with self._lock:
            part = self._threads.get(args.thread) if args.thread is not None else None
        if part is None and thread_start_failed(args.exc_value):
            name = args.thread.name if args.thread is not None else "a thread"
            part = f"thread {name}"
        if part is None:  # not ours to judge: the usual traceback
            if self._previous_hook is not None:
                self._previous_hook(args)
            return
        self._fail(part, _describe(args.exc_type, args.exc_value, args.exc_traceback))

    def _run(self) -> None:
        last_answer = time.monotonic()
        while not self._stop.wait(self._interval):
            with self._lock:
                checks = list(self._checks.items())
            for part, check in checks:
                try:
                    reason = check()
                except Exception as exc:  # a broken check is a guard bug: say so, go on
                    log.error("watchdog check failed", part=part, error=bounded_repr(exc))
                    continue
                if reason is not None:
                    self._fail(part, reason)
                    return
            if self._probe is None:
                continue
            if self._probe():
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > self._liveness_timeout:
                self._fail("grpc server", "its health service did not answer on the main "
                           f"listener for {self._liveness_timeout:g} s "
                           "(server.liveness_timeout_seconds)")
                return


def _describe(exc_type: type[BaseException], exc: BaseException | None,
              _traceback: TracebackType | None) -> str:
    """The exception that ended a thread, as type and bounded message (exceptions here come
    from the guard or grpcio, never from a batch's contents)."""
    text = bounded_repr(exc) if exc is not None else exc_type.__name__
    return f"its thread died: {text}"
