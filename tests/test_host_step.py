"""The host SDK's engine steps (issue 13, item 3): ``inspect_step`` and ``end_requests`` on
:class:`guard.host.GuardClient` and :class:`guard.host.AsyncGuardClient`, against a real
in-process guard (the first-party detectors and steering of
tests/test_plugins_end_to_end.py, shared memory and its doorbell on), over gRPC, gRPC with
shared memory, and the doorbell: one verdict per request with the right action, a step delta
that is zero on the other requests' rows, the failure policy for every request of a step,
boundary validation, and RequestEnded reaching the guard without a reply."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from numpy.typing import NDArray
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.host import AsyncGuardClient, GuardClient, Segment, StepVerdict, Verdict
from guard.host.shm import SharedMemory
from guard.sidecar.server import GuardServer
from guard.telemetry.instruments import Instruments
from tests.conftest import HOOK
from tests.sae_fixtures import write_saelens
from tests.sidecar import poll, short_socket
from tests.test_plugins_end_to_end import BATCHES, D_IN, D_SAE, PLUGIN_SETTINGS, WEIGHTS
from tests.test_shm import shm_config
from tests.test_telemetry import value, wait_spans

MAX_SEGMENTS = 4
#: Three requests of one step: quiet (CONTINUE), stop (ABORT), steer (STEER).
NAMES = ("req-quiet", "req-stop", "req-steer")
PHASES: tuple[Literal["prompt", "generation"], ...] = ("prompt", "prompt", "generation")
EXPECTED = [Action.CONTINUE, Action.ABORT, Action.STEER]
Transport = Literal["grpc", "grpc+shm", "doorbell"]
TRANSPORTS: tuple[Transport, ...] = ("grpc", "grpc+shm", "doorbell")


@dataclass(frozen=True)
class Guard:
    address: str
    folder: Path
    metrics: InMemoryMetricReader

    def ended(self) -> float:
        return value(self.metrics.get_metrics_data(), "guard.requests.ended")


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory,
          tracer_provider: TracerProvider) -> Iterator[Guard]:
    tmp = tmp_path_factory.mktemp("host-step")
    folder = tmp / "shm"
    folder.mkdir()
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{short_socket('hstep')}", drain_grace_seconds=0,
                            shared_memory=shm_config(folder),
                            max_segments_per_batch=MAX_SEGMENTS),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    server = GuardServer(config)
    server.start()
    try:
        server.set_ready(Engine.load(config, instruments=Instruments(tracer_provider, meters)))
        yield Guard(server.addresses[0], folder, reader)
    finally:
        server.stop(0)
        meters.shutdown()


def step_args() -> tuple[NDArray[np.float32], list[Segment], list[int]]:
    """The three requests' rows as one step: rows, segments, positions."""
    parts = list(zip(NAMES, BATCHES[:3], PHASES, strict=True))
    rows = np.concatenate([x for _, (x, _), _ in parts]).astype(np.float32)
    segments = [Segment(name, len(x), phase, {"tenant": name})
                for name, (x, _), phase in parts]
    positions = [p for _, (x, first), _ in parts for p in range(first, first + len(x))]
    return rows, segments, positions


def client_kwargs(guard: Guard, transport: Transport) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"hooks": [HOOK], "deadline_ms": 30_000}
    if transport != "grpc":
        kwargs["shared_memory"] = SharedMemory(directory=str(guard.folder),
                                               doorbell=transport == "doorbell")
    return kwargs


