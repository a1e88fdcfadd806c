"""A small OTLP/gRPC receiver on loopback: what a collector would get from the guard.

Implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and the metrics
service (the guard pushes OTLP metrics to the same endpoint). ``guard demo`` collects the
host's and the sidecar's spans with it to show a decision's trace; the export tests and
``bench/tracing.py`` use it as the destination of the guard's exports. Not a collector:
it keeps everything in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

T = TypeVar("T")


def value_of(value: AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (arrays as lists)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    """OTLP ``repeated KeyValue`` as a dict."""
    pairs: list[KeyValue] = list(items)
    return {pair.key: value_of(pair.value) for pair in pairs}


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest,
               context: grpc.ServicerContext
               ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._receiver._add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """Collects exported spans (with their resource attributes) and metric names."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        #: ``service.name`` of the resource each span came from, by span id.
        self.services: dict[bytes, str] = {}
        #: Resource attributes of each request that carried spans.
        self.resources: list[dict[str, Any]] = []
        self.metric_names: set[str] = set()
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                              thread_name_prefix="otlp"))
        # The generated registration functions carry no annotations (no stubs ship for them).
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Traces(self), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Metrics(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._changed:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                self.resources.append(resource)
                service = str(resource.get("service.name", ""))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
                    self.services.update((span.span_id, service) for span in scope_spans.spans)
            self._changed.notify_all()

    def _add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._changed:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    self.metric_names.update(m.name for m in scope_metrics.metrics)
            self._changed.notify_all()

    def wait_for(self, found: Callable[[OtlpReceiver], T | None], timeout: float = 20.0) -> T:
        """Wait until ``found(self)`` returns something; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found(self)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: nothing matched after {timeout:.0f} s; got "
                        f"{[s.name for s in self.spans]} and metrics {sorted(self.metric_names)}")
                self._changed.wait(left)
