"""guard.host.GuardClient against a real in-process guard: INLINE round trips, the failure
policy on per-batch errors, timeouts and a guard that is down, MONITOR mode's queue, and
input validation. The scripted plugin and the guard fixture here are shared by the asyncio
and fault tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from numpy.typing import NDArray

from guard import FeatureBatch, FeatureEdit, FeatureRequest, Finding, hookimpl
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import TooLarge
from guard.host import ClientClosedError, GuardClient, Verdict
from guard.sidecar.server import GuardServer
from tests.conftest import D_IN, HOOK

FEATURE = 3


class ScriptedGuard:
    """A plugin driven by each batch's attributes: ``sleep`` (seconds, interrupted when the
    test ends), ``abort`` (a message), ``steer`` (nudge FEATURE). Records what it saw."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen: list[tuple[str, int, dict[str, str]]] = []
        self._lock = threading.Lock()

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, [FEATURE])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        attributes = dict(batch.attributes)
        with self._lock:
            self.seen.append((batch.request_id, batch.sequence, attributes))
        if "sleep" in attributes:
            self.release.wait(float(attributes["sleep"]))
        if "abort" in attributes:
            return [Finding("scripted", 0.9, 0.5, "abort", feature_ids=(FEATURE,),
                            feature_activations=(float(batch.column(FEATURE).max()),),
                            positions=tuple(int(p) for p in batch.positions),
                            message=attributes["abort"])]
        return []

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
        if "steer" in batch.attributes:
            return [FeatureEdit(HOOK, FEATURE, "nudge", 2.0)]
        return []


def guard_config(tmp_path: Path, sae_dir: Path) -> GuardConfig:
    return GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock", drain_grace_seconds=0),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        # no plugin budget: a sleeping batch holds the stream for its whole sleep
        plugins=PluginsConfig(autoload=False, timeout_ms=0),
    )


@contextmanager
def scripted_guard(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, ScriptedGuard]]:
    """A ready in-process guard on a Unix socket with a :class:`ScriptedGuard` plugin."""
    config = guard_config(tmp_path, sae_dir)
    plugin = ScriptedGuard()
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config, extra_plugins=[PluginSource("scripted", "1", plugin)]))
    try:
        yield server, plugin
    finally:
        plugin.release.set()
        server.stop(0)


