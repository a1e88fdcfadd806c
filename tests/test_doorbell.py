"""The doorbell (issue #9, item 1's fast path): the Inspect stream framed on a plain Unix
socket, served by a real guard and driven by raw frames and by the host SDK.

Raw frames check the protocol (replies like gRPC's, StreamEnd where a gRPC status would end
the call, regions unmapped however a stream ends, limits); the SDK tests check that a client
with shared memory finds the doorbell through Describe, decides exactly as on gRPC, and keeps
its failure policy, deadlines and reconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard.cli import format_description
from guard.config import (
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    SaeConfig,
    ServerConfig,
    parse_config,
)
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import ConfigError
from guard.host import AsyncGuardClient, GuardClient, Verdict
from guard.host.shm import SharedMemory
from guard.sidecar.server import GuardServer
from guard.sidecar.session import InspectStream
from guard.telemetry.instruments import Instruments
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from guard.wire.framing import FrameReader, send_frame
from tests.conftest import D_IN, HOOK, StreamClient, make_batch
from tests.sae_fixtures import write_saelens
from tests.sidecar import short_socket
from tests.test_host_client import ScriptedGuard, wait_until
from tests.test_plugins_end_to_end import BATCHES, D_SAE, PLUGIN_SETTINGS, WEIGHTS
from tests.test_shm import (
    comparable,
    configure,
    held,
    put,
    region_file,
    registration,
    run_batches,
    serving,
    shm_batch,
    shm_config,
    x,
)
from tests.test_telemetry import Blocker, by_name, parent_id, span_id, trace_id, wait_span

# -- helpers --------------------------------------------------------------------------------


class Doorbell:
    """A raw doorbell connection: frames in, DoorbellFrames out."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._reader = FrameReader(self.sock, 1 << 26)

    def send(self, request: pb.InspectRequest) -> None:
        send_frame(self.sock, request.SerializeToString())

    def configure(self, *regions: pb.SharedMemoryRegion) -> None:
        self.send(pb.InspectRequest(config=pb.StreamConfig(
            mode=pb.MODE_INLINE, hooks=[HOOK], shared_memory=list(regions))))

    def next(self) -> pb.DoorbellFrame | None:
        payload = self._reader.read()
        return None if payload is None else pb.DoorbellFrame.FromString(payload)

    def ask(self, batch: pb.ActivationBatch) -> pb.InspectResponse:
        self.send(pb.InspectRequest(batch=batch))
        frame = self.next()
        assert frame is not None and frame.WhichOneof("frame") == "reply", frame
        return frame.reply

    def ended(self) -> pb.StreamEnd:
        """The StreamEnd that ends the stream, after which the guard closes it."""
        frame = self.next()
        assert frame is not None and frame.WhichOneof("frame") == "end", frame
        assert self.next() is None
        self.close()
        return frame.end

    def finish(self) -> list[pb.DoorbellFrame]:
        """Stop sending; the frames the guard still sends before it closes."""
        self.sock.shutdown(socket.SHUT_WR)
        frames = []
        while (frame := self.next()) is not None:
            frames.append(frame)
        self.close()
        return frames

    def close(self) -> None:
        self.sock.close()


def code_name(end: pb.StreamEnd) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == end.code)


def guard_config(tmp_path: Path, sae_dir: Path, **server: Any) -> GuardConfig:
    folder = tmp_path / "shm"
    folder.mkdir(exist_ok=True)
    shared_memory = server.pop("shared_memory", shm_config(folder))
    return GuardConfig(
        server=ServerConfig(listen=server.pop("listen", f"unix://{short_socket('db')}"),
                            drain_grace_seconds=0, shared_memory=shared_memory, **server),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir, features="all"),),
        plugins=PluginsConfig(autoload=False, timeout_ms=0),
    )


def doorbell_of(server: GuardServer) -> str:
    with grpc.insecure_channel(server.addresses[0]) as channel:
        return pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest()).shared_memory_doorbell


@pytest.fixture
def doorbell_guard(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, Path]]:
    """A plain guard (all features, no plugins) with shared memory and its doorbell."""
    config = guard_config(tmp_path, sae_dir)
    with serving(config) as server:
        yield server, tmp_path / "shm"


