"""First-party detectors: threshold, sustained and linear rules over SAE features.

Each detector reads the rows of the roles it chooses (``rows``: by default the content of
user, assistant and tool messages and the generated tokens; never the chat template's markup
nor the system prompt unless asked for), and pools over those rows only. Rows the host did not
label (``RowRole.UNSPECIFIED``, or a batch without roles from a host that predates them) are
read by every detector, whatever it chose: a guard errs on the side of looking.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import structlog
from numpy.typing import NDArray

from guard import (
    ConfigError,
    FeatureBatch,
    FeatureRequest,
    Finding,
    FindingAction,
    Phase,
    RequestEndReason,
    RowRole,
    Settings,
    hookimpl,
)

log = structlog.get_logger("guard_plugins.detectors")

Combine = Literal["any", "all"]
Reduce = Literal["max", "mean"]

_PHASES: Mapping[str, Phase] = {"prompt": Phase.PROMPT, "generation": Phase.GENERATION}
_ALL_PHASES = frozenset(_PHASES.values())

#: Keys every detector reads, then the keys of each type (a key of another type is an error).
_COMMON_KEYS = ("type", "hook", "threshold", "action", "phases", "rows")
_TYPE_KEYS: Mapping[str, tuple[str, ...]] = {
    "threshold": ("features", "combine", "reduce"),
    "sustained": ("features", "combine", "window", "max_requests", "idle_seconds"),
    "linear": ("weights", "bias", "reduce"),
}

#: The role names a ``rows`` list may hold (``unspecified`` rows are always read).
ROW_ROLES: Mapping[str, RowRole] = {
    role.name.lower(): role for role in RowRole if role is not RowRole.UNSPECIFIED}
#: What a detector (or a steering rule) reads when its config does not say: the content of
#: user, assistant and tool messages and the generated tokens; not the template's markup nor
#: the system prompt, which are the same on every request and would outweigh short content.
DEFAULT_ROWS: frozenset[RowRole] = frozenset(
    {RowRole.USER, RowRole.ASSISTANT, RowRole.TOOL, RowRole.GENERATED})
_ROWS_EXPECTED = f"'all' or a non-empty list of row roles ({', '.join(ROW_ROLES)})"


def parse_rows(block: Settings, name: str = "rows",
               default: frozenset[RowRole] | None = DEFAULT_ROWS) -> frozenset[RowRole] | None:
    """A ``rows`` setting: ``all`` (None: every row) or a list of role names (a single name
    reads as a list of one). Errors name the key, or the item (``rows[1]``)."""
    def check(key: str, value: object) -> frozenset[RowRole] | None:
        if value == "all":
            return None
        if isinstance(value, str):  # one role
            if value not in ROW_ROLES:
                raise ConfigError(key, _ROWS_EXPECTED, value)
            return frozenset({ROW_ROLES[value]})
        items = value
        if not isinstance(items, list) or not items:
            raise ConfigError(key, _ROWS_EXPECTED, value)
        roles: set[RowRole] = set()
        for index, item in enumerate(items):
            role = ROW_ROLES.get(item) if isinstance(item, str) else None
            if role is None:
                raise ConfigError(f"{key}[{index}]", f"a row role ({', '.join(ROW_ROLES)})",
                                  item)
            if role in roles:
                raise ConfigError(f"{key}[{index}]", "each role once", item)
            roles.add(role)
        return frozenset(roles)

    return block.get(name, check, default)


def rows_name(roles: frozenset[RowRole] | None) -> str:
    """How a ``rows`` setting reads in a message: ``all`` or ``user+generated``."""
    if roles is None:
        return "all"
    return "+".join(role.name.lower() for role in sorted(roles))


@dataclass(frozen=True)
class Rule:
    """What every detector has: where it reads, what it compares and what a hit asks for."""

    name: str
    hook: str
    features: tuple[int, ...]
    threshold: float
    action: FindingAction
    phases: frozenset[Phase]
    #: The roles of the rows it reads (None: every row); unlabelled rows are always read.
    roles: frozenset[RowRole] | None = DEFAULT_ROWS

    def runs_on(self, phase: Phase) -> bool:
        # A host that does not label phases gets every detector: a guard errs on the side
        # of looking rather than silently skipping rows.
        return phase == Phase.UNSPECIFIED or phase in self.phases

    def finding(
        self,
        positions: NDArray[np.int64],
        score: float,
        fired_rows: NDArray[np.bool_],
        contributing: NDArray[np.bool_],
        evidence: NDArray[np.float64],
        message: str,
    ) -> Finding:
        return Finding(
            detector=self.name,
            score=float(score),
            threshold=self.threshold,
            action=self.action,
            feature_ids=tuple(f for f, c in zip(self.features, contributing, strict=True) if c),
            feature_activations=tuple(float(v) for v in evidence[contributing]),
            positions=tuple(int(p) for p in positions[fired_rows]),
            message=message,
        )


def _columns(batch: FeatureBatch, features: tuple[int, ...]) -> NDArray[np.float64]:
    """``batch.columns(features)`` as float64, found by binary search.

    The engine hands feature ids in ascending order; ``FeatureBatch.columns`` instead builds a
    dict over every id of the batch (about 3 ms per batch for a full-width 24k SAE). The
    result is verified, so unsorted ids fall back to ``columns``, whose KeyError names a
    feature that was not encoded.
    """
    available = batch.feature_ids
    wanted = np.asarray(features, dtype=np.int64)
    if len(available):
        index = np.minimum(np.searchsorted(available, wanted), len(available) - 1)
        if bool((available[index] == wanted).all()):
            return batch.activations[:, index].astype(np.float64)
    return batch.columns(features).astype(np.float64)


def _over(acts: NDArray[np.float64], threshold: float, combine: Combine) -> NDArray[np.bool_]:
    """Per row: any (or all) of the features at or above the threshold."""
    over = acts >= threshold
    reduce = np.logical_or.reduce if combine == "any" else np.logical_and.reduce
    met: NDArray[np.bool_] = reduce(over, axis=1)
    return met


@dataclass(frozen=True)
class ThresholdDetector:
    """Reduce each feature over the rows (max or mean), then compare with the threshold.

    Fires when any (or all) of the reduced values reach the threshold. The score is the
    largest reduced value over the threshold (``any``) or the smallest reduced value
    (``all``), so ``score >= threshold`` exactly when it fires. Positions are the rows whose
    own values of the contributing features meet the condition; when no row does alone
    (``all`` with the features peaking on different rows), the rows where any of them does.
    """

    rule: Rule
    combine: Combine
    reduce: Reduce

    def evaluate(self, batch: FeatureBatch) -> Finding | None:
        acts = _columns(batch, self.rule.features)
        reduced = acts.max(axis=0) if self.reduce == "max" else acts.mean(axis=0)
        threshold = self.rule.threshold
        over = reduced >= threshold
        if not (over.any() if self.combine == "any" else over.all()):
            return None
        if self.combine == "any":
            score, contributing = reduced[over].max(), over
        else:
            score, contributing = reduced.min(), np.ones_like(over)
        # Positions come from the contributing features only: under `mean`, a row where a
        # feature that did not fire spikes is not a row of this finding.
        fired_columns = acts[:, contributing]
        rows = _over(fired_columns, threshold, self.combine)
        if not rows.any():
            rows = _over(fired_columns, threshold, "any")
        n = len(self.rule.features)
        message = (f"{int(contributing.sum())} of {n} features at or above {threshold:g} "
                   f"({self.reduce} over {acts.shape[0]} rows, combine {self.combine})")
        return self.rule.finding(batch.positions, score, rows, contributing, reduced, message)


@dataclass(frozen=True)
class LinearDetector:
    """``score = bias + sum_f w_f * a_f`` per row, reduced over rows (max or mean).

    The reported feature activations are those the score was computed from (the top row's
    for ``max``, the mean for ``mean``), so ``bias + sum(w * a)`` reproduces the score.
    """

    rule: Rule
    weights: NDArray[np.float64]
    bias: float
    reduce: Reduce

    def evaluate(self, batch: FeatureBatch) -> Finding | None:
        acts = _columns(batch, self.rule.features)
        scores = self.bias + acts @ self.weights
        if self.reduce == "max":
            top = int(np.argmax(scores))
            score, evidence = scores[top], acts[top]
        else:
            score, evidence = scores.mean(), acts.mean(axis=0)
        if not score >= self.rule.threshold:  # also false for NaN
            return None
        rows = scores >= self.rule.threshold
        message = (f"linear score {score:.4g} at or above {self.rule.threshold:g} "
                   f"({self.reduce} over {acts.shape[0]} rows)")
        everything = np.ones(len(self.rule.features), dtype=np.bool_)
        return self.rule.finding(batch.positions, score, rows, everything, evidence, message)


@dataclass
class _Run:
    length: int
    last_position: int
    seen: float


class RunTracker:
    """Per request: how many consecutive tokens met the condition so far. Thread-safe.

    Memory is bounded: a request whose run is broken holds no state; a request that ended
    (:meth:`forget`, from ``guard_request_ended``) neither; the least recently updated
    requests are evicted beyond ``max_requests``, and any idle for ``idle_seconds`` (so a
    host that never ends its requests cannot grow it).
    """

    def __init__(self, max_requests: int, idle_seconds: float) -> None:
        self.max_requests = max_requests
        self.idle_seconds = idle_seconds
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def advance(
        self, request_id: str, positions: NDArray[np.int64], met: NDArray[np.bool_],
        now: float | None = None,
    ) -> NDArray[np.int64]:
        """Run length at each row (rows in position order) after the carried-over run."""
        now = time.monotonic() if now is None else now
        n = len(met)
        index = np.arange(n)
        with self._lock:
            previous = self._runs.pop(request_id, None)
            carry = 0
            contiguous = np.empty(n, dtype=np.bool_)
            contiguous[1:] = positions[1:] == positions[:-1] + 1
            contiguous[0] = previous is not None and positions[0] == previous.last_position + 1
            if previous is not None and contiguous[0]:
                carry = previous.length
            # A row that misses the condition ends the run (its run is 0); a row that meets it
            # after a gap in positions starts a new run of 1. Each such break sets the base the
            # run counts from; bases only grow with the row index, so a running maximum finds
            # the last break before every row.
            misses = ~met
            restarts = met & ~contiguous
            base = np.where(misses, index, np.where(restarts, index - 1, -1 - carry))
            runs = np.where(met, index - np.maximum.accumulate(base), 0).astype(np.int64)
            if runs[-1] > 0:
                self._runs[request_id] = _Run(int(runs[-1]), int(positions[-1]), now)
            self._evict(now)
        return runs

    def forget(self, request_id: str) -> bool:
        """Drop the request's run (it ended); whether there was one."""
        with self._lock:
            return self._runs.pop(request_id, None) is not None

    def _evict(self, now: float) -> None:
        while len(self._runs) > self.max_requests:
            self._runs.popitem(last=False)
        while self._runs:
            oldest = next(iter(self._runs.values()))
            if now - oldest.seen <= self.idle_seconds:
                break
            self._runs.popitem(last=False)


