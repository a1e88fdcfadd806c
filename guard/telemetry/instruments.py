"""The guard's spans and metrics, written through the OpenTelemetry API only.

``guard.telemetry.setup`` sets up the SDK (exporters, sampler, the Prometheus endpoint) and hands
its providers to :class:`Instruments`; without providers every method here is a no-op, and
the hot path pays a few ``is None`` checks. Span attributes are built only for spans that
record (``span.is_recording()``), so an unsampled batch costs one sampler call.

Names: the per-batch span is ``guard.inspect`` (kind SERVER, ``rpc.*`` attributes as the
gRPC instrumentation writes them), with children ``guard.decode``, ``guard.encode`` and one
``guard.plugin.<hook>`` per plugin call; project attributes and metrics live under ``guard.``.
A batch with segments (several requests) is still one ``guard.inspect`` span, with the
request ids as the ``guard.request_ids`` list and one ``guard.verdict`` *event* per request
(events, not child spans: a step of 32 requests would otherwise cost 32 spans); its
``guard.finding`` events carry the ``guard.request_id`` they belong to.
Token ids and feature activations go into spans only with ``telemetry.record_sensitive``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, NoOpMeterProvider, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from guard import __version__
from guard.decision import Action
from guard.telemetry.conventions import (
    LATENCY_BUCKETS,
    NMSE_BUCKETS,
    RPC_ATTRIBUTES,
)

if TYPE_CHECKING:
    from guard.decision import Decision

#: Instrumentation scope of the guard's tracer and meter.
SCOPE: Final = "guard"

#: The decision id of the batch this thread (or the plugin worker running for it) is on;
#: the log processor in ``guard.telemetry.setup`` adds it to every log line.
DECISION_ID: ContextVar[str] = ContextVar("guard_decision_id", default="")

#: Status codes that are the server's fault (the semantic conventions for gRPC server spans);
#: every other code is the client's and leaves the span status unset.
SERVER_FAULTS: Final = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                                  "UNAVAILABLE", "DATA_LOSS"})
#: A hook name that the guard does not serve is counted under this value (bounded labels).
OTHER: Final = "_OTHER"
_ACTIONS: Final = {action: action.name.lower() for action in Action}
_PLUGIN_SPAN_NAMES: Final = {"guard_detect": "guard.plugin.detect",
                             "guard_steer": "guard.plugin.steer",
                             "guard_record": "guard.plugin.record"}


class EngineView(Protocol):
    """What the observable instruments read from the engine (at collection time only)."""

    @property
    def hooks(self) -> Mapping[str, Any]: ...

    @property
    def plugins(self) -> dict[str, str]: ...

    @property
    def records(self) -> Any: ...

    def plugin_calls_stuck(self) -> dict[str, int]: ...


def extract_context(carrier: Mapping[str, str] | Iterable[tuple[str, str | bytes]]
                    ) -> Context | None:
    """The W3C trace context (``traceparent``, ``tracestate``) in gRPC metadata or a map.

    None when the carrier holds none, so that a span without a remote parent starts a trace.
    """
    items = carrier.items() if isinstance(carrier, Mapping) else carrier
    headers = {key: value for key, value in items
               if isinstance(value, str) and key in ("traceparent", "tracestate", "baggage")}
    if "traceparent" not in headers:
        return None
    return propagate.extract(headers)


class Instruments:
    """The guard's tracer and metric instruments. Thread-safe.

    ``tracer_provider`` None: no spans (``tracer`` is None); ``meter_provider`` None: no
    metrics (``metering`` is False, and the instruments are no-ops).
    ``sampler_follows_parent``: the provider's sampler never samples under a remote parent
    that is not sampled (the ``parentbased_*`` samplers), so such a batch needs no span at all.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        record_sensitive: bool = False,
        sampler_follows_parent: bool = False,
    ) -> None:
        self.tracer: Tracer | None = (
            None if tracer_provider is None
            else tracer_provider.get_tracer(SCOPE, __version__)
        )
        self.record_sensitive = record_sensitive
        self._follows_parent = sampler_follows_parent
        self.metering = meter_provider is not None
        self._engine: EngineView | None = None
        self._lock = threading.Lock()
        self._plugin_attributes: dict[tuple[str, str], dict[str, str]] = {}
        meter = (meter_provider or NoOpMeterProvider()).get_meter(SCOPE, __version__)
        # Per-batch counts are tallied here and read by observable counters when metrics are
        # collected: an SDK measurement costs about 6 us, a tally a fraction of one.
        self.batches = Tally("guard.hook", "guard.stream.mode", "error.type")
        self.rows = Tally("guard.hook", "guard.stream.mode")
        self.decisions = Tally("guard.hook", "guard.decision.action")
        self.findings = Tally("guard.detector", "guard.finding.action")
        self.requests_ended = Tally("guard.request.end_reason")
        self.requests_evicted = Tally()
        self.requests_unknown = Tally()
        self.batch_duration = meter.create_histogram(
            "guard.batch.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            description="Time from a batch's arrival to its reply (decode, encode, plugins, "
                        "decision)")
        self.encode_duration = meter.create_histogram(
            "guard.encode.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            description="SAE encode time per batch")
        self.plugin_duration = meter.create_histogram(
            "guard.plugin.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            description="Time of one plugin's hook call")
        self.reconstruction_nmse = meter.create_histogram(
            "guard.sae.reconstruction.nmse", unit="1",
            explicit_bucket_boundaries_advisory=NMSE_BUCKETS,
            description="The SAE's reconstruction error per request on the batches sampled "
                        "for it (saes[].reconstruction.sample): sum ||x - x_hat||^2 over "
                        "sum ||x - mean(x)||^2 of the request's rows, by hook; requests with "
                        "fewer than two rows in the batch are not measured")
        self.plugin_errors = meter.create_counter(
            "guard.plugin.errors", unit="{error}",
            description="Plugin hook calls that raised or returned a malformed result")
        self.plugin_timeouts = meter.create_counter(
            "guard.plugin.timeouts", unit="{timeout}",
            description="Batches whose plugins overran plugins.timeout_ms, by the plugin "
                        "running at the time")
        self.plugin_skips = meter.create_counter(
            "guard.plugin.skipped", unit="{call}",
            description="Hot-path plugin calls not made, by plugin and reason: 'stuck' (the "
                        "plugin had plugins.max_stuck_calls calls running past their budget) "
                        "or 'budget' (the request's budget ran out before its turn)")
        if self.metering:
            meter.create_observable_counter(
                "guard.batches", [self.batches.observe], unit="{batch}",
                description="Batches inspected, by hook and stream mode; error.type names the "
                            "status of a rejected batch")
            meter.create_observable_counter(
                "guard.rows", [self.rows.observe], unit="{row}",
                description="Activation rows inspected")
            meter.create_observable_counter(
                "guard.decisions", [self.decisions.observe], unit="{decision}",
                description="Decisions, by action")
            meter.create_observable_counter(
                "guard.findings", [self.findings.observe], unit="{finding}",
                description="Findings, by detector and action")
            meter.create_observable_counter(
                "guard.requests.ended", [self.requests_ended.observe], unit="{request}",
                description="Requests whose state a stream freed on the host's RequestEnded, "
                            "by the reason it gave")
            meter.create_observable_counter(
                "guard.requests.evicted", [self.requests_evicted.observe], unit="{request}",
                description="Requests forgotten because a stream held state for "
                            "max_requests_per_stream requests (least recently seen first)")
            meter.create_observable_counter(
                "guard.requests.unknown_ended", [self.requests_unknown.observe],
                unit="{request}",
                description="Request ids in RequestEnded messages that the stream did not "
                            "hold (never seen, or already forgotten): ignored")
            meter.create_observable_counter(
                "guard.records.dropped", [self._dropped], unit="{record}",
                description="Decision records a sink never got, by sink (guard.plugin.name): "
                            "its record queue was full or closed, or a reload removed it")
            meter.create_observable_counter(
                "guard.records.delivered", [self._delivered], unit="{record}",
                description="Decision records a sink took, by sink (guard.plugin.name)")
            meter.create_observable_counter(
                "guard.records.failed", [self._failed], unit="{record}",
                description="Decision records lost because the sink raised on them (a full "
                            "disk, say), by sink (guard.plugin.name)")
            meter.create_observable_gauge(
                "guard.records.queue_depth", [self._queue_depth], unit="{record}",
                description="Decision records waiting for a sink, by sink (guard.plugin.name)")
            meter.create_observable_gauge(
                "guard.sae.info", [self._sae_info],
                description="1 per served SAE, labelled with its hook, execution provider, "
                            "architecture, weight dtype and sha256")
            meter.create_observable_gauge(
                "guard.plugin.info", [self._plugin_info],
                description="1 per loaded plugin, labelled with its name and version")
            meter.create_observable_gauge(
                "guard.plugin.stuck_calls", [self._plugin_stuck], unit="{call}",
                description="Plugin calls running past their budget now (each holds a "
                            "thread until it returns), by plugin")

    # -- wiring -----------------------------------------------------------------------

    def watch(self, engine: EngineView) -> None:
        """Read queue depth, drops, SAEs and plugins from this engine when metrics are collected."""
        self._engine = engine

    def _per_sink(self, counter: str) -> list[Observation]:
        """One observation of ``counter`` per sink's record queue, labelled with the sink."""
        engine = self._engine
        if engine is None:
            return []
        return [Observation(getattr(sink, counter), {"guard.plugin.name": name})
                for name, sink in sorted(engine.records.sinks.items())]

    def _dropped(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._per_sink("dropped")

    def _delivered(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._per_sink("delivered")

    def _failed(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._per_sink("failed")

    def _queue_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._per_sink("depth")

    def _sae_info(self, _options: CallbackOptions) -> Iterable[Observation]:
        engine = self._engine
        if engine is None:
            return []
        return [
            Observation(1, {"guard.hook": hook,
                            "guard.sae.execution_provider": runtime.execution_provider,
                            "guard.sae.architecture": runtime.info.architecture,
                            "guard.sae.weight_dtype": runtime.info.weight_dtype,
                            "guard.sae.sha256": runtime.info.sha256})
            for hook, runtime in sorted(engine.hooks.items())
        ]

    def _plugin_info(self, _options: CallbackOptions) -> Iterable[Observation]:
        engine = self._engine
        if engine is None:
            return []
        return [Observation(1, {"guard.plugin.name": name, "guard.plugin.version": version})
                for name, version in engine.plugins.items()]

    def _plugin_stuck(self, _options: CallbackOptions) -> Iterable[Observation]:
        engine = self._engine
        if engine is None:
            return []
        stuck = engine.plugin_calls_stuck()
        return [Observation(stuck.get(name, 0), {"guard.plugin.name": name})
                for name in sorted(set(engine.plugins) | set(stuck))]

    def unsampled_parent(self, parent: Context | None) -> bool:
        """True when the sampler would drop a span under ``parent``: start none (cheaper)."""
        if not self._follows_parent or parent is None:
            return False
        span_context = trace.get_current_span(parent).get_span_context()
        return span_context.is_remote and not span_context.trace_flags.sampled

    # -- plugins ----------------------------------------------------------------------

    def plugin_span(self, hook: str, plugin: str, version: str) -> Span | None:
        """A started span for one plugin call under the current span, if that one is sampled.

        Decided on the parent's span context, not on ``is_recording()``: a sink runs on the
        record thread after the batch span has ended, and its span is still the batch's child.
        """
        tracer = self.tracer
        if tracer is None:
            return None
        parent = trace.get_current_span().get_span_context()
        if not (parent.is_valid and parent.trace_flags.sampled):
            return None
        return tracer.start_span(_PLUGIN_SPAN_NAMES.get(hook, f"guard.plugin.{hook}"),
                                 attributes={"guard.plugin.name": plugin,
                                             "guard.plugin.version": version})

    def plugin_called(self, plugin: str, hook: str, seconds: float) -> None:
        if self.metering:
            self.plugin_duration.record(seconds, self._plugin_labels(plugin, hook))

    def plugin_calls(self, calls: Iterable[tuple[str, str, float]]) -> None:
        """Record (plugin, hook, seconds) of several calls."""
        for plugin, hook, seconds in calls:
            self.plugin_called(plugin, hook, seconds)

    def plugin_failed(self, plugin: str, hook: str) -> None:
        if self.metering:
            self.plugin_errors.add(1, self._plugin_labels(plugin, hook))

    def plugin_overran(self, plugin: str) -> None:
        if self.metering:
            self.plugin_timeouts.add(1, {"guard.plugin.name": plugin})

    def plugin_skipped(self, plugin: str, reason: str) -> None:
        """A hot-path call of ``plugin`` not made; ``reason``: ``stuck`` or ``budget``."""
        if self.metering:
            self.plugin_skips.add(1, {"guard.plugin.name": plugin,
                                      "guard.plugin.skip_reason": reason})

    def _plugin_labels(self, plugin: str, hook: str) -> dict[str, str]:
        labels = self._plugin_attributes.get((plugin, hook))
        if labels is None:  # built once per plugin and hook: no dict per call
            labels = {"guard.plugin.name": plugin, "guard.plugin.hook": hook}
            with self._lock:
                self._plugin_attributes[(plugin, hook)] = labels
        return labels

    def reconstruction_measured(self, hook: str, nmses: Iterable[float]) -> None:
        """Record the reconstruction NMSE of each request of a sampled batch of ``hook``."""
        if self.metering:
            labels = {"guard.hook": hook}
            for nmse in nmses:
                self.reconstruction_nmse.record(nmse, labels)

    # -- requests ---------------------------------------------------------------------

    def requests_forgotten(self, reason: str = "", ended: int = 0, unknown: int = 0,
                           evicted: int = 0) -> None:
        """Count requests a stream freed: ``ended`` for ``reason``, ids it did not hold, and
        requests evicted to stay within its cap."""
        if ended:
            self.requests_ended.add((reason,), ended)
        if unknown:
            self.requests_unknown.add((), unknown)
        if evicted:
            self.requests_evicted.add((), evicted)

    # -- batches ----------------------------------------------------------------------

    def batch_measured(self, labels: Mapping[str, str], rows: int, seconds: float,
                       decisions: Sequence[Decision], error: BatchError | None) -> None:
        """Count one batch (``labels``: hook and mode) and its decisions (one per request;
        none when unknown), or its error."""
        hook, mode = labels["guard.hook"], labels["guard.stream.mode"]
        if error is not None:
            self.batches.add((hook, mode, error.code))
            return
        self.batches.add((hook, mode, ""))
        self.rows.add((hook, mode), rows)
        self.batch_duration.record(seconds, labels)
        if not decisions:
            return
        encode = decisions[0].timings.get("encode")  # one encode for the whole batch
        if encode is not None:
            self.encode_duration.record(encode, {"guard.hook": hook})
        for decision in decisions:
            self.decisions.add((hook, _ACTIONS[decision.action]))
            for finding in decision.findings:
                self.findings.add((finding.detector, finding.action))


class Tally:
    """Cumulative counts by label values, cheap to add to; an observable counter reads them.

    An empty label value leaves that attribute out (``error.type`` of a batch that passed).
    """

    def __init__(self, *names: str) -> None:
        self._names = names
        self._counts: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def add(self, values: tuple[str, ...], amount: int = 1) -> None:
        with self._lock:
            self._counts[values] = self._counts.get(values, 0) + amount

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        return [Observation(count, {name: value for name, value in zip(self._names, values,
                                                                       strict=True) if value})
                for values, count in counts]


class BatchError(NamedTuple):
    """Why a batch got an error reply: the status (name and number) and the peer's message."""

    code: str
    number: int
    message: str
    exception: BaseException


def start_batch_span(tracer: Tracer, parent: Context | None, request_id: str, sequence: int,
                     hook: str, mode: str, rpc: Mapping[str, str] = RPC_ATTRIBUTES,
                     request_ids: Sequence[str] = ()) -> Span:
    """The ``guard.inspect`` span of one batch (attributes only when it records); ``rpc``:
    the stream's transport attributes; ``request_ids``: a batch's segments' requests."""
    span = tracer.start_span("guard.inspect", parent, SpanKind.SERVER, rpc)
    if span.is_recording():
        span.set_attributes({"guard.request_id": request_id, "guard.sequence": sequence,
                             "guard.hook": hook, "guard.stream.mode": mode})
        if request_ids:
            span.set_attributes({"guard.request_ids": list(request_ids),
                                 "guard.segments": len(request_ids)})
    return span


def end_batch_span(span: Span, end_time_ns: int, decisions: Sequence[Decision],
                   error: BatchError | None, token_ids: Sequence[int] | None,
                   record_sensitive: bool, *, step: bool = False) -> None:
    """Put the decision (or the error) on a batch span and end it at ``end_time_ns``;
    ``step``: the batch had segments, ``decisions`` holds one per request."""
    if step and error is None:
        step_attributes(span, decisions, record_sensitive)
        span.set_attribute("rpc.grpc.status_code", 0)
    elif decisions:
        decision_attributes(span, decisions[0], record_sensitive)
        span.set_attribute("rpc.grpc.status_code", 0)
    elif error is not None:
        span.set_attributes({"rpc.grpc.status_code": error.number,
                             "guard.error.message": error.message})
        if error.code in SERVER_FAULTS:
            span.record_exception(error.exception)
            span.set_attribute("error.type", error.code)  # the semantic conventions' key
            span.set_status(Status(StatusCode.ERROR, error.code))
    if record_sensitive and token_ids is not None:
        span.set_attribute("guard.token_ids", [int(t) for t in token_ids])
    span.end(end_time_ns)


def step_attributes(span: Span, decisions: Sequence[Decision], record_sensitive: bool) -> None:
    """A batch with segments on its span: the most severe action, and one ``guard.verdict``
    event per request (its decision) followed by that request's ``guard.finding`` events."""
    action = max((d.action for d in decisions), default=Action.CONTINUE)
    attributes: dict[str, Any] = {
        "guard.decision.action": action.name.lower(),
        "guard.rows": sum(len(d.positions) for d in decisions),
        "guard.finding.count": sum(len(d.findings) for d in decisions),
    }
    if decisions:
        first = decisions[0]
        attributes["guard.sae.sha256"] = first.sae_sha256
        attributes["guard.plugin.names"] = [p.name for p in first.plugins]
        attributes["guard.plugin.versions"] = [p.version for p in first.plugins]
    span.set_attributes(attributes)
    for decision in decisions:
        verdict: dict[str, Any] = {
            "guard.request_id": decision.request_id,
            "guard.decision.id": decision.decision_id,
            "guard.decision.action": decision.action.name.lower(),
            "guard.rows": len(decision.positions),
            "guard.phase": decision.phase.name.lower(),
            "guard.finding.count": len(decision.findings),
        }
        if decision.details:
            verdict["guard.decision.details"] = decision.details
        if decision.plugin_errors:
            verdict["guard.decision.plugin_errors"] = list(decision.plugin_errors)
        if decision.edits:
            verdict["guard.steering.feature_ids"] = sorted({int(e.feature_id)
                                                           for e in decision.edits})
        verdict.update(_reconstruction_attributes(decision))
        span.add_event("guard.verdict", verdict)
        _finding_events(span, decision, record_sensitive, decision.request_id)


def decision_attributes(span: Span, decision: Decision, record_sensitive: bool) -> None:
    """The decision as attributes of the batch span, one ``guard.finding`` event per finding."""
    attributes: dict[str, Any] = {
        "guard.decision.id": decision.decision_id,
        "guard.decision.action": decision.action.name.lower(),
        "guard.rows": len(decision.positions),
        "guard.phase": decision.phase.name.lower(),
        "guard.sae.sha256": decision.sae_sha256,
        "guard.plugin.names": [p.name for p in decision.plugins],
        "guard.plugin.versions": [p.version for p in decision.plugins],
        "guard.finding.count": len(decision.findings),
    }
    if decision.details:
        attributes["guard.decision.details"] = decision.details
    if decision.findings:
        attributes["guard.decision.detectors"] = sorted({f.detector for f in decision.findings})
    if decision.plugin_errors:
        attributes["guard.decision.plugin_errors"] = list(decision.plugin_errors)
    if decision.edits:
        attributes["guard.steering.feature_ids"] = sorted({int(e.feature_id)
                                                           for e in decision.edits})
    attributes.update(_reconstruction_attributes(decision))
    span.set_attributes(attributes)
    _finding_events(span, decision, record_sensitive)


def _reconstruction_attributes(decision: Decision) -> dict[str, Any]:
    """A sampled batch's reconstruction error (one number per request: no activation value)
    and whether a finding said its features read outside the SAE's distribution."""
    attributes: dict[str, Any] = {}
    if decision.reconstruction_nmse is not None:
        attributes["guard.sae.reconstruction.nmse"] = float(decision.reconstruction_nmse)
    if decision.out_of_distribution:
        attributes["guard.decision.out_of_distribution"] = True
    return attributes


def _finding_events(span: Span, decision: Decision, record_sensitive: bool,
                    request_id: str = "") -> None:
    """One ``guard.finding`` event per finding; ``request_id`` set for a batch's segment."""
    for finding in decision.findings:
        event: dict[str, Any] = {
            "guard.detector": finding.detector,
            "guard.finding.score": float(finding.score),
            "guard.finding.threshold": float(finding.threshold),
            "guard.finding.action": finding.action,
            "guard.finding.plugin": finding.plugin,
            "guard.feature.ids": [int(f) for f in finding.feature_ids],
            "guard.feature.labels": list(finding.feature_labels),
            "guard.finding.positions": [int(p) for p in finding.positions],
        }
        if request_id:
            event["guard.request_id"] = request_id
        if finding.message:
            event["guard.finding.message"] = finding.message
        if record_sensitive:
            event["guard.feature.activations"] = [float(v) for v in finding.feature_activations]
        span.add_event("guard.finding", event)

