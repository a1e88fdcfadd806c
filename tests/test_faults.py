"""Fault injection against a real ``guard serve`` process, with real GuardClient hosts.

Every test starts the sidecar as a subprocess with its own config: a SAELens fixture SAE, the
first-party detector (``always``: flags every batch, so that a decision visibly carries the
healthy plugins' findings) and decision log (a temp file), plus the misbehaving plugins of
:mod:`tests.fault_plugins` where the fault needs one, loaded through their entry points as a
user's plugin is. Each test asserts the product's behaviour under one fault:

- SIGKILL mid-stream: INLINE verdicts follow each host's failure policy (cause
  ``unavailable``, never a wait for the deadline), counted; the hosts reconnect by themselves
  when a new sidecar comes up on the same socket;
- a hanging plugin: the batch is answered after the plugin budget per ``plugins.failure_mode``,
  the overrun is counted (``guard_plugin_timeouts_total``), later batches on every stream
  skip the stuck plugin and are answered, until its call returns;
- a crashing plugin (detector and sink): isolated, counted (``guard_plugin_errors_total``),
  the other plugins' findings and records kept;
- SIGTERM with streams in flight: NOT_SERVING at once, the open streams still answered, exit
  code 0, every decision a host received in the decision log exactly once;
- a full record queue (a sink that blocks): new records dropped and counted
  (``guard_records_dropped_total``), the hot path never waits, the accepted records reach the
  sinks;
- an oversized batch: a per-batch RESOURCE_EXHAUSTED naming ``server.max_message_bytes``, the
  stream and the other streams go on; beyond the transport limit the stream ends, the host
  reconnects;
- a config reload with a broken file: rejected with a log line naming the line or key, the
  old configuration keeps serving, a later good file is applied.

No assertion is on elapsed time: waits are on conditions, with generous timeouts.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2
from structlog.testing import capture_logs

from guard.decision import Decision
from guard.engine.record_queue import RecordQueue
from guard.host import Action, GuardClient, Verdict
from guard.testing import make_decision
from tests import fault_plugins
from tests.conftest import D_IN, HOOK
from tests.sidecar import Sidecar, exactly_once, install_fault_plugins, poll

pytestmark = pytest.mark.slow  # real processes; the whole file runs in well under a minute

#: INLINE deadline: long, so that a verdict decided by the policy shows a detected fault
#: (cause ``unavailable`` or ``error``), never a wait that ran out.
DEADLINE_MS = 10_000.0
#: Plugin budget of the hanging-plugin test (the batch waits this long for the hung plugin).
BUDGET_MS = 200
WAIT_S = 30.0
ROWS = np.random.default_rng(7).normal(size=(4, D_IN)).astype(np.float32)

Policy = Literal["open", "closed"]
Transport = Literal["grpc", "doorbell"]


def base_config(sae_dir: Path, workdir: Path, *plugins: str, **settings: Any) -> dict[str, Any]:
    """A config with the detector and the decision log, plus ``plugins`` (fault plugins)."""
    plugin_config: dict[str, Any] = {
        "detectors": {"always": {"hook": HOOK, "features": [1], "threshold": -1.0,
                                 "action": "flag"}},
        "decision_log": {"path": str(workdir / "decisions.jsonl")},
    }
    plugin_config.update(settings.pop("plugin_config", {}))
    return {
        "server": {"drain_grace_seconds": 30, **settings.pop("server", {})},
        "logging": {"level": "info"},
        "saes": [{"path": str(sae_dir)}],
        "plugins": {"enabled": ["detectors", "decision_log", *plugins],
                    "watch_interval_seconds": 0, **settings.pop("plugins", {}),
                    "config": plugin_config},
        "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False},
        **settings,
    }


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_fault_plugins(tmp_path_factory.mktemp("fault-plugins"))


@pytest.fixture
def start_sidecar(tmp_path: Path, plugin_site: Path) -> Iterator[Callable[..., Sidecar]]:
    """Start a sidecar from a config mapping; every one is stopped after the test."""
    started: list[Sidecar] = []

    def start(config: dict[str, Any]) -> Sidecar:
        sidecar = Sidecar(tmp_path, config, plugin_site=plugin_site)
        started.append(sidecar)
        sidecar.start()
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., GuardClient]]:
    """Make GuardClients (INLINE, long deadline, quick reconnects); all closed after the test."""
    made: list[GuardClient] = []

    def make(address: str, policy: Policy = "closed", **options: Any) -> GuardClient:
        client = GuardClient(address, hooks=[HOOK], failure_policy=policy,
                             deadline_ms=DEADLINE_MS, reconnect_backoff_ms=50.0,
                             reconnect_backoff_max_ms=200.0, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


class Host(threading.Thread):
    """A host streaming generations on one INLINE client until stopped: a prompt batch of 4
    rows, then one row per token; every verdict is kept in order."""

    def __init__(self, client: GuardClient, name: str, pace_s: float = 0.003) -> None:
        super().__init__(name=f"host-{name}", daemon=True)
        self.client = client
        self.prefix = name
        self.pace_s = pace_s
        self.verdicts: list[Verdict] = []
        self.failure: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            for generation in itertools.count():
                request = f"{self.prefix}-{generation}"
                self._send(request, ROWS, [0, 1, 2, 3], "prompt")
                for token in range(4, 12):
                    if self._stopping.is_set():
                        return
                    self._send(request, ROWS[:1], [token], "generation")
        except BaseException as exc:  # reported by stop()
            self.failure = exc

    def _send(self, request: str, rows: np.ndarray[Any, Any], positions: list[int],
              phase: Literal["prompt", "generation"]) -> None:
        self.verdicts.append(self.client.inspect(request, HOOK, rows, positions, phase=phase))
        time.sleep(self.pace_s)  # two shared cores: leave room for the guard

    def count(self, source: str | None = None) -> int:
        return sum(1 for v in list(self.verdicts) if source is None or v.source == source)

    def stop(self) -> None:
        self._stopping.set()
        self.join(WAIT_S)
        assert not self.is_alive(), f"{self.name} did not stop"
        assert self.failure is None, f"{self.name} failed: {self.failure!r}"

    def decision_ids(self) -> list[str]:
        return [v.decision_id for v in self.verdicts if v.source == "guard"]


@contextlib.contextmanager
def hosts_running(hosts: list[Host]) -> Iterator[list[Host]]:
    for host in hosts:
        host.start()
    try:
        yield hosts
    finally:
        for host in hosts:
            with contextlib.suppress(AssertionError):
                if host.is_alive():
                    host.stop()


def runs(verdicts: list[Verdict]) -> list[str]:
    """The sources of consecutive verdicts, collapsed: ['guard', 'fail_open', 'guard']."""
    return [source for source, _ in itertools.groupby(v.source for v in verdicts)]


def detectors(verdict: Verdict) -> dict[str, str]:
    return {f.detector: f.message for f in verdict.findings}


def ask(client: GuardClient, request: str, rows: np.ndarray[Any, Any] = ROWS) -> Verdict:
    return client.inspect(request, HOOK, rows, list(range(len(rows))))


# -- kill -9 ------------------------------------------------------------------------------


def shared_memory(tmp_path: Path, transport: Transport) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guard's ``server`` settings and the clients' options for a transport: gRPC bytes,
    or rows in shared memory with batches rung on the doorbell socket."""
    if transport == "grpc":
        return {}, {}
    folder = tmp_path / "shm"
    folder.mkdir(exist_ok=True)
    return ({"shared_memory": {"enabled": True, "allowed_dirs": [str(folder)]}},
            {"shared_memory": str(folder)})


