"""The Prometheus endpoint of ``telemetry.metrics_listen``: a small HTTP server with limits.

prometheus_client's ``start_http_server`` starts a thread per connection, with no cap and no
timeout on a request's headers: 400 half-sent requests under a pids limit left gRPC unable to
start threads for good (issue 19, issue 21). This server is one thread and a selector, fixed
at start-up, whatever its peers do:

- at most ``max_connections`` connections at a time; a new one past that evicts the oldest
  connection still sending its request (a real scrape sends its request at once, so half-sent
  requests cannot keep it out), or is closed at once when every connection is being answered;
- a connection has ``timeout`` seconds to send its request and take the reply, then it is
  closed (slowloris);
- a request line and headers of more than ``max_request_bytes`` get 431 and the connection is
  closed; only ``GET`` (or ``HEAD``) of ``/metrics`` or ``/`` is served (404, 405, 400
  otherwise), one request per connection (``Connection: close``), no compression;
- the exposition (``prometheus_client.generate_latest``, text format 0.0.4) is generated at
  most once per ``min_interval`` seconds: requests that come in the meantime wait for the
  next one and share it (never a stale copy), so a flood of scrapes costs the guard's hot
  path at most a few generations a second.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Final

import structlog
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

#: Connections open at once.
MAX_CONNECTIONS: Final = 16
#: Seconds a connection has to send its request and take the reply.
TIMEOUT_S: Final = 5.0
#: Bytes of request line and headers.
MAX_REQUEST_BYTES: Final = 8192
#: The least time between two generations of the exposition.
MIN_INTERVAL_S: Final = 0.1
#: Paths that serve the exposition.
PATHS: Final = frozenset({"/metrics", "/"})
_BACKLOG: Final = 64
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found",
                   405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error"}


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    #: ``HEAD``: the reply has headers only.
    head: bool = False
    #: Waiting for the next generation of the exposition.
    waiting: bool = False
    #: What is left to send, once the reply is ready.
    reply: memoryview | None = None

    @property
    def reading(self) -> bool:
        return not self.waiting and self.reply is None


class MetricsServer:
    """Serves ``registry`` over HTTP on ``host:port`` (port 0: any free one) on one thread.

    Binding happens in the constructor (OSError when the address is taken); :meth:`start`
    starts the thread, :meth:`stop` ends it and closes every connection.
    """

    def __init__(self, registry: Collector, host: str, port: int, *,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT_S,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 min_interval: float = MIN_INTERVAL_S) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._timeout = timeout
        self._max_request_bytes = max_request_bytes
        self._min_interval = min_interval
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(_BACKLOG)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        bound_host, bound_port = self._listener.getsockname()[:2]
        #: ``host:port`` it listens on.
        self.address = f"{bound_host!s}:{bound_port}"
        self._connections: list[_Connection] = []
        self._next_generation = 0.0
        self._closing = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        #: Connections refused or evicted since start (full, timed out, too large).
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="guard-metrics", daemon=True)

    @property
    def connections(self) -> int:
        """Connections open now (read on the server's thread; a snapshot elsewhere)."""
        return len(self._connections)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        if self.thread.ident is not None:
            self.thread.join(5.0)
        if not self.thread.is_alive():
            self._close_all()

    def _close_all(self) -> None:
        for connection in list(self._connections):
            self._drop(connection)
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()
        self._selector.close()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        failing = False
        while not self._closing.is_set():
            try:
                for key, events in self._selector.select(self._wait()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(64)
                    elif events & selectors.EVENT_WRITE:
                        self._send(key.data)
                    else:
                        self._receive(key.data)
                self._answer_waiting()
                self._expire()
                failing = False
            except Exception:  # a bug: logged once, the endpoint goes on
                if not failing:
                    log.exception("metrics endpoint failed; going on")
                failing = True
                self._closing.wait(0.1)

    def _wait(self) -> float | None:
        """How long the selector may wait: the next deadline or generation."""
        if not self._connections:
            return None
        now = time.monotonic()
        due = min(c.deadline for c in self._connections)
        if any(c.waiting for c in self._connections):
            due = min(due, self._next_generation)
        return max(0.0, due - now)

    def _accept(self) -> None:
        for _ in range(_BACKLOG):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors: it waits in the backlog
                log.warning("metrics endpoint cannot accept a connection now",
                            error=exc.strerror or str(exc))
                return
            sock.setblocking(False)
            if len(self._connections) >= self._max_connections and not self._evict():
                self.dropped += 1
                sock.close()
                continue
            connection = _Connection(sock, time.monotonic() + self._timeout)
            self._connections.append(connection)
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request; False when none is."""
        reading = [c for c in self._connections if c.reading]
        if not reading:
            return False
        self.dropped += 1
        self._drop(min(reading, key=lambda c: c.deadline))
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self._connections if c.deadline <= now]:
            self.dropped += 1
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.remove(connection)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()

    # -- one request ------------------------------------------------------------------------

    def _receive(self, connection: _Connection) -> None:
        try:
            chunk = connection.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the peer left (or half-closed before a whole request)
            self._drop(connection)
            return
        connection.received += chunk
        end = connection.received.find(b"\r\n\r\n")
        if end < 0:
            end = connection.received.find(b"\n\n")
        if end < 0:
            if len(connection.received) > self._max_request_bytes:
                self._reply(connection, 431, b"request headers too large\n")
            return
        if end > self._max_request_bytes:
            self._reply(connection, 431, b"request headers too large\n")
            return
        self._route(connection, bytes(connection.received[:end]))

    def _route(self, connection: _Connection, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._reply(connection, 400, b"expected an HTTP/1.x request line\n")
            return
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            self._reply(connection, 405, b"only GET and HEAD are served\n",
                        extra=b"Allow: GET, HEAD\r\n")
            return
        path = target.split(b"?", 1)[0].decode("latin-1")
        if path not in PATHS:
            self._reply(connection, 404, b"the metrics are at /metrics\n")
            return
        connection.head = method == b"HEAD"
        connection.waiting = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)

    def _answer_waiting(self) -> None:
        """Generate the exposition for the requests waiting, when one is due."""
        waiting = [c for c in self._connections if c.waiting]
        now = time.monotonic()
        if not waiting or now < self._next_generation:
            return
        self._next_generation = now + self._min_interval
        try:
            body = generate_latest(self._registry)
        except Exception as exc:  # a collector failed: say so, keep serving
            log.warning("metrics exposition failed", error=type(exc).__name__, reason=str(exc))
            for connection in waiting:
                connection.waiting = False
                self._reply(connection, 500, b"the metrics could not be generated\n")
            return
        for connection in waiting:
            connection.waiting = False
            self._reply(connection, 200, body, content_type=CONTENT_TYPE_PLAIN_0_0_4)

    def _reply(self, connection: _Connection, status: int, body: bytes, *,
               content_type: str = "text/plain; charset=utf-8", extra: bytes = b"") -> None:
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra
        reply = head + b"\r\n" + (b"" if connection.head else body)
        connection.reply = memoryview(reply)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        self._selector.register(connection.sock, selectors.EVENT_WRITE, connection)
        self._send(connection)

    def _send(self, connection: _Connection) -> None:
        reply = connection.reply
        if reply is None:
            return
        try:
            sent = connection.sock.send(reply)
        except BlockingIOError:
            return
        except OSError:
            self._drop(connection)
            return
        connection.reply = reply[sent:]
        if not connection.reply:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_WR)
            self._drop(connection)
