"""``guard demo``: the whole path on a laptop, from an HTTP chat request to a decision.

``guard demo`` starts the sidecar (``guard serve`` with the embedded SmolLM2 SAE, detector and
steering), then the demo inference server (SmolLM2 behind an OpenAI-compatible endpoint,
guarded over the sidecar's Unix socket), sends the scripted prompts (a benign one, one the
detector blocks, one that steering changes) and a handful of everyday prompts that must all
pass, prints each decision, and leaves both running
for you to try (``--once`` stops after the script, for CI). ``guard demo serve`` runs only the
inference server against a guard that is already running (the demo container's command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from guard.demo.tracing import DemoTracing, metrics_address
from guard.sidecar.process import GuardProcess

DEFAULT_PORT = 8000
DEMO_CONFIG = "defaults/demo.yaml"
DEMO_SCRIPT = "defaults/demo_prompts.json"
#: Tokens generated for each everyday prompt (the verdict on the prompt comes first).
EVERYDAY_TOKENS = 8


@dataclass(frozen=True)
class ScriptedPrompt:
    title: str
    prompt: str
    #: What the demo expects the guard to do: CONTINUE, ABORT or STEER.
    expect: str
    max_tokens: int = 48


def scripted_prompts() -> list[ScriptedPrompt]:
    raw = json.loads(resources.files("guard").joinpath(DEMO_SCRIPT).read_text())
    return [ScriptedPrompt(**item) for item in raw["prompts"]]


def everyday_prompts() -> list[str]:
    """Everyday questions and tasks the demo sends after the script: each must pass (they
    were written for the demo, not taken from the data any detector was calibrated on)."""
    raw = json.loads(resources.files("guard").joinpath(DEMO_SCRIPT).read_text())
    return [str(p) for p in raw.get("everyday", [])]


def demo_config(state: Path, socket: Path, *, reconstruction_sample: float | None = None
                ) -> Path:
    """The demo's guard config, with absolute SAE paths and the decision log in ``state``;
    ``reconstruction_sample`` overrides ``saes[].reconstruction.sample`` (a benchmark that
    measures the guard's path without that diagnostic sets 0, and drops the detector that
    reads it)."""
    source = resources.files("guard").joinpath(DEMO_CONFIG)
    data: dict[str, Any] = yaml.safe_load(source.read_text())
    base = Path(str(resources.files("guard").joinpath("defaults")))
    for entry in data.get("saes", []):
        path = Path(entry["path"])
        entry["path"] = str(path if path.is_absolute() else (base / path).resolve())
        if reconstruction_sample is not None:
            entry["reconstruction"] = {"sample": reconstruction_sample}
    if reconstruction_sample == 0:
        detectors = data.get("plugins", {}).get("config", {}).get("detectors", {})
        for name in [n for n, d in detectors.items() if d.get("type") == "reconstruction"]:
            del detectors[name]
    data.setdefault("server", {})["listen"] = f"unix://{socket}"
    plugins = data.setdefault("plugins", {}).setdefault("config", {})
    plugins.setdefault("decision_log", {})["path"] = str(state / "decisions.jsonl")
    # Prometheus /metrics on a free loopback port (its address is in the "telemetry" log line).
    data.setdefault("telemetry", {}).setdefault("metrics_listen", "127.0.0.1:0")
    target = state / "guard.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


@contextlib.contextmanager
def sidecar(state: Path, socket: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``guard serve`` on the demo config, logging JSON lines to ``state/guard.log``;
    ``env`` is added to its environment (the demo's OTLP endpoint)."""
    guard = GuardProcess(demo_config(state, socket), f"unix://{socket}",
                         log=state / "guard.log", env={**os.environ, **(env or {})})
    with guard:
        yield guard.address


