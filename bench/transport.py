"""Round trips of one INLINE `Inspect` stream: send one batch, wait for its reply, repeat.

Two parts, each measured against its reference in the same run:

- ``flavours``: the bare echo servicer, sync grpcio vs grpc.aio, over a Unix socket and TCP
  loopback (the measurement that chose the server design);
- ``guard``: a real ``guard serve --config FILE`` with two SAEs and no features subscribed (so
  no encode: transport, codec, validation and decision path), next to the echo servicer of the
  guard's flavour, both over a Unix socket; the ratio guard p50 / echo p50 is the figure of merit
  (target: at most 1.20).

Client and servers run in separate processes. Cases are interleaved in rounds (every other
round reversed), a fresh stream per case and round, so that drift on a noisy machine hits every
case alike. Prints Markdown tables and writes the raw latencies to ``bench/out/transport.json``.

    python -m bench.transport                  # both parts, about a minute
    python -m bench.transport --part flavours --scale 0.2

Batches of 1 MiB are sensitive to glibc malloc returning memory to the kernel (page faults on
every message, varying from process to process). Servers inherit the environment, so the
allocator can be pinned for every process of a run with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_TOP_PAD_=67108864``;
the JSON records which of these were set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np

from bench._stats import LatencySummary, machine, markdown_table, summarize, write_headline
from bench.echo import FLAVOURS, MAX_MESSAGE_BYTES, SERVER_OPTIONS, Flavour, echo_process
from guard.sidecar.process import GuardProcess
from guard.v1 import guard_pb2, guard_pb2_grpc
from tests.sae_fixtures import write_saelens

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

Transport = Literal["unix", "tcp"]
Part = Literal["flavours", "guard"]

OUT = Path(__file__).resolve().parent / "out" / "transport.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
HOOKS = {576: "blocks.6.hook_resid_post", 4096: "blocks.20.hook_resid_post"}
# d_sae does not matter here (nothing is encoded); small enough to write and load fast.
SAE_WIDTHS = {576: 4608, 4096: 4096}
WARMUP = 20
STREAM_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
CLIENT_OPTIONS = SERVER_OPTIONS


@dataclass(frozen=True)
class Payload:
    """One batch shape: `rows` float32 rows of width `d_in`."""

    rows: int
    d_in: int

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.d_in}"

    @property
    def nbytes(self) -> int:
        return self.rows * self.d_in * 4

    def round_trips(self, scale: float) -> int:
        """Per round: fewer for big batches, so that every case takes about the same time."""
        base = 100 if self.nbytes <= 16 * 1024 else 60 if self.nbytes <= 256 * 1024 else 25
        return max(10, round(base * scale))

    def batch(self, request_id: str) -> guard_pb2.ActivationBatch:
        rng = np.random.default_rng(self.rows * 10_000 + self.d_in)
        rows = rng.normal(0.0, 1.0, size=(self.rows, self.d_in)).astype("<f4")
        return guard_pb2.ActivationBatch(
            request_id=request_id,
            hook=HOOKS[self.d_in],
            activations=guard_pb2.Tensor(datatype="F32", shape=rows.shape, raw=rows.tobytes()),
            positions=range(self.rows),
            token_ids=range(1, self.rows + 1),
            phase=guard_pb2.PHASE_PROMPT,
        )


PAYLOADS = (Payload(1, 576), Payload(64, 576), Payload(1, 4096), Payload(64, 4096))


@dataclass
class Case:
    """One server, transport and payload; latencies accumulate over the rounds."""

    part: Part
    server: str
    transport: Transport
    payload: Payload
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    round_p50_ms: list[float] = field(default_factory=list)
    #: gRPC metadata of the case's streams (bench/tracing.py sends a traceparent).
    metadata: tuple[tuple[str, str], ...] = ()

    def summary(self) -> LatencySummary:
        return summarize(self.latencies_ms, self.elapsed_s)


class InlineStream:
    """One Inspect stream driven inline; requests go through a queue, one reply per batch."""

    def __init__(self, channel: grpc.Channel, hook: str,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.SimpleQueue[guard_pb2.InspectRequest | None] = queue.SimpleQueue()
        self._requests.put(guard_pb2.InspectRequest(config=guard_pb2.StreamConfig(
            protocol_version="1",
            mode=guard_pb2.MODE_INLINE,
            hooks=[hook],
            failure_policy=guard_pb2.FAILURE_POLICY_FAIL_CLOSED,
            host="bench.transport",
        )))
        stub = guard_pb2_grpc.GuardStub(channel)
        call = stub.Inspect(iter(self._requests.get, None), timeout=STREAM_TIMEOUT_S,
                            metadata=metadata)
        self._replies = iter(call)

    def round_trip(self, request: guard_pb2.InspectRequest) -> guard_pb2.InspectResponse:
        self._requests.put(request)
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)
        for reply in self._replies:
            raise RuntimeError(f"reply after the last batch: {reply}")


def run_round(channel: grpc.Channel, case: Case, scale: float, round_index: int) -> None:
    """Open a stream, warm it up, then time `case.payload.round_trips(scale)` round trips."""
    payload = case.payload
    request = guard_pb2.InspectRequest(
        batch=payload.batch(f"bench-{case.server}-{case.transport}-{payload.label}-{round_index}")
    )
    stream = InlineStream(channel, request.batch.hook, case.metadata)
    warmup = max(5, round(WARMUP * scale))
    n = payload.round_trips(scale)
    latencies = []
    started = time.perf_counter()
    for sequence in range(warmup + n):
        if sequence == warmup:
            started = time.perf_counter()
        # Safe to reuse: the previous request was serialized before its reply came back.
        request.batch.sequence = sequence
        t0 = time.perf_counter_ns()
        reply = stream.round_trip(request)
        t1 = time.perf_counter_ns()
        if (
            reply.HasField("error")
            or reply.sequence != sequence
            or reply.action != guard_pb2.ACTION_CONTINUE
        ):
            raise RuntimeError(f"{case.server}: unexpected reply to batch {sequence}: {reply}")
        if sequence >= warmup:
            latencies.append((t1 - t0) / 1e6)
    case.elapsed_s += time.perf_counter() - started
    stream.close()
    case.latencies_ms += latencies
    case.round_p50_ms.append(float(np.median(latencies)))


def run_cases(targets: dict[tuple[str, Transport], str], cases: list[Case], rounds: int,
              scale: float) -> None:
    """Run every case once per round, one channel per target.

    Odd rounds run the cases in reverse, so that neither of two neighbours is always first.
    """
    channels = {
        key: grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        for key, address in targets.items()
    }
    try:
        for round_index in range(rounds):
            for case in cases if round_index % 2 == 0 else cases[::-1]:
                run_round(channels[case.server, case.transport], case, scale, round_index)
            print(f"  round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for channel in channels.values():
            channel.close()


def measure_flavours(workdir: Path, rounds: int, scale: float) -> list[Case]:
    """Bare echo, sync vs aio, over a Unix socket and TCP loopback."""
    cases = [
        Case("flavours", f"echo-{flavour}", transport, payload)
        for payload in PAYLOADS
        for transport in ("unix", "tcp")
        for flavour in FLAVOURS
    ]
    with contextlib.ExitStack() as stack:
        targets: dict[tuple[str, Transport], str] = {}
        for flavour in FLAVOURS:
            unix, tcp = stack.enter_context(
                echo_process(flavour, [f"unix://{workdir}/echo-{flavour}.sock", "127.0.0.1:0"])
            )
            targets[f"echo-{flavour}", "unix"] = unix
            targets[f"echo-{flavour}", "tcp"] = tcp
        run_cases(targets, cases, rounds, scale)
    return cases


def write_guard_config(workdir: Path) -> Path:
    """Two small SAELens SAEs, no plugins (so nothing is encoded, detected or recorded)."""
    for d_in, hook in HOOKS.items():
        write_saelens(workdir / f"sae{d_in}", d_in=d_in, d_sae=SAE_WIDTHS[d_in], hook_name=hook)
    config = workdir / "guard.yaml"
    config.write_text(
        "server:\n"
        f"  listen: unix://{workdir}/guard.sock\n"
        f"  max_message_bytes: {MAX_MESSAGE_BYTES}\n"
        "logging:\n"
        "  level: warning\n"
        "plugins:\n"
        "  autoload: false\n"
        "saes:\n"
        + "".join(f"  - path: {workdir}/sae{d_in}\n" for d_in in HOOKS),
        encoding="utf-8",
    )
    return config


@contextlib.contextmanager
def guard_process(workdir: Path) -> Iterator[str]:
    """Start `guard serve`, wait until it is SERVING, yield its address; SIGTERM at the end."""
    guard = GuardProcess(write_guard_config(workdir), f"unix://{workdir}/guard.sock",
                         cwd=REPO_ROOT)
    started = time.monotonic()
    guard.start(READY_TIMEOUT_S)
    print(f"  guard serve SERVING after {time.monotonic() - started:.1f} s", file=sys.stderr)
    try:
        yield guard.address
    finally:
        code = guard.stop()
        if code != 0:
            print(f"  guard serve exited with code {code} after SIGTERM; the end of its "
                  f"log:\n{guard.log_tail(4000)}", file=sys.stderr)


def measure_guard(workdir: Path, echo_flavour: Flavour, rounds: int, scale: float) -> list[Case]:
    """`guard serve` next to the echo servicer of the guard's flavour, both on a Unix socket."""
    echo = f"echo-{echo_flavour}"
    cases = [
        Case("guard", server, "unix", payload)
        for payload in PAYLOADS
        for server in (echo, "guard")
    ]
    with (
        guard_process(workdir) as guard_address,
        echo_process(echo_flavour, [f"unix://{workdir}/echo.sock"]) as (echo_address,),
    ):
        run_cases({(echo, "unix"): echo_address, ("guard", "unix"): guard_address},
                  cases, rounds, scale)
    return cases


