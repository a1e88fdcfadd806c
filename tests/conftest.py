"""Shared fixtures: SAEs on disk, a running guard server, and a stream client."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
from numpy.typing import NDArray
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from guard.config import GuardConfig, LoggingConfig, SaeConfig, ServerConfig
from guard.engine.core import Engine
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.sae_fixtures import write_saelens

HOOK = "blocks.6.hook_resid_post"
D_IN = 16
D_SAE = 64


def log_through_logging() -> None:
    """Send structlog's lines (the guards, servers and clients run in the test process)
    through the standard library's logging, which pytest captures per test (shown with a
    failure) and drops between tests. Left unconfigured, structlog prints to the real
    stdout: a line that a server or client thread writes after its test ended (``stream
    closed``, ``guard stream down``) landed in the middle of pytest's progress output."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.set_exc_info,
                    structlog.dev.ConsoleRenderer(
                        colors=False, exception_formatter=structlog.dev.plain_traceback)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    for name in ("guard", "guard_plugins"):  # info lines too, whatever the root's level
        logging.getLogger(name).setLevel(logging.INFO)


def pytest_configure(config: pytest.Config) -> None:
    log_through_logging()


@pytest.fixture(autouse=True)
def _structlog_through_logging() -> Iterator[None]:
    yield
    log_through_logging()  # a test may have reset structlog to its stdout default


@pytest.fixture(scope="session")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SAELens SAE (d_in 16, d_sae 64) on blocks.6.hook_resid_post."""
    return write_saelens(tmp_path_factory.mktemp("sae") / "sae", D_IN, D_SAE, hook_name=HOOK)


def make_config(tmp_path: Path, sae_dir: Path, **server: Any) -> GuardConfig:
    listen = server.pop("listen", f"unix://{tmp_path}/guard.sock")
    return GuardConfig(
        server=ServerConfig(listen=listen, **server),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir, features="all"),),
    )


@pytest.fixture
def running_server(tmp_path: Path, sae_dir: Path) -> Iterator[GuardServer]:
    """A ready guard on a Unix socket and an ephemeral TCP port, stopped after the test."""
    config = make_config(tmp_path, sae_dir, tcp_listen="127.0.0.1:0", drain_grace_seconds=1)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    yield server
    server.stop(0)


class StreamClient:
    """Drives one Inspect stream message by message (INLINE style)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[pb.InspectRequest | None] = queue.Queue()
        stub = pb_grpc.GuardStub(channel)
        self._call = stub.Inspect(self._iterate(), timeout=30)
        self._responses = iter(self._call)

    def _iterate(self) -> Iterator[pb.InspectRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: pb.InspectRequest) -> None:
        self._requests.put(request)

    def configure(self, hooks: list[str] | None = None, mode: int = pb.MODE_INLINE) -> None:
        config = pb.StreamConfig(mode=pb.Mode.ValueType(mode), hooks=hooks or [HOOK])
        self.send(pb.InspectRequest(config=config))

    def ask(self, batch: pb.ActivationBatch) -> pb.InspectResponse:
        self.send(pb.InspectRequest(batch=batch))
        return next(self._responses)

    def next(self) -> pb.InspectResponse:
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)

    def rest(self) -> list[pb.InspectResponse]:
        self.close()
        return list(self._responses)


def make_batch(
    rows: NDArray[np.float32] | None = None,
    *,
    sequence: int = 1,
    hook: str = HOOK,
    request_id: str = "req-1",
    datatype: str = "F32",
    n_rows: int = 3,
    width: int = D_IN,
) -> pb.ActivationBatch:
    if rows is None:
        rows = np.random.default_rng(sequence).normal(size=(n_rows, width)).astype(np.float32)
    from guard.wire import codec

    shape, raw = codec.encode(rows, datatype)
    return pb.ActivationBatch(
        request_id=request_id,
        sequence=sequence,
        hook=hook,
        activations=pb.Tensor(datatype=datatype, shape=shape, raw=raw),
        positions=list(range(rows.shape[0])),
        token_ids=[100 + i for i in range(rows.shape[0])],
        phase=pb.PHASE_PROMPT,
    )


@pytest.fixture
def channel(running_server: GuardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(running_server.addresses[0]) as ch:
        yield ch


@pytest.fixture
def stream(channel: grpc.Channel) -> Iterator[StreamClient]:
    client = StreamClient(channel)
    yield client
    client.close()


# -- OpenTelemetry: one global tracer provider per test process ---------------------------


@pytest.fixture(scope="session")
def tracer_provider() -> TracerProvider:
    """OpenTelemetry's global provider for this test process (globals are set once)."""
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another global tracer provider is already set in this process")
    return provider


@pytest.fixture(scope="session")
def session_spans(tracer_provider: TracerProvider) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(session_spans: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The spans finished during one test."""
    session_spans.clear()
    yield session_spans
    session_spans.clear()
