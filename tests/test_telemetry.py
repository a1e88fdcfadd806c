"""Observability in process: span trees (in-memory exporter), metrics (in-memory reader),
log lines with trace and decision ids, nothing sensitive by default, and the set-up."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from guard import Decision, FeatureBatch, FeatureRequest, Finding, hookimpl
from guard.config import LoggingConfig, PluginsConfig, TelemetryConfig, parse_config
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import ConfigError, GuardError
from guard.sidecar.server import GuardServer
from guard.telemetry.instruments import Instruments
from guard.telemetry.setup import configure_logging, split_host_port, start_telemetry
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import D_IN, HOOK, make_batch, make_config

ROOT = Path(__file__).resolve().parent.parent
#: Values that must never reach a span, an event or a log line unless asked for.
ROW_VALUE = 1234.5678
TOKEN_ID = 987654321
FEATURE_ACTIVATION = 4242.4242


class Blocker:
    """Aborts batches of requests named ``block*``; opens a span of its own (plugin API)."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("blocker")

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, [1, 5])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        with self.tracer.start_as_current_span("blocker.score"):
            if batch.request_id == "boom":
                raise RuntimeError("detector bug")
            if batch.request_id == "slow":
                time.sleep(0.6)
            if not batch.request_id.startswith("block"):
                return []
            return [Finding("self-harm", 4.5, 3.5, "abort", feature_ids=(1, 5),
                            feature_activations=(FEATURE_ACTIVATION, 1.0),
                            feature_labels=("self harm", "pills"), positions=(0, 2))]


@dataclass
class Sink:
    """Keeps the decisions it is handed, taking ``delay`` seconds over each (a slow sink)."""

    decisions: list[Decision] = field(default_factory=list)
    delay: float = 0.0

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.decisions.append(decision)


@pytest.fixture
def metrics() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider, reader
    provider.shutdown()


@dataclass
class Guard:
    server: GuardServer
    sink: Sink
    channel: grpc.Channel

    @property
    def engine(self) -> Engine:
        engine = self.server.servicer.engine
        assert engine is not None
        return engine

    def inspect(self, batches: Sequence[pb.ActivationBatch],
                metadata: Sequence[tuple[str, str]] = ()) -> list[pb.InspectResponse]:
        """One INLINE stream: the config, the batches, then every reply."""
        requests = [pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE, hooks=[HOOK]))]
        requests += [pb.InspectRequest(batch=b) for b in batches]
        call = pb_grpc.GuardStub(self.channel).Inspect(iter(requests), metadata=tuple(metadata),
                                                      timeout=30)
        return list(call)

    def wait_records(self, count: int) -> list[Decision]:
        deadline = time.monotonic() + 10
        while len(self.sink.decisions) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.sink.decisions


@pytest.fixture
def start_guard(tmp_path: Path, sae_dir: Path) -> Iterator[Any]:
    started: list[Guard] = []

    def start(instruments: Instruments, sink: Sink | None = None, **plugins: Any) -> Guard:
        config = make_config(tmp_path, sae_dir)
        config = replace(config, plugins=PluginsConfig(autoload=False, **plugins))
        sink = sink if sink is not None else Sink()
        sources = [PluginSource("blocker", "1.2.3", Blocker), PluginSource("sink", "0.9", sink)]
        server = GuardServer(config)
        server.start()
        server.set_ready(Engine.load(config, extra_plugins=sources, instruments=instruments))
        guard = Guard(server, sink, grpc.insecure_channel(server.addresses[0]))
        started.append(guard)
        return guard

    yield start
    for guard in started:
        guard.channel.close()
        guard.server.stop(0)