@dataclass(frozen=True)
class SustainedDetector:
    """Fires on every token at which any (or all) of the features have reached the threshold
    on ``window`` consecutive tokens (positions) of one request, counted across batches. A
    token that misses the condition, or a gap in positions, restarts the count; so does the
    end of the request (``guard_request_ended``: finished, aborted, evicted by its stream, or
    its stream closed) and a reload (fresh instances). A preempted request keeps its count:
    when its rows are sent again from an earlier position the count restarts there (a
    backwards step is a gap), and a host that resumes it at the next position goes on.
    Only the rows of its ``rows`` roles count: a row it does not read (template markup
    between the user's words and the generated tokens) leaves a gap in positions, which
    restarts the count.

    The score is the largest per-row value (max over features for ``any``, min for ``all``)
    among the rows that fired.
    """

    rule: Rule
    combine: Combine
    window: int
    runs: RunTracker = field(compare=False)

    def evaluate(self, batch: FeatureBatch) -> Finding | None:
        acts = _columns(batch, self.rule.features)
        positions = batch.positions
        if len(positions) > 1 and not bool((positions[1:] > positions[:-1]).all()):
            order = np.argsort(positions, kind="stable")
            acts, positions = acts[order], positions[order]
        threshold = self.rule.threshold
        met = _over(acts, threshold, self.combine)
        runs = self.runs.advance(batch.request_id, positions, met)
        fired = runs >= self.window
        if not fired.any():
            return None
        per_row = acts.max(axis=1) if self.combine == "any" else acts.min(axis=1)
        evidence = acts[fired].max(axis=0)
        contributing = (
            evidence >= threshold if self.combine == "any" else np.ones_like(evidence, bool)
        )
        message = (f"{self.combine} of the features at or above {threshold:g} for "
                   f"{int(runs.max())} consecutive tokens (window {self.window})")
        return self.rule.finding(positions, per_row[fired].max(), fired, contributing, evidence,
                                 message)


