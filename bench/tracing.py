"""What observability costs a batch: tracing off, on but not sampled, on and sampled, and
metrics on, in one run (a sibling of ``bench/transport.py``, reusing its loop).

Two parts, each with its reference (tracing off) in the same run:

- ``round trip``: ``guard serve`` processes with the same SAE (576 x 4608) and the
  first-party detector on three features (every batch is encoded, detected and flagged),
  driven by INLINE streams from this process, cases interleaved in rounds as in the transport
  benchmark. ``off`` (``telemetry.tracing: false``) runs in two processes: their difference
  is the noise floor between processes. ``not sampled``: tracing on, exporting to an OTLP
  receiver in this process, default sampler (``parentbased_always_on``), each batch's
  ``attributes`` carrying a host ``traceparent`` that is not sampled (what the host SDK sends
  per batch: the common production case).
  ``sampled``: the same guard without a parent (every batch traced and exported).
  ``metrics``: tracing off, the Prometheus endpoint on (not scraped during the run).
- ``in process``: the CPU time (``time.thread_time``) of ``InspectStream.handle`` plus
  ``after_reply`` per batch for the same four settings, plugins run inline on the same
  thread, no transport: microseconds show, and other processes' load hardly does (the round
  trip's noise is larger than the cost being measured). The sampled case's batch span
  processor exports from its own thread (to a discarding exporter): not counted.

Target: the inline round trip with tracing on and not sampled within 5% of off (p50, median
over rounds of the ratio in the same round, every batch size); the in-process CPU is its
supporting evidence. Raw latencies go to ``bench/out/tracing.json``.

    python -m bench.tracing                         # about a minute
    python -m bench.tracing --rounds 6 --scale 0.4  # a quick look
    python -m bench.tracing --write-results         # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench._stats import machine, markdown_table, write_headline, write_section
from bench.transport import (
    HOOKS,
    REPO_ROOT,
    WARMUP,
    Case,
    Payload,
    _cells,
    _record,
    run_cases,
)
from guard.demo.otlp_receiver import OtlpReceiver
from guard.sidecar.process import GuardProcess
from guard.v1 import guard_pb2
from tests.sae_fixtures import write_saelens

OUT = Path(__file__).resolve().parent / "out" / "tracing.json"
D_IN = 576
D_SAE = 4608
PAYLOADS = (Payload(1, D_IN), Payload(64, D_IN))
UNSAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
DETECTOR = {"probe": {"type": "threshold", "hook": HOOKS[D_IN], "features": [3, 70, 400],
                      "threshold": 0.0, "action": "flag"}}
OFF = "off"
NOT_SAMPLED = "not sampled"
#: The target: not sampled within 5% of off (round-trip p50 ratio).
TARGET = 1.05
#: server -> (telemetry section of its config, extra environment, the batches' traceparent).
#: The off cases get the same unsampled traceparent as the not-sampled one (a tracing host
#: sends it whatever the guard does): the ratio is then the guard's tracing alone.
SERVERS: dict[str, tuple[str, dict[str, str], str]] = {
    OFF: ("telemetry:\n  tracing: false\n", {}, UNSAMPLED_PARENT),
    "off, again": ("telemetry:\n  tracing: false\n", {}, UNSAMPLED_PARENT),
    NOT_SAMPLED: ("", {"OTEL_METRICS_EXPORTER": "none"}, UNSAMPLED_PARENT),
    "sampled": ("", {"OTEL_METRICS_EXPORTER": "none"}, ""),
    "metrics": ("telemetry:\n  tracing: false\n  metrics_listen: 127.0.0.1:0\n", {}, ""),
}
COMPARED = tuple(name for name in SERVERS if name != OFF)


@dataclass(frozen=True)
class ParentedPayload(Payload):
    """A payload whose batches carry a ``traceparent`` in their ``attributes``, as the host
    SDK sends it (per batch, not per stream)."""

    traceparent: str = ""

    def batch(self, request_id: str) -> guard_pb2.ActivationBatch:
        batch = super().batch(request_id)
        batch.attributes["traceparent"] = self.traceparent
        return batch


def payload_for(server: str, payload: Payload) -> Payload:
    traceparent = SERVERS[server][2]
    return ParentedPayload(payload.rows, payload.d_in, traceparent) if traceparent else payload


def find(cases: list[Case], server: str, payload: Payload) -> Case:
    """The case of ``server`` and ``payload``'s shape (a ParentedPayload is not == Payload)."""
    return next(c for c in cases if c.server == server and c.payload.label == payload.label)