@dataclasses.dataclass(frozen=True)
class PluginGuard:
    server: GuardServer
    folder: Path


@pytest.fixture(scope="module")
def plugin_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginGuard]:
    """The first-party detectors and steering (every action reachable), shared memory on."""
    tmp = tmp_path_factory.mktemp("doorbell-e2e")
    folder = tmp / "shm"
    folder.mkdir()
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{short_socket('db-e2e')}", drain_grace_seconds=0,
                            shared_memory=shm_config(folder)),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )
    with serving(config) as server:
        yield PluginGuard(server, folder)


# -- where it listens ------------------------------------------------------------------------


def test_describe_names_the_doorbell_beside_the_unix_socket_with_the_sockets_mode(
        doorbell_guard: tuple[GuardServer, Path]) -> None:
    server, _folder = doorbell_guard
    path = doorbell_of(server)
    listen = server.addresses[0][len("unix://"):]
    assert path == listen + ".doorbell"
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == server.config.server.socket_mode == 0o660
    with grpc.insecure_channel(server.addresses[0]) as channel:
        described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    assert format_description(described, "here").endswith(
        f"shared memory: regions in {_folder}; doorbell {path}")


def test_no_doorbell_without_shared_memory_or_when_turned_off_or_without_a_folder(
        tmp_path: Path, sae_dir: Path) -> None:
    folder = tmp_path / "shm"
    folder.mkdir()
    off = guard_config(tmp_path, sae_dir, shared_memory=shm_config(folder, enabled=False))
    no_doorbell = guard_config(tmp_path, sae_dir,
                               shared_memory=shm_config(folder, doorbell=False))
    tcp_only = guard_config(tmp_path, sae_dir, listen="127.0.0.1:0")
    for config in (off, no_doorbell, tcp_only):
        with serving(config) as server:
            assert doorbell_of(server) == ""
            assert server.doorbell is None
            listen = server.addresses[0]
            if listen.startswith("unix://"):
                assert not os.path.exists(listen[len("unix://"):] + ".doorbell")
    # a TCP listener with an explicit doorbell socket: served there
    explicit = str(short_socket("db-explicit"))
    config = guard_config(tmp_path, sae_dir, listen="127.0.0.1:0",
                          shared_memory=shm_config(folder, doorbell_socket=explicit))
    with serving(config) as server:
        assert doorbell_of(server) == explicit
        bell = Doorbell(explicit)
        bell.configure()
        assert bell.ask(make_batch(x())).action == pb.ACTION_CONTINUE
        assert bell.finish() == []
    assert not os.path.exists(explicit)  # removed by the drain