Detector = ThresholdDetector | SustainedDetector | LinearDetector


class Detectors:
    """Feature detectors configured by name; each finding is named after its detector.

    ``plugins.config.detectors`` maps a detector name to its settings::

        jailbreak:
          type: threshold        # threshold (default) | sustained | linear
          hook: blocks.15.hook_resid_post
          features: [123, 456]   # threshold and sustained
          threshold: 2.5
          combine: any           # any (default) | all: threshold and sustained
          reduce: max            # max (default) | mean over the batch's rows: threshold, linear
          action: flag           # log | flag (default) | abort
          phases: [prompt, generation]   # default: both (unlabelled batches always run)
          rows: [user, generated]  # roles of the rows read; default: user, assistant, tool,
                                   # generated (never template markup); `all`: every row
        evasive:
          type: sustained
          hook: blocks.15.hook_resid_post
          features: [77]
          threshold: 1.0
          window: 8              # fires once 8 consecutive tokens of one request met it
          max_requests: 10000    # state kept for at most this many requests (LRU)
          idle_seconds: 600      # and dropped for a request idle this long (and at its end)
        deception:
          type: linear
          hook: blocks.15.hook_resid_post
          weights: {123: 0.7, 456: -0.2}   # score = bias + sum w_f * a_f per row
          bias: -1.0
          threshold: 0.0
          action: abort
    """

    def __init__(self) -> None:
        self._detectors: tuple[Detector, ...] = ()
        self._by_hook: Mapping[str, tuple[Detector, ...]] = {}
        #: Whether a batch without roles was met once (logged once per configuration).
        self._unlabelled_seen = False

    @property
    def detectors(self) -> tuple[Detector, ...]:
        return self._detectors

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        detectors = tuple(_parse(name, block) for name, block in
                          Settings(settings, what="a mapping of detectors").sections("detector"))
        by_hook: dict[str, tuple[Detector, ...]] = {}
        for detector in detectors:
            by_hook[detector.rule.hook] = (*by_hook.get(detector.rule.hook, ()), detector)
        self._detectors, self._by_hook = detectors, by_hook
        self._unlabelled_seen = False

    @hookimpl
    def guard_subscriptions(self) -> Sequence[FeatureRequest]:
        return [FeatureRequest(hook, sorted({f for d in group for f in d.rule.features}))
                for hook, group in self._by_hook.items()]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> Sequence[Finding] | None:
        group = self._by_hook.get(batch.hook)
        if not group or batch.activations.shape[0] == 0:
            return None
        findings = []
        chosen: dict[frozenset[RowRole] | None, FeatureBatch | None] = {}
        for detector in group:
            rule = detector.rule
            if not rule.runs_on(batch.phase):
                continue
            if rule.roles not in chosen:
                chosen[rule.roles] = self._rows(batch, rule.roles)
            rows = chosen[rule.roles]
            if rows is None:  # none of the rows it reads
                continue
            finding = detector.evaluate(rows)
            if finding is not None:
                findings.append(finding)
        return findings

    def _rows(self, batch: FeatureBatch, roles: frozenset[RowRole] | None
              ) -> FeatureBatch | None:
        """The batch's rows of ``roles`` (the batch itself when they are all of them), or
        None when it has none of them."""
        if batch.roles is None and roles is not None and not self._unlabelled_seen:
            self._unlabelled_seen = True
            log.info("batch without row roles: detectors read every row of it, template "
                     "markup included (the host labels no roles)", hook=batch.hook)
        mask = batch.rows_of(roles)
        if mask is None:
            return batch
        return batch.select(mask) if mask.any() else None

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        """Free the request's sustained-detector runs, unless it was only preempted.

        A preempted request's rows are sent again (vLLM recomputes them from position 0), and
        the count restarts by itself on the first resent row, which is not the next position.
        Forgetting it here would be wrong: this hook runs on the sink thread, behind the
        decisions queued before it, so it can come after the first resent rows were counted
        and wipe their count (the request's run would then start late, or never reach its
        window)."""
        if reason == "preempted":
            return
        for detector in self._detectors:
            if isinstance(detector, SustainedDetector):
                detector.runs.forget(request_id)


