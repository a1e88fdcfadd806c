"""Continuous batching on the wire: many requests in one batch, one verdict per request.

A real guard (the first-party detectors and steering of tests/test_plugins_end_to_end.py,
shared memory and the doorbell on, small continuous-batching limits) on a real gRPC channel
and doorbell socket: a step of several requests gets one verdict per request, each what
that request's rows get alone, and one steering delta over every row; bad segments get
per-batch errors naming the field; RequestEnded gets no reply, frees the request, and the
per-request state stays within its cap. A second guard (a sustained detector, the decision
log and two plugins of the tests' own) shows what the end of a request frees: the plugins'
``guard_request_ended`` runs for ended, evicted and still-open requests, a raising plugin
there costs nothing, and the decision log closes the request. The last test drives ``guard
serve`` on the demo's own configuration (its jailbreak detector and dessert steering).
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard import RequestEndReason, hookimpl
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.sidecar.requests import RequestTable
from guard.sidecar.server import GuardServer
from guard.telemetry.instruments import Instruments
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from tests.conftest import HOOK, StreamClient, make_batch
from tests.sae_fixtures import write_saelens
from tests.sidecar import poll, short_socket
from tests.test_doorbell import Doorbell, code_name, doorbell_of
from tests.test_plugins_end_to_end import (
    BATCHES,
    D_IN,
    D_SAE,
    PLUGIN_SETTINGS,
    WATCH,
    WEIGHTS,
)
from tests.test_plugins_end_to_end import rows as driven_rows
from tests.test_shm import configure, get, region_file, registration, shm_config
from tests.test_telemetry import value, wait_spans

MAX_SEGMENTS = 6
MAX_REQUESTS = 3
#: The scenario's requests: quiet, stop (abort), watch (flag + steer row 0), quiet (log).
NAMES = ("req-quiet", "req-stop", "req-steer", "req-log")
PHASES = (pb.PHASE_PROMPT, pb.PHASE_PROMPT, pb.PHASE_GENERATION, pb.PHASE_GENERATION)


@dataclass(frozen=True)
class Guard:
    server: GuardServer
    folder: Path
    metrics: InMemoryMetricReader

    def metric(self, name: str, **labels: str) -> float:
        return value(self.metrics.get_metrics_data(), name, **labels)


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory,
          tracer_provider: TracerProvider) -> Iterator[Guard]:
    tmp = tmp_path_factory.mktemp("steps")
    folder = tmp / "shm"
    folder.mkdir()
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{short_socket('steps')}", drain_grace_seconds=0,
                            shared_memory=shm_config(folder),
                            max_segments_per_batch=MAX_SEGMENTS,
                            max_requests_per_stream=MAX_REQUESTS),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    server = GuardServer(config)  # the limits come from the server section
    server.start()
    try:
        server.set_ready(Engine.load(config, instruments=Instruments(tracer_provider, meters)))
        yield Guard(server, folder, reader)
    finally:
        server.stop(0)
        meters.shutdown()


@pytest.fixture
def channel(guard: Guard) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(guard.server.addresses[0]) as ch:
        yield ch


@pytest.fixture
def stream(channel: grpc.Channel) -> Iterator[StreamClient]:
    client = StreamClient(channel)
    client.configure()
    yield client
    client.close()


def step_batch(parts: Sequence[tuple[str, NDArray[np.float32], int, int]], sequence: int,
               datatype: str = "F32") -> pb.ActivationBatch:
    """One batch of several requests: (request id, rows, first position, phase) each."""
    rows = np.concatenate([part[1] for part in parts])
    batch = make_batch(rows, sequence=sequence, request_id="", datatype=datatype)
    batch.ClearField("phase")
    del batch.positions[:]
    for request_id, x, first, phase in parts:
        batch.positions.extend(range(first, first + len(x)))
        batch.segments.add(request_id=request_id, rows=len(x), phase=pb.Phase.ValueType(phase))
    return batch


def scenario_parts() -> list[tuple[str, NDArray[np.float32], int, int]]:
    return [(name, x, first, phase)
            for name, (x, first), phase in zip(NAMES, BATCHES, PHASES, strict=True)]


def alone(name: str, x: NDArray[np.float32], first: int, phase: int, sequence: int
          ) -> pb.ActivationBatch:
    """The same request as a batch without segments (as a host that predates them)."""
    batch = make_batch(x, sequence=sequence, request_id=name)
    batch.phase = pb.Phase.ValueType(phase)
    del batch.positions[:]
    batch.positions.extend(range(first, first + len(x)))
    return batch


def delta_of(reply: pb.InspectResponse, hook: str = HOOK) -> NDArray[np.float32] | None:
    if not reply.steering:
        return None
    (steering,) = reply.steering
    assert steering.hook == hook
    return codec.decode(steering.delta.datatype, steering.delta.shape, steering.delta.raw)


def ended(*request_ids: str, reason: int = pb.RequestEnded.REASON_FINISHED
          ) -> pb.InspectRequest:
    return pb.InspectRequest(ended=pb.RequestEnded(
        request_ids=list(request_ids), reason=pb.RequestEnded.Reason.ValueType(reason)))


# -- one verdict per request ----------------------------------------------------------------


def check_step_against_singles(step: pb.InspectResponse, singles: Sequence[pb.InspectResponse],
                               parts: Sequence[tuple[str, NDArray[np.float32], int, int]]
                               ) -> None:
    assert not step.HasField("error"), step.error
    assert [v.request_id for v in step.verdicts] == [p[0] for p in parts]
    for verdict, single in zip(step.verdicts, singles, strict=True):
        assert not single.verdicts, "a batch without segments gets no verdicts"
        assert verdict.action == single.action
        assert verdict.decision_id and verdict.decision_id != single.decision_id
        assert list(verdict.findings) == list(single.findings)
        assert verdict.details == single.details
        assert list(verdict.positions) == list(single.positions)
    assert len({v.decision_id for v in step.verdicts}) == len(parts)
    assert step.action == max(s.action for s in singles) == pb.ACTION_ABORT
    assert step.details == "request req-stop: " + singles[1].details
    assert not step.decision_id and not step.findings
    assert list(step.positions) == [p for part in parts
                                    for p in range(part[2], part[2] + len(part[1]))]
    delta = delta_of(step)
    assert delta is not None and delta.shape == (sum(len(p[1]) for p in parts), D_IN)
    start = 0
    for (_, x, _, _), single in zip(parts, singles, strict=True):
        rows = delta[start:start + len(x)]
        alone_delta = delta_of(single)
        if alone_delta is None:
            assert not rows.any(), "rows of a request that is not steered must be zero"
        else:
            np.testing.assert_array_equal(rows, alone_delta)
            assert rows.any()
        start += len(x)


def test_a_step_gets_per_request_verdicts_equal_to_each_request_alone(
    stream: StreamClient,
) -> None:
    parts = scenario_parts()
    singles = [stream.ask(alone(name, x, first, phase, sequence))
               for sequence, (name, x, first, phase) in enumerate(parts, start=1)]
    actions = [s.action for s in singles]
    assert actions == [pb.ACTION_CONTINUE, pb.ACTION_ABORT, pb.ACTION_STEER, pb.ACTION_CONTINUE]
    check_step_against_singles(stream.ask(step_batch(parts, len(parts) + 1)), singles, parts)


def test_a_step_on_the_doorbell_gets_the_same_verdicts(guard: Guard) -> None:
    parts = scenario_parts()
    bell = Doorbell(doorbell_of(guard.server))
    try:
        bell.configure()
        singles = [bell.ask(alone(name, x, first, phase, sequence))
                   for sequence, (name, x, first, phase) in enumerate(parts, start=1)]
        bell.send(ended("req-quiet", "never-seen"))  # no frame comes back for it
        step = bell.ask(step_batch(parts, len(parts) + 1))
        assert step.sequence == len(parts) + 1
        check_step_against_singles(step, singles, parts)
        assert bell.finish() == []
    finally:
        bell.close()


def test_a_single_segment_batch_gets_one_verdict(stream: StreamClient) -> None:
    name, x, first, phase = scenario_parts()[1]
    reply = stream.ask(step_batch([(name, x, first, phase)], 1))
    (verdict,) = reply.verdicts
    assert (verdict.request_id, verdict.action) == (name, pb.ACTION_ABORT)
    assert reply.action == pb.ACTION_ABORT and not reply.steering


def test_the_step_delta_goes_into_the_steering_ref_over_every_row(
    guard: Guard, stream: StreamClient,
) -> None:
    parts = scenario_parts()
    nbytes = sum(len(p[1]) for p in parts) * D_IN * 4
    path = region_file(guard.folder, "steps.shm", size=1 << 16, mode=0o600)
    try:
        bytes_reply = stream.ask(step_batch(parts, 1))
        by_bytes = delta_of(bytes_reply)
        assert by_bytes is not None
        with grpc.insecure_channel(guard.server.addresses[0]) as channel:
            client = StreamClient(channel)
            configure(client, registration(path, size=1 << 16, writable=True))
            batch = step_batch(parts, 1)
            batch.steering_ref.CopyFrom(pb.SharedMemoryRef(region="r", offset=4096,
                                                           length=nbytes))
            reply = client.ask(batch)
            assert client.rest() == []
        (steering,) = reply.steering
        assert steering.delta.HasField("shm") and not steering.delta.raw
        assert list(steering.delta.shape) == [len(batch.positions), D_IN]
        written = codec.decode("F32", steering.delta.shape, get(path, 4096, nbytes))
        np.testing.assert_array_equal(written, by_bytes)
        assert [v.action for v in reply.verdicts] == [v.action for v in bytes_reply.verdicts]
    finally:
        path.unlink()


def test_one_span_per_step_with_the_request_ids_and_an_event_per_verdict(
    stream: StreamClient, spans: InMemorySpanExporter,
) -> None:
    parts = scenario_parts()
    reply = stream.ask(step_batch(parts, 1))
    stream.ask(make_batch(sequence=2))  # its arrival ends the step's span at the latest
    wait_spans(spans, "guard.inspect", 2)
    (span,) = [s for s in spans.get_finished_spans() if s.name == "guard.inspect"
               and (s.attributes or {}).get("guard.sequence") == 1]
    attributes = span.attributes or {}
    assert list(attributes["guard.request_ids"]) == list(NAMES)  # type: ignore[arg-type]
    assert attributes["guard.decision.action"] == "abort"
    verdicts = [e for e in span.events if e.name == "guard.verdict"]
    assert [(e.attributes or {})["guard.request_id"] for e in verdicts] == list(NAMES)
    assert [(e.attributes or {})["guard.decision.id"] for e in verdicts] == [
        v.decision_id for v in reply.verdicts]
    findings = [e for e in span.events if e.name == "guard.finding"]
    assert {(e.attributes or {})["guard.request_id"] for e in findings} == {
        "req-stop", "req-steer", "req-log"}


# -- bad segments ---------------------------------------------------------------------------


def _rows(n: int) -> NDArray[np.float32]:
    return BATCHES[0][0][:1].repeat(n, axis=0)


BAD_STEPS: dict[str, tuple[list[tuple[str, int]], int, str, str]] = {
    # name: ([(request id, rows)], tensor rows, status, fragment of the message)
    "rows sum short": ([("a", 2), ("b", 1)], 4, "INVALID_ARGUMENT",
                       "batch.segments: the segments' rows sum to 3, expected the 4 rows"),
    "rows sum over": ([("a", 2), ("b", 3)], 4, "INVALID_ARGUMENT",
                      "batch.segments: the segments' rows sum to 5, expected the 4 rows"),
    "empty request id": ([("a", 2), ("", 2)], 4, "INVALID_ARGUMENT",
                         "batch.segments[1].request_id: expected a non-empty request id"),
    "repeated request id": ([("a", 1), ("b", 1), ("a", 2)], 4, "INVALID_ARGUMENT",
                            "batch.segments[2].request_id: 'a' is already segments[0]'s"),
    "a segment of no rows": ([("a", 4), ("b", 0)], 4, "INVALID_ARGUMENT",
                             "batch.segments[1].rows: expected at least 1 row, found 0"),
    "too many segments": ([(f"r{i}", 1) for i in range(MAX_SEGMENTS + 1)], MAX_SEGMENTS + 1,
                          "RESOURCE_EXHAUSTED",
                          f"batch.segments: {MAX_SEGMENTS + 1} segments exceed the limit of "
                          f"{MAX_SEGMENTS} per batch"),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_segments_get_a_per_batch_error_and_the_stream_goes_on(
    stream: StreamClient, case: str,
) -> None:
    segments, n_rows, status, fragment = BAD_STEPS[case]
    batch = make_batch(_rows(n_rows), sequence=1, request_id="")
    for request_id, rows in segments:
        batch.segments.add(request_id=request_id, rows=rows, phase=pb.PHASE_PROMPT)
    reply = stream.ask(batch)
    assert reply.HasField("error"), reply
    assert code_name(pb.StreamEnd(code=reply.error.code)) == status  # a status number
    assert fragment in reply.error.message
    assert not reply.verdicts and reply.action == pb.ACTION_UNSPECIFIED
    good = stream.ask(step_batch([("a", _rows(2), 0, pb.PHASE_PROMPT)], 2))
    assert not good.HasField("error") and [v.request_id for v in good.verdicts] == ["a"]


def test_the_limit_of_segments_is_allowed_and_described(
    channel: grpc.Channel, stream: StreamClient,
) -> None:
    parts = [(f"r{i}", _rows(1), 0, pb.PHASE_GENERATION) for i in range(MAX_SEGMENTS)]
    reply = stream.ask(step_batch(parts, 1))
    assert [v.action for v in reply.verdicts] == [pb.ACTION_CONTINUE] * MAX_SEGMENTS
    described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    assert described.max_segments_per_batch == MAX_SEGMENTS
    assert described.max_requests_per_stream == MAX_REQUESTS


# -- the request lifecycle -------------------------------------------------------------------


def test_request_ended_gets_no_reply_frees_known_requests_and_counts_unknown_ones(
    guard: Guard, stream: StreamClient,
) -> None:
    before = {name: guard.metric(name) for name in (
        "guard.requests.ended", "guard.requests.unknown_ended", "guard.requests.evicted")}
    finished = guard.metric("guard.requests.ended", guard__request__end_reason="finished")
    sequence = 0
    for request_id in ("r1", "r2", "r3", "r4"):  # r4 evicts r1: MAX_REQUESTS is 3
        sequence += 1
        assert stream.ask(step_batch([(request_id, _rows(1), 0, pb.PHASE_PROMPT)],
                                     sequence)).verdicts
    stream.send(ended("r1", "r2", "never-seen"))
    stream.send(ended("r3", "r2", reason=pb.RequestEnded.REASON_PREEMPTED))
    sequence += 1
    reply = stream.ask(make_batch(sequence=sequence, request_id="r5"))
    assert reply.sequence == sequence and reply.skipped_sequences == 0  # no reply in between
    after = {name: guard.metric(name) for name in before}
    assert after["guard.requests.evicted"] - before["guard.requests.evicted"] == 1
    assert after["guard.requests.unknown_ended"] - before["guard.requests.unknown_ended"] == 3
    assert after["guard.requests.ended"] - before["guard.requests.ended"] == 2
    assert guard.metric("guard.requests.ended",
                        guard__request__end_reason="finished") - finished == 1
    assert stream.rest() == []


def test_request_ended_before_the_config_ends_the_stream(channel: grpc.Channel) -> None:
    call = pb_grpc.GuardStub(channel).Inspect(iter([ended("r1")]), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "found a RequestEnded" in str(error.value.details())


def test_the_request_table_evicts_the_least_recently_seen_first() -> None:
    table = RequestTable(2)
    assert table.seen("a", 3) is None and table.seen("b", 1) is None
    assert table.seen("a", 2) is None  # a is now the most recent
    assert table.seen("c", 1) == "b"  # so b goes
    assert "b" not in table and table.evicted == 1
    state = table.get("a")
    assert state is not None and (state.batches, state.rows) == (2, 5)
    freed, unknown = table.end(["a", "b", "a"])
    assert list(freed) == ["a"] and unknown == 2 and len(table) == 1
    assert table.clear() == ["c"] and len(table) == 0
    with pytest.raises(ValueError, match="capacity"):
        RequestTable(0)


# -- what the end of a request frees ---------------------------------------------------------

#: The sustained detector of the lifecycle guard: WATCH on WINDOW consecutive tokens.
WINDOW = 4


class EndProbe:
    """Records every ``guard_request_ended`` call, as (request id, reason)."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        with self._lock:
            self.ended.append((request_id, reason))

    def wait(self, request_id: str, reason: str) -> None:
        poll(lambda: (request_id, reason) in self.ended, 30,
             f"guard_request_ended({request_id!r}, {reason!r})")


