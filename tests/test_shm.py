"""The shared-memory transport (issue #9, item 1), through a real gRPC server and channel:
identical decisions on the bytes and shared-memory paths, the checks on regions and
references, unmapping at stream end, and the host SDK's region (slots, fallback, cleanup)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from guard.config import (
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    SaeConfig,
    ServerConfig,
    SharedMemoryConfig,
    parse_config,
)
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import ConfigError, InvalidInput
from guard.host import GuardClient, Verdict
from guard.host._options import CounterBox
from guard.host.aio import AsyncGuardClient
from guard.host.shm import HostRegion, RingAllocator, SharedMemory
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from tests.conftest import D_IN, HOOK, StreamClient, make_batch
from tests.sae_fixtures import write_saelens
from tests.test_host_client import ScriptedGuard, wait_until
from tests.test_plugins_end_to_end import BATCHES, D_SAE, PLUGIN_SETTINGS, WEIGHTS

# -- helpers --------------------------------------------------------------------------------


def region_file(folder: Path, name: str = "region.shm", size: int = 4096,
                mode: int = 0o600) -> Path:
    """A region file as a host would make it."""
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def put(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def get(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def registration(path: Path | str, name: str = "r", size: int = 4096,
                 writable: bool = False) -> pb.SharedMemoryRegion:
    return pb.SharedMemoryRegion(name=name, path=str(path), size=size, writable=writable)


def configure(client: StreamClient, *regions: pb.SharedMemoryRegion) -> None:
    client.send(pb.InspectRequest(config=pb.StreamConfig(
        mode=pb.MODE_INLINE, hooks=[HOOK], shared_memory=list(regions))))


def shm_batch(rows: NDArray[np.float32], sequence: int, region: str = "r", offset: int = 0,
              length: int | None = None, datatype: str = "F32") -> pb.ActivationBatch:
    """A batch whose rows are in a region (the caller writes them there)."""
    batch = make_batch(rows, sequence=sequence, datatype=datatype)
    nbytes = len(batch.activations.raw)
    batch.activations.ClearField("raw")
    batch.activations.shm.CopyFrom(pb.SharedMemoryRef(
        region=region, offset=offset, length=nbytes if length is None else length))
    return batch


def ended(client: StreamClient) -> grpc.RpcError:
    """The status that ended the stream (it must end without a reply)."""
    with pytest.raises(grpc.RpcError) as caught:
        client.next()
    error = caught.value
    assert isinstance(error, grpc.RpcError)
    return error


def held(path: Path | str) -> bool:
    """Whether this process (the in-process guard) holds the file open or mapped."""
    target = os.path.realpath(path)
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:  # a descriptor closed while listing
            continue
    return target in Path("/proc/self/maps").read_text()


def shm_config(folder: Path, **changes: Any) -> SharedMemoryConfig:
    return dataclasses.replace(
        SharedMemoryConfig(enabled=True, allowed_dirs=(str(folder),)), **changes)


@contextmanager
def serving(config: GuardConfig, *plugins: PluginSource) -> Iterator[GuardServer]:
    server = GuardServer(config)
    server.start()
    try:
        server.set_ready(Engine.load(config, extra_plugins=list(plugins)))
        yield server
    finally:
        server.stop(0)


def x(n: int = 3, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)


# -- a guard with the first-party detectors and steering, shared memory on ------------------


@dataclasses.dataclass(frozen=True)
class PluginGuard:
    address: str
    folder: Path


@pytest.fixture(scope="module")
def plugin_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginGuard]:
    tmp = tmp_path_factory.mktemp("shm-e2e")
    folder = tmp / "shm"
    folder.mkdir()
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp}/guard.sock", drain_grace_seconds=0,
                            shared_memory=shm_config(folder)),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )
    with serving(config) as server:
        yield PluginGuard(server.addresses[0], folder)


def comparable(verdict: Verdict) -> tuple[Any, ...]:
    """Everything of a verdict but its decision id (unique per decision)."""
    return (verdict.action, verdict.source, verdict.findings, verdict.details,
            verdict.positions, verdict.reason, sorted(verdict.steering))


def run_batches(client: GuardClient) -> list[Verdict]:
    return [client.inspect("req-shm", HOOK, rows, list(range(first, first + len(rows))))
            for rows, first in BATCHES]


# -- identical decisions ----------------------------------------------------------------------


@pytest.mark.parametrize("wire_dtype", ["F32", "F16", "BF16"])
def test_decisions_are_identical_on_the_bytes_and_shared_memory_paths(
        plugin_guard: PluginGuard, wire_dtype: Literal["F32", "F16", "BF16"]) -> None:
    spec = SharedMemory(directory=str(plugin_guard.folder), size_bytes=1 << 20)
    with GuardClient(plugin_guard.address, hooks=[HOOK], deadline_ms=30_000,
                     wire_dtype=wire_dtype) as plain:
        by_bytes = run_batches(plain)
        assert plain.counters.shm_batches == 0
    with GuardClient(plugin_guard.address, hooks=[HOOK], deadline_ms=30_000,
                     wire_dtype=wire_dtype, shared_memory=spec) as fast:
        by_shm = run_batches(fast)
        counters = fast.counters
    assert (counters.shm_batches, counters.shm_fallbacks) == (len(BATCHES), 0)
    # the scenario covers every action: nothing fires, abort, flag + steer, log only
    assert [v.action for v in by_bytes] == [Action.CONTINUE, Action.ABORT, Action.STEER,
                                            Action.CONTINUE]
    for plain_verdict, shm_verdict in zip(by_bytes, by_shm, strict=True):
        assert shm_verdict.source == "guard"
        assert comparable(shm_verdict) == comparable(plain_verdict)
        for hook, delta in plain_verdict.steering.items():
            np.testing.assert_array_equal(shm_verdict.steering[hook], delta)
    assert by_shm[2].steering[HOOK].any()  # a real delta came back through the slot


def test_async_client_decisions_match_the_sync_bytes_path(plugin_guard: PluginGuard) -> None:
    with GuardClient(plugin_guard.address, hooks=[HOOK], deadline_ms=30_000) as plain:
        expected = run_batches(plain)

    async def main() -> tuple[list[Verdict], str, int]:
        async with AsyncGuardClient(plugin_guard.address, hooks=[HOOK], deadline_ms=30_000,
                                    shared_memory=str(plugin_guard.folder)) as client:
            assert client._shm is not None
            path = client._shm.path
            verdicts = [await client.inspect("req-shm", HOOK, rows,
                                             list(range(first, first + len(rows))))
                        for rows, first in BATCHES]
            return verdicts, path, client.counters.shm_batches

    verdicts, path, shm_batches = asyncio.run(main())
    assert shm_batches == len(BATCHES)
    assert [comparable(v) for v in verdicts] == [comparable(v) for v in expected]
    np.testing.assert_array_equal(verdicts[2].steering[HOOK], expected[2].steering[HOOK])
    assert not os.path.exists(path)  # unlinked by close()


def test_the_steering_delta_is_written_into_the_slot_named_by_steering_ref(
        plugin_guard: PluginGuard) -> None:
    rows, _first = BATCHES[2]  # watch fires, calm steers
    path = region_file(plugin_guard.folder, "wire.shm")
    try:
        with grpc.insecure_channel(plugin_guard.address) as channel:
            client = StreamClient(channel)
            configure(client, registration(path, writable=True))
            plain = client.ask(make_batch(rows, sequence=1))
            put(path, 256, rows.tobytes())
            batch = shm_batch(rows, 2, offset=256)
            batch.steering_ref.CopyFrom(batch.activations.shm)  # in place of the rows
            reply = client.ask(batch)
            client.close()
            assert client.rest() == []
        written = get(path, 256, rows.nbytes)
    finally:
        path.unlink()
    assert plain.action == reply.action == pb.ACTION_STEER
    (delta,) = (s.delta for s in reply.steering)
    assert delta.raw == b""
    assert (delta.shm.region, delta.shm.offset, delta.shm.length) == ("r", 256, rows.nbytes)
    assert (delta.datatype, list(delta.shape)) == ("F32", list(plain.steering[0].delta.shape))
    assert written == plain.steering[0].delta.raw  # the rows' slot now holds the delta


def test_steering_delta_bytes_in_the_region_equal_the_reply_bytes(
        plugin_guard: PluginGuard) -> None:
    rows, _first = BATCHES[2]
    path = region_file(plugin_guard.folder, "delta.shm")
    try:
        with grpc.insecure_channel(plugin_guard.address) as channel:
            client = StreamClient(channel)
            configure(client, registration(path, writable=True))
            plain = client.ask(make_batch(rows, sequence=1))
            put(path, 0, rows.tobytes())
            batch = shm_batch(rows, 2)
            batch.steering_ref.CopyFrom(pb.SharedMemoryRef(region="r", offset=1024,
                                                           length=rows.nbytes))
            reply = client.ask(batch)
            client.close()
            client.rest()
        written = get(path, 1024, rows.nbytes)
        assert get(path, 0, rows.nbytes) == rows.tobytes()  # the guard never wrote the rows
    finally:
        path.unlink()
    assert reply.steering[0].delta.shm.offset == 1024
    assert written == plain.steering[0].delta.raw


# -- references: per-batch errors, the stream goes on ---------------------------------------


@pytest.fixture
def shm_guard(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, Path]]:
    """A plain guard (all features encoded, no plugins) with shared memory on."""
    folder = tmp_path / "shm"
    folder.mkdir()
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock", drain_grace_seconds=0,
                            shared_memory=shm_config(folder)),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir, features="all"),),
        plugins=PluginsConfig(autoload=False),
    )
    with serving(config) as server:
        yield server, folder


ROWS_BYTES = 3 * D_IN * 4


@pytest.mark.parametrize(("change", "code", "text"), [
    ({"offset": 4096 - 64}, "INVALID_ARGUMENT",
     "batch.activations.shm: offset 4032 + length 192 = 4224 exceeds region 'r' of 4096 bytes"),
    ({"length": 100}, "INVALID_ARGUMENT",
     "batch.activations.shm.length: expected 192 bytes (the tensor's datatype and shape), "
     "found 100"),
    ({"region": "other"}, "NOT_FOUND",
     "batch.activations.shm.region: 'other' is not registered on this stream; registered "
     "regions: 'r'"),
    ({"offset": 2}, "INVALID_ARGUMENT",
     "batch.activations.shm.offset: expected a multiple of the item size 4, found 2"),
])
def test_bad_references_get_a_per_batch_error_and_the_stream_goes_on(
        shm_guard: tuple[GuardServer, Path], change: dict[str, Any], code: str,
        text: str) -> None:
    server, folder = shm_guard
    path = region_file(folder)
    rows = x()
    put(path, 0, rows.tobytes())
    with grpc.insecure_channel(server.addresses[0]) as channel:
        client = StreamClient(channel)
        configure(client, registration(path))
        bad = shm_batch(rows, 1, **change)
        reply = client.ask(bad)
        assert reply.error.code == getattr(grpc.StatusCode, code).value[0]
        assert reply.error.message == text
        good = client.ask(shm_batch(rows, 2))
        assert not good.HasField("error") and good.action == pb.ACTION_CONTINUE
        client.close()
        client.rest()


def test_raw_and_shm_together_and_a_read_only_steering_ref_are_rejected(
        shm_guard: tuple[GuardServer, Path]) -> None:
    server, folder = shm_guard
    path = region_file(folder)
    rows = x()
    put(path, 0, rows.tobytes())
    with grpc.insecure_channel(server.addresses[0]) as channel:
        client = StreamClient(channel)
        configure(client, registration(path))
        both = shm_batch(rows, 1)
        both.activations.raw = rows.tobytes()
        reply = client.ask(both)
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.error.message == "batch.activations: expected raw or shm, found both set"
        steer = shm_batch(rows, 2)
        steer.steering_ref.CopyFrom(steer.activations.shm)
        reply = client.ask(steer)
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.error.message == (
            "batch.steering_ref.region: 'r' was registered read-only; expected a region "
            "registered with writable: true")
        # a bytes batch on the same stream still works
        assert client.ask(make_batch(rows, sequence=3)).action == pb.ACTION_CONTINUE
        client.close()
        client.rest()


def test_a_region_that_shrank_is_reported_not_read(shm_guard: tuple[GuardServer, Path]) -> None:
    server, folder = shm_guard
    path = region_file(folder)
    with grpc.insecure_channel(server.addresses[0]) as channel:
        client = StreamClient(channel)
        configure(client, registration(path))
        assert client.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
        os.truncate(path, 128)  # a broken host: touching the lost pages would be SIGBUS
        reply = client.ask(shm_batch(x(), 2))
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "shrank to 128 bytes since it was registered with 4096" in reply.error.message
        client.close()
        client.rest()


def test_rows_decoded_from_shared_memory_give_the_bytes_path_features(
        shm_guard: tuple[GuardServer, Path]) -> None:
    """Zero-copy F32 and the widened F16/BF16 decode give the bytes path's decision."""
    server, folder = shm_guard
    path = region_file(folder)
    with grpc.insecure_channel(server.addresses[0]) as channel:
        client = StreamClient(channel)
        configure(client, registration(path))
        sequence = 0
        for datatype in ("F32", "F16", "BF16"):
            rows = x(4, seed=7)
            _shape, raw = codec.encode(rows, datatype)
            put(path, 512, raw)
            sequence += 1
            plain = client.ask(make_batch(rows, sequence=sequence, datatype=datatype))
            sequence += 1
            fast = client.ask(shm_batch(rows, sequence, offset=512, datatype=datatype))
            assert not fast.HasField("error"), fast.error.message
            assert (fast.action, list(fast.positions)) == (plain.action, list(plain.positions))
        client.close()
        client.rest()


