"""Reports of the auditing commands: the ROC plot (PNG, matplotlib) and HTML pages.

The HTML pages are self-contained (styles inline, the ROC plot embedded as a data URI) so a
report can be attached to a ticket or a review as one file. Prompt text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from guard.audit.calibrate import Calibration, roc_curve
from guard.audit.rank import Example, FeatureRank, PromptActivations, top_examples

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: 14px; }
td.l, th.l { text-align: left; }
.ex { font-family: ui-monospace, monospace; font-size: 12.5px; white-space: pre-wrap;
      border-left: 3px solid #ccc; padding: 2px 8px; margin: 4px 0 4px 1em; }
.pos { border-color: #c0392b; } .neg { border-color: #2471a3; }
.tok { border-radius: 2px; }
h2 { margin-top: 1.6em; }
.muted { color: #777; }
"""

_COLOURS = {"threshold": "#c0392b", "linear": "#7d3c98", "probe": "#7f8c8d"}


def roc_png(cal: Calibration) -> bytes:
    """The held-out ROC curves of the calibrated detectors (and the probe), with each one's
    operating point marked, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=110)
    for kind, result in cal.results.items():
        fpr, tpr = roc_curve(result.test_scores, cal.test_labels)
        colour = _COLOURS.get(kind, "#333333")
        auc = result.test.auroc or float("nan")
        ax.plot(fpr, tpr, color=colour, lw=1.6,
                label=f"{kind} (AUROC {auc:.4f})")
        ax.plot([result.test.fpr or 0.0], [result.test.recall or 0.0], "o", color=colour,
                ms=6)
    ax.axvline(cal.target_fpr, color="#999999", lw=0.8, ls="--",
               label=f"target FPR {cal.target_fpr:g}")
    ax.plot([0, 1], [0, 1], color="#dddddd", lw=0.8)
    ax.set_xlabel("false-positive rate (held-out benign)")
    ax.set_ylabel("recall (held-out positives)")
    ax.set_title(f"{cal.name}: held-out ROC, dots = operating points", fontsize=10)
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{body}</body></html>\n")


def _example_html(ex: Example, *, before: int = 40, after: int = 12) -> str:
    lo = max(0, ex.peak_row - before)
    hi = min(len(ex.tokens), ex.peak_row + after + 1)
    peak = max(ex.peak, 1e-9)
    parts = ["…" if lo > 0 else ""]
    for token, value in zip(ex.tokens[lo:hi], ex.values[lo:hi], strict=True):
        text = html.escape(token)
        if value > 0:
            alpha = 0.15 + 0.75 * min(float(value) / peak, 1.0)
            parts.append(f"<span class='tok' style='background: rgba(230,126,34,{alpha:.2f})' "
                         f"title='{value:.3f}'>{text}</span>")
        else:
            parts.append(text)
    parts.append("…" if hi < len(ex.tokens) else "")
    kind = "pos" if ex.label == 1 else "neg"
    return (f"<div class='ex {kind}'><b>{'+' if ex.label else '-'} {ex.peak:.2f}</b> "
            f"{''.join(parts)}</div>")


def ranking_html(
    ranks: Sequence[FeatureRank], acts: PromptActivations, *, title: str,
    notes: Sequence[str] = (), examples: int = 5,
) -> str:
    """The ranking table and each feature's top-activating positive and benign prompts,
    the tokens where the feature fires shaded by its value (hover for the number)."""
    n_pos, n_neg = int((acts.labels == 1).sum()), int((acts.labels == 0).sum())
    body = [f"<p>{n_pos} positive and {n_neg} benign prompts; hook {html.escape(acts.hook)}; "
            f"SAE sha256 <code>{acts.sae_sha256[:16]}</code>.</p>"]
    body += [f"<p class='muted'>{html.escape(n)}</p>" for n in notes]
    body.append("<table><tr><th>rank</th><th>feature</th><th>AUROC (max)</th>"
                "<th>AUROC (mean)</th><th>Δ mean of max</th><th>fires on positives</th>"
                "<th>fires on benign</th><th class='l'>label</th></tr>")
    for n, r in enumerate(ranks, 1):
        body.append(f"<tr><td>{n}</td><td><a href='#f{r.feature}'>{r.feature}</a></td>"
                    f"<td>{r.auroc:.3f}</td><td>{r.auroc_mean:.3f}</td>"
                    f"<td>{r.mean_difference:.3f}</td><td>{r.fire_rate_positive:.1%}</td>"
                    f"<td>{r.fire_rate_benign:.1%}</td><td class='l'>{html.escape(r.label)}"
                    "</td></tr>")
    body.append("</table>")
    for n, r in enumerate(ranks, 1):
        label = f" — {html.escape(r.label)}" if r.label else ""
        body.append(f"<h2 id='f{r.feature}'>#{n}: feature {r.feature}{label}</h2>"
                    f"<p>AUROC {r.auroc:.3f}; fires on {r.fire_rate_positive:.1%} of positive "
                    f"and {r.fire_rate_benign:.1%} of benign prompts.</p>")
        for label_value, what in ((1, "positive"), (0, "benign")):
            found = top_examples(acts, r.feature, count=examples, label=label_value)
            body.append(f"<p><b>Top {what} prompts</b>" + ("" if found else ": none") + "</p>")
            body += [_example_html(ex) for ex in found]
    return _page(title, "\n".join(body))


def _metric_cells(m: Mapping[str, Any]) -> str:
    def cell(value: Any, percent: bool = False) -> str:
        if value is None:
            return "<td>-</td>"
        return f"<td>{value:.1%}</td>" if percent else f"<td>{value:.3f}</td>"

    ci = m.get("fpr_ci95")
    ci_text = f"{ci[0]:.1%}-{ci[1]:.1%}" if ci else "-"
    return (f"<td>{m['positives']}</td><td>{m['benign']}</td>" + cell(m["precision"])
            + cell(m["recall"]) + cell(m["f1"]) + cell(m["auroc"]) + cell(m["fpr"], True)
            + f"<td>{ci_text}</td>")


_METRIC_HEAD = ("<th>positives</th><th>benign</th><th>precision</th><th>recall</th><th>F1</th>"
                "<th>AUROC</th><th>FPR</th><th>FPR 95% CI</th>")


def calibration_html(cal: Calibration, record: Mapping[str, Any], blocks_yaml: str, *,
                     png: bytes | None, notes: Sequence[str] = ()) -> str:
    """Held-out metrics (overall, per length bucket, per source), the ROC plot and the
    detector config block."""
    body = [f"<p>Hook {html.escape(cal.hook)}; target FPR {cal.target_fpr:g} (operating points "
            f"chosen on the training split, {cal.train_size} prompts); held-out split "
            f"{cal.test_size} prompts.</p>"]
    body += [f"<p class='muted'>{html.escape(n)}</p>" for n in notes]
    detectors = record["detectors"]
    body.append(f"<h2>Held-out</h2><table><tr><th class='l'>detector</th><th>threshold</th>"
                f"{_METRIC_HEAD}</tr>")
    for kind, d in detectors.items():
        body.append(f"<tr><td class='l'>{kind}</td><td>{d['threshold']:.4g}</td>"
                    f"{_metric_cells(d['heldout'])}</tr>")
    body.append("</table>")
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        body.append(f"<img alt='ROC' src='data:image/png;base64,{data}'>")
    for kind, d in detectors.items():
        body.append(f"<h2>{kind}: by length bucket (user-message tokens)</h2><table>"
                    f"<tr><th class='l'>bucket</th>{_METRIC_HEAD}</tr>")
        for bucket, m in d["heldout_by_length_bucket"].items():
            body.append(f"<tr><td class='l'>{html.escape(bucket)}</td>{_metric_cells(m)}</tr>")
        body.append("</table><table><tr><th class='l'>source</th><th class='l'>class</th>"
                    "<th>prompts</th><th>fired</th><th>rate</th></tr>")
        for source, s in d["heldout_by_source"].items():
            body.append(f"<tr><td class='l'>{html.escape(source)}</td><td class='l'>"
                        f"{s['label']}</td><td>{s['prompts']}</td><td>{s['fired']}</td>"
                        f"<td>{s['fire_rate']:.1%}</td></tr>")
        body.append("</table>")
    body += _held_out_sources_html(record.get("leave_one_source_out") or {})
    body.append(f"<h2>Detector config</h2><pre>{html.escape(blocks_yaml)}</pre>")
    body.append(f"<h2>metrics.json</h2><pre>{html.escape(json.dumps(record, indent=2))}</pre>")
    return _page(f"Calibration: {cal.name}", "\n".join(body))


def percent(value: float | None) -> str:
    """A rate as ``12.3%`` (``-`` for none): the reports' and summaries' one format."""
    return "-" if value is None else f"{value:.1%}"


def _held_out_sources_html(loso: Mapping[str, Any]) -> list[str]:
    """Leave-one-source-out: the headline, each held-out source, and each length bucket's
    out-of-source scores and rates, with any bucket whose benign FPR is above the headline
    called out (a length bias to fix before the detector ships)."""
    body: list[str] = []
    for kind, d in loso.items():
        worst = d["worst_source_fpr"]
        body.append(f"<h2>{kind}: leave one source out (the headline)</h2><p>Worst held-out-"
                    f"source FPR <b>{worst['fpr']:.1%}</b> ({worst['fpr_ci95'][0]:.1%}-"
                    f"{worst['fpr_ci95'][1]:.1%}, {html.escape(worst['source'])}); pooled FPR "
                    f"{d['pooled_fpr']:.1%}, recall {d['pooled_recall']:.1%}.</p>"
                    "<table><tr><th class='l'>held-out source</th><th class='l'>class</th>"
                    "<th>prompts</th><th>fired</th><th>rate</th><th>95% CI</th><th>AUROC</th>"
                    "</tr>")
        for source, r in d["by_source"].items():
            auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
            ci = r["fire_rate_ci95"]
            body.append(f"<tr><td class='l'>{html.escape(source)}</td><td class='l'>"
                        f"{r['label']}</td><td>{r['prompts']}</td><td>{r['fired']}</td>"
                        f"<td>{r['fire_rate']:.1%}</td><td>{ci[0]:.1%}-{ci[1]:.1%}</td>"
                        f"<td>{auroc}</td></tr>")
        body.append("</table><table><tr><th class='l'>length bucket</th><th>positives</th>"
                    "<th>benign</th><th>recall</th><th>FPR</th><th>benign score median / "
                    "p95</th><th>positive score median</th><th class='l'></th></tr>")
        for bucket, b in d["by_length_bucket"].items():
            above = b["fpr"] is not None and b["fpr"] > worst["fpr"]
            ben, pos = b.get("benign_score"), b.get("positive_score")
            ben_text = "-" if not ben else f"{ben['median']:.3g} / {ben['p95']:.3g}"
            pos_text = "-" if not pos else f"{pos['median']:.3g}"
            body.append(
                f"<tr><td class='l'>{html.escape(bucket)}</td><td>{b['positives']}</td>"
                f"<td>{b['benign']}</td><td>{percent(b['recall'])}</td><td>{percent(b['fpr'])}</td>"
                f"<td>{ben_text}</td><td>{pos_text}</td><td class='l'>"
                f"{'<b>above the headline</b>' if above else ''}</td></tr>")
        body.append("</table>")
    return body


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
