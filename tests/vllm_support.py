"""What the real-vLLM tests share (tests/test_vllm.py, tests/test_vllm_serve.py): where the vLLM
environment is, the guard they run against, and reading its decision log."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.sidecar import short_socket

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HOOK = "blocks.15.hook_resid_post"
LAYER = 15
#: The flags `vllm serve` runs with in tests/test_vllm_serve.py, docs/vllm.md and the Helm
#: chart's examples/vllm-values.yaml (besides --model and where to listen).
SERVE_FLAGS = (
    "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "512",
    "--kv-cache-memory-bytes", "1G", "--distributed-executor-backend", "uni",
    "--no-enable-prefix-caching",
    "--worker-cls", "guard.vllm.worker.GuardWorker",
    "--scheduler-cls", "guard.vllm.scheduler.GuardScheduler",
    "--logits-processors", "guard.vllm.admission:GuardArgsCheck",
)


def flags(words: Sequence[str]) -> dict[str, str | None]:
    """Command-line words as flag -> its value (None for a flag followed by another flag)."""
    found: dict[str, str | None] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            found[word] = None if following.startswith("--") else following
    return found


@contextmanager
def demo_guard(tag: str) -> Iterator[tuple[str, Path]]:
    """``guard serve`` on the demo configuration (the jailbreak detector that aborts, the
    dessert steering, both on ``HOOK``): its address and its state folder, whose
    ``decisions.jsonl`` is its decision log. Fails when the vLLM environment is missing."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-env` (the vLLM environment "
                    "these tests drive vLLM in; `make test` builds it)")
    from guard.demo.runner import sidecar

    with tempfile.TemporaryDirectory(prefix=f"guard-{tag}-") as folder:
        state = Path(folder)
        with sidecar(state, short_socket(tag)) as address:
            yield address, state


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
    """Whether the decision log says the guard heard of this request's end."""
    return any(r.get("event") == "request ended" and r.get("request_id") == request_id
               for r in records)