# -- registration: the stream ends with a status, other streams go on ----------------------


def _bad_registrations(folder: Path, outside: Path) -> dict[str, tuple[
        list[pb.SharedMemoryRegion], str, str]]:
    good = region_file(folder, "good.shm")
    elsewhere = region_file(outside, "elsewhere.shm")
    link = folder / "link.shm"
    link.symlink_to(good)
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    open_to_all = region_file(folder, "open.shm")
    os.chmod(open_to_all, 0o666)
    linked = region_file(folder, "linked.shm")
    os.link(linked, folder / "linked-again.shm")
    fifo = folder / "fifo.shm"
    os.mkfifo(fifo, 0o600)
    (folder / "adir").mkdir()
    return {
        "outside allowed_dirs": (
            [registration(elsewhere)], "PERMISSION_DENIED",
            f"config.shared_memory[0].path: expected a file in {folder} "
            f"(server.shared_memory.allowed_dirs), found '{elsewhere}'"),
        "folder symlinked out": (
            [registration(folder / "sub" / "elsewhere.shm")], "PERMISSION_DENIED",
            "(its folder resolves to"),
        "symlink": (
            [registration(link)], "PERMISSION_DENIED",
            f"config.shared_memory[0].path: expected a regular file, found a symbolic link "
            f"at '{link}'"),
        "relative path": (
            [registration("region.shm")], "INVALID_ARGUMENT",
            "config.shared_memory[0].path: expected an absolute path, found 'region.shm'"),
        "dot-dot": (
            [registration(f"{folder}/../shm/good.shm")], "INVALID_ARGUMENT",
            "expected a normalised path"),
        "missing file": (
            [registration(folder / "nothing.shm")], "NOT_FOUND",
            f"config.shared_memory[0].path: no file at '{folder / 'nothing.shm'}'"),
        "size mismatch": (
            [registration(good, size=8192)], "INVALID_ARGUMENT",
            f"config.shared_memory[0].size: the file '{good}' is 4096 bytes, found size 8192"),
        "writable by others": (
            [registration(open_to_all)], "PERMISSION_DENIED",
            "expected a file not writable by others, found mode 0666"),
        "two links": (
            [registration(linked)], "PERMISSION_DENIED",
            "expected a file with one link, found 2 links"),
        "a FIFO": (
            [registration(fifo)], "PERMISSION_DENIED", "expected a regular file, found a FIFO"),
        "a directory": (
            [registration(folder / "adir")], "PERMISSION_DENIED",
            "expected a regular file, found a directory"),
        "duplicate name": (
            [registration(good), registration(good)], "INVALID_ARGUMENT",
            "config.shared_memory[1].name: expected a name unique on the stream, found 'r' "
            "twice"),
        "no name": (
            [registration(good, name="")], "INVALID_ARGUMENT",
            "config.shared_memory[0].name: expected a non-empty name"),
        "too many": (
            [registration(good, name=f"r{i}") for i in range(5)], "RESOURCE_EXHAUSTED",
            "config.shared_memory: expected at most 4 regions per stream "
            "(server.shared_memory.max_regions_per_stream), found 5"),
    }


