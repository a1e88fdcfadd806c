"""`guard serve` exporting for real: OTLP/gRPC to a receiver on loopback, and a real
Prometheus server (Debian package `prometheus`) scraping `/metrics`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from guard.demo.otlp_receiver import OtlpReceiver, attributes
from guard.sidecar.process import GuardProcess
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import HOOK, make_batch

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
HOST_SPAN_ID = "00f067aa0ba902b7"


def write_config(tmp_path: Path, sae_dir: Path, socket_path: Path, telemetry: str = "") -> Path:
    """A guard whose first-party detector aborts every batch, with the decision log on."""
    config = tmp_path / "guard.yaml"
    config.write_text(
        f"server:\n  listen: unix://{socket_path}\n  drain_grace_seconds: 5\n"
        f"saes:\n  - path: {sae_dir}\n"
        "plugins:\n  config:\n    detectors:\n      self-harm:\n        type: threshold\n"
        f"        hook: {HOOK}\n        features: [1, 5, 7]\n        threshold: 0.0\n"
        "        action: abort\n"
        + telemetry
    )
    return config


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable of the machine leaks into the guard under test."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def start_guard(tmp_path: Path, sae_dir: Path) -> Iterator[Any]:
    started: list[GuardProcess] = []

    def start(telemetry: str = "") -> GuardProcess:
        # Unix socket paths are limited to ~107 bytes: keep it short.
        socket_path = Path(f"/tmp/guard-otel-{os.getpid()}-{time.monotonic_ns()}.sock")
        guard = GuardProcess(write_config(tmp_path, sae_dir, socket_path, telemetry),
                             f"unix://{socket_path}")
        started.append(guard)
        return guard.start()

    yield start
    for guard in started:
        guard.stop(grace=0)


def inspect(address: str, request_ids: list[str],
            metadata: tuple[tuple[str, str], ...] = ()) -> list[pb.InspectResponse]:
    requests = [pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE, hooks=[HOOK]))]
    requests += [pb.InspectRequest(batch=make_batch(sequence=i + 1, request_id=r))
                 for i, r in enumerate(request_ids)]
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.GuardStub(channel).Inspect(iter(requests), metadata=metadata,
                                                      timeout=30))


def log_events(guard: GuardProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in guard.log.read_text().splitlines()
            if line.startswith("{")]


def test_spans_and_metrics_reach_an_otlp_collector(
    otel_env: pytest.MonkeyPatch, start_guard: Any
) -> None:
    with OtlpReceiver() as receiver:
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        otel_env.setenv("OTEL_SERVICE_NAME", "guard-under-test")
        otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
        otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        otel_env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        guard = start_guard()
        traceparent = f"00-{TRACE_ID}-{HOST_SPAN_ID}-01"
        (reply,) = inspect(guard.address, ["req-blocked"], (("traceparent", traceparent),))
        assert reply.action == pb.ACTION_ABORT

        def complete(r: OtlpReceiver) -> list[Any]:
            names = {s.name for s in r.spans if s.trace_id.hex() == TRACE_ID}
            return [True] if "guard.plugin.record" in names and "guard.inspect" in names else []

        receiver.wait_for(complete)
        receiver.wait_for(lambda r: [True] if "guard.batches" in r.metric_names else [])
        guard.terminate()
        assert guard.wait(timeout=30) == 0

    spans = [s for s in receiver.spans if s.trace_id.hex() == TRACE_ID]
    (batch,) = [s for s in spans if s.name == "guard.inspect"]
    assert batch.parent_span_id.hex() == HOST_SPAN_ID  # a child of the host's span
    assert batch.kind == batch.SPAN_KIND_SERVER
    children = {s.name: s for s in spans if s.parent_span_id == batch.span_id}
    assert set(children) >= {"guard.decode", "guard.encode", "guard.plugin.detect",
                             "guard.plugin.record"}
    # One detect span per detecting plugin (an installed but unconfigured one too).
    detecting = {attributes(s.attributes)["guard.plugin.name"] for s in spans
                 if s.parent_span_id == batch.span_id and s.name == "guard.plugin.detect"}
    assert "detectors" in detecting, detecting
    assert attributes(children["guard.plugin.record"].attributes)["guard.plugin.name"] == (
        "decision_log")
    found = attributes(batch.attributes)
    assert found["guard.decision.id"] == reply.decision_id
    assert found["guard.decision.action"] == "abort"
    assert found["guard.decision.detectors"] == ["self-harm"]
    assert found["rpc.service"] == "guard.v1.Guard"
    assert "detectors" in found["guard.plugin.names"]
    (event,) = batch.events
    assert attributes(event.attributes)["guard.feature.ids"] == [1, 5, 7]
    resource = receiver.resources[0]
    assert resource["service.name"] == "guard-under-test"
    assert resource["deployment.environment.name"] == "test"
    assert resource["service.version"] == "0.1.0"

    # The same ids find the log lines: the guard's own and the decision log's record.
    events = log_events(guard)
    aborted = next(e for e in events if e["event"] == "batch aborted")
    assert aborted["trace_id"] == TRACE_ID
    assert aborted["decision_id"] == reply.decision_id
    record = next(e for e in events if e["event"] == "decision")
    assert record["decision_id"] == reply.decision_id


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


class Prometheus:
    """A Prometheus server on loopback scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.url = f"http://127.0.0.1:{_free_port()}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: guard\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir}/tsdb",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def query(self, expression: str) -> list[dict[str, Any]]:
        reply = _get(f"{self.url}/api/v1/query?"
                     + urllib.parse.urlencode({"query": expression}))
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def wait_value(self, expression: str, expected: float, timeout: float = 30) -> None:
        """Poll an instant query until its single sample equals ``expected``."""
        deadline = time.monotonic() + timeout
        last: Any = "no answer"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            try:
                result = self.query(expression)
            except OSError as exc:  # not listening yet
                last = exc
            else:
                last = result
                if result and float(result[0]["value"][1]) == expected:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{expression}: expected {expected}, last answer {last}\n"
                             f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.mark.skipif(PROMETHEUS is None, reason="the Prometheus server is not installed "
                    "(Debian package prometheus; `make tools` installs it with apt-get)")
def test_a_prometheus_server_scrapes_the_counters(
    otel_env: pytest.MonkeyPatch, start_guard: Any, tmp_path: Path
) -> None:
    guard = start_guard("telemetry:\n  metrics_listen: 127.0.0.1:0\n")
    (started,) = [e for e in log_events(guard) if e["event"] == "telemetry"]
    target = started["metrics_address"]
    replies = inspect(guard.address, ["req-1", "req-2", "req-3"])
    assert [r.action for r in replies] == [pb.ACTION_ABORT] * 3
    prometheus = Prometheus(tmp_path, target)
    try:
        prometheus.wait_value('up{job="guard"}', 1)
        prometheus.wait_value(f'sum(guard_batches_total{{guard_hook="{HOOK}"}})', 3)
        prometheus.wait_value('sum(guard_decisions_total{guard_decision_action="abort"})', 3)
        prometheus.wait_value('sum(guard_findings_total{guard_detector="self-harm"})', 3)
        (info,) = prometheus.query("guard_sae_info")
        assert info["metric"]["guard_sae_execution_provider"] == "CPUExecutionProvider"
        assert prometheus.query("guard_plugin_duration_seconds_count")
    finally:
        prometheus.stop()
