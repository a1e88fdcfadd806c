"""Never alive and deaf (issue 21): the watchdog, the gRPC pool started at start-up, and the
guard under a pids limit pushed to it from outside by three routes.

A guard may keep answering, or exit non-zero with one log line saying which part died (so
Kubernetes restarts it); it may never stay alive with its health saying SERVING while Inspect
goes unanswered. That is what grpcio's serving loop did when a pods's pids limit stopped it
starting a thread: it died for good, in every run.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from guard.sidecar.process import GuardProcess, ServeFailed
from guard.sidecar.watchdog import HealthProbe, Watchdog, thread_start_failed
from guard.v1 import guard_pb2 as pb
from tests import pids_limit
from tests.conftest import HOOK, StreamClient, make_batch
from tests.sidecar import REPO_ROOT, Sidecar, install_fault_plugins

SERVING = health_pb2.HealthCheckResponse.SERVING
#: How long a guard whose part died may take to exit (the watchdog checks once a second;
#: the records' flush comes first).
EXIT_WITHIN_S = 15.0


class Failures:
    """What a watchdog reported, for the unit tests."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.event = threading.Event()

    def __call__(self, part: str, reason: str) -> None:
        self.seen.append((part, reason))
        self.event.set()


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def watchdog(failures: Failures) -> Iterator[Callable[..., Watchdog]]:
    made: list[Watchdog] = []

    def make(**options: Any) -> Watchdog:
        dog = Watchdog(failures, interval=0.05, **options)
        made.append(dog)
        return dog

    yield make
    for dog in made:
        dog.stop()


# -- the watchdog on its own ------------------------------------------------------------------

def test_a_failing_check_is_reported_once(watchdog: Callable[..., Watchdog],
                                          failures: Failures) -> None:
    dog = watchdog()
    dead = threading.Event()
    dog.watch("acceptor", lambda: "it ended" if dead.is_set() else None)
    dog.watch("other", lambda: "it ended too" if dead.is_set() else None)
    dog.start()
    time.sleep(0.2)
    assert failures.seen == []
    dead.set()
    assert failures.event.wait(10)
    time.sleep(0.3)
    assert len(failures.seen) == 1 and failures.seen[0][1].endswith("ended")
    assert dog.failed == failures.seen[0]


def test_a_watched_thread_killed_by_an_exception_names_it(watchdog: Callable[..., Watchdog],
                                                          failures: Failures) -> None:
    dog = watchdog()
    go = threading.Event()

    def loop() -> None:
        go.wait()
        raise RuntimeError("can't start new thread")

    thread = threading.Thread(target=loop, daemon=True)
    dog.watch_thread("grpc server", thread)
    dog.start()
    thread.start()
    go.set()
    assert failures.event.wait(10)
    part, reason = failures.seen[0]
    assert part == "grpc server" and "can't start new thread" in reason


def test_a_thread_start_that_failed_anywhere_is_a_death(watchdog: Callable[..., Watchdog],
                                                       failures: Failures) -> None:
    dog = watchdog()
    dog.start()

    def worker() -> None:
        raise RuntimeError("can't start new thread")

    thread = threading.Thread(target=worker, name="some-pool_3", daemon=True)
    thread.start()
    assert failures.event.wait(10)
    assert failures.seen[0][0] == "thread some-pool_3"
    assert thread_start_failed(RuntimeError("can't start new thread"))
    assert not thread_start_failed(ValueError("can't start new thread"))


def test_other_exceptions_in_other_threads_are_not_a_death(
        watchdog: Callable[..., Watchdog], failures: Failures,
        monkeypatch: pytest.MonkeyPatch) -> None:
    passed_on: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: passed_on.append(type(args.exc_value).__name__))
    dog = watchdog()
    dog.start()
    thread = threading.Thread(target=lambda: 1 / 0, daemon=True)
    thread.start()
    thread.join()
    time.sleep(0.2)
    assert failures.seen == [] and passed_on == ["ZeroDivisionError"]
    dog.stop()
    assert threading.excepthook is not dog._excepthook  # the previous hook is back


def test_an_unanswered_probe_is_a_death_after_the_liveness_timeout(
        watchdog: Callable[..., Watchdog], failures: Failures) -> None:
    answers = [True]
    dog = watchdog(probe=lambda: answers[-1], liveness_timeout=0.3)
    dog.start()
    time.sleep(0.6)
    assert failures.seen == []  # it answered
    answers.append(False)
    assert failures.event.wait(10)
    assert failures.seen[0][0] == "grpc server"
    assert "server.liveness_timeout_seconds" in failures.seen[0][1]


def test_a_stopped_watchdog_reports_nothing(watchdog: Callable[..., Watchdog],
                                            failures: Failures) -> None:
    dog = watchdog()
    dead = threading.Event()
    dog.watch("acceptor", lambda: "it ended" if dead.is_set() else None)
    dog.start()
    dog.stop()  # a drain: parts end on purpose
    dead.set()
    time.sleep(0.3)
    assert failures.seen == []


