"""Engine steps on the wire (issue 13): one multi-request batch per step against one batch per
request, and a step through the sidecar against the same step in process.

A step as vLLM runs one: 32 decode rows of 32 requests (one row each) and a 64-row prefill
chunk of a 33rd request, in one flat ``[96, d_in]`` array. Two guards, each a real
``guard serve`` on a Unix socket driven by the host SDK's ``GuardClient``, each with the same
configuration also loaded in this process (``Engine.load``) as the reference:

- ``576``: the demo's configuration (``guard/defaults/demo.yaml``): the embedded SmolLM2 SAE
  576x4608 (TopK, so every feature is encoded), the linear jailbreak detector over 256
  features, a threshold detector with conditional steering, the decision log to a file,
  metrics on;
- ``4096``: a 4096x32768 SAELens SAE (standard ReLU) with random weights, written to a
  temporary folder, and the same kinds of plugins on 257 random features (a linear detector
  over 256, a threshold detector on one with steering along another), the decision log to a
  file, metrics on. A ReLU SAE encodes only the subscribed features (257 of 32,768 columns).

Measured, each pair of sides in the same rounds, interleaved (every other round reversed):

- ``split``: the ``[96, d_in]`` step as one batch with 33 segments (``inspect_step``) against
  the same rows as 33 single-request batches (``inspect`` per request, one after another),
  INLINE through the sidecar: steps/s, ratio one batch / 33 batches (target >= 10). The same
  comparison in process (``Engine.inspect_step`` against 33 ``Engine.inspect``) shows what is
  left without the wire.
- ``monitor``: 32-request decode steps ``[32, d_in]`` sent back to back in MONITOR mode, first
  send to the last request's verdict, against ``Engine.inspect_step`` on the same steps back
  to back: steps/s, ratio sidecar / in process (target >= 0.9).
- ``inline``: the 32-request decode step one at a time: p50 round trip through the sidecar
  / p50 of ``Engine.inspect_step`` (target <= 1.5).
- ``dispatch``: where an in-process 32-request decode step's time goes: the encode, the
  plugin hooks (``guard_detect`` + ``guard_steer``, summed over the 32 requests), the step's
  one hand-off to the plugin worker and the rest of the per-request loop (the decision, the
  record);
  against the same 32 rows as one request (one plugin call over every row: what a vectorised
  hook would cost at best).

Rows are random normal. JSON in ``bench/out/steps.json``; ``--write-results`` replaces the
``steps`` section of RESULTS.md and ``bench/headlines/steps.json``.

    python -m bench.steps                       # about five minutes
    python -m bench.steps --rounds 1 --scale 0.1 --large-d-in 256 --large-d-sae 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]  # from the host extra (accelerate needs it)
import yaml
from numpy.typing import NDArray

from bench._stats import machine, markdown_table, write_headline, write_section
from guard.decision import ActivationRows, Phase
from guard.decision import Segment as RowSpan
from guard.host import GuardClient, Segment, StepVerdict, Verdict
from guard.sidecar.process import GuardProcess

OUT = Path(__file__).resolve().parent / "out" / "steps.json"
HOOK = "blocks.15.hook_resid_post"
DECODE = 32  # decode rows (one per request) in a step
PREFILL = 64  # rows of the one prefill chunk in the mixed step
#: Targets from issue 13.
SPLIT_TARGET = 10.0
MONITOR_TARGET = 0.9
INLINE_TARGET = 1.5
CPUS = os.cpu_count() or 1
#: The in-process reference with the engine's metrics on, as the sidecar has them.
METERED = "in-process, metrics on"


# -- what is served ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One guard configuration: written twice (the sidecar's, the in-process reference's),
    so that each writes its own decision log."""

    name: str
    d_in: int
    served: str
    sidecar_config: Path
    local_config: Path
    socket: Path

    def no_worker_config(self) -> Path:
        """The in-process configuration with ``plugins.timeout_ms: 0``: the plugins run on
        the calling thread, without the hand-off to the plugin worker (and no budget)."""
        return self._variant("no-worker", timeout_ms=0)

    def metered_config(self) -> Path:
        """The in-process configuration again, for an engine with metrics on (its own log)."""
        return self._variant("metered")

    def _variant(self, name: str, **plugins: object) -> Path:
        data = yaml.safe_load(self.local_config.read_text(encoding="utf-8"))
        folder = self.local_config.parent / name
        folder.mkdir()
        data["plugins"].update(plugins)
        data["plugins"]["config"]["decision_log"]["path"] = str(folder / "decisions.jsonl")
        path = folder / "guard.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path


def demo_setup(state: Path) -> Setup:
    from guard.demo.runner import demo_config

    (state / "local").mkdir(parents=True)
    socket = state / "guard.sock"
    return Setup("576", 576, "the demo's configuration (`guard/defaults/demo.yaml`): the "
                 "embedded SmolLM2 SAE 576x4608, TopK, so every feature is encoded (a TopK "
                 "subset is only exact from the full pre-activations)",
                 demo_config(state, socket), demo_config(state / "local", state / "x.sock"),
                 socket)


