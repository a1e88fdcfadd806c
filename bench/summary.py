"""The performance page: every benchmark's headline ratios in one table and one plot.

Reads ``bench/headlines/*.json`` (written by each benchmark with ``--write-results``, see
``bench._stats.write_headline``), replaces the ``summary`` section at the top of
``bench/RESULTS.md`` and draws ``bench/performance.png`` (shown in the README's Performance
section): one bar per ratio on a log scale, its target as a tick, green when met, red when
missed, grey when there is no target.

    python -m bench.summary
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._stats import HEADLINES, markdown_table, write_section

PLOT = Path(__file__).resolve().parent / "performance.png"
#: Page order: the path of one batch from the wire inwards, then the whole host.
ORDER = ("transport", "shm", "sae_encode", "reconstruction", "e2e", "steps", "tracing",
         "host_overhead", "soak", "soak-doorbell", "faults", "faults-doorbell", "fuzz")


@dataclass(frozen=True)
class Headline:
    bench: str
    date: str
    label: str
    ratio: float
    reference: str
    better: str
    target: float | None
    note: str

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        met = self.ratio <= self.target if self.better == "lower" else self.ratio >= self.target
        return "met" if met else "missed"


def load(folder: Path = HEADLINES) -> list[Headline]:
    found: list[Headline] = []
    files = sorted(folder.glob("*.json"),
                   key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER),
                                  p.stem))
    for path in files:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        for entry in data["entries"]:
            target = entry.get("target")
            found.append(Headline(
                bench=data["bench"], date=data["date"], label=str(entry["label"]),
                ratio=float(entry["ratio"]), reference=str(entry["reference"]),
                better=str(entry["better"]), target=None if target is None else float(target),
                note=str(entry.get("note", ""))))
    return found


def table(headlines: list[Headline]) -> str:
    rows = []
    for h in headlines:
        goal = "" if h.target is None else (
            f"{'<=' if h.better == 'lower' else '>='} {h.target:.3g} ({h.status})")
        rows.append([f"`{h.bench}`", h.label, f"{h.ratio:.3g}x", h.reference, goal,
                     h.date])
    return markdown_table(["bench", "ratio of", "ratio", "reference (same run)", "target",
                           "run"], rows)


def plot(headlines: list[Headline], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{h.bench}: {h.label}" for h in headlines]
    colours = ["#2e7d32" if h.status == "met" else "#c62828" if h.status == "missed"
               else "#757575" for h in headlines]
    height = 0.9 + 0.38 * len(headlines)
    figure, axes = plt.subplots(figsize=(10, height))
    positions = list(range(len(headlines)))[::-1]
    axes.barh(positions, [h.ratio for h in headlines], color=colours, height=0.6)
    for y, h in zip(positions, headlines, strict=True):
        axes.text(h.ratio * 1.06, y, f"{h.ratio:.3g}x", va="center", fontsize=8)
        if h.target is not None:
            axes.plot([h.target, h.target], [y - 0.38, y + 0.38], color="black", linewidth=2)
    axes.axvline(1.0, color="#9e9e9e", linewidth=0.8, linestyle="--")
    axes.set_xscale("log")
    axes.set_yticks(positions)
    axes.set_yticklabels(labels, fontsize=8)
    axes.set_xlabel("ratio against the reference measured in the same run (log scale); "
                    "black tick: target", fontsize=8)
    axes.set_title("Activation Guard: headline ratios (green met, red missed, grey no target)",
                   fontsize=10)
    right = max(max(h.ratio for h in headlines), max((h.target or 0) for h in headlines))
    axes.set_xlim(right=right * 2.2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    headlines = load()
    if not headlines:
        raise SystemExit(f"bench.summary: no headlines in {HEADLINES}; run the benchmarks "
                         "with --write-results first")
    text = table(headlines)
    print(text)
    notes = [f"- `{h.bench}` {h.label}: {h.note}" for h in headlines if h.note]
    write_section("summary", (
        "## Summary: one performance page\n\n"
        "Each benchmark's headline ratio against the reference it measured in the same run "
        "(`bench/headlines/*.json`, gathered by `python -m bench.summary`); the sections "
        "below have the full tables, methods and caveats. Plot: `bench/performance.png`.\n\n"
        + text + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
    ))
    plot(headlines)
    print(f"wrote {PLOT}")


if __name__ == "__main__":
    main()
