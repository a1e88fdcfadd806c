"""First-party detectors: threshold, sustained and linear rules over SAE features, linear
probes over the raw residual rows, and a check that the SAE explains the rows at all
(``reconstruction``: its error beyond what it was calibrated on puts every feature-based verdict
on the request outside the SAE's distribution).

Each detector reads the rows of the roles it chooses (``rows``: by default the content of
every message and the generated tokens; never the chat template's markup nor the text it adds
by itself, such as a default system prompt, unless asked for), and pools over those rows only.
Rows the host did not label (``RowRole.UNSPECIFIED``, or a batch without roles from a host
that predates them) are read by every detector, whatever it chose: a guard errs on the side
of looking.

Threshold, linear and probe detectors pool over a request's rows, across its batches
(``pooling``): an engine that cuts a prompt into chunks (vLLM's chunked prefill) gets the
decision the whole prompt would get. ``mean`` decides once the prompt is complete (the host
says so with ``prompt_complete``), ``max`` and ``rolling_max`` on every batch, since more rows
can only raise their pooled value. Per request they keep a little state, bounded like the
sustained detector's (``max_requests``, ``idle_seconds``) and freed when the request ends.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

import numpy as np
import structlog
from numpy.lib.stride_tricks import sliding_window_view
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

#: Fewest rows a reconstruction detector judges by default: the NMSE of a handful of similar
#: rows divides by their small spread, and is noisy.
DEFAULT_MIN_ROWS = 8

log = structlog.get_logger("guard_plugins.detectors")

Combine = Literal["any", "all"]
Pooling = Literal["mean", "max", "rolling_max"]
POOLINGS: tuple[Pooling, ...] = ("mean", "max", "rolling_max")
#: ``reduce`` (per batch, before detectors pooled across a request's batches) -> ``pooling``:
#: on a prompt sent whole, in one batch, both give the same decision and score.
REDUCE_ALIAS: Mapping[str, Pooling] = {"max": "max", "mean": "mean"}

_PHASES: Mapping[str, Phase] = {"prompt": Phase.PROMPT, "generation": Phase.GENERATION}
_ALL_PHASES = frozenset(_PHASES.values())

_POOLED_KEYS = ("pooling", "window", "max_requests", "idle_seconds")
#: Keys every detector reads, then the keys of each type (a key of another type is an error).
_COMMON_KEYS = ("type", "hook", "threshold", "action", "phases", "rows")
_TYPE_KEYS: Mapping[str, tuple[str, ...]] = {
    "threshold": ("features", "combine", "reduce", *_POOLED_KEYS),
    "sustained": ("features", "combine", "window", "max_requests", "idle_seconds"),
    "linear": ("weights", "bias", "reduce", *_POOLED_KEYS),
    "probe": ("weights", "bias", "explain", *_POOLED_KEYS),
    "reconstruction": ("percentile", "min_rows"),
}
#: The action of a detector whose config does not say (reconstruction: a caveat on the other
#: verdicts, logged; the others: flagged to the host).
_DEFAULT_ACTION: Mapping[str, FindingAction] = {"reconstruction": "log"}

#: The role names a ``rows`` list may hold (``unspecified`` rows are always read).
ROW_ROLES: Mapping[str, RowRole] = {
    role.name.lower(): role for role in RowRole if role is not RowRole.UNSPECIFIED}
#: What a detector (or a steering rule) reads when its config does not say: the content of
#: every message (system messages included: a client may write them) and the generated
#: tokens; not the template's markup nor the text the template adds by itself (a default
#: system prompt), which are the same on every request and would outweigh short content.
DEFAULT_ROWS: frozenset[RowRole] = frozenset(
    {RowRole.SYSTEM, RowRole.USER, RowRole.ASSISTANT, RowRole.TOOL, RowRole.GENERATED})
_ROWS_EXPECTED = f"'all' or a non-empty list of row roles ({', '.join(ROW_ROLES)})"

_EMPTY_POSITIONS: NDArray[np.int64] = np.zeros(0, dtype=np.int64)


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
        return self.found(score, positions[fired_rows],
                          tuple(f for f, c in zip(self.features, contributing, strict=True)
                                if c),
                          evidence[contributing], message)

    def found(self, score: float, positions: NDArray[np.int64], feature_ids: Sequence[int],
              activations: NDArray[np.float64], message: str) -> Finding:
        return Finding(
            detector=self.name,
            score=float(score),
            threshold=self.threshold,
            action=self.action,
            feature_ids=tuple(int(f) for f in feature_ids),
            feature_activations=tuple(float(v) for v in activations),
            positions=tuple(int(p) for p in positions),
            message=message,
        )


def _columns(batch: FeatureBatch, features: tuple[int, ...]) -> NDArray[np.float64]:
    """``batch.columns(features)`` as float64, found by binary search.

    The engine hands feature ids in ascending order; ``FeatureBatch.columns`` instead builds a
    dict over every id of the batch (about 3 ms per batch for a full-width 24k SAE). The
    result is verified, so unsorted ids fall back to ``columns``, whose KeyError names a
    feature that was not encoded.
    """
    if not features:
        return np.zeros((batch.activations.shape[0], 0), dtype=np.float64)
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


def _in_order(positions: NDArray[np.int64], values: NDArray[np.float64]
              ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Rows sorted by position (a host may send them in any order)."""
    if len(positions) > 1 and not bool((positions[1:] > positions[:-1]).all()):
        order = np.argsort(positions, kind="stable")
        return positions[order], values[order]
    return positions, values