def check_step(step: StepVerdict, segments: list[Segment], positions: list[int]) -> None:
    assert step.source == "guard" and step.sequence > 0 and not step.decided_by_policy
    assert step.request_ids == NAMES and len(step) == 3
    assert [v.action for v in step] == EXPECTED
    assert step.action is Action.ABORT
    assert all(v.source == "guard" and v.sequence == step.sequence for v in step)
    assert len({v.decision_id for v in step}) == 3 and all(v.decision_id for v in step)
    stop = step.verdict("req-stop")
    assert stop.details and stop.findings
    start = 0
    delta = step.steering[HOOK]
    assert delta.shape == (len(positions), D_IN)
    for segment, verdict in zip(segments, step.verdicts, strict=True):
        rows = slice(start, start + segment.rows)
        assert verdict.positions == tuple(positions[rows])
        if verdict.action is Action.STEER:
            assert delta[rows].any()
            np.testing.assert_array_equal(verdict.steering[HOOK], delta[rows])
        else:
            assert not delta[rows].any(), f"{verdict.request_id}'s rows must be zero"
            assert not verdict.steering
        start += segment.rows


# -- a step of three requests, then RequestEnded ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_step_of_three_requests_gets_three_verdicts_then_end_requests(
    guard: Guard, transport: Transport,
) -> None:
    rows, segments, positions = step_args()
    with GuardClient(guard.address, **client_kwargs(guard, transport)) as client:
        step = client.inspect_step(HOOK, rows, segments, positions)
        assert client.transport == ("doorbell" if transport == "doorbell" else "grpc")
        check_step(step, segments, positions)
        # The steered request alone gets the very same rows of delta.
        x, first = BATCHES[2]
        alone = client.inspect("req-steer-alone", HOOK, x, range(first, first + len(x)),
                               phase="generation")
        assert alone.action is Action.STEER
        np.testing.assert_array_equal(alone.steering[HOOK],
                                      step.verdict("req-steer").steering[HOOK])
        before = guard.ended()
        assert client.end_requests(NAMES) is True
        assert client.end_requests(["never-seen"], reason="aborted") is True
        after_step = client.inspect("req-next", HOOK, x, range(len(x)))
        assert after_step.source == "guard"
        # RequestEnded takes no sequence number and gets no reply: nothing waits for one.
        assert after_step.sequence == alone.sequence + 1
        assert guard.ended() - before == 3  # handled in order, before the batch behind it
        counts = client.counters
        assert (counts.sent, counts.replies, counts.requests_ended) == (3, 3, 4)
        assert (counts.fail_open, counts.errors, counts.late_replies) == (0, 0, 0)
        if transport != "grpc":
            assert counts.shm_batches == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_async_client_gets_the_same_step_verdicts(
    guard: Guard, transport: Transport,
) -> None:
    rows, segments, positions = step_args()

    async def main() -> tuple[StepVerdict, Verdict, float, float]:
        async with AsyncGuardClient(guard.address, **client_kwargs(guard, transport)) as client:
            step = await client.inspect_step(HOOK, rows, segments, positions)
            assert client.transport == ("doorbell" if transport == "doorbell" else "grpc")
            before = guard.ended()
            assert await client.end_requests(list(NAMES), reason="finished") is True
            x, _ = BATCHES[0]
            after = await client.inspect("req-next", HOOK, x, range(len(x)))
            assert client.counters.requests_ended == 3
            return step, after, before, guard.ended()

    step, after, before, ended = asyncio.run(main())
    check_step(step, segments, positions)
    assert after.source == "guard" and after.sequence == step.sequence + 1
    assert ended - before == 3


def test_concurrent_steps_and_ends_pipeline_on_one_stream(guard: Guard) -> None:
    rows, segments, positions = step_args()
    results: list[StepVerdict] = []
    lock = threading.Lock()
    with GuardClient(guard.address, **client_kwargs(guard, "doorbell")) as client:

        def work(index: int) -> None:
            own = [Segment(f"{s.request_id}-{index}", s.rows, s.phase) for s in segments]
            step = client.inspect_step(HOOK, rows, own, positions)
            client.end_requests([s.request_id for s in own])
            with lock:
                results.append(step)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.counters.late_replies == 0
    assert len(results) == 4
    assert all([v.action for v in step] == EXPECTED for step in results)