def test_refused_regions_end_their_stream_with_a_status_and_other_streams_go_on(
        shm_guard: tuple[GuardServer, Path], tmp_path: Path) -> None:
    server, folder = shm_guard
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = _bad_registrations(folder, outside)
    good = folder / "good.shm"
    rows = x()
    put(good, 0, rows.tobytes())
    with grpc.insecure_channel(server.addresses[0]) as channel:
        survivor = StreamClient(channel)  # open across every refusal
        configure(survivor, registration(good))
        assert survivor.ask(shm_batch(rows, 1)).action == pb.ACTION_CONTINUE
        sequence = 1
        for name, (regions, code, text) in cases.items():
            client = StreamClient(channel)
            configure(client, *regions)
            client.send(pb.InspectRequest(batch=make_batch(rows)))
            error = ended(client)
            assert error.code().name == code, (name, error.details())
            assert text in (error.details() or ""), (name, error.details())
            sequence += 1
            reply = survivor.ask(shm_batch(rows, sequence))
            assert reply.action == pb.ACTION_CONTINUE, name
        survivor.close()
        survivor.rest()
    assert not held(good)


def test_owner_must_be_the_guards_uid_or_an_allowed_uid(
        tmp_path: Path, sae_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shm"
    folder.mkdir()
    path = region_file(folder)
    me = os.getuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)  # the guard "runs as" another user
    for allowed, accepted in (((), False), ((me,), True)):
        config = GuardConfig(
            server=ServerConfig(listen=f"unix://{tmp_path}/guard-{len(allowed)}.sock",
                                shared_memory=shm_config(folder, allowed_uids=allowed)),
            logging=LoggingConfig(level="warning"),
            saes=(SaeConfig(path=sae_dir, features="all"),),
            plugins=PluginsConfig(autoload=False),
        )
        with serving(config) as server, grpc.insecure_channel(server.addresses[0]) as channel:
            client = StreamClient(channel)
            configure(client, registration(path))
            if accepted:
                assert client.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
                client.close()
                client.rest()
            else:
                client.send(pb.InspectRequest(batch=make_batch(x())))
                error = ended(client)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert (f"expected a file owned by uid {me + 1} (the guard's uid or "
                        f"server.shared_memory.allowed_uids), found uid {me}"
                        in (error.details() or ""))