def _find(cases: list[Case], server: str, transport: Transport, payload: Payload) -> Case:
    return next(c for c in cases
                if (c.server, c.transport, c.payload) == (server, transport, payload))


def _cells(summary: LatencySummary) -> list[str]:
    return [f"{summary.p50_ms:.3f}", f"{summary.p99_ms:.3f}", f"{summary.per_s:,.0f}"]


def flavours_table(cases: list[Case]) -> str:
    rows = []
    for payload in PAYLOADS:
        for transport in ("unix", "tcp"):
            sync = _find(cases, "echo-sync", transport, payload).summary()
            aio = _find(cases, "echo-aio", transport, payload).summary()
            rows.append([payload.label, transport, *_cells(sync), *_cells(aio),
                         f"{aio.p50_ms / sync.p50_ms:.2f}"])
    return markdown_table(
        ["batch", "socket", "sync p50 ms", "sync p99 ms", "sync batches/s",
         "aio p50 ms", "aio p99 ms", "aio batches/s", "aio/sync p50"],
        rows,
    )


def guard_table(cases: list[Case], echo: str) -> str:
    rows = []
    for payload in PAYLOADS:
        reference = _find(cases, echo, "unix", payload).summary()
        guard = _find(cases, "guard", "unix", payload).summary()
        rows.append([payload.label, *_cells(reference), *_cells(guard),
                     f"{guard.p50_ms / reference.p50_ms:.2f}"])
    return markdown_table(
        ["batch", "echo p50 ms", "echo p99 ms", "echo batches/s",
         "guard p50 ms", "guard p99 ms", "guard batches/s", "guard/echo p50"],
        rows,
    )