class RaisingOnEnd:
    """A plugin whose ``guard_request_ended`` always raises (registered before the probe)."""

    @hookimpl
    def guard_request_ended(self, request_id: str) -> None:
        raise RuntimeError(f"cannot forget {request_id}")


@dataclass(frozen=True)
class LifecycleGuard:
    server: GuardServer
    engine: Engine
    probe: EndProbe
    decision_log: Path


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LifecycleGuard]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    decision_log = tmp / "decisions.jsonl"
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{short_socket('ends')}", drain_grace_seconds=0,
                            max_requests_per_stream=MAX_REQUESTS),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(enabled=("detectors", "decision_log"), timeout_ms=30_000, config={
            "detectors": {"drift": {"type": "sustained", "hook": HOOK, "features": [WATCH],
                                    "threshold": 2.0, "window": WINDOW, "action": "flag"}},
            "decision_log": {"path": str(decision_log)},
        }),
    )
    probe = EndProbe()
    server = GuardServer(config)
    server.start()
    try:
        engine = Engine.load(config, extra_plugins=[
            PluginSource("raising", "0", RaisingOnEnd), PluginSource("probe", "0", probe)])
        server.set_ready(engine)
        yield LifecycleGuard(server, engine, probe, decision_log)
    finally:
        server.stop(0)