def write_sae(workdir: Path) -> Path:
    sae = workdir / "sae"
    if not sae.exists():
        write_saelens(sae, d_in=D_IN, d_sae=D_SAE, hook_name=HOOKS[D_IN])
    return sae


def write_config(workdir: Path, name: str, telemetry: str) -> tuple[Path, str]:
    """A guard config with the detector on; returns it and the guard's address."""
    slug = name.replace(" ", "-").replace(",", "")
    address = f"unix://{workdir}/{slug}.sock"
    config = workdir / f"{slug}.yaml"
    rule = DETECTOR["probe"]
    config.write_text(
        f"server:\n  listen: {address}\n"
        "logging:\n  level: warning\n"
        f"saes:\n  - path: {write_sae(workdir)}\n"
        "plugins:\n  autoload: false\n  enabled: [detectors]\n  config:\n    detectors:\n"
        f"      probe:\n        type: threshold\n        hook: {rule['hook']}\n"
        f"        features: {rule['features']}\n        threshold: 0.0\n        action: flag\n"
        + telemetry,
        encoding="utf-8",
    )
    return config, address


@contextlib.contextmanager
def guard_processes(workdir: Path, endpoint: str) -> Iterator[dict[str, str]]:
    """One ``guard serve`` per server, each with its own environment; SIGTERM at the end."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with contextlib.ExitStack() as stack:
        addresses: dict[str, str] = {}
        for name, (telemetry, extra_env, _metadata) in SERVERS.items():
            config, address = write_config(workdir, name, telemetry)
            env = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **extra_env}
            guard = GuardProcess(config, address, log=config.with_suffix(".log"), env=env,
                                 cwd=REPO_ROOT)
            addresses[name] = stack.enter_context(guard).address
        yield addresses


def round_trip_table(cases: list[Case]) -> str:
    rows = []
    for payload in PAYLOADS:
        found = {c.server: c.summary() for c in cases if c.payload.label == payload.label}
        off = found[OFF]
        row = [payload.label, *_cells(off)[:2]]
        for name in COMPARED:
            row += [f"{found[name].p50_ms:.3f}", f"{found[name].p50_ms / off.p50_ms:.3f}"]
        rows.append(row)
    headers = ["batch", "off p50", "off p99"]
    for name in COMPARED:
        headers += [f"{name} p50", "/off"]
    return markdown_table(headers, rows)


def round_ratio(cases: list[Case], server: str, payload: Payload) -> float:
    """The median over rounds of (server p50 / off p50) in the same round."""
    off, other = find(cases, OFF, payload), find(cases, server, payload)
    return float(np.median(np.asarray(other.round_p50_ms) / np.asarray(off.round_p50_ms)))


def round_ratios(cases: list[Case], server: str) -> str:
    """Per payload, :func:`round_ratio` as text."""
    return ", ".join(f"{p.label} {round_ratio(cases, server, p):.3f}" for p in PAYLOADS)


def target_met(cases: list[Case]) -> bool:
    """The target, for the headline and the verdict alike: every batch size within 5%."""
    return all(round_ratio(cases, NOT_SAMPLED, p) <= TARGET for p in PAYLOADS)


def measure_round_trips(rounds: int, scale: float) -> tuple[list[Case], int, float]:
    cases = [Case("guard", server, "unix", payload_for(server, payload))
             for payload in PAYLOADS for server in SERVERS]
    started = time.monotonic()
    with (tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp, OtlpReceiver() as receiver,
          guard_processes(Path(tmp), receiver.endpoint) as addresses):
        print("round trips: " + ", ".join(SERVERS), file=sys.stderr, flush=True)
        run_cases({(name, "unix"): address for name, address in addresses.items()},
                  cases, rounds, scale)
    # The guards have stopped: every span they held was flushed to the receiver.
    return cases, len(receiver.spans), time.monotonic() - started


# -- in process -----------------------------------------------------------------------------


@dataclass
class InProcess:
    """Microseconds of CPU per batch (handle + after_reply), over interleaved repetitions."""

    name: str
    us_per_batch: list[float] = field(default_factory=list)


def measure_in_process(reps: int, batches: int) -> list[InProcess]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
    from guard.engine.core import Engine
    from guard.sidecar.session import InspectStream
    from guard.telemetry.instruments import Instruments
    from guard.telemetry.setup import configure_logging

    configure_logging(LoggingConfig(level="warning"), sys.stderr)

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()  # sampler from the environment: parentbased_always_on
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    # setting -> (instruments, the batches' traceparent attribute, as the host SDK sends it)
    settings = {
        OFF: (Instruments(), UNSAMPLED_PARENT),
        NOT_SAMPLED: (Instruments(tracer_provider, sampler_follows_parent=True),
                      UNSAMPLED_PARENT),
        "sampled": (Instruments(tracer_provider, sampler_follows_parent=True), ""),
        "metrics": (Instruments(None, meter_provider), ""),
    }
    results = [InProcess(name) for name in settings]
    rows = np.random.default_rng(0).normal(size=(1, D_IN)).astype("<f4")
    requests = []
    for _instruments, traceparent in settings.values():
        request = guard_pb2.InspectRequest(batch=guard_pb2.ActivationBatch(
            request_id="bench", hook=HOOKS[D_IN],
            activations=guard_pb2.Tensor(datatype="F32", shape=rows.shape, raw=rows.tobytes()),
            positions=[0], token_ids=[1], phase=guard_pb2.PHASE_PROMPT))
        if traceparent:
            request.batch.attributes["traceparent"] = traceparent
        requests.append(request)
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        config = GuardConfig(server=ServerConfig(listen=f"unix://{tmp}/unused.sock"),
                             saes=(SaeConfig(path=write_sae(Path(tmp))),),
                             plugins=PluginsConfig(autoload=False, enabled=("detectors",),
                                                   config={"detectors": DETECTOR},
                                                   # inline: all of a batch's work on this thread
                                                   timeout_ms=0))
        streams = []
        for instruments, _traceparent in settings.values():
            engine = Engine.load(config, instruments=instruments)
            stream = InspectStream(engine, 1 << 25)
            stream.handle(guard_pb2.InspectRequest(config=guard_pb2.StreamConfig(
                mode=guard_pb2.MODE_INLINE, hooks=[HOOKS[D_IN]])))
            streams.append((engine, stream))
        for rep in range(reps + 1):  # the first repetition warms up
            order = list(zip(results, streams, requests, strict=True))
            for result, (_engine, stream), request in order if rep % 2 else order[::-1]:
                first = rep * batches + 1  # each stream's sequence numbers go on without gaps
                started = time.thread_time()  # CPU time: other processes' load does not count
                for sequence in range(first, first + batches):
                    request.batch.sequence = sequence
                    stream.handle(request)
                    stream.after_reply()
                if rep:
                    result.us_per_batch.append((time.thread_time() - started) / batches * 1e6)
        for engine, _stream in streams:
            engine.close()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return results


def in_process_table(results: list[InProcess]) -> str:
    off = statistics.median(results[0].us_per_batch)
    rows = [[r.name, f"{statistics.median(r.us_per_batch):.1f}",
             f"{statistics.median(r.us_per_batch) - off:+.1f}",
             f"{statistics.median(r.us_per_batch) / off:.3f}"] for r in results]
    return markdown_table(["setting", "us per batch (median)", "vs off", "/off"], rows)


# -- output -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the round trips per round (0.1 for a smoke run)")
    parser.add_argument("--write-results", action="store_true",
                        help="replace the tracing section of bench/RESULTS.md and the "
                             "headline in bench/headlines")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"raw results (default {os.path.relpath(OUT)})")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    cases, exported, elapsed = measure_round_trips(args.rounds, args.scale)
    print("in process:", file=sys.stderr, flush=True)
    in_process = measure_in_process(reps=max(3, args.rounds // 2),
                                    batches=max(100, round(1000 * args.scale)))
    sampled_batches = sum(len(c.latencies_ms) for c in cases if c.server == "sampled")
    results: dict[str, Any] = {
        "benchmark": "tracing", "machine": machine(), "grpc": grpc.__version__,
        "rounds": args.rounds, "scale": args.scale,
        "warmup_per_stream": max(5, round(WARMUP * args.scale)),
        "spans_exported": exported, "round_trip_part_s": round(elapsed, 1),
        "cases": _record(cases),
        "in_process_us_per_batch": {r.name: r.us_per_batch for r in in_process},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    trips = round_trip_table(cases)
    notes = "\n".join(
        [f"- p50 / off p50, median over rounds: {name}: {round_ratios(cases, name)}"
         for name in COMPARED]
        + [f"- spans received by the OTLP receiver: {exported:,} (the sampled case's "
           f"{sampled_batches:,} measured batches and its warm-up, 4 spans each; none from "
           "the not-sampled case)"])
    in_proc = in_process_table(in_process)
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    reading = verdict(cases, in_process, load)
    print(f"\n### Round trips (ms)\n\n{trips}\n\n{notes}\n\n### In process\n\n{in_proc}\n\n"
          f"{reading}\n", flush=True)
    if args.write_results:
        write_section("tracing", section(args, trips, notes, in_proc, reading, elapsed))
        write_headline("tracing", headline(cases, in_process))
    print(f"raw results: {os.path.relpath(args.out)}")


def headline(cases: list[Case], in_process: list[InProcess]) -> list[dict[str, object]]:
    """The target's figures (round-trip p50 ratios, as :func:`verdict` judges them), then the
    in-process CPU ratios as supporting evidence (no target)."""
    noise = round_ratios(cases, "off, again")
    entries: list[dict[str, object]] = [
        {"label": f"not sampled / off, inline round trip p50 ({payload.label})",
         "ratio": round_ratio(cases, NOT_SAMPLED, payload),
         "reference": "tracing off, another guard process, same rounds", "better": "lower",
         "target": TARGET,
         "note": f"median over rounds of the per-round p50 ratio; off, again / off: {noise}"}
        for payload in PAYLOADS]
    off = statistics.median(in_process[0].us_per_batch)
    entries += [
        {"label": f"{r.name} / off, CPU per batch in process",
         "ratio": statistics.median(r.us_per_batch) / off,
         "reference": "tracing off, same stream code", "better": "lower"}
        for r in in_process[1:]]
    return entries


def verdict(cases: list[Case], in_process: list[InProcess], load: str) -> str:
    """The target, judged on the round-trip p50 ratio (as the headline); the in-process CPU
    added, against the off round trip, as supporting evidence."""
    off_trip_us = find(cases, OFF, PAYLOADS[0]).summary().p50_ms * 1e3
    medians = {r.name: statistics.median(r.us_per_batch) for r in in_process}
    lines = []
    for name in (NOT_SAMPLED, "sampled", "metrics"):
        added = medians[name] - medians[OFF]
        lines.append(f"- {name}: {added:+.1f} us of CPU per batch, "
                     f"{added / off_trip_us:+.1%} of the off round trip ({PAYLOADS[0].label} "
                     f"p50 {off_trip_us:.0f} us)")
    met = "met" if target_met(cases) else "NOT met"
    return ("Reading: the target is judged on the inline round trip, not sampled / off p50, "
            "median over rounds of the ratio in the same round. Two processes with the same "
            "configuration differ by the *off, again* ratio "
            f"({round_ratios(cases, 'off, again')}), the noise floor of that comparison, which "
            "on these shared 2-core machines can exceed the 5% judged; the in-process CPU "
            "time added per batch, against the off round trip, is the supporting evidence. "
            f"Load average before / after the round trips: {load}.\n\n"
            + "\n".join(lines)
            + f"\n- target (not sampled within {TARGET - 1:.0%} of off, inline round trip "
              f"p50: {round_ratios(cases, NOT_SAMPLED)}): **{met}**")


def section(args: argparse.Namespace, trips: str, notes: str, in_proc: str, reading: str,
            elapsed: float) -> str:
    facts = machine()
    return f"""## Tracing (`bench/tracing.py`)

