"""Records: one bounded queue and one thread per sink (issue 19, "Hold under attack").

A slow or hung sink next to the decision log used to hold the one shared record thread: the
decision log's records waited behind it, were dropped once the shared queue filled, and the
drain gave up on all of them together. These tests run the real engine with the real
decision log beside sinks that block, crawl or hit a full disk."""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

from guard import Decision, FeatureRequest, hookimpl
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import ActivationRows, Phase
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.telemetry.instruments import Instruments
from guard_plugins.decision_log import DecisionLog
from tests.conftest import D_IN, HOOK
from tests.sidecar import poll

#: Generous bound for "eventually" (a loaded 2-core machine), never a timing assertion.
WAIT_S = 30.0


class Subscriber:
    """Subscribes to one feature, so that every batch is encoded and recorded."""

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, (3,))]


class BlockedSink:
    """A sink whose every record waits for ``gate`` (a slow or hung disk, a dead collector)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.records: list[str] = []

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        self.entered.set()
        self.gate.wait(WAIT_S * 2)
        self.records.append(decision.decision_id)


class FullDisk:
    """A sink whose writes fail with ENOSPC until ``free`` is set, then succeed; a
    ``BaseException`` on the record named ``exit_on`` (a plugin calling sys.exit)."""

    def __init__(self) -> None:
        self.free = threading.Event()
        self.exit_on = ""
        self.records: list[str] = []

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        if decision.decision_id == self.exit_on:
            raise SystemExit(3)
        if not self.free.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records.append(decision.decision_id)


def _rows(seed: int) -> ActivationRows:
    rows = np.random.default_rng(seed).normal(size=(2, D_IN)).astype(np.float32)
    return ActivationRows(f"req-{seed}", seed, HOOK, rows, np.arange(2, dtype=np.int64), None,
                          Phase.GENERATION)


def logged_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [line["decision_id"] for line in lines if line.get("event") == "decision"]


@pytest.fixture
def metrics() -> Iterator[tuple[Instruments, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Instruments(None, provider), reader
    provider.shutdown()


def per_sink(reader: InMemoryMetricReader, name: str) -> dict[str, float]:
    """The value of metric ``name`` by sink (``guard.plugin.name``)."""
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        sink = str(dict(point.attributes or {})["guard.plugin.name"])
                        found[sink] = float(getattr(point, "value", 0))
    return found


@pytest.fixture
def start_engine(sae_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """An engine with the real decision log (writing ``tmp_path/decisions.jsonl``), a
    subscriber, and the given sinks; closed after the test."""
    made: list[Engine] = []

    def start(*sinks: tuple[str, object], queue_size: int = 10_000,
              instruments: Instruments | None = None) -> Engine:
        config = GuardConfig(
            server=ServerConfig(listen=f"unix://{tmp_path}/unused.sock"),
            logging=LoggingConfig(level="warning"),
            saes=(SaeConfig(path=sae_dir),),
            plugins=PluginsConfig(
                autoload=False, record_queue_size=queue_size,
                config={"decision_log": {"path": str(tmp_path / "decisions.jsonl")}}),
        )
        sources = [PluginSource("decision_log", "1.0", DecisionLog),
                   PluginSource("subscriber", "1.0", Subscriber())]
        sources += [PluginSource(name, "1.0", sink) for name, sink in sinks]
        engine = Engine.load(config, extra_plugins=sources, instruments=instruments)
        made.append(engine)
        return engine

    yield start
    for engine in made:
        engine.close(timeout=5)


def test_a_blocked_sink_neither_delays_nor_drops_the_decision_logs_records(
    start_engine: Callable[..., Engine], tmp_path: Path,
    metrics: tuple[Instruments, InMemoryMetricReader],
) -> None:
    instruments, reader = metrics
    slow = BlockedSink()
    queue_size, batches = 4, 30
    engine = start_engine(("slow", slow), queue_size=queue_size, instruments=instruments)
    log_path = tmp_path / "decisions.jsonl"
    ids = [engine.inspect(_rows(0), {}).decision_id]
    assert slow.entered.wait(WAIT_S)  # the slow sink's thread now holds the first record
    try:
        for i in range(1, batches):
            ids.append(engine.inspect(_rows(i), {}).decision_id)
            # Each record reaches the decision log while "slow" is stuck (before the fix it
            # waited behind "slow" on the one record thread, and was then dropped).
            poll(lambda: logged_ids(log_path) == ids, WAIT_S, f"the decision log's record {i}")
        sinks = engine.records.sinks
        assert sinks["decision_log"].dropped == 0
        # "slow": one record in its call, queue_size waiting, the rest dropped for it alone.
        assert sinks["slow"].dropped == batches - 1 - queue_size
        assert sinks["slow"].depth == queue_size
        assert per_sink(reader, "guard.records.dropped") == {
            "decision_log": 0, "slow": batches - 1 - queue_size}
        assert per_sink(reader, "guard.records.delivered")["decision_log"] == batches
        assert per_sink(reader, "guard.records.queue_depth")["slow"] == queue_size
    finally:
        slow.gate.set()
    engine.close(timeout=WAIT_S)
    assert slow.records == ids[:1 + queue_size]  # what its queue accepted, in order
    assert logged_ids(log_path) == ids  # nothing written twice


def test_each_sink_drains_with_its_own_deadline(
    start_engine: Callable[..., Engine], tmp_path: Path,
) -> None:
    """At close, every queue drains at once and is given the same deadline: a hung sink does
    not use up the decision log's, and each sink's outcome is logged on its own."""
    hung, paced = BlockedSink(), BlockedSink()
    engine = start_engine(("hung", hung), ("paced", paced))
    ids = [engine.inspect(_rows(i), {}).decision_id for i in range(8)]
    assert hung.entered.wait(WAIT_S) and paced.entered.wait(WAIT_S)
    deadline_s = 5.0
    with capture_logs() as logs:
        closer = threading.Thread(target=engine.close, args=(deadline_s,))
        closer.start()
        paced.gate.set()  # "paced" may go on only once the drain has begun
        closer.join(WAIT_S)
        assert not closer.is_alive()
    hung.gate.set()
    assert paced.records == ids  # drained while "hung" never returned
    assert logged_ids(tmp_path / "decisions.jsonl") == ids
    drained = {e["sink"]: e for e in logs if e["event"] == "records drained"}
    assert drained["decision_log"] == {
        "event": "records drained", "log_level": "info", "sink": "decision_log",
        "written": 8, "dropped": 0, "failed": 0, "left": 0, "deadline_s": deadline_s}
    assert (drained["paced"]["written"], drained["paced"]["left"]) == (8, 0)
    (late,) = [e for e in logs if e["event"] == "record queue did not drain in time"]
    assert late["sink"] == "hung" and late["timeout_s"] == deadline_s
    assert late["pending"] == 7 and late["written"] == 0  # one in its call, seven waiting


def test_a_full_disk_loses_records_reported_per_sink_and_the_thread_goes_on(
    start_engine: Callable[..., Engine], tmp_path: Path,
    metrics: tuple[Instruments, InMemoryMetricReader],
) -> None:
    instruments, reader = metrics
    disk = FullDisk()
    engine = start_engine(("archive", disk), instruments=instruments)
    lost = [engine.inspect(_rows(i), {}).decision_id for i in range(3)]
    sinks = engine.records.sinks
    poll(lambda: sinks["archive"].failed == 3, WAIT_S, "the failed writes to be counted")
    disk.free.set()  # space again: the same thread writes the next records
    kept = [engine.inspect(_rows(i), {}).decision_id for i in range(3, 6)]
    poll(lambda: disk.records == kept, WAIT_S, "the records after the disk was freed")
    # A sink raising SystemExit loses that record only; its thread survives it.
    disk.exit_on = engine.inspect(_rows(6), {}).decision_id
    after = engine.inspect(_rows(7), {}).decision_id
    poll(lambda: disk.records == [*kept, after], WAIT_S, "the record after a SystemExit")
    assert sinks["archive"].alive
    assert (sinks["archive"].failed, sinks["archive"].delivered) == (4, 4)
    assert per_sink(reader, "guard.records.failed") == {"archive": 4, "decision_log": 0}
    # The decision log beside it lost nothing.
    poll(lambda: len(logged_ids(tmp_path / "decisions.jsonl")) == 8, WAIT_S, "the decision log")
    assert set(lost) <= set(logged_ids(tmp_path / "decisions.jsonl"))
    with capture_logs() as logs:
        engine.close(timeout=WAIT_S)
    drained = {e["sink"]: e for e in logs if e["event"] == "records drained"}
    assert (drained["archive"]["failed"], drained["archive"]["written"]) == (4, 4)


def test_a_sink_removed_by_a_reload_keeps_its_count_and_the_others_go_on(
    start_engine: Callable[..., Engine], tmp_path: Path, sae_dir: Path,
) -> None:
    """Records waiting for a sink that a reload removes are dropped for it (counted); the
    decision log, still configured, gets every record across the reload."""
    slow = BlockedSink()
    engine = start_engine(("slow", slow))
    before = [engine.inspect(_rows(i), {}).decision_id for i in range(4)]
    assert slow.entered.wait(WAIT_S)
    reload_config = GuardConfig(
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(
            autoload=False, disabled=("slow",),
            config={"decision_log": {"path": str(tmp_path / "decisions.jsonl")}}))
    reloader = threading.Thread(target=engine.reload, args=(reload_config,))
    reloader.start()  # waits for "slow" to leave its call on the old plugins
    slow.gate.set()
    reloader.join(WAIT_S)
    assert not reloader.is_alive()
    after = [engine.inspect(_rows(i), {}).decision_id for i in range(4, 6)]
    sinks = engine.records.sinks
    slow_queue = sinks["slow"]
    poll(lambda: slow_queue.delivered + slow_queue.dropped == 4, WAIT_S,
         "the removed sink's queue to empty (written or dropped, each counted)")
    assert slow_queue.depth == 0 and slow_queue.failed == 0
    poll(lambda: logged_ids(tmp_path / "decisions.jsonl") == before + after, WAIT_S,
         "the decision log across the reload")


class Forgetter:
    """Not a sink: implements only ``guard_request_ended`` (a detector freeing a window)."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    @hookimpl
    def guard_request_ended(self, request_id: str) -> None:
        self.ended.append(request_id)


