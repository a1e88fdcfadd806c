"""Load and soak: N concurrent generation streams against a real ``guard serve`` for a fixed time.

The sidecar is a real ``guard serve`` process on a Unix socket with a 576x4608 SAELens SAE
(SmolLM2's width), the first-party detectors (a threshold detector, a sustained one that keeps
per-request state, and a shadow-mode one) and the decision log writing to a file. Each host
stream is a thread with its own ``GuardClient`` simulating generations: a prompt batch of
16-64 rows, then one row per generated token, a new request id per generation (an ABORT ends
the generation early, as a host would). INLINE streams run back to back (closed loop);
MONITOR streams send one batch every ``--monitor-interval-ms`` and read the verdicts from
``on_reply``.

Reported: throughput (batches/s, rows/s) and INLINE latency percentiles after the warm-up, the
sidecar's RSS sampled every second (growth from the first window after warm-up to the last
window; target under 5%), errors (policy verdicts, rejected batches, exceptions; target 0),
and, after a SIGTERM drain, that every decision id the hosts received is in the decision log
exactly once.

    python -m bench.soak [--streams 8] [--monitor-streams 1] [--seconds 150] [--warmup 15]
                         [--write-results]

Raw samples go to ``bench/out/soak.json``. tests/test_soak.py runs a short version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil  # type: ignore[import-untyped]  # from the host extra (accelerate needs it)
import structlog
from numpy.typing import NDArray

from bench._stats import machine, markdown_table, write_headline, write_section
from guard.host import Action, GuardClient, Verdict
from guard.host.shm import SharedMemory
from tests.sae_fixtures import write_saelens
from tests.sidecar import Sidecar, exactly_once

HOOK = "blocks.15.hook_resid_post"
OUT = Path(__file__).resolve().parent / "out" / "soak.json"
Phase = Literal["prompt", "generation"]


@dataclass(frozen=True)
class SoakOptions:
    streams: int = 8
    monitor_streams: int = 1
    seconds: float = 150.0
    warmup: float = 15.0
    d_in: int = 576
    d_sae: int = 4608
    prompt_rows: tuple[int, int] = (16, 64)
    tokens: int = 32
    deadline_ms: float = 5000.0
    #: MONITOR pacing: within a stream's share of a saturated guard (about 1,000 batches/s
    #: over 9 streams here); faster, the host's bounded queue drops (counted, reported).
    monitor_interval_ms: float = 20.0
    sample_interval_s: float = 1.0
    #: The RSS windows compared: the first and last this many seconds of the measured part.
    rss_window_s: float = 10.0
    #: Rows in shared memory, batches on the guard's doorbell socket (each host its own
    #: region), instead of gRPC bytes.
    shared_memory: bool = False


@dataclass
class SoakResult:
    options: dict[str, Any]
    measured_s: float
    batches: int
    rows: int
    batches_per_s: float
    rows_per_s: float
    latency_ms: dict[str, dict[str, float]]
    errors: int
    error_examples: list[str]
    monitor_dropped: int
    monitor_sent: int
    aborts: int
    decisions_received: int
    decisions_logged: int
    missing: list[str]
    duplicated: list[str]
    logged_not_received: int
    records_dropped: float
    exit_code: int
    rss_warm_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    rss_growth_pct: float
    guard_cpu_percent: float
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    rss_samples: list[tuple[float, float]] = field(repr=False)


def guard_config(workdir: Path, options: SoakOptions) -> dict[str, Any]:
    sae = write_saelens(workdir / "sae", options.d_in, options.d_sae, hook_name=HOOK)
    step = options.d_sae // 64
    features = list(range(0, options.d_sae, step))[:64]
    server: dict[str, Any] = {"drain_grace_seconds": 30}
    if options.shared_memory:
        (workdir / "shm").mkdir(parents=True, exist_ok=True)
        server["shared_memory"] = {"enabled": True, "allowed_dirs": [str(workdir / "shm")]}
    return {
        "server": server,
        "logging": {"level": "info"},  # per stream, not per batch; the metrics address
        "saes": [{"path": str(sae)}],
        "plugins": {
            "enabled": ["detectors", "decision_log"],
            "watch_interval_seconds": 0,
            "config": {
                "detectors": {
                    "watch": {"hook": HOOK, "features": features[:32], "threshold": 1.5,
                              "action": "flag"},
                    "sustained": {"type": "sustained", "hook": HOOK,
                                  "features": features[32:48], "threshold": 0.8, "window": 4,
                                  "action": "flag", "phases": ["generation"]},
                    "shadow": {"hook": HOOK, "features": features[48:], "threshold": 0.5,
                               "reduce": "mean", "action": "log"},
                },
                "decision_log": {"path": str(workdir / "decisions.jsonl")},
            },
        },
        "telemetry": {"metrics_listen": "127.0.0.1:0", "tracing": False},
    }


class Stream(threading.Thread):
    """One simulated host: generations on its own GuardClient until ``stop`` is set."""

    def __init__(self, name: str, client: GuardClient, options: SoakOptions,
                 pool: NDArray[np.float32], stop: threading.Event, t0: float,
                 pace_s: float = 0.0) -> None:
        super().__init__(name=name, daemon=True)
        self.client = client
        self.options = options
        self.pool = pool
        self.stop_event = stop
        self.t0 = t0
        self.pace_s = pace_s
        #: (seconds since start at completion, latency ms, rows, 1 for a prompt batch).
        self.samples: list[tuple[float, float, int, int]] = []
        self.decision_ids: list[str] = []
        self.errors: list[str] = []
        self.aborts = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        rng = np.random.default_rng(abs(hash(self.name)) % 2**32)
        low, high = self.options.prompt_rows
        generation = 0
        try:
            while not self.stop_event.is_set():
                request = f"{self.name}-g{generation}"
                generation += 1
                n = int(rng.integers(low, high + 1))
                if not self._send(request, rng, n, 0, "prompt"):
                    continue
                for token in range(self.options.tokens):
                    if self.stop_event.is_set() or not self._send(request, rng, 1, n + token,
                                                                  "generation"):
                        break
        except Exception as exc:  # reported as an error, never silently
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _send(self, request: str, rng: np.random.Generator, n: int, start: int,
              phase: Phase) -> bool:
        """One batch; False when the generation ends here (an ABORT)."""
        offset = int(rng.integers(0, len(self.pool) - n + 1))
        rows = self.pool[offset:offset + n]
        positions = list(range(start, start + n))
        began = time.perf_counter()
        verdict = self.client.inspect(request, HOOK, rows, positions,
                                      token_ids=[(p * 7919) % 49152 for p in positions],
                                      phase=phase)
        ended = time.perf_counter()
        self.samples.append((ended - self.t0, (ended - began) * 1e3, n,
                             1 if phase == "prompt" else 0))
        if verdict.source == "monitor":
            if self.pace_s:
                self.stop_event.wait(self.pace_s)
            return True
        return self.take(verdict)

    def take(self, verdict: Verdict) -> bool:
        """Keep a guard verdict's decision id (or count it as an error); thread-safe."""
        with self._lock:
            if verdict.source == "guard" and verdict.decision_id:
                self.decision_ids.append(verdict.decision_id)
                if verdict.action is Action.ABORT:
                    self.aborts += 1
                    return False
                return True
            self.errors.append(f"{verdict.source} {verdict.request_id}#{verdict.sequence}: "
                               f"{verdict.reason}")
            return True


