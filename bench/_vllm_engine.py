"""One offline vLLM engine for ``bench/vllm_throughput.py``, run by the vLLM environment's
python (``make vllm-env``): built once, then driven over stdin, one JSON command a line.

- ``{"op": "run", "concurrency": N, "max_tokens": M, "tag": "..."}``: N requests submitted
  together (the same benign prompts every time, cycled; greedy; ``ignore_eos`` so that each
  gives exactly M tokens), timed from submission to the last output. Answers the output
  tokens, the seconds, a digest of the token ids (the guarded engines must produce the
  unguarded engine's tokens) and, for a guarded engine, the change of its ``guard_stats``
  counters over the run.
- ``{"op": "pause", "paused": true|false}``: ``guard_set_paused`` (guarded engines only).
- ``{"op": "quit"}``.

Answers go, one JSON object a line, to the process's original stdout; everything vLLM and
the libraries print goes to stderr. The first answer is ``{"event": "ready", ...}`` once the
engine is built and warmed up (each concurrency run once, so that no measured run compiles).

Usage: python bench/_vllm_engine.py --model DIR --variant stock|guard [--eager]
       [--warm-concurrency 1,8,32] [--warm-tokens 8]
with GUARD_VLLM_ADDRESS, GUARD_VLLM_MODE (and the other GUARD_VLLM_* settings) in the
environment of a ``guard`` engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, TextIO

#: Benign questions that neither the demo's jailbreak detector nor its food steering fires
#: on (the driver checks: no aborts, every engine the same tokens). Not every benign question
#: passes: the detector's false-positive rate is about 5% ("How does a bicycle stay upright?"
#: and "Why is the sky blue?" were aborted).
PROMPTS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What are some tips for learning a new language?",
    "What is the capital of Italy?",
    "What is the capital of Portugal?",
    "What is the capital of Japan?",
    "What is the capital of Canada?",
    "What is the capital of Spain?",
)


def reply(out: TextIO, **fields: Any) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", choices=("stock", "guard"), required=True)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--warm-concurrency", default="1,8,32")
    parser.add_argument("--warm-tokens", type=int, default=8)
    args = parser.parse_args()

    # Answers on the original stdout; vLLM's prints and logs (some on stdout) on stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    guarded = args.variant == "guard"
    extra: dict[str, Any] = ({"worker_cls": "guard.vllm.worker.GuardWorker",
                              "scheduler_cls": "guard.vllm.scheduler.GuardScheduler"}
                             if guarded else {})
    started = time.monotonic()
    llm = LLM(model=args.model, dtype="float32", seed=0, max_model_len=512,
              enforce_eager=args.eager, distributed_executor_backend="uni",
              kv_cache_memory_bytes=1 << 28, enable_prefix_caching=False, **extra)
    start_s = time.monotonic() - started
    config = llm.llm_engine.vllm_config
    tokenizer = llm.get_tokenizer()

    def chat(prompt: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    prompts = [chat(p) for p in PROMPTS]

    def stats() -> dict[str, float]:
        if not guarded:
            return {}
        found: dict[str, float] = llm.collective_rpc("guard_stats")[0]
        return found

    def run(concurrency: int, max_tokens: int) -> dict[str, Any]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        inputs = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(concurrency)]
        before = stats()
        began = time.perf_counter()
        outputs = llm.generate(inputs, [params] * concurrency, use_tqdm=False)
        seconds = time.perf_counter() - began
        after = stats()
        digest = hashlib.sha256()
        tokens = 0
        for output in outputs:
            ids = list(output.outputs[0].token_ids)
            tokens += len(ids)
            digest.update(json.dumps(ids).encode())
        return {"tokens": tokens, "seconds": seconds,
                "prompt_tokens": sum(len(i["prompt_token_ids"]) for i in inputs),
                "finish_reasons": sorted({str(o.outputs[0].finish_reason) for o in outputs}),
                # Which prompts ended otherwise than by length (aborted), and why.
                "not_length": [{"prompt": i % len(prompts),
                                "finish_reason": str(o.outputs[0].finish_reason),
                                "stop_reason": str(o.outputs[0].stop_reason)}
                               for i, o in enumerate(outputs)
                               if o.outputs[0].finish_reason != "length"],
                "digest": digest.hexdigest()[:16],
                "stats": {k: after[k] - before.get(k, 0.0) for k in after
                          if isinstance(after[k], int | float)}}

    for concurrency in (int(c) for c in args.warm_concurrency.split(",") if c):
        run(concurrency, args.warm_tokens)
    reply(out, event="ready", start_s=start_s, warm_s=time.monotonic() - started - start_s,
          compilation_mode=config.compilation_config.mode.name,
          enforce_eager=bool(config.model_config.enforce_eager), pid=os.getpid(),
          prompts=len(PROMPTS), vllm=vllm.__version__, torch=torch.__version__,
          torch_threads=torch.get_num_threads(),
          omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""),
          mode=os.environ.get("GUARD_VLLM_MODE", "") if guarded else "")
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.get("op")
        if op == "run":
            reply(out, event="ran", tag=command.get("tag", ""),
                  **run(int(command["concurrency"]), int(command["max_tokens"])))
        elif op == "pause" and guarded:
            llm.collective_rpc("guard_set_paused", args=(bool(command["paused"]),))
            reply(out, event="paused", paused=bool(command["paused"]))
        elif op == "quit":
            break
        else:
            reply(out, event="error", error=f"unknown command {command!r} for a "
                                            f"{args.variant} engine")
    reply(out, event="bye")


if __name__ == "__main__":
    main()
