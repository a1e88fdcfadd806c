"""``guard steer sweep``: a steering rule's dose-response, and the strongest safe strength.

A steering rule (from a guard config, or one edit given on the command line) runs through the
installed ``steering`` plugin (and the ``detectors`` plugin for its ``when``), exactly as the
sidecar runs it (:class:`guard.audit.verify.PluginPolicy`); its residual delta is multiplied
by each strength of the sweep (``1`` is the rule as written; for a nudge, strength ``s`` is
the nudge value times ``s``). For each strength the target effect (a measure of
:mod:`guard.audit.verify`, against no edit, paired by prompt) and the coherence cost (the
change of the model's next-token loss on benign text, relative to the clean loss) are
measured, with 95% bootstrap intervals. The suggested strength is the largest one, walking
out from 0 by magnitude, before the first whose mean cost exceeds the budget (default +10%).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from guard.audit.verify import (
    BenignLoss,
    Estimate,
    Intervention,
    Measure,
    PluginPolicy,
    Subject,
    bootstrap,
    html_page,
    png_tag,
    scaled,
)
from guard.errors import InvalidInput


def suggest_strength(strengths: Sequence[float], costs: Sequence[float],
                     budget: float) -> float | None:
    """The largest strength, by magnitude, reached from the smallest before the first whose
    cost is over ``budget`` (None when the smallest already is). Strengths of equal magnitude
    count together: both must be within the budget."""
    if len(strengths) != len(costs):
        raise ValueError("strengths and costs: expected one cost per strength")
    if budget < 0 or math.isnan(budget):
        raise InvalidInput(f"--budget: expected a relative loss increase >= 0, found {budget}")
    order = sorted(range(len(strengths)), key=lambda i: abs(strengths[i]))
    best: float | None = None
    i = 0
    while i < len(order):
        same = [j for j in order[i:] if abs(strengths[j]) == abs(strengths[order[i]])]
        if any(not costs[j] <= budget for j in same):  # NaN counts as over
            break
        best = max((strengths[j] for j in same), key=abs)
        i += len(same)
    return best


def parse_strengths(text: str) -> list[float]:
    """``0,0.5,1,2`` (or ``start:stop:count``, evenly spaced, both ends included)."""
    try:
        if text.count(":") == 2:
            start, stop, count = text.split(":")
            values = [float(v) for v in np.linspace(float(start), float(stop), int(count))]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidInput(f"--strengths: expected comma-separated numbers or "
                           f"start:stop:count, found {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"--strengths: expected finite numbers, found {text!r}")
    if len(set(values)) != len(values):
        raise InvalidInput(f"--strengths: each strength once, found {text!r}")
    return values


def rule_blocks(path: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The steering rule ``name`` of a guard config (``plugins.config.steering``) or of a bare
    mapping of rules, and the file's detectors (for the rule's ``when``)."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"--rule: cannot read {path}: {exc}") from None
    config = document
    for key in ("plugins", "config"):
        if isinstance(config, Mapping) and key in config:
            config = config[key]
    rules = config.get("steering", config) if isinstance(config, Mapping) else None
    if not isinstance(rules, Mapping) or name not in rules:
        found = ", ".join(map(str, rules)) if isinstance(rules, Mapping) else "none"
        raise InvalidInput(f"--rule: no steering rule {name!r} in {path} (found {found})")
    detectors = config.get("detectors", {}) if isinstance(config, Mapping) else {}
    return {name: rules[name]}, dict(detectors or {})


def edit_rule(hook: str, feature: int, kind: str, value: float) -> dict[str, Any]:
    """One edit as a steering rule (every content row, the plugin's default)."""
    return {"cli": {"hook": hook, "edits": [{"feature": feature, kind: value}]}}


def describe_rule(rule: Mapping[str, Any]) -> str:
    """``dessert: nudge f1283 by 6 when food-talk (rows: fired)``."""
    ((name, block),) = rule.items()
    edits = []
    for edit in block.get("edits", []) if isinstance(block, Mapping) else []:
        if isinstance(edit, Mapping):
            kind = next((k for k in ("pin", "nudge", "scale") if k in edit), "?")
            edits.append(f"{kind} f{edit.get('feature')} {'to' if kind == 'pin' else 'by'} "
                         f"{edit.get(kind)}")
    when = block.get("when") if isinstance(block, Mapping) else None
    text = f"{name}: {', '.join(edits) or 'no edits'}"
    if when:
        text += f" when {when if isinstance(when, str) else ', '.join(map(str, when))}"
    if isinstance(block, Mapping) and "rows" in block:
        text += f" (rows: {block['rows']})"
    return text


@dataclasses.dataclass
class SweepPoint:
    strength: float
    effect: Estimate
    loss_delta: Estimate
    loss_relative: Estimate
    per_prompt: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"strength": self.strength, "effect": self.effect.as_dict(),
                "benign_loss_delta": self.loss_delta.as_dict(),
                "benign_loss_relative": self.loss_relative.as_dict(),
                "per_prompt": [round(v, 4) for v in self.per_prompt]}


