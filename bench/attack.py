"""The attack suite: a buggy host or a hostile neighbour against a real ``guard serve``.

Each case re-runs one finding of issues 19 ("Hold under attack") and 21 ("Alive but deaf")
against its own ``guard serve`` (loopback and Unix sockets only; in a pids or memory cgroup
where the case needs a pod's limits and the machine lets root make one), and says whether the
guard **held** (it did what the docs promise), was **weak** (it survived, with a stated
degradation) or was **broken** (it died, went deaf, lost accepted records, leaked what it must
not, or let one peer take what belongs to all).

    python -m bench.attack [--quick] [--case NAME ...] [--write-results]

``--quick`` runs the cases that take a few seconds each; ``tests/test_bench_attack.py`` runs
those in ``make test``. Results: ``bench/out/attack.json`` and, with ``--write-results``, the
attack section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import yaml

from bench._stats import machine, markdown_table, write_section
from guard.sidecar.process import GuardProcess, ServeFailed
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from tests import pids_limit
from tests.sae_fixtures import write_saelens
from tests.sidecar import REPO_ROOT, Sidecar, install_fault_plugins, short_socket

Verdict = Literal["held", "weak", "broken"]
OUT = Path(__file__).resolve().parent / "out" / "attack.json"
HOOK = "blocks.6.hook_resid_post"
D_IN, D_SAE = 16, 64
DIED = "a part of the guard died; exiting so that it is restarted"


@dataclass
class Outcome:
    case: str
    finding: str
    verdict: Verdict
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Case:
    name: str
    finding: str
    quick: bool
    run: Callable[[Path], tuple[Verdict, str]]


CASES: dict[str, Case] = {}


def case(name: str, finding: str, *, quick: bool = True
         ) -> Callable[[Callable[[Path], tuple[Verdict, str]]],
                       Callable[[Path], tuple[Verdict, str]]]:
    def register(run: Callable[[Path], tuple[Verdict, str]]
                 ) -> Callable[[Path], tuple[Verdict, str]]:
        CASES[name] = Case(name, finding, quick, run)
        return run
    return register


# -- the guard under attack ---------------------------------------------------------------------

_SITE: Path | None = None
_SAE: Path | None = None


def plugin_site() -> Path:
    global _SITE
    if _SITE is None:
        _SITE = install_fault_plugins(Path(tempfile.mkdtemp(prefix="guard-attack-plugins-")))
    return _SITE


def sae() -> Path:
    global _SAE
    if _SAE is None:
        _SAE = write_saelens(Path(tempfile.mkdtemp(prefix="guard-attack-sae-")) / "sae", D_IN,
                             D_SAE, hook_name=HOOK)
    return _SAE


def config(workdir: Path, *, plugins: tuple[str, ...] = (), plugin_config: dict[str, Any]
           | None = None, server: dict[str, Any] | None = None, detector: str = "flag",
           **sections: Any) -> dict[str, Any]:
    """A guard with a detector on feature 1 (``detector``: its action; threshold below every
    score, so it always fires), the decision log, /metrics, and ``plugins``."""
    settings: dict[str, Any] = {
        "detectors": {"always": {"hook": HOOK, "features": [1], "threshold": -1e9,
                                 "action": detector}},
        "decision_log": {"path": str(workdir / "decisions.jsonl")},
        **(plugin_config or {}),
    }
    return {
        "server": {"health_listen": "127.0.0.1:0", "drain_grace_seconds": 2,
                   **(server or {})},
        "logging": {"level": "info"},
        "saes": [{"path": str(sae())}],
        "plugins": {"enabled": ["detectors", "decision_log", *plugins],
                    "watch_interval_seconds": 0, **sections.pop("plugins_section", {}),
                    "config": settings},
        "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False},
        **sections,
    }


@contextlib.contextmanager
def running(workdir: Path, settings: dict[str, Any], *, preexec: Callable[[], object]
            | None = None) -> Iterator[Sidecar]:
    guard = Sidecar(workdir, settings, plugin_site=plugin_site(), tag="attack")
    guard.preexec_fn = preexec
    guard.start()
    try:
        yield guard
    finally:
        guard.stop(5.0)


def batch(request_id: str = "req", rows: int = 3, sequence: int = 1) -> pb.ActivationBatch:
    values = np.random.default_rng(sequence).normal(size=(rows, D_IN)).astype(np.float32)
    shape, raw = codec.encode(values, "F32")
    return pb.ActivationBatch(request_id=request_id, sequence=sequence, hook=HOOK,
                              activations=pb.Tensor(datatype="F32", shape=shape, raw=raw),
                              positions=list(range(rows)), phase=pb.PHASE_PROMPT)


class Stream:
    """One Inspect stream, message by message."""

    def __init__(self, channel: grpc.Channel, timeout: float = 60.0) -> None:
        import queue

        self._requests: queue.Queue[pb.InspectRequest | None] = queue.Queue()
        self.call = pb_grpc.GuardStub(channel).Inspect(iter(self._requests.get, None),
                                                       timeout=timeout)
        self._replies = iter(self.call)
        self.send(pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE,
                                                           hooks=[HOOK])))

    def send(self, request: pb.InspectRequest) -> None:
        self._requests.put(request)

    def ask(self, message: pb.ActivationBatch) -> pb.InspectResponse:
        self.send(pb.InspectRequest(batch=message))
        return next(self._replies)

    def ended_with(self, code: grpc.StatusCode) -> bool:
        """Whether the stream has ended, with ``code``."""
        call: Any = self.call  # a grpc.Call too
        return bool(call.done() and call.code() == code)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()  # type: ignore[no-untyped-call]


def ask(address: str, message: pb.ActivationBatch | None = None, timeout: float = 10.0
        ) -> pb.InspectResponse | grpc.RpcError | None:
    """One batch on a fresh stream: its reply, the RPC error, or None when unanswered."""
    got: list[pb.InspectResponse | grpc.RpcError] = []

    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            stream = Stream(channel, timeout=timeout + 5)
            try:
                got.append(stream.ask(message or batch()))
            except grpc.RpcError as exc:
                got.append(exc)
            stream.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return got[0] if got else None


def answered(guard: GuardProcess, timeout: float = 10.0) -> bool:
    return isinstance(ask(guard.address, timeout=timeout), pb.InspectResponse)


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/PID/status (``Threads``; ``VmRSS``/``VmHWM`` in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def health_address(guard: Sidecar) -> str:
    return str(guard.wait_event("listening")["health"])


def alive_and_deaf(guard: Sidecar, watch_s: float = 12.0) -> str | None:
    """None when the guard kept answering Inspect or exited non-zero with the watchdog's
    line within the watch; else what it did (alive, unanswering)."""
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        if not guard.running:
            code = guard.wait(1)
            return None if code != 0 and guard.events(DIED) else f"exited {code} silently"
        if not answered(guard):
            try:
                code = guard.wait(15)
            except ServeFailed:
                return "alive, Inspect unanswered for 25 s"
            return None if code != 0 and guard.events(DIED) else f"exited {code} silently"
        time.sleep(0.5)
    return None


def outcome_of_death(guard: Sidecar) -> str:
    died = guard.events(DIED)
    return (f"exited {guard.exit_codes[-1] if guard.exit_codes else '?'} "
            f"({died[0]['part']}: {died[0]['reason']})" if died else "exited")


# -- 19.1 legal batches and memory ---------------------------------------------------------------

@case("three maximum-size batches at once", "19.1", quick=False)
def three_max_batches(workdir: Path) -> tuple[Verdict, str]:
    from guard.demo.runner import demo_config  # the demo's real SAE: d_model 576

    settings = yaml.safe_load(demo_config(workdir, short_socket("attack")).read_text(
        encoding="utf-8"))
    settings["server"]["health_listen"] = "127.0.0.1:0"
    del settings["server"]["listen"]  # the Sidecar's own
    limit = 2 << 30  # the chart's memory limit
    with memory_cgroup(limit) as join, running(workdir, settings, preexec=join) as guard:
        rows = (32 << 20) // (576 * 4) - 1
        hook = "blocks.15.hook_resid_post"
        values = np.random.default_rng(0).normal(size=(rows, 576)).astype(np.float32)
        shape, raw = codec.encode(values, "F32")
        message = pb.ActivationBatch(request_id="big", sequence=1, hook=hook,
                                     activations=pb.Tensor(datatype="F32", shape=shape,
                                                           raw=raw),
                                     positions=list(range(rows)), phase=pb.PHASE_PROMPT)
        replies: list[object] = []

        def one() -> None:
            with grpc.insecure_channel(guard.address, options=[
                    ("grpc.max_send_message_length", 64 << 20),
                    ("grpc.max_receive_message_length", 64 << 20)]) as channel:
                stream = pb_grpc.GuardStub(channel).Inspect(iter([
                    pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE,
                                                             hooks=[hook])),
                    pb.InspectRequest(batch=message)]), timeout=300)
                try:
                    replies.extend(stream)
                except grpc.RpcError as exc:
                    replies.append(exc)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        if not guard.running:
            return "broken", (f"the guard died under a {limit >> 20} MiB limit: "
                              f"{guard.log_tail(300)}")
        peak = proc_status(guard.pid, "VmHWM") << 10
        refused = [r for r in replies if isinstance(r, grpc.RpcError) or (
            isinstance(r, pb.InspectResponse) and r.HasField("error"))]
        small = np.random.default_rng(1).normal(size=(4, 576)).astype(np.float32)
        shape, raw = codec.encode(small, "F32")
        probe = pb.ActivationBatch(request_id="after", sequence=1, hook=hook,
                                   activations=pb.Tensor(datatype="F32", shape=shape, raw=raw),
                                   positions=list(range(4)), phase=pb.PHASE_PROMPT)
        with grpc.insecure_channel(guard.address) as channel:
            after = list(pb_grpc.GuardStub(channel).Inspect(iter([
                pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE, hooks=[hook])),
                pb.InspectRequest(batch=probe)]), timeout=60))
        still = len(after) == 1 and not after[0].HasField("error")
    detail = (f"peak RSS {peak / 2**20:.0f} MiB under a {limit >> 20} MiB cgroup; "
              f"{len(replies) - len(refused)} answered, {len(refused)} refused"
              + (f" ({_describe(refused[0])[:120]})" if refused else ""))
    if not still:
        return "broken", detail + "; then stopped answering"
    return ("held" if peak < 1536 << 20 else "weak"), detail


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Callable[[], object] | None]:
    """A memory cgroup of ``limit`` bytes to put the guard in (None where none can be made)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "tasks").exists() or not os.access(root, os.W_OK):
        yield None
        return
    path = root / f"guard-attack-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(limit))

    def join() -> None:
        (path / "cgroup.procs").write_text(str(os.getpid()))

    try:
        yield join
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# -- 19.2 blocking plugins -----------------------------------------------------------------------

