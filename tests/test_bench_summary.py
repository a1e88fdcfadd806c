"""The performance page's plumbing: headlines written by the benchmarks, gathered into one
table and one plot, and RESULTS.md sections replaced without touching the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._stats import write_headline, write_section
from bench.summary import load, plot, table


def test_headlines_become_a_table_with_target_status_and_a_plot(tmp_path: Path) -> None:
    write_headline("transport", [
        {"label": "guard / echo, 1x576", "ratio": 1.3, "reference": "echo",
         "better": "lower", "target": 1.2}], folder=tmp_path)
    write_headline("host_overhead", [
        {"label": "monitor tokens/s", "ratio": 0.97, "reference": "no guard",
         "better": "higher", "target": 0.95},
        {"label": "no target", "ratio": 0.5, "reference": "x", "better": "higher"}],
        folder=tmp_path)
    headlines = load(tmp_path)
    # Page order, not file order: transport before host overhead.
    assert [h.bench for h in headlines] == ["transport", "host_overhead", "host_overhead"]
    assert [h.status for h in headlines] == ["missed", "met", ""]
    text = table(headlines)
    assert "<= 1.2 (missed)" in text and ">= 0.95 (met)" in text
    png = tmp_path / "performance.png"
    plot(headlines, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("entry", "message"), [
    ({"label": "x", "ratio": 1.0, "reference": "y"}, "lacks ['better']"),
    ({"label": "x", "ratio": 1.0, "reference": "y", "better": "up"}, "lower or higher"),
])
def test_a_malformed_headline_is_refused(tmp_path: Path, entry: dict[str, object],
                                         message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_headline("bad", [entry], folder=tmp_path)


def test_write_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\n"
                       "<!-- b:begin -->\nold b\n<!-- b:end -->\n")
    write_section("a", "new a", results)
    write_section("c", "new c", results)
    text = results.read_text()
    assert "old a" not in text and "new a" in text and "old b" in text
    assert text.endswith("<!-- c:begin -->\nnew c\n<!-- c:end -->\n")