def test_shared_memory_disabled_ends_the_stream_and_describe_lists_no_folder(
        channel: grpc.Channel, tmp_path: Path) -> None:
    path = region_file(tmp_path)
    client = StreamClient(channel)
    configure(client, registration(path))
    client.send(pb.InspectRequest(batch=make_batch(x())))
    error = ended(client)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "config.shared_memory: this guard accepts no shared-memory regions "
        "(server.shared_memory.enabled is false); send tensors as bytes (Tensor.raw)")
    assert not held(path)
    # a reference without any region: NOT_FOUND naming the disabled setting
    other = StreamClient(channel)
    other.configure()
    reply = other.ask(shm_batch(x(), 1))
    assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "(server.shared_memory.enabled is false on this guard)" in reply.error.message
    other.close()
    other.rest()
    described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    assert list(described.shared_memory_dirs) == []


def test_describe_lists_the_allowed_folders(shm_guard: tuple[GuardServer, Path]) -> None:
    server, folder = shm_guard
    with grpc.insecure_channel(server.addresses[0]) as channel:
        described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    assert list(described.shared_memory_dirs) == [str(folder)]


# -- unmapped at stream end -------------------------------------------------------------------


def test_regions_are_unmapped_when_the_stream_ends(shm_guard: tuple[GuardServer, Path]) -> None:
    server, folder = shm_guard
    closed = region_file(folder, "closed.shm")
    violated = region_file(folder, "violated.shm")
    cancelled = region_file(folder, "cancelled.shm")
    with grpc.insecure_channel(server.addresses[0]) as channel:
        # the host half-closes: the guard's handler unmaps before the status goes out
        client = StreamClient(channel)
        configure(client, registration(closed))
        assert client.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
        assert held(closed)
        nan = x()
        nan[1, 3] = np.nan
        put(closed, 0, nan.tobytes())  # rejected after decoding: the error holds no view
        reply = client.ask(shm_batch(nan, 2))
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "rows at positions 1 hold NaN or Inf" in reply.error.message
        client.close()
        assert client.rest() == []
        assert not held(closed)

        # the guard ends the stream (a second StreamConfig is a protocol violation)
        client = StreamClient(channel)
        configure(client, registration(violated))
        assert client.ask(shm_batch(x(), 1)).action == pb.ACTION_CONTINUE
        configure(client, registration(violated))
        assert ended(client).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert not held(violated)

        # the host cancels: the handler notices at its next step and unmaps in its finally
        requests: list[pb.InspectRequest] = [
            pb.InspectRequest(config=pb.StreamConfig(
                mode=pb.MODE_INLINE, hooks=[HOOK],
                shared_memory=[registration(cancelled)])),
            pb.InspectRequest(batch=shm_batch(x(), 1)),
        ]
        gate = threading.Event()

        def feed() -> Iterator[pb.InspectRequest]:
            yield from requests
            gate.wait(30)

        call = pb_grpc.GuardStub(channel).Inspect(feed(), timeout=30)
        assert next(iter(call)).action == pb.ACTION_CONTINUE
        assert held(cancelled)
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        gate.set()
        wait_until(lambda: not held(cancelled))


