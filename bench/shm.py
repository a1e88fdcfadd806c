"""INLINE round trips of `[32, d]` batches: gRPC bytes vs the shared-memory transport.

A real ``guard serve`` process (SAEs of width 576, 2304 and 4096, no plugins: nothing is
encoded, so this is transport, codec, validation and the decision path) with
``server.shared_memory`` on, and one ``guard.host.GuardClient`` per case in this process, all
INLINE over the guard's Unix socket. Cases per width, interleaved in rounds (every other round
reversed) so that drift on a noisy machine hits every case alike:

- ``bytes``: the rows travel in ``Tensor.raw`` (the default client);
- ``shm``: the client was built with ``shared_memory=``: the rows go into the region file and
  the message carries ``{region, offset, length}``;
- ``floor``: a ``[1, d]`` batch as bytes: the fixed cost of one round trip (gRPC, the SDK's
  threads, the guard's decision), which no transport can remove;
- ``wire-bytes`` / ``wire-shm``: the same two paths without the SDK, on a bare stub driven
  from the calling thread (as ``bench/transport.py`` does): the protocol's own ratio.

The figure of merit is shm p50 / bytes p50 (target: at most 0.25). A breakdown of where the
time goes follows, measured in this process: the host's per-batch work (validate + encode or
place, build and serialize the message) and the guard's (parse the message, decode the rows).

    python -m bench.shm                       # about a minute on a 2-core machine
    python -m bench.shm --rounds 4 --per-round 10 --write-results
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench._stats import (
    LatencySummary,
    machine,
    markdown_table,
    summarize,
    write_headline,
    write_section,
)
from bench.transport import guard_command
from guard import codec
from guard.config import SharedMemoryConfig
from guard.demo import wait_serving
from guard.host import GuardClient
from guard.host._batch import prepare_batch
from guard.host._options import ClientOptions, CounterBox
from guard.host.shm import HostRegion, SharedMemory
from guard.shm import RegionTable
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.sae_fixtures import write_saelens

OUT = Path(__file__).resolve().parent / "out" / "shm.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (576, 2304, 4096)
ROWS = 32
HOOKS = {d: f"blocks.{i}.hook_resid_post" for i, d in enumerate(WIDTHS, start=4)}
CASES = ("bytes", "shm", "shm-grpc", "floor", "wire-bytes", "wire-shm")
TARGET = 0.25
WARMUP = 10


@dataclass
class Case:
    d_in: int
    kind: str
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> LatencySummary:
        return summarize(self.latencies_ms, self.elapsed_s)


def write_config(workdir: Path, shm_dir: Path) -> Path:
    for d_in, hook in HOOKS.items():
        write_saelens(workdir / f"sae{d_in}", d_in=d_in, d_sae=d_in, hook_name=hook)
    config = workdir / "guard.yaml"
    config.write_text(
        "server:\n"
        f"  listen: unix://{workdir}/guard.sock\n"
        "  shared_memory:\n"
        "    enabled: true\n"
        f"    allowed_dirs: [{shm_dir}]\n"
        "logging:\n"
        "  level: warning\n"
        "plugins:\n"
        "  autoload: false\n"
        "saes:\n" + "".join(f"  - path: {workdir}/sae{d_in}\n" for d_in in HOOKS),
        encoding="utf-8",
    )
    return config


@contextlib.contextmanager
def guard_process(workdir: Path, shm_dir: Path) -> Iterator[str]:
    """``guard serve`` with shared memory on; yields its address, SIGTERM at the end."""
    config = write_config(workdir, shm_dir)
    address = f"unix://{workdir}/guard.sock"
    log = workdir / "guard.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(guard_command(config), cwd=REPO_ROOT, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        wait_serving(address, process, log, 120.0)
        yield address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def batch_rows(d_in: int, n: int = ROWS) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(d_in).normal(size=(n, d_in)).astype(np.float32)


class WireStream:
    """One INLINE stream on a bare stub: a request queue in, replies out, one at a time."""

    def __init__(self, channel: grpc.Channel, config: pb.StreamConfig) -> None:
        self._requests: queue.SimpleQueue[pb.InspectRequest | None] = queue.SimpleQueue()
        self._requests.put(pb.InspectRequest(config=config))
        call = pb_grpc.GuardStub(channel).Inspect(iter(self._requests.get, None), timeout=600)
        self._replies = iter(call)
        self.sequence = 0

    def round_trip(self, request: pb.InspectRequest) -> pb.InspectResponse:
        self.sequence += 1
        request.batch.sequence = self.sequence
        self._requests.put(request)
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)
        for _reply in self._replies:
            pass


def wire_request(case: Case, region: HostRegion) -> pb.InspectRequest:
    """The batch of a wire case: bytes, or a slot of ``region`` holding the rows (kept)."""
    rows = batch_rows(case.d_in)
    batch = pb.ActivationBatch(request_id="bench-shm", hook=HOOKS[case.d_in],
                               positions=range(ROWS), phase=pb.PHASE_PROMPT)
    if case.kind == "wire-bytes":
        batch.activations.CopyFrom(pb.Tensor(datatype="F32", shape=rows.shape,
                                             raw=rows.tobytes()))
    else:
        lease = region.place(rows, "F32", rows.nbytes)
        assert lease is not None
        batch.activations.CopyFrom(lease.tensor("F32", list(rows.shape)))
    return pb.InspectRequest(batch=batch)


def run_wire_round(stream: WireStream, request: pb.InspectRequest, case: Case, n: int) -> None:
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        reply = stream.round_trip(request)
        t1 = time.perf_counter_ns()
        if reply.HasField("error") or reply.action != pb.ACTION_CONTINUE:
            raise RuntimeError(f"{case.kind} {case.d_in}: unexpected reply {reply}")
        case.latencies_ms.append((t1 - t0) / 1e6)
    case.elapsed_s += time.perf_counter() - started


def run_round(client: GuardClient, case: Case, n: int) -> None:
    hook = HOOKS[case.d_in]
    rows = batch_rows(case.d_in, 1 if case.kind == "floor" else ROWS)
    positions = list(range(len(rows)))
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        verdict = client.inspect("bench-shm", hook, rows, positions)
        t1 = time.perf_counter_ns()
        if verdict.source != "guard":
            raise RuntimeError(f"{case.kind} {case.d_in}: not decided by the guard: "
                               f"{verdict.reason}")
        case.latencies_ms.append((t1 - t0) / 1e6)
    case.elapsed_s += time.perf_counter() - started


def measure(address: str, shm_dir: Path, rounds: int, per_round: int
            ) -> tuple[list[Case], dict[str, int]]:
    cases = [Case(d, kind) for d in WIDTHS for kind in CASES]
    spec = SharedMemory(directory=str(shm_dir), size_bytes=16 * 1024 * 1024)
    clients = {
        "bytes": GuardClient(address, deadline_ms=10_000, host_name="bench.shm/bytes"),
        "floor": GuardClient(address, deadline_ms=10_000, host_name="bench.shm/floor"),
        "shm": GuardClient(address, deadline_ms=10_000, host_name="bench.shm/shm",
                           shared_memory=spec),
        "shm-grpc": GuardClient(address, deadline_ms=10_000, host_name="bench.shm/shm-grpc",
                                shared_memory=dataclasses.replace(spec, doorbell=False)),
    }
    # The wire cases: one bare stream with a region registered (a region of its own).
    channel = grpc.insecure_channel(address)
    region = HostRegion(SharedMemory(directory=str(shm_dir), size_bytes=4 * 1024 * 1024),
                        CounterBox())
    wire = WireStream(channel, pb.StreamConfig(mode=pb.MODE_INLINE, host="bench.shm/wire",
                                               shared_memory=[region.registration()]))
    requests = {(c.d_in, c.kind): wire_request(c, region) for c in cases
                if c.kind.startswith("wire")}

    def one(case: Case, n: int) -> None:
        if case.kind.startswith("wire"):
            run_wire_round(wire, requests[case.d_in, case.kind], case, n)
        else:
            run_round(clients[case.kind], case, n)

    try:
        for case in cases:  # warm-up: streams open, the guard's first batches of each hook
            one(Case(case.d_in, case.kind), WARMUP)
        for index in range(rounds):
            for case in cases if index % 2 == 0 else cases[::-1]:
                one(case, per_round)
            print(f"  round {index + 1}/{rounds} done", file=sys.stderr, flush=True)
        counters = clients["shm"].counters
        counts = {"shm_batches": counters.shm_batches, "shm_fallbacks": counters.shm_fallbacks}
    finally:
        wire.close()
        channel.close()
        region.close()
        for client in clients.values():
            client.close()
    return cases, counts


def _per_call_us(work: Callable[[], object], n: int) -> float:
    work()
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        work()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3


def breakdown(shm_dir: Path, n: int) -> list[dict[str, Any]]:
    """Per-batch CPU work on each side, in this process (medians in microseconds)."""
    options = ClientOptions.build(
        "unix:///unused.sock", mode="inline", hooks=(), failure_policy="open",
        deadline_ms=50, queue_size=1, host_name="", reconnect_backoff_ms=100,
        reconnect_backoff_max_ms=100, reconnect_jitter=0.0, max_message_bytes=32 << 20,
        wire_dtype="auto", reset_after_late=2, metadata=None, trace_context=None,
        on_reply=None)
    region = HostRegion(SharedMemory(directory=str(shm_dir), size_bytes=4 * 1024 * 1024),
                        CounterBox())
    table = RegionTable(SharedMemoryConfig(enabled=True, allowed_dirs=(str(shm_dir),)))
    table.register([("host", region.path, region.spec.size_bytes, True)])
    try:
        return [_breakdown_width(options, region, table, d_in, n) for d_in in WIDTHS]
    finally:
        table.close()
        region.close()


def _breakdown_width(options: ClientOptions, region: HostRegion, table: RegionTable,
                     d_in: int, n: int) -> dict[str, Any]:
    rows = batch_rows(d_in)
    positions = list(range(ROWS))
    hook = HOOKS[d_in]

    def host_bytes() -> bytes:
        item = prepare_batch(options, "r", hook, rows, positions, None, "prompt", None)
        return item.to_request().SerializeToString()

    def host_shm() -> bytes:
        item = prepare_batch(options, "r", hook, rows, positions, None, "prompt", None,
                             place=region.place)
        data = item.to_request().SerializeToString()
        assert item.shm is not None
        item.shm.release()
        return data

    wire_bytes, wire_shm = host_bytes(), host_shm()

    def guard_bytes() -> object:
        tensor = pb.InspectRequest.FromString(wire_bytes).batch.activations
        return codec.decode(tensor.datatype, tuple(tensor.shape), tensor.raw)

    def guard_shm() -> object:
        tensor = pb.InspectRequest.FromString(wire_shm).batch.activations
        ref = tensor.shm
        shape = (int(tensor.shape[0]), int(tensor.shape[1]))
        return table.rows("batch.activations.shm", ref.region, ref.offset, ref.length,
                          tensor.datatype, shape)

    return {
        "d_in": d_in,
        "message_bytes": {"bytes": len(wire_bytes), "shm": len(wire_shm)},
        "host_us": {"bytes": _per_call_us(host_bytes, n), "shm": _per_call_us(host_shm, n)},
        "guard_us": {"bytes": _per_call_us(guard_bytes, n), "shm": _per_call_us(guard_shm, n)},
    }


def tables(cases: list[Case], parts: list[dict[str, Any]]) -> tuple[str, str]:
    def find(d_in: int, kind: str) -> LatencySummary:
        return next(c for c in cases if (c.d_in, c.kind) == (d_in, kind)).summary()

    rows = []
    for d_in in WIDTHS:
        b, s, f = find(d_in, "bytes"), find(d_in, "shm"), find(d_in, "floor")
        wb, ws = find(d_in, "wire-bytes"), find(d_in, "wire-shm")
        rows.append([f"{ROWS}x{d_in}", f"{ROWS * d_in * 4 / 1024:,.0f} KiB",
                     f"{b.p50_ms:.3f} / {b.p99_ms:.3f}", f"{s.p50_ms:.3f} / {s.p99_ms:.3f}",
                     f"**{s.p50_ms / b.p50_ms:.2f}**", f"{f.p50_ms:.3f}",
                     f"{wb.p50_ms:.3f} / {wb.p99_ms:.3f}", f"{ws.p50_ms:.3f} / {ws.p99_ms:.3f}",
                     f"**{ws.p50_ms / wb.p50_ms:.2f}**"])
    latency = markdown_table(
        ["batch", "F32 rows", "SDK bytes p50/p99 ms", "SDK shm p50/p99 ms", "SDK shm/bytes",
         "SDK floor p50 ms", "wire bytes p50/p99 ms", "wire shm p50/p99 ms",
         "wire shm/bytes"], rows)
    detail = markdown_table(
        ["batch", "message bytes / shm", "host us bytes / shm", "guard us bytes / shm"],
        [[f"{ROWS}x{p['d_in']}",
          f"{p['message_bytes']['bytes']:,} / {p['message_bytes']['shm']:,}",
          f"{p['host_us']['bytes']:.1f} / {p['host_us']['shm']:.1f}",
          f"{p['guard_us']['bytes']:.1f} / {p['guard_us']['shm']:.1f}"] for p in parts])
    return latency, detail


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    parser.add_argument("--per-round", type=int, default=40,
                        help="round trips per case and round (40)")
    parser.add_argument("--write-results", action="store_true",
                        help="write the shm section of bench/RESULTS.md")
    args = parser.parse_args(argv)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with (tempfile.TemporaryDirectory(prefix="guard-bench-shm-") as tmp,
          tempfile.TemporaryDirectory(prefix="guard-bench-region-", dir=base) as shm_tmp):
        workdir, shm_dir = Path(tmp), Path(shm_tmp)
        print("guard serve: bytes vs shared memory (INLINE round trips):", file=sys.stderr)
        with guard_process(workdir, shm_dir) as address:
            cases, counts = measure(address, shm_dir, args.rounds, args.per_round)
        parts = breakdown(shm_dir, 200)
    latency, detail = tables(cases, parts)
    ratios: dict[str, float] = {}
    for d_in in WIDTHS:
        p50 = {c.kind: c.summary().p50_ms for c in cases if c.d_in == d_in}
        ratios[f"sdk {d_in}"] = p50["shm"] / p50["bytes"]
        ratios[f"wire {d_in}"] = p50["wire-shm"] / p50["wire-bytes"]
    load = os.getloadavg()
    results: dict[str, Any] = {
        "benchmark": "shm", "machine": machine(), "grpc": grpc.__version__,
        "rounds": args.rounds, "per_round": args.per_round, "warmup": WARMUP,
        "loadavg": load, "region_dir": str(base or "tmp"), "client_counts": counts,
        "ratios_p50": ratios, "target": TARGET, "breakdown": parts,
        "cases": [{"d_in": c.d_in, "kind": c.kind, "summary": asdict(c.summary()),
                   "latencies_ms": c.latencies_ms} for c in cases],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("\n" + latency + "\n\n" + detail + "\n")
    print(f"shm/bytes p50: {', '.join(f'{d}: {r:.2f}' for d, r in ratios.items())} "
          f"(target <= {TARGET}); client counts {counts}; load average {load[0]:.2f}")
    print(f"raw results: {os.path.relpath(OUT)}")
    if args.write_results:
        write_section("shm", section_text(latency, detail, args, counts, load, ratios, parts))
        write_headline("shm", [
            {"label": f"shared memory / bytes, INLINE p50, {ROWS}x{d_in} F32 (SDK)",
             "ratio": ratios[f"sdk {d_in}"], "reference": "the same client without "
             "shared_memory (rows as gRPC bytes), same guard serve", "better": "lower",
             "target": TARGET,
             "note": "bounded below by the 1-row round trip (see RESULTS.md)"}
            for d_in in WIDTHS])


def section_text(latency: str, detail: str, args: argparse.Namespace, counts: dict[str, int],
                 load: tuple[float, float, float], ratios: dict[str, float],
                 parts: list[dict[str, Any]]) -> str:
    met = all(r <= TARGET for r in ratios.values())
    widest = parts[-1]
    work = {kind: widest["host_us"][kind] + widest["guard_us"][kind] for kind in ("bytes", "shm")}
    verdict = (f"**Target (shm/bytes <= {TARGET}) met at every width.**" if met else
               f"**Target (shm/bytes <= {TARGET}) not met** (best: "
               f"{min(ratios.values()):.2f}). Where the time goes: shared memory removes what "
               "the rows' bytes cost (the breakdown: the host's encode and serialize and the "
               f"guard's parse and decode of a {ROWS}x{widest['d_in']} batch fall from "
               f"{work['bytes']:.0f} us to {work['shm']:.0f} us, and the message from "
               f"{widest['message_bytes']['bytes']:,} to {widest['message_bytes']['shm']} "
               "bytes), and the shm round trip is "
               "within 0.1 ms of the 1-row `floor` at every width. What is left is the fixed "
               "cost of one gRPC message exchange each way over the socket plus the guard's "
               "decision path (the `wire` shm column, no SDK threads: about 0.4 ms here), and "
               "in the SDK its hand-offs between the caller, gRPC's sender thread and the "
               "reply reader (about 0.1 ms more). That floor is most of the bytes path too on "
               "this 2-core machine (gRPC moves 512 KiB over loopback in a few hundred us), so "
               "shm/bytes is bounded below by floor/bytes, about 0.5 at 32x4096 and close to 1 "
               "at 32x576. The issue's 20-50 us is the hand-over of the rows alone, which the "
               "breakdown reproduces, not a round trip. Reaching 0.25 needs a cheaper control "
               "path than a gRPC message per batch (e.g. a doorbell in the region itself), "
               "which is beyond this item.")
    return "\n".join([
        "## Shared-memory transport (`bench/shm.py`)",
        "",
        f"INLINE round trips of `[{ROWS}, d]` F32 batches through `guard serve` (no plugins, so "
        "nothing is encoded) over its Unix socket, from another process: rows as gRPC bytes "
        "(`bytes`) or in a shared-memory region on /dev/shm with only `{region, offset, "
        "length}` in the message (`shm`). `SDK` columns: `guard.host.GuardClient` (one client "
        "per case; `floor` is a `[1, d]` bytes batch, the fixed cost of a round trip); `wire` "
        "columns: a bare stub driven from the calling thread, the protocol without the SDK. "
        f"{args.rounds} interleaved rounds of {args.per_round} round trips per case "
        f"({WARMUP} warm-up each). The machine was shared with other engineers' work (load "
        f"average {load[0]:.2f} on 2 cores at the end of the run): read differences under "
        "about 10% as noise. Shared-memory SDK client: "
        f"{counts['shm_batches']} batches through the region, {counts['shm_fallbacks']} "
        "fallbacks to bytes. Raw latencies: `bench/out/shm.json`.",
        "",
        latency,
        "",
        "Per-batch CPU work, measured in one process (median of 200, microseconds): the host "
        "validates, encodes (bytes) or writes into its slot (shm), builds and serializes the "
        "request; the guard parses it and decodes the rows (for shm: a read-only view on the "
        "mapping, no copy).",
        "",
        detail,
        "",
        verdict,
    ])


if __name__ == "__main__":
    main()
