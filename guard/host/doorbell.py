"""The host's end of the doorbell (:mod:`guard.sidecar.doorbell`): an Inspect stream on the guard's
doorbell socket instead of a gRPC call, for a client whose rows travel in shared memory.

:class:`guard.host.GuardClient` uses it on its own when it has a shared-memory region, the
guard's ``Describe`` names a doorbell socket (``shared_memory_doorbell``) and the region's
:class:`guard.host.shm.SharedMemory` has ``doorbell=True`` (the default). Everything above the
transport is the same as on gRPC: sequence numbers, deadlines, the failure policy, late
replies, slots returned on replies, reconnects with backoff.

Threads: an INLINE caller writes its batch's frame itself (no hand-off to a sender thread:
that hand-off is a good part of a gRPC round trip on a small machine), under a lock that keeps
frames whole and in sequence order; MONITOR batches go through the bounded outbox and a sender
thread, as on gRPC. The client thread reads the replies. The socket is non-blocking: a send
that finds no room waits at most until the batch's deadline (then the stream is reset, since a
frame was cut), and :meth:`DoorbellStream.reset` wakes every wait by shutting the socket down.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Final

from guard.host._batch import BatchItem, EndItem, stream_config
from guard.host._core import ReplyHandler, StreamState
from guard.host._options import TRANSPORT_HEADROOM, ClientOptions, CounterBox
from guard.host._outbox import Outbox, ReplySlot
from guard.host._verdict import stream_end_text
from guard.host.shm import HostRegion
from guard.v1 import guard_pb2 as pb
from guard.wire.framing import FrameError, FrameReader, send_frame

#: How long connecting and sending the StreamConfig may take.
CONNECT_TIMEOUT_S: Final = 2.0
#: ``struct timeval`` for SO_SNDTIMEO.
_TIMEVAL: Final = struct.Struct("@ll")


class DoorbellStream(StreamState[Outbox]):
    """One doorbell connection: the StreamConfig frame, then batches; the same interface as
    the client's gRPC stream (:class:`guard.host._outbox.HostStream`). A connection that
    fails leaves the stream ended at once, with the reason, for the client to retry (and the
    region to be checked again with ``Describe``: the guard may have changed)."""

    transport = "doorbell"

    def __init__(self, path: str, options: ClientOptions, counters: CounterBox,
                 outbox: Outbox, region: HostRegion | None, on_reply: ReplyHandler) -> None:
        super().__init__(options, counters, outbox, region)
        self.path = path
        #: Why the connection could not be made (the stream is then over before it began).
        self.connect_error = ""
        self._send_lock = threading.Lock()
        self._send_timeout: float | None = None  # SO_SNDTIMEO as last set, in seconds
        self._monitor = options.mode == "monitor"
        self._on_reply = on_reply
        #: Guards the reading role: one thread at a time reads frames and hands them on.
        self._cond = threading.Condition()
        self._reading = False
        self._sock = self._connect(path)
        self._frames = (None if self._sock is None else
                        FrameReader(self._sock, options.max_message_bytes * TRANSPORT_HEADROOM))
        self._sender: threading.Thread | None = None
        if self._sock is not None and self._monitor:
            self._sender = threading.Thread(target=self._send_queued, daemon=True,
                                            name="guard-host-doorbell-sender")
            self._sender.start()

    def _connect(self, path: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(path)
            sock.settimeout(None)  # blocking reads: one system call per reply
            config = self.shm.configure(stream_config(self.options))
            self._send(sock, pb.InspectRequest(config=config).SerializeToString(),
                       CONNECT_TIMEOUT_S)
        except OSError as exc:
            sock.close()
            self.connect_error = (f"cannot open a stream on the guard's doorbell socket "
                                  f"{path}: {exc.strerror or exc}")
            if self.shm.region is not None:
                self.shm.region.confirmed = False
            return None
        return sock

    def _send(self, sock: socket.socket, payload: bytes, timeout: float | None) -> None:
        """Send a frame on the blocking socket within ``timeout`` seconds (None: no limit):
        the kernel's send timeout (SO_SNDTIMEO, set only when it changes) bounds a send that
        finds the socket buffer full (the guard stuck), without making the reader's socket
        non-blocking. Raises OSError (TimeoutError or BlockingIOError past the time); the
        frame may then be cut short. Under the send lock."""
        seconds = 0.0 if timeout is None else max(timeout, 1e-3)
        if seconds != self._send_timeout:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6)))
            self._send_timeout = seconds
        deadline = None if timeout is None else time.monotonic() + seconds
        send_frame(sock, payload, deadline=deadline)

    def submit(self, item: BatchItem, timeout: float) -> ReplySlot | None:
        """INLINE: number the batch and write its frame; None when the stream has ended (or
        the frame could not be sent within ``timeout``: the stream is then reset)."""
        slot = ReplySlot()
        with self._send_lock:  # frames whole, in sequence order
            sock = self._sock
            if sock is None or self.finished.is_set() or not self._assign(item, slot):
                return None
            try:
                self._send(sock, item.to_request().SerializeToString(), timeout)
            except OSError as exc:  # TimeoutError included: a frame may be cut, so reset
                self._unassign(item)
                self.reset(f"sending a batch on the doorbell failed: {exc}")
                return None
        self.counters.add("sent")
        return slot

    def send_ended(self, item: EndItem) -> bool:
        """A RequestEnded: MONITOR queues it behind the batches; INLINE writes its frame now,
        within the client's deadline (no sequence number, no reply)."""
        if self._monitor:
            return self.outbox.offer(item)
        with self._send_lock:
            sock = self._sock
            if sock is None or self.finished.is_set():
                return False
            try:
                self._send(sock, item.to_request().SerializeToString(),
                           self.options.deadline_ms / 1e3)
            except OSError as exc:  # a frame may be cut, so reset
                self.reset(f"sending a RequestEnded on the doorbell failed: {exc}")
                return False
        return True

    def _send_queued(self) -> None:
        """MONITOR: the sender thread; numbers queued batches as they go (drops leave gaps)."""
        sock = self._sock
        assert sock is not None
        while (item := self.outbox.take(self.finished)) is not None:
            if isinstance(item, BatchItem):  # a RequestEnded takes no number, gets no reply
                self._number(item)
            with self._send_lock:
                try:
                    self._send(sock, item.to_request().SerializeToString(), None)
                except OSError as exc:
                    self.reset(f"sending a batch on the doorbell failed: {exc}")
                    return
            if isinstance(item, BatchItem):
                self.counters.add("sent")
        if not self.finished.is_set():  # closed and sent: the guard answers, then ends
            self._shutdown(socket.SHUT_WR)

    def reset(self, reason: str) -> None:
        """End the stream from this side; wakes the reader and any waiting sender."""
        if not self._reset_reason:
            self._reset_reason = reason
        self._shutdown(socket.SHUT_RDWR)

    def close_sending(self) -> None:
        """No more batches: MONITOR's sender sends what is queued first; then the guard
        answers what it has and ends the stream."""
        self.outbox.close()
        if self._sender is None:
            with self._send_lock:  # not in the middle of a frame
                self._shutdown(socket.SHUT_WR)

    def _shutdown(self, how: int) -> None:
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(how)

    def wait(self, slot: ReplySlot, timeout: float) -> bool:
        """INLINE: wait up to ``timeout`` seconds for the batch's reply; True once the slot
        is resolved. The caller reads the socket itself while no other thread does (saving
        a thread hand-off per round trip), handing every reply it reads to its slot; while
        another reads, it waits to be handed its own or to take over."""
        if self._monitor or self._sock is None:
            return slot.done.wait(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._reading and not slot.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if slot.done.is_set() or self.finished.is_set():
                return slot.done.is_set()
            self._reading = True
        try:
            while not slot.done.is_set():
                if not self._read_frame(deadline):
                    break
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
        return slot.done.is_set()

    def read(self, on_reply: ReplyHandler) -> str:
        """The client thread, until the stream ends; returns why it ended. MONITOR: it reads
        every reply. INLINE: callers read their replies (:meth:`wait`); this thread waits for
        the guard to close the stream (or for a reset), then reads what is left."""
        sock = self._sock
        if sock is None:
            self._end(self.connect_error)
        elif self._monitor:
            while self._read_frame(None):
                pass
        else:
            _wait_closed(sock, self.finished)
            with self._cond:  # take over from any caller still reading
                while self._reading and not self.finished.is_set():
                    self._cond.wait()
                self._reading = not self.finished.is_set()
            if self._reading:
                while self._read_frame(None):
                    pass
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()
        if sock is not None:
            self._shutdown(socket.SHUT_RDWR)  # wakes a sender waiting for room
            if self._sender is not None:
                self._sender.join()
            with self._cond:
                while self._reading:  # a caller still inside a read: it sees the shutdown
                    self._cond.wait()
            with self._send_lock:
                sock.close()
        return self.end_reason

    def _read_frame(self, deadline: float | None) -> bool:
        """Read and hand on one frame (only the thread that holds the reading role); False
        once the stream has ended or ``deadline`` passed."""
        frames = self._frames
        assert frames is not None  # a stream that never connected has no reader
        try:
            payload = frames.read(deadline)
            if payload is None:
                return self._end(self._reset_reason or "the guard ended the stream")
            frame = pb.DoorbellFrame.FromString(payload)
            kind = frame.WhichOneof("frame")
            if kind == "reply":
                self._received(frame.reply, self._on_reply)
                if not self._monitor:
                    with self._cond:  # a waiter's slot may be resolved now
                        self._cond.notify_all()
                return True
            if kind == "end":
                return self._end(self._reset_reason or stream_end_text(frame.end))
            raise FrameError("a DoorbellFrame with neither a reply nor an end")
        except TimeoutError:
            return False
        except (OSError, FrameError) as exc:
            return self._end(self._reset_reason
                             or f"the doorbell connection to the guard failed: {exc}")
        except Exception as exc:  # a client bug, or a frame protobuf cannot decode
            return self._end(self._failed_reading(
                "guard client failed reading a doorbell reply", exc))

    def _end(self, reason: str) -> bool:
        """The stream is over (the first reason stands, :meth:`StreamState._finish`), and
        every waiting thread is woken. False."""
        with self._cond:  # a waiter that wakes sees the stream ended and its slot resolved
            ended = self._finish(reason)
            self._cond.notify_all()
        if ended:
            self._shutdown(socket.SHUT_RDWR)
        return False

    def _stop_sending(self) -> None:
        self.outbox.wake()


def _wait_closed(sock: socket.socket, finished: threading.Event) -> None:
    """Block until the guard shuts its side down or the connection fails (POLLRDHUP, HUP,
    ERR: not when a reply arrives, which a caller reads), or the stream ended here."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    while not finished.is_set() and not poller.poll(1000):
        pass
