"""The doorbell: Inspect streams framed on a plain Unix socket, for in-pod shared-memory hosts.

With shared memory a batch's message is about 100 bytes, and what is left of an INLINE round
trip is gRPC's own exchange (HTTP/2 framing, its threads and completion queues): on the
project's 2-core machine the doorbell's whole round trip, the guard's decision included, is a
fifth of a gRPC bytes round trip, against nine tenths for the same reference over gRPC
(bench/shm.py, `wire` columns).
The doorbell runs the same protocol without it: the host connects to
``server.shared_memory.doorbell_socket`` (``DescribeResponse.shared_memory_doorbell``), sends
length-prefixed ``InspectRequest`` frames (a StreamConfig, then batches) and reads
``DoorbellFrame`` frames (a reply per batch, none for a ``RequestEnded``; a ``StreamEnd`` where
a gRPC status would end the call). :class:`guard.sidecar.session.InspectStream` does the work
exactly as for a gRPC stream, so validation, decisions, records, spans and metrics are the same.

One thread accepts; each admitted connection gets a thread of its own, at most
``server.max_concurrent_rpcs`` of them, and at most ``server.max_streams_per_peer`` per uid
(``SO_PEERCRED``; :mod:`guard.sidecar.admission`). A refused connection costs no thread: the
acceptor writes its RESOURCE_EXHAUSTED end without blocking, then reads and drops what the host
had sent for a moment (closing a socket with unread input resets it) before closing it. A
connection whose thread cannot start (a pids limit) is refused the same way; the acceptor logs
it once per episode and goes on accepting. Frames are read as they arrive (a header announcing
a large frame costs nothing until its bytes come), and a stream that sends nothing for
``server.stream_idle_seconds`` is ended with UNAVAILABLE. The socket has the gRPC socket's mode
and group. A drain stops accepting, lets open streams go on for the grace period, then shuts
the rest down; each stream's regions are unmapped and its last telemetry done however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import select
import selectors
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol

import grpc
import structlog

from guard.errors import InvalidInput, TooLarge
from guard.sidecar.admission import StreamIdle, StreamSlots
from guard.sidecar.session import InspectStream, StreamEnded, StreamLimits
from guard.v1 import guard_pb2 as pb
from guard.wire.framing import (
    FrameError,
    FrameReader,
    FrameTooLarge,
    encode_frame,
    reply_parts,
    send_frame,
)

if TYPE_CHECKING:
    from guard.config import GuardConfig
    from guard.engine.core import Engine

log = structlog.get_logger(__name__)

#: ``struct ucred`` (pid, uid, gid) of SO_PEERCRED.
_UCRED: Final = struct.Struct("iII")
#: After a StreamEnd, how long and how much of the host's input is read and dropped.
_LINGER_S: Final = 1.0
_LINGER_BYTES: Final = 8 * 1024 * 1024
#: Refused connections lingering at once on the acceptor; more are closed at once.
_MAX_LINGERING: Final = 64
#: Connections the acceptor takes per wake-up before it looks at its other sockets.
_ACCEPT_BATCH: Final = 64
#: After an accept that failed (out of file descriptors), the pause before the next try.
_ACCEPT_RETRY_S: Final = 0.1
#: ``struct timeval`` for SO_RCVTIMEO (the idle timeout).
_TIMEVAL: Final = struct.Struct("@ll")


class EngineSource(Protocol):
    """Where the doorbell finds the engine (the gRPC servicer holds it; None while loading)
    and the streams' limits."""

    engine: Engine | None
    limits: StreamLimits