# -- per-request state ------------------------------------------------------------------------


class _Seen(Protocol):
    seen: float


_State = TypeVar("_State", bound=_Seen)
#: A request's key: (stream, request id). Request ids are the host's, unique per stream only.
Key = tuple[str, str]


class RequestStates(Generic[_State]):
    """Per-request state, by (stream, request id), bounded: at most ``max_requests`` (the
    least recently updated go first) and none idle for over ``idle_seconds``. Thread-safe.

    A request that ended (:meth:`forget`, from ``guard_request_ended``, which names the
    request only) is forgotten on every stream."""

    def __init__(self, max_requests: int, idle_seconds: float) -> None:
        self.max_requests = max_requests
        self.idle_seconds = idle_seconds
        self._states: OrderedDict[Key, _State] = OrderedDict()
        self._streams: dict[str, set[str]] = {}  # request id -> the streams that hold it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def take(self, key: Key) -> _State | None:
        """The request's state, out of the store (:meth:`keep` puts it back)."""
        with self._lock:
            state = self._states.pop(key, None)
            if state is not None:
                self._unindex(key)
            return state

    def keep(self, key: Key, state: _State, now: float) -> None:
        """Put the request's state (back), as its most recent; evict what is over bounds."""
        state.seen = now
        with self._lock:
            if self._states.pop(key, None) is None:
                self._streams.setdefault(key[1], set()).add(key[0])
            self._states[key] = state
            while len(self._states) > self.max_requests:
                self._unindex(self._states.popitem(last=False)[0])
            while self._states:
                oldest, first = next(iter(self._states.items()))
                if now - first.seen <= self.idle_seconds:
                    break
                del self._states[oldest]
                self._unindex(oldest)

    def forget(self, request_id: str) -> bool:
        """Drop the request's state on every stream (it ended); whether there was any."""
        with self._lock:
            streams = self._streams.pop(request_id, set())
            for stream in streams:
                self._states.pop((stream, request_id), None)
            return bool(streams)

    def _unindex(self, key: Key) -> None:
        streams = self._streams.get(key[1])
        if streams is not None:
            streams.discard(key[0])
            if not streams:
                del self._streams[key[1]]


# -- pooling over a request's rows ------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """How a detector pools its per-row values over the rows it reads of one request.

    - ``mean``: the mean of every row so far;
    - ``max``: the largest row;
    - ``rolling_max``: the largest mean of ``window`` consecutive rows (rows it reads: rows
      of other roles are skipped, not counted); while the request has fewer rows than that,
      the mean of all of them.

    ``lead``: the first column leads (a linear or probe score: the best row or window is the
    one with the highest score, and the other columns, its features, come from that same
    row or window); otherwise each column is pooled on its own (a threshold detector's
    features).
    """

    mode: Pooling
    window: int = 1
    lead: bool = False

    def describe(self) -> str:
        return f"rolling_max of {self.window}" if self.mode == "rolling_max" else self.mode


@dataclass
class _PoolState:
    """One request's pool: what a later batch needs to go on from where this one stopped."""

    width: int
    last_position: int = -1
    seen: float = 0.0
    count: int = 0
    #: mean: the sum of the rows.
    total: NDArray[np.float64] | None = None
    #: max, rolling_max: the pooled value so far (None: no row, or no whole window, yet).
    best: NDArray[np.float64] | None = None
    #: rolling_max: the last ``window - 1`` rows (windows go on across batches).
    tail: NDArray[np.float64] | None = None
    tail_positions: NDArray[np.int64] = field(default_factory=lambda: _EMPTY_POSITIONS)


@dataclass(frozen=True)
class Pooled:
    """A request's pool once a batch's rows were added."""

    #: Rows of the request pooled so far.
    count: int
    #: The pooled vector: the mean so far (``mean``); the best row or window so far (``max``,
    #: ``rolling_max``; None before the first whole window). With a leading column, the
    #: other columns are those of the best row or window.
    value: NDArray[np.float64] | None
    #: This batch's candidates: its rows (``max``) or the windows ending in its rows
    #: (``rolling_max``), ``[m, columns]`` (``[m]``: the leading column only); none for mean.
    candidates: NDArray[np.float64]
    #: The positions of each candidate's rows, ``[m, rows per candidate]``.
    spans: NDArray[np.int64]
    #: ``rolling_max`` with fewer rows than its window: their mean, and their positions.
    short: NDArray[np.float64] | None = None
    short_positions: NDArray[np.int64] = field(default_factory=lambda: _EMPTY_POSITIONS)