@case("eight hanging plugin calls", "19.2")
def hanging_plugins(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir, plugins=("hanging",), detector="abort",
                      plugin_config={"hanging": {"release": str(workdir / "release")}},
                      plugins_section={"failure_mode": "open", "timeout_ms": 200})
    with running(workdir, settings) as guard:
        channel = grpc.insecure_channel(guard.address)
        stuck = [Stream(channel) for _ in range(8)]
        try:
            for number, stream in enumerate(stuck):
                stream.send(pb.InspectRequest(batch=batch(f"hang-{number}")))
            time.sleep(1.0)
            replies = [ask(guard.address, batch(f"other-{n}", sequence=n)) for n in range(8)]
        finally:
            (workdir / "release").touch()
            for stream in stuck:
                stream.close()
            channel.close()
        decided = [r for r in replies if isinstance(r, pb.InspectResponse)]
        aborted = sum(r.action == pb.ACTION_ABORT for r in decided)
        reasons = {r.details or pb.Action.Name(r.action) for r in decided
                   if r.action != pb.ACTION_ABORT}
        named = "hanging" in guard.log_text()
    detail = (f"{aborted} of {len(replies)} batches of other streams aborted by the "
              f"always-abort detector while 8 calls hung"
              + (f"; others: {sorted(reasons)}" if reasons else "")
              + ("; the stuck plugin is named in the log" if named else ""))
    if aborted == len(replies):
        return ("held" if named else "weak"), detail
    return "broken", detail