def start_inference_server(guard_address: str, host: str, port: int, *,
                           mode: str = "inline", failure_policy: str = "open",
                           deadline_ms: float = 5000.0) -> tuple[Any, Any, Any, Any]:
    """Load SmolLM2, attach the guard, start the HTTP server.

    Returns (http server, client, attachment, tokenizer).
    """
    from guard.demo.chat_server import ChatService, serve_http
    from guard.host import GuardClient
    from guard.host.attach import attach
    from guard.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    client = GuardClient(guard_address, mode=mode,  # type: ignore[arg-type]
                         failure_policy=failure_policy,  # type: ignore[arg-type]
                         deadline_ms=deadline_ms, host_name="guard-demo")
    hooks = sorted(sae.hook for sae in client.describe(timeout=10).saes)
    attachment = attach(model, client, hooks)
    http = serve_http(ChatService(model, tokenizer, attachment), host, port)
    return http, client, attachment, tokenizer


def post_chat(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def baseline_answer(attachment: Any, tokenizer: Any, prompt: str, max_tokens: int) -> str:
    """The model's answer with the guard paused (to show what steering changed)."""
    import torch

    from guard.models.smollm2 import chat_input_ids

    ids = chat_input_ids(tokenizer, [{"role": "user", "content": prompt}])
    with attachment.paused(), torch.no_grad():
        out = attachment.model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    text: str = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text


def _wrap(text: str, indent: str = "    ") -> str:
    return textwrap.fill(" ".join(text.split()), width=96, initial_indent=indent,
                         subsequent_indent=indent) or indent + "(empty)"


@dataclass
class ScriptOutcome:
    #: Every prompt got the action it expected.
    ok: bool
    #: The ``guard`` object of each reply, in script order.
    guards: list[dict[str, Any]]


def run_script(url: str, attachment: Any, tokenizer: Any, out: Any = None) -> ScriptOutcome:
    """Send the scripted prompts, print each decision."""
    out = out or sys.stdout
    ok = True
    guards: list[dict[str, Any]] = []
    for number, item in enumerate(scripted_prompts(), 1):
        result = post_chat(url, item.prompt, item.max_tokens)
        guard = result["guard"]
        guards.append(guard)
        answer = result["choices"][0]["message"]["content"]
        action = guard["action"]
        matched = action == item.expect
        ok &= matched
        print(f"\n[{number}] {item.title}", file=out)
        print(f"  prompt:   {item.prompt}", file=out)
        if item.expect == "STEER":
            print("  without the guard:", file=out)
            print(_wrap(baseline_answer(attachment, tokenizer, item.prompt, item.max_tokens)),
                  file=out)
            print("  with the guard (steered):", file=out)
        else:
            print("  answer:", file=out)
        print(_wrap(answer), file=out)
        line = f"  decision: {action}"
        if action == "ABORT":
            line += f" (decision {guard['decision_id']}): {guard['details']}"
        else:
            line += f" ({guard['decisions']} batches inspected)"
        print(line, file=out)
        print(f"  expected: {item.expect} -> {'ok' if matched else 'UNEXPECTED'}", file=out)
    everyday = everyday_prompts()
    if everyday:
        print(f"\n[{len(guards) + 1}] Everyday prompts pass (expected: CONTINUE)", file=out)
    passed = 0
    for prompt in everyday:
        guard = post_chat(url, prompt, EVERYDAY_TOKENS)["guard"]
        action = guard["action"]
        passed += action == "CONTINUE"
        mark = "ok" if action == "CONTINUE" else f"UNEXPECTED {action}: {guard.get('details')}"
        print(f"  {mark:<4} {prompt}", file=out)
    if everyday:
        print(f"  {passed} of {len(everyday)} passed", file=out)
    return ScriptOutcome(ok and passed == len(everyday), guards)


def trace_walk(tracing: DemoTracing, outcome: ScriptOutcome, state: Path) -> str:
    """The walkthrough of the script's blocked request (its trace, log line, counters)."""
    blocked = next((g for g in outcome.guards if g.get("action") == "ABORT"), None)
    if blocked is None or not blocked.get("trace_id"):
        return "Trace a decision: no blocked request with a trace id in this run"
    log = state / "guard.log"
    return tracing.walk(blocked["trace_id"], blocked["decision_id"], log, metrics_address(log))


def cmd_demo(args: argparse.Namespace) -> int:
    from guard.config import LoggingConfig
    from guard.telemetry.setup import configure_logging

    configure_logging(LoggingConfig(level="warning"))
    state = Path(args.state or tempfile.mkdtemp(prefix="activation-guard-demo-"))
    state.mkdir(parents=True, exist_ok=True)
    socket = state / "guard.sock"
    print(f"Activation Guard demo (state, logs and decision log in {state})")
    print("Starting the sidecar (guard serve) ...", flush=True)
    tracing = DemoTracing.start()
    with contextlib.ExitStack() as stack:
        stack.callback(tracing.close)
        address = stack.enter_context(sidecar(state, socket, tracing.sidecar_env))
        print(f"  serving on {address}; spans to {tracing.endpoint}; metrics on "
              f"http://{metrics_address(state / 'guard.log')}/metrics")
        print("Loading SmolLM2-135M-Instruct and the demo inference server ...", flush=True)
        http, client, attachment, tokenizer = start_inference_server(
            address, args.host, args.port)
        url = f"http://{args.host}:{http.server_address[1]}"
        print(f"  OpenAI-compatible endpoint: {url}/v1/chat/completions")
        try:
            outcome = run_script(url, attachment, tokenizer)
            log = state / "decisions.jsonl"
            print(f"\nDecision log: {log}")
            print("\n" + trace_walk(tracing, outcome, state), flush=True)
            if args.once:
                return 0 if outcome.ok else 1
            print(textwrap.dedent(f"""
                Both are running. Try:
                  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
                    -d '{{"messages": [{{"role": "user", "content": "Hello!"}}]}}'
                  .venv/bin/guard describe --target {address}
                Ctrl-C stops both."""))
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(0.5):
                    pass
            return 0
        finally:
            http.shutdown()
            http.server_close()
            client.close()


def cmd_demo_serve(args: argparse.Namespace) -> int:
    from guard.config import LoggingConfig
    from guard.telemetry.setup import configure_logging

    configure_logging(LoggingConfig(level="info"))
    http, client, _, _ = start_inference_server(args.guard, args.host, args.port, mode=args.mode,
                                             failure_policy=args.failure_policy,
                                             deadline_ms=args.deadline_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
    finally:
        http.shutdown()
        http.server_close()
        client.close()
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", help="run the end-to-end demo (sidecar + SmolLM2 inference server)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--once", action="store_true",
                      help="stop after the scripted prompts (exit 1 if one went unexpectedly)")
    demo.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"HTTP port (default {DEFAULT_PORT}; 0 picks a free one)")
    demo.add_argument("--state", help="folder for the socket, logs and decision log "
                                      "(default: a new temporary folder)")
    demo.set_defaults(func=cmd_demo)
    sub = demo.add_subparsers(dest="demo_command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run only the inference server against a running guard",
        description="Serve SmolLM2 on an OpenAI-compatible endpoint, guarded by the sidecar "
                    "at --guard.",
    )
    serve.add_argument("--guard", required=True,
                       help="the sidecar's address, e.g. unix:///var/run/guard/guard.sock")
    serve.add_argument("--host", default="0.0.0.0", help="HTTP address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port")
    serve.add_argument("--mode", choices=["inline", "monitor"], default="inline")
    serve.add_argument("--failure-policy", choices=["open", "closed"], default="open")
    serve.add_argument("--deadline-ms", type=float, default=5000.0,
                       help="INLINE: per-batch deadline (default 5000 on CPU)")
    serve.set_defaults(func=cmd_demo_serve)