def test_the_health_probe_asks_over_the_socket(tmp_path: Path, sae_dir: Path) -> None:
    from guard.engine.core import Engine
    from guard.sidecar.server import GuardServer
    from tests.conftest import make_config

    config = make_config(tmp_path, sae_dir, drain_grace_seconds=0, max_concurrent_rpcs=2)
    server = GuardServer(config)
    address = server.start()[0]
    probe = HealthProbe(address, timeout=2.0)
    try:
        assert probe()  # NOT_SERVING is an answer
        server.set_ready(Engine.load(config))
        assert probe()
        # Every worker thread is started with the server: none is started per call.
        assert {t.name for t in threading.enumerate()} >= {"guard-rpc_0", "guard-rpc_1"}
        server.stop(0)
        assert not probe()
    finally:
        probe.close()
        server.stop(0)


# -- a real guard serve -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_fault_plugins(tmp_path_factory.mktemp("fault-plugins"))


def guard_config(sae_dir: Path, workdir: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"health_listen": "127.0.0.1:0", "drain_grace_seconds": 5,
                   "liveness_timeout_seconds": 5, **server},
        "logging": {"level": "info"},
        "saes": [{"path": str(sae_dir)}],
        "plugins": {"enabled": ["detectors", "decision_log", "hanging"],
                    "watch_interval_seconds": 0, "timeout_ms": 200,
                    "config": {
                        "detectors": {"always": {"hook": HOOK, "features": [1],
                                                 "threshold": -1e9, "action": "flag"}},
                        "decision_log": {"path": str(workdir / "decisions.jsonl")},
                        "hanging": {"release": str(workdir / "release")}}},
        "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False},
    }


def health_address(guard: Sidecar) -> str:
    return str(guard.wait_event("listening")["health"])


def answers(guard: GuardProcess, request_id: str = "probe") -> bool:
    """Whether a fresh Inspect stream gets a reply to one batch within 10 s."""
    got: list[pb.InspectResponse] = []

    def ask() -> None:
        with grpc.insecure_channel(guard.address) as channel:
            client = StreamClient(channel)
            client.configure()
            with contextlib.suppress(grpc.RpcError):
                got.append(client.ask(make_batch(request_id=request_id)))
            client.close()

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(10)
    return bool(got)


def assert_never_deaf(guard: Sidecar, health: str, watch_s: float = 12.0) -> str:
    """Watch the guard for ``watch_s`` seconds: it must go on answering Inspect and health,
    or exit non-zero within EXIT_WITHIN_S with the watchdog's log line. Which it did."""
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        if not guard.running:
            code = guard.wait(1)
            died = guard.events("a part of the guard died; exiting so that it is restarted")
            assert code != 0 and died, (code, guard.log_tail())
            return f"exited {code}: {died[0]['part']}: {died[0]['reason']}"
        if not answers(guard):
            # Unanswered: allowed only on the way out.
            try:
                code = guard.wait(EXIT_WITHIN_S)
            except ServeFailed:
                status = guard.health(health, timeout=2)
                pytest.fail(f"alive and deaf: Inspect unanswered, health {status}, still "
                            f"running {EXIT_WITHIN_S:g} s later:\n{guard.log_tail()}")
            assert code != 0, guard.log_tail()
            assert guard.events("a part of the guard died; exiting so that it is restarted")
            return f"exited {code}"
        assert guard.health(health, timeout=5) is not None, "health did not answer"
        time.sleep(0.5)
    return "kept answering"