def test_config_doorbell_keys_and_errors() -> None:
    config = parse_config("server:\n  shared_memory:\n    enabled: true\n    doorbell: false\n"
                          "    doorbell_socket: /run/guard/bell.sock\n", env={})
    assert config.server.shared_memory.doorbell is False
    assert config.server.shared_memory.doorbell_socket == "/run/guard/bell.sock"
    defaults = parse_config("", env={}).server.shared_memory
    assert (defaults.doorbell, defaults.doorbell_socket) == (True, "")
    for text, message in [
        ("doorbell: yes please", "server.shared_memory.doorbell: expected true or false"),
        ("doorbell_socket: bell.sock", "server.shared_memory.doorbell_socket: expected an "
                                       "absolute socket file path without '..' (or '' for "
                                       "beside server.listen), found 'bell.sock'"),
        ("doorbell_socket: /run/guard/", "server.shared_memory.doorbell_socket: expected an "
                                         "absolute socket file path"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(f"server:\n  shared_memory:\n    {text}\n", env={})
        assert message in str(caught.value)


# -- the protocol on raw frames ------------------------------------------------------------


def test_a_doorbell_stream_answers_exactly_as_a_grpc_stream(plugin_guard: PluginGuard) -> None:
    """Every batch of the scenario, as bytes and through a region, on both transports."""
    path = region_file(plugin_guard.folder, "raw.shm", size=1 << 16, mode=0o600)
    try:
        with grpc.insecure_channel(plugin_guard.server.addresses[0]) as channel:
            grpc_stream = StreamClient(channel)
            configure(grpc_stream, registration(path, size=1 << 16))
            bell = Doorbell(doorbell_of(plugin_guard.server))
            bell.configure(registration(path, size=1 << 16))
            sequence = 0
            for rows, first in BATCHES:
                for by_reference in (False, True):
                    sequence += 1
                    batch = make_batch(rows, sequence=sequence)
                    if by_reference:
                        put(path, 0, rows.tobytes())
                        batch = shm_batch(rows, sequence)
                    batch.positions[:] = range(first, first + len(rows))
                    by_grpc, by_bell = grpc_stream.ask(batch), bell.ask(batch)
                    assert by_bell.decision_id != by_grpc.decision_id
                    by_grpc.ClearField("decision_id")
                    by_bell.ClearField("decision_id")
                    assert by_bell == by_grpc
            assert bell.finish() == []
            assert grpc_stream.rest() == []
    finally:
        path.unlink()


def test_per_batch_errors_keep_a_doorbell_stream_going(
        doorbell_guard: tuple[GuardServer, Path]) -> None:
    server, _folder = doorbell_guard
    bell = Doorbell(doorbell_of(server))
    bell.configure()
    wide = bell.ask(make_batch(sequence=1, width=D_IN + 1))
    assert wide.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"has d_in {D_IN}, found width {D_IN + 1}" in wide.error.message
    again = bell.ask(make_batch(sequence=1))
    assert again.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    nan = x()
    nan[0, 0] = np.inf
    assert "hold NaN or Inf" in bell.ask(make_batch(nan, sequence=2)).error.message
    assert bell.ask(make_batch(sequence=3)).action == pb.ACTION_CONTINUE
    assert bell.finish() == []


def test_protocol_violations_end_only_their_doorbell_stream(
        doorbell_guard: tuple[GuardServer, Path], tmp_path: Path) -> None:
    server, folder = doorbell_guard
    path = doorbell_of(server)
    outside = region_file(tmp_path, "outside.shm")
    limit = server.config.server.max_message_bytes * 2
    with grpc.insecure_channel(server.addresses[0]) as channel:
        grpc_survivor = StreamClient(channel)
        grpc_survivor.configure()
        survivor = Doorbell(path)
        survivor.configure()
        cases: list[tuple[str, Any, str, str]] = [
            ("batch first", pb.InspectRequest(batch=make_batch(x())), "FAILED_PRECONDITION",
             "the first message on an Inspect stream must be a StreamConfig"),
            ("not protobuf", b"\xff\xff\xff\xff not an InspectRequest", "INVALID_ARGUMENT",
             "frame 1 on this doorbell stream is not a guard.v1.InspectRequest"),
            ("too large", (limit + 1).to_bytes(4, "little"), "RESOURCE_EXHAUSTED",
             f"a doorbell frame of {limit + 1} bytes exceeds the guard's transport limit of "
             f"{limit} (twice server.max_message_bytes)"),
            ("region outside", pb.InspectRequest(config=pb.StreamConfig(
                mode=pb.MODE_INLINE, shared_memory=[registration(outside)])),
             "PERMISSION_DENIED", "config.shared_memory[0].path"),
            ("unknown hook", pb.InspectRequest(config=pb.StreamConfig(hooks=["nope"])),
             "INVALID_ARGUMENT", "config.mode"),
        ]
        for sequence, (name, message, code, text) in enumerate(cases, 1):
            bell = Doorbell(path)
            if isinstance(message, bytes):
                if name == "too large":
                    bell.sock.sendall(message)
                else:
                    send_frame(bell.sock, message)
            else:
                bell.send(message)
            end = bell.ended()
            assert code_name(end) == code, (name, end)
            assert text in end.message, (name, end.message)
            bell.close()
            assert survivor.ask(make_batch(sequence=sequence)).action == pb.ACTION_CONTINUE
            reply = grpc_survivor.ask(make_batch(sequence=sequence))
            assert reply.action == pb.ACTION_CONTINUE, name
        assert survivor.finish() == []
        assert grpc_survivor.rest() == []
    assert not held(outside)
    assert server.doorbell is not None
    wait_until(lambda: server.doorbell is not None and server.doorbell.streams == 0)
    del folder


def test_regions_are_unmapped_however_a_doorbell_stream_ends(
        doorbell_guard: tuple[GuardServer, Path]) -> None:
    server, folder = doorbell_guard
    path = doorbell_of(server)
    for ending in ("host finishes", "host vanishes", "guard ends it"):
        region = region_file(folder, f"{ending.replace(' ', '-')}.shm")
        bell = Doorbell(path)
        bell.configure(registration(region))
        put(region, 0, x().tobytes())
        assert bell.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
        assert held(region)
        if ending == "host finishes":
            assert bell.finish() == []
        elif ending == "host vanishes":
            bell.close()
        else:
            bell.configure(registration(region))  # a second StreamConfig
            assert code_name(bell.ended()) == "FAILED_PRECONDITION"
        wait_until(lambda region=region: not held(region))
        bell.close()


def test_streams_above_max_concurrent_rpcs_are_refused(tmp_path: Path, sae_dir: Path) -> None:
    with serving(guard_config(tmp_path, sae_dir, max_concurrent_rpcs=2)) as server:
        path = doorbell_of(server)
        open_bells = [Doorbell(path) for _ in range(2)]
        for bell in open_bells:
            bell.configure()
            assert bell.ask(make_batch()).action == pb.ACTION_CONTINUE
        refused = Doorbell(path).ended()
        assert code_name(refused) == "RESOURCE_EXHAUSTED"
        assert "server.max_concurrent_rpcs" in refused.message
        open_bells[0].finish()
        wait_until(lambda: server.doorbell is not None and server.doorbell.streams == 1)
        later = Doorbell(path)
        later.configure()
        assert later.ask(make_batch()).action == pb.ACTION_CONTINUE
        later.finish()
        open_bells[1].finish()


def test_a_guard_still_loading_answers_unavailable(tmp_path: Path, sae_dir: Path) -> None:
    server = GuardServer(guard_config(tmp_path, sae_dir))
    server.start()
    try:
        assert server.doorbell is not None
        end = Doorbell(server.doorbell.path).ended()
        assert code_name(end) == "UNAVAILABLE"
        assert "retry when the health service reports SERVING" in end.message
    finally:
        server.stop(0)


def test_a_drain_answers_open_streams_then_ends_them_and_refuses_new_ones(
        tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    path = doorbell_of(server)
    bell = Doorbell(path)
    bell.configure()
    assert bell.ask(make_batch(sequence=1)).action == pb.ACTION_CONTINUE
    stopping = threading.Thread(target=server.stop, args=(1.0,))
    stopping.start()
    wait_until(lambda: server.doorbell is not None and server.doorbell.draining)
    assert bell.ask(make_batch(sequence=2)).action == pb.ACTION_CONTINUE  # still served
    assert bell.next() is None  # then ended by the drain after its grace
    bell.close()
    stopping.join(30)
    assert not stopping.is_alive()
    assert not os.path.exists(path)
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        Doorbell(path)


# -- the host SDK ----------------------------------------------------------------------------


def test_the_client_finds_the_doorbell_and_decides_as_on_grpc(plugin_guard: PluginGuard
                                                               ) -> None:
    address, folder = plugin_guard.server.addresses[0], plugin_guard.folder
    spec = SharedMemory(directory=str(folder), size_bytes=1 << 20)
    verdicts: dict[str, list[Verdict]] = {}
    paths: dict[str, SharedMemory | None] = {
        "bytes": None, "shm over grpc": dataclasses.replace(spec, doorbell=False),
        "shm over the doorbell": spec}
    for name, shared_memory in paths.items():
        with GuardClient(address, hooks=[HOOK], deadline_ms=30_000,
                         shared_memory=shared_memory) as client:
            verdicts[name] = run_batches(client)
            assert client.transport == ("doorbell" if name.endswith("doorbell") else "grpc")
            shm_batches = 0 if shared_memory is None else len(BATCHES)
            assert client.counters.shm_batches == shm_batches
    expected = [comparable(v) for v in verdicts["bytes"]]
    assert [v.action for v in verdicts["bytes"]] == [Action.CONTINUE, Action.ABORT,
                                                     Action.STEER, Action.CONTINUE]
    for name in ("shm over grpc", "shm over the doorbell"):
        assert [comparable(v) for v in verdicts[name]] == expected, name
        np.testing.assert_array_equal(verdicts[name][2].steering[HOOK],
                                      verdicts["bytes"][2].steering[HOOK])


def test_monitor_batches_on_the_doorbell_reach_the_guard_and_close_flushes(
        plugin_guard: PluginGuard) -> None:
    seen: list[Verdict] = []
    client = GuardClient(plugin_guard.server.addresses[0], mode="monitor", hooks=[HOOK],
                         shared_memory=str(plugin_guard.folder), on_reply=seen.append)
    for i in range(20):
        rows, first = BATCHES[i % len(BATCHES)]
        assert client.inspect(f"mon-{i}", HOOK, rows,
                              list(range(first, first + len(rows)))).source == "monitor"
    assert client.transport == "doorbell"
    client.close()  # what is queued goes out and is answered before the stream ends
    counters = client.counters
    assert counters.sent + counters.dropped == 20
    wait_until(lambda: len(seen) == counters.sent)
    assert [v.sequence for v in seen] == sorted(v.sequence for v in seen)
    assert {v.action for v in seen} == {Action.CONTINUE, Action.ABORT, Action.STEER}
    assert counters.errors == 0


@pytest.fixture
def scripted(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, Path, ScriptedGuard]]:
    config = dataclasses.replace(guard_config(tmp_path, sae_dir),
                                 saes=(SaeConfig(path=sae_dir),))
    plugin = ScriptedGuard()
    try:
        with serving(config, PluginSource("scripted", "1", plugin)) as server:
            yield server, tmp_path / "shm", plugin
    finally:
        plugin.release.set()


def test_deadlines_late_replies_and_the_reset_work_on_the_doorbell(
        scripted: tuple[GuardServer, Path, ScriptedGuard]) -> None:
    server, folder, plugin = scripted
    with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=100, failure_policy="closed",
                     reset_after_late=1, reconnect_backoff_ms=10, shared_memory=str(folder)
                     ) as client:
        assert client.inspect("warm", HOOK, x(), [0, 1, 2]).source == "guard"
        assert client.transport == "doorbell"
        late = client.inspect("late", HOOK, x(), [0, 1, 2], attributes={"sleep": "30"})
        assert (late.source, late.cause, late.action) == ("fail_closed", "timeout",
                                                          Action.ABORT)
        plugin.release.set()  # the guard answers the late batch; the stream was reset
        verdict = late
        for _ in range(200):
            verdict = client.inspect("after", HOOK, x(), [0, 1, 2], deadline_ms=30_000)
            if verdict.source == "guard":
                break
            wait_until(lambda: client.state == "open")
        assert verdict.source == "guard" and client.transport == "doorbell"
        counters = client.counters
        assert counters.timeouts == 1 and counters.reconnects >= 1
        assert client._shm is not None and client._shm.allocator.in_use == 0


def test_the_client_reconnects_on_the_doorbell_after_the_guard_restarts(
        tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir)
    folder = tmp_path / "shm"
    with GuardClient(config.server.listen, hooks=[HOOK], deadline_ms=30_000,
                     reconnect_backoff_ms=10, reconnect_backoff_max_ms=50,
                     shared_memory=str(folder)) as client:
        with serving(config):
            assert client.inspect("one", HOOK, x(), [0, 1, 2]).source == "guard"
            assert client.transport == "doorbell"
        down = client.inspect("down", HOOK, x(), [0, 1, 2])
        assert (down.source, down.cause) == ("fail_open", "unavailable")
        with serving(config):  # a new guard on the same sockets
            verdict = down
            for _ in range(400):
                verdict = client.inspect("two", HOOK, x(), [0, 1, 2])
                if verdict.source == "guard":
                    break
                threading.Event().wait(0.02)
            assert verdict.source == "guard" and client.transport == "doorbell"
        assert client.counters.reconnects >= 1


def test_a_guard_without_a_doorbell_gets_shared_memory_over_grpc(
        tmp_path: Path, sae_dir: Path) -> None:
    folder = tmp_path / "shm"
    folder.mkdir()
    config = guard_config(tmp_path, sae_dir, shared_memory=shm_config(folder, doorbell=False))
    with serving(config) as server, GuardClient(server.addresses[0], hooks=[HOOK],
                                                deadline_ms=30_000,
                                                shared_memory=str(folder)) as client:
        assert client.inspect("r", HOOK, x(), [0, 1, 2]).source == "guard"
        assert client.transport == "grpc" and client.counters.shm_batches == 1


def test_the_guards_span_continues_the_hosts_over_the_doorbell(
        tmp_path: Path, sae_dir: Path, tracer_provider: TracerProvider,
        spans: InMemorySpanExporter) -> None:
    config = guard_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config, extra_plugins=[PluginSource("blocker", "1", Blocker)],
                                 instruments=Instruments(tracer_provider)))
    try:
        with GuardClient(server.addresses[0], hooks=[HOOK], deadline_ms=30_000,
                         shared_memory=str(tmp_path / "shm")) as client, \
                tracer_provider.get_tracer("app").start_as_current_span("POST /chat"):
            client.inspect("traced", HOOK, x(), [0, 1, 2])
            assert client.transport == "doorbell"
    finally:
        server.stop(0)
    (root,) = by_name(spans)["POST /chat"]
    (host,) = by_name(spans, trace_id(root))["guard.host.inspect"]
    batch = wait_span(spans, "guard.inspect", trace_id(root))
    assert parent_id(host) == span_id(root) and parent_id(batch) == span_id(host)
    assert dict(host.attributes or {})["rpc.system"] == "guard_doorbell"
    assert dict(batch.attributes or {})["rpc.system"] == "guard_doorbell"


