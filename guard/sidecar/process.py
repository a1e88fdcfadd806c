"""``guard serve`` as a child process: start it, wait until it is SERVING, stop it.

One way to run a real guard beside the caller, shared by ``guard demo``, the benches and the
tests that need a process (signals, drains, restarts): the process writes JSON log lines to a
file, readiness is its own health service saying SERVING (what a kubelet probe asks), and
:meth:`GuardProcess.stop` is a SIGTERM drain, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.errors import GuardError

SERVING = health_pb2.HealthCheckResponse.SERVING


class ServeFailed(GuardError):
    """``guard serve`` exited, or was not SERVING in time; the message ends with its log."""

    code = "UNAVAILABLE"


class GuardProcess:
    """``guard serve --config FILE [ARGS]`` whose main listener is ``address``, its output
    appended to ``log`` (default: ``guard.log`` beside the config file). Can be started again
    after it exits or is killed (a restarted container, on the same socket).

    ``env`` is its whole environment (default: this process's at :meth:`start`);
    ``GUARD_LOG_FORMAT=json`` is always set, so the log can be read back line by line.
    """

    def __init__(self, config: Path, address: str, *, args: Sequence[str] = (),
                 log: Path | None = None, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, program: Sequence[str] | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        """``program``: what runs ``serve`` (default ``python -m guard``); ``preexec_fn``: run
        in the child before it starts the program (e.g. to join a cgroup)."""
        self.config = config
        self.address = address
        self.args = tuple(args)
        self.log = log if log is not None else config.parent / "guard.log"
        self.env = env
        self.cwd = cwd
        self.program = tuple(program) if program is not None else (sys.executable, "-m", "guard")
        self.preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None
        #: Exit codes of the processes that ended, oldest first.
        self.exit_codes: list[int] = []
        self._terminated = False

    @property
    def socket(self) -> Path:
        """The socket file of a ``unix://`` address (ValueError for host:port)."""
        if not self.address.startswith("unix://"):
            raise ValueError(f"{self.address}: not a unix:// address")
        return Path(self.address.removeprefix("unix://"))

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 120.0) -> GuardProcess:
        """Start the process and wait until it is SERVING (:meth:`wait_serving`)."""
        if self.running:
            raise RuntimeError(f"guard serve at {self.address} is already running")
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [*self.program, "serve", "--config", str(self.config), *self.args],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, preexec_fn=self.preexec_fn,
                env=dict(os.environ if self.env is None else self.env, GUARD_LOG_FORMAT="json"))
        self._terminated = False
        try:
            self.wait_serving(timeout)
        except ServeFailed:
            self.kill()  # one that never became ready is not left behind
            raise
        return self

    def health(self, address: str | None = None, timeout: float = 1.0) -> int | None:
        """The health service's overall status (a ServingStatus value) at ``address`` (default:
        the main listener); None when it does not answer."""
        with grpc.insecure_channel(address or self.address) as channel:
            try:
                return int(health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout).status)
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Poll the health service until SERVING; ServeFailed with the end of the log when the
        process exits first or ``timeout`` seconds pass."""
        process = self._started()
        deadline = time.monotonic() + timeout
        status: int | None = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServeFailed(f"guard serve exited with {process.returncode} before it was "
                                  f"ready; the end of its log ({self.log}):\n{self.log_tail()}")
            status = self.health()
            if status == SERVING:
                return
            time.sleep(0.05)
        last = "no answer" if status is None else (
            health_pb2.HealthCheckResponse.ServingStatus.Name(status))
        raise ServeFailed(f"guard serve at {self.address} not SERVING after {timeout:g} s (last "
                          f"health answer: {last}); the end of its log ({self.log}):\n"
                          f"{self.log_tail()}")

    def signal(self, signum: int) -> None:
        self._started().send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: the guard drains its streams and exits (see :meth:`wait`)."""
        self.signal(signal.SIGTERM)
        self._terminated = True

    def kill(self) -> None:
        """SIGKILL: no drain, nothing flushed that was not yet, the socket file stays."""
        if self.running:
            process = self._started()
            process.kill()
            self.exit_codes.append(process.wait())

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; its exit code (ServeFailed after ``timeout``)."""
        try:
            code = self._started().wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServeFailed(f"guard serve did not exit within {timeout:g} s; the end of its "
                              f"log ({self.log}):\n{self.log_tail()}") from None
        self.exit_codes.append(code)
        return code

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (once) and up to ``grace`` seconds to drain, then SIGKILL (at once when
        ``grace`` is 0); the exit code, None when it never ran. Idempotent."""
        if self.process is None:
            return None
        if self.running:
            if grace > 0:
                if not self._terminated:  # a second SIGTERM stops the guard without drain
                    self.terminate()
                try:
                    return self.wait(grace)
                except ServeFailed:
                    pass
            self.kill()
        return self.process.returncode

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"guard serve at {self.address} was never started")
        return self.process

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def __enter__(self) -> GuardProcess:
        return self.start() if not self.running else self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