@dataclasses.dataclass
class SweepResult:
    hook: str
    sae_sha256: str
    rule: str
    measure: str
    unit: str
    meaning: str
    prompts: int
    benign: int
    budget: float
    resamples: int
    seed: int
    clean: Estimate
    clean_loss: float
    points: list[SweepPoint]
    suggested: float | None
    fast: bool
    #: Per strength, the greedy answers (for text measures), to read what the rule does.
    answers: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "sae_sha256": self.sae_sha256, "rule": self.rule,
                "measure": self.measure, "unit": self.unit, "meaning": self.meaning,
                "prompts": self.prompts, "benign_texts": self.benign, "budget": self.budget,
                "bootstrap_resamples": self.resamples, "seed": self.seed,
                "clean": self.clean.as_dict(), "clean_benign_loss": round(self.clean_loss, 4),
                "points": [p.as_dict() for p in self.points],
                "suggested_strength": self.suggested, "upper_layers_only": self.fast,
                "answers": self.answers}


def sweep(
    subject: Subject, policy: PluginPolicy, *, rule: str, strengths: Sequence[float],
    measure: Measure, prompts: Sequence[str], benign: Sequence[str], budget: float = 0.10,
    resamples: int = 2000, seed: int = 0, progress: TextIO | None = None,
) -> SweepResult:
    """The rule's delta times each strength: effect and coherence cost per strength."""
    if not prompts:
        raise InvalidInput("--prompts: expected at least one prompt, found an empty set")
    if not strengths:
        raise InvalidInput("--strengths: expected at least one strength")
    if policy.hook != subject.hook:
        raise InvalidInput(f"--rule: the rule steers {policy.hook!r}, the SAE is at "
                           f"{subject.hook!r}")
    loss = BenignLoss(benign)
    loss.prepare(subject)
    measure.prepare(subject, prompts)
    none = Intervention("none")
    clean = measure.values(subject, none)
    clean_loss = loss.values(subject, none)
    clean_mean = float(clean_loss.mean())
    points = []
    for n, strength in enumerate(strengths, 1):
        intervention = Intervention(f"strength {strength:g}", policy, scaled(strength))
        effect = measure.values(subject, intervention) - clean
        delta = loss.values(subject, intervention) - clean_loss
        points.append(SweepPoint(
            strength, bootstrap(effect, resamples=resamples, seed=seed),
            bootstrap(delta, resamples=resamples, seed=seed),
            bootstrap(delta / clean_mean, resamples=resamples, seed=seed),
            [float(v) for v in effect]))
        if progress is not None:
            print(f"\r  {n}/{len(strengths)} strengths", end="", file=progress, flush=True)
    if progress is not None:
        print(file=progress)
    suggested = suggest_strength([p.strength for p in points],
                                 [p.loss_relative.mean for p in points], budget)
    answers = getattr(measure, "answers", {})
    return SweepResult(
        subject.hook, subject.sae.info.sha256, rule, measure.name, measure.unit,
        measure.meaning, len(prompts), len(benign), budget, resamples, seed,
        bootstrap(clean, resamples=resamples, seed=seed), clean_mean, points, suggested,
        bool(subject.fast), dict(answers) if isinstance(answers, dict) else {})