# -- 19.3, 19.4 config reloads -------------------------------------------------------------------

def _reload_case(workdir: Path, text: str, *, stream_open: bool) -> tuple[Verdict, str]:
    settings = config(workdir)
    with running(workdir, settings) as guard:
        channel = grpc.insecure_channel(guard.address)
        stream = Stream(channel) if stream_open else None
        try:
            if stream is not None:
                stream.ask(batch("open"))
            good = guard.config.read_text(encoding="utf-8")
            guard.config.write_text(text, encoding="utf-8")
            guard.signal(signal.SIGHUP)
            time.sleep(1.0)
            if not guard.running:
                return "broken", f"the guard exited {guard.wait(1)} on the reload"
            rejected = guard.events("config reload rejected; the previous configuration "
                                    "stays in force")
            works = answered(guard)
            rss = proc_status(guard.pid, "VmRSS") >> 10
            guard.config.write_text(good.replace("-1000000000.0", "-999999999.0"),
                                    encoding="utf-8")
            guard.signal(signal.SIGHUP)
            time.sleep(1.0)
            applied = bool(guard.events("config reloaded"))
        finally:
            if stream is not None:
                stream.close()
            channel.close()
        guard.stop(10.0)
        drained = guard.exit_codes[-1:] == [0]
    detail = (f"rejected: {bool(rejected)}, serving after: {works}, a valid reload then "
              f"applied: {applied}, RSS {rss} MiB, SIGTERM drain exit 0: {drained}")
    return ("held" if rejected and works and applied and drained and rss < 1024 else "broken",
            detail)