def test_a_dead_grpc_loop_ends_the_process_after_flushing_its_records(
        tmp_path: Path, sae_dir: Path, plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trigger = tmp_path / "refuse"
    monkeypatch.setenv("GUARD_TEST_POOL_FAULT", str(trigger))  # the child's environment
    guard = Sidecar(tmp_path, guard_config(sae_dir, tmp_path), plugin_site=plugin_site)
    guard.program = (sys.executable, str(REPO_ROOT / "tests" / "serve_with_pool_fault.py"))
    guard.start()
    try:
        health = health_address(guard)
        for number in range(3):
            assert answers(guard, f"before-{number}")
        trigger.touch()
        assert not answers(guard, "after")  # the call that kills gRPC's loop
        code = guard.wait(EXIT_WITHIN_S)
        assert code == 70, guard.log_tail()
        (died,) = guard.events("a part of the guard died; exiting so that it is restarted")
        assert died["part"] == "grpc server", died
        assert "can't start new thread" in died["reason"] and died["level"] == "critical"
        # Every decision accepted before the death reached the decision log.
        ids = {d["request_id"] for d in guard.decisions()}
        assert {"before-0", "before-1", "before-2"} <= ids, ids
        assert not guard.socket.exists()
        assert guard.health(health, timeout=1) is None
    finally:
        guard.stop()


@pytest.fixture
def pids() -> Iterator[pids_limit.PidsCgroup]:
    why = pids_limit.available()
    if why is not None:
        pytest.fail(f"these tests run the guard in a pids cgroup, as a pod's limit would: {why}")
    with pids_limit.PidsCgroup() as cgroup:
        yield cgroup


def limited_guard(tmp_path: Path, sae_dir: Path, plugin_site: Path,
                  cgroup: pids_limit.PidsCgroup, **server: Any) -> Sidecar:
    guard = Sidecar(tmp_path, guard_config(sae_dir, tmp_path, **server),
                    plugin_site=plugin_site)
    guard.preexec_fn = cgroup.join
    return guard


def test_too_few_tasks_for_the_thread_budget_is_a_start_up_error(
        tmp_path: Path, sae_dir: Path, plugin_site: Path,
        pids: pids_limit.PidsCgroup) -> None:
    pids.limit(24)  # the interpreter, ONNX Runtime and grpcio's own, but not 200 workers
    guard = limited_guard(tmp_path, sae_dir, plugin_site, pids, max_concurrent_rpcs=200)
    with pytest.raises(ServeFailed, match="exited with 1"):
        guard.start(60)
    log = guard.log_text()
    assert "cannot start a thread for server.max_concurrent_rpcs" in log, log[-3000:]
    assert "Traceback" not in log


def _hanging_plugin_calls(guard: Sidecar, streams: int) -> list[StreamClient]:
    """``streams`` streams, each with a batch stuck in the hanging plugin."""
    channel = grpc.insecure_channel(guard.address)
    clients = []
    for number in range(streams):
        client = StreamClient(channel)
        client.configure()
        client.send(pb.InspectRequest(batch=make_batch(request_id=f"hang-{number}")))
        clients.append(client)
    return clients


def _half_sent_metrics_requests(guard: Sidecar, count: int) -> list[socket.socket]:
    host, port = guard.metrics_address().rsplit(":", 1)
    held = []
    for _ in range(count):
        conn = socket.create_connection((host, int(port)), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: guard\r\n")  # never the blank line
        held.append(conn)
    return held


def _doorbell_connections(guard: Sidecar, count: int) -> list[socket.socket]:
    path = str(guard.socket) + ".doorbell"
    held = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError:
            conn.close()
            continue  # a full backlog: the attack goes on
        held.append(conn)
    return held


@pytest.mark.parametrize("route", ["blocking plugin calls", "half-sent /metrics requests",
                                   "refused doorbell connections"])
def test_pushed_to_its_thread_limit_the_guard_is_never_alive_and_deaf(
        route: str, tmp_path: Path, sae_dir: Path, plugin_site: Path,
        pids: pids_limit.PidsCgroup) -> None:
    server: dict[str, Any] = {"max_concurrent_rpcs": 16}
    if route == "refused doorbell connections":
        server = {"max_concurrent_rpcs": 4, "shared_memory": {"enabled": True}}
    guard = limited_guard(tmp_path, sae_dir, plugin_site, pids, **server)
    guard.start()
    held: list[Any] = []
    try:
        health = health_address(guard)
        assert answers(guard)
        # The limit: what the guard runs now, plus a little (a pod sized on a quiet guard).
        pids.limit(pids.current + 8)
        if route == "blocking plugin calls":
            held = _hanging_plugin_calls(guard, 12)
        elif route == "half-sent /metrics requests":
            held = _half_sent_metrics_requests(guard, 400)
        else:
            held = _doorbell_connections(guard, 4 + 200)
        time.sleep(1.0)
        outcome = assert_never_deaf(guard, health)
        print(f"{route}: {outcome}; task starts refused by the limit: {pids.refused()}")
    finally:
        (tmp_path / "release").touch()
        for item in held:
            item.close()
        guard.stop()


def test_the_guard_stays_within_the_thread_budget_it_logs(
        tmp_path: Path, sae_dir: Path, plugin_site: Path,
        pids: pids_limit.PidsCgroup) -> None:
    """The ``thread budget`` log line is an upper bound: hanging plugin calls, doorbell streams
    and traffic never take the guard past it (docs/operations.md tells operators to size
    their pids limit from it)."""
    guard = limited_guard(tmp_path, sae_dir, plugin_site, pids, max_concurrent_rpcs=8,
                          shared_memory={"enabled": True})
    guard.start()
    held: list[Any] = []
    try:
        budget = guard.wait_event("thread budget")
        assert budget["tasks_now"] >= 8 + 4  # every gRPC worker is there from the start
        assert budget["doorbell_streams"] == 8 and budget["plugin_threads"] > 0
        held = _hanging_plugin_calls(guard, 6) + _doorbell_connections(guard, 8)
        for number in range(8):
            assert answers(guard, f"req-{number}")
        time.sleep(1.0)
        peak = pids.peak()
        assert budget["tasks_now"] <= peak <= budget["most"], (budget, peak)
    finally:
        (tmp_path / "release").touch()
        for item in held:
            item.close()
        guard.stop()