def large_setup(state: Path, d_in: int, d_sae: int) -> Setup:
    """A random-weight SAELens SAE (standard ReLU) and demo-like plugins on 257 features."""
    from tests.sae_fixtures import write_saelens

    rng = np.random.default_rng(7)
    w_enc = rng.standard_normal((d_in, d_sae), dtype=np.float32)
    w_enc *= np.float32(1.0 / np.sqrt(d_in))
    weights = {"W_enc": w_enc,
               "b_enc": (0.1 * rng.standard_normal(d_sae, dtype=np.float32)),
               "W_dec": np.ascontiguousarray(w_enc.T),
               "b_dec": (0.1 * rng.standard_normal(d_in, dtype=np.float32))}
    sae = write_saelens(state / "sae", d_in, d_sae, hook_name=HOOK, weights=weights)
    del weights, w_enc
    features = rng.choice(d_sae, size=258, replace=False).tolist()
    linear = {int(f): float(w) for f, w in zip(features[:256], rng.normal(0.0, 0.25, 256),
                                                strict=True)}
    configs = []
    for folder, socket in ((state, state / "guard.sock"), (state / "local", state / "x.sock")):
        folder.mkdir(parents=True, exist_ok=True)
        data = {
            "server": {"listen": f"unix://{socket}"},
            "logging": {"level": "info"},
            "saes": [{"path": str(sae)}],
            "plugins": {"config": {
                "detectors": {
                    "linear": {"type": "linear", "hook": HOOK, "weights": linear, "bias": -1.0,
                               "threshold": 2.0, "reduce": "mean", "action": "abort",
                               "phases": ["prompt"]},
                    "watch": {"type": "threshold", "hook": HOOK, "features": [features[256]],
                              "threshold": 1.0, "reduce": "max", "action": "log"},
                },
                "steering": {"nudge": {"hook": HOOK, "when": "watch", "rows": "fired",
                                       "edits": [{"feature": features[257], "nudge": 6.0}]}},
                "decision_log": {"path": str(folder / "decisions.jsonl")},
            }},
            "telemetry": {"metrics_listen": "127.0.0.1:0"},
        }
        path = folder / "guard.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        configs.append(path)
    return Setup(str(d_in), d_in,
                 f"random-weight SAELens SAE {d_in}x{d_sae}, standard ReLU, fp32 "
                 f"({d_in * d_sae * 4 / 2**20:,.0f} MiB each for W_enc and W_dec), written to a "
                 "temporary folder; the plugins subscribe to 257 random features, and only "
                 "those are encoded (the `features` subset, as the demo's detectors do)",
                 configs[0], configs[1], state / "guard.sock")


# -- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One engine step, as the host sends it and as the engine takes it."""

    rows: NDArray[np.float32]
    segments: list[Segment]
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64]
    batch: ActivationRows

    def parts(self) -> list[tuple[Segment, slice]]:
        starts = np.cumsum([0, *(s.rows for s in self.segments)]).tolist()
        return [(s, slice(a, b)) for s, a, b in zip(self.segments, starts, starts[1:],
                                                    strict=False)]


def make_steps(d_in: int, prefill: int, count: int, seed: int) -> list[Step]:
    """``count`` steps of 32 decode requests (the same ids every step, as in a running
    engine), plus one ``prefill``-row chunk when ``prefill`` is nonzero."""
    rng = np.random.default_rng(seed)
    steps = []
    for number in range(count):
        rows = rng.standard_normal((DECODE + prefill, d_in), dtype=np.float32)
        segments = [Segment(f"decode-{i}", 1, "generation") for i in range(DECODE)]
        positions = [PREFILL + number] * DECODE
        if prefill:
            segments.append(Segment("prefill", prefill, "prompt"))
            positions += range(prefill)
        pos = np.asarray(positions, dtype=np.int64)
        tokens = np.arange(10, 10 + len(pos), dtype=np.int64)
        spans, start = [], 0
        for s in segments:
            spans.append(RowSpan(s.request_id, start, start + s.rows,
                                 Phase.PROMPT if s.phase == "prompt" else Phase.GENERATION))
            start += s.rows
        batch = ActivationRows(request_id="", sequence=number + 1, hook=HOOK, rows=rows,
                               positions=pos, token_ids=tokens, phase=Phase.UNSPECIFIED,
                               segments=tuple(spans))
        steps.append(Step(rows, segments, pos, tokens, batch))
    return steps


# -- the sides --------------------------------------------------------------------------------


def guard_verdict(verdict: Verdict | StepVerdict) -> None:
    if verdict.source != "guard":
        raise SystemExit(f"bench.steps: the guard did not answer: {verdict.reason}")


def sidecar_step(client: GuardClient, step: Step) -> list[str]:
    verdict = client.inspect_step(HOOK, step.rows, step.segments, step.positions,
                                  step.token_ids)
    guard_verdict(verdict)
    return [v.action.name for v in verdict]


def sidecar_split(client: GuardClient, step: Step) -> list[str]:
    actions = []
    for segment, rows in step.parts():
        verdict = client.inspect(segment.request_id, HOOK, step.rows[rows],
                                 step.positions[rows], step.token_ids[rows], segment.phase)
        guard_verdict(verdict)
        actions.append(verdict.action.name)
    return actions


