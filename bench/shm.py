"""INLINE round trips of `[32, d]` batches: gRPC bytes vs the shared-memory transport.

A real ``guard serve`` process (SAEs of width 576, 2304 and 4096, no plugins: nothing is
encoded, so this is transport, codec, validation and the decision path) with
``server.shared_memory`` on, and one ``guard.host.GuardClient`` per case in this process, all
INLINE over the guard's Unix socket. Cases per width, interleaved in rounds (every other round
reversed) so that drift on a noisy machine hits every case alike:

- ``bytes``: the rows travel in ``Tensor.raw`` (the default client);
- ``shm``: the client was built with ``shared_memory=``: the rows go into the region file and
  the batch, carrying ``{region, offset, length}``, goes over the guard's doorbell socket
  (the client's default when the guard serves one);
- ``shm-grpc``: the same with ``SharedMemory(doorbell=False)``: the reference goes as a gRPC
  message;
- ``floor``: a ``[1, d]`` batch as bytes over gRPC: the fixed cost of one gRPC round trip
  (gRPC, the SDK's threads, the guard's decision);
- ``wire-bytes`` / ``wire-shm`` / ``wire-doorbell``: the same paths without the SDK, driven
  from the calling thread (a bare gRPC stub, as ``bench/transport.py`` does, or raw frames on
  the doorbell socket): the protocol's own ratio.

The figure of merit is shm p50 / bytes p50 through the SDK (target: at most 0.25). A
breakdown of where the time goes follows, measured in this process: the host's per-batch work
(validate + encode or place, build and serialize the message) and the guard's (parse the
message, decode the rows).

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
import socket
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
from guard.config import SharedMemoryConfig
from guard.host import GuardClient
from guard.host._batch import prepare_batch
from guard.host._options import ClientOptions, CounterBox
from guard.host.shm import HostRegion, SharedMemory
from guard.sidecar.process import GuardProcess
from guard.sidecar.regions import RegionTable
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from guard.wire.framing import FrameReader, send_frame
from tests.sae_fixtures import write_saelens

OUT = Path(__file__).resolve().parent / "out" / "shm.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (576, 2304, 4096)
ROWS = 32
HOOKS = {d: f"blocks.{i}.hook_resid_post" for i, d in enumerate(WIDTHS, start=4)}
CASES = ("bytes", "shm", "shm-grpc", "floor", "wire-bytes", "wire-shm", "wire-doorbell")
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
    with GuardProcess(write_config(workdir, shm_dir), f"unix://{workdir}/guard.sock",
                      cwd=REPO_ROOT) as guard:
        yield guard.address


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


class WireDoorbell:
    """One INLINE stream on the doorbell socket, frames written and read by the caller."""

    def __init__(self, path: str, config: pb.StreamConfig) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._frames = FrameReader(self._sock, 1 << 28)
        send_frame(self._sock, pb.InspectRequest(config=config).SerializeToString())
        self.sequence = 0

    def round_trip(self, request: pb.InspectRequest) -> pb.InspectResponse:
        self.sequence += 1
        request.batch.sequence = self.sequence
        send_frame(self._sock, request.SerializeToString())
        payload = self._frames.read()
        assert payload is not None, "the guard closed the doorbell stream"
        frame = pb.DoorbellFrame.FromString(payload)
        if frame.WhichOneof("frame") != "reply":
            raise RuntimeError(f"doorbell stream ended: {frame.end}")
        return frame.reply

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)
        while self._frames.read() is not None:
            pass
        self._sock.close()


def wire_request(case: Case, region: HostRegion) -> pb.InspectRequest:
    """The batch of a wire case: bytes, or a slot of ``region`` holding the rows (kept)."""
    rows = batch_rows(case.d_in)
    batch = pb.ActivationBatch(request_id="bench-shm", hook=HOOKS[case.d_in],
                               positions=range(ROWS), phase=pb.PHASE_PROMPT)
    if case.kind == "wire-bytes":  # wire-shm and wire-doorbell: a slot of the region
        batch.activations.CopyFrom(pb.Tensor(datatype="F32", shape=rows.shape,
                                             raw=rows.tobytes()))
    else:
        lease = region.place(rows, "F32", rows.nbytes)
        assert lease is not None
        batch.activations.CopyFrom(lease.tensor("F32", list(rows.shape)))
    return pb.InspectRequest(batch=batch)


def run_wire_round(stream: WireStream | WireDoorbell, request: pb.InspectRequest, case: Case,
                   n: int) -> None:
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


def measure(address: str, doorbell: str, shm_dir: Path, rounds: int, per_round: int
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
    bell = WireDoorbell(doorbell, pb.StreamConfig(mode=pb.MODE_INLINE, host="bench.shm/bell",
                                                  shared_memory=[region.registration()]))
    requests = {(c.d_in, c.kind): wire_request(c, region) for c in cases
                if c.kind.startswith("wire")}

    def one(case: Case, n: int) -> None:
        if case.kind == "wire-doorbell":
            run_wire_round(bell, requests[case.d_in, case.kind], case, n)
        elif case.kind.startswith("wire"):
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
        transports = {name: client.transport for name, client in clients.items()}
        if transports["shm"] != "doorbell" or transports["shm-grpc"] != "grpc":
            raise RuntimeError(f"unexpected transports {transports}")
        counters = clients["shm"].counters
        counts = {"shm_batches": counters.shm_batches, "shm_fallbacks": counters.shm_fallbacks}
    finally:
        bell.close()
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


def tables(cases: list[Case], parts: list[dict[str, Any]]) -> tuple[str, str, str]:
    def find(d_in: int, kind: str) -> LatencySummary:
        return next(c for c in cases if (c.d_in, c.kind) == (d_in, kind)).summary()

    def p50_p99(summary: LatencySummary) -> str:
        return f"{summary.p50_ms:.3f} / {summary.p99_ms:.3f}"

    sdk_rows, wire_rows = [], []
    for d_in in WIDTHS:
        b, s, g, f = (find(d_in, kind) for kind in ("bytes", "shm", "shm-grpc", "floor"))
        sdk_rows.append([f"{ROWS}x{d_in}", f"{ROWS * d_in * 4 / 1024:,.0f} KiB", p50_p99(b),
                         p50_p99(s), f"**{s.p50_ms / b.p50_ms:.2f}**", p50_p99(g),
                         f"{g.p50_ms / b.p50_ms:.2f}", f"{f.p50_ms:.3f}"])
        wb, ws, wd = (find(d_in, kind) for kind in ("wire-bytes", "wire-shm", "wire-doorbell"))
        wire_rows.append([f"{ROWS}x{d_in}", p50_p99(wb), p50_p99(ws),
                          f"{ws.p50_ms / wb.p50_ms:.2f}", p50_p99(wd),
                          f"{wd.p50_ms / wb.p50_ms:.2f}"])
    sdk = markdown_table(
        ["batch", "F32 rows", "bytes p50/p99 ms", "shm, doorbell p50/p99 ms", "shm/bytes",
         "shm over gRPC p50/p99 ms", "shm over gRPC/bytes", "1-row gRPC floor p50 ms"],
        sdk_rows)
    wire = markdown_table(
        ["batch", "wire bytes p50/p99 ms", "wire shm (gRPC) p50/p99 ms", "/bytes",
         "wire shm (doorbell) p50/p99 ms", "/bytes"], wire_rows)
    detail = markdown_table(
        ["batch", "message bytes / shm", "host us bytes / shm", "guard us bytes / shm"],
        [[f"{ROWS}x{p['d_in']}",
          f"{p['message_bytes']['bytes']:,} / {p['message_bytes']['shm']:,}",
          f"{p['host_us']['bytes']:.1f} / {p['host_us']['shm']:.1f}",
          f"{p['guard_us']['bytes']:.1f} / {p['guard_us']['shm']:.1f}"] for p in parts])
    return sdk, wire, detail


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
            doorbell = f"{address[len('unix://'):]}.doorbell"
            cases, counts = measure(address, doorbell, shm_dir, args.rounds, args.per_round)
        parts = breakdown(shm_dir, 200)
    sdk, wire, detail = tables(cases, parts)
    ratios: dict[str, float] = {}
    for d_in in WIDTHS:
        p50 = {c.kind: c.summary().p50_ms for c in cases if c.d_in == d_in}
        ratios[f"sdk {d_in}"] = p50["shm"] / p50["bytes"]
        ratios[f"sdk grpc {d_in}"] = p50["shm-grpc"] / p50["bytes"]
        ratios[f"wire {d_in}"] = p50["wire-shm"] / p50["wire-bytes"]
        ratios[f"wire doorbell {d_in}"] = p50["wire-doorbell"] / p50["wire-bytes"]
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
    print("\n" + sdk + "\n\n" + wire + "\n\n" + detail + "\n")
    print(f"shm/bytes p50: {', '.join(f'{d}: {r:.2f}' for d, r in ratios.items())} "
          f"(target <= {TARGET}); client counts {counts}; load average {load[0]:.2f}")
    print(f"raw results: {os.path.relpath(OUT)}")
    if args.write_results:
        p50_ms = {(c.d_in, c.kind): c.summary().p50_ms for c in cases}
        write_section("shm", section_text(sdk, wire, detail, args, counts, load, ratios,
                                          parts, p50_ms))
        reference = ("the same client without shared_memory (rows as gRPC bytes), same "
                     "guard serve")
        write_headline("shm", [
            {"label": f"shared memory on the doorbell / bytes, INLINE p50, {ROWS}x{d_in} "
                      "F32 (SDK)",
             "ratio": ratios[f"sdk {d_in}"], "reference": reference, "better": "lower",
             "target": TARGET} for d_in in WIDTHS] + [
            {"label": f"shared memory on the doorbell / bytes, INLINE p50, {ROWS}x{d_in} F32 "
                      "(protocol, no SDK)",
             "ratio": ratios[f"wire doorbell {d_in}"], "better": "lower", "target": TARGET,
             "reference": "the same batch as gRPC bytes on a bare stub, same guard serve"}
            for d_in in WIDTHS] + [
            {"label": f"shared memory over gRPC / bytes, INLINE p50, {ROWS}x{d_in} F32 (SDK)",
             "ratio": ratios[f"sdk grpc {d_in}"], "reference": reference, "better": "lower",
             "note": "bounded below by one gRPC exchange per batch (see RESULTS.md)"}
            for d_in in WIDTHS])


def section_text(sdk: str, wire: str, detail: str, args: argparse.Namespace,
                 counts: dict[str, int], load: tuple[float, float, float],
                 ratios: dict[str, float], parts: list[dict[str, Any]],
                 p50_ms: dict[tuple[int, str], float]) -> str:
    wire_ms = [p50_ms[d, "wire-doorbell"] for d in WIDTHS]
    extra_ms = [p50_ms[d, "shm"] - p50_ms[d, "wire-doorbell"] for d in WIDTHS]
    bytes_ms = [p50_ms[d, "bytes"] for d in WIDTHS]
    doorbell = {d: ratios[f"sdk {d}"] for d in WIDTHS}
    protocol = {d: ratios[f"wire doorbell {d}"] for d in WIDTHS}
    met = [d for d, r in doorbell.items() if r <= TARGET]
    protocol_met = all(r <= TARGET for r in protocol.values())
    widest = parts[-1]
    work = {kind: widest["host_us"][kind] + widest["guard_us"][kind] for kind in ("bytes", "shm")}
    if len(met) == len(WIDTHS):
        verdict = f"**Target (shm/bytes <= {TARGET}) met at every width** with the doorbell."
    else:
        missed = ", ".join(f"{ROWS}x{d} ({doorbell[d]:.2f})" for d in WIDTHS if d not in met)
        verdict = (f"**Target (shm/bytes <= {TARGET}) met at "
                   f"{', '.join(f'{ROWS}x{d}' for d in met) or 'no width'}, missed at "
                   f"{missed}** through the host SDK with the doorbell.")
    verdict += (f" The protocol itself (raw doorbell frames against gRPC bytes on a bare stub, "
                f"no SDK): {', '.join(f'{ROWS}x{d} {r:.2f}' for d, r in protocol.items())}, "
                f"{'within' if protocol_met else 'not within'} the target.")
    return "\n".join([
        "## Shared-memory transport (`bench/shm.py`)",
        "",
        f"INLINE round trips of `[{ROWS}, d]` F32 batches through `guard serve` (no plugins, so "
        "nothing is encoded) over its Unix sockets, from another process: rows as gRPC bytes "
        "(`bytes`), or in a shared-memory region on /dev/shm with only `{region, offset, "
        "length}` in the message, sent on the guard's doorbell socket (`shm, doorbell`: the "
        "Inspect stream in length-prefixed frames, what `GuardClient(shared_memory=...)` "
        "uses by default) or as a gRPC message (`shm over gRPC`: "
        "`SharedMemory(doorbell=False)`). One `guard.host.GuardClient` per case; the `1-row "
        "gRPC floor` is a `[1, d]` bytes batch, the fixed cost of a gRPC round trip. The "
        "`wire` table drives the same paths without the SDK from the calling thread (a bare "
        "gRPC stub, raw doorbell frames). "
        f"{args.rounds} interleaved rounds of {args.per_round} round trips per case "
        f"({WARMUP} warm-up each); load average {load[0]:.2f} on 2 cores at the end of the "
        "run: read differences under about 10% as noise. Shared-memory SDK client: "
        f"{counts['shm_batches']} batches through the region, {counts['shm_fallbacks']} "
        "fallbacks to bytes. Raw latencies: `bench/out/shm.json`.",
        "",
        "### Through the host SDK",
        "",
        sdk,
        "",
        "### The protocol alone (no SDK)",
        "",
        wire,
        "",
        "Per-batch CPU work, measured in one process (median of 200, microseconds): the host "
        "validates, encodes (bytes) or writes into its slot (shm), builds and serializes the "
        "request; the guard parses it and decodes the rows (for shm: a read-only view on the "
        "mapping, no copy).",
        "",
        detail,
        "",
        verdict,
        "",
        "Where the time goes: shared memory removes what the rows' bytes cost (the breakdown: "
        f"the host's encode and serialize and the guard's parse and decode of a {ROWS}x"
        f"{widest['d_in']} batch fall from {work['bytes']:.0f} us to {work['shm']:.0f} us, and "
        f"the message from {widest['message_bytes']['bytes']:,} to "
        f"{widest['message_bytes']['shm']} bytes). Over gRPC that leaves one gRPC exchange "
        "each way per batch plus the SDK's hand-offs to gRPC's threads, which is most of the "
        "bytes path too on this machine: shm over gRPC stays near the 1-row floor, so its "
        "ratio is bounded below by floor/bytes (about 0.5 at 32x4096, close to 1 at 32x576). "
        "The doorbell removes that exchange: a frame each way on a Unix socket and the "
        "guard's decision path are what the `wire` doorbell column measures "
        f"({', '.join(f'{p:.3f}' for p in wire_ms)} ms p50), within the target when the "
        "caller does nothing else. Through the SDK, its Python per batch (checking the "
        "arguments, placing the rows in a slot, the request and reply messages, the span, "
        "the verdict, the slot's bookkeeping; the INLINE caller reads its own reply, so no "
        "thread hand-off) adds "
        f"{', '.join(f'{e:.3f}' for e in extra_ms)} ms p50 (SDK shm minus wire doorbell, in "
        "a process with the other cases' clients, on 2 shared cores): more than the whole "
        f"budget at {ROWS}x{WIDTHS[0]}, where the bytes path itself is only "
        f"{bytes_ms[0]:.2f} ms. The issue's 20-50 us is the hand-over of the rows alone (the "
        "breakdown's shm columns), not a round trip.",
    ])


if __name__ == "__main__":
    main()