class _Replies:
    """A MONITOR client's ``on_reply``: hands each verdict to its stream."""

    def __init__(self) -> None:
        self.stream: Stream | None = None

    def __call__(self, verdict: Verdict) -> None:
        assert self.stream is not None
        self.stream.take(verdict)


class RssSampler(threading.Thread):
    """The sidecar's resident set size (and CPU %) every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.t0 = t0
        self.samples: list[tuple[float, float]] = []
        self.cpu: list[float] = []
        self.stop_event = threading.Event()

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self.t0,
                             self.process.memory_info().rss / 2**20))

    def run(self) -> None:
        self.process.cpu_percent(None)
        while not self.stop_event.wait(self.interval):
            self.sample()
            self.cpu.append(self.process.cpu_percent(None))


def _percentiles(latencies: Sequence[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "p999": math.nan, "max": math.nan}
    values = np.asarray(latencies, dtype=np.float64)
    p50, p99, p999 = np.percentile(values, [50.0, 99.0, 99.9])
    return {"n": len(values), "p50": float(p50), "p99": float(p99), "p999": float(p999),
            "max": float(values.max())}


def _window_median(samples: Sequence[tuple[float, float]], start: float, end: float) -> float:
    values = [rss for t, rss in samples if start <= t <= end]
    return float(np.median(values)) if values else math.nan


def run_soak(options: SoakOptions, workdir: Path,
             progress: Callable[[str], None] = lambda _line: None) -> SoakResult:
    """Start the sidecar, run the streams for ``options.seconds``, drain, check, report."""
    sidecar = Sidecar(workdir / "guard", guard_config(workdir / "guard", options), tag="soak")
    pool = np.random.default_rng(0).normal(
        size=(512, options.d_in)).astype(np.float32)
    loadavg_start = os.getloadavg()
    sidecar.start()
    try:
        return _run(sidecar, options, pool, loadavg_start, progress)
    finally:
        sidecar.stop()


def _run(sidecar: Sidecar, options: SoakOptions, pool: NDArray[np.float32],
         loadavg_start: tuple[float, float, float],
         progress: Callable[[str], None]) -> SoakResult:
    stop = threading.Event()
    t0 = time.perf_counter()
    streams: list[Stream] = []
    shared = (SharedMemory(directory=str(sidecar.workdir / "shm"), size_bytes=8 << 20)
              if options.shared_memory else None)
    for i in range(options.streams):
        client = GuardClient(sidecar.address, hooks=[HOOK], deadline_ms=options.deadline_ms,
                             failure_policy="closed", host_name=f"soak-inline-{i}",
                             shared_memory=shared)
        streams.append(Stream(f"inline{i}", client, options, pool, stop, t0))
    for i in range(options.monitor_streams):
        client = GuardClient(sidecar.address, mode="monitor", hooks=[HOOK],
                             host_name=f"soak-monitor-{i}", on_reply=_Replies(),
                             shared_memory=shared)
        stream = Stream(f"monitor{i}", client, options, pool, stop, t0,
                        pace_s=options.monitor_interval_ms / 1e3)
        assert isinstance(client.options.on_reply, _Replies)
        client.options.on_reply.stream = stream
        streams.append(stream)
    sampler = RssSampler(sidecar.pid, options.sample_interval_s, t0)
    sampler.sample()
    sampler.start()
    for stream in streams:
        stream.start()
    end = t0 + options.seconds
    next_report = t0 + 10
    while (now := time.perf_counter()) < end:
        time.sleep(min(1.0, end - now))
        if time.perf_counter() >= next_report:
            next_report += 10
            done = sum(len(s.samples) for s in streams)
            last = sampler.samples[-1][1] if sampler.samples else math.nan
            progress(f"  {time.perf_counter() - t0:5.0f} s: {done} batches, guard RSS "
                     f"{last:.1f} MiB")
    stop.set()
    measured_end = time.perf_counter() - t0
    for stream in streams:
        stream.join(60)
    for stream in streams:
        stream.client.close(timeout=10)
    sampler.stop_event.set()
    sampler.join(10)
    sampler.sample()  # the last one, after every stream ended
    records_dropped = sidecar.metric("guard_records_dropped_total")
    loadavg_end = os.getloadavg()
    sidecar.terminate()
    exit_code = sidecar.wait(120)

    warmup = options.warmup
    measured_s = measured_end - warmup
    measured = [s for stream in streams for s in stream.samples if s[0] >= warmup]
    inline = [s for stream in streams if stream.name.startswith("inline")
              for s in stream.samples if s[0] >= warmup]
    latency = {
        "all": _percentiles([s[1] for s in inline]),
        "prompt": _percentiles([s[1] for s in inline if s[3]]),
        "generation": _percentiles([s[1] for s in inline if not s[3]]),
    }
    received = [d for stream in streams for d in stream.decision_ids]
    records = sidecar.decisions()
    missing, duplicated = exactly_once(received, records)
    errors = [e for stream in streams for e in stream.errors]
    errors += [f"{s.name}: guard rejected {n} monitored batches"
               for s in streams if (n := s.client.counters.errors)]
    if exit_code != 0:
        errors.append(f"guard serve exited with {exit_code}")
    window = min(options.rss_window_s, max(measured_s / 4, options.sample_interval_s))
    rss = sampler.samples
    rss_warm = _window_median(rss, warmup, warmup + window)
    rss_end = _window_median(rss, measured_end - window, math.inf)
    return SoakResult(
        options=asdict(options),
        measured_s=measured_s,
        batches=len(measured),
        rows=sum(s[2] for s in measured),
        batches_per_s=len(measured) / measured_s,
        rows_per_s=sum(s[2] for s in measured) / measured_s,
        latency_ms=latency,
        errors=len(errors),
        error_examples=errors[:5],
        monitor_dropped=sum(s.client.counters.dropped for s in streams),
        monitor_sent=sum(len(s.samples) for s in streams if s.name.startswith("monitor")),
        aborts=sum(s.aborts for s in streams),
        decisions_received=len(received),
        decisions_logged=len(records),
        missing=missing,
        duplicated=duplicated,
        logged_not_received=len({str(r["decision_id"]) for r in records} - set(received)),
        records_dropped=records_dropped,
        exit_code=exit_code,
        rss_warm_mb=rss_warm,
        rss_end_mb=rss_end,
        rss_peak_mb=max(v for _t, v in rss),
        rss_growth_pct=(rss_end - rss_warm) / rss_warm * 100.0,
        guard_cpu_percent=float(np.mean(sampler.cpu)) if sampler.cpu else math.nan,
        loadavg_start=loadavg_start,
        loadavg_end=loadavg_end,
        rss_samples=rss,
    )


def report(result: SoakResult) -> str:
    """The Markdown tables of a run."""
    o = result.options
    lat = result.latency_ms
    rows = [[name, f"{v['n']:,}", f"{v['p50']:.2f}", f"{v['p99']:.2f}", f"{v['p999']:.2f}",
             f"{v['max']:.1f}"] for name, v in lat.items()]
    latency = markdown_table(["INLINE batches", "n", "p50 ms", "p99 ms", "p99.9 ms", "max ms"],
                             rows)
    exact = "yes" if not result.missing and not result.duplicated else (
        f"NO: {len(result.missing)} missing, {len(result.duplicated)} duplicated")
    summary = markdown_table(["measure", "value", "target"], [
        ["throughput", f"{result.batches_per_s:,.0f} batches/s, {result.rows_per_s:,.0f} "
                       "rows/s", ""],
        ["errors", f"{result.errors}", "0"],
        ["decisions received by the hosts", f"{result.decisions_received:,}", ""],
        ["... in the decision log exactly once", exact, "yes"],
        ["decision log lines", f"{result.decisions_logged:,} ({result.logged_not_received} "
                               "not received by a host)", ""],
        ["records dropped (queue full)", f"{result.records_dropped:g}", "0"],
        ["MONITOR batches dropped by the host (queue full)",
         f"{result.monitor_dropped} of {result.monitor_sent:,}", ""],
        ["ABORT verdicts (generation ended)", f"{result.aborts}", ""],
        ["guard RSS after warm-up -> end (median of "
         f"{min(o['rss_window_s'], result.measured_s / 4):.0f} s windows)",
         f"{result.rss_warm_mb:.1f} -> {result.rss_end_mb:.1f} MiB "
         f"({result.rss_growth_pct:+.2f}%), peak {result.rss_peak_mb:.1f} MiB", "< 5%"],
        ["guard CPU (mean of 1 s samples)", f"{result.guard_cpu_percent:.0f}%", ""],
        ["exit code after SIGTERM", f"{result.exit_code}", "0"],
    ])
    return f"{summary}\n\n{latency}"


def quiet_host_logs() -> None:
    """The hosts' own warnings (one per policy verdict while the guard is down) only
    clutter a benchmark's output: errors only."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakOptions()
    parser.add_argument("--streams", type=int, default=defaults.streams,
                        help="INLINE host streams")
    parser.add_argument("--monitor-streams", type=int, default=defaults.monitor_streams)
    parser.add_argument("--seconds", type=float, default=defaults.seconds,
                        help="duration, warm-up included")
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--tokens", type=int, default=defaults.tokens,
                        help="generated tokens per generation")
    parser.add_argument("--shared-memory", action="store_true",
                        help="rows in shared memory, batches on the doorbell socket")
    parser.add_argument("--write-results", action="store_true",
                        help="write the 'soak' section of bench/RESULTS.md")
    args = parser.parse_args(argv)
    quiet_host_logs()
    if args.seconds <= args.warmup:
        parser.error("--seconds must be longer than --warmup")
    options = SoakOptions(streams=args.streams, monitor_streams=args.monitor_streams,
                          seconds=args.seconds, warmup=args.warmup, tokens=args.tokens,
                          shared_memory=args.shared_memory)
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="guard-soak-") as tmp:
        print(f"soak: {options.streams} INLINE + {options.monitor_streams} MONITOR streams for "
              f"{options.seconds:g} s ({options.warmup:g} s warm-up)", file=sys.stderr)
        result = run_soak(options, Path(tmp),
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = report(result)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "started": started, **asdict(result)},
                              indent=1) + "\n", encoding="utf-8")
    print(f"raw results: {os.path.relpath(OUT)}")
    if args.write_results:
        info = machine()
        name = "soak-doorbell" if options.shared_memory else "soak"
        transport = ("rows in shared memory (a region per host), batches on the guard's "
                     "doorbell socket" if options.shared_memory else "rows as gRPC bytes")
        section = (
            f"## Load and soak{', shared memory and the doorbell' if options.shared_memory else ''}"
            " (`bench/soak.py`)\n\n"
            f"`python -m bench.soak --streams {options.streams} --monitor-streams "
            f"{options.monitor_streams} --seconds {options.seconds:g} --warmup "
            f"{options.warmup:g}{' --shared-memory' if options.shared_memory else ''} "
            f"--write-results`, run {started} on {info['cpu_count']} cores "
            f"({info['cpu']}), Python {info['python']}; {transport}. "
            "A real `guard serve` on a Unix socket: "
            f"{options.d_in}x{options.d_sae} SAELens SAE on `{HOOK}`, 64 features encoded "
            "for three detectors (threshold, sustained with per-request state, shadow-mode "
            "log), the decision log writing to a file, metrics on. Each host stream is a "
            "thread with its own `GuardClient` in the same process: generations of one "
            f"{options.prompt_rows[0]}-{options.prompt_rows[1]}-row prompt batch and "
            f"{options.tokens} one-row token batches, a new request id each; INLINE streams "
            "back to back (deadline "
            f"{options.deadline_ms:g} ms, fail-closed), MONITOR streams one batch every "
            f"{options.monitor_interval_ms:g} ms. Latency is the host's `inspect` call. The "
            "hosts and the guard share the machine's cores (load average "
            f"{result.loadavg_start[0]:.1f} at the start, {result.loadavg_end[0]:.1f} at the "
            "end, other engineers' jobs included), so throughput is the pair's, not the "
            "guard's alone. After the run the guard is stopped with SIGTERM (drain) and its "
            "decision log is matched against every decision id the hosts received.\n\n"
            f"{text}\n"
        )
        write_section(name, section)
        write_headline(name, [
            {"label": f"guard RSS at the end / after warm-up, {options.seconds:g} s soak"
                      f"{' (doorbell)' if options.shared_memory else ''}",
             "ratio": 1 + result.rss_growth_pct / 100,
             "reference": "the sidecar's RSS in the first window after warm-up",
             "better": "lower", "target": 1.05}])


if __name__ == "__main__":
    main()