def local_step(engine: Any, step: Step) -> list[str]:
    return [d.action.name for d in engine.inspect_step(step.batch, {}).decisions]


def local_split(engine: Any, step: Step) -> list[str]:
    return [engine.inspect(step.batch.request(span), {}).action.name
            for span in step.batch.segments]


def steps_per_s(run: Callable[[Step], object], steps: list[Step]) -> float:
    started = time.perf_counter()
    for step in steps:
        run(step)
    return len(steps) / (time.perf_counter() - started)


class MonitorRun:
    """MONITOR mode: send every step, count the requests' verdicts, time first send to the
    last verdict."""

    def __init__(self, address: str, steps: int) -> None:
        self.expected = 0
        self.verdicts = 0
        self.not_guard = 0
        self.done = threading.Event()
        self.client = GuardClient(address, mode="monitor", hooks=[HOOK], queue_size=steps + 8,
                                  on_reply=self._on_reply)

    def _on_reply(self, verdict: Verdict) -> None:
        self.verdicts += 1
        if verdict.source != "guard":
            self.not_guard += 1
        if self.verdicts >= self.expected:
            self.done.set()

    def run(self, steps: list[Step]) -> float:
        self.verdicts, self.not_guard = 0, 0
        self.expected = sum(len(s.segments) for s in steps)
        self.done.clear()
        started = time.perf_counter()
        for step in steps:
            self.client.inspect_step(HOOK, step.rows, step.segments, step.positions,
                                     step.token_ids)
        if not self.done.wait(300):
            raise SystemExit(f"bench.steps: {self.verdicts} of {self.expected} MONITOR "
                             f"verdicts ({self.client.counters})")
        if self.not_guard:
            raise SystemExit(f"bench.steps: {self.not_guard} MONITOR verdicts were not the "
                             f"guard's ({self.client.counters})")
        return len(steps) / (time.perf_counter() - started)


@dataclass
class Dispatch:
    """In-process timings (ms) of 32-request decode steps: the step's own split, the step
    with the plugins on the calling thread, and the same rows as one request."""

    step: list[float] = field(default_factory=list)
    encode: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    no_worker: list[float] = field(default_factory=list)
    one: list[float] = field(default_factory=list)
    one_encode: list[float] = field(default_factory=list)
    one_hooks: list[float] = field(default_factory=list)


def hook_ms(timings: Mapping[str, float]) -> float:
    """The plugin hooks' time in one decision (``guard_detect`` + ``guard_steer``)."""
    return (timings.get("detect", 0.0) + timings.get("steer", 0.0)) * 1e3


def local_inline(engine: Any, no_worker: Any, steps: list[Step],
                 dispatch: Dispatch) -> list[float]:
    """``Engine.inspect_step`` one step at a time: latencies, and each step's time split.
    Each step also goes through the engine without the plugin worker, the two alternating
    step by step so that the difference is not the machine's load changing."""
    latencies = []
    for number, step in enumerate(steps):
        if number % 2:
            dispatch.no_worker.append(step_ms(no_worker, step))
        timings: dict[str, float] = {}
        started = time.perf_counter()
        decision = engine.inspect_step(step.batch, timings)
        latencies.append((time.perf_counter() - started) * 1e3)
        dispatch.step.append(timings["total"] * 1e3)
        dispatch.encode.append(timings.get("encode", 0.0) * 1e3)
        dispatch.hooks.append(sum(hook_ms(d.timings) for d in decision.decisions))
        if not number % 2:
            dispatch.no_worker.append(step_ms(no_worker, step))
    return latencies


def step_ms(engine: Any, step: Step) -> float:
    timings: dict[str, float] = {}
    engine.inspect_step(step.batch, timings)
    return timings["total"] * 1e3


def local_one_request(engine: Any, steps: list[Step], dispatch: Dispatch) -> None:
    """The same 32 rows as one request's batch: one plugin call over every row."""
    for step in steps:
        batch = ActivationRows(request_id="one-request", sequence=step.batch.sequence,
                               hook=HOOK, rows=step.rows, positions=step.positions,
                               token_ids=step.token_ids, phase=Phase.GENERATION)
        timings: dict[str, float] = {}
        decision = engine.inspect(batch, timings)
        dispatch.one.append(timings["total"] * 1e3)
        dispatch.one_encode.append(timings.get("encode", 0.0) * 1e3)
        dispatch.one_hooks.append(hook_ms(decision.timings))


def sidecar_inline(client: GuardClient, steps: list[Step]) -> list[float]:
    latencies = []
    for step in steps:
        started = time.perf_counter()
        sidecar_step(client, step)
        latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


# -- one configuration ------------------------------------------------------------------------


@dataclass
class Counts:
    split: int
    monitor: int
    inline: int