@pytest.mark.parametrize("transport", ["grpc", "doorbell"])
def test_sigkill_mid_stream_policy_counted_then_reconnect(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient], transport: Transport,
) -> None:
    server, options = shared_memory(tmp_path, transport)
    guard = start_sidecar(base_config(sae_dir, tmp_path, server=server))
    policies: list[Policy] = ["open", "closed"]
    hosts = [Host(clients(guard.address, policy, **options), f"kill-{policy}")
             for policy in policies]
    with hosts_running(hosts):
        poll(lambda: all(h.count("guard") >= 10 for h in hosts), WAIT_S, "guard verdicts")
        guard.kill()  # mid-stream: the hosts keep sending
        poll(lambda: all(h.count("guard") < h.count() and h.count() - h.count("guard") >= 10
                         for h in hosts), WAIT_S, "policy verdicts after the kill")
        guard.start()  # a new process on the same socket; the hosts find it by themselves
        poll(lambda: all(runs(h.verdicts)[-1] == "guard" and len(runs(h.verdicts)) == 3
                         for h in hosts), WAIT_S, "guard verdicts after the restart")
        marks = [h.count() for h in hosts]
        poll(lambda: all(h.count() >= m + 10 for h, m in zip(hosts, marks, strict=True)),
             WAIT_S, "more verdicts after the restart")
        assert {h.client.transport for h in hosts} == {transport}
        for host in hosts:
            host.stop()

    for host, policy in zip(hosts, policies, strict=True):
        source = f"fail_{policy}"
        assert runs(host.verdicts) == ["guard", source, "guard"]  # served, policy, served
        by_policy = [v for v in host.verdicts if v.source == source]
        action = Action.CONTINUE if policy == "open" else Action.ABORT
        assert all(v.action is action for v in by_policy)
        # The break is detected, not waited out: every one says the guard is unavailable.
        assert {v.cause for v in by_policy} == {"unavailable"}
        assert all("the guard is unavailable" in v.reason for v in by_policy)
        counts = host.client.counters
        assert counts.timeouts == 0 and counts.errors == 0
        assert counts.unavailable == len(by_policy)
        assert (counts.fail_open if policy == "open" else counts.fail_closed) == len(by_policy)
        assert counts.reconnects >= 1
        assert all(v.decision_id for v in host.verdicts if v.source == "guard")

    after_restart = [v.decision_id for h in hosts
                     for v in itertools.dropwhile(lambda v: v.source == "guard", h.verdicts)
                     if v.source == "guard"]
    for host in hosts:
        host.client.close()
    guard.terminate()
    assert guard.wait() == 0
    # SIGKILL may lose the records still queued in the killed process (no promise there);
    # the restarted one drained: what its hosts received is logged exactly once.
    missing, duplicated = exactly_once(after_restart, guard.decisions())
    assert missing == [] and duplicated == []