class DoorbellServer:
    """Accepts doorbell connections on a bound, listening Unix socket and serves each
    admitted one as an Inspect stream on its own thread."""

    def __init__(self, listener: socket.socket, path: str, config: GuardConfig,
                 source: EngineSource, frame_limit: int) -> None:
        self._listener = listener
        self.path = path
        self._config = config
        self._source = source
        self._frame_limit = frame_limit
        self._slots = StreamSlots(config.server.max_concurrent_rpcs,
                                  config.server.max_streams_per_peer, "doorbell streams")
        self._idle_seconds = config.server.stream_idle_seconds
        self._lock = threading.Lock()
        self._open: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        #: Woken by stop(): the acceptor's selector watches its read end.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        #: Connections refused because their thread could not start, this episode.
        self._start_failures = 0
        self._acceptor = threading.Thread(target=self._accept, name="guard-doorbell-accept",
                                          daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    @property
    def slots(self) -> StreamSlots:
        """The streams held, in all and per uid (``uid 1000``)."""
        return self._slots

    @property
    def acceptor(self) -> threading.Thread:
        """The thread that accepts connections (the guard's watchdog watches it)."""
        return self._acceptor

    @property
    def draining(self) -> bool:
        """A drain began: no new streams are accepted."""
        return self._closing.is_set()

    @property
    def streams(self) -> int:
        """Doorbell streams open now."""
        with self._lock:
            return len(self._open)

    def _accept(self) -> None:
        """Accept until the drain: admitted connections get a thread each, refused ones are
        answered here (:class:`_Refusals`), without a thread; nothing ends this loop but
        :meth:`stop`."""
        selector = selectors.DefaultSelector()
        refusals = _Refusals(selector)
        try:
            self._listener.setblocking(False)
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            failing = False
            while not self._closing.is_set():
                try:
                    for key, _events in selector.select(refusals.timeout()):
                        if key.fileobj is self._listener:
                            self._accept_ready(refusals)
                        elif key.fileobj is not self._wake_read:
                            refusals.readable(key.fileobj)  # type: ignore[arg-type]
                    refusals.expire()
                    failing = False
                except Exception:  # a bug: logged once, the acceptor goes on
                    if not failing:
                        log.exception("doorbell acceptor failed; going on")
                    failing = True
                    self._closing.wait(_ACCEPT_RETRY_S)
        finally:
            refusals.close_all()
            selector.close()

    def _accept_ready(self, refusals: _Refusals) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors: the connection waits its turn
                if not self._closing.is_set():
                    log.warning("doorbell cannot accept a connection now; retrying",
                                error=exc.strerror or str(exc))
                    self._closing.wait(_ACCEPT_RETRY_S)
                return
            self._admit(conn, refusals)

    def _admit(self, conn: socket.socket, refusals: _Refusals) -> None:
        """Serve ``conn`` on a thread of its own, or refuse it without one."""
        try:
            uid = _peer_uid(conn)
        except OSError:
            uid = -1
        key = f"uid {uid}"
        refusal = self._slots.acquire(key)
        if refusal is not None:
            log.debug("doorbell connection refused", peer_uid=uid, reason=refusal)
            refusals.refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return
        conn.setblocking(True)  # the stream's thread reads and writes in blocking mode
        number = next(self._ids)
        thread = threading.Thread(target=self._serve, args=(number, conn, uid, key),
                                  name=f"guard-doorbell-{number}", daemon=True)
        with self._lock:
            self._open[number] = conn
            self._threads[number] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread: a pids or thread limit
            with self._lock:
                self._open.pop(number, None)
                self._threads.pop(number, None)
            self._slots.release(key)
            if not self._start_failures:  # once per episode
                log.error("doorbell cannot start a thread for a new stream; refusing new "
                          "streams until threads start again", error=str(exc),
                          streams=self.streams)
            self._start_failures += 1
            refusals.refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "the guard cannot start a thread for this stream now (its thread "
                            "or pids limit is reached); retry later")
            return
        if self._start_failures:
            log.info("doorbell streams start again", refused=self._start_failures)
            self._start_failures = 0

    def _serve(self, number: int, conn: socket.socket, uid: int, key: str) -> None:
        peer = f"unix:doorbell#{number}"
        stream: InspectStream | None = None
        try:
            engine = self._source.engine
            if engine is None or self._closing.is_set():
                _end(conn, grpc.StatusCode.UNAVAILABLE,
                     "the guard is starting or draining; retry when the health service "
                     "reports SERVING")
                return
            if self._idle_seconds > 0:  # a recv that waits this long fails with EAGAIN
                seconds = int(self._idle_seconds)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(
                    seconds, int((self._idle_seconds - seconds) * 1e6)))
            stream = InspectStream(engine, self._config.server.max_message_bytes,
                                   f"{peer} (uid {uid})",
                                   shared_memory=self._config.server.shared_memory,
                                   doorbell=True, alive=functools.partial(_connected, conn),
                                   peer_uid=uid, limits=self._source.limits)
            self._run(conn, stream)
        except Exception:  # a bug: this stream ends, the guard goes on
            log.exception("doorbell stream failed", peer=peer)
            _end(conn, grpc.StatusCode.INTERNAL, "internal error; see the guard's log")
        finally:
            if stream is not None:
                stream.close()
                counters = stream.counters
                log.info("stream closed", peer=peer, mode=stream.mode, transport="doorbell",
                         batches=counters.batches, rows=counters.rows,
                         rejected=counters.rejected,
                         skipped_sequences=counters.skipped_sequences,
                         requests_ended=counters.requests_ended,
                         requests_unknown=counters.requests_unknown,
                         requests_evicted=counters.requests_evicted)
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._open.pop(number, None)
                self._threads.pop(number, None)
            self._slots.release(key)

    def _run(self, conn: socket.socket, stream: InspectStream) -> None:
        """Frames in, replies out, until the host stops sending or the stream must end."""
        reader = FrameReader(conn, self._frame_limit)
        number = 0
        try:
            while True:
                try:
                    payload = reader.read()
                except FrameTooLarge as exc:
                    raise StreamEnded(_too_large(exc)) from None
                except FrameError as exc:
                    log.info("doorbell stream cut short", peer=stream.peer, reason=str(exc))
                    return
                except BlockingIOError:  # SO_RCVTIMEO: nothing came for the idle timeout
                    raise StreamEnded(StreamIdle(_idle_message(self._idle_seconds))) from None
                except OSError:  # reset by the host, or shut down by a drain
                    return
                if payload is None:  # the host is done sending: everything is answered
                    return
                number += 1
                try:
                    request = pb.InspectRequest.FromString(payload)
                except Exception as exc:  # protobuf's DecodeError
                    raise StreamEnded(InvalidInput(
                        f"frame {number} on this doorbell stream is not a "
                        f"guard.v1.InspectRequest (protobuf could not decode its bytes: "
                        f"{type(exc).__name__}: {exc}); check that the host speaks guard.v1"
                    )) from None
                reply = stream.handle(request)
                if reply is not None:
                    try:
                        send_frame(conn, *reply_parts(reply.SerializeToString()))
                    except OSError:  # the host went away; the record is kept all the same
                        return
                    stream.after_reply()  # the reply is sent: telemetry costs no latency
        except StreamEnded as ended:
            log.info("stream ended by the guard", peer=stream.peer, code=ended.code.name,
                     reason=ended.details, transport="doorbell")
            _end(conn, ended.code, ended.details)

    def stop(self, grace: float) -> None:
        """Accept no more; give open streams ``grace`` seconds, then shut them down and wait
        for their threads (each unmaps its regions and finishes its telemetry)."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        if self._acceptor.ident is not None:
            self._acceptor.join(5.0)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._wake_read.close()
        self._wake_write.close()
        deadline = time.monotonic() + grace
        while self.streams and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            left = list(self._open.values())
            threads = list(self._threads.values())
        if left:
            log.info("doorbell streams still open after the drain grace; ending them",
                     streams=len(left))
        for conn in left:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5.0)


class _Refusals:
    """Refused connections, handled on the acceptor's thread: the StreamEnd frame is written
    at once without blocking (a new socket's buffer takes it), then what the host had already
    sent is read and dropped for up to ``_LINGER_S`` (as :func:`_end` does: closing a socket
    with unread input resets it, and the host could lose the StreamEnd), at most
    ``_MAX_LINGERING`` connections at a time; beyond that a refused connection is closed
    right after its StreamEnd."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._lingering: dict[socket.socket, tuple[float, int]] = {}

    def refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        frame = encode_frame(pb.DoorbellFrame(
            end=pb.StreamEnd(code=code.value[0], message=message)).SerializeToString())
        try:
            conn.setblocking(False)
            sent = conn.send(frame)
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the host is gone already
            conn.close()
            return
        if sent < len(frame) or len(self._lingering) >= _MAX_LINGERING:
            conn.close()
            return
        self._selector.register(conn, selectors.EVENT_READ)
        self._lingering[conn] = (time.monotonic() + _LINGER_S, 0)

    def timeout(self) -> float | None:
        """How long the acceptor may wait: until the first lingering connection is due."""
        if not self._lingering:
            return None
        first = min(deadline for deadline, _ in self._lingering.values())
        return max(0.0, first - time.monotonic())

    def readable(self, conn: socket.socket) -> None:
        deadline, dropped = self._lingering[conn]
        try:
            chunk = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        dropped += len(chunk)
        if not chunk or dropped >= _LINGER_BYTES:
            self._close(conn)
        else:
            self._lingering[conn] = (deadline, dropped)

    def expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c, (deadline, _) in self._lingering.items() if deadline <= now]:
            self._close(conn)

    def close_all(self) -> None:
        for conn in list(self._lingering):
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        del self._lingering[conn]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()