# -- the failure policy, per request ------------------------------------------------------------


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_every_request_of_a_step_gets_the_policy_when_the_guard_is_down(
    tmp_path: Path, policy: Literal["open", "closed"],
) -> None:
    rows, segments, positions = step_args()
    source = "fail_open" if policy == "open" else "fail_closed"
    action = Action.CONTINUE if policy == "open" else Action.ABORT
    target = f"unix://{tmp_path}/nobody.sock"
    with GuardClient(target, failure_policy=policy, reconnect_backoff_ms=5_000) as client:
        assert client.end_requests(NAMES) is False  # no stream yet: nothing to end
        step = client.inspect_step(HOOK, rows, segments, positions)
        assert client.end_requests(NAMES) is False  # the stream is down
        counts = client.counters
        assert (counts.unavailable, getattr(counts, source), counts.requests_ended) == (1, 1, 0)

    async def main() -> StepVerdict:
        async with AsyncGuardClient(target, failure_policy=policy) as aclient:
            return await aclient.inspect_step(HOOK, rows, segments, positions)

    for answer in (step, asyncio.run(main())):
        assert answer.source == source and answer.decided_by_policy
        assert answer.cause == "unavailable" and answer.reason
        assert answer.request_ids == NAMES and answer.action is action
        assert not answer.steering
        start = 0
        for segment, verdict in zip(segments, answer, strict=True):
            assert (verdict.source, verdict.action, verdict.cause) == (
                source, action, "unavailable")
            assert verdict.positions == tuple(positions[start:start + segment.rows])
            assert bool(verdict.details) == (action is Action.ABORT)
            start += segment.rows


def test_a_step_the_guard_rejects_gets_the_policy_for_every_request(guard: Guard) -> None:
    x = BATCHES[0][0][:1]
    n = MAX_SEGMENTS + 1  # over the guard's limit: a per-batch error, the stream goes on
    rows = np.repeat(x, n, axis=0)
    segments = [Segment(f"r{i}", 1, "generation") for i in range(n)]
    with GuardClient(guard.address, hooks=[HOOK], deadline_ms=30_000,
                     failure_policy="closed") as client:
        step = client.inspect_step(HOOK, rows, segments, [0] * n)
        assert step.source == "fail_closed" and step.cause == "error"
        assert "segments" in step.reason and len(step) == n
        assert all(v.action is Action.ABORT and v.source == "fail_closed" for v in step)
        ok = client.inspect_step(HOOK, rows[:2], segments[:2], [0, 0])
        assert ok.source == "guard" and [v.action for v in ok] == [Action.CONTINUE] * 2
        assert client.counters.errors == 1


def test_a_late_step_gets_the_policy_for_every_request(guard: Guard) -> None:
    rows, segments, positions = step_args()
    with GuardClient(guard.address, hooks=[HOOK], deadline_ms=30_000) as client:
        late = client.inspect_step(HOOK, rows, segments, positions, deadline_ms=0.001)
        assert late.source == "fail_open" and late.cause == "timeout"
        assert [(v.request_id, v.action, v.cause) for v in late] == [
            (name, Action.CONTINUE, "timeout") for name in NAMES]
        assert late.sequence == 1 and all(v.sequence == 1 for v in late)
        on_time = client.inspect_step(HOOK, rows, segments, positions)
        assert on_time.sequence == 2 and [v.action for v in on_time] == EXPECTED
        assert client.counters.timeouts == 1


def test_a_monitored_step_continues_and_reports_each_request(guard: Guard) -> None:
    rows, segments, positions = step_args()
    seen: list[Verdict] = []
    with GuardClient(guard.address, mode="monitor", hooks=[HOOK],
                     on_reply=seen.append) as client:
        step = client.inspect_step(HOOK, rows, segments, positions)
        assert step.source == "monitor" and step.action is Action.CONTINUE
        assert [(v.request_id, v.action, v.source) for v in step] == [
            (name, Action.CONTINUE, "monitor") for name in NAMES]
        assert client.end_requests(NAMES) is True
        poll(lambda: len(seen) == 3, 10, "the monitored step's verdicts")
        assert client.counters.dropped == 0
    assert [(v.request_id, v.action) for v in seen] == list(zip(NAMES, EXPECTED, strict=True))