# -- a hanging plugin ---------------------------------------------------------------------


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
def test_hanging_plugin_is_skipped_within_budget_and_counted(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient], failure_mode: str,
) -> None:
    release = tmp_path / "release"
    guard = start_sidecar(base_config(
        sae_dir, tmp_path, "hanging",
        plugins={"timeout_ms": BUDGET_MS, "failure_mode": failure_mode},
        plugin_config={"hanging": {"release": str(release)}}))
    # The hosts' policy is the opposite of the guard's failure mode: a verdict decided by the
    # host would show.
    host_policy: Policy = "closed" if failure_mode == "open" else "open"
    hung, other = clients(guard.address, host_policy), clients(guard.address, host_policy)
    expected = Action.CONTINUE if failure_mode == "open" else Action.ABORT

    def answered_per_failure_mode(verdict: Verdict, message: str) -> None:
        assert verdict.source == "guard", verdict.reason
        assert verdict.action is expected
        if failure_mode == "open":  # the error is a finding; the healthy detector still ran
            assert set(detectors(verdict)) == {"always", "plugin-error:hanging"}
            assert message in detectors(verdict)["plugin-error:hanging"]
        else:
            assert "plugin hanging failed" in verdict.details and message in verdict.details
            assert "(plugins.failure_mode: closed)" in verdict.details

    received = [ask(other, "ok-before")]
    assert set(detectors(received[0])) == {"always"}
    try:
        received.append(ask(hung, "hang-1"))  # hangs in the plugin: answered after the budget
        answered_per_failure_mode(received[-1], f"overran the plugin budget of {BUDGET_MS} ms")
        # While the call hangs, every stream's batches skip the plugin and are answered.
        for i in range(3):
            for client in (other, hung):
                received.append(ask(client, f"ok-{i}"))
                answered_per_failure_mode(received[-1], "skipped: still running a call that "
                                                        "overran its budget")
        assert guard.metric("guard_plugin_timeouts_total", guard_plugin_name="hanging") == 1
    finally:
        release.touch()
    # Once the hung call returns, the plugin runs again.
    def plugin_back() -> bool:
        received.append(ask(other, "ok-after"))
        last = received[-1]
        return set(detectors(last)) == {"always"} and last.action is Action.CONTINUE

    poll(plugin_back, WAIT_S, "the plugin to come back")
    for client in (hung, other):
        counts = client.counters
        assert counts.timeouts == counts.fail_open == counts.fail_closed == 0
    assert guard.metric("guard_plugin_timeouts_total", guard_plugin_name="hanging") == 1

    hung.close()
    other.close()
    guard.terminate()
    assert guard.wait() == 0
    records = guard.decisions()
    missing, duplicated = exactly_once([v.decision_id for v in received], records)
    assert missing == [] and duplicated == []
    errors = {r["request_id"]: r["plugin_errors"] for r in records}
    assert errors["hang-1"] == ["hanging"] and errors["ok-2"] == ["hanging"]
    assert errors["ok-before"] == [] and errors["ok-after"] == []
    (overran,) = guard.events("plugin overran its budget")
    assert (overran["plugin"], overran["request_id"]) == ("hanging", "hang-1")