# -- the host SDK's region --------------------------------------------------------------------


def test_ring_allocator_hands_out_disjoint_slots_and_reuses_them_in_order() -> None:
    ring = RingAllocator(1024, alignment=64)
    a, b, c = (ring.allocate(300) for _ in range(3))
    assert a is not None and b is not None and c is not None
    assert [(s.offset, s.end) for s in (a, b, c)] == [(0, 320), (320, 640), (640, 960)]
    assert ring.allocate(100) is None  # 64 bytes left at the end, the start is taken
    ring.free(b)  # out of order: waits behind a
    assert ring.allocate(300) is None
    ring.free(a)  # a and b return: the ring wraps to the start
    d = ring.allocate(600)
    assert d is not None and (d.offset, d.end) == (0, 640)
    assert ring.allocate(1) is None  # wrapped: nothing between d's end and c
    ring.free(c)
    e = ring.allocate(300)
    assert e is not None and e.offset == 640
    ring.free(d)
    ring.free(e)
    assert ring.in_use == 0
    f = ring.allocate(1024)
    assert f is not None and f.offset == 0
    assert ring.allocate(2048) is None


def test_host_region_file_is_private_and_removed_on_close(tmp_path: Path) -> None:
    region = HostRegion(SharedMemory(directory=str(tmp_path), size_bytes=4096),
                        CounterBox())
    path = Path(region.path)
    info = path.stat()
    assert (info.st_size, info.st_mode & 0o777, path.parent) == (4096, 0o600, tmp_path)
    lease = region.place(x(), "F32", ROWS_BYTES)
    assert lease is not None and get(path, lease.offset, ROWS_BYTES) == x().tobytes()
    lease.release()
    region.close()
    assert not path.exists()
    region.close()  # idempotent