def rows(n: int = 3, width: int = D_IN, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def wait_until(condition: object, timeout: float = 10.0) -> None:
    """Poll ``condition()`` (a callable) until true; fail after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def guard(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, ScriptedGuard]]:
    with scripted_guard(tmp_path, sae_dir) as running:
        yield running


@pytest.fixture
def address(guard: tuple[GuardServer, ScriptedGuard]) -> str:
    return guard[0].addresses[0]


# -- INLINE -------------------------------------------------------------------------------


def test_inline_round_trips_return_guard_decisions(address: str) -> None:
    with GuardClient(address, hooks=[HOOK], deadline_ms=5000, host_name="test-host") as client:
        verdicts = [client.inspect("req-1", HOOK, rows(seed=i), [i, i + 1, i + 2],
                                   token_ids=[7, 8, 9], phase="generation")
                    for i in range(3)]
        state_while_open = client.state
    for index, verdict in enumerate(verdicts):
        assert verdict.action is Action.CONTINUE
        assert verdict.source == "guard"
        assert not verdict.decided_by_policy
        assert verdict.request_id == "req-1"
        assert verdict.sequence == index + 1
        assert verdict.positions == (index, index + 1, index + 2)
        assert verdict.reason == ""
    assert len({v.decision_id for v in verdicts}) == 3 and all(v.decision_id for v in verdicts)
    counts = client.counters
    assert (counts.sent, counts.replies, counts.fail_open, counts.errors) == (3, 3, 0, 0)
    assert (state_while_open, client.state) == ("open", "closed")


def test_abort_carries_findings_and_details(address: str) -> None:
    with GuardClient(address, deadline_ms=5000) as client:
        verdict = client.inspect("req-a", HOOK, rows(), [4, 5, 6],
                                 attributes={"abort": "unsafe plan"})
    assert verdict.action is Action.ABORT and verdict.source == "guard"
    assert "scripted" in verdict.details and "unsafe plan" in verdict.details
    (finding,) = verdict.findings
    assert finding.detector == "scripted" and finding.action is Action.ABORT
    assert (finding.score, finding.threshold) == pytest.approx((0.9, 0.5))
    assert finding.feature_ids == (FEATURE,) and len(finding.feature_activations) == 1
    assert finding.positions == (4, 5, 6) and finding.message == "unsafe plan"


def test_steer_returns_a_delta_per_hook(address: str) -> None:
    with GuardClient(address, deadline_ms=5000) as client:
        verdict = client.inspect("req-s", HOOK, rows(), [0, 1, 2], attributes={"steer": "1"})
    assert verdict.action is Action.STEER
    delta = verdict.steering[HOOK]
    assert delta.shape == (3, D_IN) and delta.dtype == np.float32
    assert np.all(np.isfinite(delta)) and np.any(delta != 0)


def test_float16_rows_travel_as_f16(address: str) -> None:
    with GuardClient(address, deadline_ms=5000) as client:
        verdict = client.inspect("req-h", HOOK, rows().astype(np.float16), [0, 1, 2])
    assert verdict.source == "guard" and verdict.action is Action.CONTINUE


@pytest.mark.parametrize(("policy", "action"), [("open", Action.CONTINUE),
                                                ("closed", Action.ABORT)])
def test_per_batch_error_applies_the_policy_with_the_guards_message(
    address: str, policy: Literal["open", "closed"], action: Action
) -> None:
    with GuardClient(address, failure_policy=policy, deadline_ms=5000) as client:
        bad = client.inspect("req-e", HOOK, rows(width=D_IN - 8), [0, 1, 2])
        good = client.inspect("req-e", HOOK, rows(), [3, 4, 5])
    assert bad.action is action and bad.source == f"fail_{policy}"
    assert "INVALID_ARGUMENT" in bad.reason
    assert f"has d_in {D_IN}, found width {D_IN - 8}" in bad.reason
    assert bad.decision_id == "" and bad.positions == (0, 1, 2)
    if action is Action.ABORT:
        assert bad.details == bad.reason
    assert good.source == "guard" and good.sequence == 2  # the stream went on
    counts = client.counters
    assert counts.errors == 1 and getattr(counts, f"fail_{policy}") == 1


@pytest.mark.parametrize(("policy", "action"), [("open", Action.CONTINUE),
                                                ("closed", Action.ABORT)])
def test_guard_down_at_start_applies_the_policy_at_once(
    tmp_path: Path, policy: Literal["open", "closed"], action: Action
) -> None:
    started = time.monotonic()
    with GuardClient(f"unix://{tmp_path}/nobody.sock", failure_policy=policy,
                     deadline_ms=10_000) as client:
        verdicts = [client.inspect("req-d", HOOK, rows(), [0, 1, 2]) for _ in range(3)]
        state = client.state
    elapsed = time.monotonic() - started
    assert elapsed < 5.0  # far below even one deadline: nobody waited for a reply
    assert state == "down"
    for verdict in verdicts:
        assert verdict.action is action and verdict.source == f"fail_{policy}"
        assert "unavailable" in verdict.reason and "UNAVAILABLE" in verdict.reason
    counts = client.counters
    assert counts.unavailable == 3 and getattr(counts, f"fail_{policy}") == 3
    assert counts.sent == 0


def test_late_reply_is_discarded_and_the_next_batch_gets_its_own(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    with GuardClient(server.addresses[0], failure_policy="closed", deadline_ms=100) as client:
        slow = client.inspect("req-slow", HOOK, rows(), [0, 1, 2], attributes={"sleep": "0.4"})
        # Sent while the guard still works on the first batch: that reply comes first and
        # must not be taken for this one.
        after = client.inspect("req-next", HOOK, rows(seed=1), [3, 4, 5], deadline_ms=10_000)
        wait_until(lambda: client.counters.late_replies == 1)
    assert slow.action is Action.ABORT and slow.source == "fail_closed"
    assert "no reply from the guard within 100 ms" in slow.reason
    assert after.source == "guard" and after.request_id == "req-next"
    assert after.sequence == 2 and after.positions == (3, 4, 5)
    counts = client.counters
    assert (counts.timeouts, counts.late_replies, counts.fail_closed) == (1, 1, 1)
    assert [(r, s) for r, s, _ in plugin.seen] == [("req-slow", 1), ("req-next", 2)]


def test_a_guard_falling_behind_gets_its_stream_reset(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    with GuardClient(server.addresses[0], deadline_ms=50, reset_after_late=2,
                     reconnect_backoff_ms=20, reconnect_backoff_max_ms=100) as client:
        for _ in range(2):
            verdict = client.inspect("req-f", HOOK, rows(), [0, 1, 2],
                                     attributes={"sleep": "0.3"})
            assert verdict.source == "fail_open"
        assert client.counters.timeouts == 2
        plugin.release.set()  # the old stream's handler finishes its batch at once
        wait_until(lambda: client.counters.reconnects >= 1)
        wait_until(lambda: client.inspect("req-f", HOOK, rows(), [3, 4, 5],
                                          deadline_ms=2000).source == "guard")


def test_threads_pipeline_on_one_stream(address: str) -> None:
    results: dict[str, list[Verdict]] = {}

    def worker(name: str) -> None:
        results[name] = [client.inspect(name, HOOK, rows(seed=i), [i, i + 1, i + 2],
                                        deadline_ms=10_000) for i in range(10)]

    with GuardClient(address, hooks=[HOOK]) as client:
        threads = [threading.Thread(target=worker, args=(f"req-{t}",)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    sequences = []
    for name, verdicts in results.items():
        assert [v.source for v in verdicts] == ["guard"] * 10
        assert all(v.request_id == name for v in verdicts)
        assert [v.positions[0] for v in verdicts] == list(range(10))
        sequences += [v.sequence for v in verdicts]
    assert sorted(sequences) == list(range(1, 41))
    assert client.counters.sent == 40


def test_trace_context_goes_in_the_batch_attributes_and_metadata_hook_runs(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    opened: list[int] = []
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def metadata() -> list[tuple[str, str]]:
        opened.append(1)
        return [("x-host-pod", "pod-1")]

    with GuardClient(server.addresses[0], deadline_ms=5000, metadata=metadata,
                     trace_context=lambda: {"traceparent": traceparent}) as client:
        verdict = client.inspect("req-t", HOOK, rows(), [0, 1, 2], attributes={"user": "u1"})
    assert verdict.source == "guard"
    assert plugin.seen[-1][2] == {"user": "u1", "traceparent": traceparent}
    assert opened == [1]


def test_describe_names_the_hooks_and_widths(address: str) -> None:
    with GuardClient(address) as client:
        described = client.describe()
    assert [(s.hook, s.d_in) for s in described.saes] == [(HOOK, D_IN)]
    assert described.max_message_bytes == 32 * 1024 * 1024


def test_close_is_idempotent_and_inspect_after_close_raises(address: str) -> None:
    client = GuardClient(address, deadline_ms=5000)
    assert client.state == "idle"
    assert client.inspect("req-c", HOOK, rows(), [0, 1, 2]).source == "guard"
    client.close()
    client.close()
    with pytest.raises(ClientClosedError, match="closed"):
        client.inspect("req-c", HOOK, rows(), [0, 1, 2])


# -- MONITOR ------------------------------------------------------------------------------


def test_monitor_never_blocks_on_a_sleeping_guard(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    sleep = 1.0
    replies: list[Verdict] = []
    client = GuardClient(server.addresses[0], mode="monitor", queue_size=64,
                         on_reply=replies.append)
    try:
        started = time.monotonic()
        verdicts = [client.inspect("req-m", HOOK, rows(seed=i), [i, i + 1, i + 2],
                                   attributes={"sleep": str(sleep)}) for i in range(10)]
        elapsed = time.monotonic() - started
        # Ten batches of a guard that sleeps 1 s on each: a blocking client needs 10 s.
        assert elapsed < sleep / 2
        assert all(v.action is Action.CONTINUE and v.source == "monitor" for v in verdicts)
        wait_until(lambda: len(plugin.seen) >= 1)
    finally:
        plugin.release.set()  # every sleep ends now
        client.close(timeout=10)
    assert client.counters.sent == 10 and client.counters.dropped == 0
    assert [v.sequence for v in replies] == list(range(1, 11))
    assert all(v.source == "guard" and v.decision_id for v in replies)


def test_monitor_full_queue_drops_the_newest_and_the_guard_sees_the_gaps(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    replies: list[Verdict] = []
    with GuardClient(server.addresses[0], mode="monitor", queue_size=4,
                     on_reply=replies.append) as client:
        # The first batch holds the guard; 1 MiB batches fill gRPC's buffers quickly.
        client.inspect("req-q", HOOK, rows(), [0, 1, 2], attributes={"sleep": "30"})
        big = np.zeros((16384, D_IN), dtype=np.float32)
        positions = np.arange(16384)
        for _ in range(40):
            assert client.inspect("req-q", HOOK, big, positions).source == "monitor"
        dropped = client.counters.dropped
        assert dropped > 0
        plugin.release.set()
        wait_until(lambda: client.counters.replies == 41 - dropped)  # the queue is empty
        last = client.inspect("req-q", HOOK, rows(), [0, 1, 2])  # accepted: carries the gap
        assert last.source == "monitor"
        wait_until(lambda: client.counters.replies == 41 - dropped + 1)
    assert client.counters.dropped == dropped
    assert client.counters.sent + dropped == 42
    # Sequence numbers skip the dropped batches, so the guard's skipped_sequences sees them.
    assert replies[-1].sequence == 42
    gaps = [server_seq for _request, server_seq, _attributes in plugin.seen]
    assert gaps[-1] - len(gaps) == dropped


def test_monitor_on_reply_sees_errors_and_counts_them(address: str) -> None:
    replies: list[Verdict] = []
    with GuardClient(address, mode="monitor", on_reply=replies.append) as client:
        client.inspect("req-me", HOOK, rows(width=D_IN - 1), [0, 1, 2])
        wait_until(lambda: len(replies) == 1)
    (reply,) = replies
    assert reply.source == "monitor" and reply.action is Action.CONTINUE
    assert "INVALID_ARGUMENT" in reply.reason
    assert client.counters.errors == 1


def test_monitor_with_the_guard_down_drops_when_full(tmp_path: Path) -> None:
    with GuardClient(f"unix://{tmp_path}/nobody.sock", mode="monitor", queue_size=3) as client:
        verdicts = [client.inspect("req-md", HOOK, rows(), [0, 1, 2]) for _ in range(20)]
    assert all(v.source == "monitor" for v in verdicts)
    counts = client.counters
    assert counts.sent == 0 and counts.dropped == 20  # queued ones are dropped at close too


# -- the boundary -------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"rows": np.zeros(D_IN, dtype=np.float32)}, ValueError, r"rows: expected a 2-D array"),
    ({"rows": np.zeros((0, D_IN), dtype=np.float32), "positions": []}, ValueError,
     r"rows: .*at least one row"),
    ({"rows": np.zeros((3, D_IN))}, TypeError, r"rows: expected dtype float32 or float16, "
                                               r"found float64"),
    ({"rows": [[0.0] * D_IN] * 3}, TypeError, r"rows: expected a numpy.ndarray"),
    ({"positions": [0, 1]}, ValueError, r"positions: expected one integer per row \(3\)"),
    ({"positions": [0.5, 1, 2]}, TypeError, r"positions: expected integers"),
    ({"token_ids": [1]}, ValueError, r"token_ids: expected one integer per row"),
    ({"phase": "decode"}, ValueError, r"phase: expected 'prompt' or 'generation'"),
    ({"hook": "blocks.9.hook_resid_post"}, ValueError, r"hook: .* is not one of this "),
    ({"request_id": ""}, ValueError, r"request_id: expected a non-empty string"),
    ({"attributes": {"k": 1}}, TypeError, r"attributes: expected str keys and values"),
    ({"deadline_ms": 0}, ValueError, r"deadline_ms: expected a number > 0"),
])
def test_bad_arguments_are_refused_naming_the_argument(
    tmp_path: Path, kwargs: Mapping[str, object], error: type[Exception], match: str
) -> None:
    arguments: dict[str, object] = {"request_id": "req-v", "hook": HOOK, "rows": rows(),
                                    "positions": [0, 1, 2]}
    arguments.update(kwargs)
    with GuardClient(f"unix://{tmp_path}/unused.sock", hooks=[HOOK]) as client:
        with pytest.raises(error, match=match):
            client.inspect(**arguments)  # type: ignore[arg-type]
        assert client.state == "idle"  # nothing was sent, nothing was opened


def test_a_batch_above_the_limit_names_the_option_on_both_sides(tmp_path: Path) -> None:
    with (GuardClient(f"unix://{tmp_path}/unused.sock", max_message_bytes=1024) as client,
          pytest.raises(TooLarge) as raised):
        client.inspect("req-big", HOOK, np.zeros((64, D_IN), np.float32), np.arange(64))
    message = str(raised.value)
    assert "4096 bytes" in message and "max_message_bytes=1024" in message
    assert "server.max_message_bytes" in message


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "shadow"}, r"mode: expected 'inline' or 'monitor'"),
    ({"failure_policy": "allow"}, r"failure_policy: expected 'open' or 'closed'"),
    ({"deadline_ms": -1}, r"deadline_ms: expected a number > 0"),
    ({"queue_size": 0}, r"queue_size: expected an integer >= 1"),
    ({"wire_dtype": "F64"}, r"wire_dtype: expected"),
    ({"reconnect_backoff_ms": 500, "reconnect_backoff_max_ms": 100},
     r"reconnect_backoff_max_ms: expected >= reconnect_backoff_ms"),
    ({"hooks": "blocks.1.hook_resid_post"}, r"hooks: expected a list of hook names"),
])
def test_bad_settings_are_refused_naming_the_setting(
    kwargs: Mapping[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        GuardClient("unix:///tmp/unused.sock", **kwargs)  # type: ignore[arg-type]
