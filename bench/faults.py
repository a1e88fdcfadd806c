"""Fault cycles, long: SIGTERM drains and SIGKILLs of a real ``guard serve`` under load, over and
over, counting what was lost.

INLINE hosts (threads, one GuardClient each, fail-closed, quick reconnects) stream generations
the whole time. Each cycle lets every host get ``--batches`` verdicts, then either sends
SIGTERM (``server.drain_grace_seconds`` 1: the hosts keep their streams open, so the guard
ends them after the grace) or SIGKILL, waits until every host has applied its policy, and
starts a new sidecar on the same socket; the hosts reconnect by themselves. Decision ids carry
a per-process prefix, so every decision a host received is attributed to the process that made
it, and matched against the decision log (appended by every process) at the end.

Targets: after a SIGTERM, no decision a host received is missing from the log and none is
there twice; no INLINE batch waits out its deadline (faults are detected, not timed out).
After a SIGKILL, records still queued in the killed process are lost by design; the count is
reported.

    python -m bench.faults [--cycles 20] [--streams 4] [--write-results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from bench._stats import machine, markdown_table, write_headline, write_section
from guard.host import GuardClient, Verdict
from guard.host.shm import SharedMemory
from tests.sae_fixtures import write_saelens
from tests.sidecar import Sidecar, poll

HOOK = "blocks.15.hook_resid_post"
OUT = Path(__file__).resolve().parent / "out" / "faults.json"
PREFIX = 16  # hex characters of a decision id that name the process (guard.decision)
WAIT_S = 60.0


class Host(threading.Thread):
    """Generations on one INLINE client until stopped: 8-row prompt, then 16 one-row tokens."""

    def __init__(self, index: int, client: GuardClient, rows: np.ndarray[Any, Any]) -> None:
        super().__init__(name=f"host{index}", daemon=True)
        self.client = client
        self.rows = rows
        self.verdicts: list[Verdict] = []
        self.failure: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            for generation in itertools.count():
                request = f"{self.name}-g{generation}"
                self._send(request, 8, 0, "prompt")
                for token in range(8, 24):
                    if self.stopping.is_set():
                        return
                    self._send(request, 1, token, "generation")
        except BaseException as exc:
            self.failure = exc

    def _send(self, request: str, n: int, start: int, phase: str) -> None:
        self.verdicts.append(self.client.inspect(
            request, HOOK, self.rows[:n], list(range(start, start + n)),
            phase="prompt" if phase == "prompt" else "generation"))
        time.sleep(0.002)  # two shared cores: leave the guard room

    def count(self, source: str | None = None) -> int:
        return sum(1 for v in list(self.verdicts) if source is None or v.source == source)


def wait_guard_verdicts(hosts: list[Host], batches: int) -> None:
    marks = [h.count("guard") for h in hosts]
    poll(lambda: all(h.count("guard") >= c + batches for h, c in zip(hosts, marks, strict=True)),
         WAIT_S, "guard verdicts")


def wait_policy(hosts: list[Host], marks: list[int]) -> None:
    poll(lambda: all(h.count() - h.count("guard") > c for h, c in zip(hosts, marks, strict=True)),
         WAIT_S, "the hosts to apply their policy")


def wait_recovered(hosts: list[Host], marks: list[int], serving: float) -> list[float]:
    """Seconds from ``serving`` to each host's first guard verdict after ``marks``."""
    recovered: dict[int, float] = {}

    def all_back() -> bool:
        for i, (host, mark) in enumerate(zip(hosts, marks, strict=True)):
            if i not in recovered and any(v.source == "guard" for v in host.verdicts[mark:]):
                recovered[i] = time.monotonic() - serving
        return len(recovered) == len(hosts)

    poll(all_back, WAIT_S, "the hosts to reconnect")
    return list(recovered.values())


