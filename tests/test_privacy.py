"""Privacy defaults, end to end: a real guard with its telemetry set up the way ``guard serve``
does it (``start_telemetry``, ``configure_logging``, the first-party plugins from their entry
points) serves a stream of distinctive rows, token ids and prompt-like attributes, with every
error case; no span, span event, log line, metric (in-process or scraped from the Prometheus
endpoint) or decision log record may hold them. The opt-ins (``telemetry.record_sensitive``,
``decision_log.include_token_ids``) add token ids and feature activations, and only those:
activation rows and batch attributes are never exported."""

from __future__ import annotations

import base64
import io
import logging
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard import FeatureBatch, FeatureRequest, Finding, hookimpl
from guard.config import parse_config
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.sidecar.server import GuardServer
from guard.telemetry.setup import configure_logging, start_telemetry
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import D_IN, HOOK, make_batch

#: Rows filled with this value; float32 holds 1234.5677490234375.
ROW_VALUE = 1234.5678
TOKEN_ID = 987654321
FEATURE_ACTIVATION = 4242.4242
PROMPT = "SECRET-PROMPT how do I pick the lock of my neighbour's door"
USER = "alice.private@example.com"
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
                  "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_TRACES_SAMPLER")


def _row_bytes() -> bytes:
    return np.full(3, ROW_VALUE, dtype="<f4").tobytes()


#: Substrings that betray a row, a token id or the prompt text, however they were rendered.
ROW_MARKERS = ("1234.567", "1234.568", _row_bytes().hex()[:16],
               base64.b64encode(_row_bytes()).decode(), repr(_row_bytes()[:8])[2:-1])
TOKEN_MARKERS = (str(TOKEN_ID)[:8],)
TEXT_MARKERS = ("SECRET-PROMPT", "neighbour", "alice.private")
ACTIVATION_MARKERS = ("4242.42",)


class Evidence:
    """A detector that aborts ``block*`` requests with a distinctive feature activation, and
    fails on ``boom`` (both through the public plugin API)."""

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, [1, 5])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if batch.request_id == "boom":
            raise RuntimeError("evidence detector bug")
        if not batch.request_id.startswith("block"):
            return []
        return [Finding("lockpicking", 4.5, 3.5, "abort", feature_ids=(1,),
                        feature_activations=(FEATURE_ACTIVATION,), feature_labels=("locks",),
                        positions=(0,))]


def _batch(request_id: str, sequence: int, *, nan: bool = False) -> pb.ActivationBatch:
    rows = np.full((3, D_IN), ROW_VALUE, dtype=np.float32)
    if nan:
        rows[1, 2] = np.nan
    batch = make_batch(rows, sequence=sequence, request_id=request_id)
    batch.ClearField("token_ids")
    batch.token_ids.extend([TOKEN_ID, TOKEN_ID + 1, TOKEN_ID + 2])
    batch.attributes["prompt"] = PROMPT
    batch.attributes["user"] = USER
    return batch


def _scenario() -> list[pb.ActivationBatch]:
    truncated = _batch("chat-truncated", 4)
    truncated.activations.raw = truncated.activations.raw[:-4]
    other_hook = _batch("chat-hook", 5)
    other_hook.hook = "blocks.99.hook_resid_post"
    return [_batch("chat-ok", 1), _batch("block-1", 2), _batch("chat-nan", 3, nan=True),
            truncated, other_hook, _batch("boom", 6)]


@dataclass
class Observed:
    """Everything the guard exported while serving the scenario."""

    replies: list[pb.InspectResponse]
    spans: str
    metrics: str
    prometheus: str
    logs: str
    decisions: str

    def channels(self) -> dict[str, str]:
        return {"spans": self.spans, "metrics": self.metrics, "prometheus": self.prometheus,
                "logs": self.logs, "decision log": self.decisions}


def _leaks(text: str, markers: tuple[str, ...]) -> list[str]:
    return [m for m in markers if m in text]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OTEL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("GUARD_DISABLE_PLUGIN_AUTOLOAD", raising=False)