# -- a crashing plugin --------------------------------------------------------------------


def test_crashing_plugin_is_isolated_and_counted(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient],
) -> None:
    guard = start_sidecar(base_config(sae_dir, tmp_path, "crashing"))
    client = clients(guard.address)
    crashed = [ask(client, f"crash-{i}") for i in range(3)]
    fine = [ask(client, f"ok-{i}") for i in range(2)]

    for verdict in crashed:
        assert verdict.source == "guard" and verdict.action is Action.CONTINUE
        found = detectors(verdict)
        assert set(found) == {"always", "plugin-error:crashing"}  # the detector's finding kept
        # Its type only: the message quotes token ids (telemetry.record_sensitive is off).
        assert "RuntimeError (message withheld" in found["plugin-error:crashing"]
        assert "injected crash" not in found["plugin-error:crashing"]
    assert all(set(detectors(v)) == {"always"} for v in fine)
    assert client.counters.fail_closed == 0
    assert guard.metric("guard_plugin_errors_total", guard_plugin_name="crashing",
                        guard_plugin_hook="guard_detect") == 3
    # Its sink hook raised too (on the same 3 decisions): the decision log still got them.
    poll(lambda: guard.metric("guard_plugin_errors_total", guard_plugin_name="crashing",
                              guard_plugin_hook="guard_record") == 3, WAIT_S,
         "the failed record calls to be counted")
    assert guard.metric("guard_records_dropped_total") == 0

    client.close()
    guard.terminate()
    assert guard.wait() == 0
    records = guard.decisions()
    missing, duplicated = exactly_once([v.decision_id for v in crashed + fine], records)
    assert missing == [] and duplicated == []
    for record in records:
        crash = record["request_id"].startswith("crash-")
        assert record["plugin_errors"] == (["crashing"] if crash else [])
        assert "always" in [f["detector"] for f in record["findings"]]
    failed = guard.events("plugin failed")
    assert sorted((e["plugin"], e["hook"]) for e in failed) == (
        [("crashing", "guard_detect")] * 3 + [("crashing", "guard_record")] * 3)