def format_sweep(result: SweepResult) -> str:
    lines = [
        f"steering rule {result.rule} at {result.hook}",
        f"measure {result.measure}: {result.meaning}; {result.prompts} prompts, "
        f"{result.benign} benign texts; 95% bootstrap intervals",
        f"without the rule: {result.measure} {result.clean.text('.3f')}; benign loss "
        f"{result.clean_loss:.3f} nats/token",
        "",
        f"{'strength':>9} {'effect':>28} {'benign loss (nats/token)':>28} "
        f"{'relative':>24}",
    ]
    for p in result.points:
        mark = " <- suggested" if result.suggested == p.strength else ""
        over = " over budget" if not p.loss_relative.mean <= result.budget else ""
        lines.append(f"{p.strength:>9g} {p.effect.text():>28} {p.loss_delta.text():>28} "
                     f"{p.loss_relative.text('+.1f', 100, '%'):>24}{over}{mark}")
    if result.suggested is None:
        lines.append(f"no strength keeps the benign loss within +{result.budget:.0%}")
    else:
        lines.append(f"suggested strength: {result.suggested:g} (the largest whose benign loss "
                     f"stays within +{result.budget:.0%})")
    return "\n".join(lines)


def sweep_png(result: SweepResult) -> bytes:
    """The dose-response curve: effect (left axis) and coherence cost (right axis) against
    strength, with intervals, the budget and the suggested strength."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.points, key=lambda p: p.strength)
    x = np.array([p.strength for p in points])
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=90)
    eff = [p.effect for p in points]
    ax.plot(x, [e.mean for e in eff], "o-", color="#c0392b", ms=4, label="effect")
    ax.fill_between(x, [e.low for e in eff], [e.high for e in eff], color="#c0392b",
                    alpha=0.15)
    ax.set_xlabel("strength (times the rule's delta)", fontsize=8)
    ax.set_ylabel(f"change in {result.measure}" + (f" ({result.unit})" if result.unit else ""),
                  fontsize=8, color="#c0392b")
    cost = ax.twinx()
    rel = [p.loss_relative for p in points]
    cost.plot(x, [100 * e.mean for e in rel], "s--", color="#2471a3", ms=3,
              label="benign loss")
    cost.fill_between(x, [100 * e.low for e in rel], [100 * e.high for e in rel],
                      color="#2471a3", alpha=0.12)
    cost.axhline(100 * result.budget, color="#2471a3", lw=0.8, ls=":")
    cost.set_ylabel("benign loss change (%)", fontsize=8, color="#2471a3")
    if result.suggested is not None:
        ax.axvline(result.suggested, color="#1e8449", lw=1.0, ls="-.",
                   label=f"suggested {result.suggested:g}")
    lines = ax.get_legend_handles_labels()
    more = cost.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    ax.set_title(f"{result.rule[:70]}", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def sweep_html(result: SweepResult, png: bytes | None = None, command: str = "") -> str:
    import html

    rows = []
    for p in result.points:
        cls = " class='yes'" if result.suggested == p.strength else ""
        rows.append(f"<tr{cls}><td>{p.strength:g}</td><td>{html.escape(p.effect.text())}</td>"
                    f"<td>{html.escape(p.loss_delta.text())}</td>"
                    f"<td>{html.escape(p.loss_relative.text('+.1f', 100, '%'))}</td></tr>")
    body = [
        f"<p>Rule <code>{html.escape(result.rule)}</code> at <code>"
        f"{html.escape(result.hook)}</code>, its delta times each strength. Measure <b>"
        f"{html.escape(result.measure)}</b>: {html.escape(result.meaning)}. {result.prompts} "
        f"prompts, {result.benign} benign texts, 95% bootstrap intervals over prompts "
        f"({result.resamples} resamples). Without the rule: "
        f"{html.escape(result.clean.text('.3f'))}; benign loss {result.clean_loss:.3f} "
        f"nats/token.</p>",
        "<table><tr><th>strength</th><th>effect</th><th>benign loss change (nats/token)</th>"
        f"<th>relative</th></tr>{''.join(rows)}</table>",
        "<p><b>Suggested strength: " + (f"{result.suggested:g}" if result.suggested is not None
                                       else "none") +
        f"</b> (the largest whose benign loss stays within +{result.budget:.0%}).</p>",
    ]
    if png is not None:
        body.append(png_tag(png, "dose-response curve"))
    for strength, answers in list(result.answers.items())[:8]:
        body.append(f"<h3>{html.escape(strength)}</h3><ul>" + "".join(
            f"<li>{html.escape(a)}</li>" for a in answers[:3]) + "</ul>")
    if command:
        body.append(f"<p class='muted'>command: <code>{html.escape(command)}</code></p>")
    return html_page(f"Steering sweep: {result.rule.split(':')[0]}", "".join(body))
