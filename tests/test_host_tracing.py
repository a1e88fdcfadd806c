"""Host SDK observability: the host's spans (generation -> inspect batch) continue into the
guard's spans in one trace, verdicts and failure-policy events are on the spans and in the
host metrics, and nothing sensitive is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from guard.config import PluginsConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.host import AsyncGuardClient, GuardClient, tracing
from guard.host.attach import Attachment
from guard.sidecar.server import GuardServer
from guard.telemetry.instruments import Instruments
from tests.conftest import D_IN, HOOK, make_config
from tests.test_telemetry import (
    ROW_VALUE,
    TOKEN_ID,
    Blocker,
    Sink,
    by_name,
    parent_id,
    span_id,
    trace_id,
    wait_span,
)


@pytest.fixture
def guard(tmp_path: Path, sae_dir: Path, tracer_provider: TracerProvider
          ) -> Iterator[GuardServer]:
    """A guard whose spans go to the same (global, in-memory) provider as the host's."""
    config = replace(make_config(tmp_path, sae_dir), plugins=PluginsConfig(autoload=False))
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config, extra_plugins=[
        PluginSource("blocker", "1.2.3", Blocker), PluginSource("sink", "0.9", Sink())],
        instruments=Instruments(tracer_provider)))
    yield server
    server.stop(0)


@pytest.fixture
def host_metrics() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    tracing.use_meter_provider(provider)
    yield reader
    tracing.use_meter_provider(None)
    provider.shutdown()


def rows(n: int = 3) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.full((n, D_IN), ROW_VALUE, dtype=np.float32)


def counts(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    """A counter's points as {sorted attributes: value}."""
    data = reader.get_metrics_data()
    found: dict[tuple[tuple[str, Any], ...], float] = {}
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = tuple(sorted((point.attributes or {}).items()))
                        found[key] = getattr(point, "value", getattr(point, "count", 0))
    return found


def only(exporter: InMemorySpanExporter, name: str, in_trace: int | None = None
         ) -> ReadableSpan:
    named = by_name(exporter, in_trace).get(name, [])
    assert len(named) == 1, f"{name}: {len(named)} spans; all: {sorted(by_name(exporter))}"
    return named[0]


def test_a_blocked_batch_is_one_trace_from_the_app_span_to_the_guards_plugin_spans(
    guard: GuardServer, tracer_provider: TracerProvider, spans: InMemorySpanExporter,
    host_metrics: InMemoryMetricReader,
) -> None:
    app = tracer_provider.get_tracer("app")
    with GuardClient(guard.addresses[0], hooks=[HOOK]) as client, \
            app.start_as_current_span("POST /chat", kind=SpanKind.SERVER), \
            tracing.generation_span("block-1"):
        verdict = client.inspect("block-1", HOOK, rows(), [1, 2, 3], [TOKEN_ID] * 3)
    assert verdict.action is Action.ABORT and verdict.source == "guard"

    root = only(spans, "POST /chat")
    generation = only(spans, "guard.host.generation", trace_id(root))
    inspect = only(spans, "guard.host.inspect", trace_id(root))
    batch = wait_span(spans, "guard.inspect", trace_id(root))
    encode = wait_span(spans, "guard.encode", trace_id(root))
    detect = wait_span(spans, "guard.plugin.detect", trace_id(root))
    # One trace, parent by parent: app -> generation -> host batch -> guard batch -> steps.
    assert {trace_id(s) for s in (root, generation, inspect, batch, encode, detect)} == {
        trace_id(root)}
    assert parent_id(generation) == span_id(root)
    assert parent_id(inspect) == span_id(generation)
    assert parent_id(batch) == span_id(inspect)
    assert parent_id(encode) == span_id(batch)
    assert parent_id(detect) == span_id(batch)
    # The host span is the gRPC client side and carries the verdict the guard made.
    assert inspect.kind is SpanKind.CLIENT
    attributes = dict(inspect.attributes or {})
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "Inspect"
    assert attributes["guard.decision.action"] == "abort"
    assert attributes["guard.verdict.source"] == "guard"
    assert attributes["guard.decision.id"] == verdict.decision_id
    assert attributes["guard.decision.id"] == dict(batch.attributes or {})["guard.decision.id"]
    assert attributes["guard.decision.detectors"] == ("self-harm",)
    assert inspect.status.status_code is StatusCode.UNSET  # an ABORT is a decision, not a fault
    # Host metrics: one INLINE batch decided by the guard, timed.
    batches = counts(host_metrics, "guard.host.batches")
    assert batches == {(("guard.decision.action", "abort"), ("guard.stream.mode", "inline"),
                        ("guard.verdict.source", "guard")): 1}
    assert sum(counts(host_metrics, "guard.host.inspect.duration").values()) == 1
    assert counts(host_metrics, "guard.host.failure_policy") == {}


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_a_failure_policy_verdict_is_an_error_span_and_a_counted_event(
    tmp_path: Path, spans: InMemorySpanExporter, host_metrics: InMemoryMetricReader,
    policy: str,
) -> None:
    target = f"unix://{tmp_path}/nobody-listens.sock"
    with GuardClient(target, failure_policy=policy,  # type: ignore[arg-type]
                     deadline_ms=500) as client:
        verdict = client.inspect("r1", HOOK, rows(), [1, 2, 3])
    source = f"fail_{policy}"
    assert verdict.source == source and verdict.cause == "unavailable"
    inspect = only(spans, "guard.host.inspect")
    attributes = dict(inspect.attributes or {})
    assert attributes["guard.verdict.source"] == source
    assert attributes["guard.failure.cause"] == "unavailable"
    assert attributes["error.type"] == "unavailable"
    assert inspect.status.status_code is StatusCode.ERROR
    assert inspect.status.description == verdict.reason
    assert counts(host_metrics, "guard.host.failure_policy") == {
        (("guard.failure.cause", "unavailable"), ("guard.verdict.source", source)): 1}


def test_an_unsampled_trace_reaches_the_guard_unsampled(
    guard: GuardServer, spans: InMemorySpanExporter,
) -> None:
    parent = SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.DEFAULT))
    with GuardClient(guard.addresses[0], hooks=[HOOK]) as client, \
            trace.use_span(NonRecordingSpan(parent)):
        verdict = client.inspect("block-2", HOOK, rows(), [1, 2, 3])
    assert verdict.action is Action.ABORT and verdict.decision_id
    # Parent-based sampling on both sides: nothing recorded, the decision made all the same.
    assert by_name(spans, 0x1234) == {}