@pytest.fixture
def lifecycle_stream(lifecycle: LifecycleGuard) -> Iterator[StreamClient]:
    with grpc.insecure_channel(lifecycle.server.addresses[0]) as channel:
        client = StreamClient(channel)
        client.configure()
        yield client
        client.close()


def watching(n: int) -> NDArray[np.float32]:
    """``n`` rows on which the sustained detector's feature is over its threshold."""
    return driven_rows(n, 7, {row: {WATCH: 3.0} for row in range(n)})


def drifted(reply: pb.InspectResponse) -> dict[str, bool]:
    """Request id -> whether the sustained detector fired on its rows."""
    assert not reply.HasField("error"), reply.error
    return {v.request_id: any(f.detector == "drift" for f in v.findings)
            for v in reply.verdicts}


def test_an_ended_request_starts_its_sustained_count_afresh(
    lifecycle: LifecycleGuard, lifecycle_stream: StreamClient,
) -> None:
    half = WINDOW // 2
    first = step_batch([("end-kept", watching(half), 0, pb.PHASE_GENERATION),
                        ("end-ended", watching(half), 0, pb.PHASE_GENERATION)], 1)
    assert drifted(lifecycle_stream.ask(first)) == {"end-kept": False, "end-ended": False}

    lifecycle_stream.send(ended("end-ended", reason=pb.RequestEnded.REASON_FINISHED))
    lifecycle.probe.wait("end-ended", "finished")

    # The next tokens of both: "end-kept" reaches the window, "end-ended" (its id used again,
    # for a new request) counts from zero. (A preempted request keeps its count until its
    # rows are resent from the start: tests/test_plugin_detectors.py.)
    second = step_batch([("end-kept", watching(half), half, pb.PHASE_GENERATION),
                         ("end-ended", watching(half), half, pb.PHASE_GENERATION)], 2)
    assert drifted(lifecycle_stream.ask(second)) == {"end-kept": True, "end-ended": False}
    assert ("end-kept", "finished") not in lifecycle.probe.ended


