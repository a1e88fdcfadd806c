"""Stream admission: how many RPCs the guard holds, per peer and in all, and idle streams.

A peer must not be able to take every slot (issue 19: 64 idle streams locked out every new
host and the main socket's health service). Three rules, for gRPC and the doorbell alike:

- **A cap in all** (``server.max_concurrent_rpcs``), counted by the guard itself
  (:class:`AdmissionInterceptor`) over every RPC but the health service's ``Check``: grpcio's
  own limit, and its worker pool, are :data:`HEALTH_RESERVE` larger, so ``Check`` on the
  main socket still answers when every stream slot is taken.
- **A cap per peer** (``server.max_streams_per_peer``): RESOURCE_EXHAUSTED naming the peer.
  The peer is the uid on the doorbell (``SO_PEERCRED``) and the address without its port on
  TCP. On gRPC's Unix socket grpcio reports no credentials (``context.peer()`` is ``unix:``,
  the auth context says only ``insecure``), so every peer of that socket counts as one,
  ``unix``: there the cap keeps the socket's peers together from taking the slots that TCP
  peers and the health service need, but does not tell two local hosts apart (the doorbell
  does).
- **An idle timeout** (``server.stream_idle_seconds``): an Inspect stream on which no message
  arrives for that long, while the guard waits for one, is ended with UNAVAILABLE saying so
  (:class:`IdleReaper`, one thread for every gRPC stream; the doorbell uses ``SO_RCVTIMEO``).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
import structlog

from guard.errors import GuardError

log = structlog.get_logger(__name__)

#: Worker threads and grpcio concurrency kept for the health service's ``Check`` on the main
#: listener beyond ``server.max_concurrent_rpcs``.
HEALTH_RESERVE: Final = 4
#: The one method the admission cap does not count.
HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"

T = TypeVar("T")
Handler = grpc.RpcMethodHandler  # grpc-stubs: generic in the request and response types

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # grpcio's class is not generic at run time
    _Interceptor = grpc.ServerInterceptor


def peer_key(peer: str) -> str:
    """Who a gRPC peer is, for the per-peer cap: ``ipv4:10.0.0.7`` or ``ipv6:[::1]`` (the
    address without its port: a host's connections count together), ``unix`` for every peer
    of a Unix socket (grpcio gives no credentials there), else the peer string itself."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        return f"{kind}:{host}" if host and port.isdigit() else peer
    if kind in ("unix", "unix-abstract"):
        return "unix"
    return peer


class StreamSlots:
    """Open streams, in all and per peer, under the two caps (thread-safe).

    ``limit``: the most in all (the message names ``server.max_concurrent_rpcs``);
    ``per_peer``: the most one peer may hold (``server.max_streams_per_peer``; 0: no cap);
    ``what``: what is counted, and ``setting``: what sets ``limit``, for the refusal messages.
    """

    def __init__(self, limit: int, per_peer: int, what: str = "streams",
                 setting: str = "server.max_concurrent_rpcs") -> None:
        self.limit = limit
        self.per_peer = per_peer
        self._what = what
        self._setting = setting
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    def held(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, 0)

    def acquire(self, key: str) -> str | None:
        """Take a slot for ``key``; None when taken, else why not (a refusal message)."""
        with self._lock:
            held = self._held.get(key, 0)
            if self._total >= self.limit:
                return (f"the guard serves at most {self.limit} {self._what} "
                        f"({self._setting}); retry later")
            if self.per_peer and held >= self.per_peer:
                return (f"peer {key} holds {held} {self._what}, the most one peer may "
                        f"(server.max_streams_per_peer: {self.per_peer}); end one of them "
                        "or retry later")
            self._held[key] = held + 1
            self._total += 1
            return None

    def release(self, key: str) -> None:
        with self._lock:
            held = self._held.get(key, 0) - 1
            if held > 0:
                self._held[key] = held
            else:
                self._held.pop(key, None)
            self._total -= 1


class AdmissionInterceptor(_Interceptor):
    """Counts every RPC but the health ``Check`` against ``slots``; one over a cap gets
    RESOURCE_EXHAUSTED with the cap's message. Runs once per call, not per message."""

    def __init__(self, slots: StreamSlots) -> None:
        self.slots = slots

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method == HEALTH_CHECK:
            return handler
        return _admitted(handler, self.slots)


def _admitted(handler: Handler[Any, Any], slots: StreamSlots) -> Handler[Any, Any]:
    """``handler`` whose behaviour first takes a slot (and gives it back when it ends)."""
    serializers: dict[str, Any] = {"request_deserializer": handler.request_deserializer,
                                   "response_serializer": handler.response_serializer}

    def admit(context: grpc.ServicerContext) -> str:
        key = peer_key(context.peer())
        refusal = slots.acquire(key)
        if refusal is not None:
            log.info("call refused", peer=context.peer(), reason=refusal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        return key

    def unary(behavior: Callable[[Any, grpc.ServicerContext], T]
              ) -> Callable[[Any, grpc.ServicerContext], T]:
        def call(request: Any, context: grpc.ServicerContext) -> T:
            key = admit(context)
            try:
                return behavior(request, context)
            finally:
                slots.release(key)
        return call

    def streaming(behavior: Callable[[Any, grpc.ServicerContext], Iterator[T]]
                  ) -> Callable[[Any, grpc.ServicerContext], Iterator[T]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[T]:
            key = admit(context)
            try:
                yield from behavior(request, context)
            finally:
                slots.release(key)
        return call

    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream),
                                                     **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream),
                                                    **serializers)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serializers)
    return handler


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread than its handler's, with ``code`` and ``details``: the
    handler's wait for the next message then ends. grpcio's public ``cancel()`` can only say
    CANCELLED; its call object (private) takes a status, and is used when it is there."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    cancel: Callable[[object, str], None] | None = getattr(call, "cancel", None)
    if cancel is not None:
        cygrpc = importlib.import_module("grpc._cython.cygrpc")
        cancel(getattr(cygrpc.StatusCode, code.name.lower()), details)
    else:  # another grpcio: the peer reads CANCELLED instead
        context.cancel()  # type: ignore[no-untyped-call]