@dataclass
class Measured:
    """Every sample of one configuration's cases over the rounds."""

    split: dict[str, list[float]] = field(default_factory=lambda: {
        "sidecar step": [], "sidecar 33": [], "in-process step": [], "in-process 33": []})
    monitor: dict[str, list[float]] = field(default_factory=lambda: {
        "sidecar": [], "in-process": [], METERED: []})
    inline: dict[str, list[float]] = field(default_factory=lambda: {
        "sidecar": [], "in-process": []})
    #: Each round's p50 of ``inline``.
    inline_rounds: dict[str, list[float]] = field(default_factory=lambda: {
        "sidecar": [], "in-process": []})
    dispatch: Dispatch = field(default_factory=Dispatch)
    #: CPU ms per MONITOR step: the sidecar's process and this (host) process; in process.
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {
        "sidecar: guard serve": [], "sidecar: host": [], "in-process": [], METERED: []})
    actions: Counter[str] = field(default_factory=Counter)
    disagreements: int = 0
    compared: int = 0


def measure(setup: Setup, rounds: int, counts: Counts) -> Measured:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from guard.config import load_config
    from guard.engine.core import Engine
    from guard.telemetry.instruments import Instruments

    guard = GuardProcess(setup.sidecar_config, f"unix://{setup.socket}").start(600)
    sidecar_cpu = psutil.Process(guard.pid)
    engine = Engine.load(load_config(setup.local_config))
    no_worker = Engine.load(load_config(setup.no_worker_config()))
    # The engine's metrics recorded as in `guard serve` (an OpenTelemetry MeterProvider; the
    # sidecar's per-batch metrics are not part of the engine).
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    metered = Engine.load(load_config(setup.metered_config()),
                          instruments=Instruments(None, meters))
    client = GuardClient(guard.address, mode="inline", hooks=[HOOK], deadline_ms=30_000)
    monitor_run = MonitorRun(guard.address, counts.monitor)
    out = Measured()
    try:
        warm = make_steps(setup.d_in, PREFILL, 3, seed=1)
        for step in warm:
            sidecar_step(client, step)
            sidecar_split(client, step)
            local_step(engine, step)
            local_split(engine, step)
        monitor_run.run(make_steps(setup.d_in, 0, min(counts.monitor, 20), seed=2))
        for round_index in range(rounds):
            reverse = bool(round_index % 2)
            mixed = make_steps(setup.d_in, PREFILL, counts.split, seed=100 + round_index)
            # The sidecar's verdicts, per request, for one batch and for 33 batches.
            split_runs: dict[str, Callable[[Step], object]] = {
                "sidecar step": lambda s: out.actions.update(sidecar_step(client, s)),
                "sidecar 33": lambda s: sidecar_split(client, s),
                "in-process step": lambda s: local_step(engine, s),
                "in-process 33": lambda s: local_split(engine, s),
            }
            for case in (reversed(split_runs) if reverse else split_runs):
                out.split[case].append(steps_per_s(split_runs[case], mixed))
            agree(client, mixed[:2], out)

            decode = make_steps(setup.d_in, 0, counts.monitor, seed=200 + round_index)
            sides = list(out.monitor)
            for case in (sides[::-1] if reverse else sides):
                here, there = time.process_time(), cpu_seconds(sidecar_cpu)
                if case == "sidecar":
                    out.monitor[case].append(monitor_run.run(decode))
                    out.cpu_ms["sidecar: guard serve"].append(
                        (cpu_seconds(sidecar_cpu) - there) * 1e3 / len(decode))
                    out.cpu_ms["sidecar: host"].append(
                        (time.process_time() - here) * 1e3 / len(decode))
                else:
                    local = engine if case == "in-process" else metered
                    out.monitor[case].append(
                        steps_per_s(partial(local_step, local), decode))
                    out.cpu_ms[case].append((time.process_time() - here) * 1e3 / len(decode))

            decode = decode[:counts.inline]
            sides = ["sidecar", "in-process", "one request"]
            for case in (sides[::-1] if reverse else sides):
                if case == "sidecar":
                    latencies = sidecar_inline(client, decode)
                elif case == "in-process":
                    latencies = local_inline(engine, no_worker, decode, out.dispatch)
                else:
                    local_one_request(engine, decode, out.dispatch)
                    continue
                out.inline[case].extend(latencies)
                out.inline_rounds[case].append(p50(latencies))
            print(f"  d {setup.name} round {round_index + 1}/{rounds}: split "
                  f"{out.split['sidecar step'][-1]:.1f}/{out.split['sidecar 33'][-1]:.1f} "
                  f"steps/s, monitor {out.monitor['sidecar'][-1]:.1f}/"
                  f"{out.monitor['in-process'][-1]:.1f} steps/s, inline "
                  f"{out.inline_rounds['sidecar'][-1]:.2f}/"
                  f"{out.inline_rounds['in-process'][-1]:.2f} ms", flush=True)
    finally:
        client.close()
        monitor_run.client.close()
        engine.close()
        no_worker.close()
        metered.close()
        meters.shutdown()
        guard.stop()
    return out


def cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def agree(client: GuardClient, steps: list[Step], out: Measured) -> None:
    """Each request's verdict in a step is what its rows get alone (the plugins here keep
    no per-request state)."""
    for step in steps:
        one, alone = sidecar_step(client, step), sidecar_split(client, step)
        out.compared += len(one)
        out.disagreements += sum(a != b for a, b in zip(one, alone, strict=True))


# -- report -----------------------------------------------------------------------------------