def _parse(name: str, block: Settings) -> Detector:
    kind = block.choice("type", tuple(_TYPE_KEYS), "threshold")
    block.only((*_COMMON_KEYS, *_TYPE_KEYS[kind]), f"of a {kind} detector")
    hook = block.string("hook")
    threshold = block.number("threshold")
    action = cast(FindingAction, block.choice("action", ("log", "flag", "abort"), "flag"))
    phase_set = _phases(block) if "phases" in block else _ALL_PHASES
    roles = parse_rows(block)
    combine = cast(Combine, block.choice("combine", ("any", "all"), "any"))
    reduce = cast(Reduce, block.choice("reduce", ("max", "mean"), "max"))

    detector: Detector
    if kind == "linear":
        weights = _weights(block)
        bias = block.number("bias", 0.0)
        rule = Rule(name, hook, tuple(weights), threshold, action, phase_set, roles)
        detector = LinearDetector(rule, np.array(list(weights.values()), dtype=np.float64),
                                  bias, reduce)
    else:
        rule = Rule(name, hook, _feature_ids(block), threshold, action, phase_set, roles)
        if kind == "threshold":
            detector = ThresholdDetector(rule, combine, reduce)
        else:
            window = block.positive_int("window")
            tracker = RunTracker(block.positive_int("max_requests", 10_000),
                                 block.number("idle_seconds", 600.0, above=0))
            detector = SustainedDetector(rule, combine, window, tracker)
    return detector


def _phases(block: Settings) -> frozenset[Phase]:
    phases = block.sequence("phases", "a non-empty list of phases (prompt, generation)",
                            non_empty=True)
    return frozenset(_PHASES[phases.choice(i, tuple(_PHASES))] for i in phases.names())


def _feature_ids(block: Settings) -> tuple[int, ...]:
    """A non-empty list of distinct feature ids, in the order given (digit strings too: Helm
    ``--set-string``)."""
    listed = block.sequence("features", "a non-empty list of feature ids", non_empty=True)
    ids = tuple(listed.feature_id(i, digits=True) for i in listed.names())
    if len(set(ids)) != len(ids):
        raise block.error("features", "distinct feature ids", block.data["features"])
    return ids


def _weights(block: Settings) -> dict[int, float]:
    """Feature id -> weight; a map (not a list) so that Helm ``--set`` can change one."""
    weights = block.section("weights", what="a non-empty mapping of feature id to weight")
    if not weights:
        raise block.error("weights", "a non-empty mapping of feature id to weight",
                          block.data.get("weights", "nothing"))
    return {feature: weights.number(key) for feature, key in weights.feature_keys().items()}