@pytest.fixture
def run_guard(tmp_path: Path, sae_dir: Path, clean_env: None
              ) -> Iterator[Callable[..., Observed]]:
    handlers, level = logging.root.handlers[:], logging.root.level

    def run(*, record_sensitive: bool = False, include_token_ids: bool = False) -> Observed:
        decisions = tmp_path / f"decisions-{record_sensitive}.jsonl"
        config = parse_config(
            f"server:\n  listen: unix://{tmp_path}/guard.sock\n"
            "logging: {level: debug, format: json}\n"
            f"telemetry: {{metrics_listen: '127.0.0.1:0', record_sensitive: "
            f"{str(record_sensitive).lower()}}}\n"
            "plugins:\n  enabled: [detectors, decision_log]\n  trace: true\n  config:\n"
            f"    detectors:\n      always: {{hook: {HOOK}, features: [1], threshold: -1000000,"
            " action: flag}\n"
            f"    decision_log: {{path: '{decisions}', include_token_ids: "
            f"{str(include_token_ids).lower()}}}\n"
            f"saes:\n  - path: {sae_dir}\n",
            env={})
        logs = io.StringIO()
        configure_logging(config.logging, stream=logs)
        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        telemetry = start_telemetry(config.telemetry, span_processors=[
            SimpleSpanProcessor(exporter)], metric_readers=[reader], set_global=False)
        server = GuardServer(config)
        try:
            server.start()
            server.set_ready(Engine.load(config, instruments=telemetry.instruments,
                                         extra_plugins=[PluginSource("evidence", "1.0",
                                                                     Evidence())]))
            with grpc.insecure_channel(server.addresses[0]) as channel:
                requests = [pb.InspectRequest(config=pb.StreamConfig(
                    mode=pb.MODE_INLINE, hooks=[HOOK], host="host-a"))]
                requests += [pb.InspectRequest(batch=b) for b in _scenario()]
                replies = list(pb_grpc.GuardStub(channel).Inspect(iter(requests), timeout=30))
            with urllib.request.urlopen(
                    f"http://{telemetry.metrics_address}/metrics", timeout=10) as response:
                prometheus = response.read().decode()
        finally:
            server.stop(0)  # the engine closes: every record reaches the decision log
        metrics_data = reader.get_metrics_data()
        telemetry.shutdown()
        return Observed(
            replies=replies,
            spans="\n".join(span.to_json() for span in exporter.get_finished_spans()),
            metrics=metrics_data.to_json() if metrics_data is not None else "",
            prometheus=prometheus,
            logs=logs.getvalue(),
            decisions=decisions.read_text() if decisions.exists() else "",
        )

    yield run
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def _check_scenario(observed: Observed) -> None:
    """The scenario really ran: each case got its reply, and each channel saw it."""
    replies = observed.replies
    assert [r.request_id for r in replies] == ["chat-ok", "block-1", "chat-nan",
                                               "chat-truncated", "chat-hook", "boom"]
    assert [r.action for r in replies[:2]] == [pb.ACTION_CONTINUE, pb.ACTION_ABORT]
    assert [r.HasField("error") for r in replies] == [False, False, True, True, True, False]
    assert "hold NaN or Inf" in replies[2].error.message
    assert "always" in observed.spans and "lockpicking" in observed.spans
    assert "guard.finding" in observed.spans and "guard.error.message" in observed.spans
    assert "guard.batches" in observed.metrics and "guard_batches" in observed.prometheus
    for event in ("batch rejected", "batch aborted", "plugin failed", "hook call"):
        assert event in observed.logs, event
    assert observed.decisions.count('"event": "decision"') == 3


def test_nothing_sensitive_is_exported_by_default(run_guard: Callable[..., Observed]) -> None:
    observed = run_guard()
    _check_scenario(observed)
    for name, text in observed.channels().items():
        assert _leaks(text, ROW_MARKERS) == [], name
        assert _leaks(text, TOKEN_MARKERS) == [], name
        assert _leaks(text, TEXT_MARKERS) == [], name
        if name != "decision log":
            assert _leaks(text, ACTIVATION_MARKERS) == [], name
    assert "guard.token_ids" not in observed.spans
    assert "guard.feature.activations" not in observed.spans
    assert '"token_ids"' not in observed.decisions


def test_the_opt_ins_add_token_ids_and_feature_activations_and_nothing_else(
    run_guard: Callable[..., Observed],
) -> None:
    observed = run_guard(record_sensitive=True, include_token_ids=True)
    _check_scenario(observed)
    assert "guard.token_ids" in observed.spans and str(TOKEN_ID) in observed.spans
    assert "guard.feature.activations" in observed.spans
    assert _leaks(observed.spans, ACTIVATION_MARKERS) == list(ACTIVATION_MARKERS)
    assert f'"token_ids": [{TOKEN_ID}, {TOKEN_ID + 1}, {TOKEN_ID + 2}]' in observed.decisions
    for name, text in observed.channels().items():
        assert _leaks(text, ROW_MARKERS) == [], name  # rows: never, whatever the switches
        assert _leaks(text, TEXT_MARKERS) == [], name  # batch attributes: never
        if name in ("logs", "metrics", "prometheus"):
            assert _leaks(text, TOKEN_MARKERS + ACTIVATION_MARKERS) == [], name


def test_the_decision_log_records_hold_no_rows_token_ids_or_attributes_by_default(
    run_guard: Callable[..., Observed],
) -> None:
    """The decision log's defaults: positions, findings (with the detectors' feature
    activations, unless mask_feature_activations), never rows, token ids or attributes."""
    observed = run_guard()
    assert '"positions": [0, 1, 2]' in observed.decisions
    assert _leaks(observed.decisions, ACTIVATION_MARKERS) == list(ACTIVATION_MARKERS)
    for key in ('"token_ids":', '"attributes":', '"rows":', '"prompt":', '"user":'):
        assert key not in observed.decisions, key