def p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def per_round(measured: list[float], reference: list[float]) -> list[float]:
    return [a / b for a, b in zip(measured, reference, strict=True)]


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def met(ratio: float, target: float, better: str) -> bool:
    return ratio <= target if better == "lower" else ratio >= target


def status(ratio: float, target: float, better: str) -> str:
    return (f"{'<=' if better == 'lower' else '>='} {target:g} "
            f"({'met' if met(ratio, target, better) else 'missed'})")


def summarise(name: str, m: Measured) -> dict[str, Any]:
    d = m.dispatch
    step, encode, hooks = med(d.step), med(d.encode), med(d.hooks)
    # Signed: the worker runs request i+1's plugins while the calling thread decides request
    # i, which can more than pay for the one hand-off (the step then beats the inline one).
    handoff = step - med(d.no_worker)
    one, one_encode, one_hooks = med(d.one), med(d.one_encode), med(d.one_hooks)
    loop = step - encode
    return {
        "d_in": name,
        "split_sidecar": med(m.split["sidecar step"]) / med(m.split["sidecar 33"]),
        "split_in_process": med(m.split["in-process step"]) / med(m.split["in-process 33"]),
        "monitor": med(m.monitor["sidecar"]) / med(m.monitor["in-process"]),
        "monitor_metered": med(m.monitor["sidecar"]) / med(m.monitor[METERED]),
        "inline": p50(m.inline["sidecar"]) / p50(m.inline["in-process"]),
        # Each round's ratio: how much the machine's load moved them.
        "round_ratios": {
            "split_sidecar": per_round(m.split["sidecar step"], m.split["sidecar 33"]),
            "split_in_process": per_round(m.split["in-process step"], m.split["in-process 33"]),
            "monitor": per_round(m.monitor["sidecar"], m.monitor["in-process"]),
            "monitor_metered": per_round(m.monitor["sidecar"], m.monitor[METERED]),
            "inline": per_round(m.inline_rounds["sidecar"], m.inline_rounds["in-process"])},
        "rates": {k: med(v) for k, v in m.split.items()} | {
            f"monitor {k}": med(v) for k, v in m.monitor.items()},
        "inline_ms": {k: p50(v) for k, v in m.inline.items()},
        "inline_p99_ms": {k: float(np.percentile(v, 99)) for k, v in m.inline.items()},
        "monitor_cpu_ms_per_step": {k: med(v) for k, v in m.cpu_ms.items()},
        # The in-process 32-request step: encode, the one hand-off to the plugin worker (all
        # 32 requests' calls in one job), then per request the plugin hooks and the engine's
        # own part (features, steering, decision, record).
        "dispatch_ms": {"step": step, "encode": encode, "loop": loop, "hooks": hooks,
                        "handoff": handoff, "engine": loop - hooks - handoff,
                        "no_worker_step": med(d.no_worker), "one_request": one,
                        "one_request_encode": one_encode, "one_request_hooks": one_hooks},
        "loop_share": loop / step,
        # What a vectorised hook (one plugin call over the step's rows) would save: the 32
        # calls' time less one call over 32 rows.
        "vectorised_saving": (hooks - one_hooks) / step,
        "handoff_share": handoff / step,
        "actions": dict(m.actions),
        "verdicts_compared": m.compared,
        "verdicts_disagreeing": m.disagreements,
        "samples": {"split": m.split, "monitor": m.monitor, "inline": m.inline,
                    "monitor_cpu_ms": m.cpu_ms},
    }


def table_row(r: dict[str, Any], label: str, measured: str, reference: str, key: str,
              goal: tuple[float, str] | None = None) -> list[str]:
    """A row of the main table: ``r[key]`` with its rounds' range and target."""
    return [label, measured, reference, f"{r[key]:.2f}x", spread(r["round_ratios"][key]),
            "" if goal is None else status(r[key], *goal)]


def tables(results: dict[str, dict[str, Any]]) -> tuple[str, str]:
    rows = []
    for name, r in results.items():
        rates, ms = r["rates"], r["inline_ms"]
        row = partial(table_row, r)
        mixed, decode = f"[{DECODE + PREFILL}, {name}]", f"[{DECODE}, {name}]"
        rows += [
            row(f"one 33-request batch / 33 batches, through the sidecar (INLINE), {mixed}",
                f"{rates['sidecar step']:.1f} steps/s", f"{rates['sidecar 33']:.1f} steps/s",
                "split_sidecar", (SPLIT_TARGET, "higher")),
            row(f"one 33-request batch / 33 batches, in process, {mixed}",
                f"{rates['in-process step']:.1f} steps/s",
                f"{rates['in-process 33']:.1f} steps/s", "split_in_process"),
            row(f"MONITOR through the sidecar / in process, 32-request steps {decode}",
                f"{rates['monitor sidecar']:.1f} steps/s",
                f"{rates['monitor in-process']:.1f} steps/s", "monitor",
                (MONITOR_TARGET, "higher")),
            row(f"MONITOR through the sidecar / in process with the engine's metrics on, "
                f"{decode}", f"{rates['monitor sidecar']:.1f} steps/s",
                f"{rates['monitor ' + METERED]:.1f} steps/s", "monitor_metered"),
            row(f"INLINE p50 through the sidecar / in process, 32-request step {decode}",
                f"{ms['sidecar']:.2f} ms (p99 {r['inline_p99_ms']['sidecar']:.2f})",
                f"{ms['in-process']:.2f} ms", "inline", (INLINE_TARGET, "lower")),
        ]
    main_table = markdown_table(
        ["case (measured / reference)", "measured", "reference", "ratio", "rounds' range",
         "target"], rows)
    rows = []
    for name, r in results.items():
        d = r["dispatch_ms"]
        rows.append([
            f"[{DECODE}, {name}]", f"{d['step']:.2f}", f"{d['encode']:.2f}",
            f"{d['hooks']:.2f}", f"{d['handoff']:.2f}", f"{d['engine']:.2f}",
            f"{r['loop_share']:.0%}",
            f"{d['one_request']:.2f} ({d['one_request_encode']:.2f} encode, "
            f"{d['one_request_hooks']:.2f} hooks)",
            f"{r['vectorised_saving']:.0%}"])
    dispatch_table = markdown_table(
        ["in-process 32-request decode step", "step ms", "encode", "plugin hooks (32 calls)",
         "one hand-off to the plugin worker (step - inline step)", "engine per request (32)",
         "per-request loop / step", "same rows as one request: ms",
         "a vectorised hook would save"], rows)
    return main_table, dispatch_table


