"""The host SDK's spans and metrics, written through the OpenTelemetry API only.

The application owns the SDK (its exporters, sampler and resource): without one every call
here is a no-op that costs a few attribute lookups. With one:

- ``guard.host.generation`` (INTERNAL): one per generation, opened by
  :meth:`guard.host.attach.Attachment.request`; a child of whatever span is current (the
  application's HTTP server span, for example), so the request's trace continues. It carries
  ``gen_ai.operation.name`` and, when the model's name is known, ``gen_ai.request.model``.
- ``guard.host.inspect`` (CLIENT): one per inspected batch, a child of the current span, with
  ``rpc.*`` attributes as the gRPC client instrumentation writes them (``rpc.system``
  ``guard_doorbell`` on the doorbell socket). Its W3C trace context
  travels to the guard in the batch's ``traceparent``/``tracestate`` attributes (per batch:
  one gRPC stream serves many requests), where the guard's ``guard.inspect`` span becomes its
  child. The verdict is on the span: action, decision id, who decided (``guard``, the failure
  policy, ``monitor``), and for a failure-policy verdict its cause, with the span status
  ERROR (a fault of the call, as the semantic conventions for gRPC clients say).
  A step of several requests (``inspect_step``) is one such span with the requests' ids in
  ``guard.request_ids`` (a list, in segment order), the most severe action in
  ``guard.decision.action`` and each request's decision id in ``guard.decision.ids``.

Metrics (meter ``guard.host``): ``guard.host.batches`` by mode, action and verdict source,
``guard.host.failure_policy`` (fail-open and fail-closed events by cause),
``guard.host.inspect.duration`` (seconds, INLINE) and ``guard.host.monitor.dropped``.
Spans and metrics never carry activations, token ids or prompt text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final, Literal, cast

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from guard import __version__
from guard.telemetry.conventions import DOORBELL_ATTRIBUTES, LATENCY_BUCKETS, RPC_ATTRIBUTES

if TYPE_CHECKING:
    from guard.host._verdict import StepVerdict, Verdict

#: Instrumentation scope of the host SDK's tracer and meter.
SCOPE: Final = "guard.host"

_lock = threading.Lock()
_instruments: HostInstruments | None = None


class HostInstruments:
    """The host SDK's counters and histogram (from the global meter provider: a proxy until
    the application sets up its SDK, then the SDK's)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE, __version__)
        self.batches = meter.create_counter(
            "guard.host.batches", unit="{batch}",
            description="Batches the host sent to the guard (or tried to), by mode, the "
                        "verdict's action and who decided it")
        self.failure_policy = meter.create_counter(
            "guard.host.failure_policy", unit="{event}",
            description="Verdicts decided by the failure policy (fail_open or fail_closed) "
                        "because the guard was unavailable, late, or answered an error")
        self.duration = meter.create_histogram(
            "guard.host.inspect.duration", unit="s",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            description="INLINE: time from inspect() to its verdict, as the host saw it")
        self.monitor_dropped = meter.create_counter(
            "guard.host.monitor.dropped", unit="{batch}",
            description="MONITOR batches dropped because the send queue was full")


def use_meter_provider(provider: metrics.MeterProvider | None) -> None:
    """Record the host metrics with ``provider`` instead of the global meter provider (for
    applications that keep the guard's metrics apart, and tests); None: back to the global."""
    global _instruments
    with _lock:
        _instruments = HostInstruments(provider) if provider is not None else None


def instruments() -> HostInstruments:
    """The process's host instruments, made on first use."""
    global _instruments
    if _instruments is None:
        with _lock:
            if _instruments is None:
                _instruments = HostInstruments()
    return _instruments


def tracer() -> trace.Tracer:
    return trace.get_tracer(SCOPE, __version__)


def start_inspect_span(request_id: str, hook: str, rows: int, mode: str,
                       doorbell: bool = False) -> Span:
    """The ``guard.host.inspect`` span of one batch, a child of the current span;
    ``doorbell``: the stream is on the guard's doorbell socket, not a gRPC call."""
    span = tracer().start_span("guard.host.inspect", kind=SpanKind.CLIENT,
                               attributes=DOORBELL_ATTRIBUTES if doorbell else RPC_ATTRIBUTES)
    if span.is_recording():
        span.set_attributes({"guard.request_id": request_id, "guard.hook": hook,
                             "guard.rows": rows, "guard.stream.mode": mode})
    return span