class IdleWatch:
    """One stream's idle clock: :attr:`since` is when the stream began waiting for its next
    message (None while a message is handled); :attr:`expired` once the reaper ended it."""

    __slots__ = ("_end", "expired", "since")

    def __init__(self, end: Callable[[str], None]) -> None:
        self.since: float | None = None
        self.expired = False
        self._end = end

    def requests(self, iterator: Iterator[T]) -> Iterator[T]:
        """``iterator``'s items, the clock running only while waiting for one."""
        while True:
            self.since = time.monotonic()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.since = None
            yield item

    def expire(self, message: str) -> None:
        self._end(message)


class IdleReaper:
    """One thread that ends streams which waited ``idle_seconds`` for a message.

    The clock runs only while a stream waits for the host (not while the guard handles a
    batch); a stream ended for idling gets UNAVAILABLE naming ``server.stream_idle_seconds``.
    """

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._watches: set[IdleWatch] = set()
        self._stop = threading.Event()
        self._interval = min(1.0, max(0.02, idle_seconds / 10))
        self.thread = threading.Thread(target=self._run, name="guard-idle-reaper",
                                       daemon=True)

    @property
    def message(self) -> str:
        return (f"this stream was idle for {self.idle_seconds:g} s (no message while the "
                "guard waited; server.stream_idle_seconds) and the guard ended it; open a "
                "new stream when there is something to inspect")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(5.0)

    def watch(self, end: Callable[[str], None]) -> IdleWatch:
        """A new stream's clock; ``end(message)`` ends that stream when it idles."""
        watch = IdleWatch(end)
        with self._lock:
            self._watches.add(watch)
        return watch

    def forget(self, watch: IdleWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._reap()
            except Exception:  # a bug: log it and keep watching
                log.exception("idle stream check failed")

    def _reap(self) -> None:
        cutoff = time.monotonic() - self.idle_seconds
        with self._lock:
            idle = [w for w in self._watches
                    if not w.expired and w.since is not None and w.since <= cutoff]
            for watch in idle:
                watch.expired = True
        for watch in idle:
            if watch.since is None:  # a message came in the meantime: not idle after all
                watch.expired = False
                continue
            watch.expire(self.message)


class StreamIdle(GuardError):
    """A stream sent nothing for ``server.stream_idle_seconds``; the guard ended it."""

    code = "UNAVAILABLE"