def test_request_ends_reach_each_plugin_after_its_own_records(
    start_engine: Callable[..., Engine], tmp_path: Path,
) -> None:
    """A request's end reaches each sink on that sink's thread, after the decisions its
    queue accepted, and the plugins that are no sinks on their shared thread, even while
    another sink is stuck."""
    slow, forgetter = BlockedSink(), Forgetter()
    engine = start_engine(("slow", slow), ("forgetter", forgetter))
    decision = engine.inspect(_rows(0), {})
    assert slow.entered.wait(WAIT_S)
    assert engine.end_requests([decision.request_id], "finished")
    log_path = tmp_path / "decisions.jsonl"

    def events() -> list[str]:
        if not log_path.exists():
            return []
        return [json.loads(line)["event"]
                for line in log_path.read_text(encoding="utf-8").splitlines()]

    try:
        poll(lambda: events() == ["decision", "request ended"], WAIT_S,
             "the decision log's end line")
        poll(lambda: forgetter.ended == [decision.request_id], WAIT_S, "the plugin's end")
        assert "forgetter" not in engine.records.sinks  # no queue of its own: not a sink
    finally:
        slow.gate.set()


def test_record_threads_start_with_the_engine_not_on_the_hot_path(
    start_engine: Callable[..., Engine],
) -> None:
    before = set(threading.enumerate())
    engine = start_engine(("slow", BlockedSink()))
    started = set(threading.enumerate()) - before
    assert {"guard-records-decision_log", "guard-records-slow"} <= {t.name for t in started}
    running = set(threading.enumerate())
    for i in range(5):
        engine.inspect(_rows(i), {})
    assert not {t for t in threading.enumerate()
                if t.name.startswith("guard-records")} - running