def test_a_step_is_one_span_with_the_request_ids(
    guard: Guard, spans: InMemorySpanExporter,
) -> None:
    rows, segments, positions = step_args()
    with GuardClient(guard.address, hooks=[HOOK], deadline_ms=30_000) as client:
        step = client.inspect_step(HOOK, rows, segments, positions)
    (span,) = wait_spans(spans, "guard.host.inspect", 1)
    attributes = span.attributes or {}
    assert list(attributes["guard.request_ids"]) == list(NAMES)  # type: ignore[arg-type]
    assert attributes["guard.decision.action"] == "abort"
    assert list(attributes["guard.decision.ids"]) == [  # type: ignore[arg-type]
        v.decision_id for v in step]
    assert attributes["guard.rows"] == len(positions)


# -- validation at the boundary ---------------------------------------------------------------

ROWS = np.zeros((4, D_IN), np.float32)
BAD: dict[str, tuple[Any, Any, type[Exception], str]] = {
    # name: (segments, positions, error, fragment)
    "rows sum short": ([Segment("a", 2), Segment("b", 1)], range(4), ValueError,
                       "segments: the segments' rows sum to 3, expected the 4 rows"),
    "rows sum over": ([Segment("a", 2), Segment("b", 3)], range(4), ValueError,
                      "rows sum to 5"),
    "empty id": ([Segment("a", 2), Segment("", 2)], range(4), ValueError,
                 "segments[1].request_id: expected a non-empty string"),
    "repeated id": ([Segment("a", 1), Segment("b", 1), Segment("a", 2)], range(4), ValueError,
                    "segments[2].request_id: 'a' is already segments[0]'s"),
    "no rows": ([Segment("a", 4), Segment("b", 0)], range(4), ValueError,
                "segments[1].rows: expected an integer >= 1, found 0"),
    "bad phase": ([Segment("a", 4, "decode")], range(4), ValueError,  # type: ignore[arg-type]
                  "segments[0].phase: expected 'prompt' or 'generation', found 'decode'"),
    "not a segment": ([("a", 4)], range(4), TypeError,
                      "segments[0]: expected a guard.host.Segment, found tuple"),
    "no segments": ([], range(4), ValueError, "segments: expected a non-empty sequence"),
    "one segment, not a list": (Segment("a", 4), range(4), ValueError,
                                "segments: expected a non-empty sequence"),
    "bad attributes": ([Segment("a", 4, attributes={"k": 1})], range(4),  # type: ignore[dict-item]
                       TypeError, "segments[0].attributes: expected str keys and values"),
    "positions short": ([Segment("a", 4)], range(3), ValueError,
                        "positions: expected one integer per row (4)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_steps_are_rejected_at_the_boundary(tmp_path: Path, case: str) -> None:
    segments, positions, error, fragment = BAD[case]
    with GuardClient(f"unix://{tmp_path}/unused.sock") as client:
        with pytest.raises(error) as raised:
            client.inspect_step(HOOK, ROWS, segments, positions)
        assert fragment in str(raised.value)
        assert client.state == "idle"  # nothing was sent: no stream was opened


def test_bad_end_requests_are_rejected(tmp_path: Path) -> None:
    with GuardClient(f"unix://{tmp_path}/unused.sock") as client:
        with pytest.raises(ValueError, match="reason: expected 'finished', 'aborted' or"):
            client.end_requests(["a"], reason="done")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="request_ids: expected a sequence"):
            client.end_requests("abc")
        with pytest.raises(ValueError, match=r"request_ids\[1\]: expected a non-empty"):
            client.end_requests(["a", ""])
    from guard.host import ClientClosedError

    with pytest.raises(ClientClosedError, match="end_requests"):
        client.end_requests(["a"])