def test_shared_memory_argument_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shared_memory.directory: expected an absolute"):
        GuardClient("unix:///nowhere.sock", shared_memory="relative/folder")
    with pytest.raises(ValueError, match=r"shared_memory.mode: expected owner read-write and "
                                         r"nothing for others, such as 0o600 or 0o660, "
                                         r"found 0644"):
        SharedMemory.of(SharedMemory(directory=str(tmp_path), mode=0o644))
    with pytest.raises(ValueError, match=r"size_bytes: expected an integer >= 64"):
        SharedMemory.of(SharedMemory(directory=str(tmp_path), size_bytes=10))
    with pytest.raises(TypeError, match=r"shared_memory: expected a folder path"):
        SharedMemory.of(42)
    with pytest.raises(ValueError, match=r"is not a folder"):
        GuardClient("unix:///nowhere.sock", shared_memory=str(tmp_path / "missing"))


@pytest.fixture
def scripted_shm_guard(tmp_path: Path, sae_dir: Path
                       ) -> Iterator[tuple[str, Path, ScriptedGuard]]:
    folder = tmp_path / "shm"
    folder.mkdir()
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock", drain_grace_seconds=0,
                            shared_memory=shm_config(folder)),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(autoload=False, timeout_ms=0),
    )
    plugin = ScriptedGuard()
    try:
        with serving(config, PluginSource("scripted", "1", plugin)) as server:
            yield server.addresses[0], folder, plugin
    finally:
        plugin.release.set()


def test_client_falls_back_to_bytes_while_the_region_is_full(
        scripted_shm_guard: tuple[str, Path, ScriptedGuard]) -> None:
    address, folder, plugin = scripted_shm_guard
    # room for exactly one [3, 16] F32 batch
    spec = SharedMemory(directory=str(folder), size_bytes=ROWS_BYTES)
    with GuardClient(address, hooks=[HOOK], deadline_ms=30_000, shared_memory=spec) as client:
        verdicts: dict[str, Verdict] = {}

        def held() -> None:  # its slot stays taken while the guard sleeps on it
            verdicts["held"] = client.inspect("req-held", HOOK, x(), [0, 1, 2],
                                              attributes={"sleep": "30"})

        worker = threading.Thread(target=held)
        worker.start()
        wait_until(lambda: any(seen[0] == "req-held" for seen in plugin.seen))
        assert client.counters.shm_batches == 1

        def second() -> None:
            verdicts["second"] = client.inspect("req-second", HOOK, x(seed=1), [3, 4, 5],
                                                attributes={"abort": "no"})

        other = threading.Thread(target=second)
        other.start()
        wait_until(lambda: client.counters.shm_fallbacks == 1)  # placed as bytes, queued
        plugin.release.set()
        worker.join(30)
        other.join(30)
        # every slot is back: the next batch goes through shared memory again
        third = client.inspect("req-third", HOOK, x(seed=2), [6, 7, 8])
        counters = client.counters
    assert verdicts["held"].source == verdicts["second"].source == third.source == "guard"
    assert verdicts["second"].action is Action.ABORT  # decided on the rows sent as bytes
    assert (counters.shm_batches, counters.shm_fallbacks) == (2, 1)


