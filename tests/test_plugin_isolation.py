"""Plugin isolation under plugins that block or misbehave (issue 19, "Hold under attack").

Each test runs a real guard in-process (a :class:`GuardServer` on a Unix socket, the
first-party ``detectors`` and ``decision_log`` plugins from their entry points, JSON logs and
in-memory metrics as ``guard serve`` sets them up) with misbehaving plugins beside them, and
real :class:`GuardClient` hosts on their own streams:

- more simultaneous calls than there are plugin workers, all blocked in one plugin, do not
  turn detection off: another stream's batches are still decided by an always-abort
  detector (ABORT, not a fail-open CONTINUE), the stuck plugin is skipped and named in the
  replies and metrics, and the pool stays within its stated thread bound;
- a call that overran is never applied late: its request calls no further plugin, and what
  it returns is dropped;
- a plugin raising ``SystemExit`` or ``KeyboardInterrupt`` is a failed plugin: the batch gets
  its reply, the stream and the guard go on;
- a plugin's exception text (here quoting token ids) reaches no reply, log line or decision
  record unless ``telemetry.record_sensitive`` is on.

No assertion is on elapsed time: waits are on conditions, with generous deadlines.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from guard import FeatureBatch, Finding, hookimpl
from guard.config import ServerConfig, parse_config
from guard.engine.core import DaemonExecutor, Engine
from guard.engine.plugins import PluginSource
from guard.host import Action, GuardClient, Verdict
from guard.sidecar.server import GuardServer
from guard.telemetry.instruments import Instruments
from guard.telemetry.setup import configure_logging
from tests import fault_plugins
from tests.conftest import D_IN, HOOK
from tests.sidecar import poll

#: The plugin budget where calls hang: long, so that every hanging call is surely in the
#: plugin (the pool full) before the first budget runs out.
HANG_BUDGET_MS = 1000
WAIT_S = 60.0
ROWS = np.random.default_rng(19).normal(size=(4, D_IN)).astype(np.float32)
#: Token ids a careless plugin quotes in its exception message.
SECRET_TOKEN = 987654321


class Hanging:
    """A detector that blocks on ``hang-`` batches until ``release`` is set; when it returns,
    it finds an abort (a late result that must never be applied)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0
        self.returned = 0

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if not batch.request_id.startswith("hang-"):
            return []
        with self._lock:
            self.entered += 1
        self.release.wait(WAIT_S)
        with self._lock:
            self.returned += 1
        return [Finding("late", 1.0, 0.0, "abort")]


class Witness:
    """Registered after ``hanging``: notes (request id, hook, when) of each of its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        self.calls.append((batch.request_id, "guard_detect", time.monotonic()))
        return []

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[Any]:
        self.calls.append((batch.request_id, "guard_steer", time.monotonic()))
        return []


@dataclass
class Guard:
    """A running in-process guard and what it wrote."""

    server: GuardServer
    engine: Engine
    logs: io.StringIO
    reader: InMemoryMetricReader
    decision_log: Path
    clients: list[GuardClient] = field(default_factory=list)

    def client(self, deadline_ms: float = 20_000.0) -> GuardClient:
        """An INLINE host on its own stream; its policy is fail-open, so a verdict that the
        guard did not give shows (source ``fail_open``)."""
        made = GuardClient(self.server.addresses[0], hooks=[HOOK], failure_policy="open",
                           deadline_ms=deadline_ms, reconnect_backoff_ms=50.0,
                           reconnect_backoff_max_ms=200.0)
        self.clients.append(made)
        return made

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """The sum of ``name``'s data points whose attributes include ``labels``."""
        wanted = dict(labels or {})
        data = self.reader.get_metrics_data()
        total = 0.0
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        if wanted.items() <= dict(point.attributes or {}).items():
                            total += float(getattr(point, "value", 0.0))
        return total

    def stop(self) -> None:
        for made in self.clients:
            made.close()
        self.server.stop(0)  # the engine closes: every accepted record reaches the log

    def records(self) -> list[dict[str, Any]]:
        lines = self.decision_log.read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r.get("event") == "decision"]


