"""The data handed to plugins and produced by the engine: part of the public plugin API.

Plain, immutable data, independent of gRPC; the server turns decisions into protocol
messages. Plugins import these names from ``guard`` (``from guard import Finding``).
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray


class Action(enum.IntEnum):
    """What the host does with the rows; values match ``guard.v1.Action``."""

    CONTINUE = 1
    STEER = 2
    ABORT = 3


class Phase(enum.IntEnum):
    """Where the rows come from; values match ``guard.v1.Phase``."""

    UNSPECIFIED = 0
    PROMPT = 1
    GENERATION = 2


class RowRole(enum.IntEnum):
    """What a row's token is in the rendered conversation; values match
    ``guard.v1.RowRole``. :data:`ROLE_NAMES` gives the names that configs use."""

    #: The host did not say: every plugin reads such a row, whatever roles it chose.
    UNSPECIFIED = 0
    #: Content of a system message.
    SYSTEM = 1
    #: Content of a user message.
    USER = 2
    #: Content of an earlier assistant message (part of the prompt).
    ASSISTANT = 3
    #: Content of a tool (function, ipython) message.
    TOOL = 4
    #: Chat-template markup: role headers, separators, the assistant-turn opener, and text
    #: the template adds on its own (a default system prompt).
    TEMPLATE = 5
    #: A token generated in this request.
    GENERATED = 6


#: Role name (as configs and the host SDK spell it) -> role.
ROLE_NAMES: Mapping[str, RowRole] = {role.name.lower(): role for role in RowRole}
#: The rows a detector reads when its config does not say: every message's content (system
#: messages included: on an OpenAI-compatible server the client writes them, and a jailbreak
#: placed there must be read) and the generated tokens; never the template's markup, nor the
#: text a template adds by itself (a default system prompt), both marked TEMPLATE.
CONTENT_ROLES: frozenset[RowRole] = frozenset(
    {RowRole.SYSTEM, RowRole.USER, RowRole.ASSISTANT, RowRole.TOOL, RowRole.GENERATED})


def role_mask(roles: NDArray[np.int8] | None, chosen: frozenset[RowRole] | None
              ) -> NDArray[np.bool_] | None:
    """Which rows a reader of ``chosen`` roles reads (None for ``chosen``: every role): the
    rows of those roles and the rows of unspecified role (the host did not say, so they are
    read). None when that is every row (``roles`` None: nothing is labelled)."""
    if chosen is None or roles is None:
        return None
    wanted = np.zeros(len(RowRole), dtype=np.bool_)
    wanted[[int(r) for r in chosen]] = True
    wanted[RowRole.UNSPECIFIED] = True
    mask: NDArray[np.bool_] = wanted[roles]
    return None if bool(mask.all()) else mask


#: What a finding asks for: ``log`` (decision log only), ``flag`` (also in the reply to the
#: host, decision stays CONTINUE), ``abort`` (the decision becomes ABORT).
FindingAction = Literal["log", "flag", "abort"]

#: Why a request ended (``guard_request_ended``): the host said so in a ``RequestEnded``
#: (``finished``, ``aborted``, ``preempted``, or ``unspecified`` when it gave no reason), or
#: the guard forgot it: ``evicted`` (its stream held state for ``max_requests_per_stream``
#: requests and this one was seen least recently) or ``stream_closed`` (its stream ended with
#: the request still open).
RequestEndReason = Literal["finished", "aborted", "preempted", "unspecified", "evicted",
                           "stream_closed"]


@dataclass(frozen=True)
class Segment:
    """One request's rows in a multi-request batch: rows ``start:stop`` of the batch.

    ``attributes`` are the request's own, merged over the batch's (the request's win).
    """

    request_id: str
    start: int
    stop: int
    phase: Phase
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: Whether these rows end the request's prompt (None: the host did not say).
    prompt_complete: bool | None = None


@dataclass(frozen=True)
class ActivationRows:
    """One validated batch: ``rows`` is float32 ``[n, d_in]`` of one hook.

    Without ``segments`` every row is ``request_id``'s. With segments (one engine step of
    several requests, covering the rows in order) ``request_id`` and ``phase`` are unused:
    each segment names its request; :meth:`request` gives one request's rows.
    """

    request_id: str
    sequence: int
    hook: str
    rows: NDArray[np.float32]
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64] | None
    phase: Phase
    attributes: Mapping[str, str] = field(default_factory=dict)
    segments: tuple[Segment, ...] = ()
    #: Each row's :class:`RowRole` value (int8), or None when the host sent none.
    roles: NDArray[np.int8] | None = None
    #: Whether the rows end the request's prompt (phase PROMPT only); None: the host did
    #: not say. With segments, each segment's own.
    prompt_complete: bool | None = None
    #: The stream the batch came on (:func:`new_stream_id`; "" outside a stream).
    stream: str = ""

    def request(self, segment: Segment) -> ActivationRows:
        """The rows of one segment as a single-request batch (views, no copy)."""
        rows = slice(segment.start, segment.stop)
        return ActivationRows(
            request_id=segment.request_id, sequence=self.sequence, hook=self.hook,
            rows=self.rows[rows], positions=self.positions[rows],
            token_ids=None if self.token_ids is None else self.token_ids[rows],
            phase=segment.phase, attributes=segment.attributes,
            roles=None if self.roles is None else self.roles[rows],
            prompt_complete=segment.prompt_complete, stream=self.stream,
        )


@dataclass(frozen=True)
class FeatureRequest:
    """A plugin's subscription: the features of one hook it reads (from guard_subscriptions).

    ``feature_ids="all"`` asks for every feature (the full encoder). For TopK SAEs a subset is
    only exact with the full pre-activations; ``approximate_topk=True`` accepts a subset
    computed without the TopK selection (see docs/saes.md).
    """

    hook: str
    feature_ids: Sequence[int] | Literal["all"]
    approximate_topk: bool = False
    #: The residual width the plugin expects of this hook (a raw-activation probe's weight
    #: count), or None. The guard refuses a configuration whose SAE for the hook has
    #: another ``d_in``, naming ``key`` (a key path in the plugin's block, such as
    #: ``probe.weights``). ``feature_ids`` may then be empty: the request only checks.
    d_in: int | None = None
    key: str = ""
    #: The plugin reads ``FeatureBatch.reconstruction``: the guard refuses a configuration
    #: whose SAE for the hook is not sampled for it (``saes[].reconstruction.sample`` 0),
    #: naming ``key``. ``feature_ids`` may then be empty.
    reconstruction: bool = False


#: Rows of float64 at a time when :meth:`Reconstruction.of` centres a request's rows (bounds
#: the temporary copy to 8 MiB at d_in 1024).
_CENTRE_ROWS = 1024


@dataclass(frozen=True)
class Reconstruction:
    """How well the SAE explains one request's rows of a batch: set on the batches the guard
    samples (``saes[].reconstruction.sample``), None on the others.

    ``squared_error[i]`` is ``||x_i - x_hat_i||^2`` of row ``i``, where ``x_hat`` is the
    SAE's decode of its full encode (float64; NaN for a row not measured: position 0, the
    BOS row, which hosts do not send by default and SAEs are not trained on). ``nmse``, the
    normalised MSE, is ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the measured
    rows: the share of their variance the SAE leaves unexplained (0: perfect; 1: no better
    than the rows' mean). NaN when fewer than two rows were measured (a generation step's
    single row has no variance of its own to normalise by). ``squared_error`` never goes
    into records, logs or spans; ``nmse`` goes into the decision record
    (``Decision.reconstruction_nmse``) and the ``guard.sae.reconstruction.nmse`` histogram.
    """

    squared_error: NDArray[np.float64] = field(repr=False, compare=False)
    nmse: float
    #: Rows measured (finite ``squared_error``).
    rows: int

    @classmethod
    def of(cls, residual: NDArray[np.floating] | None,
           squared_error: NDArray[np.float64]) -> Reconstruction:
        """The reconstruction of ``residual`` rows ``[rows, d_in]`` whose per-row squared
        errors are ``squared_error`` (NaN: not measured); ``nmse`` NaN without the rows."""
        errors = np.asarray(squared_error, dtype=np.float64)
        errors.setflags(write=False)
        measured = np.isfinite(errors)
        count = int(measured.sum())
        nmse = float("nan")
        if residual is not None and count >= 2:
            rows = residual if count == len(errors) else residual[measured]
            mean = rows.mean(axis=0, dtype=np.float64)
            spread = 0.0
            for start in range(0, count, _CENTRE_ROWS):  # float64 copies of bounded size
                centred = rows[start:start + _CENTRE_ROWS].astype(np.float64) - mean
                spread += float(np.einsum("ij,ij->", centred, centred))
            if spread > 0.0:
                nmse = float(errors[measured].sum()) / spread
        return cls(errors, nmse, count)


@dataclass(frozen=True)
class FeatureBatch:
    """Feature activations of one batch, handed to ``guard_detect`` and ``guard_steer``.

    ``activations`` is ``[rows, len(feature_ids)]``: column ``j`` holds feature
    ``feature_ids[j]``. Every plugin sees the union of all plugins' subscriptions on the hook.

    ``residual`` is the raw residual rows the features were encoded from (``[rows, d_in]``,
    float32, read-only), for raw-activation probes. A plugin keeps what it computed from it,
    never the array: over gRPC and shared memory it is the guard's own copy (regions are read
    with ``pread``, never mapped), but an in-process caller of the engine may reuse its array
    once the batch is answered, and a plugin that overran its budget would then read the next
    rows. It never goes into records, logs or spans.
    """

    request_id: str
    sequence: int
    hook: str
    feature_ids: NDArray[np.int64]
    activations: NDArray[np.float32]
    positions: NDArray[np.int64]
    token_ids: NDArray[np.int64] | None
    phase: Phase
    feature_labels: Mapping[int, str]
    #: sha256 of the SAE weights that produced the features (the SAE revision).
    sae_sha256: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: Each row's :class:`RowRole` value (int8 ``[rows]``), or None when the host labelled
    #: none (then every row counts as ``UNSPECIFIED``).
    roles: NDArray[np.int8] | None = None
    #: Whether these rows end the request's prompt (phase PROMPT): False for an earlier
    #: chunk of a prompt cut in pieces, True for the chunk that completes it; None when
    #: the host does not say (and on generation rows).
    prompt_complete: bool | None = None
    #: The raw residual rows ``[rows, d_in]`` (read-only; see above), or None when the
    #: batch was built without them.
    residual: NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    #: An opaque id of the stream (host connection) the batch came on. Request ids are the
    #: host's, unique on its stream only: a plugin that keeps state per request keys it by
    #: ``(stream, request_id)``, so that two hosts naming a request alike do not share it.
    stream: str = ""
    #: How well the SAE explains these rows (:class:`Reconstruction`), on the batches the
    #: guard samples for it (``saes[].reconstruction.sample``); None on the others.
    reconstruction: Reconstruction | None = field(default=None, repr=False, compare=False)

    def rows_of(self, roles: frozenset[RowRole] | None) -> NDArray[np.bool_] | None:
        """Which rows have one of ``roles`` (None: every role), rows of unspecified role
        included: the host did not say, so they are read. None when every row is (no copy
        needed); else a boolean mask over the rows (it may select none)."""
        return role_mask(self.roles, roles)

    def select(self, mask: NDArray[np.bool_]) -> FeatureBatch:
        """This batch with only the rows ``mask`` keeps (copies of those rows)."""
        residual = None
        if self.residual is not None:
            residual = self.residual[mask]
            residual.flags.writeable = False  # as the engine's: shared by every plugin
        reconstruction = None
        if self.reconstruction is not None:  # the NMSE of the rows kept
            reconstruction = Reconstruction.of(residual,
                                               self.reconstruction.squared_error[mask])
        selected = FeatureBatch(
            request_id=self.request_id, sequence=self.sequence, hook=self.hook,
            feature_ids=self.feature_ids, activations=self.activations[mask],
            positions=self.positions[mask],
            token_ids=None if self.token_ids is None else self.token_ids[mask],
            phase=self.phase, feature_labels=self.feature_labels,
            sae_sha256=self.sae_sha256, attributes=self.attributes,
            roles=None if self.roles is None else self.roles[mask],
            prompt_complete=self.prompt_complete,
            residual=residual, stream=self.stream, reconstruction=reconstruction,
        )
        cached = self.__dict__.get("_index_cache")
        if cached is not None:  # the same feature ids: the same index
            object.__setattr__(selected, "_index_cache", cached)
        return selected

    def column(self, feature_id: int) -> NDArray[np.float32]:
        """Activations of one feature across the rows; KeyError if it was not encoded."""
        index = self._index().get(int(feature_id))
        if index is None:
            raise KeyError(
                f"feature {feature_id} of hook {self.hook!r} was not encoded: subscribe to it "
                "in guard_subscriptions"
            )
        return self.activations[:, index]

    def columns(self, feature_ids: Sequence[int]) -> NDArray[np.float32]:
        """Activations ``[rows, len(feature_ids)]`` of the given features, in that order."""
        return np.stack([self.column(f) for f in feature_ids], axis=1) if feature_ids else (
            np.zeros((self.activations.shape[0], 0), dtype=np.float32)
        )

    def has(self, feature_id: int) -> bool:
        return int(feature_id) in self._index()

    def label(self, feature_id: int) -> str:
        """The feature's label, or ``""`` when it has none."""
        return self.feature_labels.get(int(feature_id), "")

    def _index(self) -> dict[int, int]:
        cached: dict[int, int] | None = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {int(f): j for j, f in enumerate(self.feature_ids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on a batch (returned by ``guard_detect``)."""

    detector: str
    score: float
    threshold: float
    action: FindingAction = "flag"
    feature_ids: tuple[int, ...] = ()
    feature_activations: tuple[float, ...] = ()
    feature_labels: tuple[str, ...] = ()
    #: Positions of the rows that fired.
    positions: tuple[int, ...] = ()
    message: str = ""
    #: Set by the engine: the plugin that returned the finding.
    plugin: str = ""
    #: The finding says that the SAE does not explain the request's rows (its reconstruction
    #: error is beyond what it was calibrated on): every feature-based verdict on them reads
    #: outside the SAE's training distribution (:attr:`Decision.out_of_distribution`).
    out_of_distribution: bool = False


EditKind = Literal["pin", "nudge", "scale"]


@dataclass(frozen=True)
class FeatureEdit:
    """A steering edit on one feature (returned by ``guard_steer``).

    - ``pin``: set the feature's activation to ``value`` (its decoder direction times
      ``value - current`` is added);
    - ``nudge``: add ``value`` times the feature's decoder direction;
    - ``scale``: multiply the feature's contribution by ``value`` (adds
      ``(value - 1) * current`` times the decoder direction).

    ``positions`` limits the edit to those rows (default: every row of the batch).
    Conflicts on one feature are resolved by the engine (see ``guard.engine.deltas``).
    """

    hook: str
    feature_id: int
    kind: EditKind
    value: float
    positions: tuple[int, ...] | None = None
    #: Set by the engine: the plugin that returned the edit.
    plugin: str = ""


@dataclass(frozen=True)
class Steering:
    """A residual delta ``[n, d_in]`` for one hook, aligned with the batch's rows."""

    hook: str
    delta: NDArray[np.float32]