`python -m bench.tracing --rounds {args.rounds} --scale {args.scale} --write-results`
(round trips {elapsed:.0f} s; {facts['cpu']}, {facts['cpu_count']} cores, Python
{facts['python']}, grpcio {grpc.__version__}). Every batch is encoded (one 576x4608 SAELens
SAE, three features), detected and flagged by the first-party detector (no decision log).
*off*: `telemetry.tracing: false`, in two processes (*off, again* is the noise floor between
processes), the batches carrying the same unsampled `traceparent` as the next case (a tracing
host sends it whatever the guard does); *not sampled*: tracing on and exporting over
OTLP/gRPC to a receiver in the client process, default sampler (`parentbased_always_on`),
each batch's `attributes` carrying a host `traceparent` that is not sampled (as the host SDK
sends it); *sampled*: the same without
a parent, so every batch
is traced (`guard.inspect`, `guard.decode`, `guard.encode`, `guard.plugin.detect`, a finding
event) and exported by the batch span processor; *metrics*: tracing off, the Prometheus
endpoint on. A batch's telemetry (ending its span, recording its metrics) runs after its
reply is sent. Target: not sampled within 5% of off, on the inline round trip's p50 (median
over rounds of the ratio in the same round); the CPU per batch in process supports it.

### Inline round trips (ms; the transport benchmark's loop, interleaved rounds)

{trips}

{notes}

### CPU per batch in process (`InspectStream.handle` + `after_reply`, 1x576, no transport)

CPU time of the handling thread (`time.thread_time`), the detector run inline on it; the
span processor's export thread (to a discarding exporter) is not counted.

{in_proc}

{reading}
"""


if __name__ == "__main__":
    main()