@pytest.fixture
def start_guard(tmp_path: Path, sae_dir: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[Callable[..., Guard]]:
    monkeypatch.delenv("GUARD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    handlers, level = logging.root.handlers[:], logging.root.level
    started: list[Guard] = []
    releases: list[threading.Event] = []

    def start(extra: Sequence[tuple[str, Any]] = (), *, timeout_ms: float = HANG_BUDGET_MS,
              failure_mode: str = "open", action: str = "abort",
              record_sensitive: bool = False,
              plugin_config: Mapping[str, Any] | None = None) -> Guard:
        decision_log = tmp_path / f"decisions-{len(started)}.jsonl"
        server: dict[str, Any] = {"listen": f"unix://{tmp_path}/guard-{len(started)}.sock",
                                  "drain_grace_seconds": 1}
        if "max_streams_per_peer" in {f.name for f in fields(ServerConfig)}:
            server["max_streams_per_peer"] = 0  # every stream here comes from one peer
        config = parse_config(yaml.safe_dump({
            "server": server,
            "logging": {"level": "info", "format": "json"},
            "telemetry": {"tracing": False, "record_sensitive": record_sensitive},
            "saes": [{"path": str(sae_dir)}],
            "plugins": {
                "enabled": ["detectors", "decision_log"], "timeout_ms": timeout_ms,
                "failure_mode": failure_mode, "watch_interval_seconds": 0,
                "config": {
                    # Feature 1 is a ReLU: >= 0 > -1, so this detector fires on every batch.
                    "detectors": {"always": {"hook": HOOK, "features": [1], "threshold": -1.0,
                                             "action": action}},
                    "decision_log": {"path": str(decision_log)},
                    **(plugin_config or {}),
                },
            },
        }), env={})
        logs = io.StringIO()
        configure_logging(config.logging, stream=logs)
        reader = InMemoryMetricReader()
        instruments = Instruments(meter_provider=MeterProvider(metric_readers=[reader]),
                                  record_sensitive=record_sensitive)
        for _name, plugin in extra:
            if isinstance(plugin, Hanging):
                releases.append(plugin.release)
        server_ = GuardServer(config)
        server_.start()
        engine = Engine.load(config, instruments=instruments,
                             extra_plugins=[PluginSource(name, "1.0", plugin)
                                            for name, plugin in extra])
        server_.set_ready(engine)
        guard = Guard(server_, engine, logs, reader, decision_log)
        started.append(guard)
        return guard

    yield start
    for release in releases:  # never leave a plugin call blocked behind the test
        release.set()
    for guard in started:
        guard.stop()
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def ask(client: GuardClient, request_id: str, token_ids: Sequence[int] | None = None
        ) -> Verdict:
    return client.inspect(request_id, HOOK, ROWS, list(range(len(ROWS))), token_ids=token_ids)


def detectors(verdict: Verdict) -> dict[str, str]:
    return {f.detector: f.message for f in verdict.findings}


# -- a plugin that blocks -----------------------------------------------------------------


def test_calls_blocked_in_one_plugin_on_every_worker_do_not_turn_detection_off(
    start_guard: Callable[..., Guard],
) -> None:
    hanging, witness = Hanging(), Witness()
    guard = start_guard([("hanging", hanging), ("witness", witness)])
    workers = guard.engine.plugin_workers
    hosts = [guard.client() for _ in range(workers + 2)]  # more than the pool has workers
    other = guard.client()
    for index, host in enumerate([*hosts, other]):  # every stream open before the attack
        assert ask(host, f"warm-{index}").action is Action.ABORT

    # All at once: every worker's call hangs in the same plugin, and two more wait.
    barrier = threading.Barrier(len(hosts))
    hung: dict[str, Verdict] = {}

    def send(index: int, host: GuardClient) -> None:
        barrier.wait(WAIT_S)
        hung[f"hang-{index}"] = ask(host, f"hang-{index}")

    senders = [threading.Thread(target=send, args=(i, h), daemon=True)
               for i, h in enumerate(hosts)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(WAIT_S)
    assert len(hung) == len(hosts), "a host got no verdict"
    assert hanging.entered >= workers  # the pool was full of calls stuck in one plugin
    for request_id, verdict in hung.items():
        assert verdict.source == "guard", (request_id, verdict.reason)
        assert "plugin-error:unknown" not in detectors(verdict), request_id
        # Every verdict names the plugin that held its budget. Those that reached the
        # hanging plugin name it; on a starved machine a request queued behind the stuck
        # workers may spend its budget in another plugin, which is then the one named.
        assert any(name.startswith("plugin-error:") for name in detectors(verdict)), (
            request_id, detectors(verdict))
    named = sum("plugin-error:hanging" in detectors(v) for v in hung.values())
    assert named >= workers, {r: detectors(v) for r, v in hung.items()}

    # Meanwhile another stream's batches are decided by the healthy detector: ABORT, with
    # the stuck plugin skipped and named (not a fail-open CONTINUE behind a full pool).
    for index in range(5):
        verdict = ask(other, f"ok-{index}")
        assert verdict.source == "guard", verdict.reason
        found = detectors(verdict)
        assert verdict.action is Action.ABORT, found
        assert set(found) == {"always", "plugin-error:hanging"}
        assert "skipped: still running a call that overran its budget" in (
            found["plugin-error:hanging"])

    # Counted and reported by plugin name; the pool within its bound.
    stuck = hanging.entered - hanging.returned
    assert guard.engine.plugin_calls_stuck() == {"hanging": stuck}
    hanging_label = {"guard.plugin.name": "hanging"}
    assert guard.metric("guard.plugin.timeouts", hanging_label) == hanging.entered
    assert guard.metric("guard.plugin.timeouts", {"guard.plugin.name": "unknown"}) == 0
    assert guard.metric("guard.plugin.skipped", {**hanging_label,
                                                 "guard.plugin.skip_reason": "stuck"}) >= 5
    assert guard.metric("guard.plugin.stuck_calls", hanging_label) == stuck
    assert guard.engine.plugin_threads <= guard.engine.plugin_threads_max == 2 * workers
    assert "plugin skipped while stuck" in guard.logs.getvalue()

    # Released: the stuck calls return, their results are dropped, the plugin runs again.
    released_at = time.monotonic()
    hanging.release.set()
    poll(lambda: hanging.returned == hanging.entered and not guard.engine.plugin_calls_stuck()
         and guard.engine.plugin_threads <= workers, WAIT_S,
         "the stuck calls to return and their threads to end")

    def back() -> bool:
        verdict = ask(other, "ok-after")
        return verdict.source == "guard" and set(detectors(verdict)) == {"always"}

    poll(back, WAIT_S, "the plugin to run again")
    # Nothing ran late for a request that was already answered.
    late = [(r, hook) for r, hook, at in witness.calls
            if r.startswith("hang-") and at > released_at]
    assert late == []
    guard.stop()
    records = guard.records()
    assert all("late" not in [f["detector"] for f in r["findings"]] for r in records)
    by_id = {r["decision_id"]: r for r in records}
    assert all(v.decision_id in by_id for v in hung.values())  # each answered request logged
    assert len(by_id) == len(records)  # once


def test_a_call_that_overran_calls_no_further_plugin_and_is_dropped(
    start_guard: Callable[..., Guard],
) -> None:
    hanging, witness = Hanging(), Witness()
    guard = start_guard([("hanging", hanging), ("witness", witness)], timeout_ms=300,
                        action="flag")
    client = guard.client()
    verdict = ask(client, "hang-1")
    assert verdict.source == "guard" and verdict.action is Action.CONTINUE
    found = detectors(verdict)
    assert set(found) == {"always", "plugin-error:hanging"}
    assert found["plugin-error:hanging"] == "guard_detect: overran the plugin budget of 300 ms"
    hanging.release.set()
    poll(lambda: hanging.returned == 1 and not guard.engine.plugin_calls_stuck()
         and guard.engine.plugin_threads <= guard.engine.plugin_workers, WAIT_S,
         "the hung call to return and its worker to end")
    # Its result (an abort) was dropped, and the plugins after it never saw the request.
    assert [r for r, _hook, _at in witness.calls if r == "hang-1"] == []
    assert ask(client, "ok-1").action is Action.CONTINUE
    guard.stop()
    (record,) = [r for r in guard.records() if r["request_id"] == "hang-1"]
    assert record["decision_id"] == verdict.decision_id
    assert [f["detector"] for f in record["findings"]] == ["always", "plugin-error:hanging"]


# -- BaseException ------------------------------------------------------------------------


@pytest.mark.parametrize("exception", ["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("timeout_ms", [HANG_BUDGET_MS, 0])
def test_a_plugin_raising_a_base_exception_is_a_failed_plugin(
    start_guard: Callable[..., Guard], exception: str, timeout_ms: float,
) -> None:
    """On a plugin worker (a budget) or on the stream's own thread (``timeout_ms: 0``)."""
    guard = start_guard([("exiting", fault_plugins.Exiting)], timeout_ms=timeout_ms,
                        action="flag", plugin_config={"exiting": {"exception": exception}})
    client = guard.client(deadline_ms=10_000.0)
    verdict = ask(client, "exit-1")
    assert verdict.source == "guard", verdict.reason  # answered, not left to the deadline
    found = detectors(verdict)
    assert set(found) == {"always", "plugin-error:exiting"}
    assert found["plugin-error:exiting"].startswith(f"guard_detect: {exception}")
    # The stream, another stream and the guard go on.
    assert ask(client, "ok-1").source == "guard"
    again = ask(guard.client(deadline_ms=10_000.0), "exit-2")
    assert again.source == "guard" and "plugin-error:exiting" in detectors(again)
    assert guard.engine.counters["plugin_failures"] == 2
    guard.stop()
    assert {r["request_id"]: r["plugin_errors"] for r in guard.records()} == {
        "exit-1": ["exiting"], "ok-1": [], "exit-2": ["exiting"]}


# -- exception text -----------------------------------------------------------------------


@pytest.mark.parametrize(("record_sensitive", "failure_mode"),
                         [(False, "open"), (False, "closed"), (True, "open")])
def test_a_plugins_exception_text_goes_out_only_with_record_sensitive(
    start_guard: Callable[..., Guard], record_sensitive: bool, failure_mode: str,
) -> None:
    guard = start_guard([("crashing", fault_plugins.Crashing)], action="flag",
                        failure_mode=failure_mode, record_sensitive=record_sensitive)
    verdict = ask(guard.client(), "crash-1", token_ids=[SECRET_TOKEN, 1, 2, 3])
    assert verdict.source == "guard", verdict.reason
    reply = verdict.details if failure_mode == "closed" else (
        detectors(verdict)["plugin-error:crashing"])
    guard.stop()
    logs = guard.logs.getvalue()
    records = guard.decision_log.read_text(encoding="utf-8")
    failed = [json.loads(line) for line in logs.splitlines()
              if '"plugin failed"' in line and '"guard_detect"' in line]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError"
    for name, text in {"reply": reply, "log": logs, "decision log": records}.items():
        assert "RuntimeError" in text, name  # the failure is always reported, by type
        assert (str(SECRET_TOKEN) in text) is record_sensitive, name
    if not record_sensitive:
        # Where it was raised still goes out: the frames, not the message.
        assert "fault_plugins.py" in failed[0]["traceback"]
        assert "message withheld" in reply


# -- the pool's bound ---------------------------------------------------------------------


def test_the_plugin_pool_replaces_stuck_workers_within_its_thread_bound() -> None:
    pool = DaemonExecutor("test-pool", max_workers=2, max_detached=1)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def stuck() -> str:
        entered.release()
        release.wait(WAIT_S)
        return "late"

    try:
        first, second = pool.submit(stuck), pool.submit(stuck)
        for _ in range(2):
            assert entered.acquire(timeout=WAIT_S)
        queued = pool.submit(lambda: "done")  # both workers are stuck: it waits
        assert pool.detach(first)  # replaced: the queued call runs on the new worker
        assert queued.result(WAIT_S) == "done"
        assert not pool.detach(second)  # max_detached reached: it keeps its place
        assert not pool.detach(queued)  # not running
        assert pool.threads == 3 == pool.max_workers + pool.max_detached
        third = pool.submit(stuck)  # the one free worker takes it
        assert entered.acquire(timeout=WAIT_S)
        waiting = pool.submit(lambda: "after")
        assert not waiting.done()  # never a thread past the bound
        assert pool.threads == 3
        release.set()
        assert [f.result(WAIT_S) for f in (first, second, third, waiting)] == [
            "late", "late", "late", "after"]
        poll(lambda: pool.threads == 2, WAIT_S, "the detached worker to end")
    finally:
        release.set()
        pool.shutdown()
