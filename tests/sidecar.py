"""A real ``guard serve`` process for fault and soak runs (a
:class:`guard.sidecar.process.GuardProcess`): its own config, log, decision log and
(optionally) the fault plugins of :mod:`tests.fault_plugins`, installed the way a user
installs a plugin (a ``.dist-info`` with a ``guard`` entry point on the process's path); and
:func:`refused_start`, a guard that must refuse to start.

Shared by tests/test_faults.py, tests/test_soak.py, bench/soak.py and bench/faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.sidecar.process import GuardProcess, ServeFailed
from tests import fault_plugins

REPO_ROOT = Path(__file__).resolve().parent.parent
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def short_socket(tag: str) -> Path:
    """A Unix socket path under /tmp (socket paths are limited to about 107 bytes)."""
    return Path(f"/tmp/guard-{tag}-{os.getpid()}-{time.monotonic_ns()}.sock")


def install_fault_plugins(site: Path) -> Path:
    """Write the ``.dist-info`` that declares the fault plugins under ``site``; with ``site``
    and the repository root on PYTHONPATH, ``guard serve`` discovers them by entry point."""
    info = site / "guard_fault_plugins-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: guard-fault-plugins\nVersion: 0.0.1\n", encoding="utf-8")
    lines = "".join(f"{name} = {target}\n" for name, target in fault_plugins.ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(f"[guard]\n{lines}", encoding="utf-8")
    return site


def poll(condition: Callable[[], object], timeout: float, what: str,
         interval: float = 0.02) -> None:
    """Wait until ``condition()`` is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def refused_start(folder: Path, sae: Mapping[str, str]) -> str:
    """Start ``guard serve`` serving one SAE entry (``{"path": ..., "sha256": ...}``) that it
    must refuse: it exits with 1 before it is ready and leaves no socket. Its log."""
    socket = folder / "g.sock"
    config = folder / "guard.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": f"unix://{socket}"},
                                      "saes": [dict(sae)]}), encoding="utf-8")
    guard = GuardProcess(config, f"unix://{socket}")
    with pytest.raises(ServeFailed, match="exited with 1 before it was ready"):
        guard.start(60)
    assert not socket.exists()
    return guard.log_text()


class Sidecar(GuardProcess):
    """``guard serve --config FILE`` as a subprocess on a fixed Unix socket, with its own
    config, log and decision log in ``workdir``.

    The socket survives :meth:`kill` (no drain, no cleanup), so :meth:`start` on the same
    object brings a new process up on the same address, as a restarted container would.
    """

    def __init__(self, workdir: Path, config: Mapping[str, Any], *,
                 plugin_site: Path | None = None, tag: str = "fault") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.decision_log = workdir / "decisions.jsonl"
        self.plugin_site = plugin_site
        super().__init__(workdir / "guard.yaml", f"unix://{short_socket(tag)}",
                         log=workdir / "guard.log", cwd=REPO_ROOT)
        self._log_offset = 0
        self.write_config(config)

    # -- configuration ----------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config`` (a mapping) with this sidecar's listen address filled in."""
        data = dict(config)
        server = dict(data.get("server") or {})
        server.setdefault("listen", self.address)
        data["server"] = server
        self.config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    # -- the process ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Sidecar:
        """Start the process and wait until its health service says SERVING."""
        env = dict(os.environ)
        env.pop("GUARD_DISABLE_PLUGIN_AUTOLOAD", None)
        paths = [str(REPO_ROOT)]
        if self.plugin_site is not None:
            paths.insert(0, str(self.plugin_site))
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        self.env = env
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        super().start(timeout)
        return self

    def stop(self, grace: float = 0.0) -> int | None:
        """End whatever is still running (SIGKILL unless ``grace``) and remove the socket;
        idempotent."""
        code = super().stop(grace)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        return code

    # -- what it wrote ----------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def events(self, name: str | None = None, *, current: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines (of the current process only with ``current``), by event name."""
        text = self.log_text()
        if current:
            text = text[self._log_offset:]
        found = []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def wait_event(self, name: str, count: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the log holds ``count`` events called ``name``; the last of them."""
        poll(lambda: len(self.events(name)) >= count, timeout, f"{count} {name!r} log events")
        return self.events(name)[count - 1]

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log's decision records (every line must be valid JSON; the lines that
        close requests, ``"event": "request ended"``, are left out)."""
        if not self.decision_log.exists():
            return []
        text = self.decision_log.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines()]
        return [record for record in records if record.get("event") == "decision"]

    # -- metrics ----------------------------------------------------------------------------

    def metrics_address(self) -> str:
        (event,) = self.events("telemetry", current=True)
        address = event.get("metrics_address")
        assert address, f"the guard serves no /metrics: {event}"
        return str(address)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the Prometheus samples ``name`` whose labels include ``labels``."""
        url = f"http://{self.metrics_address()}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8")
        return sum(value for sample, found, value in parse_prometheus(text)
                   if sample == name and labels.items() <= found.items())


def parse_prometheus(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _METRIC_LINE.match(line)
        if match is None:
            continue
        name, raw_labels, value = match.groups()
        yield name, dict(_LABEL.findall(raw_labels or "")), float(value)


def exactly_once(received: Iterable[str], records: Iterable[Mapping[str, Any]]
                 ) -> tuple[list[str], list[str]]:
    """(missing, duplicated): received decision ids absent from the decision log, and ids the
    log holds more than once."""
    counts = Counter(str(r["decision_id"]) for r in records)
    missing = [d for d in received if counts[d] == 0]
    duplicated = sorted(d for d, n in counts.items() if n > 1)
    return missing, duplicated