def test_an_evicted_request_ends_for_the_plugins(
    lifecycle: LifecycleGuard, lifecycle_stream: StreamClient,
) -> None:
    half = WINDOW // 2
    reply = lifecycle_stream.ask(step_batch([("evict-1", watching(half), 0,
                                              pb.PHASE_GENERATION)], 1))
    assert drifted(reply) == {"evict-1": False}
    for sequence, request_id in enumerate(("evict-2", "evict-3", "evict-4"), start=2):
        lifecycle_stream.ask(step_batch([(request_id, _rows(1), 0, pb.PHASE_PROMPT)],
                                        sequence))
    lifecycle.probe.wait("evict-1", "evicted")  # MAX_REQUESTS is 3: the oldest went
    assert [r for r, _ in lifecycle.probe.ended if r.startswith("evict-")] == ["evict-1"]
    # Its run went with it: its next tokens count from zero.
    reply = lifecycle_stream.ask(step_batch([("evict-1", watching(half), half,
                                              pb.PHASE_GENERATION)], 5))
    assert drifted(reply) == {"evict-1": False}


def test_a_closed_streams_open_requests_end(lifecycle: LifecycleGuard) -> None:
    with grpc.insecure_channel(lifecycle.server.addresses[0]) as channel:
        client = StreamClient(channel)
        client.configure()
        client.ask(step_batch([("close-1", _rows(1), 0, pb.PHASE_PROMPT),
                               ("close-2", _rows(1), 0, pb.PHASE_PROMPT)], 1))
        client.send(ended("close-2"))
        assert client.rest() == []
    lifecycle.probe.wait("close-1", "stream_closed")
    lifecycle.probe.wait("close-2", "finished")
    assert [e for e in lifecycle.probe.ended if e[0].startswith("close-")] == [
        ("close-2", "finished"), ("close-1", "stream_closed")]