def cpu_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in results.items():
        cpu = r["monitor_cpu_ms_per_step"]
        rows.append([f"[{DECODE}, {name}]", f"{cpu['sidecar: guard serve']:.2f}",
                     f"{cpu['sidecar: host']:.2f}", f"{cpu['in-process']:.2f}",
                     f"{cpu[METERED]:.2f}"])
    return markdown_table(["MONITOR step", "guard serve CPU ms", "host (SDK) CPU ms",
                           "in process CPU ms", "in process, metrics on, CPU ms"], rows)


def headlines(results: dict[str, dict[str, Any]]) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for name, r in results.items():
        d = r["dispatch_ms"]
        entries += [
            {"label": f"steps/s, one 33-request batch / 33 batches, INLINE, [96, {name}]",
             "ratio": r["split_sidecar"], "better": "higher", "target": SPLIT_TARGET,
             "reference": "the same rows as 33 single-request batches, same guard serve",
             "note": f"in process, without the wire, {r['split_in_process']:.2f}x: the 33 "
                     f"per-request plugin and decision passes stay in the step"},
            {"label": f"MONITOR steps/s through the sidecar / in process, [32, {name}]",
             "ratio": r["monitor"], "better": "higher", "target": MONITOR_TARGET,
             "reference": "Engine.inspect_step in process, same config and steps",
             "note": f"{r['monitor_metered']:.2f}x against the engine with its metrics on, "
                     "as the sidecar has them"},
            {"label": f"INLINE p50 through the sidecar / in process, 32-request step "
                      f"[32, {name}]",
             "ratio": r["inline"], "better": "lower", "target": INLINE_TARGET,
             "reference": "Engine.inspect_step in process, same config and steps"},
            {"label": f"32 requests' plugin hooks / in-process step, [32, {name}]",
             "ratio": d["hooks"] / d["step"], "better": "lower",
             "reference": "Engine.inspect_step in process, same step",
             "note": f"a vectorised hook would save {r['vectorised_saving']:.0%} of the step; "
                     + handoff_text(r['handoff_share'])},
        ]
    return entries


def outcome(results: dict[str, dict[str, Any]], key: str, target: float, better: str) -> str:
    """``met`` or ``missed at d ...``, then each d's ratio with its rounds' range, and
    whether the target lies within that range (the machine's load then decides)."""
    missed = [n for n, r in results.items() if not met(r[key], target, better)]
    within = [n for n, r in results.items()
              if min(r["round_ratios"][key]) <= target <= max(r["round_ratios"][key])]
    return (("met" if not missed else f"missed at d {' and '.join(missed)}") + "** ("
            + "; ".join(f"{r[key]:.2f}x at d {n}, rounds {spread(r['round_ratios'][key])}"
                        for n, r in results.items())
            + ("" if not within else
               f"; at d {' and '.join(within)} the target lies within the rounds' range: "
               "the machine's load can move this one either way") + ")")