class PoolTracker:
    """Per request: the pooled state of one detector, across batches. Thread-safe.

    Memory is bounded as the sustained detector's is: at most ``max_requests`` requests
    (the least recently updated are evicted), none idle for over ``idle_seconds``, none that
    ended (:meth:`forget`, from ``guard_request_ended``). Per request it keeps one vector of
    the detector's columns (``mean``, ``max``), plus ``window - 1`` rows of them for
    ``rolling_max``. Rows sent again from an earlier position (a preempted request that the
    engine recomputes from its start) start the request's pool over.
    """

    def __init__(self, pool: Pool, max_requests: int, idle_seconds: float) -> None:
        self.pool = pool
        self._states: RequestStates[_PoolState] = RequestStates(max_requests, idle_seconds)

    def __len__(self) -> int:
        return len(self._states)

    def add(self, request_id: str, values: NDArray[np.float64], positions: NDArray[np.int64],
            now: float | None = None, stream: str = "") -> Pooled:
        """Pool ``values`` (``[rows, columns]``, rows in position order) into the pool of
        request ``request_id`` of ``stream``; what it holds then."""
        now = time.monotonic() if now is None else now
        key = (stream, request_id)
        state = self._states.take(key)
        n, width = values.shape
        if state is not None and n and (int(positions[0]) <= state.last_position
                                        or state.width != width):
            state = None  # resent from an earlier position: recomputed after a preemption
        if state is None:
            state = _PoolState(width)
        pooled = self._update(state, values, positions) if n else self._current(state)
        if state.count:
            self._states.keep(key, state, now)
        return pooled

    def forget(self, request_id: str) -> bool:
        """Drop the request's pool, on every stream (it ended); whether there was one."""
        return self._states.forget(request_id)

    def drop(self, request_id: str, stream: str = "") -> None:
        """Drop the pool of the request of this stream (decided, nothing more to read)."""
        self._states.take((stream, request_id))

    def _current(self, state: _PoolState) -> Pooled:
        """The pool as it is, for a batch that brings no rows."""
        width = state.width
        pool = self.pool
        value: NDArray[np.float64] | None = state.best
        short = None
        if pool.mode == "mean":
            value = None if state.total is None else state.total / state.count
        elif pool.mode == "rolling_max" and 0 < state.count < pool.window:
            assert state.tail is not None
            short = state.tail.mean(axis=0)
        return Pooled(state.count, value, np.zeros((0,) if pool.lead else (0, width)),
                      np.zeros((0, 1), dtype=np.int64), short,
                      state.tail_positions if short is not None else _EMPTY_POSITIONS)

    def _update(self, state: _PoolState, values: NDArray[np.float64],
                positions: NDArray[np.int64]) -> Pooled:
        pool = self.pool
        n = values.shape[0]
        state.last_position = int(positions[-1])
        if pool.mode == "mean":
            total = values.sum(axis=0)
            state.total = total if state.total is None else state.total + total
            state.count += n
            return Pooled(state.count, state.total / state.count,
                          np.zeros((0,) if pool.lead else (0, state.width)),
                          np.zeros((0, 1), dtype=np.int64))
        if pool.mode == "max":
            state.count += n
            spans = positions[:, None]
            if pool.lead:
                top = int(np.argmax(values[:, 0]))
                if state.best is None or values[top, 0] > state.best[0]:
                    state.best = values[top].copy()
                return Pooled(state.count, state.best, values[:, 0], spans)
            peak = values.max(axis=0)
            state.best = peak if state.best is None else np.maximum(state.best, peak)
            return Pooled(state.count, state.best, values, spans)
        return self._roll(state, values, positions)

    def _roll(self, state: _PoolState, values: NDArray[np.float64],
              positions: NDArray[np.int64]) -> Pooled:
        """``rolling_max``: the windows ending in this batch's rows (they may start in the
        rows kept from earlier batches)."""
        pool = self.pool
        window = pool.window
        carried = 0 if state.tail is None else state.tail.shape[0]
        rows = values if state.tail is None else np.concatenate([state.tail, values])
        at = positions if not carried else np.concatenate([state.tail_positions, positions])
        state.count += values.shape[0]
        first = max(0, carried - window + 1)  # the first window that ends in a new row
        if rows.shape[0] >= window:
            spans = sliding_window_view(at, window)[first:]
            if pool.lead:
                candidates = sliding_window_view(rows[:, 0], window)[first:].mean(axis=-1)
                top = int(np.argmax(candidates))
                if state.best is None or candidates[top] > state.best[0]:
                    start = first + top
                    state.best = rows[start:start + window].mean(axis=0)
                    state.best[0] = candidates[top]  # the very value compared to thresholds
            else:
                candidates = sliding_window_view(rows, window, axis=0)[first:].mean(axis=-1)
                peak = candidates.max(axis=0)
                state.best = peak if state.best is None else np.maximum(state.best, peak)
        else:
            spans = np.zeros((0, window), dtype=np.int64)
            candidates = np.zeros((0,) if pool.lead else (0, state.width))
        keep = max(0, rows.shape[0] - (window - 1))  # the first row the tail keeps
        state.tail = rows[keep:].copy()
        state.tail_positions = at[keep:].copy()
        short = None
        short_positions = _EMPTY_POSITIONS
        if state.count < window:  # every row so far is in the tail
            short, short_positions = rows.mean(axis=0), at
        return Pooled(state.count, state.best, candidates, spans, short, short_positions)