# -- SIGTERM with streams in flight -------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "doorbell"])
@pytest.mark.parametrize("ending", ["hosts_close", "grace_expires"])
def test_sigterm_with_streams_in_flight_drains_every_decision(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient], ending: str, transport: Transport,
) -> None:
    """``hosts_close``: the hosts end their streams during the drain; ``grace_expires``: they
    keep streaming, and the guard ends the streams after ``server.drain_grace_seconds``."""
    grace = 30 if ending == "hosts_close" else 1
    server, options = shared_memory(tmp_path, transport)
    guard = start_sidecar(base_config(sae_dir, tmp_path, server={
        "health_listen": "127.0.0.1:0", "drain_grace_seconds": grace, **server}))
    (listening,) = guard.events("listening")
    health_address = str(listening["health"])
    hosts = [Host(clients(guard.address, **options), f"drain-{i}") for i in range(4)]
    with hosts_running(hosts):
        poll(lambda: all(h.count() >= 10 for h in hosts), WAIT_S, "verdicts")
        assert {h.client.transport for h in hosts} == {transport}
        guard.terminate()
        poll(lambda: guard.health(health_address) == health_pb2.HealthCheckResponse.NOT_SERVING,
             WAIT_S, "NOT_SERVING after SIGTERM")
        marks = [h.count("guard") for h in hosts]
        # The streams in flight are still served during the drain.
        poll(lambda: all(h.count("guard") >= m + 5 for h, m in zip(hosts, marks, strict=True)),
             WAIT_S, "verdicts during the drain")
        if ending == "hosts_close":
            assert guard.process is not None and guard.process.poll() is None  # draining
            for host in hosts:
                host.stop()
                host.client.close()  # the stream ends: the drain completes
        assert guard.wait(WAIT_S) == 0
        for host in hosts:
            host.stop()

    received = [d for h in hosts for d in h.decision_ids()]
    for host in hosts:
        counts = host.client.counters
        assert counts.timeouts == counts.errors == 0
        if ending == "hosts_close":
            assert runs(host.verdicts) == ["guard"]  # no batch fell to the policy
        else:  # answered until the guard ended the stream, then the policy (guard gone)
            assert runs(host.verdicts) == ["guard", "fail_closed"]
            assert {v.cause for v in host.verdicts if v.source != "guard"} == {"unavailable"}
    records = guard.decisions()
    missing, duplicated = exactly_once(received, records)
    assert missing == [] and duplicated == []
    if ending == "hosts_close":
        assert len(records) == len(received)  # and nothing else was decided
    names = [e["event"] for e in guard.events()]
    assert names.index("draining") < names.index("stopped")
    assert not guard.socket.exists()
    assert not Path(f"{guard.socket}.doorbell").exists()


def test_sigterm_while_a_plugin_hangs_still_exits(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient],
) -> None:
    """A plugin call that never returns must not keep the drained guard from exiting (it
    did: the plugin pool's threads were joined at interpreter exit)."""
    release = tmp_path / "release"  # never created: the call hangs (up to the plugin's cap)
    guard = start_sidecar(base_config(
        sae_dir, tmp_path, "hanging", plugins={"timeout_ms": BUDGET_MS},
        plugin_config={"hanging": {"release": str(release)}}))
    client = clients(guard.address)
    verdict = ask(client, "hang-1")
    assert verdict.source == "guard" and verdict.action is Action.CONTINUE
    client.close()
    guard.terminate()
    # WAIT_S is well under the plugin's own cap (MAX_BLOCK_SECONDS): only the fix exits here.
    assert fault_plugins.MAX_BLOCK_SECONDS > WAIT_S
    assert guard.wait(WAIT_S) == 0
    missing, duplicated = exactly_once([verdict.decision_id], guard.decisions())
    assert missing == [] and duplicated == []


# -- a full record queue ------------------------------------------------------------------