def test_monitor_mode_uses_the_region_and_frees_slots_on_replies(
        scripted_shm_guard: tuple[str, Path, ScriptedGuard]) -> None:
    address, folder, _plugin = scripted_shm_guard
    seen: list[Verdict] = []
    spec = SharedMemory(directory=str(folder), size_bytes=2 * ROWS_BYTES)
    client = GuardClient(address, mode="monitor", hooks=[HOOK], shared_memory=spec,
                         on_reply=seen.append)
    assert client._shm is not None
    allocator = client._shm.allocator
    try:
        for i in range(6):  # more batches than slots, one at a time
            client.inspect(f"req-{i}", HOOK, x(seed=i), [0, 1, 2], attributes={"steer": "1"})
            wait_until(lambda i=i: len(seen) == i + 1)
            assert allocator.in_use == 0
    finally:
        client.close()
    assert client.counters.shm_batches == 6 and client.counters.shm_fallbacks == 0
    assert all(v.action is Action.STEER and v.steering[HOOK].any() for v in seen)


def test_client_removes_its_region_file_on_close(
        scripted_shm_guard: tuple[str, Path, ScriptedGuard]) -> None:
    address, folder, _plugin = scripted_shm_guard
    client = GuardClient(address, hooks=[HOOK], deadline_ms=30_000, shared_memory=str(folder))
    assert client._shm is not None
    path = Path(client._shm.path)
    assert path.exists() and path.parent == folder
    assert client.inspect("req", HOOK, x(), [0, 1, 2]).source == "guard"
    client.close()
    assert not path.exists()
    assert list(folder.iterdir()) == []


def shm_off_config(tmp_path: Path, sae_dir: Path) -> GuardConfig:
    return GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock", drain_grace_seconds=0),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir, features="all"),),
        plugins=PluginsConfig(autoload=False),
    )


def test_client_asks_describe_and_sends_bytes_to_a_guard_without_shared_memory(
        tmp_path: Path, sae_dir: Path) -> None:
    """A guard with shared memory off (or one that predates it) lists no shared-memory
    folders in Describe: the client never registers its region and every batch, the first
    included, is decided by the guard from bytes."""
    folder = tmp_path / "shm"
    folder.mkdir()
    with serving(shm_off_config(tmp_path, sae_dir)) as server, GuardClient(
            server.addresses[0], hooks=[HOOK], deadline_ms=30_000,
            shared_memory=str(folder)) as client:
        assert client._shm is not None
        first = client.inspect("req", HOOK, x(), [0, 1, 2])
        assert first.source == "guard" and first.action is Action.CONTINUE
        assert not client._shm.enabled
        assert client.counters.shm_fallbacks == 1 and client.counters.shm_batches == 0


def test_client_sends_bytes_once_the_guard_refuses_the_region(
        tmp_path: Path, sae_dir: Path) -> None:
    """When the guard refuses the region anyway (Describe said yes, the registration then
    failed), the first stream ends (that batch gets the failure policy), the client falls
    back to bytes and the guard decides from then on."""
    folder = tmp_path / "shm"
    folder.mkdir()
    with serving(shm_off_config(tmp_path, sae_dir)) as server, GuardClient(
            server.addresses[0], hooks=[HOOK], deadline_ms=30_000, reconnect_backoff_ms=10,
            shared_memory=str(folder)) as client:
        assert client._shm is not None
        client._shm.confirmed = True  # as if Describe had listed the folder
        first = client.inspect("req", HOOK, x(), [0, 1, 2])
        assert first.source == "fail_open"
        wait_until(lambda: client._shm is not None and not client._shm.enabled)
        verdict = first
        for _ in range(100):  # the stream reopens after its backoff
            verdict = client.inspect("req", HOOK, x(), [0, 1, 2])
            if verdict.source == "guard":
                break
            wait_until(lambda: client.state == "open")
        assert verdict.source == "guard" and verdict.action is Action.CONTINUE
        assert client.counters.shm_fallbacks >= 1


# -- configuration ---------------------------------------------------------------------------