def _spans_of(spans: NDArray[np.int64], hits: NDArray[np.bool_]) -> NDArray[np.int64]:
    """The positions of the candidates ``hits`` selects, sorted, each once."""
    return np.unique(spans[hits]) if hits.any() else _EMPTY_POSITIONS


# -- the detectors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdDetector:
    """Pool each feature over the request's rows (``pooling``), then compare with the
    threshold.

    Fires when any (or all) of the pooled values reach the threshold: ``mean`` on a batch
    that completes the prompt (or any later batch it reads), ``max`` and ``rolling_max`` on
    a batch whose own rows (or the windows ending in them) reach it. The score is the largest
    pooled value over the threshold (``any``) or the smallest pooled value (``all``), so
    ``score >= threshold`` exactly when it fires. Positions are the rows of this batch (for
    ``rolling_max``, the rows of its windows) whose own values of the contributing features
    meet the condition; when none does alone (``all`` with the features peaking on
    different rows), those where any of them does.
    """

    rule: Rule
    combine: Combine
    pool: Pool
    pools: PoolTracker = field(compare=False)

    def evaluate(self, batch: FeatureBatch, decides: bool) -> Finding | None:
        positions, acts = _in_order(batch.positions, _columns(batch, self.rule.features))
        pooled = self.pools.add(batch.request_id, acts, positions, stream=batch.stream)
        threshold = self.rule.threshold
        combine = self.combine
        whole = pooled.value if self.pool.mode == "mean" else pooled.short
        if self.pool.mode == "mean" or whole is not None:
            # A decision on the whole prompt: the mean, or rolling windows not yet full.
            if not decides or whole is None:
                return None
            reduced = whole
            fired, contributing = self._condition(reduced)
            if not fired:
                return None
            if self.pool.mode == "mean":
                where = positions[self._hits(acts[:, contributing])]
            else:
                where = pooled.short_positions
        else:
            if pooled.value is None:
                return None
            reduced = pooled.value
            fired, contributing = self._condition(reduced)
            columns = pooled.candidates[:, contributing]
            # ... on a batch that brings a row (or a window) where a contributing feature is
            # over: later batches without one do not repeat the finding.
            if not fired or not bool((columns >= threshold).any()):
                return None
            where = _spans_of(pooled.spans, self._hits(columns))
        score = reduced[contributing].max() if combine == "any" else reduced.min()
        n = len(self.rule.features)
        message = (f"{int(contributing.sum())} of {n} features at or above {threshold:g} "
                   f"({self.pool.describe()} over {pooled.count} rows, combine {combine})")
        return self.rule.found(score, where,
                               [f for f, c in zip(self.rule.features, contributing, strict=True)
                                if c], reduced[contributing], message)

    def _hits(self, columns: NDArray[np.float64]) -> NDArray[np.bool_]:
        """The rows (candidates) where the contributing features meet the condition; when
        none does alone, those where any of them is over."""
        hits = _over(columns, self.rule.threshold, self.combine)
        return hits if hits.any() else _over(columns, self.rule.threshold, "any")

    def _condition(self, reduced: NDArray[np.float64]) -> tuple[bool, NDArray[np.bool_]]:
        over = reduced >= self.rule.threshold
        if self.combine == "any":
            return bool(over.any()), over
        return bool(over.all()), np.ones_like(over)


