"""Telemetry set-up: structlog lines, and the OpenTelemetry SDK behind the guard's spans and
metrics. The one module that touches the SDK (imported lazily, when ``guard serve`` starts).

Logs are JSON lines when not on a TTY, readable lines on a TTY; every line written while a
traced batch is processed carries ``trace_id`` and ``span_id``, and every line of a batch
carries its ``decision_id``. Log events never carry activations or prompt text.

Traces and metrics follow the standard ``OTEL_*`` environment variables (service name,
resource attributes, sampler, OTLP endpoint, protocol, headers, batch processor and export
intervals): spans are recorded only when something exports them (an OTLP endpoint, or
``OTEL_TRACES_EXPORTER=console``); metrics go to the Prometheus endpoint of
``telemetry.metrics_listen``, to OTLP when an endpoint is set, and to the console with
``OTEL_METRICS_EXPORTER=console`` (``prometheus`` there names the metrics_listen endpoint).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO

import structlog
from opentelemetry import trace

from guard import __version__
from guard.config import LoggingConfig, TelemetryConfig
from guard.errors import ConfigError, ListenError
from guard.telemetry.instruments import DECISION_ID, Instruments

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import SpanProcessor

log = structlog.get_logger(__name__)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

#: ``service.name`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` name one.
SERVICE_NAME: Final = "activation-guard"


def add_trace_context(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ``trace_id``/``span_id`` and the decision id."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    decision_id = DECISION_ID.get()
    if decision_id:
        event_dict.setdefault("decision_id", decision_id)
    return event_dict


class _StdlibHandler(logging.Handler):
    """Writes the standard library's records, formatted by structlog, to ``out``.

    Through a structlog ``PrintLogger``: it holds the stream's structlog lock, so a record
    logged on another thread never lands inside one of structlog's lines.
    """

    def __init__(self, out: TextIO, level: int) -> None:
        super().__init__(level)
        self._printer = structlog.PrintLogger(out)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._printer.msg(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library's logging to ``stream`` (stderr), both
    rendered alike: JSON lines (or console lines) with the trace and decision ids."""
    out = stream if stream is not None else sys.stderr
    json_lines = config.format == "json" or (config.format == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        # Tracebacks without local variables: a frame's locals may hold activation rows.
        else structlog.dev.ConsoleRenderer(
            colors=out.isatty(),
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False))
    )
    level = _LEVELS[config.level]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = _StdlibHandler(out, level)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for previous in root.handlers[:]:  # as basicConfig(force=True): one handler, ours
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    root.setLevel(level)


@dataclass
class Telemetry:
    """The SDK objects behind the guard's instruments; :meth:`shutdown` flushes them."""

    instruments: Instruments
    #: ``host:port`` the Prometheus endpoint is bound to; empty when there is none.
    metrics_address: str = ""
    #: What exports spans and metrics, for the start-up log line (``otlp``, ``prometheus``).
    traces_to: tuple[str, ...] = ()
    metrics_to: tuple[str, ...] = ()
    _closers: list[Callable[[], object]] = field(default_factory=list)

    def shutdown(self) -> None:
        """Export what is buffered (spans, a last OTLP metrics push), stop the endpoint."""
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                close()
            except Exception as exc:  # telemetry must never fail the guard's exit
                log.warning("telemetry shutdown failed", error=type(exc).__name__,
                            reason=str(exc))


def _env(name: str, *fallbacks: str, default: str = "") -> str:
    for variable in (name, *fallbacks):
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    return default


def _exporters(signal: str) -> list[str]:
    """``OTEL_TRACES_EXPORTER`` (otlp, console, none) / ``OTEL_METRICS_EXPORTER`` (otlp,
    prometheus, console, none).

    ``prometheus`` is the endpoint at ``telemetry.metrics_listen``, which serves it either way.
    """
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    names = [n.strip().lower() for n in _env(variable, default="otlp").split(",") if n.strip()]
    allowed = (("otlp", "console", "none") if signal == "traces"
               else ("otlp", "prometheus", "console", "none"))
    for name in names:
        if name not in allowed:
            raise ConfigError(variable, f"a list of {', '.join(allowed)}", name,
                              source="environment")
    return [n for n in names if n != "none"]


def _otlp_protocol(signal: str) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    protocol = _env(variable, "OTEL_EXPORTER_OTLP_PROTOCOL", default="grpc")
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(variable if os.environ.get(variable) else "OTEL_EXPORTER_OTLP_PROTOCOL",
                          "grpc or http/protobuf", protocol, source="environment")
    return protocol


def _otlp_endpoint(signal: str) -> str:
    return _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _http_exporter_missing(exc: ImportError) -> ConfigError:
    return ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL",
                       "grpc, or http/protobuf with opentelemetry-exporter-otlp-proto-http "
                       "installed", f"http/protobuf ({exc})", source="environment")


def _span_exporter(protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter as HttpSpanExporter,
        )
    except ImportError as exc:
        raise _http_exporter_missing(exc) from exc
    return HttpSpanExporter()


def _metric_exporter(protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPMetricExporter as HttpMetricExporter,
        )
    except ImportError as exc:
        raise _http_exporter_missing(exc) from exc
    return HttpMetricExporter()