@case("reload: 600 nested brackets", "19.3")
def reload_nested(workdir: Path) -> tuple[Verdict, str]:
    return _reload_case(workdir, "plugins: " + "[" * 600, stream_open=True)


@case("reload: a 5,000-digit integer", "19.3")
def reload_bigint(workdir: Path) -> tuple[Verdict, str]:
    return _reload_case(workdir, "plugins:\n  timeout_ms: " + "9" * 5000 + "\n",
                        stream_open=False)


@case("reload: billion laughs", "19.4")
def reload_laughs(workdir: Path) -> tuple[Verdict, str]:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("plugins:\n  config: *i")
    return _reload_case(workdir, "\n".join(lines) + "\n", stream_open=True)


@case("reload: an empty file", "19 (weak)")
def reload_empty(workdir: Path) -> tuple[Verdict, str]:
    return _reload_case(workdir, "", stream_open=False)


# -- 19.5 the metrics endpoint ---------------------------------------------------------------------

@case("/metrics slowloris: 400 half-sent requests", "19.5")
def metrics_slowloris(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir, config(workdir)) as guard:
        host, port = guard.metrics_address().rsplit(":", 1)
        before = proc_status(guard.pid, "Threads")
        held: list[socket.socket] = []
        try:
            for _ in range(400):
                try:
                    conn = socket.create_connection((host, int(port)), timeout=5)
                    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: guard\r\n")
                    held.append(conn)
                except OSError:
                    break
            time.sleep(0.5)
            during = proc_status(guard.pid, "Threads")
            works = answered(guard)
            scrape = _scrape(host, int(port))
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.5)
        after_ok = answered(guard)
    detail = (f"{len(held)} half-sent requests held open; guard threads {before} -> {during}; "
              f"Inspect answered during: {works}, after: {after_ok}; a real scrape during: "
              f"{scrape}")
    if not (works and after_ok):
        return "broken", detail
    return ("held" if during - before <= 8 and scrape else "weak"), detail


