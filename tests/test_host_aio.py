"""guard.host.aio.AsyncGuardClient against a real in-process guard: the asyncio twins of
the sync client's tests. Each test runs its own event loop (asyncio.run)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from guard.decision import Action
from guard.host import ClientClosedError, Verdict
from guard.host.aio import AsyncGuardClient
from guard.sidecar.server import GuardServer
from tests.conftest import D_IN, HOOK
from tests.test_host_client import ScriptedGuard, rows, scripted_guard


@pytest.fixture
def guard(tmp_path: Path, sae_dir: Path) -> Iterator[tuple[GuardServer, ScriptedGuard]]:
    with scripted_guard(tmp_path, sae_dir) as running:
        yield running


@pytest.fixture
def address(guard: tuple[GuardServer, ScriptedGuard]) -> str:
    return guard[0].addresses[0]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_inline_round_trips_and_concurrent_calls(address: str) -> None:
    async def main() -> None:
        async with AsyncGuardClient(address, hooks=[HOOK], deadline_ms=10_000) as client:
            first = await client.inspect("req-1", HOOK, rows(), [0, 1, 2], token_ids=[1, 2, 3])
            many = await asyncio.gather(*[
                client.inspect(f"req-{i}", HOOK, rows(seed=i), [i, i + 1, i + 2])
                for i in range(2, 22)])
        assert first.action is Action.CONTINUE and first.source == "guard"
        assert first.sequence == 1 and first.decision_id
        assert [v.request_id for v in many] == [f"req-{i}" for i in range(2, 22)]
        assert sorted(v.sequence for v in many) == list(range(2, 22))
        assert all(v.source == "guard" for v in many)
        assert client.counters.sent == 21 and client.state == "closed"

    run(main)


def test_abort_and_steer_from_the_guard(address: str) -> None:
    async def main() -> None:
        async with AsyncGuardClient(address, deadline_ms=10_000) as client:
            aborted = await client.inspect("req-a", HOOK, rows(), [0, 1, 2],
                                           attributes={"abort": "no"})
            steered = await client.inspect("req-s", HOOK, rows(), [0, 1, 2],
                                           attributes={"steer": "1"})
        assert aborted.action is Action.ABORT and aborted.findings[0].detector == "scripted"
        assert steered.action is Action.STEER and steered.steering[HOOK].shape == (3, D_IN)

    run(main)


def test_per_batch_error_applies_fail_closed_with_the_guards_message(address: str) -> None:
    async def main() -> None:
        async with AsyncGuardClient(address, failure_policy="closed",
                                    deadline_ms=10_000) as client:
            bad = await client.inspect("req-e", HOOK, rows(width=D_IN + 1), [0, 1, 2])
            good = await client.inspect("req-e", HOOK, rows(), [0, 1, 2])
        assert bad.action is Action.ABORT and bad.source == "fail_closed"
        assert f"has d_in {D_IN}, found width {D_IN + 1}" in bad.reason
        assert good.source == "guard" and good.sequence == 2
        assert (client.counters.errors, client.counters.fail_closed) == (1, 1)

    run(main)


@pytest.mark.parametrize(("policy", "action"), [("open", Action.CONTINUE),
                                                ("closed", Action.ABORT)])
def test_guard_down_at_start_applies_the_policy_at_once(
    tmp_path: Path, policy: Literal["open", "closed"], action: Action
) -> None:
    async def main() -> None:
        started = time.monotonic()
        async with AsyncGuardClient(f"unix://{tmp_path}/nobody.sock", failure_policy=policy,
                                    deadline_ms=10_000) as client:
            verdicts = [await client.inspect("req-d", HOOK, rows(), [0, 1, 2])
                        for _ in range(3)]
        assert time.monotonic() - started < 5.0  # far below one deadline
        assert all(v.action is action and v.source == f"fail_{policy}" for v in verdicts)
        assert all("UNAVAILABLE" in v.reason for v in verdicts)
        assert client.counters.unavailable == 3

    run(main)


def test_late_reply_is_discarded_and_the_next_batch_gets_its_own(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard

    async def main() -> None:
        async with AsyncGuardClient(server.addresses[0], deadline_ms=100) as client:
            slow = await client.inspect("req-slow", HOOK, rows(), [0, 1, 2],
                                        attributes={"sleep": "0.4"})
            after = await client.inspect("req-next", HOOK, rows(), [3, 4, 5],
                                         deadline_ms=10_000)
            await eventually(lambda: client.counters.late_replies == 1)
        assert slow.source == "fail_open" and "within 100 ms" in slow.reason
        assert after.source == "guard" and after.request_id == "req-next"
        assert after.sequence == 2
        assert (client.counters.timeouts, client.counters.late_replies) == (1, 1)
        assert [(r, s) for r, s, _ in plugin.seen] == [("req-slow", 1), ("req-next", 2)]

    run(main)


def test_a_guard_falling_behind_gets_its_stream_reset(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard

    async def main() -> None:
        async with AsyncGuardClient(server.addresses[0], deadline_ms=50,
                                    reconnect_backoff_ms=20,
                                    reconnect_backoff_max_ms=100) as client:
            for _ in range(2):
                verdict = await client.inspect("req-f", HOOK, rows(), [0, 1, 2],
                                               attributes={"sleep": "0.3"})
                assert verdict.source == "fail_open"
            plugin.release.set()
            await eventually(lambda: client.counters.reconnects >= 1)
            for _ in range(500):
                verdict = await client.inspect("req-f", HOOK, rows(), [0, 1, 2],
                                               deadline_ms=2000)
                if verdict.source == "guard":
                    break
                await asyncio.sleep(0.01)
            assert verdict.source == "guard"

    run(main)


def test_monitor_inspect_never_awaits_the_network(
    guard: tuple[GuardServer, ScriptedGuard],
) -> None:
    server, plugin = guard
    replies: list[Verdict] = []

    async def main() -> None:
        client = AsyncGuardClient(server.addresses[0], mode="monitor",
                                  on_reply=replies.append)
        try:
            started = time.monotonic()
            for i in range(10):
                # Driven by hand: the coroutine finishes on its first step, so it never
                # yields to the event loop (let alone waits for the guard).
                step = client.inspect("req-m", HOOK, rows(seed=i), [0, 1, 2],
                                      attributes={"sleep": "1.0"})
                with pytest.raises(StopIteration) as finished:
                    step.send(None)
                verdict = finished.value.value
                assert verdict.source == "monitor" and verdict.action is Action.CONTINUE
            assert time.monotonic() - started < 0.5  # the guard sleeps 1 s on each batch
            await eventually(lambda: len(plugin.seen) >= 1)
        finally:
            plugin.release.set()
            await client.close(timeout=10)
        assert client.counters.sent == 10 and client.counters.dropped == 0
        assert [v.sequence for v in replies] == list(range(1, 11))

    run(main)


def test_monitor_full_queue_drops_and_counts(guard: tuple[GuardServer, ScriptedGuard]) -> None:
    server, plugin = guard

    async def main() -> None:
        async with AsyncGuardClient(server.addresses[0], mode="monitor",
                                    queue_size=4) as client:
            await client.inspect("req-q", HOOK, rows(), [0, 1, 2], attributes={"sleep": "30"})
            await eventually(lambda: len(plugin.seen) == 1)  # the guard is held
            big = np.zeros((16384, D_IN), dtype=np.float32)
            for _ in range(40):
                await client.inspect("req-q", HOOK, big, np.arange(16384))
                await asyncio.sleep(0)  # let the writer task run between batches
            dropped = client.counters.dropped
            assert dropped > 0
            plugin.release.set()
            await eventually(lambda: client.counters.replies == 41 - dropped)
            await client.inspect("req-q", HOOK, rows(), [0, 1, 2])
            await eventually(lambda: client.counters.replies == 42 - dropped)
        assert client.counters.sent + dropped == 42
        sequences = [sequence for _request, sequence, _attributes in plugin.seen]
        assert sequences[-1] == 42 and sequences[-1] - len(sequences) == dropped

    run(main)


def test_monitor_with_the_guard_down_drops_when_full(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncGuardClient(f"unix://{tmp_path}/nobody.sock", mode="monitor",
                                    queue_size=3) as client:
            for _ in range(20):
                verdict = await client.inspect("req-md", HOOK, rows(), [0, 1, 2])
                assert verdict.source == "monitor"
        assert client.counters.sent == 0 and client.counters.dropped == 20

    run(main)


def test_close_is_idempotent_and_inspect_after_close_raises(address: str) -> None:
    async def main() -> None:
        client = AsyncGuardClient(address, deadline_ms=10_000)
        assert (await client.inspect("req-c", HOOK, rows(), [0, 1, 2])).source == "guard"
        assert (await client.describe()).saes[0].d_in == D_IN
        await client.close()
        await client.close()
        with pytest.raises(ClientClosedError):
            await client.inspect("req-c", HOOK, rows(), [0, 1, 2])

    run(main)