def test_full_record_queue_drops_and_counts_without_blocking(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient],
) -> None:
    entered, release = tmp_path / "entered", tmp_path / "release"
    queue_size, more = 4, 20
    guard = start_sidecar(base_config(
        sae_dir, tmp_path, "slow_sink", plugins={"record_queue_size": queue_size},
        plugin_config={"slow_sink": {"entered": str(entered), "release": str(release)}}))
    client = clients(guard.address)
    try:
        first = ask(client, "rec-0")
        poll(entered.exists, WAIT_S, "the slow sink to hold the first record")
        # The slow sink's thread is stuck: its queue fills, the rest are dropped for it;
        # batches are still answered at once (no timeout: the hot path never waits for the
        # queue), and each reaches the decision log meanwhile (its own queue and thread).
        def logged(count: int) -> Callable[[], bool]:
            return lambda: len(guard.decisions()) == count

        later = []
        for i in range(1, more + 1):
            later.append(ask(client, f"rec-{i}"))
            poll(logged(i + 1), WAIT_S, f"the decision log's rec-{i}")
        assert all(v.source == "guard" and v.action is Action.CONTINUE for v in later)
        assert client.counters.timeouts == client.counters.fail_closed == 0
        # Counted for the slow sink alone: the decision log has its own queue and thread.
        dropped = more - queue_size
        assert guard.metric("guard_records_dropped_total", guard_plugin_name="slow_sink") == (
            dropped)
        assert guard.metric("guard_records_queue_depth", guard_plugin_name="slow_sink") == (
            queue_size)
        assert guard.metric("guard_records_dropped_total", guard_plugin_name="decision_log") == 0
    finally:
        release.touch()
    (warning,) = guard.events("decision record dropped")  # the first drop is logged
    assert warning["reason"] == "record queue full" and warning["queue_size"] == queue_size
    assert warning["sink"] == "slow_sink"

    client.close()
    guard.terminate()
    assert guard.wait() == 0
    every = [first.decision_id] + [v.decision_id for v in later]
    assert [r["decision_id"] for r in guard.decisions()] == every  # in order, none lost


# -- an oversized batch -------------------------------------------------------------------


def test_oversized_batch_gets_a_per_batch_error_and_streams_go_on(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient],
) -> None:
    limit = D_IN * 4 * 8  # 8 F32 rows
    guard = start_sidecar(base_config(sae_dir, tmp_path,
                                      server={"max_message_bytes": limit}))
    # The hosts' own limit is left at its default: the guard's check is what is tested.
    big, other = clients(guard.address), clients(guard.address)
    rng = np.random.default_rng(3)
    assert ask(big, "fits", rng.normal(size=(8, D_IN)).astype(np.float32)).source == "guard"
    assert ask(other, "other-0").source == "guard"

    too_big = ask(big, "too-big", rng.normal(size=(12, D_IN)).astype(np.float32))
    assert too_big.source == "fail_closed" and too_big.action is Action.ABORT
    assert too_big.cause == "error"
    assert "RESOURCE_EXHAUSTED" in too_big.reason
    assert "server.max_message_bytes" in too_big.reason
    assert ask(big, "after").source == "guard"  # the same stream goes on
    assert big.counters.reconnects == 0
    assert ask(other, "other-1").source == "guard"

    # Far beyond the limit, gRPC's transport refuses the message before the guard sees it:
    # the stream ends, the host applies its policy and reconnects; other streams go on.
    huge = ask(big, "huge", rng.normal(size=(64, D_IN)).astype(np.float32))
    assert huge.source == "fail_closed" and huge.action is Action.ABORT
    assert "RESOURCE_EXHAUSTED" in huge.reason
    assert "server.max_message_bytes" in huge.reason  # the client names the option
    assert ask(other, "other-2").source == "guard"
    poll(lambda: ask(big, "again").source == "guard", WAIT_S, "the host to reconnect")
    assert other.counters.fail_closed == 0 and other.counters.reconnects == 0

    rejected = guard.events("batch rejected")
    assert [(e["request_id"], e["code"]) for e in rejected] == [("too-big",
                                                                 "RESOURCE_EXHAUSTED")]
    assert "server.max_message_bytes" in rejected[0]["reason"]


