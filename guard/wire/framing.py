"""Length-prefixed protobuf frames on a stream socket: the doorbell's wire format.

A frame is a little-endian uint32 byte length, then that many bytes (one serialized
message). Both ends of the doorbell use these helpers: the guard (:mod:`guard.sidecar.doorbell`) and
the host SDK (:mod:`guard.host.doorbell`); nothing here knows about SAEs or gRPC.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Final

_LENGTH: Final = struct.Struct("<I")
HEADER_BYTES: Final = _LENGTH.size
#: Bytes asked of the kernel per read: a small frame's header and body come in one call.
_READ_CHUNK: Final = 64 * 1024
#: A reader's buffer above this size is given back once the large frame in it is read.
_KEEP_BYTES: Final = 1024 * 1024
#: The tag of ``DoorbellFrame.reply`` (field 1, length-delimited) in protobuf's encoding.
_REPLY_TAG: Final = b"\x0a"


class FrameError(Exception):
    """The peer sent something that is not a frame this end accepts."""


class FrameTooLarge(FrameError):
    """A frame's announced length is above the limit."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"a frame of {length} bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


def encode_frame(payload: bytes) -> bytes:
    """One frame: the length, then ``payload`` (for writers that take bytes, not sockets)."""
    return _LENGTH.pack(len(payload)) + payload


def frame_length(header: bytes, limit: int) -> int:
    """The payload length a frame header announces; FrameTooLarge above ``limit``."""
    (length,) = _LENGTH.unpack(header)
    if length > limit:
        raise FrameTooLarge(length, limit)
    return int(length)


class FrameReader:
    """Reads frames from a blocking socket (a ``shutdown`` of the socket from another thread
    ends a read that waits)."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._buffer = bytearray(_READ_CHUNK)
        self._start = 0  # the unread bytes are self._buffer[self._start:self._end]
        self._end = 0

    def read(self, deadline: float | None = None) -> bytes | None:
        """The next frame's payload; None at a clean end of the stream (no partial frame).

        ``deadline`` (``time.monotonic()``; None: wait for ever) raises TimeoutError when no
        whole frame came by then; what did come stays buffered for the next call. Raises
        :class:`FrameTooLarge` for a length above the limit (nothing more is read: the
        stream cannot be resynchronised), :class:`FrameError` for a frame cut short, and
        OSError when the connection fails. One thread at a time.
        """
        if not self._fill(HEADER_BYTES, deadline):
            if self._end > self._start:
                raise FrameError(f"the stream ended inside a frame header "
                                 f"({self._end - self._start} of {HEADER_BYTES} bytes)")
            return None
        header = bytes(self._buffer[self._start:self._start + HEADER_BYTES])
        length = frame_length(header, self._limit)
        if not self._fill(HEADER_BYTES + length, deadline):
            got = self._end - self._start - HEADER_BYTES
            raise FrameError(f"the stream ended inside a frame ({got} of {length} bytes)")
        begin = self._start + HEADER_BYTES
        payload = bytes(self._buffer[begin:begin + length])
        self._start = begin + length
        if len(self._buffer) > _KEEP_BYTES and self._end - self._start <= _READ_CHUNK:
            # A large frame is done: give its memory back (a connection keeps a read chunk).
            rest = self._buffer[self._start:self._end]
            self._buffer = bytearray(_READ_CHUNK)
            self._buffer[:len(rest)] = rest
            self._start, self._end = 0, len(rest)
        return payload

    def _fill(self, need: int, deadline: float | None) -> bool:
        """Buffer at least ``need`` unread bytes; False at the end of the stream.

        The buffer grows with what arrives (at most doubling), never with what a header
        announces: a peer that announces a frame at the limit and sends nothing more costs
        one read chunk, not the frame."""
        if self._end - self._start >= need:
            return True
        if self._start:  # move the unread bytes to the front
            unread = self._end - self._start
            self._buffer[:unread] = self._buffer[self._start:self._end]
            self._start, self._end = 0, unread
        while self._end < need:
            buffer = self._buffer
            if self._end == len(buffer):  # full: room for what comes next, up to the frame
                buffer.extend(bytes(min(need, 2 * len(buffer)) - len(buffer)))
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0 or not _wait(self._sock, select.POLLIN, timeout):
                    raise TimeoutError("no whole frame from the peer in time")
            with memoryview(buffer) as view:
                count = self._sock.recv_into(view[self._end:])
            if count == 0:
                return False
            self._end += count
        return True


def send_frame(sock: socket.socket, *parts: bytes, deadline: float | None = None) -> None:
    """Send one frame whose payload is ``parts`` joined (gathered by the kernel, not copied
    here). A send that finds no room (EAGAIN: the socket's send timeout ran out) waits for
    room until ``deadline`` (``time.monotonic()``; None: no limit). Raises TimeoutError past
    the deadline, with the frame perhaps partly sent (the stream is then unusable), and
    OSError when the peer is gone."""
    length = sum(len(part) for part in parts)
    buffers = [_LENGTH.pack(length), *parts]
    total = HEADER_BYTES + length
    try:
        sent = sock.sendmsg(buffers)
    except BlockingIOError:
        sent = 0
    if sent >= total:
        return
    rest = memoryview(b"".join(buffers))[sent:]  # the socket buffer takes it in pieces
    while rest:
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise TimeoutError(f"the peer took {total - len(rest)} of the frame's {total} "
                                   "bytes in time; the frame was cut short") from None
            _wait(sock, select.POLLOUT, timeout)
            continue
        rest = rest[sent:]


def _wait(sock: socket.socket, events: int, timeout: float | None) -> bool:
    """Block until ``sock`` is ready for ``events`` or hung up (True), or ``timeout``
    seconds pass (False)."""
    poller = select.poll()
    poller.register(sock, events | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1e3) + 1)))


def reply_parts(reply: bytes) -> tuple[bytes, bytes, bytes]:
    """A serialized InspectResponse as the parts of a ``DoorbellFrame{reply}`` (protobuf's
    encoding of the oneof field, so the reply's bytes are not copied into a new message)."""
    return _REPLY_TAG, _varint(len(reply)), reply


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