def _scrape(host: str, port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            return b"guard" in response.read()
    except OSError:
        return False


# -- 19.6, 19.7 the doorbell ---------------------------------------------------------------------

def _doorbell_config(workdir: Path, max_rpcs: int = 64) -> dict[str, Any]:
    return config(workdir, server={"shared_memory": {"enabled": True},
                                   "max_concurrent_rpcs": max_rpcs})


@case("doorbell: 30 connections announcing 64 MiB frames", "19.6")
def doorbell_big_frames(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir, _doorbell_config(workdir)) as guard:
        path = str(guard.socket) + ".doorbell"
        before = proc_status(guard.pid, "VmRSS")
        held = []
        try:
            for _ in range(30):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(path)
                conn.sendall(struct.pack("<I", 64 << 20) + b"x" * 16)
                held.append(conn)
            time.sleep(1.0)
            grown = (proc_status(guard.pid, "VmRSS") - before) >> 10
            works = guard.running and answered(guard)
        finally:
            for conn in held:
                conn.close()
    detail = f"RSS grew {grown} MiB for 30 connections that sent 600 bytes in all"
    if not works:
        return "broken", detail + "; the guard stopped answering"
    return ("held" if grown < 100 else "broken"), detail


@case("doorbell: 300 refused connections", "19.7")
def doorbell_refused(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir, _doorbell_config(workdir, max_rpcs=4)) as guard:
        path = str(guard.socket) + ".doorbell"
        before = proc_status(guard.pid, "Threads")
        held = []
        peak = before
        try:
            for _ in range(304):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.connect(path)
                except OSError:
                    conn.close()
                    continue
                held.append(conn)
                peak = max(peak, proc_status(guard.pid, "Threads"))
            time.sleep(0.5)
            peak = max(peak, proc_status(guard.pid, "Threads"))
            works = guard.running and answered(guard)
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.settimeout(5)
            late.connect(path)  # the acceptor is alive: it accepts (and refuses) this one
            late.close()
        finally:
            for conn in held:
                conn.close()
    detail = f"{len(held)} connections; guard threads {before} -> at most {peak}"
    if not works:
        return "broken", detail + "; the guard stopped answering"
    return ("held" if peak - before <= 4 + 4 else "broken"), detail


# -- weaker findings of 19 ------------------------------------------------------------------------

@case("64 idle streams from one peer", "19 (weak)")
def idle_streams(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir, server={"max_concurrent_rpcs": 64, "max_streams_per_peer": 32,
                                       "stream_idle_seconds": 3, "tcp_listen": "127.0.0.1:0"})
    with running(workdir, settings) as guard:
        tcp = str(guard.wait_event("listening")["addresses"][1])
        channel = grpc.insecure_channel(guard.address)
        idle = [Stream(channel, timeout=120) for _ in range(64)]
        try:
            time.sleep(1.0)
            refused = sum(stream.ended_with(grpc.StatusCode.RESOURCE_EXHAUSTED)
                          for stream in idle)
            health = guard.health(timeout=5)
            other_peer = isinstance(ask(tcp), pb.InspectResponse)
            time.sleep(4.0)  # past server.stream_idle_seconds
            ended = sum(stream.ended_with(grpc.StatusCode.UNAVAILABLE) for stream in idle)
            same_peer = answered(guard)
        finally:
            for stream in idle:
                stream.close()
            channel.close()
    detail = (f"{refused} of 64 refused by the per-peer cap (32); main-socket health answered: "
              f"{health is not None}; a host on another peer served: {other_peer}; "
              f"{ended} idle streams ended after 3 s; then a new host on the same peer served: "
              f"{same_peer}")
    held = refused == 32 and health is not None and other_peer and ended == 32 and same_peer
    return ("held" if held else "broken"), detail


@case("a plugin raising SystemExit", "19 (weak)")
def plugin_system_exit(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir, plugins=("exiting",))
    with running(workdir, settings) as guard:
        reply = ask(guard.address, batch("exit-1"))
        works = answered(guard)
    detail = f"reply: {_describe(reply)}; serving after: {works}"
    return ("held" if isinstance(reply, pb.InspectResponse) and works else "broken"), detail


@case("a slow second sink (40 ms per record)", "19 (weak)")
def slow_sink(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir, plugins=("slow_sink",),
                      plugin_config={"slow_sink": {"delay_ms": 40}})
    with running(workdir, settings) as guard:
        with grpc.insecure_channel(guard.address) as channel:
            stream = Stream(channel)
            sent = 0
            for number in range(400):
                stream.ask(batch(f"req-{number}", sequence=number + 1))
                sent += 1
            stream.close()
        guard.stop(20.0)
        logged = len(guard.decisions())
    detail = f"{logged} of {sent} decisions in the decision log after a SIGTERM drain"
    return ("held" if logged == sent else "broken"), detail


@case("a full disk under the decision log", "19 (weak)")
def full_disk(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir)
    settings["plugins"]["config"]["decision_log"]["path"] = "/dev/full"  # ENOSPC on write
    with running(workdir, settings) as guard:
        works = all(answered(guard) for _ in range(30))
        time.sleep(1.0)
        failed = _metric(guard, "guard_records_failed_total", 'guard_plugin_name="decision_log"')
        lines = sum('"plugin failed"' in line for line in guard.log_text().splitlines())
        alive = guard.running
    detail = (f"serving: {works and alive}; records lost and counted for the decision log: "
              f"{failed:g} of 30; 'plugin failed' log lines: {lines}")
    held = works and alive and failed == 30 and lines <= 10
    return ("held" if held else "weak" if works and alive else "broken"), detail


def _metric(guard: Sidecar, name: str, label: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{guard.metrics_address()}/metrics",
                                timeout=10) as response:
        text = response.read().decode("utf-8")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


@case("a plugin's exception text", "19 (weak)")
def exception_text(workdir: Path) -> tuple[Verdict, str]:
    settings = config(workdir, plugins=("crashing",))
    with running(workdir, settings) as guard:
        reply = ask(guard.address, batch("crash-2"))
        time.sleep(0.5)
        if isinstance(reply, pb.InspectResponse):
            guard.events()  # the log is read after the drain
        guard.stop(10.0)
        where = [name for name, text in (
            ("reply", str(reply)), ("log", guard.log_text()),
            ("decision log", guard.decision_log.read_text(encoding="utf-8")
             if guard.decision_log.exists() else ""))
            if "injected crash on crash-2" in text or "injected sink failure on crash-2" in text]
    detail = ("the exception's text reached: " + ", ".join(where)) if where else (
        "the exception's text reached no reply, log or record (its type did)")
    return ("broken" if where else "held"), detail


@case("activation values in the encode-overflow error", "19 (weak)")
def overflow_values(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir, config(workdir)) as guard:
        values = np.full((2, D_IN), 3.0e38, dtype=np.float32)
        values[1, 3] = 1.2345678e37
        shape, raw = codec.encode(values, "F32")
        message = pb.ActivationBatch(request_id="big-values", sequence=1, hook=HOOK,
                                     activations=pb.Tensor(datatype="F32", shape=shape, raw=raw),
                                     positions=[0, 1], phase=pb.PHASE_PROMPT)
        reply = ask(guard.address, message)
        text = _describe(reply) + guard.log_text()
    leaked = any(token in text for token in ("3e+38", "3.0e+38", "3e38", "1.23e+37", "1.2345"))
    refused = isinstance(reply, grpc.RpcError) or (
        isinstance(reply, pb.InspectResponse) and reply.HasField("error"))
    detail = f"refused: {refused}; a value in the error or log: {leaked}"
    return ("held" if refused and not leaked else "broken"), detail


@case("a second guard on a live socket", "19 (weak)")
def live_socket(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir / "first", config(workdir / "first")) as first:
        folder = workdir / "second"
        folder.mkdir()
        settings = config(folder)
        settings["server"]["listen"] = first.address
        (folder / "guard.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
        second = GuardProcess(folder / "guard.yaml", first.address, cwd=REPO_ROOT)
        # Its health check would reach the first guard: wait for the process instead.
        with contextlib.suppress(ServeFailed):
            second.start(30)
        try:
            code: int | None = second.wait(60)
        except ServeFailed:
            code = None
        finally:
            GuardProcess.stop(second, 0)  # never unlink the first guard's socket
        first_ok = answered(first)
        message = second.log_tail(1000)
    took = code is None
    detail = (f"the second guard {'took the socket' if took else f'exited {code}'}; the first "
              f"still answers: {first_ok}")
    held = not took and code == 1 and first_ok and "live" in message
    return ("held" if held else "broken"), detail


def _config_refused(workdir: Path, settings: dict[str, Any], key: str) -> tuple[Verdict, str]:
    path = workdir / "guard.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    import subprocess

    done = subprocess.run([sys.executable, "-m", "guard", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          check=False)
    named = key in done.stderr
    detail = f"`guard config check` exit {done.returncode}; names {key}: {named}"
    return ("held" if done.returncode != 0 and named else "broken"), detail


@case("a world-connectable socket mode", "19 (weak)")
def world_socket(workdir: Path) -> tuple[Verdict, str]:
    return _config_refused(workdir, {"server": {"socket_mode": "0777"}}, "server.socket_mode")


@case("max_message_bytes of 1 TiB", "19 (weak)")
def huge_message_limit(workdir: Path) -> tuple[Verdict, str]:
    return _config_refused(workdir, {"server": {"max_message_bytes": 1 << 40}},
                           "server.max_message_bytes")


@case("a zip bomb behind a wrong pin", "19 (weak)", quick=False)
def zip_bomb(workdir: Path) -> tuple[Verdict, str]:
    folder = workdir / "bomb"
    folder.mkdir(parents=True)
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (32768, 16384), }"
    header = text.ljust(128 - 10 - 1).encode() + b"\n"  # npy 1.0: 10 bytes, then the header
    with zipfile.ZipFile(folder / "params.npz", "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("W_enc.npy", "w", force_zip64=True) as member:
        member.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
        chunk = b"\0" * (1 << 20)
        for _ in range(2048):  # 2 GiB of zeros, about 2 MB deflated
            member.write(chunk)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 16384, "d_sae": 32768,
                                                 "hook_name": HOOK}), encoding="utf-8")
    settings = config(workdir)
    settings["saes"] = [{"path": str(folder), "sha256": "0" * 64}]
    guard = Sidecar(workdir / "run", settings, plugin_site=plugin_site(), tag="attack")
    peak = 0
    try:
        guard.start(60)
        started = True
    except ServeFailed:
        started = False
    finally:
        with contextlib.suppress(Exception):
            peak = proc_status(guard.pid, "VmHWM") >> 10 if guard.running else 0
        guard.stop()
    log = guard.log_text()
    pin = "sha256" in log
    detail = (f"start-up refused: {not started}; the pin named: {pin}; "
              f"oom or traceback: {'Traceback' in log or guard.exit_codes[-1:] == [-9]}")
    del peak
    return ("held" if not started and pin and "Traceback" not in log else "broken"), detail