@dataclass(frozen=True)
class PluginRun:
    """A plugin that took part in a decision, with its version."""

    name: str
    version: str


@dataclass(frozen=True)
class Decision:
    """The guard's answer to one batch; also the record handed to ``guard_record``.

    Records never hold activations or token text; ``feature_activations`` in findings are
    scores of named features, which the decision log can mask (see the decision log plugin).
    """

    decision_id: str
    action: Action
    request_id: str
    sequence: int
    hook: str
    positions: NDArray[np.int64]
    findings: tuple[Finding, ...] = ()
    #: Edits applied (empty on ABORT: nothing is applied when generation stops).
    edits: tuple[FeatureEdit, ...] = ()
    steering: tuple[Steering, ...] = ()
    details: str = ""
    phase: Phase = Phase.UNSPECIFIED
    #: sha256 of the SAE weights (the SAE revision) that produced the features.
    sae_sha256: str = ""
    #: The SAE's Neuronpedia id (``model/<layer>-<set>``; "" when unknown): a finding's
    #: feature ``F`` has its page at ``https://www.neuronpedia.org/<id>/<F>``.
    sae_neuronpedia_id: str = ""
    plugins: tuple[PluginRun, ...] = ()
    #: Plugins that failed on this batch (raised or overran their budget).
    plugin_errors: tuple[str, ...] = ()
    #: Stage name -> seconds (decode, encode, detect, steer, total).
    timings: Mapping[str, float] = field(default_factory=dict)
    #: Unix time (seconds) the decision was made.
    timestamp: float = 0.0
    #: Token ids of the rows (None when the host sent none). Sinks must not write them
    #: unless the user turned that on: token ids are the prompt's text.
    token_ids: NDArray[np.int64] | None = None
    #: The request's reconstruction error (:attr:`Reconstruction.nmse`) when its batch was
    #: sampled for it and it had rows enough; None otherwise.
    reconstruction_nmse: float | None = None

    @property
    def out_of_distribution(self) -> bool:
        """Whether a finding says the SAE does not explain these rows: then the decision's
        feature-based verdicts read outside the SAE's training distribution."""
        return any(f.out_of_distribution for f in self.findings)


