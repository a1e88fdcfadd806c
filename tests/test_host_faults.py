"""The host client when the guard fails: killed with SIGKILL mid-stream and restarted on the
same socket (a real ``guard serve`` process), still starting (not ready), or ending the
stream over a protocol error. The client applies its policy without waiting for deadlines
and comes back by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guard.decision import Action
from guard.engine.core import Engine
from guard.host import AsyncGuardClient, GuardClient, Verdict
from guard.sidecar.process import GuardProcess
from guard.sidecar.server import GuardServer
from tests.conftest import HOOK
from tests.test_host_client import guard_config, rows, wait_until

DEADLINE_MS = 3000.0
#: Small reconnect backoff (first delay, cap) so that recovery is quick in tests.
BACKOFF_MS, BACKOFF_MAX_MS = 50.0, 200.0


@pytest.fixture
def restartable(tmp_path: Path, sae_dir: Path) -> Iterator[GuardProcess]:
    """``guard serve`` on a fixed socket that can be killed (SIGKILL: no drain, the socket
    file stays behind) and started again."""
    # Unix socket paths are limited to ~107 bytes: keep it short.
    address = f"unix:///tmp/guard-host-{os.getpid()}-{time.monotonic_ns()}.sock"
    config = tmp_path / "guard.yaml"
    config.write_text(
        f"server:\n  listen: {address}\n  drain_grace_seconds: 0\n"
        f"saes:\n  - path: {sae_dir}\n    features: [1, 5, 7]\n"
    )
    guard = GuardProcess(config, address).start()
    yield guard
    guard.kill()
    with contextlib.suppress(FileNotFoundError):
        guard.socket.unlink()


def _assert_policy(verdicts: list[Verdict], action: Action, source: str) -> None:
    for verdict in verdicts:
        assert verdict.action is action and verdict.source == source
        assert "the guard is unavailable" in verdict.reason


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_sync(restartable: GuardProcess) -> None:
    with GuardClient(restartable.address, failure_policy="closed", deadline_ms=DEADLINE_MS,
                     reconnect_backoff_ms=BACKOFF_MS,
                     reconnect_backoff_max_ms=BACKOFF_MAX_MS) as client:
        assert client.inspect("req-k", HOOK, rows(), [0, 1, 2]).source == "guard"
        restartable.kill()
        timings, verdicts = [], []
        for i in range(5):
            started = time.monotonic()
            verdicts.append(client.inspect("req-k", HOOK, rows(seed=i), [i, i + 1, i + 2]))
            timings.append(time.monotonic() - started)
        _assert_policy(verdicts, Action.ABORT, "fail_closed")
        assert max(timings) < DEADLINE_MS / 1e3  # decided before the deadline...
        counts = client.counters
        assert counts.timeouts == 0  # ...because the break was known, not timed out
        assert (counts.fail_closed, counts.unavailable) == (5, 5)

        restartable.start()  # same socket; the client finds it by itself
        wait_until(lambda: client.inspect("req-k", HOOK, rows(), [0, 1, 2]).source == "guard",
                   timeout=20)
        assert client.counters.reconnects >= 1
        after = client.inspect("req-k", HOOK, rows(), [3, 4, 5])
        assert after.source == "guard" and after.decision_id


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_asyncio(restartable: GuardProcess) -> None:
    async def main() -> None:
        async with AsyncGuardClient(restartable.address, failure_policy="open",
                                    deadline_ms=DEADLINE_MS, reconnect_backoff_ms=BACKOFF_MS,
                                    reconnect_backoff_max_ms=BACKOFF_MAX_MS) as client:
            assert (await client.inspect("req-k", HOOK, rows(), [0, 1, 2])).source == "guard"
            restartable.kill()
            verdicts = [await client.inspect("req-k", HOOK, rows(), [0, 1, 2])
                        for _ in range(5)]
            _assert_policy(verdicts, Action.CONTINUE, "fail_open")
            assert client.counters.timeouts == 0 and client.counters.fail_open == 5

            await asyncio.to_thread(restartable.start)
            deadline = time.monotonic() + 20
            while (await client.inspect("req-k", HOOK, rows(), [0, 1, 2])).source != "guard":
                assert time.monotonic() < deadline, "the client did not reconnect"
                await asyncio.sleep(0.02)
            assert client.counters.reconnects >= 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_starting_guard_gets_the_policy_then_serves(tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()  # listening, not ready: Inspect answers UNAVAILABLE
    try:
        with GuardClient(server.addresses[0], failure_policy="closed",
                         deadline_ms=DEADLINE_MS, reconnect_backoff_ms=BACKOFF_MS,
                         reconnect_backoff_max_ms=BACKOFF_MAX_MS) as client:
            verdict = client.inspect("req-n", HOOK, rows(), [0, 1, 2])
            assert verdict.action is Action.ABORT and verdict.source == "fail_closed"
            assert "UNAVAILABLE" in verdict.reason and "the guard is starting" in verdict.reason
            server.set_ready(Engine.load(config))
            wait_until(lambda: client.inspect("req-n", HOOK, rows(), [0, 1, 2]).source
                       == "guard")
    finally:
        server.stop(0)


def test_a_stream_ended_over_an_unserved_hook_names_it(tmp_path: Path, sae_dir: Path) -> None:
    config = guard_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    unserved = "blocks.99.hook_resid_post"
    try:
        with GuardClient(server.addresses[0], hooks=[unserved], failure_policy="closed",
                         deadline_ms=DEADLINE_MS, reconnect_backoff_ms=BACKOFF_MS,
                         reconnect_backoff_max_ms=BACKOFF_MAX_MS) as client:
            verdict = client.inspect("req-u", unserved, rows(), [0, 1, 2])
    finally:
        server.stop(0)
    assert verdict.action is Action.ABORT
    assert "NOT_FOUND" in verdict.reason and unserved in verdict.reason
    assert f"served hooks: {HOOK}" in verdict.reason