def _idle_message(seconds: float) -> str:
    return (f"this doorbell stream was idle for {seconds:g} s (nothing from the host while the "
            "guard waited; server.stream_idle_seconds) and the guard ended it; connect again "
            "when there is something to inspect")


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)


def _connected(conn: socket.socket) -> bool:
    """The host is still there (a zero-timeout poll): not gone and not reset. A half-close
    (the host done sending, waiting for the rest of its replies) is still there."""
    poller = select.poll()
    poller.register(conn, select.POLLHUP | select.POLLERR)
    return not poller.poll(0)


def _too_large(exc: FrameTooLarge) -> TooLarge:
    return TooLarge(
        f"a doorbell frame of {exc.length} bytes exceeds the guard's transport limit of "
        f"{exc.limit} (twice server.max_message_bytes); send fewer rows per batch, or raise "
        "server.max_message_bytes in the guard's config")


def _end(conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
    """Send the StreamEnd frame (best effort: the host may be gone already), then read and
    drop what the host had already sent, for a moment: closing a socket with unread input
    resets the connection, and the host could lose the StreamEnd to the reset."""
    frame = pb.DoorbellFrame(end=pb.StreamEnd(code=code.value[0], message=message))
    with contextlib.suppress(OSError):
        send_frame(conn, frame.SerializeToString())
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(_LINGER_S)
        deadline = time.monotonic() + _LINGER_S
        dropped = 0
        while dropped < _LINGER_BYTES and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            dropped += len(chunk)
