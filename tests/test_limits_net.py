"""Connection limits everywhere a peer can connect (issue 19, findings 5 to 7, and the idle
streams that locked every new host out): the /metrics endpoint, the doorbell, gRPC streams.

Each case runs real servers: ``guard serve`` as a subprocess where threads are counted from
``/proc``, a :class:`~guard.sidecar.server.GuardServer` on temp sockets otherwise. No timing
is asserted: waits are generous "eventually" deadlines."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from guard.config import parse_config
from guard.errors import ConfigError
from guard.sidecar.admission import peer_key
from guard.sidecar.server import HEALTH_WORKERS
from guard.telemetry.metrics_http import MetricsServer
from guard.v1 import guard_pb2 as pb
from guard.wire.framing import FrameReader, send_frame
from tests.conftest import StreamClient, make_batch, make_config
from tests.sidecar import Sidecar, parse_prometheus, poll
from tests.test_doorbell import Doorbell, code_name, doorbell_of, guard_config
from tests.test_shm import serving

WAIT_S = 30.0


# -- helpers ----------------------------------------------------------------------------------


def threads_of(pid: int) -> int:
    """Threads of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


def half_sent(address: str, count: int) -> list[socket.socket]:
    """``count`` connections to ``host:port``, each with a request cut before its end."""
    host, port = address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: guard\r\nX-Slow: ")
        sockets.append(sock)
    return sockets