@case("an 8 MiB request id", "19 (weak)")
def huge_request_id(workdir: Path) -> tuple[Verdict, str]:
    with running(workdir, config(workdir, server={"max_message_bytes": 32 << 20})) as guard:
        reply = ask(guard.address, batch("x" * (8 << 20)))
        log_size = len(guard.log_text())
        works = answered(guard)
    refused = isinstance(reply, grpc.RpcError) or (
        isinstance(reply, pb.InspectResponse) and reply.HasField("error"))
    detail = f"refused: {refused}; log size {log_size} bytes; serving after: {works}"
    return ("held" if refused and log_size < (1 << 20) and works else "broken"), detail


def _describe(reply: object) -> str:
    if isinstance(reply, grpc.RpcError):
        return f"{reply.code().name}: {reply.details()}"
    if reply is None:
        return "no reply"
    if isinstance(reply, pb.InspectResponse):
        if reply.HasField("error"):
            return f"error reply: {reply.error.code}: {reply.error.message[:200]}"
        found = ", ".join(f.detector for f in reply.findings)
        return f"{pb.Action.Name(reply.action)}" + (f" (findings: {found})" if found else "")
    return str(reply)[:200].replace("\n", " ")


# -- 21 thread limits ------------------------------------------------------------------------------

def _pids_case(workdir: Path, route: str) -> tuple[Verdict, str]:
    why = pids_limit.available()
    if why is not None:
        return "weak", f"not run: {why}"
    server: dict[str, Any] = {"max_concurrent_rpcs": 16, "liveness_timeout_seconds": 5}
    if route == "doorbell":
        server.update(max_concurrent_rpcs=4, shared_memory={"enabled": True})
    settings = config(workdir, plugins=("hanging",), server=server,
                      plugin_config={"hanging": {"release": str(workdir / "release")}})
    with pids_limit.PidsCgroup() as cgroup, running(workdir, settings,
                                                    preexec=cgroup.join) as guard:
        assert answered(guard)
        cgroup.limit(cgroup.current + 8)
        held: list[Any] = []
        try:
            if route == "plugins":
                channel = grpc.insecure_channel(guard.address)
                held = [Stream(channel) for _ in range(12)]
                for number, stream in enumerate(held):
                    stream.send(pb.InspectRequest(batch=batch(f"hang-{number}")))
            elif route == "metrics":
                host, port = guard.metrics_address().rsplit(":", 1)
                for _ in range(400):
                    with contextlib.suppress(OSError):
                        conn = socket.create_connection((host, int(port)), timeout=5)
                        conn.sendall(b"GET /metrics HTTP/1.1\r\n")
                        held.append(conn)
            else:
                for _ in range(204):
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    with contextlib.suppress(OSError):
                        conn.connect(str(guard.socket) + ".doorbell")
                        held.append(conn)
            time.sleep(1.0)
            deaf = alive_and_deaf(guard)
            how = outcome_of_death(guard) if not guard.running else "kept answering"
        finally:
            (workdir / "release").touch()
            for item in held:
                item.close()
        refused = cgroup.refused()
    detail = f"{how}; task starts the limit refused: {refused}"
    return ("broken", f"{deaf}; {detail}") if deaf else ("held", detail)