@dataclass(frozen=True)
class _Scored:
    """A detector that scores each row (``bias + w . x``) and pools the scores; the columns
    after the score are the features reported with it."""

    rule: Rule
    bias: float
    pool: Pool
    pools: PoolTracker = field(compare=False)

    def _judge(self, batch: FeatureBatch, values: NDArray[np.float64], decides: bool
               ) -> tuple[float, NDArray[np.float64], NDArray[np.int64], Pooled] | None:
        """Pool the rows' ``values`` (score first); the request's score, the features'
        pooled values, the positions of the rows that fired, and the pool; None when it
        does not fire on this batch."""
        positions, values = _in_order(batch.positions, values)
        pooled = self.pools.add(batch.request_id, values, positions, stream=batch.stream)
        threshold = self.rule.threshold
        whole = pooled.value if self.pool.mode == "mean" else pooled.short
        if self.pool.mode == "mean" or whole is not None:
            if not decides or whole is None or not whole[0] >= threshold:  # NaN: no
                return None
            where = positions[values[:, 0] >= threshold] if self.pool.mode == "mean" \
                else pooled.short_positions
            return float(whole[0]), whole[1:], where, pooled
        hits = pooled.candidates >= threshold
        if pooled.value is None or not hits.any():
            return None
        return float(pooled.value[0]), pooled.value[1:], _spans_of(pooled.spans, hits), pooled

    def _message(self, what: str, score: float, pooled: Pooled) -> str:
        return (f"{what} score {score:.4g} at or above {self.rule.threshold:g} "
                f"({self.pool.describe()} over {pooled.count} rows)")


@dataclass(frozen=True)
class LinearDetector(_Scored):
    """``score = bias + sum_f w_f * a_f`` per row, pooled over the request's rows.

    The reported feature activations are those the score was computed from (the top row's
    for ``max``, the best window's mean for ``rolling_max``, the mean for ``mean``), so
    ``bias + sum(w * a)`` reproduces the score.
    """

    weights: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def evaluate(self, batch: FeatureBatch, decides: bool) -> Finding | None:
        acts = _columns(batch, self.rule.features)
        scores = self.bias + acts @ self.weights
        judged = self._judge(batch, np.column_stack([scores, acts]), decides)
        if judged is None:
            return None
        score, evidence, where, pooled = judged
        return self.rule.found(score, where, self.rule.features, evidence,
                               self._message("linear", score, pooled))


@dataclass(frozen=True)
class ProbeDetector(_Scored):
    """A linear probe on the raw residual rows: ``score = bias + w . r`` per row, pooled over
    the request's rows (no SAE needed to score).

    ``explain`` names SAE features whose decoder directions align with the probe
    (``alignment[j] = W_dec[j] . w``, written by calibration): the detector subscribes to
    them, and a finding lists those that contribute (``a_j * alignment_j > 0``) on the rows
    that carry its score (the top row for ``max``, the best window for ``rolling_max``, every
    row for ``mean``), largest contribution first, with their pooled activations.
    """

    weights: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    #: ``W_dec[j] . w`` of each of ``rule.features`` (the explaining features), in order.
    alignment: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def evaluate(self, batch: FeatureBatch, decides: bool) -> Finding | None:
        residual = batch.residual
        if residual is None:
            raise ValueError(f"probe detector {self.rule.name!r} needs the residual rows, and "
                             "this batch has none (FeatureBatch.residual is None)")
        if residual.shape[1] != self.weights.shape[0]:
            raise ValueError(
                f"detectors.{self.rule.name}.weights: expected {residual.shape[1]} values "
                f"(the width d_in of hook {batch.hook}'s residual rows), found "
                f"{self.weights.shape[0]}")
        scores = self.bias + residual.astype(np.float64) @ self.weights
        acts = _columns(batch, self.rule.features)
        judged = self._judge(batch, np.column_stack([scores, acts]), decides)
        if judged is None:
            return None
        score, evidence, where, pooled = judged
        contributions = evidence * self.alignment
        order = [j for j in np.argsort(-contributions, kind="stable") if contributions[j] > 0]
        features = [self.rule.features[j] for j in order]
        message = self._message("probe", score, pooled)
        if features:
            message += "; features by contribution: " + ", ".join(str(f) for f in features)
        return self.rule.found(score, where, features, evidence[order], message)


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
    host that never ends its requests cannot grow it). Requests are told apart by stream.
    """

    def __init__(self, max_requests: int, idle_seconds: float) -> None:
        self._runs: RequestStates[_Run] = RequestStates(max_requests, idle_seconds)

    def __len__(self) -> int:
        return len(self._runs)

    def advance(
        self, request_id: str, positions: NDArray[np.int64], met: NDArray[np.bool_],
        now: float | None = None, stream: str = "",
    ) -> NDArray[np.int64]:
        """Run length at each row (rows in position order) after the carried-over run."""
        now = time.monotonic() if now is None else now
        key = (stream, request_id)
        n = len(met)
        index = np.arange(n)
        previous = self._runs.take(key)
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
            self._runs.keep(key, _Run(int(runs[-1]), int(positions[-1]), now), now)
        return runs

    def forget(self, request_id: str) -> bool:
        """Drop the request's run, on every stream (it ended); whether there was one."""
        return self._runs.forget(request_id)


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

    def evaluate(self, batch: FeatureBatch, decides: bool) -> Finding | None:
        if batch.activations.shape[0] == 0:
            return None
        positions, acts = _in_order(batch.positions, _columns(batch, self.rule.features))
        threshold = self.rule.threshold
        met = _over(acts, threshold, self.combine)
        runs = self.runs.advance(batch.request_id, positions, met, stream=batch.stream)
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


