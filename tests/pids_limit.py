"""A pids cgroup for one ``guard serve``: a pod's limit on tasks (processes and threads), as
Kubernetes sets it, on this machine.

cgroup v1 (``/sys/fs/cgroup/pids``) or v2 (a ``pids`` controller under ``/sys/fs/cgroup``);
creating one needs root, as in CI here. The child joins it before it runs anything
(:meth:`PidsCgroup.join`, a ``preexec_fn``), so every thread it ever starts counts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from types import TracebackType

_numbers = itertools.count()


def _root() -> Path | None:
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "tasks").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "pids" in controllers.read_text().split():
        return v2
    return None


def available() -> str | None:
    """None when a pids cgroup can be made here; else why not."""
    root = _root()
    if root is None:
        return "no pids cgroup controller is mounted"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (creating a cgroup needs root)"
    return None


class PidsCgroup:
    """A fresh pids cgroup with no limit until :meth:`limit`; removed on exit (its tasks
    killed first)."""

    def __init__(self) -> None:
        why = available()
        if why is not None:
            raise RuntimeError(f"cannot limit the guard's tasks: {why}")
        root = _root()
        assert root is not None
        self.path = root / f"guard-test-{os.getpid()}-{next(_numbers)}"
        self.path.mkdir()

    def join(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: runs in the child)."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    @property
    def current(self) -> int:
        """Tasks (processes and threads) in the cgroup now."""
        return int((self.path / "pids.current").read_text())

    def peak(self) -> int:
        """The most tasks the cgroup held at once (``pids.peak``; the current count on kernels
        without it)."""
        path = self.path / "pids.peak"
        return int(path.read_text()) if path.exists() else self.current

    def limit(self, tasks: int | None) -> None:
        """At most ``tasks`` tasks (None: no limit)."""
        (self.path / "pids.max").write_text("max" if tasks is None else str(tasks))

    def refused(self) -> int:
        """How many task starts the limit refused (``pids.events`` max)."""
        for line in (self.path / "pids.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.path.exists() and time.monotonic() < deadline:
            try:
                self.path.rmdir()
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> PidsCgroup:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
