"""A real ``guard serve`` process for fault and soak runs: its own config, log, decision log
and (optionally) the fault plugins of :mod:`tests.fault_plugins`, installed the way a user
installs a plugin (a ``.dist-info`` with a ``guard`` entry point on the process's path).

Shared by tests/test_faults.py, tests/test_soak.py, bench/soak.py and bench/faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


class Sidecar:
    """``guard serve --config FILE`` as a subprocess on a fixed Unix socket.

    The socket survives :meth:`kill` (no drain, no cleanup), so :meth:`start` on the same
    object brings a new process up on the same address, as a restarted container would.
    """

    def __init__(self, workdir: Path, config: Mapping[str, Any], *,
                 plugin_site: Path | None = None, tag: str = "fault") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket = short_socket(tag)
        self.address = f"unix://{self.socket}"
        self.config_path = workdir / "guard.yaml"
        self.decision_log = workdir / "decisions.jsonl"
        self.log = workdir / "guard.log"
        self.plugin_site = plugin_site
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self.write_config(config)

    # -- configuration ----------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config`` (a mapping) with this sidecar's listen address filled in."""
        data = dict(config)
        server = dict(data.get("server") or {})
        server.setdefault("listen", self.address)
        data["server"] = server
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    # -- the process ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until its health service says SERVING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = dict(os.environ, GUARD_LOG_FORMAT="json")
        env.pop("GUARD_DISABLE_PLUGIN_AUTOLOAD", None)
        paths = [str(REPO_ROOT)]
        if self.plugin_site is not None:
            paths.insert(0, str(self.plugin_site))
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        if self._log_file is not None:
            self._log_file.close()
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--config", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
        self.wait_serving(timeout)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def health(self, address: str | None = None, timeout: float = 2.0) -> int | None:
        """The health service's status (a ServingStatus value), or None when unreachable."""
        with grpc.insecure_channel(address or self.address) as channel:
            try:
                return int(health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout).status)
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 60.0) -> None:
        process = self.process
        assert process is not None

        def serving() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"guard serve exited with {process.returncode}:\n"
                                     f"{self.log_text()[-4000:]}")
            return (self.socket.exists()
                    and self.health() == health_pb2.HealthCheckResponse.SERVING)

        poll(serving, timeout, f"guard serve at {self.address} to be SERVING", 0.05)

    def kill(self) -> None:
        """SIGKILL: no drain, nothing flushed that was not yet, the socket file stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.exit_codes.append(self.process.wait())

    def terminate(self) -> None:
        """SIGTERM: the guard drains (see :meth:`wait`)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"guard serve did not exit within {timeout:g} s; the end of "
                                 f"its log:\n{self.log_text()[-3000:]}") from None
        self.exit_codes.append(code)
        return code

    def stop(self) -> None:
        """End whatever is still running (SIGKILL) and close the log; idempotent."""
        self.kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

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
        """The decision log's records (every line must be valid JSON)."""
        if not self.decision_log.exists():
            return []
        text = self.decision_log.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]

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