def test_a_plugin_that_raises_on_an_end_breaks_nothing(
    lifecycle: LifecycleGuard, lifecycle_stream: StreamClient,
) -> None:
    failures = lifecycle.engine.plugin_set.failures
    before = failures[("raising", "guard_request_ended")]
    reply = lifecycle_stream.ask(step_batch([("raise-1", _rows(1), 0, pb.PHASE_PROMPT)], 1))
    assert [v.action for v in reply.verdicts] == [pb.ACTION_CONTINUE]
    lifecycle_stream.send(ended("raise-1"))
    lifecycle.probe.wait("raise-1", "finished")  # the plugin after the raising one ran
    assert failures[("raising", "guard_request_ended")] > before
    reply = lifecycle_stream.ask(step_batch([("raise-2", _rows(1), 0, pb.PHASE_PROMPT)], 2))
    assert not reply.HasField("error") and [v.action for v in reply.verdicts] == [
        pb.ACTION_CONTINUE]


def test_the_decision_log_closes_an_ended_request_after_its_decisions(
    lifecycle: LifecycleGuard, lifecycle_stream: StreamClient,
) -> None:
    reply = lifecycle_stream.ask(step_batch([("log-1", _rows(2), 0, pb.PHASE_PROMPT),
                                             ("log-2", _rows(1), 0, pb.PHASE_PROMPT)], 1))
    lifecycle_stream.send(ended("log-1", reason=pb.RequestEnded.REASON_ABORTED))
    lifecycle.probe.wait("log-1", "aborted")  # the log comes before the probe

    lines = [json.loads(line) for line in lifecycle.decision_log.read_text().splitlines()]
    mine = [line for line in lines if line["request_id"] == "log-1"]
    assert [line["event"] for line in mine] == ["decision", "request ended"]
    assert mine[0]["decision_id"] == reply.verdicts[0].decision_id
    assert mine[1] == {"event": "request ended", "request_id": "log-1", "reason": "aborted",
                       "timestamp": mine[1]["timestamp"]}
    assert not any(line["event"] == "request ended" and line["request_id"] == "log-2"
                   for line in lines)  # still open


