"""Latency summaries, machine facts and Markdown tables shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one case's round trips and the rate they ran at."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    per_s: float
    """Operations per second over the measured wall time (not 1 / mean)."""


def summarize(latencies_ms: list[float], elapsed_s: float) -> LatencySummary:
    """Summarise latencies measured back to back over `elapsed_s` seconds of wall time."""
    if not latencies_ms:
        raise ValueError("summarize: no latencies to summarise")
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p99 = np.percentile(values, [50.0, 99.0])
    return LatencySummary(
        n=len(latencies_ms),
        p50_ms=float(p50),
        p99_ms=float(p99),
        mean_ms=float(values.mean()),
        per_s=len(latencies_ms) / elapsed_s,
    )


def machine() -> dict[str, str | int | None]:
    """What the numbers were measured on, for the JSON next to them."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line),
                         model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table, columns padded so that it also reads well in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    )


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, body: str, results: Path = RESULTS) -> None:
    """Replace the ``<!-- name:begin -->`` ... ``<!-- name:end -->`` block of RESULTS.md with
    ``body`` (appended at the end when the block is not there yet). Other sections are kept."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = results.read_text(encoding="utf-8") if results.exists() else ""
    if begin in text and end in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text, encoding="utf-8")


HEADLINES = Path(__file__).resolve().parent / "headlines"


def write_headline(bench: str, entries: list[dict[str, object]],
                   folder: Path = HEADLINES) -> None:
    """Record a benchmark's headline ratios for the performance page (``bench/summary.py``).

    Each entry: ``label`` (what is compared), ``ratio`` (the figure against the in-run
    reference), ``reference`` (what it was measured against), ``better`` (``lower`` or
    ``higher``), and optionally ``target`` and ``note``. Written to
    ``bench/headlines/<bench>.json`` (committed, unlike ``bench/out``) with the date and
    machine, replacing that benchmark's previous headlines.
    """
    for entry in entries:
        missing = {"label", "ratio", "reference", "better"} - set(entry)
        if missing:
            raise ValueError(f"write_headline({bench!r}): an entry lacks {sorted(missing)}")
        if entry["better"] not in ("lower", "higher"):
            raise ValueError(f"write_headline({bench!r}): better must be lower or higher")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{bench}.json").write_text(json.dumps(
        {"bench": bench, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
         "entries": entries}, indent=1) + "\n", encoding="utf-8")