def scrape(address: str, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the peer closes (True) or WAIT_S passes (False); data is dropped."""
    sock.settimeout(WAIT_S)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True
    return True


@contextlib.contextmanager
def metrics_server(**limits: Any) -> Iterator[MetricsServer]:
    registry = CollectorRegistry(auto_describe=True)
    Counter("guard_test_scrapes", "a counter for the test", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0, **limits)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=WAIT_S).status)


def open_stream(address: str) -> tuple[grpc.Channel, StreamClient]:
    """An Inspect stream that has been answered once (so the guard holds its slot)."""
    channel = grpc.insecure_channel(address)
    client = StreamClient(channel)
    client.configure()
    assert client.ask(make_batch()).action == pb.ACTION_CONTINUE
    return channel, client


def refused(address: str) -> grpc.RpcError:
    """The status that ends a stream the guard refuses."""
    with grpc.insecure_channel(address) as channel:
        client = StreamClient(channel)
        client.configure()
        with pytest.raises(grpc.RpcError) as caught:
            client.ask(make_batch())
        client.close()
    return caught.value


# -- /metrics -------------------------------------------------------------------------------


def test_half_sent_metrics_requests_cost_no_thread_and_leave_scrapes_and_inspect_answering(
        tmp_path: Path, sae_dir: Path) -> None:
    """Finding 5: each half-sent request used to hold a thread of its own, for ever."""
    config = {"server": {"drain_grace_seconds": 0}, "logging": {"level": "info"},
              "saes": [{"path": str(sae_dir), "features": "all"}],
              "plugins": {"autoload": False, "watch_interval_seconds": 0},
              "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False}}
    guard = Sidecar(tmp_path / "guard", config, tag="lim").start()
    try:
        assert guard.process is not None
        pid = guard.process.pid
        address = guard.metrics_address()
        assert scrape(address)[0] == 200
        before = threads_of(pid)
        slow = half_sent(address, 120)
        try:
            status, body = scrape(address)  # accepted after every half-sent one
            assert status == 200
            assert any(name.startswith("guard_") for name, _, _ in
                       parse_prometheus(body.decode()))
            assert threads_of(pid) <= before + 2, "half-sent requests started threads"
            with grpc.insecure_channel(guard.address) as channel:
                client = StreamClient(channel)
                client.configure()
                assert client.ask(make_batch()).action == pb.ACTION_CONTINUE
                client.close()
            assert health_status(guard.address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            for sock in slow:
                sock.close()
    finally:
        guard.stop()


def test_metrics_connections_over_the_cap_start_no_thread_and_a_scrape_gets_through() -> None:
    with metrics_server(max_connections=4) as server:
        before = threading.active_count()
        slow = half_sent(server.address, 40)
        try:
            status, body = scrape(server.address)
            assert status == 200
            assert b"guard_test_scrapes_total 3.0" in body
            assert threading.active_count() == before
            assert server.connections <= 4
            assert server.dropped >= 40 - 4
        finally:
            for sock in slow:
                sock.close()


def test_a_slow_metrics_client_is_dropped_after_the_timeout() -> None:
    with metrics_server(timeout=0.5) as server:
        (slow,) = half_sent(server.address, 1)
        with slow:
            assert closed_by_peer(slow), "a half-sent request was kept open"
        assert scrape(server.address)[0] == 200


def test_the_metrics_endpoint_serves_only_get_of_metrics_within_its_size_limit() -> None:
    with metrics_server(max_request_bytes=1024) as server:
        status, body = scrape(server.address, "/")
        assert status == 200 and b"guard_test_scrapes_total" in body
        status, body = scrape(server.address, "/metrics", method="HEAD")
        assert status == 200 and body == b""
        assert scrape(server.address, "/other")[0] == 404
        assert scrape(server.address, "/metrics", method="POST")[0] == 405
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * 4096 + b"\r\n")
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 431 ")
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")


def test_a_port_in_use_is_a_listen_error() -> None:
    from guard.errors import ListenError
    from guard.telemetry.setup import _prometheus

    with metrics_server() as server, pytest.raises(
            ListenError, match=r"telemetry\.metrics_listen: cannot listen on"):
        _prometheus(server.address, telemetry=None)  # type: ignore[arg-type]


# -- the doorbell ---------------------------------------------------------------------------


def test_a_frame_header_costs_memory_only_for_the_bytes_that_come() -> None:
    """Finding 6: a 4-byte header announcing 64 MiB used to allocate 64 MiB at once."""
    left, right = socket.socketpair()
    with left, right:
        reader = FrameReader(right, 64 * 1024 * 1024)
        left.sendall((64 * 1024 * 1024 - 1).to_bytes(4, "little") + b"only a few bytes")
        tracemalloc.start()
        try:
            with pytest.raises(TimeoutError):
                reader.read(deadline=time.monotonic() + 0.2)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024, f"a frame header cost {peak} bytes"


def test_large_frames_still_arrive_whole_between_small_ones() -> None:
    left, right = socket.socketpair()
    with left, right:
        reader = FrameReader(right, 8 * 1024 * 1024)
        big = os.urandom(3 * 1024 * 1024 + 7)

        def write() -> None:
            send_frame(left, b"first")
            send_frame(left, big)
            send_frame(left, b"last")
            left.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        assert reader.read() == b"first"
        assert reader.read() == big
        assert reader.read() == b"last"
        assert reader.read() is None
        writer.join(WAIT_S)


def test_doorbell_refusals_start_no_thread(tmp_path: Path, sae_dir: Path) -> None:
    """Finding 7: each refused connection used to get a thread of its own (1,273 seen)."""
    with serving(guard_config(tmp_path, sae_dir, max_concurrent_rpcs=2)) as server:
        path = doorbell_of(server)
        held = [Doorbell(path) for _ in range(2)]
        for bell in held:
            bell.configure()
            assert bell.ask(make_batch()).action == pb.ACTION_CONTINUE
        before = threading.active_count()
        extra = []
        for _ in range(30):
            bell = Doorbell(path)
            extra.append(bell)
            frame = bell.next()  # the refusal; the host has not closed its end
            assert frame is not None and code_name(frame.end) == "RESOURCE_EXHAUSTED"
            assert "server.max_concurrent_rpcs" in frame.end.message
            assert threading.active_count() == before, "a refusal started a thread"
        for bell in extra + held:
            bell.close()


def test_the_doorbell_acceptor_survives_a_thread_that_cannot_start(
        tmp_path: Path, sae_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: the accept thread died for good on ``can't start new thread``."""
    real_start = threading.Thread.start

    def no_stream_threads(thread: threading.Thread) -> None:
        if thread.name.startswith("guard-doorbell-") and thread.name[15:].isdigit():
            raise RuntimeError("can't start new thread")
        real_start(thread)

    with serving(guard_config(tmp_path, sae_dir)) as server:
        path = doorbell_of(server)
        assert server.doorbell is not None
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", no_stream_threads)
            for _ in range(3):
                end = Doorbell(path).ended()
                assert code_name(end) == "RESOURCE_EXHAUSTED"
                assert "cannot start a thread" in end.message
        assert server.doorbell.acceptor.is_alive()
        assert server.doorbell.streams == 0 and server.doorbell.slots.total == 0
        bell = Doorbell(path)  # threads start again: served as before
        bell.configure()
        assert bell.ask(make_batch()).action == pb.ACTION_CONTINUE
        bell.finish()
    said = [r.getMessage() for r in caplog.records
            if "doorbell cannot start a thread" in r.getMessage()]
    assert len(said) == 1, said  # once per episode
    assert any("doorbell streams start again" in r.getMessage() for r in caplog.records)


def test_the_doorbell_caps_streams_per_uid(tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir, max_concurrent_rpcs=8, max_streams_per_peer=2)
    with serving(config) as server:
        path = doorbell_of(server)
        held = [Doorbell(path) for _ in range(2)]
        for bell in held:
            bell.configure()
            assert bell.ask(make_batch()).action == pb.ACTION_CONTINUE
        end = Doorbell(path).ended()
        assert code_name(end) == "RESOURCE_EXHAUSTED"
        assert f"peer uid {os.getuid()} holds 2 doorbell streams" in end.message
        assert "server.max_streams_per_peer" in end.message
        held[0].finish()
        poll(lambda: server.doorbell is not None and server.doorbell.streams == 1, WAIT_S,
             "the finished stream to close")
        later = Doorbell(path)
        later.configure()
        assert later.ask(make_batch()).action == pb.ACTION_CONTINUE
        later.finish()
        held[1].finish()


def test_an_idle_doorbell_stream_is_ended_with_unavailable(tmp_path: Path, sae_dir: Path
                                                            ) -> None:
    with serving(guard_config(tmp_path, sae_dir, stream_idle_seconds=0.5)) as server:
        bell = Doorbell(doorbell_of(server))
        bell.configure()
        assert bell.ask(make_batch()).action == pb.ACTION_CONTINUE
        end = bell.ended()  # nothing more is sent
        assert code_name(end) == "UNAVAILABLE"
        assert "idle for 0.5 s" in end.message and "server.stream_idle_seconds" in end.message


# -- gRPC streams -----------------------------------------------------------------------------


def test_an_idle_grpc_stream_is_ended_and_a_busy_one_is_not(tmp_path: Path, sae_dir: Path
                                                             ) -> None:
    config = make_config(tmp_path, sae_dir, stream_idle_seconds=2.0, drain_grace_seconds=0)
    with serving(config) as server, grpc.insecure_channel(server.addresses[0]) as channel:
        busy = StreamClient(channel)
        busy.configure()
        idle = StreamClient(channel)
        idle.configure()
        assert idle.ask(make_batch()).action == pb.ACTION_CONTINUE
        ended: list[grpc.RpcError] = []

        def wait_for_the_end() -> None:
            try:
                idle.next()
            except grpc.RpcError as exc:
                ended.append(exc)

        waiter = threading.Thread(target=wait_for_the_end)
        waiter.start()
        sequence = 0
        deadline = time.monotonic() + WAIT_S
        while waiter.is_alive():  # the busy stream asks on until the idle one is ended
            assert time.monotonic() < deadline, "the idle stream was never ended"
            sequence += 1
            assert busy.ask(make_batch(sequence=sequence)).action == pb.ACTION_CONTINUE
            time.sleep(0.05)
        (error,) = ended
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "idle for 2 s" in str(error.details())
        assert "server.stream_idle_seconds" in str(error.details())
        assert busy.ask(make_batch(sequence=sequence + 1)).action == pb.ACTION_CONTINUE
        busy.close()
        idle.close()


def test_one_tcp_peer_cannot_take_every_stream(tmp_path: Path, sae_dir: Path) -> None:
    config = make_config(tmp_path, sae_dir, tcp_listen="127.0.0.1:0", max_concurrent_rpcs=8,
                         max_streams_per_peer=2, drain_grace_seconds=0)
    with serving(config) as server:
        tcp = server.addresses[1]
        opened = [open_stream(tcp) for _ in range(2)]
        error = refused(tcp)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "peer ipv4:127.0.0.1 holds 2 streams" in (error.details() or "")
        assert "server.max_streams_per_peer" in (error.details() or "")
        channel, client = open_stream(server.addresses[0])  # another peer: the Unix socket
        client.close()
        channel.close()
        first_channel, first = opened.pop(0)
        first.rest()
        first_channel.close()
        poll(lambda: server.slots.held("ipv4:127.0.0.1") == 1, WAIT_S, "the slot to be free")
        opened.append(open_stream(tcp))
        for each_channel, each in opened:
            each.close()
            each_channel.close()


def test_health_answers_on_the_main_socket_when_every_stream_slot_is_taken(
        tmp_path: Path, sae_dir: Path) -> None:
    """64 idle streams used to lock out every new host and the main socket's health."""
    config = make_config(tmp_path, sae_dir, max_concurrent_rpcs=3, max_streams_per_peer=0,
                         health_listen="127.0.0.1:0", drain_grace_seconds=0)
    with serving(config) as server:
        address = server.addresses[0]
        opened = [open_stream(address) for _ in range(3)]
        error = refused(address)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 3 streams (server.max_concurrent_rpcs)" in (error.details() or "")
        for _ in range(2 * 4):  # more checks than the reserve: each ends before the next
            assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        # On the health-only listener, Watch streams cannot take every worker either.
        with grpc.insecure_channel(server.health_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            first = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            assert next(first).status == health_pb2.HealthCheckResponse.SERVING
            for _ in range(HEALTH_WORKERS):  # the rest of the workers stay for Check
                with pytest.raises(grpc.RpcError) as caught:
                    next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT_S))
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "health Watch calls" in str(caught.value.details())
                assert health_status(server.health_address) == (
                    health_pb2.HealthCheckResponse.SERVING)
            first.cancel()
        for channel_, client in opened:
            client.close()
            channel_.close()


def test_peer_keys() -> None:
    assert peer_key("ipv4:10.1.2.3:5678") == "ipv4:10.1.2.3"
    assert peer_key("ipv6:[::1]:5678") == "ipv6:[::1]"
    assert peer_key("unix:") == "unix"
    assert peer_key("unix:/tmp/x.sock") == "unix"
    assert peer_key("something") == "something"


def test_config_limits_keys_and_errors() -> None:
    config = parse_config("server: {max_streams_per_peer: 0, stream_idle_seconds: 0}\n",
                          env={})
    assert config.server.max_streams_per_peer == 0
    assert config.server.stream_idle_seconds == 0
    defaults = parse_config("{}\n", env={}).server
    assert (defaults.max_streams_per_peer, defaults.stream_idle_seconds) == (32, 300.0)
    with pytest.raises(ConfigError, match=r"server\.max_streams_per_peer: expected a whole "
                                          r"number of streams >= 0"):
        parse_config("server: {max_streams_per_peer: -1}\n", env={})
    with pytest.raises(ConfigError, match=r"server\.stream_idle_seconds: expected a number "
                                          r">= 0"):
        parse_config("server: {stream_idle_seconds: -5}\n", env={})
