"""Follow one decision of ``guard demo``: its trace (the host's spans, then the sidecar's),
its log line, and its counters.

The demo host process traces with the OpenTelemetry SDK (service ``guard-demo-host``): a
server span per HTTP request, the SDK's ``guard.host.generation`` and ``guard.host.inspect``
spans. The sidecar (service ``activation-guard``) continues each batch's trace. Both export
over OTLP/gRPC: to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when you set one (your collector, Jaeger,
Tempo: look the trace id up there), otherwise to a receiver inside the demo on loopback,
and the demo prints the span tree of the blocked request, the sidecar's log line found by
the same trace and decision ids, and the counters from the sidecar's Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from guard.demo.otlp_receiver import OtlpReceiver, attributes, value_of

if TYPE_CHECKING:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
    from opentelemetry.sdk.trace import TracerProvider

HOST_SERVICE: Final = "guard-demo-host"
#: Span attributes worth a column in the printed tree (others are in the exported spans).
_SHOWN: Final = ("http.response.status_code", "guard.decision.action", "guard.decision.id",
                 "guard.verdict.source", "guard.decision.detectors", "guard.sae.sha256",
                 "guard.plugin.name", "guard.hook", "guard.rows")
#: The instrumentation scope labels the exporter adds to every series (noise here).
_SCOPE_LABELS: Final = re.compile(r',?otel_scope_[a-z_]+="[^"]*"')
#: Prometheus series the walkthrough prints (a dashboard's first row).
_COUNTERS: Final = ("guard_decisions_total", "guard_findings_total", "guard_batches_total",
                    "guard_rows_total", "guard_records_dropped_total")


def _user_endpoint() -> str:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


@dataclass
class DemoTracing:
    """The demo host's tracer provider and where both processes send their spans."""

    provider: TracerProvider
    #: The receiver on loopback; None when the user's OTLP endpoint takes the spans.
    receiver: OtlpReceiver | None
    endpoint: str
    sidecar_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls) -> DemoTracing:
        """Set up the host's SDK (the global tracer provider of this process)."""
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        endpoint = _user_endpoint()
        receiver = None
        env: dict[str, str] = {}
        if endpoint:
            exporter = OTLPSpanExporter()  # from the OTEL_* variables, as the sidecar's
        else:
            receiver = OtlpReceiver().start()
            endpoint = receiver.endpoint
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                   "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
                   "OTEL_BSP_SCHEDULE_DELAY": "200"}
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: HOST_SERVICE}),
                                  shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        trace.set_tracer_provider(provider)
        return cls(provider, receiver, endpoint, env)

    def close(self) -> None:
        self.provider.shutdown()
        if self.receiver is not None:
            self.receiver.stop()

    def walk(self, trace_id: str, decision_id: str, guard_log: Path,
             metrics_address: str, timeout: float = 20.0) -> str:
        """The walkthrough of one decision, as text."""
        self.provider.force_flush()
        lines = [f"Trace a decision: decision {decision_id}, trace {trace_id}"]
        if self.receiver is None:
            lines.append(f"  spans exported to {self.endpoint}: look the trace id up there")
        else:
            spans = self.receiver.wait_for(
                lambda r: _trace_if_complete(r.spans, trace_id, decision_id), timeout)
            lines.append("  spans (service, duration, attributes):")
            lines += ["    " + line for line in span_tree(spans, self.receiver.services)]
        record = log_line(guard_log, decision_id)
        lines.append(f"  the sidecar's log line ({guard_log.name}), found by decision id:")
        lines.append("    " + (json.dumps(record, sort_keys=True) if record else "(none)"))
        if record and record.get("trace_id") not in (None, trace_id):
            lines.append(f"    (its trace_id {record['trace_id']} is not the request's)")
        lines.append(f"  counters (Prometheus endpoint http://{metrics_address}/metrics):")
        lines += ["    " + line for line in counters(metrics_address)]
        return "\n".join(lines)


def _trace_if_complete(spans: Iterable[Span], trace_id: str, decision_id: str
                       ) -> list[Span] | None:
    """The trace's spans once the host's root and the sidecar's decision are both in."""
    wanted = bytes.fromhex(trace_id)
    found = [s for s in spans if s.trace_id == wanted]
    has_decision = any(s.name == "guard.inspect" and _attributes(s).get("guard.decision.id")
                       == decision_id for s in found)
    has_root = any(not s.parent_span_id for s in found)
    return found if has_decision and has_root else None


def _attributes(span: Span) -> dict[str, Any]:
    return attributes(span.attributes)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value[:6]) + (", ..." if len(value) > 6
                                                                   else "") + "]"
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text  # a sha256


def span_tree(spans: list[Span], services: Mapping[bytes, str]) -> list[str]:
    """One line per span, children indented under their parent, in start order."""
    by_parent: dict[bytes, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for span in sorted(spans, key=lambda s: s.start_time_unix_nano):
        parent = span.parent_span_id if span.parent_span_id in ids else b""
        by_parent.setdefault(parent, []).append(span)
    lines: list[str] = []

    def visit(parent: bytes, depth: int) -> None:
        for span in by_parent.get(parent, []):
            attributes = _attributes(span)
            shown = " ".join(f"{key.removeprefix('guard.')}={_short(attributes[key])}"
                             for key in _SHOWN if key in attributes)
            millis = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            name = "  " * depth + span.name
            lines.append(f"{name:<34} {services.get(span.span_id, '?'):<17} "
                         f"{millis:8.1f} ms  {shown}".rstrip())
            for event in span.events:
                if event.name == "guard.finding":
                    values = {kv.key: value_of(kv.value) for kv in event.attributes}
                    lines.append(
                        f"{'  ' * (depth + 1)}event guard.finding: detector="
                        f"{values.get('guard.detector')} score="
                        f"{float(values.get('guard.finding.score', 0)):.3f} threshold="
                        f"{float(values.get('guard.finding.threshold', 0)):.3f} features="
                        f"{_short(values.get('guard.feature.ids', []))}")
            visit(span.span_id, depth + 1)

    visit(b"", 0)
    return lines


def log_line(guard_log: Path, decision_id: str) -> dict[str, Any] | None:
    """The sidecar's JSON log line of the decision (its ``batch aborted`` line, or any line
    that names the decision id)."""
    found: dict[str, Any] | None = None
    for raw in guard_log.read_text(encoding="utf-8", errors="replace").splitlines():
        if decision_id not in raw:
            continue
        try:
            event: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if event.get("decision_id") == decision_id:
            if event.get("event") == "batch aborted":
                return event
            found = found or event
    return found


def metrics_address(guard_log: Path) -> str:
    """Where the sidecar's Prometheus endpoint listens (its ``telemetry`` log line)."""
    for raw in guard_log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "telemetry":
            return str(event.get("metrics_address") or "")
    return ""


def counters(address: str) -> list[str]:
    """The non-zero series of the walkthrough's counters, as Prometheus exposes them."""
    if not address:
        return ["(the sidecar has no metrics endpoint)"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    lines = [_SCOPE_LABELS.sub("", line).replace("{,", "{").replace(",}", "}")
             for line in text.splitlines()
             if line.startswith(_COUNTERS) and not line.rstrip().endswith(" 0.0")]
    return lines or ["(no series yet)"]