@case("pids limit: blocking plugin calls", "21")
def pids_plugins(workdir: Path) -> tuple[Verdict, str]:
    return _pids_case(workdir, "plugins")


@case("pids limit: half-sent /metrics requests", "21")
def pids_metrics(workdir: Path) -> tuple[Verdict, str]:
    return _pids_case(workdir, "metrics")


@case("pids limit: refused doorbell connections", "21")
def pids_doorbell(workdir: Path) -> tuple[Verdict, str]:
    return _pids_case(workdir, "doorbell")


# -- running ---------------------------------------------------------------------------------------

def run_case(name: str) -> Outcome:
    chosen = CASES[name]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="guard-attack-") as folder:
        try:
            verdict, detail = chosen.run(Path(folder))
        except Exception as exc:  # the attack itself failed: report it, never hide it
            verdict = "broken"
            detail = f"the case failed: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
    return Outcome(name, chosen.finding, verdict, detail, time.monotonic() - started)


def report(outcomes: list[Outcome]) -> str:
    counts = {verdict: sum(o.verdict == verdict for o in outcomes)
              for verdict in ("held", "weak", "broken")}
    rows = [[o.finding, o.case, o.verdict, o.detail] for o in outcomes]
    return (f"{counts['held']} held, {counts['weak']} weak, {counts['broken']} broken "
            f"({len(outcomes)} cases).\n\n"
            + markdown_table(["finding", "case", "verdict", "what happened"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the quick cases")
    parser.add_argument("--case", action="append", default=[], help="run only this case")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    names = args.case or [name for name, c in CASES.items() if c.quick or not args.quick]
    outcomes = []
    for name in names:
        outcome = run_case(name)
        print(f"{outcome.verdict:6} {outcome.case}: {outcome.detail} ({outcome.seconds:.1f} s)",
              flush=True)
        outcomes.append(outcome)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "outcomes": [asdict(o) for o in outcomes]},
                              indent=2), encoding="utf-8")
    text = report(outcomes)
    print(text)
    if args.write_results:
        write_section("attack", "## Attack suite (`bench/attack.py`)\n\n"
                      "Issues 19 and 21, re-run against a real `guard serve` each: "
                      "`python -m bench.attack --write-results`. held: the guard did what "
                      "the docs promise; weak: it survived with a stated degradation; "
                      "broken: it died, went deaf, lost accepted records or leaked.\n\n"
                      + text)
    return 1 if any(o.verdict == "broken" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