@dataclass(frozen=True)
class ReconstructionDetector:
    """Fires on a request whose rows the SAE explains worse than the traffic it was
    calibrated on: the normalised MSE of its reconstruction (``FeatureBatch.reconstruction``,
    over the rows of this batch that the detector reads) at or above ``threshold``, written
    by ``guard detectors reconstruction`` at a percentile of benign traffic's NMSE.

    It judges the batches the guard samples for their reconstruction error
    (``saes[].reconstruction.sample``) with at least ``min_rows`` measured rows (a prompt;
    a generation step's single row has no variance of its own), each on its own: no state is
    kept per request. Its finding has no features: score is the NMSE, positions the rows
    measured, and ``out_of_distribution`` set, so the decision record says that the
    feature-based verdicts on the request read outside the SAE's distribution.
    """

    rule: Rule
    #: The percentile of the calibration traffic's NMSE the threshold is at (for the
    #: message), or None when not said.
    percentile: float | None
    min_rows: int

    def evaluate(self, batch: FeatureBatch, decides: bool) -> Finding | None:
        reconstruction = batch.reconstruction
        if reconstruction is None or reconstruction.rows < self.min_rows:
            return None
        nmse = reconstruction.nmse
        threshold = self.rule.threshold
        if not nmse >= threshold:  # NaN (no spread): no verdict
            return None
        where = (f"the {self.percentile:g}th percentile of its training traffic"
                 if self.percentile is not None else "its calibrated threshold")
        message = (f"the SAE explains this request's residual worse than {where} (NMSE "
                   f"{nmse:.4g} >= {threshold:.4g} over {reconstruction.rows} rows): "
                   "feature-based verdicts on it read outside the SAE's distribution")
        positions = batch.positions[np.isfinite(reconstruction.squared_error)]
        return Finding(detector=self.rule.name, score=float(nmse), threshold=threshold,
                       action=self.rule.action,
                       positions=tuple(int(p) for p in np.sort(positions)),
                       message=message, out_of_distribution=True)


Detector = (ThresholdDetector | SustainedDetector | LinearDetector | ProbeDetector
            | ReconstructionDetector)
#: Detectors that pool a request's rows across its batches (the others keep no pool).
_POOLING = (ThresholdDetector, LinearDetector, ProbeDetector)


