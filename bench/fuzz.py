"""The long fuzz run: the suite's properties (tests/test_fuzz_protocol.py and
tests/test_fuzz_loaders.py) with many more examples, and counts of what they reached.

Properties (strategies, oracle and checks live in ``tests/fuzz_strategies.py``):

- ``streams``: whole Inspect streams of fuzzed configs and batches against a live guard
  (SAELens SAE, detectors and steering plugins, shared memory on); each message gets what the
  oracle predicts, no call hangs (gRPC deadline), no UNKNOWN or INTERNAL, and a known-good
  stream still gets a decision after every case. The shared-memory fields are fuzzed against
  real region files in the guard's allowed folder: ``StreamConfig.shared_memory``
  registrations (good ones, read-only or writable; wrong sizes, paths outside the folder,
  missing files, symbolic links, directories, FIFOs, files writable by others or with two
  links, empty or repeated names, too many regions), ``Tensor.shm`` references (in bounds,
  over the NaN and Inf a region holds, past the end, misaligned, huge uint64 offsets, wrong
  lengths, unknown regions, ``raw`` set too) and ``ActivationBatch.steering_ref`` (writable,
  read-only, out of bounds, wrong length): the oracle reads the region files, a STEER delta
  asked for in a region must be there, and no other byte of a region may change;
- ``bytes``: the same with serialized messages corrupted (random, flipped, cut, padded);
- ``doorbell-streams``, ``doorbell-bytes``: the same two on the guard's doorbell socket (the
  Inspect protocol in frames; a StreamEnd frame where gRPC has a status);
- ``codec``: ``codec.decode`` of any datatype, shape and bytes is a float32 array of that
  shape or an InvalidInput;
- ``loaders``: mutated SAELens, sparsify and Gemma Scope files load consistently or raise a
  SaeFileError naming the file and the field.

Cases run in chunks with fresh random seeds (printed, so a failure can be replayed) until
``--examples`` per property or ``--seconds`` per property, whichever comes first. Warnings are
errors, as in the suite.

    python -m bench.fuzz [--examples 5000] [--seconds 60] [--only streams,loaders]
                         [--write-results]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings

from bench._stats import machine, markdown_table, write_headline, write_section
from guard.config import LoggingConfig
from guard.telemetry.setup import configure_logging
from tests import fuzz_strategies as fs

OUT = Path(__file__).resolve().parent / "out" / "fuzz.json"
PROPERTIES = ("streams", "bytes", "doorbell-streams", "doorbell-bytes", "codec", "loaders")
CHUNK = 250

Runner = Callable[[int, int, Counter[str]], None]


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _stream_runner(target: fs.Target, strategy: Any) -> Runner:
    def run(examples: int, chunk_seed: int, counts: Counter[str]) -> None:
        @seed(chunk_seed)
        @_settings(examples)
        @given(strategy)
        def prop(messages: list[Any]) -> None:
            outcomes = fs.check_stream(target, messages)
            fs.check_still_serving(target)
            counts["cases"] += 1
            counts.update(outcomes)

        prop()

    return run


def _codec_runner(examples: int, chunk_seed: int, counts: Counter[str]) -> None:
    @seed(chunk_seed)
    @_settings(examples)
    @given(fs.codec_inputs())
    def prop(case: tuple[str, list[int], bytes]) -> None:
        outcome = fs.check_decode(*case)
        counts["cases"] += 1
        counts[outcome] += 1

    prop()


def _loader_runner(examples: int, chunk_seed: int, counts: Counter[str]) -> None:
    @seed(chunk_seed)
    @_settings(examples)
    @given(fs.sae_cases())
    def prop(case: tuple[str, list[fs.Mutation]]) -> None:
        fmt, mutations = case
        with tempfile.TemporaryDirectory(prefix="guard-fuzz-sae-") as tmp:
            outcome = fs.check_loader(fs.build_sae(Path(tmp), fmt, mutations))
        counts["cases"] += 1
        counts[outcome] += 1
        counts[f"format:{fmt}"] += 1

    prop()


def run_property(name: str, runner: Runner, examples: int, seconds: float,
                 rng: random.Random) -> dict[str, Any]:
    """Chunks of CHUNK examples with fresh seeds until the example or time budget is spent."""
    counts: Counter[str] = Counter()
    seeds: list[int] = []
    failure = ""
    started = time.perf_counter()
    while counts["cases"] < examples and time.perf_counter() - started < seconds:
        chunk_seed = rng.getrandbits(32)
        seeds.append(chunk_seed)
        try:
            runner(min(CHUNK, examples - counts["cases"]), chunk_seed, counts)
        except Exception:
            failure = f"seed {chunk_seed}:\n{traceback.format_exc(limit=-3)}"
            print(f"[{name}] FAILED\n{failure}", file=sys.stderr)
            break
    elapsed = time.perf_counter() - started
    cases = counts.pop("cases", 0)
    print(f"[{name}] {cases} cases in {elapsed:.0f} s: {dict(sorted(counts.items()))}")
    return {"cases": cases, "seconds": round(elapsed, 1), "outcomes": dict(sorted(counts.items())),
            "seeds": seeds, "failure": failure}


def _label(outcome: str) -> str:
    kind, _, what = outcome.partition(":")
    if kind == "shm":  # a second label for an answer that involved shared memory
        path, _, answer = what.partition(":")
        return {"registered": "shm: regions registered", "delta": "shm: delta in a region"
                }.get(path, f"shm {path}: {_label(answer)}")
    return {"decision": f"decision {what}", "error": f"batch error {what}",
            "status": f"stream status {what}", "undecodable": "stream status INVALID_ARGUMENT "
            "(undecodable bytes)"}.get(kind, outcome)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    total = sum(r["cases"] for r in results.values())
    failed = [name for name, r in results.items() if r["failure"]]
    lines = [
        "## Fuzzing (`bench/fuzz.py`)",
        "",
        "Property-based fuzzing (hypothesis) of the Inspect protocol against a live in-process "
        "guard (SAELens SAE, detectors and steering plugins, `max_message_bytes` 4096 so both "
        "size limits are reachable, shared memory on: streams register real region files, well "
        "or badly, and batches refer to them with `Tensor.shm` and `steering_ref`), of the "
        "tensor codec, and of the SAE file loaders. Each case "
        "is checked against an oracle of the documented rules: every rejection is a per-batch "
        "error naming the field or a stream status with details (never UNKNOWN or INTERNAL), "
        "valid batches get a decision with finite steering deltas, no call hangs (gRPC deadline) "
        "and a known-good stream still works after every case. Loaders: a consistent SAE or a "
        "`SaeFileError` naming the file and the field. The suite runs the same properties "
        "(`tests/test_fuzz_protocol.py`, `tests/test_fuzz_loaders.py`, ~150-300 cases each, "
        "fixed seed).",
        "",
        f"Run: `python -m bench.fuzz --examples {args.examples} --seconds {args.seconds:g}"
        + (f" --seed {args.seed}" if args.seed is not None else "") + "` (2 shared cores): "
        f"**{total:,} cases**, {'failures in ' + ', '.join(failed) if failed else 'no failures'}.",
        "",
    ]
    rows = []
    for name, result in results.items():
        outcomes = ", ".join(f"{_label(k)} {v:,}" for k, v in result["outcomes"].items())
        rows.append([f"`{name}`", f"{result['cases']:,}", f"{result['seconds']:.0f}",
                     "FAILED" if result["failure"] else "ok", outcomes])
    lines.append(markdown_table(["property", "cases", "seconds", "result", "outcomes"], rows))
    lines += ["", "Outcomes count answered messages (a stream case has several); `bytes` cases "
              "whose corrupted message still parses are answered like any other message. "
              "`shm` outcomes count again the answers that involved shared memory: a config "
              "that registered regions or was refused for one, a batch refused for a bad "
              "`Tensor.shm` (`ref`) or `steering_ref`, a batch whose rows were read from a "
              "region (`rows`; `nonfinite`: refused for the NaN or Inf there), a steering delta "
              "written into a region."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="cases per property")
    parser.add_argument("--seconds", type=float, default=120.0, help="time per property")
    parser.add_argument("--only", default=",".join(PROPERTIES),
                        help=f"comma-separated subset of {', '.join(PROPERTIES)}")
    parser.add_argument("--seed", type=int, default=None, help="seed of the chunk seeds")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PROPERTIES))
    if unknown:
        parser.error(f"--only: unknown properties {unknown}; known: {', '.join(PROPERTIES)}")
    warnings.simplefilter("error")  # as in the suite (pyproject: filterwarnings = error)
    configure_logging(LoggingConfig(level="error"))
    rng = random.Random(args.seed)

    results: dict[str, dict[str, Any]] = {}
    with fs.fuzz_server() as (server, channel):
        assert server.doorbell is not None
        runners: dict[str, Runner] = {
            "streams": _stream_runner(channel, fs.streams()),
            "bytes": _stream_runner(channel, fs.byte_streams()),
            "doorbell-streams": _stream_runner(server.doorbell.path, fs.streams()),
            "doorbell-bytes": _stream_runner(server.doorbell.path, fs.byte_streams()),
            "codec": _codec_runner,
            "loaders": _loader_runner,
        }
        for name in chosen:
            results[name] = run_property(name, runners[name], args.examples, args.seconds, rng)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "examples": args.examples,
                               "seconds": args.seconds, "results": results}, indent=2) + "\n")
    text = report(results, args)
    print(text)
    if args.write_results:
        write_section("fuzz", text)
        write_headline("fuzz", [
            {"label": f"{name}: property held over {result['cases']:,} cases",
             "ratio": 0.0 if result["failure"] else 1.0,
             "reference": "1 = no failing case (hypothesis stops at the first)",
             "better": "higher", "target": 1.0}
            for name, result in results.items()])
    return 1 if any(r["failure"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
