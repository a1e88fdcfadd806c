"""Out-of-tree plugins that misbehave on purpose, for the fault-injection suite.

A real ``guard serve`` process loads them the way it loads anyone's plugin: through the
``guard`` entry-point group (:func:`tests.sidecar.install_fault_plugins` writes the
``.dist-info`` that declares them). Each is driven from the test through files and request
ids, since the test and the sidecar are different processes:

- ``hanging``: ``guard_detect`` blocks on batches whose request id starts with ``trigger``
  (default ``hang-``) until the file ``release`` exists;
- ``crashing``: ``guard_detect`` and ``guard_record`` raise on batches whose request id
  starts with ``trigger`` (default ``crash-``), with a message quoting the batch's token ids
  (as a careless plugin's would: the guard must not pass it on by default);
- ``exiting``: ``guard_detect`` raises ``exception`` (``SystemExit``, the default, or
  ``KeyboardInterrupt``) on batches whose request id starts with ``trigger`` (default
  ``exit-``);
- ``slow_sink``: ``guard_record`` touches ``entered`` on its first record, then blocks every
  record until the file ``release`` exists, or sleeps ``delay_ms`` over each (a sink that
  cannot keep up).

This module imports only guard's public plugin API, as a user's plugin would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard import ConfigError, Decision, FeatureBatch, Finding, hookimpl

#: How long a blocked call waits for its release file at most (a test that forgets to
#: release must not leave a sidecar stuck forever).
MAX_BLOCK_SECONDS = 60.0


def _wait_for(path: Path | None, limit: float = MAX_BLOCK_SECONDS) -> None:
    deadline = time.monotonic() + limit
    while path is not None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _path(settings: Mapping[str, Any], key: str) -> Path | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "a file path", value)
    return Path(value)


def _trigger(settings: Mapping[str, Any], default: str) -> str:
    value = settings.get("trigger", default)
    if not isinstance(value, str):
        raise ConfigError("trigger", "a request id prefix", value)
    return value


class Hanging:
    """A detector that hangs on ``trigger`` batches until ``release`` exists."""

    def __init__(self) -> None:
        self.trigger = "hang-"
        self.release: Path | None = None

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.trigger = _trigger(settings, "hang-")
        self.release = _path(settings, "release")

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if batch.request_id.startswith(self.trigger):
            _wait_for(self.release)
        return []


class Crashing:
    """A detector and sink that raises on ``trigger`` batches."""

    def __init__(self) -> None:
        self.trigger = "crash-"

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.trigger = _trigger(settings, "crash-")

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if batch.request_id.startswith(self.trigger):
            tokens = [] if batch.token_ids is None else [int(t) for t in batch.token_ids]
            raise RuntimeError(f"injected crash on {batch.request_id} (token ids {tokens})")
        return []

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        if decision.request_id.startswith(self.trigger):
            raise OSError(f"injected sink failure on {decision.request_id}")


#: The exceptions ``exiting`` may raise (BaseExceptions that are not Exceptions).
EXIT_EXCEPTIONS: dict[str, type[BaseException]] = {"SystemExit": SystemExit,
                                                   "KeyboardInterrupt": KeyboardInterrupt}


class Exiting:
    """A detector that raises ``SystemExit`` or ``KeyboardInterrupt`` on ``trigger`` batches."""

    def __init__(self) -> None:
        self.trigger = "exit-"
        self.exception: type[BaseException] = SystemExit

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.trigger = _trigger(settings, "exit-")
        name = settings.get("exception", "SystemExit")
        if name not in EXIT_EXCEPTIONS:
            raise ConfigError("exception", " or ".join(EXIT_EXCEPTIONS), name)
        self.exception = EXIT_EXCEPTIONS[name]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if batch.request_id.startswith(self.trigger):
            raise self.exception(f"injected {self.exception.__name__} on {batch.request_id}")
        return []


class SlowSink:
    """A sink that blocks on every record until ``release`` exists, or (``delay_ms``) takes
    that long over each record."""

    def __init__(self) -> None:
        self.entered: Path | None = None
        self.release: Path | None = None
        self.delay_s = 0.0

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.entered = _path(settings, "entered")
        self.release = _path(settings, "release")
        delay = settings.get("delay_ms", 0)
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ConfigError("delay_ms", "milliseconds per record (>= 0)", delay)
        self.delay_s = delay / 1000

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        if self.entered is not None and not self.entered.exists():
            self.entered.write_text(decision.decision_id, encoding="utf-8")
        _wait_for(self.release)
        time.sleep(self.delay_s)


#: Entry-point name -> ``module:attribute``, as the generated ``entry_points.txt`` lists them.
ENTRY_POINTS = {
    "hanging": f"{__name__}:Hanging",
    "crashing": f"{__name__}:Crashing",
    "exiting": f"{__name__}:Exiting",
    "slow_sink": f"{__name__}:SlowSink",
}