def start_step_span(request_ids: Sequence[str], hook: str, rows: int, mode: str,
                    doorbell: bool = False) -> Span:
    """The ``guard.host.inspect`` span of one step of several requests (``inspect_step``),
    with their ids in ``guard.request_ids``."""
    span = tracer().start_span("guard.host.inspect", kind=SpanKind.CLIENT,
                               attributes=DOORBELL_ATTRIBUTES if doorbell else RPC_ATTRIBUTES)
    if span.is_recording():
        span.set_attributes({"guard.request_ids": list(request_ids), "guard.hook": hook,
                             "guard.rows": rows, "guard.segments": len(request_ids),
                             "guard.stream.mode": mode})
    return span


def inject(span: Span, carrier: MutableMapping[str, str]) -> None:
    """Put ``span``'s W3C trace context (``traceparent``, ``tracestate``) into ``carrier``.

    Only for a valid span context: without an SDK nothing is added, and an unsampled span
    travels with its sampled flag off, so the guard (parent-based sampling) skips its spans.
    A ``traceparent`` the caller put there (the client's ``trace_context`` hook, or the
    batch's attributes) wins: the application chose that context.
    """
    if "traceparent" not in carrier and span.get_span_context().is_valid:
        propagate.inject(carrier, context=trace.set_span_in_context(span))


def end_inspect_span(span: Span, verdict: Verdict | StepVerdict, mode: str,
                     elapsed_s: float) -> None:
    """Record the verdict on the batch span and in the metrics, then end the span (for a
    step: the most severe action, every request's decision id and detectors)."""
    action = verdict.action.name.lower()
    attributes = {"guard.stream.mode": mode, "guard.decision.action": action,
                  "guard.verdict.source": verdict.source}
    box = instruments()
    box.batches.add(1, attributes)
    if mode == "inline":
        box.duration.record(elapsed_s, attributes)
    if verdict.decided_by_policy:
        cause = verdict_cause(verdict)
        box.failure_policy.add(1, {"guard.verdict.source": verdict.source,
                                   "guard.failure.cause": cause})
    if span.is_recording():
        span.set_attributes(attributes)
        if verdict.sequence:
            span.set_attribute("guard.sequence", verdict.sequence)
        step: tuple[Verdict, ...] | None = getattr(verdict, "verdicts", None)
        verdicts = (cast("Verdict", verdict),) if step is None else step
        if step is None:
            decision_id = getattr(verdict, "decision_id", "")
            if decision_id:
                span.set_attribute("guard.decision.id", decision_id)
        elif any(v.decision_id for v in step):
            span.set_attribute("guard.decision.ids", [v.decision_id for v in step])
        detectors = sorted({f.detector for v in verdicts for f in v.findings})
        if detectors:
            span.set_attribute("guard.decision.detectors", detectors)
        if step is None or verdict.decided_by_policy:
            details = verdicts[0].details
        else:
            details = "; ".join(f"{v.request_id}: {v.details}" for v in step if v.details)
        if details:
            span.set_attribute("guard.decision.details", details)
        if verdict.decided_by_policy:
            span.set_attribute("guard.failure.cause", verdict_cause(verdict))
            span.set_attribute("error.type", verdict_cause(verdict))
            span.set_status(Status(StatusCode.ERROR, verdict.reason))
    span.end()


def fail_inspect_span(span: Span, exc: BaseException) -> None:
    """``inspect`` raised (a cancelled task, a client bug): an error span, then ended."""
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.end()


def verdict_cause(verdict: Verdict | StepVerdict) -> str:
    """The failure-policy cause recorded on a policy verdict (``unavailable`` etc.)."""
    return verdict.cause or "error"


@contextmanager
def generation_span(request_id: str | Sequence[str], *,
                    operation: Literal["chat", "text_completion"] = "text_completion",
                    model: str | None = None) -> Iterator[Span]:
    """``guard.host.generation``: one generation, a child of the current span (if any). The
    caller records exceptions (an abort by the guard is a decision, not an error). A batch
    of generations (one per sequence, ``request_id`` a sequence of ids) is one span with
    their ids in ``guard.request_ids``.

    ``operation`` and ``model`` (the model's name, when known) become the GenAI semantic
    conventions' ``gen_ai.operation.name`` and ``gen_ai.request.model``.
    """
    with tracer().start_as_current_span("guard.host.generation", kind=SpanKind.INTERNAL,
                                        record_exception=False,
                                        set_status_on_exception=False) as span:
        if span.is_recording():
            span.set_attributes({"guard.request_id": request_id} if isinstance(request_id, str)
                                else {"guard.request_ids": list(request_id)})
            span.set_attribute("gen_ai.operation.name", operation)
            if model:
                span.set_attribute("gen_ai.request.model", model)
        yield span