def verdict_text(results: dict[str, dict[str, Any]], busy: bool) -> str:
    """The targets, met or missed, and why, from the numbers of this run."""
    def each(text: Callable[[str, dict[str, Any]], str], sep: str = ", ") -> str:
        return sep.join(text(n, r) for n, r in results.items())

    def cpu(r: dict[str, Any]) -> dict[str, float]:
        return dict(r["monitor_cpu_ms_per_step"])

    split = (
        "- **One batch per step against 33 batches, target >= 10x: "
        + outcome(results, "split_sidecar", SPLIT_TARGET, "higher") + ". "
        "A step saves 32 round trips, 32 encoder calls and 32 hand-offs to the plugin worker, "
        "not the 33 per-request passes (the plugin hooks, the decision and its record), "
        "which with the step's one hand-off take about "
        + each(lambda n, r: f"{r['dispatch_ms']['loop'] / DECODE:.2f} ms (d {n})")
        + " in process: most of a step's time. In process, without any wire, one batch is "
        + each(lambda n, r: f"{r['split_in_process']:.2f}x (d {n})", " and ")
        + " as fast as 33; the wire's cost per batch lifts that to the ratios above. 10x "
        "needs the per-request pass to be a small part of a step (the dispatch table below: "
        "the hand-offs to the plugin worker are down to one per step; what is left per request "
        "is the plugin hooks and the engine's own part).")
    monitor = (
        "- **MONITOR through the sidecar, target >= 0.9x in process: "
        + outcome(results, "monitor", MONITOR_TARGET, "higher")
        + "; 0.48x on 1-row batches before steps, `e2e`. CPU per step: "
        + each(lambda n, r: f"d {n}: guard serve {cpu(r)['sidecar: guard serve']:.1f} ms + "
               f"host {cpu(r)['sidecar: host']:.1f} ms against {cpu(r)['in-process']:.1f} ms "
               f"in process", "; ")
        + ". The sidecar records the engine's metrics for every request of a step (on in the "
        "demo config and here; the in-process `Engine.load` reference has none): with them on "
        "in process too, the engine's CPU per step rises by "
        + each(lambda n, r: f"{cpu(r)[METERED] - cpu(r)['in-process']:.1f} ms (d {n}, where "
               f"guard serve spends "
               f"{cpu(r)['sidecar: guard serve'] - cpu(r)['in-process']:.1f} ms more than the "
               "plain engine)")
        + ", and the sidecar's ratio against it is "
        + each(lambda n, r: f"{r['monitor_metered']:.2f}x (d {n})")
        + ". The rest is the sidecar's own work per batch: the rows' decode and validation, "
        "the reply's 32 verdicts, the gRPC threads, its batch metrics. With a free core for "
        "the host the guard's CPU alone would bound the ratio at "
        + each(lambda n, r: f"{cpu(r)['in-process'] / cpu(r)['sidecar: guard serve']:.2f}x "
               f"(d {n})")
        + (f"; in this run the host's SDK, the sidecar and other jobs shared the {CPUS} "
           "cores, so the pipelining that MONITOR allows hid little of the host's CPU either."
           if busy else f"; the host's SDK and the sidecar share the {CPUS} cores."))
    inline = (
        "- **INLINE round trip of a 32-request step, target <= 1.5x in process: "
        + outcome(results, "inline", INLINE_TARGET, "lower") + ". The sidecar adds "
        + each(lambda n, r: f"{r['inline_ms']['sidecar'] - r['inline_ms']['in-process']:.2f} "
               f"ms (d {n})")
        + " per step: the rows as gRPC bytes, the sidecar's decode and validation, 32 "
        "verdicts in the reply, its metrics, and two processes to schedule instead of one on "
        "busy cores.")
    return "\n".join([split, monitor, inline])


def handoff_text(share: float, ms: float | None = None) -> str:
    """The step's one hand-off to the plugin worker against running the plugins inline."""
    pct = f"{abs(share):.0%}"
    if share >= 0:
        cost = f"{ms:.2f} ms ({pct} of the step)" if ms is not None else f"{pct} of the step"
        return f"the step's one hand-off to the plugin worker costs {cost}"
    gain = f"{abs(ms):.2f} ms ({pct})" if ms is not None else pct
    return (f"with its one hand-off to the plugin worker the step is {gain} faster than "
            "with the plugins on the calling thread (the worker runs request i+1's plugins "
            "while the calling thread decides request i)")


