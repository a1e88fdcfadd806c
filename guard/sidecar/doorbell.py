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

One thread per connection, at most ``server.max_concurrent_rpcs`` connections (more get a
RESOURCE_EXHAUSTED end). The socket has the gRPC socket's mode and group. A drain stops
accepting, lets open streams go on for the grace period, then shuts the rest down; each
stream's regions are unmapped and its last telemetry done however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol

import grpc
import structlog

from guard.errors import InvalidInput, TooLarge
from guard.sidecar.session import InspectStream, StreamEnded, StreamLimits
from guard.v1 import guard_pb2 as pb
from guard.wire.framing import FrameError, FrameReader, FrameTooLarge, reply_parts, send_frame

if TYPE_CHECKING:
    from guard.config import GuardConfig
    from guard.engine.core import Engine

log = structlog.get_logger(__name__)

#: ``struct ucred`` (pid, uid, gid) of SO_PEERCRED.
_UCRED: Final = struct.Struct("iII")
#: After a StreamEnd, how long and how much of the host's input is read and dropped.
_LINGER_S: Final = 1.0
_LINGER_BYTES: Final = 8 * 1024 * 1024


class EngineSource(Protocol):
    """Where the doorbell finds the engine (the gRPC servicer holds it; None while loading)
    and the streams' limits."""

    engine: Engine | None
    limits: StreamLimits


class DoorbellServer:
    """Accepts doorbell connections on a bound, listening Unix socket and serves each one as
    an Inspect stream on its own thread."""

    def __init__(self, listener: socket.socket, path: str, config: GuardConfig,
                 source: EngineSource, frame_limit: int) -> None:
        self._listener = listener
        self.path = path
        self._config = config
        self._source = source
        self._frame_limit = frame_limit
        self._max_streams = config.server.max_concurrent_rpcs
        self._lock = threading.Lock()
        self._open: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="guard-doorbell-accept",
                                          daemon=True)

    def start(self) -> None:
        self._acceptor.start()

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
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed: stop()
                return
            number = next(self._ids)
            with self._lock:
                full = len(self._open) >= self._max_streams
                if not full:
                    self._open[number] = conn
            if full:  # refused on a thread of its own: _end lingers, the acceptor must not
                threading.Thread(target=_refuse, args=(conn, self._max_streams), daemon=True,
                                 name="guard-doorbell-refuse").start()
                continue
            thread = threading.Thread(target=self._serve, args=(number, conn),
                                      name=f"guard-doorbell-{number}", daemon=True)
            with self._lock:
                self._threads[number] = thread
            thread.start()

    def _serve(self, number: int, conn: socket.socket) -> None:
        peer = f"unix:doorbell#{number}"
        stream: InspectStream | None = None
        try:
            engine = self._source.engine
            if engine is None or self._closing.is_set():
                _end(conn, grpc.StatusCode.UNAVAILABLE,
                     "the guard is starting or draining; retry when the health service "
                     "reports SERVING")
                return
            uid = _peer_uid(conn)
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
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(5.0)
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


def _refuse(conn: socket.socket, limit: int) -> None:
    with contextlib.closing(conn):
        _end(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
             f"the guard serves at most {limit} streams (server.max_concurrent_rpcs); "
             "retry later")


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