def host_span(provider: TracerProvider) -> tuple[trace.Span, list[tuple[str, str]]]:
    """A host-side span and the gRPC metadata that carries its context (W3C traceparent)."""
    span = provider.get_tracer("host").start_span("host.inspect_batch", kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, sorted(carrier.items())


def by_name(exporter: InMemorySpanExporter, in_trace: int | None = None
            ) -> dict[str, list[ReadableSpan]]:
    """Finished spans by name; only those of trace ``in_trace`` when given (a span of an
    earlier test, such as a sink's record span ending late, is not this test's)."""
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        if in_trace is None or (span.context is not None
                                and span.context.trace_id == in_trace):
            found.setdefault(span.name, []).append(span)
    return found


def wait_span(exporter: InMemorySpanExporter, name: str, in_trace: int | None = None
              ) -> ReadableSpan:
    return wait_spans(exporter, name, 1, in_trace)[0]


def wait_spans(exporter: InMemorySpanExporter, name: str, count: int,
               in_trace: int | None = None) -> list[ReadableSpan]:
    """At least ``count`` finished spans named ``name`` (of trace ``in_trace``), waited for."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        named = by_name(exporter, in_trace).get(name, [])
        if len(named) >= count:
            return named
        time.sleep(0.01)
    found = {n: len(s) for n, s in by_name(exporter, in_trace).items()}
    raise AssertionError(f"expected {count} spans {name!r}; got {found}")


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def distinctive_batch(request_id: str, sequence: int = 1) -> pb.ActivationBatch:
    batch = make_batch(np.full((3, D_IN), ROW_VALUE, dtype=np.float32), sequence=sequence,
                       request_id=request_id)
    batch.ClearField("token_ids")
    batch.token_ids.extend([TOKEN_ID, TOKEN_ID + 1, TOKEN_ID + 2])
    return batch


# -- span trees ---------------------------------------------------------------------------


def test_a_blocked_batch_is_a_child_of_the_hosts_span(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    host, metadata = host_span(tracer_provider)
    (reply,) = guard.inspect([distinctive_batch("block-1")], metadata)
    host.end()
    assert reply.action == pb.ACTION_ABORT
    wait_span(spans, "guard.plugin.record")  # the sink runs on its own thread

    host_context = host.get_span_context()
    named = by_name(spans, host_context.trace_id)
    (batch,) = named["guard.inspect"]
    assert trace_id(batch) == host_context.trace_id  # one trace, host to sidecar
    assert parent_id(batch) == host_context.span_id
    assert batch.kind is SpanKind.SERVER
    assert batch.status.status_code is StatusCode.UNSET
    for child in ("guard.decode", "guard.encode", "guard.plugin.detect", "guard.plugin.record"):
        (span,) = named[child]
        assert trace_id(span) == trace_id(batch)
        assert parent_id(span) == span_id(batch), child
    (detect,) = named["guard.plugin.detect"]
    assert detect.attributes is not None
    assert detect.attributes["guard.plugin.name"] == "blocker"
    assert detect.attributes["guard.plugin.version"] == "1.2.3"
    (own,) = named["blocker.score"]  # a plugin's own span nests in its hook call
    assert parent_id(own) == span_id(detect)
    (record,) = named["guard.plugin.record"]
    assert record.attributes is not None and record.attributes["guard.plugin.name"] == "sink"

    attributes = dict(batch.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "guard.v1.Guard"
    assert attributes["rpc.method"] == "Inspect"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["guard.decision.id"] == reply.decision_id
    assert attributes["guard.decision.action"] == "abort"
    assert attributes["guard.decision.detectors"] == ("self-harm",)
    assert "detector self-harm fired" in str(attributes["guard.decision.details"])
    assert attributes["guard.sae.sha256"] == guard.engine.hook(HOOK).info.sha256
    assert attributes["guard.plugin.names"] == ("blocker", "sink")
    assert attributes["guard.plugin.versions"] == ("1.2.3", "0.9")
    assert attributes["guard.request_id"] == "block-1"
    assert attributes["guard.hook"] == HOOK
    assert attributes["guard.stream.mode"] == "inline"
    (event,) = batch.events
    assert event.name == "guard.finding"
    assert dict(event.attributes or {}) == {
        "guard.detector": "self-harm", "guard.finding.score": 4.5,
        "guard.finding.threshold": 3.5, "guard.finding.action": "abort",
        "guard.finding.plugin": "blocker", "guard.feature.ids": (1, 5),
        "guard.feature.labels": ("self harm", "pills"), "guard.finding.positions": (0, 2),
    }


def test_a_slow_sink_gets_one_record_span_per_record_under_its_batch(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    # Records reach the sink after the batch spans have ended: the children must still start.
    guard = start_guard(Instruments(tracer_provider), sink=Sink(delay=0.05))
    host, metadata = host_span(tracer_provider)
    replies = guard.inspect([distinctive_batch(f"block-{i}", i) for i in range(1, 6)], metadata)
    host.end()
    assert [r.action for r in replies] == [pb.ACTION_ABORT] * 5
    in_trace = host.get_span_context().trace_id
    records = wait_spans(spans, "guard.plugin.record", 5, in_trace)
    batches = by_name(spans, in_trace)["guard.inspect"]
    assert len(records) == 5 and len(batches) == 5
    assert sorted(parent_id(r) or 0 for r in records) == sorted(span_id(b) for b in batches)


def test_a_traceparent_in_the_batch_wins_over_the_streams(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    stream_span, metadata = host_span(tracer_provider)
    batch_span, carrier = host_span(tracer_provider)
    second = make_batch(sequence=2)
    second.attributes.update(dict(carrier))
    guard.inspect([make_batch(sequence=1), second], metadata)
    first_span, second_span = sorted(by_name(spans)["guard.inspect"],
                                     key=lambda s: str((s.attributes or {})["guard.sequence"]))
    assert parent_id(first_span) == stream_span.get_span_context().span_id
    assert parent_id(second_span) == batch_span.get_span_context().span_id
    assert trace_id(second_span) == batch_span.get_span_context().trace_id


def test_without_a_remote_parent_each_batch_starts_a_trace(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    guard.inspect([make_batch(sequence=1), make_batch(sequence=2)])
    first, second = by_name(spans)["guard.inspect"]
    assert first.parent is None and second.parent is None
    assert trace_id(first) != trace_id(second)


def test_an_unsampled_parent_records_nothing(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    (reply,) = guard.inspect([distinctive_batch("block-1")], [("traceparent", unsampled)])
    assert reply.action == pb.ACTION_ABORT
    guard.wait_records(1)
    guard.engine.records.close()
    assert spans.get_finished_spans() == ()


def test_client_errors_leave_the_status_unset_and_server_faults_set_it(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    bad_width, repeated = guard.inspect([make_batch(sequence=1, width=D_IN + 1),
                                         make_batch(sequence=1)])
    assert bad_width.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert repeated.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    for span in by_name(spans)["guard.inspect"]:
        assert span.status.status_code is StatusCode.UNSET
        assert dict(span.attributes or {})["rpc.grpc.status_code"] in (3, 6)
        assert "error.type" not in dict(span.attributes or {})  # the client's fault
        assert not span.events
    spans.clear()

    def bug(*_args: object, **_kwargs: object) -> Decision:
        raise ZeroDivisionError("a bug in the guard")

    monkeypatch.setattr(guard.engine, "inspect", bug)
    (internal,) = guard.inspect([make_batch(sequence=1)])
    assert internal.error.code == grpc.StatusCode.INTERNAL.value[0]
    (span,) = by_name(spans)["guard.inspect"]
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == 13
    assert dict(span.attributes or {})["error.type"] == "INTERNAL"
    assert [e.name for e in span.events] == ["exception"]


def test_tracing_off_costs_no_span(
    start_guard: Any, spans: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    guard = start_guard(Instruments(None))  # what telemetry.tracing: false builds
    _host, metadata = host_span(tracer_provider)
    (reply,) = guard.inspect([distinctive_batch("block-1")], metadata)
    assert reply.action == pb.ACTION_ABORT
    guard.wait_records(1)
    # Only the plugin's own span, which has no guard span to nest in: it starts its trace.
    assert [s.name for s in spans.get_finished_spans()] == ["blocker.score"]


# -- nothing sensitive by default ---------------------------------------------------------


def _everything(exporter: InMemorySpanExporter) -> str:
    """Every span's name, attributes and events' attributes, as one text."""
    parts = []
    for span in exporter.get_finished_spans():
        parts.append(f"{span.name} {dict(span.attributes or {})}")
        parts.extend(f"{e.name} {dict(e.attributes or {})}" for e in span.events)
    return "\n".join(parts)


def _sensitive(text: str) -> list[str]:
    return [s for s in (f"{ROW_VALUE:g}"[:6], str(TOKEN_ID)[:7], f"{FEATURE_ACTIVATION:g}"[:6])
            if s in text]


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The guard's structlog output, as JSON lines at debug level."""
    handlers, level = logging.root.handlers[:], logging.root.level
    out = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json"), stream=out)
    yield out
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_spans_and_logs_hold_no_activations_or_token_ids_by_default(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter,
    log_lines: io.StringIO,
) -> None:
    guard = start_guard(Instruments(tracer_provider), trace=True)  # plugins.trace logs calls
    _host, metadata = host_span(tracer_provider)
    replies = guard.inspect([distinctive_batch("block-1", 1), distinctive_batch("ok", 2),
                             distinctive_batch("boom", 3)], metadata)
    assert [r.action for r in replies] == [pb.ACTION_ABORT, pb.ACTION_CONTINUE,
                                           pb.ACTION_CONTINUE]
    guard.wait_records(3)
    wait_span(spans, "guard.plugin.record")
    text = _everything(spans)
    assert "guard.finding" in text and "self harm" in text  # the check looks at real spans
    assert _sensitive(text) == []
    assert "guard.token_ids" not in text and "guard.feature.activations" not in text
    logged = log_lines.getvalue()
    assert "batch aborted" in logged and "hook call" in logged
    assert _sensitive(logged) == []


def test_record_sensitive_puts_token_ids_and_feature_activations_in_spans(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    guard = start_guard(Instruments(tracer_provider, record_sensitive=True))
    guard.inspect([distinctive_batch("block-1")])
    (batch,) = by_name(spans)["guard.inspect"]
    attributes = dict(batch.attributes or {})
    assert attributes["guard.token_ids"] == (TOKEN_ID, TOKEN_ID + 1, TOKEN_ID + 2)
    (event,) = batch.events
    assert dict(event.attributes or {})["guard.feature.activations"] == (
        pytest.approx(FEATURE_ACTIVATION), 1.0)


# -- logs ---------------------------------------------------------------------------------


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    """Every line written to ``out``, each of which must be one JSON object."""
    events = []
    for number, line in enumerate(out.getvalue().splitlines(), 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"log line {number}: expected a JSON object, found "
                                 f"{line!r}") from exc
        assert isinstance(event, dict), f"log line {number}: expected a JSON object: {line!r}"
        events.append(event)
    return events


def test_standard_library_records_are_json_lines_with_the_trace_ids(
    tracer_provider: TracerProvider, log_lines: io.StringIO,
) -> None:
    # The OTLP exporter logs through the standard library: its lines join the JSON stream.
    with tracer_provider.get_tracer("test").start_as_current_span("export") as span:
        logging.getLogger("opentelemetry.exporter.x").warning(
            "Transient error %s encountered while exporting traces", "UNAVAILABLE")
    logging.getLogger("opentelemetry.exporter.x").debug("without a span")
    first, second = json_lines(log_lines)
    context = span.get_span_context()
    assert first["event"] == ("Transient error UNAVAILABLE encountered while exporting "
                              "traces")
    assert first["level"] == "warning"
    assert first["logger"] == "opentelemetry.exporter.x"
    assert first["trace_id"] == format(context.trace_id, "032x")
    assert first["span_id"] == format(context.span_id, "016x")
    assert "timestamp" in first
    assert second["event"] == "without a span" and second["level"] == "debug"
    assert "trace_id" not in second


def test_standard_library_records_below_the_level_are_dropped() -> None:
    handlers, level = logging.root.handlers[:], logging.root.level
    out = io.StringIO()
    try:
        configure_logging(LoggingConfig(level="warning", format="json"), stream=out)
        logging.getLogger("some.library").info("chatter")
        logging.getLogger("some.library").error("failed")
        assert [e["event"] for e in json_lines(out)] == ["failed"]
    finally:
        structlog.reset_defaults()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def test_log_lines_carry_the_trace_span_and_decision_ids(
    start_guard: Any, tracer_provider: TracerProvider, spans: InMemorySpanExporter,
    log_lines: io.StringIO,
) -> None:
    guard = start_guard(Instruments(tracer_provider))
    _host, metadata = host_span(tracer_provider)
    blocked, failed = guard.inspect([make_batch(sequence=1, request_id="block-1"),
                                     make_batch(sequence=2, request_id="boom")], metadata)
    events = json_lines(log_lines)
    aborted = next(e for e in events if e["event"] == "batch aborted")
    plugin_failed = next(e for e in events if e["event"] == "plugin failed")
    inspects = {dict(s.attributes or {})["guard.request_id"]: s
                for s in by_name(spans)["guard.inspect"]}
    batch = inspects["block-1"]
    assert aborted["decision_id"] == blocked.decision_id
    assert aborted["trace_id"] == format(trace_id(batch), "032x")
    assert aborted["span_id"] == format(span_id(batch), "016x")
    # Logged on the plugin worker thread, inside the plugin's hook span.
    detect = next(s for s in by_name(spans)["guard.plugin.detect"]
                  if parent_id(s) == span_id(inspects["boom"]))
    assert plugin_failed["decision_id"] == failed.decision_id
    assert plugin_failed["span_id"] == format(span_id(detect), "016x")
    assert detect.status.status_code is StatusCode.ERROR  # the plugin's fault, not the batch's
    assert inspects["boom"].status.status_code is StatusCode.UNSET
    # The exception's type only: a plugin's message could quote the rows it was handed.
    (exception,) = [e for e in detect.events if e.name == "exception"]
    assert dict(exception.attributes or {}) == {
        "exception.type": "RuntimeError",
        "exception.message": "withheld (telemetry.record_sensitive)"}


def test_without_tracing_log_lines_still_carry_the_decision_id(
    start_guard: Any, log_lines: io.StringIO
) -> None:
    guard = start_guard(Instruments(None))
    (blocked,) = guard.inspect([make_batch(request_id="block-1")])
    aborted = next(e for e in json_lines(log_lines) if e["event"] == "batch aborted")
    assert aborted["decision_id"] == blocked.decision_id
    assert "trace_id" not in aborted


# -- metrics ------------------------------------------------------------------------------


def points(data: MetricsData | None, name: str) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, point) of every data point of one metric."""
    assert data is not None
    found = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def value(data: MetricsData | None, name: str, **labels: str) -> float:
    """The sum of a counter's (or gauge's) points whose attributes include ``labels``."""
    wanted = {k.replace("__", "."): v for k, v in labels.items()}
    return sum(getattr(point, "value", 0) for attributes, point in points(data, name)
               if wanted.items() <= attributes.items())


def test_metrics_count_batches_decisions_findings_and_plugin_faults(
    start_guard: Any, metrics: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = metrics
    guard = start_guard(Instruments(None, provider), timeout_ms=400)
    guard.inspect([make_batch(sequence=1, request_id="block-1"),
                   make_batch(sequence=2, request_id="ok", n_rows=5),
                   make_batch(sequence=3, request_id="boom"),
                   make_batch(sequence=4, width=D_IN + 1),
                   make_batch(sequence=5, request_id="slow")])
    guard.wait_records(4)
    data = reader.get_metrics_data()
    labels = {"guard__hook": HOOK, "guard__stream__mode": "inline"}
    assert value(data, "guard.batches", **labels) == 5
    assert value(data, "guard.batches", **labels, error__type="INVALID_ARGUMENT") == 1
    assert value(data, "guard.rows", **labels) == 3 + 5 + 3 + 3
    assert value(data, "guard.decisions", guard__decision__action="abort") == 1
    assert value(data, "guard.decisions", guard__decision__action="continue") == 3
    assert value(data, "guard.findings", guard__detector="self-harm",
                 guard__finding__action="abort") == 1
    assert value(data, "guard.plugin.errors", guard__plugin__name="blocker",
                 guard__plugin__hook="guard_detect") == 1
    assert value(data, "guard.plugin.timeouts", guard__plugin__name="blocker") == 1
    assert value(data, "guard.records.dropped") == 0
    assert value(data, "guard.records.delivered") == 4
    # One series per sink (its own queue and thread).
    assert [a for a, _ in points(data, "guard.records.queue_depth")] == [
        {"guard.plugin.name": "sink"}]
    assert value(data, "guard.records.delivered", guard__plugin__name="sink") == 4
    ((info, point),) = points(data, "guard.sae.info")
    assert point.value == 1
    assert info["guard.sae.execution_provider"] == "CPUExecutionProvider"
    assert info["guard.sae.sha256"] == guard.engine.hook(HOOK).info.sha256
    assert {a["guard.plugin.name"]: a["guard.plugin.version"]
            for a, _ in points(data, "guard.plugin.info")} == {"blocker": "1.2.3", "sink": "0.9"}
    ((_, batch_duration),) = points(data, "guard.batch.duration")
    assert batch_duration.count == 4 and batch_duration.explicit_bounds[0] == 5e-05
    assert sum(p.count for _, p in points(data, "guard.encode.duration")) == 4
    detect_calls = [p for a, p in points(data, "guard.plugin.duration")
                    if a == {"guard.plugin.name": "blocker", "guard.plugin.hook": "guard_detect"}]
    assert detect_calls[0].count >= 3  # the overrunning call is counted when it returns


def test_a_hook_the_guard_does_not_serve_is_one_label_value(
    start_guard: Any, metrics: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = metrics
    guard = start_guard(Instruments(None, provider))
    replies = guard.inspect([make_batch(sequence=i, hook=f"blocks.{i}.hook_x")
                             for i in range(1, 4)])
    assert all(r.error.code == grpc.StatusCode.NOT_FOUND.value[0] for r in replies)
    data = reader.get_metrics_data()
    assert {a["guard.hook"] for a, _ in points(data, "guard.batches")} == {"_OTHER"}


# -- configuration and set-up -------------------------------------------------------------


def test_the_telemetry_section_is_validated() -> None:
    config = parse_config("telemetry: {metrics_listen: '0.0.0.0:9464', record_sensitive: true}",
                          env={})
    assert config.telemetry == TelemetryConfig("0.0.0.0:9464", True, True)
    assert parse_config("", env={"GUARD_METRICS_LISTEN": "127.0.0.1:9"}).telemetry == (
        TelemetryConfig(metrics_listen="127.0.0.1:9"))
    for text, message in [
        ("telemetry: {metrics_listen: 'unix:///x.sock'}", "telemetry.metrics_listen: expected "
                                                          "host:port"),
        ("telemetry: {tracing: 'yes'}", "telemetry.tracing: expected true or false"),
        ("telemetry: {traces: true}", "telemetry.traces: expected one of the keys"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(text, env={})
    assert split_host_port(":9464") == ("0.0.0.0", 9464)
    assert split_host_port("[::1]:9464") == ("::1", 9464)


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_without_an_endpoint_nothing_is_recorded(clean_otel_env: pytest.MonkeyPatch) -> None:
    telemetry = start_telemetry(TelemetryConfig(), set_global=False)
    try:
        assert telemetry.instruments.tracer is None
        assert not telemetry.instruments.metering
        assert telemetry.metrics_address == ""
    finally:
        telemetry.shutdown()


def test_the_otel_variables_choose_exporter_and_protocol(
    clean_otel_env: pytest.MonkeyPatch,
) -> None:
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry = start_telemetry(TelemetryConfig(), set_global=False)
    try:
        assert telemetry.instruments.tracer is not None
        assert telemetry.traces_to == ("otlp http://127.0.0.1:9",)
        assert not telemetry.instruments.metering
    finally:
        telemetry.shutdown()
    off = start_telemetry(TelemetryConfig(tracing=False), set_global=False)
    assert off.instruments.tracer is None
    off.shutdown()
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL: expected grpc or"):
        start_telemetry(TelemetryConfig(), set_global=False)
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: expected a list of otlp"):
        start_telemetry(TelemetryConfig(), set_global=False)


def test_otel_metrics_exporter_prometheus_means_the_metrics_listen_endpoint(
    clean_otel_env: pytest.MonkeyPatch,
) -> None:
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    telemetry = start_telemetry(TelemetryConfig(tracing=False, metrics_listen="127.0.0.1:0"),
                                set_global=False)
    try:
        assert telemetry.instruments.metering
        assert telemetry.metrics_to == (
            f"prometheus http://{telemetry.metrics_address}/metrics",)  # and not OTLP
    finally:
        telemetry.shutdown()
    with pytest.raises(ConfigError, match=r"telemetry\.metrics_listen: expected host:port "
                                          r".*OTEL_METRICS_EXPORTER=prometheus"):
        start_telemetry(TelemetryConfig(tracing=False), set_global=False)


def test_otel_metrics_exporter_console_prints_metrics(
    clean_otel_env: pytest.MonkeyPatch,
) -> None:
    clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "console")
    telemetry = start_telemetry(TelemetryConfig(tracing=False), set_global=False)
    try:
        assert telemetry.instruments.metering
        assert telemetry.metrics_to == ("console",)
    finally:
        telemetry.shutdown()
    clean_otel_env.setenv("OTEL_METRICS_EXPORTER", "otlp,zipkin")
    with pytest.raises(ConfigError, match=r"OTEL_METRICS_EXPORTER: expected a list of otlp, "
                                          r"prometheus, console, none, found 'zipkin'"):
        start_telemetry(TelemetryConfig(tracing=False), set_global=False)


def test_the_metrics_endpoint_serves_prometheus_text(
    clean_otel_env: pytest.MonkeyPatch, start_guard: Any
) -> None:
    import urllib.request

    telemetry = start_telemetry(TelemetryConfig(metrics_listen="127.0.0.1:0"), set_global=False)
    try:
        guard = start_guard(telemetry.instruments)
        guard.inspect([make_batch(request_id="block-1")])
        url = f"http://{telemetry.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert re.search(r'^guard_batches_total\{[^}]*guard_hook="blocks\.6\.hook_resid_post"'
                         r"[^}]*\} 1\.0$", text, re.M), text
        assert 'guard_decisions_total{guard_decision_action="abort"' in text
        assert "guard_batch_duration_seconds_bucket{" in text
        assert 'service_name="activation-guard"' in text  # target_info: the resource
        with pytest.raises(GuardError, match=r"telemetry\.metrics_listen: cannot listen"):
            start_telemetry(TelemetryConfig(metrics_listen=telemetry.metrics_address),
                            set_global=False)
    finally:
        telemetry.shutdown()


def test_console_tracebacks_show_no_local_variables() -> None:
    """A frame's locals may hold activation rows: the readable (console) format's tracebacks
    leave them out, as JSON lines do."""
    handlers, level = logging.root.handlers[:], logging.root.level
    out = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="console"), stream=out)
    try:
        def encode(rows: list[float]) -> float:
            return rows[0] / 0

        secret = sum(range(12345)) + 0.25  # a value that is in no source line shown
        try:
            encode([secret, secret * 2])
        except ZeroDivisionError:
            structlog.get_logger("guard.test").exception("batch failed")
    finally:
        structlog.reset_defaults()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    text = out.getvalue()
    assert "batch failed" in text and "ZeroDivisionError" in text
    assert str(secret) not in text and str(secret * 2) not in text