# -- a config reload with a broken file ---------------------------------------------------


def test_reload_with_a_broken_file_keeps_the_old_config(
    sae_dir: Path, tmp_path: Path, start_sidecar: Callable[..., Sidecar],
    clients: Callable[..., GuardClient],
) -> None:
    config = base_config(sae_dir, tmp_path)
    guard = start_sidecar(config)
    client = clients(guard.address)

    def threshold() -> float:
        verdict = ask(client, "probe")
        assert verdict.source == "guard", verdict.reason
        (finding,) = verdict.findings
        return finding.threshold

    def reload(text: str, event: str, count: int) -> dict[str, Any]:
        guard.config.write_text(text, encoding="utf-8")
        guard.signal(signal.SIGHUP)
        return guard.wait_event(event, count)

    rejected_event = "config reload rejected; the previous configuration stays in force"
    good = yaml.safe_dump(config, sort_keys=False)
    with hosts_running([Host(clients(guard.address), "reload")]) as (host,):
        assert threshold() == -1.0
        # Broken YAML: an unclosed flow mapping. The reason names the line.
        lines = good.splitlines()
        at = lines.index("  config:") + 1
        broken = "\n".join([*lines[:at], "    detectors: {always: {hook: x", *lines[at:]])
        rejected = reload(broken + "\n", rejected_event, 1)
        assert f"{guard.config}: <file>: expected valid YAML at line" in rejected["reason"]
        assert rejected["trigger"] == "SIGHUP"
        assert threshold() == -1.0  # the old configuration serves
        # Valid YAML, a misspelled key: the reason names the key.
        typo = good.replace("  watch_interval_seconds:", "  watch_interval_secs:")
        rejected = reload(typo, rejected_event, 2)
        assert "plugins.watch_interval_secs: expected one of the keys" in rejected["reason"]
        assert threshold() == -1.0
        # A good file is applied.
        config["plugins"]["config"]["detectors"]["always"]["threshold"] = -2.0
        reload(yaml.safe_dump(config, sort_keys=False), "config reloaded", 1)
        assert threshold() == -2.0
        poll(lambda: host.count() >= 20, WAIT_S, "the streaming host's verdicts")
        host.stop()
    assert runs(host.verdicts) == ["guard"]  # the stream never noticed a reload
    assert host.client.counters.fail_closed == 0

    client.close()
    host.client.close()
    guard.terminate()
    assert guard.wait() == 0
    missing, duplicated = exactly_once(host.decision_ids(), guard.decisions())
    assert missing == [] and duplicated == []


def test_record_queue_close_gives_up_on_a_hung_sink() -> None:
    """In process: with the sink hung and the queue full, ``close(timeout)`` returns after its
    timeout and logs what was not delivered (it blocked for good putting its stop marker, so
    a SIGTERM never ended a guard whose sink hung)."""
    gate, entered = threading.Event(), threading.Event()

    def deliver(_decision: Decision, _context: object) -> None:
        entered.set()
        gate.wait(WAIT_S)

    records = RecordQueue(deliver, maxsize=2)
    decisions = [make_decision() for _ in range(4)]
    try:
        assert records.offer(decisions[0])
        assert entered.wait(WAIT_S)  # the sink holds the first record
        assert [records.offer(d) for d in decisions[1:]] == [True, True, False]
        with capture_logs() as logs:
            closer = threading.Thread(target=records.close, args=(0.2,))
            closer.start()
            closer.join(WAIT_S)
            assert not closer.is_alive()
    finally:
        gate.set()
    (event,) = [e for e in logs if e["event"] == "record queue did not drain in time"]
    assert event["pending"] == 2 and event["timeout_s"] == 0.2