# -- the demo's guard ------------------------------------------------------------------------

DEMO_HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def demo_guard() -> Iterator[tuple[str, Path]]:
    """``guard serve`` on the embedded demo configuration (jailbreak detector, dessert
    steering, decision log) with its own SAE."""
    from guard.demo.runner import sidecar

    with tempfile.TemporaryDirectory(prefix="guard-steps-") as folder:
        state = Path(folder)
        with sidecar(state, short_socket("demo-steps")) as address:
            yield address, state / "decisions.jsonl"


def demo_rows() -> dict[str, NDArray[np.float32]]:
    """Rows for the demo's detectors: nothing of note (the SAE's b_dec), rows its jailbreak
    probe scores well above its threshold, and rows that drive the food feature (3725) that
    its dessert steering answers."""
    import yaml
    from safetensors.numpy import load_file

    weights = load_file(str(Path(__file__).resolve().parent.parent / "guard" / "defaults"
                            / "saes" / "smollm2-135m-instruct" / DEMO_HOOK
                            / "sae_weights.safetensors"))
    w_enc = weights["W_enc"].astype(np.float32)
    b_dec = weights["b_dec"].astype(np.float32)

    def driving(feature: int, strength: float, n: int) -> NDArray[np.float32]:
        # (x - b_dec) @ W_enc[:, f] == strength: the feature's pre-activation is raised by it.
        direction = w_enc[:, feature] / float(w_enc[:, feature] @ w_enc[:, feature])
        return np.tile(b_dec + strength * direction, (n, 1)).astype(np.float32)

    demo = yaml.safe_load((Path(__file__).resolve().parent.parent / "guard" / "defaults"
                           / "demo.yaml").read_text(encoding="utf-8"))
    probe = demo["plugins"]["config"]["detectors"]["jailbreak"]
    w = np.asarray(probe["weights"], dtype=np.float64)
    # b_dec moved along the probe's weights until its score is 4 above the threshold.
    lift = (float(probe["threshold"]) + 4.0 - float(probe.get("bias", 0.0)) - w @ b_dec) / (w @ w)
    jailbreak = np.tile(b_dec + lift * w, (4, 1)).astype(np.float32)
    return {"benign": np.tile(b_dec, (3, 1)), "jailbreak": jailbreak,
            "food": driving(3725, 2.0, 2)}