class Detectors:
    """Feature detectors configured by name; each finding is named after its detector.

    ``plugins.config.detectors`` maps a detector name to its settings::

        jailbreak:
          type: threshold        # threshold (default) | sustained | linear | probe
          hook: blocks.15.hook_resid_post
          features: [123, 456]   # threshold and sustained
          threshold: 2.5
          combine: any           # any (default) | all: threshold and sustained
          pooling: max           # max (default) | mean | rolling_max over the request's
                                 # rows: threshold, linear, probe (`reduce`: the old name)
          action: flag           # log | flag (default) | abort
          phases: [prompt, generation]   # default: both (unlabelled batches always run)
          rows: [user, generated]  # roles of the rows read; default: system, user, assistant,
                                   # tool, generated (never template markup); `all`: every row
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
          pooling: rolling_max
          window: 8              # rolling_max: the best mean of 8 consecutive rows
          action: abort
        harmful:
          type: probe            # score = bias + w . residual row, pooled
          hook: blocks.15.hook_resid_post
          weights: [0.01, -0.2, ...]   # d_in numbers (the hook's residual width)
          bias: -3.2
          threshold: 0.0
          pooling: mean
          explain: {features: [12, 40], alignment: [0.9, 0.4]}   # optional: W_dec[j] . w
        sae-coverage:
          type: reconstruction   # the SAE's reconstruction NMSE on a sampled batch's rows
          hook: blocks.15.hook_resid_post   # (needs saes[].reconstruction.sample > 0)
          threshold: 0.31        # NMSE at a percentile of benign traffic (guard detectors
          percentile: 99         # reconstruction writes both)
          min_rows: 8            # fewest measured rows judged (default 8)
          action: log            # the default for this type
    """

    def __init__(self) -> None:
        self._detectors: tuple[Detector, ...] = ()
        self._by_hook: Mapping[str, tuple[Detector, ...]] = {}
        #: Whether a batch without roles was met once (logged once per configuration).
        self._unlabelled_seen = False
        #: Whether a prompt batch that does not say if it completes the prompt was met.
        self._unsaid_seen = False

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
        self._unlabelled_seen = self._unsaid_seen = False

    @hookimpl
    def guard_subscriptions(self) -> Sequence[FeatureRequest]:
        def reads_features(d: Detector) -> bool:
            return not isinstance(d, ProbeDetector | ReconstructionDetector)

        requests = [FeatureRequest(hook, sorted({f for d in group for f in d.rule.features
                                                 if reads_features(d)}))
                    for hook, group in self._by_hook.items()
                    if any(reads_features(d) for d in group)]
        for detector in self._detectors:
            if isinstance(detector, ReconstructionDetector):  # its SAE must be sampled
                requests.append(FeatureRequest(detector.rule.hook, [], approximate_topk=True,
                                               reconstruction=True, key=detector.rule.name))
            if isinstance(detector, ProbeDetector):  # its width checked against the SAE's
                features = sorted(detector.rule.features)
                requests.append(FeatureRequest(
                    detector.rule.hook, features, approximate_topk=not features,
                    d_in=int(detector.weights.shape[0]), key=f"{detector.rule.name}.weights"))
        return requests

    @hookimpl
    def guard_idle(self) -> bool:
        """No detector configured: nothing to do per batch."""
        return not self._detectors

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> Sequence[Finding] | None:
        group = self._by_hook.get(batch.hook)
        if not group:
            return None
        findings = []
        chosen: dict[frozenset[RowRole] | None, FeatureBatch] = {}
        decides = self._prompt_decides(batch, group)
        for detector in group:
            rule = detector.rule
            if not rule.runs_on(batch.phase):
                continue
            if rule.roles not in chosen:
                chosen[rule.roles] = self._rows(batch, rule.roles)
            finding = detector.evaluate(chosen[rule.roles], decides)
            if finding is not None:
                findings.append(finding)
            if (batch.prompt_complete and batch.phase is Phase.PROMPT
                    and Phase.GENERATION not in rule.phases
                    and isinstance(detector, _POOLING)):
                # The prompt is decided and it reads nothing later: free its pool now.
                detector.pools.drop(batch.request_id, batch.stream)
        return findings

    def _prompt_decides(self, batch: FeatureBatch, group: Sequence[Detector]) -> bool:
        """Whether a pool that needs the whole prompt (``mean``) may decide on this batch:
        at the batch that completes the prompt, on any later (generation) batch, and on every
        batch of a host that does not say (the pool so far; logged once)."""
        if batch.phase is not Phase.PROMPT:
            return True
        if batch.prompt_complete is not None:
            return batch.prompt_complete
        if not self._unsaid_seen and any(
                isinstance(d, _POOLING) and d.pool.mode != "max" for d in group):
            self._unsaid_seen = True
            log.info("prompt batch that does not say whether it completes the prompt: "
                     "mean-pooling detectors decide on every batch with the rows so far "
                     "(the host sets no prompt_complete)", hook=batch.hook)
        return True

    def _rows(self, batch: FeatureBatch, roles: frozenset[RowRole] | None) -> FeatureBatch:
        """The batch's rows of ``roles`` (the batch itself when they are all of them; it may
        have no rows)."""
        if batch.roles is None and roles is not None and not self._unlabelled_seen:
            self._unlabelled_seen = True
            log.info("batch without row roles: detectors read every row of it, template "
                     "markup included (the host labels no roles)", hook=batch.hook)
        mask = batch.rows_of(roles)
        return batch if mask is None else batch.select(mask)

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        """Free the request's state (sustained runs, pools), unless it was only preempted.

        A preempted request's rows are sent again (vLLM recomputes them from position 0), and
        its state restarts by itself on the first resent row, which is not the next position.
        Forgetting it here would be wrong: this hook runs on the sink thread, behind the
        decisions queued before it, so it can come after the first resent rows were counted
        and wipe their count (the request's run would then start late, or never reach its
        window)."""
        if reason == "preempted":
            return
        for detector in self._detectors:
            if isinstance(detector, SustainedDetector):
                detector.runs.forget(request_id)
            elif isinstance(detector, _POOLING):
                detector.pools.forget(request_id)