def test_inject_adds_nothing_without_a_valid_span() -> None:
    carrier: dict[str, str] = {}
    tracing.inject(trace.INVALID_SPAN, carrier)
    assert carrier == {}


def test_the_async_client_continues_the_current_trace(
    guard: GuardServer, tracer_provider: TracerProvider, spans: InMemorySpanExporter,
) -> None:
    async def run() -> Any:
        async with AsyncGuardClient(guard.addresses[0], hooks=[HOOK]) as client:
            with tracer_provider.get_tracer("app").start_as_current_span("app.request"):
                return await client.inspect("block-3", HOOK, rows(), [1, 2, 3])

    verdict = asyncio.run(run())
    assert verdict.action is Action.ABORT
    root = only(spans, "app.request")
    inspect = only(spans, "guard.host.inspect", trace_id(root))
    batch = wait_span(spans, "guard.inspect", trace_id(root))
    assert parent_id(inspect) == span_id(root)
    assert parent_id(batch) == span_id(inspect)
    assert trace_id(batch) == trace_id(root)


def test_host_spans_and_metrics_hold_no_activations_or_token_ids(
    guard: GuardServer, spans: InMemorySpanExporter, host_metrics: InMemoryMetricReader,
) -> None:
    with GuardClient(guard.addresses[0], hooks=[HOOK]) as client, \
            tracing.generation_span("block-4"):
        client.inspect("block-4", HOOK, rows(), [1, 2, 3], [TOKEN_ID, TOKEN_ID, TOKEN_ID])
    host = [s for s in spans.get_finished_spans() if s.name.startswith("guard.host.")]
    assert len(host) == 2
    text = " ".join(s.to_json() for s in host)
    data = host_metrics.get_metrics_data()
    assert data is not None
    text += data.to_json()
    assert str(ROW_VALUE) not in text and "1234.56" not in text
    assert str(TOKEN_ID) not in text


def test_the_generation_span_carries_the_gen_ai_operation_and_model(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.generation_span("chat-1", operation="chat", model="HuggingFaceTB/SmolLM2"):
        pass
    with tracing.generation_span("text-1"):
        pass
    chat, text = sorted(by_name(spans)["guard.host.generation"],
                        key=lambda s: str((s.attributes or {})["guard.request_id"]))
    assert dict(chat.attributes or {}) == {
        "guard.request_id": "chat-1", "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "HuggingFaceTB/SmolLM2"}
    assert dict(text.attributes or {}) == {
        "guard.request_id": "text-1", "gen_ai.operation.name": "text_completion"}


def test_an_attached_models_name_is_the_gen_ai_request_model(
    spans: InMemorySpanExporter,
) -> None:
    # What attach() builds, minus the hooks: a transformers model names itself in its config.
    model = SimpleNamespace(config=SimpleNamespace(name_or_path="HuggingFaceTB/SmolLM2-135M"))
    attachment = Attachment(model=model, client=cast(Any, None), hooks=(), on_abort="raise",
                            skip_positions=1)
    with attachment.request("gen-1"):
        pass
    unnamed = Attachment(model=SimpleNamespace(), client=cast(Any, None), hooks=(),
                         on_abort="raise", skip_positions=1)
    with unnamed.request("gen-2"):
        pass
    named, bare = sorted(by_name(spans)["guard.host.generation"],
                         key=lambda s: str((s.attributes or {})["guard.request_id"]))
    assert dict(named.attributes or {})["gen_ai.request.model"] == "HuggingFaceTB/SmolLM2-135M"
    assert dict(named.attributes or {})["gen_ai.operation.name"] == "text_completion"
    assert "gen_ai.request.model" not in dict(bare.attributes or {})


def test_an_inspect_that_raises_ends_its_span_as_an_error(
    guard: GuardServer, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with GuardClient(guard.addresses[0], hooks=[HOOK]) as client:
        def broken(*_args: Any) -> None:
            raise RuntimeError("a bug on the client side")

        monkeypatch.setattr(client, "_decide", broken)
        with pytest.raises(RuntimeError, match="a bug on the client side"):
            client.inspect("raises", HOOK, rows(), [1, 2, 3])
    span = only(spans, "guard.host.inspect")
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "RuntimeError"
    assert [e.name for e in span.events] == ["exception"]