def config(workdir: Path, shared_memory: bool) -> dict[str, Any]:
    sae = write_saelens(workdir / "sae", 576, 4608, hook_name=HOOK)
    server: dict[str, Any] = {"drain_grace_seconds": 1}
    if shared_memory:
        (workdir / "shm").mkdir(exist_ok=True)
        server["shared_memory"] = {"enabled": True, "allowed_dirs": [str(workdir / "shm")]}
    return {
        "server": server,
        "logging": {"level": "info"},
        "saes": [{"path": str(sae)}],
        "plugins": {"enabled": ["detectors", "decision_log"], "watch_interval_seconds": 0,
                    "config": {
                        "detectors": {"watch": {"hook": HOOK, "features": list(range(0, 4608, 72)),
                                                "threshold": 1.5, "action": "flag"}},
                        "decision_log": {"path": str(workdir / "decisions.jsonl")}}},
    }


def run(cycles: int, streams: int, batches: int, workdir: Path,
        shared_memory: bool = False) -> dict[str, Any]:
    sidecar = Sidecar(workdir, config(workdir, shared_memory), tag="faults")
    region = (SharedMemory(directory=str(workdir / "shm"), size_bytes=4 << 20)
              if shared_memory else None)
    rows = np.random.default_rng(0).normal(size=(8, 576)).astype(np.float32)
    kinds: dict[str, str] = {}  # process prefix -> how that process ended
    recovery_s: list[float] = []
    exit_codes: list[int] = []
    sidecar.start()
    hosts = [Host(i, GuardClient(sidecar.address, hooks=[HOOK], failure_policy="closed",
                                 deadline_ms=5000, reconnect_backoff_ms=50,
                                 reconnect_backoff_max_ms=200, shared_memory=region), rows)
             for i in range(streams)]
    try:
        for host in hosts:
            host.start()

        def assign(kind: str) -> None:
            for host in hosts:
                for verdict in list(host.verdicts):
                    if verdict.source == "guard":
                        kinds.setdefault(verdict.decision_id[:PREFIX], kind)

        for cycle in range(cycles):
            kind = "sigterm" if cycle % 2 == 0 else "sigkill"
            wait_guard_verdicts(hosts, batches)
            assign(kind)
            policy_marks = [h.count() - h.count("guard") for h in hosts]
            if kind == "sigterm":
                sidecar.terminate()
                exit_codes.append(sidecar.wait(WAIT_S))
            else:
                sidecar.kill()
            wait_policy(hosts, policy_marks)
            assign(kind)  # replies that arrived during the drain
            marks = [h.count() for h in hosts]
            sidecar.start()
            recovery_s += wait_recovered(hosts, marks, time.monotonic())
            print(f"  cycle {cycle + 1}/{cycles} ({kind}) done", file=sys.stderr, flush=True)
        wait_guard_verdicts(hosts, batches)
    finally:
        for host in hosts:
            host.stopping.set()
            host.join(WAIT_S)
            host.client.close()
        if sidecar.process is not None and sidecar.process.poll() is None:
            sidecar.terminate()
            exit_codes.append(sidecar.wait(WAIT_S))
        sidecar.stop()
    assign("sigterm")  # the last process was drained too
    failures = [repr(h.failure) for h in hosts if h.failure is not None]

    logged = Counter(str(r["decision_id"]) for r in sidecar.decisions())
    by_kind: dict[str, dict[str, int]] = {}
    for host in hosts:
        for verdict in host.verdicts:
            if verdict.source != "guard":
                continue
            kind = kinds.get(verdict.decision_id[:PREFIX], "unattributed")
            tally = by_kind.setdefault(kind, Counter())
            tally["received"] += 1
            tally["missing"] += logged[verdict.decision_id] == 0
            tally["duplicated"] += logged[verdict.decision_id] > 1
    totals = Counter[str]()
    for host in hosts:
        counts = host.client.counters
        totals.update({"policy": counts.fail_closed, "unavailable": counts.unavailable,
                       "timeouts": counts.timeouts, "errors": counts.errors,
                       "reconnects": counts.reconnects})
    return {
        "cycles": cycles, "streams": streams, "batches_per_cycle": batches,
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "processes": dict(Counter(kinds.values())),
        "client_totals": dict(totals), "exit_codes": exit_codes,
        "recovery_s": recovery_s, "host_failures": failures,
    }