def test_the_demo_guard_answers_a_step_of_three_requests(
    demo_guard: tuple[str, Path],
) -> None:
    address, decision_log = demo_guard
    rows = demo_rows()
    parts = [("benign", rows["benign"], 0, pb.PHASE_PROMPT),
             ("jailbreak", rows["jailbreak"], 0, pb.PHASE_PROMPT),
             ("dessert", rows["food"], 7, pb.PHASE_GENERATION)]
    with grpc.insecure_channel(address) as channel:
        client = StreamClient(channel)
        client.configure(hooks=[DEMO_HOOK])
        batch = step_batch(parts, 1)
        batch.hook = DEMO_HOOK
        reply = client.ask(batch)
        assert not reply.HasField("error"), reply.error
        assert [(v.request_id, v.action) for v in reply.verdicts] == [
            ("benign", pb.ACTION_CONTINUE), ("jailbreak", pb.ACTION_ABORT),
            ("dessert", pb.ACTION_STEER)]
        assert reply.action == pb.ACTION_ABORT
        assert "jailbreak" in reply.verdicts[1].details
        assert [f.detector for f in reply.verdicts[1].findings] == ["jailbreak"]
        delta = delta_of(reply, DEMO_HOOK)
        assert delta is not None and delta.shape == (9, 576)
        assert not delta[:7].any(), "the benign and aborted requests' rows must be zero"
        assert delta[7:].any(axis=1).all()  # the dessert steering nudges every row that fired
        # The steered request alone gets the very same rows of delta.
        single = make_batch(rows["food"], sequence=2, request_id="dessert-alone")
        single.hook, single.phase = DEMO_HOOK, pb.PHASE_GENERATION
        single.positions[:] = [7, 8]
        alone_reply = client.ask(single)
        assert alone_reply.action == pb.ACTION_STEER and not alone_reply.verdicts
        alone_delta = delta_of(alone_reply, DEMO_HOOK)
        assert alone_delta is not None
        np.testing.assert_array_equal(delta[7:], alone_delta)
        client.send(ended("benign", "jailbreak", "dessert"))
        assert client.rest() == []
    ids = {v.request_id: v.decision_id for v in reply.verdicts}
    records = _wait_records(decision_log, set(ids.values()))
    assert {r["decision_id"]: r["request_id"] for r in records
            if r.get("decision_id") in ids.values()} == {d: r for r, d in ids.items()}
    # The RequestEnded closes the three requests in the log, after their decisions.
    poll(lambda: {r["request_id"] for r in _read_records(decision_log)
                  if r["event"] == "request ended"} >= set(ids), 30, "the requests' ends")
    order = [(r["event"], r["request_id"]) for r in _read_records(decision_log)
             if r["request_id"] in ids]
    for request_id in ids:
        assert order.index(("request ended", request_id)) > order.index(("decision",
                                                                          request_id))


def _wait_records(path: Path, decision_ids: set[str]) -> list[dict[str, Any]]:
    """The decision log's records, once it holds every one of ``decision_ids``."""
    poll(lambda: decision_ids <= {r.get("decision_id") for r in _read_records(path)}, 30,
         "the step's decision records")
    return _read_records(path)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of the decision log (decisions and request ends)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
