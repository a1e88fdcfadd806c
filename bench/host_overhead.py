"""SmolLM2 generation speed with no guard, with the guard in MONITOR mode and in INLINE mode.

Same prompts, same run, interleaved rounds (every other round reversed) so drift on a noisy
machine hits every mode alike. The guard is a real ``guard serve`` process on a Unix socket
with a 576x4608 SAELens SAE on ``blocks.15.hook_resid_post``, a threshold detector over 32
features (so every batch is encoded and inspected) and the decision log writing to a file.
Targets: MONITOR >= 0.95x and INLINE >= 0.85x the tokens/s of no guard.

    python -m bench.host_overhead [--rounds 5] [--tokens 32] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench._stats import machine, write_headline, write_section
from guard.sidecar.process import GuardProcess
from tests.sae_fixtures import write_saelens

HOOK = "blocks.15.hook_resid_post"
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain in two sentences what a sparse autoencoder is.",
    "Give me three tips for a job interview.",
    "What is the boiling point of water at sea level?",
]
OUT = Path(__file__).resolve().parent / "out" / "host_overhead.json"


def start_guard(workdir: Path) -> GuardProcess:
    sae = write_saelens(workdir / "sae", 576, 4608, hook_name=HOOK)
    socket = workdir / "guard.sock"
    features = list(range(0, 4608, 144))[:32]
    config = workdir / "guard.yaml"
    config.write_text(
        f"server:\n  listen: unix://{socket}\nlogging:\n  level: warning\n"
        "plugins:\n  config:\n    detectors:\n      bench:\n"
        f"        hook: {HOOK}\n        features: {features}\n        threshold: 1000.0\n"
        "        action: flag\n"
        f"    decision_log:\n      path: {workdir}/decisions.jsonl\n"
        f"saes:\n  - path: {sae}\n"
    )
    return GuardProcess(config, f"unix://{socket}").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from guard.host import GuardClient
    from guard.host.attach import attach
    from guard.models.smollm2 import chat_input_ids, load_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_smollm2()
    inputs = []
    for prompt in PROMPTS:
        inputs.append(chat_input_ids(tokenizer, [{"role": "user", "content": prompt}]))

    def generate_all() -> tuple[int, float]:
        tokens = 0
        started = time.perf_counter()
        for ids in inputs:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.tokens,
                                     min_new_tokens=args.tokens, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
        return tokens, time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        guard = start_guard(Path(tmp))
        address = guard.address
        try:
            clients = {
                "monitor": GuardClient(address, mode="monitor", hooks=[HOOK]),
                "inline": GuardClient(address, mode="inline", hooks=[HOOK], deadline_ms=5000),
            }
            generate_all()  # warm-up: first calls allocate
            totals: dict[str, list[float]] = {"none": [], "monitor": [], "inline": []}
            counts: dict[str, int] = {}
            for round_index in range(args.rounds):
                modes = ["none", "monitor", "inline"]
                for mode in modes if round_index % 2 == 0 else list(reversed(modes)):
                    if mode == "none":
                        tokens, seconds = generate_all()
                    else:
                        with attach(model, clients[mode], [HOOK]):
                            tokens, seconds = generate_all()
                    totals[mode].append(tokens / seconds)
                    counts[mode] = tokens
                print(f"  round {round_index + 1}/{args.rounds}: "
                      + ", ".join(f"{m} {totals[m][-1]:.1f} tok/s" for m in totals),
                      flush=True)
            verdict_counts = {m: c.counters for m, c in clients.items()}
            for client in clients.values():
                client.close()
        finally:
            guard.stop()

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    base = median(totals["none"])
    rows = []
    for mode, target in (("none", None), ("monitor", 0.95), ("inline", 0.85)):
        rate = median(totals[mode])
        ratio = rate / base
        status = "" if target is None else ("met" if ratio >= target else "missed")
        rows.append((mode, rate, ratio, target, status))
    table = ["| mode | tokens/s (median of rounds) | vs no guard | target |",
             "|---|---:|---:|---|"]
    for mode, rate, ratio, target, status in rows:
        goal = "" if target is None else f">= {target:.2f}x ({status})"
        table.append(f"| {mode} | {rate:.1f} | {ratio:.2f}x | {goal} |")
    text = "\n".join(table)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "tokens_per_s": totals,
                               "tokens_per_mode_round": counts,
                               "client_counters": {m: str(c) for m, c in
                                                   verdict_counts.items()}}, indent=2))
    if args.write_results:
        section = (
            "## Host overhead (`bench/host_overhead.py`)\n\n"
            f"SmolLM2-135M-Instruct on the CPU, greedy, {len(PROMPTS)} chat prompts x "
            f"{args.tokens} new tokens per round, {args.rounds} interleaved rounds; the guard "
            "is a real `guard serve` on a Unix socket encoding 32 features of a 576x4608 SAE "
            f"on `{HOOK}` with a threshold detector and the decision log on. Run on "
            f"{time.strftime('%Y-%m-%d')}.\n\n{text}\n"
        )
        write_section("host_overhead", section)
        write_headline("host_overhead", [
            {"label": f"{mode} tokens/s with the guard / without, SmolLM2 on CPU",
             "ratio": ratio, "reference": "the same generations, no guard attached",
             "better": "higher", "target": target}
            for mode, _rate, ratio, target, _status in rows if target is not None])


if __name__ == "__main__":
    main()