def _resource() -> Any:
    from opentelemetry.sdk.resources import (
        SERVICE_NAME as SERVICE_NAME_KEY,
    )
    from opentelemetry.sdk.resources import (
        SERVICE_VERSION,
        OTELResourceDetector,
        Resource,
    )

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the guard's defaults.
    from_env = OTELResourceDetector().detect().attributes
    return Resource.create({SERVICE_NAME_KEY: SERVICE_NAME, SERVICE_VERSION: __version__,
                            **from_env})


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464``, ``:9464`` for every interface) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_telemetry(
    config: TelemetryConfig,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    set_global: bool = True,
) -> Telemetry:
    """Set up tracing and metrics as ``config`` and the ``OTEL_*`` variables say.

    ``span_processors`` and ``metric_readers`` are added to what the environment asks for
    (tests pass in-memory ones). ``set_global`` makes the providers OpenTelemetry's global
    ones, which plugins reach through ``opentelemetry.trace.get_tracer(...)`` and
    ``opentelemetry.metrics.get_meter(...)``; globals can be set once per process.
    ``OTEL_SDK_DISABLED=true`` turns everything but the in-process extras off.
    """
    disabled = _env("OTEL_SDK_DISABLED").lower() == "true"
    # Checked before anything starts: a bad variable must not leave threads or a port behind.
    metric_exporters = [] if disabled else _exporters("metrics")
    if "prometheus" in metric_exporters and not config.metrics_listen:
        raise ConfigError("telemetry.metrics_listen",
                          "host:port of the Prometheus endpoint that "
                          "OTEL_METRICS_EXPORTER=prometheus asks for (or GUARD_METRICS_LISTEN)",
                          config.metrics_listen)
    telemetry = Telemetry(Instruments())
    resource = _resource()
    tracer_provider = None
    processors = list(span_processors)
    if config.tracing and not disabled:
        exporters = _exporters("traces")
        endpoint = _otlp_endpoint("traces")
        if "otlp" in exporters and endpoint:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processors.append(BatchSpanProcessor(_span_exporter(_otlp_protocol("traces"))))
            telemetry.traces_to += (f"otlp {endpoint}",)
        if "console" in exporters:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            telemetry.traces_to += ("console",)
    if processors and config.tracing:
        from opentelemetry.sdk.trace import TracerProvider

        # The sampler comes from OTEL_TRACES_SAMPLER (default: parentbased_always_on).
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        telemetry._closers.append(tracer_provider.shutdown)

    readers = list(metric_readers)
    if config.metrics_listen:
        readers.append(_prometheus(config.metrics_listen, telemetry))
    if "otlp" in metric_exporters and _otlp_endpoint("metrics"):
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        # The interval comes from OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
        readers.append(PeriodicExportingMetricReader(_metric_exporter(_otlp_protocol("metrics"))))
        telemetry.metrics_to += (f"otlp {_otlp_endpoint('metrics')}",)
    if "console" in metric_exporters:
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        telemetry.metrics_to += ("console",)
    meter_provider = None
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(metric_readers=readers, resource=resource,
                                       shutdown_on_exit=False)
        # Before the endpoint stops: a scrape during shutdown still finds a live provider.
        telemetry._closers.insert(0, meter_provider.shutdown)

    if set_global:
        from opentelemetry import metrics

        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics.set_meter_provider(meter_provider)
    follows_parent = False
    if tracer_provider is not None:
        from opentelemetry.sdk.trace.sampling import ParentBased

        # From OTEL_TRACES_SAMPLER, every parentbased_* sampler drops under an unsampled
        # remote parent: the hot path can then skip the span altogether.
        follows_parent = isinstance(tracer_provider.sampler, ParentBased)
    telemetry.instruments = Instruments(tracer_provider, meter_provider,
                                        record_sensitive=config.record_sensitive,
                                        sampler_follows_parent=follows_parent)
    log.info("telemetry", traces=list(telemetry.traces_to) or None,
             metrics=list(telemetry.metrics_to) or None,
             metrics_address=telemetry.metrics_address or None,
             sampler=_env("OTEL_TRACES_SAMPLER", default="parentbased_always_on")
             if tracer_provider is not None else None,
             record_sensitive=config.record_sensitive)
    return telemetry


def _prometheus(address: str, telemetry: Telemetry) -> MetricReader:
    """A Prometheus reader with its own registry, served on ``address`` at ``/metrics`` by a
    bounded server of one thread (:mod:`guard.telemetry.metrics_http`)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    from guard.telemetry.metrics_http import MetricsServer

    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    host, port = split_host_port(address)
    try:
        server = MetricsServer(registry, host, port)
    except OSError as exc:
        raise ListenError(f"telemetry.metrics_listen: cannot listen on {address!r}: "
                          f"{exc.strerror or exc}") from exc
    try:
        server.start()
    except RuntimeError as exc:  # can't start new thread
        server.stop()
        raise ListenError(f"telemetry.metrics_listen: cannot start the endpoint's thread: "
                          f"{exc}") from exc
    telemetry.metrics_address = server.address
    telemetry.metrics_to += (f"prometheus http://{telemetry.metrics_address}/metrics",)
    telemetry._closers.append(server.stop)
    return reader
