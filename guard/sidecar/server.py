"""The gRPC server: Inspect and Describe, health checking, reflection, graceful drain.

Sync grpcio with a thread per RPC: bench/RESULTS.md has the sync-versus-asyncio numbers that
chose it. The health service reports NOT_SERVING until the engine (SAEs, and later
plugins) is loaded, and again as soon as a drain begins.

Security: the Unix socket is created with ``server.socket_mode`` (0660) under a process umask
set around the bind, so it is never connectable by others, not even for an instant; a folder
the guard creates for it is 0750. An existing socket file is replaced only when stale (a
connection to it is refused): a live one, a guard already serving there, stops the start
(:func:`clear_stale_socket`). TCP listeners serve TLS, or mutual TLS, when
``server.tls`` is set (plaintext TCP stays allowed, with a warning off loopback); the
health-only listener stays plaintext for the kubelet's gRPC probes.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import ipaddress
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guard import __version__
from guard.config import TRANSPORT_HEADROOM, GuardConfig, ServerConfig
from guard.engine.core import Engine
from guard.errors import InvalidInput, ListenError, NotReady
from guard.sidecar.admission import (
    HEALTH_RESERVE,
    AdmissionInterceptor,
    IdleReaper,
    StreamSlots,
    end_call,
)
from guard.sidecar.doorbell import DoorbellServer
from guard.sidecar.session import PROTOCOL_VERSION, InspectStream, StreamEnded, StreamLimits
from guard.sidecar.status import status_code
from guard.sidecar.threads import StartedPool, start_thread
from guard.telemetry.instruments import extract_context
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Guard"].full_name
#: Threads of the health-only listener (``server.health_listen``): probes are few and quick.
HEALTH_WORKERS = 2
#: Seconds past the drain grace that stop() waits for gRPC to finish its shutdown.
STOP_MARGIN_S = 10.0
#: Seconds a start-up probe of an existing socket file waits to be accepted (a live but busy
#: listener makes it wait; a stale file refuses at once).
LIVE_PROBE_TIMEOUT_S = 2.0
T = TypeVar("T")


def socket_path(address: str) -> Path | None:
    """The filesystem path of a ``unix:`` address, or None for TCP."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:"):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def is_loopback(address: str) -> bool:
    """True for a TCP ``host:port`` on loopback (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or empty (every interface)


def server_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """gRPC credentials of ``server.tls`` (None when TLS is off); client certificates are
    required and verified against ``client_ca_file`` when it is set."""
    tls = server.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    try:
        key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
        client_ca = None if tls.client_ca_file is None else tls.client_ca_file.read_bytes()
    except OSError as exc:
        raise ListenError(f"server.tls: cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def clear_stale_socket(path: Path, what: str) -> None:
    """Remove the socket file at ``path`` when nobody listens on it (left by a killed guard);
    refuse (:class:`ListenError`, ``what`` first) when it is live, rather than unlink it and
    silently take the address over from the process serving it.

    Live: a connection to it is accepted, or waits (its backlog is full: it is busy). Stale:
    the connection is refused. Anything else (no permission to connect) cannot be told apart
    and is refused too. A path that is not a socket is left for the bind to fail on."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(LIVE_PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: nobody accepts connections on it
        return
    except OSError as exc:  # a timeout (a full backlog: live and busy), no permission
        reason = exc.strerror or "timed out"
        raise ListenError(f"{what}: cannot tell whether the socket {path} is in use "
                          f"({reason}); refusing to replace it: stop the process serving it, "
                          "or remove the file if it is stale") from exc
    finally:
        probe.close()
    raise ListenError(f"{what}: the socket {path} is live (a process accepts connections on "
                      "it: another guard?); refusing to take it over: stop that process, or "
                      "give this guard another path")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The process umask set to ``mask`` for the block (process-wide: used only around the
    bind, before the engine's threads exist)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"server.socket_group: no group named {group!r}") from None


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the expected message (gRPC hands it on instead of
    failing the call itself: see :func:`_tolerant`)."""

    reason: str


def _tolerant(message: type[T]) -> Callable[[bytes], T | Undecodable]:
    """A request deserializer that never raises. grpcio answers a deserializer's exception
    with INTERNAL "Exception deserializing request!", and (grpcio 1.85) that call then never
    leaves the server's books, so ``server.stop()`` waited forever: one malformed message
    from any peer blocked every later drain. The servicer rejects an :class:`Undecodable`
    itself, with INVALID_ARGUMENT naming what was expected."""

    def parse(raw: bytes) -> T | Undecodable:
        try:
            return message.FromString(raw)  # type: ignore[attr-defined, no-any-return]
        except Exception as exc:  # protobuf's DecodeError, or anything a bad buffer raises
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return parse


def add_to_server(servicer: GuardServicer, server: grpc.Server) -> None:
    """Register ``guard.v1.Guard`` (as the generated function does, with tolerant request
    deserializers)."""
    handlers = {
        "Inspect": grpc.stream_stream_rpc_method_handler(
            servicer.Inspect, request_deserializer=_tolerant(pb.InspectRequest),
            response_serializer=pb.InspectResponse.SerializeToString),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=_tolerant(pb.DescribeRequest),
            response_serializer=pb.DescribeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # The faster lookup the generated code also registers (grpc-stubs do not know it yet).
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def _not_a(message: str, number: int, undecodable: Undecodable) -> str:
    return (f"message {number} on this call is not a {message} (protobuf could not decode "
            f"its bytes: {undecodable.reason}); check that the host speaks guard.v1")


class GuardServicer(pb_grpc.GuardServicer):
    """Serves guard.v1.Guard; answers UNAVAILABLE until an engine is set."""

    def __init__(self, config: GuardConfig) -> None:
        self._config = config
        #: Continuous-batching limits of every stream (the doorbell's too).
        self.limits = StreamLimits.of(config.server)
        self.engine: Engine | None = None
        #: The doorbell socket's path, once it listens (Describe names it).
        self.doorbell_path = ""
        #: Ends idle Inspect streams (``server.stream_idle_seconds``); None: never.
        self.idle: IdleReaper | None = None

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady("the guard is starting (loading SAEs and plugins); retry when the "
                           "health service reports SERVING")
        return self.engine

    def Inspect(
        self, request_iterator: Iterator[pb.InspectRequest | Undecodable],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.InspectResponse]:
        try:
            engine = self._ready_engine()
        except NotReady as exc:
            context.abort(status_code(exc), str(exc))
        parent = None
        if engine.instruments.tracer is not None:  # W3C trace context of the host's call
            parent = extract_context(context.invocation_metadata())
        stream = InspectStream(engine, self._config.server.max_message_bytes, context.peer(),
                               parent, shared_memory=self._config.server.shared_memory,
                               alive=context.is_active, limits=self.limits)
        idle = self.idle
        watch = None if idle is None else idle.watch(
            functools.partial(end_call, context, grpc.StatusCode.UNAVAILABLE))
        requests = request_iterator if watch is None else watch.requests(request_iterator)
        try:
            for number, request in enumerate(requests, 1):
                if isinstance(request, Undecodable):
                    raise StreamEnded(InvalidInput(_not_a("guard.v1.InspectRequest", number,
                                                          request)))
                reply = stream.handle(request)
                if reply is not None:
                    yield reply
                    stream.after_reply()  # the reply is sent: telemetry costs no latency
        except StreamEnded as ended:
            log.info("stream ended by the guard", peer=stream.peer, code=ended.code.name,
                     reason=ended.details)
            context.abort(ended.code, ended.details)
        finally:
            if idle is not None and watch is not None:
                idle.forget(watch)
                if watch.expired:
                    log.info("stream ended by the guard", peer=stream.peer, code="UNAVAILABLE",
                             reason=idle.message)
            stream.close()
            counters = stream.counters
            log.info("stream closed", peer=stream.peer, mode=stream.mode,
                     batches=counters.batches, rows=counters.rows, rejected=counters.rejected,
                     skipped_sequences=counters.skipped_sequences,
                     requests_ended=counters.requests_ended,
                     requests_unknown=counters.requests_unknown,
                     requests_evicted=counters.requests_evicted)

    def Describe(
        self, request: pb.DescribeRequest | Undecodable, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          _not_a("guard.v1.DescribeRequest", 1, request))
        try:
            engine = self._ready_engine()
        except NotReady as exc:
            context.abort(status_code(exc), str(exc))
        response = pb.DescribeResponse(
            protocol_version=PROTOCOL_VERSION,
            guard_version=__version__,
            hooks=sorted(engine.hooks),
            max_message_bytes=self._config.server.max_message_bytes,
            datatypes=list(codec.DATATYPES),
            max_segments_per_batch=self.limits.max_segments,
            max_requests_per_stream=self.limits.max_requests,
        )
        shared_memory = self._config.server.shared_memory
        if shared_memory.enabled:
            response.shared_memory_dirs.extend(shared_memory.allowed_dirs)
            response.shared_memory_doorbell = self.doorbell_path
        for name in sorted(engine.hooks):
            runtime = engine.hooks[name]
            info = runtime.info
            response.saes.add(
                hook=name,
                d_in=info.d_in,
                d_sae=info.d_sae,
                architecture=info.architecture,
                sha256=info.sha256,
                execution_provider=runtime.execution_provider,
                source=info.source_format,
                weight_dtype=info.weight_dtype,
                neuronpedia_id=info.neuronpedia_id or "",
                label_count=len(info.feature_labels),
                hook_out=(info.hook_name_out or "(not named)") if info.d_out else "",
                d_out=info.d_out or 0,
            )
            sub = runtime.subscription
            response.subscriptions.add(
                hook=name, feature_ids=sub.feature_ids, all_features=sub.all_features
            )
        for plugin, version in engine.plugins.items():
            response.plugins.add(name=plugin, version=version)
        return response


def _executor(pool: StartedPool) -> futures.ThreadPoolExecutor:
    """``pool`` as grpcio's stubs type its executor argument (any Executor works)."""
    return cast("futures.ThreadPoolExecutor", pool)


def _started_threads(start: Callable[[], None]) -> list[threading.Thread]:
    """Call ``start`` and return the threads it started (grpcio's serving loop: it keeps no
    public handle on it)."""
    before = set(threading.enumerate())
    start()
    return [thread for thread in threading.enumerate() if thread not in before]


class GuardServer:
    """The guard's gRPC server(s): start, mark ready, drain and stop."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        server_config = config.server
        transport_limit = server_config.max_message_bytes * TRANSPORT_HEADROOM
        options = [
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", transport_limit),
            ("grpc.so_reuseport", 0),
        ]
        # Every RPC but the health service's Check counts against max_concurrent_rpcs (the
        # interceptor); grpcio's limit and the pool keep HEALTH_RESERVE more for Check.
        workers = server_config.max_concurrent_rpcs + HEALTH_RESERVE
        self.slots = StreamSlots(server_config.max_concurrent_rpcs,
                                 server_config.max_streams_per_peer)
        self._server = grpc.server(
            _executor(StartedPool(workers, "guard-rpc", "server.max_concurrent_rpcs")),
            options=options,
            maximum_concurrent_rpcs=workers,
            interceptors=[AdmissionInterceptor(self.slots)],
        )
        self.servicer = GuardServicer(config)
        self.health = health.HealthServicer()
        add_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if server_config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self._health_server: grpc.Server | None = None
        if server_config.health_listen:
            # A Watch holds a worker for as long as its peer likes: at most all but one.
            watches = StreamSlots(HEALTH_WORKERS - 1, 0, "health Watch calls",
                                  f"the health listener's {HEALTH_WORKERS} threads")
            self._health_server = grpc.server(
                _executor(StartedPool(HEALTH_WORKERS, "guard-health", "server.health_listen")),
                maximum_concurrent_rpcs=4 * HEALTH_WORKERS,
                interceptors=[AdmissionInterceptor(watches)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.addresses: list[str] = []
        self.health_address = ""
        self._sockets: list[Path] = []
        self._stopped = threading.Event()
        self._credentials: grpc.ServerCredentials | None = None
        self.doorbell: DoorbellServer | None = None
        #: The threads that run each server's loop (grpcio's), for the watchdog.
        self.serving_threads: dict[str, list[threading.Thread]] = {}

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def _bind(self, server: grpc.Server, address: str, *, secure: bool = False) -> str:
        """Listen on ``address``; ``secure``: with the TLS credentials when TCP and set."""
        path = socket_path(address)
        if path is not None:
            self._prepare_socket_folder(path.parent)
            clear_stale_socket(path, f"cannot listen on {address!r}")
            self._sockets.append(path)
        credentials = self._credentials if secure and path is None else None
        mode = self.config.server.socket_mode
        try:
            # gRPC creates the socket file in add_*_port: the umask gives it its final mode
            # at creation (a chmod afterwards would leave a window with the default mode).
            with _umask(0o777 & ~mode) if path is not None else contextlib.nullcontext():
                if credentials is not None:
                    port = server.add_secure_port(address, credentials)
                else:
                    port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address!r}: {exc}") from exc
        if path is not None:
            self._secure_socket(path)
            return f"unix://{path}"
        if credentials is None and not is_loopback(address) and server is self._server:
            log.warning("TCP listener without TLS off loopback: activations cross the network "
                        "in clear text; set server.tls (cert_file, key_file, client_ca_file)",
                        address=address)
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    @staticmethod
    def _prepare_socket_folder(folder: Path) -> None:
        """Create the socket's folder 0750 if missing; warn when others may replace files in
        it (world-writable without the sticky bit)."""
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o750, exist_ok=True)
            return
        mode = folder.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            log.warning("the socket's folder is writable by every user: another process could "
                        "replace the socket; use a folder only the guard and its host can "
                        "write", folder=str(folder), mode=oct(stat.S_IMODE(mode)))

    def _secure_socket(self, path: Path) -> None:
        """The socket's exact mode (a umask can only clear bits) and ``server.socket_group``."""
        server_config = self.config.server
        try:
            if server_config.socket_group:
                os.chown(path, -1, _group_id(server_config.socket_group))
            if stat.S_IMODE(path.stat().st_mode) != server_config.socket_mode:
                path.chmod(server_config.socket_mode)
        except OSError as exc:
            raise ListenError(f"cannot set the owner group or mode of the socket {path} "
                              f"(server.socket_group, server.socket_mode): {exc.strerror}"
                              ) from exc

    def start(self) -> list[str]:
        """Bind and start serving (NOT_SERVING until :meth:`set_ready`); returns addresses."""
        server_config = self.config.server
        self._credentials = server_credentials(server_config)
        self.addresses.append(self._bind(self._server, server_config.listen, secure=True))
        if server_config.tcp_listen:
            self.addresses.append(self._bind(self._server, server_config.tcp_listen,
                                             secure=True))
        self._bind_doorbell()  # before gRPC's threads run: the bind changes the process umask
        self.serving_threads["grpc server"] = _started_threads(self._server.start)
        if self.doorbell is not None:
            self.doorbell.start()
        if server_config.stream_idle_seconds > 0:
            reaper = IdleReaper(server_config.stream_idle_seconds)
            start_thread(reaper.thread, "server.stream_idle_seconds (the idle stream check)")
            self.servicer.idle = reaper
        if self._health_server is not None:
            self.health_address = self._bind(self._health_server, server_config.health_listen)
            self.serving_threads["health listener"] = _started_threads(
                self._health_server.start)
        tls = server_config.tls
        log.info("listening", addresses=self.addresses, health=self.health_address or None,
                 doorbell=self.servicer.doorbell_path or None,
                 tls=("mutual" if tls.mutual else "server") if tls.enabled else None,
                 socket_mode=oct(server_config.socket_mode), pid=os.getpid())
        return self.addresses

    def doorbell_socket(self) -> Path | None:
        """Where the doorbell listens: ``server.shared_memory.doorbell_socket``, or beside the
        Unix listener; None when it is off (shared memory or the doorbell disabled, or no Unix
        socket folder to put it in)."""
        shared_memory = self.config.server.shared_memory
        if not (shared_memory.enabled and shared_memory.doorbell):
            return None
        if shared_memory.doorbell_socket:
            return Path(shared_memory.doorbell_socket)
        listen = socket_path(self.config.server.listen)
        return None if listen is None else listen.with_name(listen.name + ".doorbell")

    def _bind_doorbell(self) -> None:
        """Bind the doorbell's Unix socket (the gRPC socket's mode and group); :meth:`start`
        then serves it."""
        path = self.doorbell_socket()
        if path is None:
            shared_memory = self.config.server.shared_memory
            if shared_memory.enabled and shared_memory.doorbell:
                log.info("no doorbell: server.listen is not a Unix socket and "
                         "server.shared_memory.doorbell_socket is not set; shared-memory "
                         "batches go over gRPC")
            return
        self._prepare_socket_folder(path.parent)
        clear_stale_socket(path, f"cannot listen on the doorbell socket {path} "
                                 "(server.shared_memory.doorbell_socket)")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _umask(0o777 & ~self.config.server.socket_mode):
                listener.bind(str(path))
            self._sockets.append(path)
            self._secure_socket(path)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise ListenError(f"cannot listen on the doorbell socket {path} "
                              f"(server.shared_memory.doorbell_socket): {exc.strerror}") from exc
        except BaseException:
            listener.close()
            raise
        frame_limit = self.config.server.max_message_bytes * TRANSPORT_HEADROOM
        self.doorbell = DoorbellServer(listener, str(path), self.config, self.servicer,
                                       frame_limit)
        self.servicer.doorbell_path = str(path)

    def set_ready(self, engine: Engine) -> None:
        """Serve this engine and report SERVING."""
        self.servicer.engine = engine
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", hooks=sorted(engine.hooks), addresses=self.addresses)

    def critical_threads(self) -> dict[str, threading.Thread]:
        """Threads besides gRPC's loops whose end leaves the guard deaf: the doorbell's
        acceptor (the watchdog watches these and :attr:`serving_threads`)."""
        return {} if self.doorbell is None else {"doorbell acceptor": self.doorbell.acceptor}

    def fail(self) -> None:
        """A part of the guard died: NOT_SERVING on every health listener at once."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.enter_graceful_shutdown()

    def close_engine(self) -> None:
        """Deliver every accepted record to its sinks and shut the plugins down."""
        if self.servicer.engine is not None:
            self.servicer.engine.close()

    def remove_sockets(self) -> None:
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then let in-flight streams finish within ``grace`` seconds."""
        if self._stopped.is_set():
            return
        grace = self.config.server.drain_grace_seconds if grace is None else grace
        log.info("draining", grace_seconds=grace)
        self.health.enter_graceful_shutdown()
        stopped = self._server.stop(grace)
        if self.doorbell is not None:  # its streams drain beside the gRPC ones
            self.doorbell.stop(grace)
        if not stopped.wait(grace + STOP_MARGIN_S):
            # gRPC's shutdown is stuck on a call it never finished: drain the records anyway.
            log.error("gRPC server did not finish shutting down; going on with the drain",
                      waited_s=grace + STOP_MARGIN_S)
        if self.servicer.idle is not None:
            self.servicer.idle.stop()
        self.close_engine()  # every accepted record reaches its sinks
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        self.remove_sockets()
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