def _parse(name: str, block: Settings) -> Detector:
    kind = block.choice("type", tuple(_TYPE_KEYS), "threshold")
    block.only((*_COMMON_KEYS, *_TYPE_KEYS[kind]), f"of a {kind} detector")
    hook = block.string("hook")
    threshold = block.number("threshold")
    action = cast(FindingAction, block.choice("action", ("log", "flag", "abort"),
                                              _DEFAULT_ACTION.get(kind, "flag")))
    phase_set = _phases(block) if "phases" in block else _ALL_PHASES
    roles = parse_rows(block)
    if kind == "reconstruction":
        if threshold <= 0:
            raise block.error("threshold", "a normalised MSE > 0 (guard detectors "
                              "reconstruction writes one)", threshold)
        percentile = None
        if "percentile" in block:
            percentile = block.number("percentile", above=0)
            if percentile > 100:
                raise block.error("percentile", "a percentile in (0, 100]", percentile)
        min_rows = block.positive_int("min_rows", DEFAULT_MIN_ROWS)
        if min_rows < 2:
            raise block.error("min_rows", "at least 2 rows (one row has no spread to "
                              "normalise by)", min_rows)
        return ReconstructionDetector(Rule(name, hook, (), threshold, action, phase_set, roles),
                                      percentile, min_rows)
    combine = cast(Combine, block.choice("combine", ("any", "all"), "any"))
    max_requests = block.positive_int("max_requests", 10_000)
    idle_seconds = block.number("idle_seconds", 600.0, above=0)

    if kind == "sustained":
        rule = Rule(name, hook, _feature_ids(block), threshold, action, phase_set, roles)
        return SustainedDetector(rule, combine, block.positive_int("window"),
                                 RunTracker(max_requests, idle_seconds))
    pool = _pool(block, lead=kind != "threshold")
    pools = PoolTracker(pool, max_requests, idle_seconds)
    if kind == "threshold":
        rule = Rule(name, hook, _feature_ids(block), threshold, action, phase_set, roles)
        return ThresholdDetector(rule, combine, pool, pools)
    bias = block.number("bias", 0.0)
    if kind == "linear":
        weights = _weights(block)
        rule = Rule(name, hook, tuple(weights), threshold, action, phase_set, roles)
        return LinearDetector(rule, bias, pool, pools,
                              np.array(list(weights.values()), dtype=np.float64))
    vector = _vector(block)
    features, alignment = _explain(block)
    rule = Rule(name, hook, features, threshold, action, phase_set, roles)
    return ProbeDetector(rule, bias, pool, pools, vector, alignment)


def _pool(block: Settings, *, lead: bool) -> Pool:
    """``pooling`` (or its old name ``reduce``, not both) and, for ``rolling_max``, its
    ``window``."""
    if "reduce" in block and "pooling" in block:
        raise block.error("reduce", "either pooling or reduce (its old name), not both",
                          block.data["reduce"])
    if "reduce" in block:
        mode = REDUCE_ALIAS[block.choice("reduce", tuple(REDUCE_ALIAS))]
    else:
        mode = cast(Pooling, block.choice("pooling", POOLINGS, "max"))
    if mode != "rolling_max":
        if "window" in block:
            raise block.error("window", "no window: it belongs to pooling: rolling_max",
                              block.data["window"])
        return Pool(mode, 1, lead)
    return Pool(mode, block.positive_int("window"), lead)


def _phases(block: Settings) -> frozenset[Phase]:
    phases = block.sequence("phases", "a non-empty list of phases (prompt, generation)",
                            non_empty=True)
    return frozenset(_PHASES[phases.choice(i, tuple(_PHASES))] for i in phases.names())


def _feature_ids(block: Settings, name: str = "features") -> tuple[int, ...]:
    """A non-empty list of distinct feature ids, in the order given (digit strings too: Helm
    ``--set-string``)."""
    listed = block.sequence(name, "a non-empty list of feature ids", non_empty=True)
    ids = tuple(listed.feature_id(i, digits=True) for i in listed.names())
    if len(set(ids)) != len(ids):
        raise block.error(name, "distinct feature ids", block.data[name])
    return ids


def _weights(block: Settings) -> dict[int, float]:
    """Feature id -> weight; a map (not a list) so that Helm ``--set`` can change one."""
    weights = block.section("weights", what="a non-empty mapping of feature id to weight")
    if not weights:
        raise block.error("weights", "a non-empty mapping of feature id to weight",
                          block.data.get("weights", "nothing"))
    return {feature: weights.number(key) for feature, key in weights.feature_keys().items()}


def _numbers(block: Settings, name: str, expected: str) -> NDArray[np.float64]:
    """A non-empty list of finite numbers; errors name the item (``weights[3]``)."""
    listed = block.sequence(name, expected, non_empty=True)
    return np.array([listed.number(i) for i in listed.names()], dtype=np.float64)


def _vector(block: Settings) -> NDArray[np.float64]:
    """A probe's ``weights``: one number per residual dimension (d_in of its hook, checked
    against the SAE the guard serves there)."""
    return _numbers(block, "weights", "a non-empty list of numbers, one per dimension of the "
                                      "hook's residual rows (d_in)")


def _explain(block: Settings) -> tuple[tuple[int, ...], NDArray[np.float64]]:
    """A probe's optional ``explain``: feature ids and their alignment with the probe, two
    lists of one length."""
    if "explain" not in block:
        return (), np.zeros(0, dtype=np.float64)
    explain = block.section("explain", what="a mapping with features and alignment")
    explain.only(("features", "alignment"), "of a probe's explain")
    features = _feature_ids(explain)
    alignment = _numbers(explain, "alignment", "a list of numbers, one per feature "
                                               "(W_dec[j] . w)")
    if len(alignment) != len(features):
        raise explain.error("alignment", f"{len(features)} numbers (one per feature)",
                            f"{len(alignment)} numbers")
    return features, alignment