def _record(cases: list[Case]) -> list[dict[str, Any]]:
    return [
        {
            "server": case.server,
            "transport": case.transport,
            "rows": case.payload.rows,
            "d_in": case.payload.d_in,
            "bytes": case.payload.nbytes,
            "summary": asdict(case.summary()),
            "round_p50_ms": case.round_p50_ms,
            "latencies_ms": case.latencies_ms,
        }
        for case in cases
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["flavours", "guard", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the round trips per round (0.1 for a smoke run)")
    parser.add_argument("--echo-flavour", choices=FLAVOURS, default="sync",
                        help="the flavour the guard serves with, for its reference")
    parser.add_argument("--write-results", action="store_true",
                        help="record the guard/echo ratios in bench/headlines/transport.json "
                             "(the performance page, bench/summary.py)")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "benchmark": "transport",
        "machine": machine(),
        "grpc": grpc.__version__,
        "rounds": args.rounds,
        "scale": args.scale,
        "warmup_per_stream": max(5, round(WARMUP * args.scale)),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }

    def save() -> None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        workdir = Path(tmp)
        if args.part in ("flavours", "all"):
            print("echo sync vs aio (inline round trips):", file=sys.stderr, flush=True)
            cases = measure_flavours(workdir, args.rounds, args.scale)
            print("\n### Echo servicer: sync vs aio\n\n" + flavours_table(cases) + "\n", flush=True)
            results["flavours"] = _record(cases)
            save()
        if args.part in ("guard", "all"):
            print("guard serve vs echo (inline round trips):", file=sys.stderr, flush=True)
            cases = measure_guard(workdir, args.echo_flavour, args.rounds, args.scale)
            echo = f"echo-{args.echo_flavour}"
            print(f"\n### guard serve vs echo ({echo}, Unix socket)\n\n"
                  + guard_table(cases, echo) + "\n", flush=True)
            results["guard"] = _record(cases)
            save()
            if args.write_results:
                write_headline("transport", [
                    {"label": f"guard serve / echo, INLINE p50, {payload.label}",
                     "ratio": _find(cases, "guard", "unix", payload).summary().p50_ms
                     / _find(cases, echo, "unix", payload).summary().p50_ms,
                     "reference": f"bare {echo} servicer, Unix socket", "better": "lower",
                     "target": 1.2}
                    for payload in PAYLOADS])
    print(f"raw results: {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