def test_config_shared_memory_keys_and_errors() -> None:
    config = parse_config(
        "server:\n  shared_memory:\n    enabled: true\n"
        "    allowed_dirs: [/dev/shm, /var/run/guard-shm/]\n    allowed_uids: [1000]\n"
        "    max_regions_per_stream: 2\n", env={})
    assert config.server.shared_memory == SharedMemoryConfig(
        enabled=True, allowed_dirs=("/dev/shm", "/var/run/guard-shm"), allowed_uids=(1000,),
        max_regions_per_stream=2)
    assert parse_config("", env={}).server.shared_memory.enabled is False
    for text, message in [
        ("enabled: 1", "server.shared_memory.enabled: expected true or false, found 1"),
        ("allowed_dirs: [shm]", "server.shared_memory.allowed_dirs[0]: expected an absolute "
                                "folder path without '..', other than / (a memory-backed "
                                "folder such as /dev/shm), found 'shm'"),
        ("allowed_dirs: [/dev/shm, /]", "server.shared_memory.allowed_dirs[1]: expected an "
                                        "absolute folder path without '..', other than /"),
        ("allowed_dirs: []", "server.shared_memory.allowed_dirs: expected a non-empty list"),
        ("allowed_uids: [-1]", "server.shared_memory.allowed_uids: expected a list of numeric "
                               "user ids"),
        ("max_regions_per_stream: 0", "server.shared_memory.max_regions_per_stream: expected "
                                      "a positive integer, found 0"),
        ("size: 1", "server.shared_memory.size: expected one of the keys"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(f"server:\n  shared_memory:\n    {text}\n", env={})
        assert message in str(caught.value)


def test_rows_are_a_private_copy_and_a_file_cut_short_is_an_error_not_a_crash(
        tmp_path: Path) -> None:
    """The guard reads rows with pread (a mapping's pages past a shrunk file's end would raise
    SIGBUS and kill the guard): later host writes do not reach decoded rows, and a file cut
    short after the range check gets an InvalidInput; a delta written to it grows it back."""
    from guard.sidecar.regions import RegionTable

    path = region_file(tmp_path)
    rows = x()
    put(path, 128, rows.tobytes())
    table = RegionTable(shm_config(tmp_path))
    table.register([("r", str(path), 4096, True)])
    region = table.regions["r"]
    try:
        decoded = table.rows("batch.activations.shm", "r", 128, ROWS_BYTES, "F32", (3, D_IN))
        np.testing.assert_array_equal(decoded, rows)
        assert not decoded.flags.writeable
        put(path, 128, (rows + 1).tobytes())  # the host's later writes do not show through
        np.testing.assert_array_equal(decoded, rows)
        assert held(path) and str(path) not in Path("/proc/self/maps").read_text()
        ref = table.resolve("batch.activations.shm", "r", 128, ROWS_BYTES, "F32", ROWS_BYTES)
        os.truncate(path, 200)  # after the check, before the read: a host gone wrong
        with pytest.raises(InvalidInput, match="shrank to 200 bytes since it was registered "
                                               "with 4096"):
            ref.region.read("batch.activations.shm", ref.offset, ref.length)
        region.write(1024, "F32", rows)  # a steering delta into the lost range
        assert get(path, 1024, ROWS_BYTES) == rows.tobytes()
    finally:
        table.close()
    assert len(table) == 0 and region.closed and not held(path)


def test_a_host_truncating_its_region_while_streaming_never_crashes_the_guard(
        shm_guard: tuple[GuardServer, Path]) -> None:
    """A host shrinking and regrowing its region while batches are read: each batch is
    decided or refused with INVALID_ARGUMENT, and the guard serves on (no SIGBUS)."""
    server, folder = shm_guard
    size = 1 << 20
    path = region_file(folder, "flapping.shm", size=size)
    rows = np.random.default_rng(3).normal(size=(256, D_IN)).astype(np.float32)
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            os.truncate(path, 64)
            os.truncate(path, size)
            put(path, 0, rows.tobytes())

    flapper = threading.Thread(target=flap)
    put(path, 0, rows.tobytes())
    outcomes: set[str] = set()
    with grpc.insecure_channel(server.addresses[0]) as channel:
        client = StreamClient(channel)
        configure(client, registration(path, size=size))
        assert client.ask(shm_batch(rows, 1)).action == pb.ACTION_CONTINUE  # registered
        flapper.start()
        try:
            for sequence in range(2, 302):
                reply = client.ask(shm_batch(rows, sequence))
                if reply.HasField("error"):
                    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    assert "shrank to" in reply.error.message or "NaN" in reply.error.message
                    outcomes.add("refused")
                else:
                    outcomes.add("decided")
        finally:
            stop.set()
            flapper.join()
        client.close()
        assert client.rest() == []
    assert "decided" in outcomes