def dispatch_text(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, r in results.items():
        d = r["dispatch_ms"]
        parts.append(
            f"at d {name} the 32 plugin calls take {d['hooks']:.2f} ms of a {d['step']:.2f} ms "
            f"step and one call over the same 32 rows {d['one_request_hooks']:.2f} ms, so a "
            f"vectorised hook would save about {r['vectorised_saving']:.0%} of the step, while "
            + handoff_text(r["handoff_share"], d["handoff"])
            + f", and the engine's own per-request part (features, steering, decision, "
            f"record) takes {d['engine']:.2f} ms")
    return "; ".join(parts)


def write_results(args: argparse.Namespace, counts: Counts, results: dict[str, dict[str, Any]],
                  served: dict[str, str], main_table: str, dispatch_table: str,
                  elapsed: float, load: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    write_headline("steps", headlines(results))
    # More runnable work than the cores, over the benchmark's own host and guard: a busy box.
    busy = max(load[0][0], load[1][0]) > CPUS + 0.5
    command = (f"python -m bench.steps --rounds {args.rounds} --scale {args.scale:g} "
               f"--large-d-in {args.large_d_in} --large-d-sae {args.large_d_sae} "
               "--write-results")
    write_section("steps", (
        "## Engine steps: many requests per batch (`bench/steps.py`)\n\n"
        f"`{command}`, run {time.strftime('%Y-%m-%d %H:%M')} ({elapsed / 60:.1f} min) on the "
        f"{CPUS}-core development machine, load average {load[0][0]:.1f} at the start and "
        f"{load[1][0]:.1f} at the end"
        + (" (other jobs were running beside the benchmark)" if busy else "")
        + ". Every ratio compares sides measured in the same rounds, interleaved, every other "
        "round reversed. A step "
        f"as vLLM runs one: {DECODE} decode rows of {DECODE} requests and a {PREFILL}-row "
        "prefill chunk of a 33rd, one flat array; random normal rows. Two guards, each a real "
        "`guard serve` on a Unix socket driven by the host SDK's `GuardClient`, the same "
        "configuration loaded in the benchmark's process (`Engine.load`) as the reference:\n\n"
        + "".join(f"- d {n}: {text}\n" for n, text in served.items()) +
        "\nBoth with the first-party detectors (a linear detector over 256 features, aborting "
        "on prompt rows; a threshold detector with conditional steering), the decision log "
        "to a file and the Prometheus metrics endpoint on; the plugin worker's budget is the "
        f"default. Per round: {counts.split} mixed steps per side for `split`, "
        f"{counts.monitor} decode steps per side for MONITOR, {counts.inline} for INLINE; "
        f"{args.rounds} rounds per guard. Rates are medians over rounds, latencies p50 over "
        "every step.\n\n"
        "- split: one `inspect_step` with 33 segments against the same rows as 33 `inspect` "
        "calls (32 of one row, one of 64), INLINE, one after another; ratio of steps/s (higher "
        "is better). In process: `Engine.inspect_step` against 33 `Engine.inspect`.\n"
        "- MONITOR: decode steps sent back to back, first send to the last request's verdict, "
        "against `Engine.inspect_step` back to back; steps/s, sidecar / in process.\n"
        "- INLINE: one 32-request decode step at a time, p50 round trip / p50 "
        "`Engine.inspect_step` (lower is better).\n\n"
        + main_table + "\n\n"
        "CPU per MONITOR step (from the processes' CPU times over each run; the host's includes "
        "the SDK's threads):\n\n" + cpu_table(results) + "\n\n"
        + verdict_text(results, busy) + "\n\n"
        "### Per-request plugin dispatch, and a vectorised hook\n\n"
        "Where an in-process 32-request decode step's time goes (`Engine.inspect_step` "
        "timings, medians): the one encode; the plugin hooks (`guard_detect` + `guard_steer` "
        "for each request, summed); the one hand-off to the plugin worker that runs all 32 "
        "requests' calls (the step less the same step on an engine with "
        "`plugins.timeout_ms: 0`, which runs the plugins on the calling thread: negative when "
        "the worker's plugin calls for one request overlap the calling thread's decision of "
        "the one before); the engine's own per-request part (the request's `FeatureBatch`, "
        "steering delta, decision and record: the step with the plugins on the calling thread, "
        "less its encode and plugin hooks). Against it, the same 32 rows as one request's "
        "batch: one plugin call over every row, what a hook that takes the whole step would "
        "cost at best.\n\n" + dispatch_table + "\n\n"
        "No vectorised hook was added, and by these numbers it would not pay for itself yet: "
        + dispatch_text(results) + ". The hand-offs needed no new hook to go: the engine runs "
        "a step's per-request plugin calls in one hand-off (with one hand-off per request, "
        "the run of 2026-12-07 13:42 measured 1.86 ms, 27% of the step, at d 576 and 2.90 ms, "
        "37%, at d 4096). The engine's per-request part "
        "stays with any hook (each request still gets its own decision and record). A "
        "vectorised hook is worth its API, documentation and tests only once the plugin "
        "calls themselves dominate a step. Each request's verdict in a step matched the "
        "verdict on its rows sent alone: " + ", ".join(
            f"{r['verdicts_compared'] - r['verdicts_disagreeing']} of "
            f"{r['verdicts_compared']} at d {n}" for n, r in results.items())
        + "; the steps' verdicts: " + "; ".join(
            f"d {n} " + ", ".join(f"{k} {v}" for k, v in sorted(r["actions"].items()))
            for n, r in results.items()) + ".\n"
    ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the steps per round (0.1 for a smoke run)")
    parser.add_argument("--large-d-in", type=int, default=4096)
    parser.add_argument("--large-d-sae", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    counts = Counts(split=max(2, round(12 * args.scale)), monitor=max(5, round(100 * args.scale)),
                    inline=max(5, round(50 * args.scale)))

    from guard.config import LoggingConfig
    from guard.telemetry.setup import configure_logging

    configure_logging(LoggingConfig(level="warning"))
    started = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    served: dict[str, str] = {}
    for build in (demo_setup,
                  lambda state: large_setup(state, args.large_d_in, args.large_d_sae)):
        with tempfile.TemporaryDirectory(prefix="guard-steps-") as tmp:
            setup = build(Path(tmp))
            served[setup.name] = setup.served
            results[setup.name] = summarise(setup.name, measure(setup, args.rounds, counts))
    elapsed = time.perf_counter() - started
    main_table, dispatch_table = tables(results)
    print(main_table)
    print(cpu_table(results))
    print(dispatch_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "rounds": args.rounds,
                                    "counts": vars(counts), "served": served,
                                    "elapsed_s": elapsed, "results": results}, indent=1))
    if args.write_results:
        write_results(args, counts, results, served, main_table, dispatch_table, elapsed,
                      (load_start, os.getloadavg()))


if __name__ == "__main__":
    main()
