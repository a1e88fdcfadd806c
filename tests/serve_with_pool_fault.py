"""``guard serve`` whose gRPC worker pool refuses new calls once a trigger file exists, the way
grpcio's ``ThreadPoolExecutor`` refused them when a pids limit stopped it starting a thread:
``RuntimeError: can't start new thread`` raised inside grpcio's serving loop, which then dies.

The guard's own pool starts every thread at start-up, so a pids limit can no longer do this;
tests/test_watchdog.py uses this program to check that a dead gRPC loop, whatever kills it,
ends the process (status 70, one log line) instead of leaving it alive and deaf.

Usage: GUARD_TEST_POOL_FAULT=/path/trigger python tests/serve_with_pool_fault.py serve ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from guard.cli import main
from guard.sidecar import threads

TRIGGER = Path(os.environ["GUARD_TEST_POOL_FAULT"])
_submit = threads.StartedPool.submit


def _refusing_submit(self: threads.StartedPool, fn: Callable[..., Any], /, *args: Any,
                     **kwargs: Any) -> futures.Future[Any]:
    if self.threads and self.threads[0].name.startswith("guard-rpc") and TRIGGER.exists():
        raise RuntimeError("can't start new thread")
    return _submit(self, fn, *args, **kwargs)


threads.StartedPool.submit = _refusing_submit  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