def test_frames_cut_short_or_oversized_are_errors_not_hangs() -> None:
    from guard.wire.framing import FrameError, FrameTooLarge

    left, right = socket.socketpair()
    try:
        reader = FrameReader(right, 16)
        send_frame(left, b"abc", b"de")
        assert reader.read() == b"abcde"
        left.sendall((17).to_bytes(4, "little"))
        with pytest.raises(FrameTooLarge, match="a frame of 17 bytes exceeds the limit of 16"):
            reader.read()
    finally:
        left.close()
        right.close()
    left, right = socket.socketpair()
    reader = FrameReader(right, 16)
    left.sendall((8).to_bytes(4, "little") + b"1234")
    left.close()
    with pytest.raises(FrameError, match=r"the stream ended inside a frame \(4 of 8 bytes\)"):
        reader.read()
    right.close()
    codec.DATATYPES  # noqa: B018  # the codec stays importable beside the framing


@pytest.mark.parametrize("transport", ["grpc", "doorbell"])
def test_no_steering_delta_is_written_into_a_region_after_its_host_left(
        scripted: tuple[GuardServer, Path, ScriptedGuard], transport: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a stream ended, its host reuses the batch's slot for other rows: a decision the
    guard finishes afterwards must not write its delta there."""
    server, folder, plugin = scripted
    checks: list[Callable[[], bool]] = []  # each stream's liveness check, as the guard sees it
    original = InspectStream.__init__

    def recording(self: InspectStream, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if kwargs.get("alive") is not None:
            checks.append(kwargs["alive"])

    monkeypatch.setattr(InspectStream, "__init__", recording)
    path = region_file(folder, f"left-{transport}.shm", size=4096)
    rows = x()
    put(path, 0, rows.tobytes())
    batch = shm_batch(rows, 1)
    batch.steering_ref.CopyFrom(batch.activations.shm)  # the delta would replace the rows
    batch.attributes.update({"sleep": "30", "steer": "1"})
    region = registration(path, writable=True)
    with grpc.insecure_channel(server.addresses[0]) as channel:
        if transport == "grpc":
            client = StreamClient(channel)
            configure(client, region)
            client.send(pb.InspectRequest(batch=batch))
            wait_until(lambda: len(plugin.seen) == 1)
            client._call.cancel()  # type: ignore[no-untyped-call]  # the host is gone
        else:
            bell = Doorbell(doorbell_of(server))
            bell.configure(region)
            bell.send(pb.InspectRequest(batch=batch))
            wait_until(lambda: len(plugin.seen) == 1)
            bell.close()  # the host is gone
        # the guard has noticed (gRPC learns of a cancel asynchronously): then it decides
        wait_until(lambda: len(checks) == 1 and not checks[0]())
        plugin.release.set()  # the guard decides STEER now
        wait_until(lambda: not held(path))  # the stream's handler finished
    with path.open("rb") as f:
        assert f.read(rows.nbytes) == rows.tobytes()


def test_the_async_client_uses_the_doorbell_too(plugin_guard: PluginGuard) -> None:
    address, folder = plugin_guard.server.addresses[0], plugin_guard.folder
    with GuardClient(address, hooks=[HOOK], deadline_ms=30_000) as plain:
        expected = run_batches(plain)

    async def main() -> tuple[list[Verdict], list[Verdict], str, int]:
        seen: list[Verdict] = []
        async with AsyncGuardClient(address, hooks=[HOOK], deadline_ms=30_000,
                                    shared_memory=str(folder)) as client:
            verdicts = [await client.inspect("req-aio", HOOK, rows,
                                             list(range(first, first + len(rows))))
                        for rows, first in BATCHES]
            transport = client.transport
        async with AsyncGuardClient(address, mode="monitor", hooks=[HOOK],
                                    shared_memory=str(folder), on_reply=seen.append) as monitor:
            for rows, first in BATCHES:
                await monitor.inspect("req-aio-mon", HOOK, rows,
                                      list(range(first, first + len(rows))))
            monitor_transport = monitor.transport
        return verdicts, seen, f"{transport}/{monitor_transport}", client.counters.shm_batches

    verdicts, seen, transports, shm_batches = asyncio.run(main())
    assert transports == "doorbell/doorbell" and shm_batches == len(BATCHES)
    assert [comparable(v) for v in verdicts] == [comparable(v) for v in expected]
    np.testing.assert_array_equal(verdicts[2].steering[HOOK], expected[2].steering[HOOK])
    # MONITOR: close() sent what was queued and the guard answered every batch
    assert [v.action for v in seen] == [v.action for v in expected]


def test_the_async_client_reconnects_on_the_doorbell_after_the_guard_restarts(
        tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir)
    folder = tmp_path / "shm"

    async def main() -> tuple[Verdict, Verdict, Verdict, int]:
        async with AsyncGuardClient(config.server.listen, hooks=[HOOK], deadline_ms=30_000,
                                    reconnect_backoff_ms=10, reconnect_backoff_max_ms=50,
                                    shared_memory=str(folder)) as client:
            with serving(config):
                first = await client.inspect("one", HOOK, x(), [0, 1, 2])
                assert client.transport == "doorbell"
            down = await client.inspect("down", HOOK, x(), [0, 1, 2])
            with serving(config):
                again = down
                for _ in range(400):
                    again = await client.inspect("two", HOOK, x(), [0, 1, 2])
                    if again.source == "guard":
                        break
                    await asyncio.sleep(0.02)
                assert client.transport == "doorbell"
            return first, down, again, client.counters.reconnects

    first, down, again, reconnects = asyncio.run(main())
    assert first.source == "guard" and again.source == "guard"
    assert (down.source, down.cause) == ("fail_open", "unavailable")
    assert reconnects >= 1


def test_on_the_doorbell_a_host_registers_only_its_own_files(
        doorbell_guard: tuple[GuardServer, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel tells the doorbell its peer's uid (SO_PEERCRED): a region file of another
    uid is refused even when that uid is allowed, so a host cannot have the guard read or
    write another host's region."""
    import guard.sidecar.doorbell

    server, folder = doorbell_guard
    me = os.getuid()
    region = region_file(folder, "mine.shm")
    bell = Doorbell(doorbell_of(server))  # the real peer uid: its own file is accepted
    bell.configure(registration(region))
    assert bell.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
    assert bell.finish() == []
    monkeypatch.setattr(guard.sidecar.doorbell, "_peer_uid", lambda _conn: me + 1)
    other = Doorbell(doorbell_of(server))  # "another host", running as uid me + 1
    other.configure(registration(region))
    end = other.ended()
    assert code_name(end) == "PERMISSION_DENIED"
    assert (f"config.shared_memory[0].path: expected a file owned by the stream's own uid "
            f"{me + 1} (the doorbell's peer: a host registers only its own files), found uid "
            f"{me}") in end.message


def test_the_doorbell_argument_is_validated(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"shared_memory.doorbell: expected True or False, "
                                        r"found 'yes'"):
        SharedMemory.of(SharedMemory(directory=str(tmp_path), doorbell="yes"))  # type: ignore[arg-type]