@dataclass(frozen=True)
class StepDecision:
    """The guard's answer to a batch with segments: one :class:`Decision` per request.

    Each request's decision (its own id, findings, edits, record) is what a single-request
    batch of the same rows would get; ``steering`` holds one delta per hook over every row of
    the batch, zero on the rows of requests that are not steered.
    """

    #: One per segment, in segment order.
    decisions: tuple[Decision, ...]
    #: The most severe of the decisions' actions (ABORT over STEER over CONTINUE).
    action: Action
    sequence: int
    hook: str
    #: Every row's position, in row order.
    positions: NDArray[np.int64]
    steering: tuple[Steering, ...] = ()
    #: Stage name -> seconds for the whole batch (decode, encode, total).
    timings: Mapping[str, float] = field(default_factory=dict)


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


_STREAM_COUNTER = itertools.count(1)


def new_stream_id() -> str:
    """A unique, opaque id for a stream (:attr:`FeatureBatch.stream`)."""
    return f"s{_ID_PREFIX[:8]}{next(_STREAM_COUNTER):x}"


def new_decision_id() -> str:
    """A unique, opaque decision id (names the decision log record).

    64 random bits per process plus a counter: unique across restarts and replicas, and
    cheaper than uuid4 on the hot path. ``next`` on itertools.count is atomic under the GIL.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