def report(result: dict[str, Any]) -> str:
    rows = []
    for kind in ("sigterm", "sigkill", "unattributed"):
        tally = result["by_kind"].get(kind)
        if tally is None:
            continue
        rows.append([kind, str(result["processes"].get(kind, 0)), f"{tally['received']:,}",
                     str(tally.get("missing", 0)), str(tally.get("duplicated", 0))])
    table = markdown_table(["process ended by", "processes", "decisions received by hosts",
                            "missing from the log", "in the log twice"], rows)
    totals = result["client_totals"]
    recovery = np.asarray(result["recovery_s"] or [float("nan")])
    codes = Counter(result["exit_codes"])
    lines = [
        f"- host verdicts decided by the policy (fail-closed): {totals['policy']:,}, all "
        f"with the guard known unavailable: {totals['unavailable']:,}; deadlines run out: "
        f"{totals['timeouts']}; per-batch errors: {totals['errors']}",
        f"- streams reopened by the hosts: {totals['reconnects']} ({result['streams']} hosts x "
        f"{result['cycles']} restarts, attempts while the sidecar was down included)",
        f"- from a restarted sidecar SERVING to each host's first guard verdict: median "
        f"{np.median(recovery):.2f} s, max {recovery.max():.2f} s (backoff 50-200 ms)",
        f"- exit codes after SIGTERM: {dict(codes)}; host thread failures: "
        f"{len(result['host_failures'])}",
    ]
    return table + "\n\n" + "\n".join(lines)


def quiet_host_logs() -> None:
    """The hosts' own warnings (one per policy verdict while the guard is down) only
    clutter a benchmark's output: errors only."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20, help="faults (alternating)")
    parser.add_argument("--streams", type=int, default=4, help="INLINE host streams")
    parser.add_argument("--batches", type=int, default=100,
                        help="guard verdicts each host gets between faults")
    parser.add_argument("--shared-memory", action="store_true",
                        help="rows in shared memory, batches on the doorbell socket")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    quiet_host_logs()
    started = time.strftime("%Y-%m-%d %H:%M")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="guard-faults-") as tmp:
        result = run(args.cycles, args.streams, args.batches, Path(tmp), args.shared_memory)
    took = time.monotonic() - began
    text = report(result)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "started": started, "took_s": took,
                               **result}, indent=1) + "\n", encoding="utf-8")
    print(f"raw results: {os.path.relpath(OUT)}")
    if args.write_results:
        name = "faults-doorbell" if args.shared_memory else "faults"
        flag = " --shared-memory" if args.shared_memory else ""
        transport = ("rows in shared memory, batches on the doorbell socket"
                     if args.shared_memory else "rows as gRPC bytes")
        term = result["by_kind"].get("sigterm", {})
        received = term.get("received", 0)
        if received:
            write_headline(name, [
                {"label": f"decisions logged once / received, {args.cycles} SIGTERM+kill "
                          f"cycles (SIGTERM ones){' (doorbell)' if args.shared_memory else ''}",
                 "ratio": (received - term.get("missing", 0) - term.get("duplicated", 0))
                 / received,
                 "reference": "every decision id the hosts received", "better": "higher",
                 "target": 1.0}])
        write_section(name, (
            f"## Fault cycles{', shared memory and the doorbell' if args.shared_memory else ''}"
            " (`bench/faults.py`)\n\n"
            f"`python -m bench.faults --cycles {args.cycles} --streams {args.streams} "
            f"--batches {args.batches}{flag} --write-results`, run {started} ({took:.0f} s); "
            f"{transport}. A real "
            "`guard serve` (576x4608 SAE, a threshold detector, the decision log) under "
            f"{args.streams} INLINE hosts streaming the whole time (fail-closed, deadline "
            "5 s); each cycle every host gets "
            f"{args.batches} guard verdicts, then the sidecar gets SIGTERM (drain grace 1 s, "
            "the hosts keep their streams open) or SIGKILL, alternately, and a new one starts "
            "on the same socket. Every decision a host received is attributed to its process "
            "(decision id prefix) and looked up in the decision log. Targets: nothing missing "
            "or doubled after a SIGTERM; no deadline run out. After a SIGKILL the records "
            "still queued in the killed process are lost by design. The tests "
            "(tests/test_faults.py) run one cycle of each.\n\n"
            f"{text}\n"))


if __name__ == "__main__":
    main()
