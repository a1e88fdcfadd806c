"""The decision engine, one batch at a time:

encode (only subscribed features) -> detect -> steer -> decide -> (reply) -> record.

A batch with segments (several requests' rows, one engine step) is encoded once; then each
request goes through detect -> steer -> decide -> record on its own rows
(:meth:`Engine.inspect_step`), so plugins see one request per call as before.

The decision is ABORT if any finding asks to abort, STEER if the edits give a nonzero
residual delta, CONTINUE otherwise. Plugins run on a worker thread within
``plugins.timeout_ms`` per request (a batch's requests in one hand-off, each with its own
budget); a plugin that raises or overruns is logged and counted, the others still run, and
the request gets ``plugins.failure_mode``: ``open`` adds an error finding and decides on the
rest, ``closed`` aborts naming the plugin. A plugin with ``plugins.max_stuck_calls`` calls
still running past their budget is skipped by later requests (as a failure, counted) until one
returns, and a worker stuck in a plugin is replaced, so that one plugin that blocks can
neither hold the plugin workers nor turn detection off (:class:`DaemonExecutor`). A call that
overran never applies late: its request was answered, and no further plugin is called for it.
Records go to sinks off the hot path through bounded
queues, one per sink with its own thread (``guard.engine.record_queue``), and so do the ends
of requests (:meth:`Engine.end_requests`, for ``guard_request_ended``), after the requests'
decisions.

The plugin part of the configuration reloads without dropping streams: a new set of plugin
instances is configured and started aside, then swapped in; a rejected configuration
leaves the old one in force.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ParamSpec, TypeVar

import numpy as np
import structlog
from numpy.typing import NDArray
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from guard.config import GuardConfig, PluginsConfig, SaeConfig
from guard.decision import (
    Action,
    ActivationRows,
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    PluginRun,
    Reconstruction,
    RequestEndReason,
    Segment,
    Steering,
    StepDecision,
    new_decision_id,
)
from guard.engine.budget import EncodeBudget
from guard.engine.deltas import build_delta
from guard.engine.plugins import (
    SKIP_BUDGET,
    CallProgress,
    PluginFailure,
    PluginGate,
    PluginSet,
    PluginSource,
    discover,
)
from guard.engine.record_queue import Outcome, RecordQueue, RecordSinks, RequestsEnded
from guard.errors import ConfigError, GuardError, InvalidInput, NotFound
from guard.sae import Encoder, Sae, SaeInfo, open_sae
from guard.sae import reconstruction as sae_reconstruction
from guard.telemetry.instruments import DECISION_ID, Instruments
from guard.workqueue import WorkQueue, cancel_waiting, settle

log = structlog.get_logger(__name__)

#: Seconds a reload waits for record threads to finish their call on the old plugins.
RELOAD_SINK_WAIT_S = 10.0
_EMPTY_IDS = np.zeros(0, dtype=np.int64)
T = TypeVar("T")
P = ParamSpec("P")
#: What one request's plugin calls give: findings, edits, failures.
PluginResults = tuple[list[Finding], list[FeatureEdit], list[PluginFailure]]


@dataclass(frozen=True)
class Subscription:
    """The features encoded for a hook: ``feature_ids`` or every feature."""

    hook: str
    feature_ids: tuple[int, ...]
    all_features: bool
    approximate_topk: bool = False


@dataclass
class HookRuntime:
    """One served hook: its SAE and the encoder over the subscribed features."""

    sae: Sae
    encoder: Encoder | None
    subscription: Subscription
    feature_ids: NDArray[np.int64] = field(default_factory=lambda: _EMPTY_IDS)
    #: feature id -> column of the encoder's output (built once, not per batch).
    index: dict[int, int] = field(default_factory=dict)
    #: The fraction of batches whose reconstruction error is measured
    #: (``saes[].reconstruction.sample``; 0: none).
    reconstruction_sample: float = 0.0
    _directions: dict[int, NDArray[np.float32]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def info(self) -> SaeInfo:
        return self.sae.info

    @property
    def d_in(self) -> int:
        return self.sae.info.d_in

    @property
    def encodes_every_feature(self) -> bool:
        """Whether the encoder's output is every feature, exact (the reconstruction reuses
        it instead of a second, full encode)."""
        return self.encoder is not None and self.subscription.all_features

    @property
    def execution_provider(self) -> str:
        """The provider the encoder runs on; with no encoder (nothing subscribed), the one
        it would use, marked idle."""
        if self.encoder is not None:
            return self.encoder.execution_provider
        planned = self.sae.providers[0] if self.sae.providers else "unknown"
        return f"{planned} (idle: no feature subscribed)"

    def directions(self, feature_ids: Sequence[int]) -> NDArray[np.float32]:
        """Decoder rows of these features, cached so the full decoder stays off the hot path."""
        missing = [f for f in feature_ids if f not in self._directions]
        if missing:
            rows = self.sae.decoder_directions(missing)
            with self._lock:
                for f, row in zip(missing, rows, strict=True):
                    self._directions[f] = np.asarray(row, dtype=np.float32)
        return np.stack([self._directions[f] for f in feature_ids])


@dataclass
class Pipeline:
    """One configuration of plugins and the encoders their subscriptions need."""

    plugins: PluginSet
    hooks: dict[str, HookRuntime]
    config: PluginsConfig
    runs_plugins: bool
    records: bool
    plugin_runs: tuple[PluginRun, ...]
    #: Whether a plugin implements ``guard_request_ended`` (else ends are not queued).
    request_ends: bool = False
    #: The record queues of the plugins implementing ``guard_record`` (one per sink), and the
    #: queues the ends of requests go to: the sinks' that implement ``guard_request_ended``,
    #: and the one shared by the other plugins implementing it, ``shared_end_plugins`` (set by
    #: :meth:`Engine._route`).
    record_sinks: tuple[RecordQueue, ...] = ()
    end_sinks: tuple[RecordQueue, ...] = ()
    shared_end_plugins: tuple[str, ...] = ()
    #: Record threads in a call on these plugins right now (a reload waits for them).
    users: int = 0


class Engine:
    """Holds the SAEs and the current pipeline; turns batches into decisions. Thread-safe."""

    def __init__(
        self,
        saes: Mapping[str, tuple[Sae, SaeConfig]],
        plugins_config: PluginsConfig,
        *,
        extra_plugins: Sequence[PluginSource] = (),
        instruments: Instruments | None = None,
        encode_budget: EncodeBudget | None = None,
    ) -> None:
        self._saes = dict(saes)
        #: Bounds the memory of the batches being encoded and decided, over every stream
        #: (``server.max_inflight_encode_bytes``; default: the configuration's default).
        self.encode_budget = encode_budget if encode_budget is not None else EncodeBudget()
        self._extra_plugins = tuple(extra_plugins)
        #: Spans and metrics (``guard.telemetry.setup`` builds them; the default records nothing).
        self.instruments = instruments if instruments is not None else Instruments()
        self._swap_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        #: Draws which batches are measured for their reconstruction error.
        self._sampler = random.Random()
        self.counters: dict[str, int] = {"plugin_failures": 0, "plugin_timeouts": 0,
                                         "plugin_not_run": 0, "steering_conflicts": 0,
                                         "reloads": 0, "reloads_rejected": 0}
        self._pipeline = self._start(plugins_config)
        self._executor = DaemonExecutor("guard-plugins")
        #: Hot-path admission: a plugin never holds more than the pool's size in calls.
        self._gate = PluginGate(max_running=self._executor.max_workers)
        #: Signalled when a pipeline's last record thread leaves it (see :meth:`_using`).
        self._pipeline_idle = threading.Condition(self._swap_lock)
        self._records = RecordSinks(self._deliver, self._deliver_end,
                                    plugins_config.record_queue_size)
        try:
            self._route(self._pipeline)
        except BaseException:
            self._pipeline.plugins.shutdown()
            raise
        self.instruments.watch(self)

    @classmethod
    def load(
        cls, config: GuardConfig, *, extra_plugins: Sequence[PluginSource] = (),
        instruments: Instruments | None = None,
    ) -> Engine:
        """Open every SAE, load and configure the plugins, build the encoders, start."""
        saes: dict[str, tuple[Sae, SaeConfig]] = {}
        for index, entry in enumerate(config.saes):
            sae = open_sae(entry.path, hook=entry.hook, sha256=entry.sha256, dtype=entry.dtype,
                           rows_per_run=entry.max_rows_per_encode)
            hook = sae.info.hook_name
            if hook in saes:
                raise ConfigError(f"saes[{index}].hook", "a hook not served by an earlier entry",
                                  hook, source=config.source)
            if entry.reconstruction.sample > 0:
                try:
                    sae_reconstruction.check_reconstructs(sae)
                except InvalidInput as exc:
                    raise ConfigError(f"saes[{index}].reconstruction.sample",
                                      f"0 (off) for this SAE: {exc}",
                                      entry.reconstruction.sample,
                                      source=config.source) from None
            saes[hook] = (sae, entry)
        engine = cls(saes, config.plugins, extra_plugins=extra_plugins, instruments=instruments,
                     encode_budget=EncodeBudget.of(config.server))
        engine.encode_budget.warn_unless_fits(
            {name: runtime.encoder for name, runtime in engine.hooks.items()},
            config.server.max_message_bytes)
        for name, runtime in sorted(engine.hooks.items()):
            info = runtime.info
            sub = runtime.subscription
            log.info("sae loaded", hook=name, d_in=info.d_in, d_sae=info.d_sae,
                     architecture=info.architecture, sha256=info.sha256,
                     execution_provider=runtime.execution_provider,
                     features="all" if sub.all_features else len(sub.feature_ids))
        log.info("plugins loaded", plugins=engine.plugins,
                 plugin_workers=engine.plugin_workers,
                 plugin_threads_max=engine.plugin_threads_max)
        return engine

    def _count(self, name: str, amount: int = 1) -> int:
        with self._counter_lock:
            self.counters[name] += amount
            return self.counters[name]

    # -- configuration --------------------------------------------------------------------

    def _start(self, plugins_config: PluginsConfig) -> Pipeline:
        """Build and start a pipeline; on failure, shut its plugins down (no leaked files)."""
        built: list[PluginSet] = []
        try:
            pipeline = self._build(plugins_config, built)
            pipeline.plugins.startup()
        except BaseException:
            for plugins in built:
                plugins.shutdown()
            raise
        return pipeline

    def _build(self, plugins_config: PluginsConfig, built: list[PluginSet]) -> Pipeline:
        sources = discover(plugins_config.enabled, plugins_config.disabled,
                           autoload=plugins_config.autoload)
        sources += [s for s in self._extra_plugins if s.name not in plugins_config.disabled]
        plugins = PluginSet(sources, trace=plugins_config.trace, instruments=self.instruments)
        built.append(plugins)
        plugins.configure(plugins_config.config)
        named = plugins.named_subscriptions(plugins_config.config)
        served = ", ".join(sorted(self._saes)) or "none"
        for plugin, request in named:
            if request.hook not in self._saes:
                raise ConfigError(f"plugins.config.{plugin}",
                                  f"subscriptions to served hooks ({served})", request.hook)
            info = self._saes[request.hook][0].info
            if request.d_in is not None and request.d_in != info.d_in:
                key = f"plugins.config.{plugin}" + (f".{request.key}" if request.key else "")
                raise ConfigError(key, f"{info.d_in} values (d_in of the SAE served for hook "
                                       f"{request.hook})", f"{request.d_in} values")
            if request.reconstruction and self._saes[request.hook][1].reconstruction.sample <= 0:
                key = f"plugins.config.{plugin}" + (f".{request.key}" if request.key else "")
                raise ConfigError(key, f"an SAE sampled for its reconstruction error on hook "
                                       f"{request.hook} (saes[].reconstruction.sample > 0)",
                                  "saes[].reconstruction.sample: 0 (off)")
            d_sae = info.d_sae
            if request.feature_ids != "all":
                bad = [f for f in request.feature_ids if not 0 <= int(f) < d_sae]
                if bad:
                    raise ConfigError(
                        f"plugins.config.{plugin}",
                        f"feature ids of hook {request.hook} in [0, {d_sae})", bad[0])
        requests = [request for _plugin, request in named]
        hooks = {hook: self._runtime(hook, sae, entry, requests)
                 for hook, (sae, entry) in self._saes.items()}
        runs = plugins.has_hook("guard_detect") or plugins.has_hook("guard_steer")
        plugin_runs = tuple(PluginRun(n, v) for n, v in plugins.plugins.items())
        return Pipeline(plugins, hooks, plugins_config, runs, plugins.has_hook("guard_record"),
                        plugin_runs, plugins.has_hook("guard_request_ended"))

    @staticmethod
    def _runtime(hook: str, sae: Sae, entry: SaeConfig,
                 requests: Iterable[FeatureRequest]) -> HookRuntime:
        wanted: set[int] = set()
        everything = False
        exact_needed = False
        if entry.features == "all":
            everything = True
        elif entry.features:
            wanted.update(entry.features)
            exact_needed = True
        for request in requests:
            if request.hook != hook:
                continue
            if request.feature_ids == "all":
                everything = True
            else:
                wanted.update(int(f) for f in request.feature_ids)
            if not request.approximate_topk:
                exact_needed = True
        approximate = not exact_needed
        if everything:
            encoder: Encoder | None = sae.encoder(None)
            ids = np.arange(sae.info.d_sae, dtype=np.int64)
            sub = Subscription(hook, (), all_features=True)
        elif wanted:
            ordered = sorted(wanted)
            encoder = sae.encoder(ordered, approximate_topk=approximate)
            ids = np.asarray(ordered, dtype=np.int64)
            sub = Subscription(hook, tuple(ordered), all_features=False,
                               approximate_topk=approximate)
        else:  # nothing subscribes: computing features nobody reads would only cost time
            encoder, ids = None, _EMPTY_IDS
            sub = Subscription(hook, (), all_features=False)
        if entry.reconstruction.sample > 0:
            sae.encoder(None)  # built now (start, reload), not on the first sampled batch
        return HookRuntime(sae=sae, encoder=encoder, subscription=sub, feature_ids=ids,
                           index={int(f): j for j, f in enumerate(ids)},
                           reconstruction_sample=entry.reconstruction.sample)

    def _route(self, pipeline: Pipeline) -> None:
        """Give the pipeline's sinks their record queues (each sink's thread starts the first
        time its name is seen: at start-up or reload, never on the hot path)."""
        plugins = pipeline.plugins
        sinks = plugins.sinks("guard_record") if pipeline.records else []
        ends = plugins.sinks("guard_request_ended") if pipeline.request_ends else []
        pipeline.record_sinks = self._records.route(sinks)
        shared = tuple(name for name in ends if name not in sinks)
        pipeline.shared_end_plugins = shared
        pipeline.end_sinks = self._records.route(name for name in ends if name in sinks) + (
            (self._records.shared_ends(),) if shared else ())

    def reload(self, config: GuardConfig) -> None:
        """Swap in the plugin part of ``config``; on any error the old pipeline stays."""
        try:
            new = self._start(config.plugins)
        except GuardError:
            self._count("reloads_rejected")
            raise
        try:
            self._route(new)
        except BaseException:
            new.plugins.shutdown()
            self._count("reloads_rejected")
            raise
        with self._swap_lock:
            old, self._pipeline = self._pipeline, new
            # Never shut down plugins that a record thread is still calling; a sink that
            # hangs is given up on after a while, so that a reload cannot wedge.
            idle = self._pipeline_idle.wait_for(lambda: old.users == 0, RELOAD_SINK_WAIT_S)
        if not idle:
            log.warning("a sink is still in a call on the old plugins; shutting them down "
                        "anyway", waited_s=RELOAD_SINK_WAIT_S)
        self._count("reloads")
        old.plugins.shutdown()
        log.info("plugins reloaded", plugins=new.plugins.plugins, source=config.source)

    # -- read-only views ------------------------------------------------------------------

    @property
    def hooks(self) -> Mapping[str, HookRuntime]:
        return self._pipeline.hooks

    @property
    def plugins(self) -> dict[str, str]:
        return self._pipeline.plugins.plugins

    @property
    def plugin_set(self) -> PluginSet:
        return self._pipeline.plugins

    @property
    def plugin_workers(self) -> int:
        """Plugin workers serving the hot path (``min(32, cpus + 4)``)."""
        return self._executor.max_workers

    @property
    def plugin_threads_max(self) -> int:
        """The most threads the plugin pool ever holds: its workers plus the workers stuck in
        a plugin call that were replaced (as many again at most)."""
        return self._executor.max_workers + self._executor.max_detached

    @property
    def plugin_threads(self) -> int:
        """The plugin pool's threads now (at most :attr:`plugin_threads_max`)."""
        return self._executor.threads

    def plugin_calls_stuck(self) -> dict[str, int]:
        """Plugin name -> its calls running past their budget now (while a plugin has
        ``plugins.max_stuck_calls`` of them, it is skipped)."""
        return self._gate.stuck()

    @property
    def records(self) -> RecordSinks:
        """The sinks' record queues (``records.sinks``: by name; totals as attributes)."""
        return self._records

    def hook(self, name: str) -> HookRuntime:
        """The runtime of a served hook; NotFound lists the served hooks."""
        runtime = self._pipeline.hooks.get(name)
        if runtime is None:
            served = ", ".join(sorted(self._pipeline.hooks)) or "none"
            raise NotFound(f"hook {name!r} is not served by this guard; served hooks: {served}")
        return runtime

    # -- the hot path ---------------------------------------------------------------------

    def inspect(
        self, batch: ActivationRows, timings: dict[str, float], started: float | None = None,
        *, deferred: list[Callable[[], object]] | None = None,
    ) -> Decision:
        """Encode, run the plugins and decide on one validated batch; queue its record.

        ``timings`` holds the stages measured so far; ``started`` (a perf_counter value)
        is when the batch arrived, for the ``total`` timing. The decision id is made first
        and set in :data:`guard.telemetry.instruments.DECISION_ID`, so that every log line of the
        batch (plugins' included) carries it. Telemetry work that can wait until the reply is
        sent is appended to ``deferred`` when given (done at once otherwise).

        ``batch.rows`` may be a read-only view on the host's shared memory
        (:mod:`guard.sidecar.regions`), which the host reuses once the reply is sent: nothing
        here keeps the rows past the return (plugins get encoded features, records get the
        decision); a future consumer that must keep rows takes ``batch.rows.copy()``.

        Only the batch-level request id and phase are read: a batch with segments goes to
        :meth:`inspect_step`.
        """
        decision_id = new_decision_id()
        token = DECISION_ID.set(decision_id)
        try:
            return self._inspect(batch, timings,
                                 time.perf_counter() if started is None else started,
                                 decision_id, deferred)
        finally:
            DECISION_ID.reset(token)

    def _inspect(self, batch: ActivationRows, timings: dict[str, float], t0: float,
                 decision_id: str, deferred: list[Callable[[], object]] | None) -> Decision:
        pipeline = self._pipeline  # one consistent configuration for the whole batch
        runtime = pipeline.hooks.get(batch.hook) or self.hook(batch.hook)
        sampled = self._sampled(runtime)
        if not (pipeline.runs_plugins or pipeline.records):
            # Nobody reads features or records: encoding would only cost time.
            nmse = self._measure_only(runtime, batch, (), timings, deferred) if sampled \
                else None
            timings["total"] = time.perf_counter() - t0
            decision = self._decision(decision_id, batch, runtime, pipeline, Action.CONTINUE,
                                      [], [], (), "", [], timings)
            if nmse is None or nmse[0] is None:
                return decision
            return replace(decision, reconstruction_nmse=nmse[0])
        traced = self.instruments.tracer is not None
        with self._encode_budget(runtime, batch, sampled):  # features live until the decision
            activations = self._encode(runtime, batch, timings, traced)
            errors = self._squared_errors(runtime, batch, activations, timings) if sampled \
                else None
            # The caller's timings themselves, not a copy: it reads the plugin stages from them.
            (decision,) = self._decide_requests(pipeline, runtime,
                                                [(batch, activations, errors)], [timings],
                                                [decision_id], t0, deferred, traced)
        return decision

    def inspect_step(
        self, batch: ActivationRows, timings: dict[str, float], started: float | None = None,
        *, deferred: list[Callable[[], object]] | None = None,
    ) -> StepDecision:
        """Decide on a validated batch with segments: one encode of all its rows, then, per
        request, the plugins on that request's rows and a decision of its own.

        Each request is decided exactly as a single-request batch of its rows would be (its
        own decision id in :data:`~guard.telemetry.instruments.DECISION_ID` while its plugins
        run, its own findings, failures, steering and record), so plugins see one
        :class:`FeatureBatch` per request and need no change. ``timings`` and ``started`` as
        for :meth:`inspect`; each decision's timings hold the shared stages (decode, encode)
        and its own (detect, steer, total). The combined steering delta covers every row.
        """
        t0 = time.perf_counter() if started is None else started
        pipeline = self._pipeline  # one configuration for every request of the batch
        runtime = pipeline.hooks.get(batch.hook) or self.hook(batch.hook)
        requests = [batch.request(segment) for segment in batch.segments]
        decisions: list[Decision] = []
        sampled = self._sampled(runtime)
        if not (pipeline.runs_plugins or pipeline.records):
            nmses = self._measure_only(runtime, batch, batch.segments, timings, deferred) \
                if sampled else None
            timings["total"] = time.perf_counter() - t0
            decisions = [self._decision(new_decision_id(), request, runtime, pipeline,
                                        Action.CONTINUE, [], [], (), "", [], timings)
                         for request in requests]
            if nmses:
                decisions = [replace(d, reconstruction_nmse=n) if n is not None else d
                             for d, n in zip(decisions, nmses, strict=True)]
        else:
            traced = self.instruments.tracer is not None
            with self._encode_budget(runtime, batch, sampled):
                activations = self._encode(runtime, batch, timings, traced)
                errors = self._squared_errors(runtime, batch, activations, timings) \
                    if sampled else None
                decisions = self._decide_requests(
                    pipeline, runtime,
                    [(request, activations[segment.start:segment.stop],
                      None if errors is None else errors[segment.start:segment.stop])
                     for segment, request in zip(batch.segments, requests, strict=True)],
                    [dict(timings) for _ in requests], [new_decision_id() for _ in requests],
                    t0, deferred, traced)
            timings["total"] = time.perf_counter() - t0
        return StepDecision(
            decisions=tuple(decisions),
            action=max((d.action for d in decisions), default=Action.CONTINUE),
            sequence=batch.sequence, hook=batch.hook, positions=batch.positions,
            steering=_combined_steering(batch, decisions), timings=dict(timings),
        )

    def _encode_budget(self, runtime: HookRuntime, batch: ActivationRows,
                       sampled: bool = False) -> contextlib.AbstractContextManager[None]:
        """Hold the batch's share of ``server.max_inflight_encode_bytes`` (its features and
        one encode chunk's intermediates; on a batch sampled for its reconstruction error,
        one reconstruction chunk's too) while it is encoded and decided
        (:mod:`guard.engine.budget`); nothing to hold without an encoder or a sample."""
        rows = int(batch.rows.shape[0])
        needed = 0 if runtime.encoder is None else runtime.encoder.peak_bytes(rows)
        if sampled:
            needed += sae_reconstruction.peak_bytes(
                runtime.sae, rows, encoded=runtime.encodes_every_feature)
        if not needed:
            return contextlib.nullcontext()
        return self.encode_budget.hold(needed, f"batch of {rows} rows for hook {batch.hook!r}")

    def _sampled(self, runtime: HookRuntime) -> bool:
        """Whether this batch is measured for its reconstruction error (drawn per batch)."""
        sample = runtime.reconstruction_sample
        return sample > 0 and self._sampler.random() < sample

    def _squared_errors(self, runtime: HookRuntime, batch: ActivationRows,
                        activations: NDArray[np.float32] | None, timings: dict[str, float]
                        ) -> NDArray[np.float64]:
        """Each row's ``||x - x_hat||^2`` (:mod:`guard.sae.reconstruction`), NaN at position
        0 (the BOS row: hosts do not send it by default, SAEs are not trained on it, and its
        norm, about 100x the others', would swamp the request's variance). The encoder's
        features are reused when they are every feature; otherwise rows are encoded once
        more, in full, chunk by chunk (the ``reconstruct`` timing)."""
        started = time.perf_counter()
        if runtime.encoder is None:  # otherwise _encode checked these rows already
            check_input_range(batch, runtime.sae.input_limit)
        measured = batch.positions != 0
        errors = sae_reconstruction.squared_errors(
            runtime.sae, batch.rows, measured=None if bool(measured.all()) else measured,
            activations=activations if runtime.encodes_every_feature else None)
        timings["reconstruct"] = time.perf_counter() - started
        return errors

    def _measure_only(self, runtime: HookRuntime, batch: ActivationRows,
                      segments: Sequence[Segment], timings: dict[str, float],
                      deferred: list[Callable[[], object]] | None) -> list[float | None]:
        """The reconstruction error of a sampled batch that nothing else encodes (no plugin
        reads features, none records): each request's NMSE (None: too few rows), counted in
        the histogram."""
        with self._encode_budget(runtime, batch, True):
            errors = self._squared_errors(runtime, batch, None, timings)
        spans = [(s.start, s.stop) for s in segments] or [(0, int(batch.rows.shape[0]))]
        nmses = [Reconstruction.of(batch.rows[a:b], errors[a:b]).nmse for a, b in spans]
        measured = [n for n in nmses if math.isfinite(n)]
        if measured:
            _defer(deferred, partial(self.instruments.reconstruction_measured, batch.hook,
                                     measured))
        return [n if math.isfinite(n) else None for n in nmses]

    def _encode(self, runtime: HookRuntime, batch: ActivationRows, timings: dict[str, float],
                traced: bool) -> NDArray[np.float32]:
        """The subscribed features of every row of the batch (one encoder call), once every
        row is known to be within the SAE's range (:func:`check_input_range`)."""
        if runtime.encoder is None:
            return np.zeros((batch.rows.shape[0], 0), dtype=np.float32)
        check_input_range(batch, runtime.sae.input_limit)
        tracer = self.instruments.tracer if traced else None
        if tracer is not None and not trace.get_current_span().is_recording():
            tracer = None  # the batch is not sampled: no child spans
        started = time.perf_counter()
        if tracer is None:
            activations = runtime.encoder.encode(batch.rows)
        else:
            with tracer.start_as_current_span("guard.encode", attributes={
                    "guard.hook": batch.hook, "guard.rows": int(batch.rows.shape[0]),
                    "guard.encode.features": int(runtime.feature_ids.size),
                    "guard.sae.execution_provider": runtime.execution_provider}):
                activations = runtime.encoder.encode(batch.rows)
        timings["encode"] = time.perf_counter() - started
        check_finite_features(activations, batch)
        return activations

    def _decide_requests(
        self, pipeline: Pipeline, runtime: HookRuntime,
        requests: Sequence[tuple[ActivationRows, NDArray[np.float32],
                                 NDArray[np.float64] | None]],
        timings: Sequence[dict[str, float]], decision_ids: Sequence[str], t0: float,
        deferred: list[Callable[[], object]] | None, traced: bool,
    ) -> list[Decision]:
        """Plugins, steering delta, decision and record for each request's encoded rows (and
        their squared reconstruction errors on a sampled batch), in order, each with its own
        decision id, timings, findings and failures."""
        calls = [_PluginCall(self._features(runtime, batch, activations, errors), decision_id,
                             own)
                 for (batch, activations, errors), decision_id, own
                 in zip(requests, decision_ids, timings, strict=True)]
        measured = [c.features.reconstruction.nmse for c in calls
                    if c.features.reconstruction is not None
                    and math.isfinite(c.features.reconstruction.nmse)]
        if measured:
            _defer(deferred, partial(self.instruments.reconstruction_measured,
                                     runtime.info.hook_name, measured))
        # Lazily, in order: request i is decided here while the worker runs i+1's plugins.
        results = self._plugin_results(pipeline, calls, deferred) if pipeline.runs_plugins \
            else None
        decisions: list[Decision] = []
        for call, (batch, _activations, _errors) in zip(calls, requests, strict=True):
            token = DECISION_ID.set(call.decision_id)  # the request's log lines carry its id
            try:
                findings, edits, failures = next(results) if results is not None \
                    else ([], [], [])
                decisions.append(self._decide_request(
                    pipeline, runtime, batch, call.features, findings, edits, failures,
                    call.timings, t0, call.decision_id, traced))
            finally:
                DECISION_ID.reset(token)
        return decisions

    @staticmethod
    def _features(runtime: HookRuntime, batch: ActivationRows,
                  activations: NDArray[np.float32],
                  errors: NDArray[np.float64] | None = None) -> FeatureBatch:
        """What the plugins see of one request: its encoded rows, ids, positions, phase, its
        raw rows (a read-only view: valid during the call, never recorded), and on a sampled
        batch how well the SAE reconstructs them."""
        residual = batch.rows.view()
        residual.flags.writeable = False
        reconstruction = None if errors is None else Reconstruction.of(residual, errors)
        features = FeatureBatch(
            request_id=batch.request_id, sequence=batch.sequence, hook=batch.hook,
            feature_ids=runtime.feature_ids, activations=activations,
            positions=batch.positions, token_ids=batch.token_ids, phase=batch.phase,
            feature_labels=runtime.info.feature_labels, sae_sha256=runtime.info.sha256,
            attributes=batch.attributes, roles=batch.roles,
            prompt_complete=batch.prompt_complete, residual=residual, stream=batch.stream,
            reconstruction=reconstruction,
        )
        object.__setattr__(features, "_index_cache", runtime.index)  # see FeatureBatch.column
        return features

    def _decide_request(
        self, pipeline: Pipeline, runtime: HookRuntime, batch: ActivationRows,
        features: FeatureBatch, findings: list[Finding], edits: list[FeatureEdit],
        failures: list[PluginFailure], timings: dict[str, float], t0: float,
        decision_id: str, traced: bool,
    ) -> Decision:
        """Steering delta, decision and record for one request, given its plugins' results."""
        steering: tuple[Steering, ...] = ()
        if edits:
            try:
                result = build_delta(features, edits, runtime.directions)
            except GuardError as exc:
                failures.append(PluginFailure(",".join(sorted({e.plugin for e in edits})),
                                              "guard_steer", str(exc)))
                log.error("steering edits rejected", reason=str(exc))
            else:
                if result.conflicts:
                    self._count("steering_conflicts", result.conflicts)
                if result.delta is not None:
                    steering = (Steering(batch.hook, result.delta),)
        timings["total"] = time.perf_counter() - t0
        decision = self._decide(decision_id, pipeline, batch, runtime, findings, edits,
                                steering, failures, timings)
        reconstruction = features.reconstruction
        if reconstruction is not None and math.isfinite(reconstruction.nmse):
            decision = replace(decision, reconstruction_nmse=reconstruction.nmse)
        if decision.action is Action.ABORT:
            log.info("batch aborted", request_id=batch.request_id, sequence=batch.sequence,
                     hook=batch.hook, details=decision.details)
        if pipeline.records:
            # The batch's trace context goes along: the sinks' spans become its children.
            self._records.offer(pipeline.record_sinks, decision,
                                otel_context.get_current() if traced else None)
        return decision

    def _plugin_results(
        self, pipeline: Pipeline, calls: Sequence[_PluginCall],
        deferred: list[Callable[[], object]] | None,
    ) -> Iterator[PluginResults]:
        """Each request's detect + steer results, in order, within ``plugins.timeout_ms``.

        One hand-off to the plugin worker runs every request's calls one after another (a
        hand-off per request cost a third of a 32-request step: ``bench/steps.py``). Each
        request still has the whole budget for its own calls, counted from when they start
        (the first request's from the hand-off, as a single batch's always was). When a
        request overruns, it gets the overrun failure, and the requests after it go to a
        fresh hand-off, without the stuck plugin, instead of waiting behind the hung call.
        The worker stuck in that plugin is replaced (:meth:`DaemonExecutor.detach`); the
        overrun request calls no further plugin and what the stuck call returns is dropped.
        With no budget (``timeout_ms: 0``) the calls run on the calling thread.
        """
        budget = pipeline.config.timeout_ms / 1e3
        if budget <= 0:
            self._prepare(pipeline, calls, pooled=False)
            for call in calls:
                result = self._plugin_pass(pipeline, call)
                yield self._completed(call, result, deferred)
            return
        pending = calls
        while pending:
            self._prepare(pipeline, pending, pooled=True)
            job = _PluginJob(partial(self._plugin_pass, pipeline), pending)
            pending[0].started = time.perf_counter()
            # In a copy of this thread's context: plugin spans and log lines belong to the
            # batch (the job sets each request's own decision id).
            future = self._executor.submit(contextvars.copy_context().run, job)
            for index, call in enumerate(pending):
                if not job.wait(call, budget):
                    yield self._overran(pipeline, call, future)
                    pending = pending[index + 1:]
                    break
                if call.error is not None:
                    raise call.error
                yield self._completed(call, call.result, deferred)
            else:
                return

    def _prepare(self, pipeline: Pipeline, calls: Sequence[_PluginCall], *,
                 pooled: bool) -> None:
        """Fresh progress for these calls, admitted call by call by the gate."""
        for call in calls:
            call.progress = CallProgress(gate=self._gate,
                                         max_stuck=pipeline.config.max_stuck_calls,
                                         pooled=pooled)

    @staticmethod
    def _plugin_pass(pipeline: Pipeline, call: _PluginCall) -> PluginResults:
        """One request's detect then steer (on the plugin worker, or inline)."""
        t0 = time.perf_counter()
        found, failed = pipeline.plugins.detect(call.features, call.progress)
        t1 = time.perf_counter()
        # The call's own stages (it may outlive the batch); copied to its timings when used.
        call.stages["detect"] = t1 - t0
        if call.progress.abandoned:  # answered without it: no steering call after the fact
            return found, [], failed
        edits, failed_steer = pipeline.plugins.steer(call.features, found, call.progress)
        call.stages["steer"] = time.perf_counter() - t1
        return found, edits, failed + failed_steer

    def _completed(self, call: _PluginCall, result: PluginResults,
                   deferred: list[Callable[[], object]] | None) -> PluginResults:
        call.timings.update(call.stages)
        _defer(deferred, partial(self.instruments.plugin_calls, call.progress.durations))
        return result

    def _overran(self, pipeline: Pipeline, call: _PluginCall,
                 future: futures.Future[None]) -> PluginResults:
        """The failure of ``call``, whose budget ran out (the job was abandoned by
        :meth:`_PluginJob.wait`): the plugin running then overran, is counted stuck until its
        call returns, and its worker is replaced; with no plugin running (the job waited for
        a worker, or was between calls), the plugins not yet called were not run."""
        progress = call.progress
        culprit, hook = call.culprit
        record_durations = partial(self.instruments.plugin_calls, progress.durations)
        future.add_done_callback(lambda _f: record_durations())  # when the calls end
        budget_ms = pipeline.config.timeout_ms
        # Keep what the plugins before the culprit found: an abort must not be lost.
        findings, edits = list(progress.findings), list(progress.edits)
        if not culprit:
            future.cancel()  # still queued: it never runs (it would run late)
            not_run = [name for name in pipeline.plugins.hot_plugins()
                       if name not in progress.called]
            for name in not_run:
                self.instruments.plugin_skipped(name, SKIP_BUDGET)
            times = self._count("plugin_not_run")
            if times % 1000 == 1:  # the first and every 1000th
                log.warning("plugins not run within the budget", plugins=not_run,
                            budget_ms=budget_ms, plugin_workers=self._executor.max_workers,
                            stuck=self._gate.stuck(), request_id=call.features.request_id,
                            sequence=call.features.sequence, times=times)
            message = f"not run: the plugin budget of {budget_ms:g} ms ran out before its turn"
            return findings, edits, [PluginFailure(name, "guard_detect/guard_steer", message)
                                     for name in not_run]
        self._count("plugin_timeouts")
        self.instruments.plugin_overran(culprit)
        # The worker stays in the plugin call: another takes its place (within a bound).
        replaced = self._executor.detach(future)
        log.error("plugin overran its budget", plugin=culprit, hook=hook, budget_ms=budget_ms,
                  request_id=call.features.request_id, sequence=call.features.sequence,
                  worker_replaced=replaced)
        return findings, edits, [PluginFailure(
            culprit, hook, f"overran the plugin budget of {budget_ms:g} ms")]

    def _decide(
        self, decision_id: str, pipeline: Pipeline, batch: ActivationRows, runtime: HookRuntime,
        findings: list[Finding], edits: list[FeatureEdit], steering: tuple[Steering, ...],
        failures: list[PluginFailure], timings: dict[str, float],
    ) -> Decision:
        labels = runtime.info.feature_labels
        findings = [
            replace(f, feature_labels=tuple(labels.get(i, "") for i in f.feature_ids))
            if f.feature_ids and not f.feature_labels else f
            for f in findings
        ]
        details = ""
        if failures:
            self._count("plugin_failures", len(failures))
            if pipeline.config.failure_mode == "closed":
                details = "; ".join(f"plugin {f.plugin} failed in {f.hook}: {f.reported}"
                                    for f in failures) + " (plugins.failure_mode: closed)"
                return self._decision(decision_id, batch, runtime, pipeline, Action.ABORT,
                                      findings, [], (), details, failures, timings)
            findings += [
                Finding(detector=f"plugin-error:{f.plugin}", score=float("nan"), threshold=0.0,
                        action="flag", message=f"{f.hook}: {f.reported}", plugin=f.plugin)
                for f in failures
            ]
        aborts = [f for f in findings if f.action == "abort"]
        if aborts:
            details = "; ".join(_describe_finding(f) for f in aborts)
            return self._decision(decision_id, batch, runtime, pipeline, Action.ABORT,
                                  findings, [], (), details, failures, timings)
        action = Action.STEER if steering else Action.CONTINUE
        return self._decision(decision_id, batch, runtime, pipeline, action, findings, edits,
                              steering, details, failures, timings)

    @staticmethod
    def _decision(
        decision_id: str, batch: ActivationRows, runtime: HookRuntime, pipeline: Pipeline,
        action: Action, findings: list[Finding], edits: list[FeatureEdit],
        steering: tuple[Steering, ...], details: str, failures: list[PluginFailure],
        timings: dict[str, float],
    ) -> Decision:
        return Decision(
            decision_id=decision_id, action=action, request_id=batch.request_id,
            sequence=batch.sequence, hook=batch.hook, positions=batch.positions,
            findings=tuple(findings), edits=tuple(edits), steering=steering, details=details,
            phase=batch.phase, sae_sha256=runtime.info.sha256,
            sae_neuronpedia_id=runtime.info.neuronpedia_id or "", plugins=pipeline.plugin_runs,
            plugin_errors=tuple(sorted({f.plugin for f in failures})) if failures else (),
            timings=dict(timings), timestamp=time.time(), token_ids=batch.token_ids,
        )

    # -- the request lifecycle ------------------------------------------------------------

    def end_requests(self, request_ids: Sequence[str], reason: RequestEndReason) -> bool:
        """Tell the plugins (``guard_request_ended``) that these requests are over.

        Never blocks and calls no plugin here: the ends go through each plugin's record
        queue, so every plugin hears of them on its own record thread, after every decision of
        these requests that its queue accepted (the decision log writes a request's end after
        its decisions). False when nothing was queued: no plugin implements the hook, no ids,
        or the queues were full (``records.ends_dropped``) or closed.
        """
        pipeline = self._pipeline
        if not request_ids or not pipeline.request_ends:
            return False
        return self._records.offer_end(pipeline.end_sinks,
                                       RequestsEnded(tuple(request_ids), reason))

    @contextlib.contextmanager
    def _using(self) -> Iterator[Pipeline]:
        """The current pipeline, marked in use by this record thread until the block ends:
        a reload does not shut its plugins down meanwhile (and other sinks are not held up,
        as one lock around every call would)."""
        with self._swap_lock:
            pipeline = self._pipeline
            pipeline.users += 1
        try:
            yield pipeline
        finally:
            with self._swap_lock:
                pipeline.users -= 1
                if pipeline.users == 0:
                    self._pipeline_idle.notify_all()

    def _deliver_end(self, sink: str | None, ended: RequestsEnded) -> None:
        """Tell the plugin ``sink`` (None: the plugins that are no sinks, in plugin order)
        that these requests are over, on its record thread (None: the shared one)."""
        with self._using() as pipeline:
            if sink is None:
                names = pipeline.shared_end_plugins
            elif any(queue.name == sink for queue in pipeline.record_sinks):
                names = (sink,)
            else:
                return  # a reload removed it
            for request_id in ended.request_ids:
                for name in names:
                    pipeline.plugins.request_ended(request_id, ended.reason, name)

    def _deliver(self, sink: str, decision: Decision, trace_context: Context | None
                 ) -> Outcome:
        """Hand a decision to the sink ``sink`` in its batch's context (trace and decision
        id), on that sink's record thread; what came of it."""
        token = otel_context.attach(trace_context) if trace_context is not None else None
        decision_token = DECISION_ID.set(decision.decision_id)
        try:
            with self._using() as pipeline:
                if not any(queue.name == sink for queue in pipeline.record_sinks):
                    return "gone"  # a reload removed this sink
                return "failed" if pipeline.plugins.record(decision, sink) else "written"
        finally:
            DECISION_ID.reset(decision_token)
            if token is not None:
                otel_context.detach(token)

    def close(self, timeout: float | None = 30.0) -> None:
        """Deliver every accepted record, then call guard_shutdown."""
        self._records.close(timeout)
        self._executor.shutdown(cancel_futures=True)
        self._pipeline.plugins.shutdown()


@dataclass(eq=False)
class _PluginCall:
    """One request's detect + steer within a hand-off to the plugin worker, and the slot
    its result comes back in (``done`` set once ``result`` or ``error`` is there)."""

    features: FeatureBatch
    decision_id: str
    #: The request's own timings; its detect and steer stages are added once it completes.
    timings: dict[str, float]
    progress: CallProgress = field(default_factory=CallProgress)
    stages: dict[str, float] = field(default_factory=dict)
    #: When its calls started (perf_counter): its budget counts from here.
    started: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    result: PluginResults = field(default_factory=lambda: ([], [], []))
    error: BaseException | None = None
    #: (plugin, hook) running when its budget ran out; ("", "") when none was.
    culprit: tuple[str, str] = ("", "")


class _PluginJob:
    """The plugin calls of a batch's requests as one job on the plugin worker: each
    request's calls in order, with its own decision id set, each resolving its own slot.

    The caller waits on each slot for the budget from that request's start. A caller that
    gives up on a request abandons the job: that request calls no further plugin (the
    running call's result is dropped when it returns), and the job never starts a later
    request, which the caller runs on a fresh job instead. Resolving a slot and abandoning
    the job hold one lock, so each request runs at most once, and never after its answer.
    """

    def __init__(self, run: Callable[[_PluginCall], PluginResults],
                 calls: Sequence[_PluginCall]) -> None:
        self._run = run
        self._calls = calls
        self._lock = threading.Lock()
        self._abandoned = False

    def __call__(self) -> None:
        for index, call in enumerate(self._calls):
            if self._given_up():
                return  # the caller answered without it (it waited for a worker)
            token = DECISION_ID.set(call.decision_id)  # the plugins' log lines carry it
            try:
                call.result = self._run(call)
            except BaseException as exc:  # a guard bug (plugin errors are failures): raised
                call.error = exc          # to the caller, as from the future before
            finally:
                DECISION_ID.reset(token)
            with self._lock:
                if self._abandoned:
                    return  # the caller stopped waiting for this call and moved on
                if index + 1 < len(self._calls):
                    # The next request's budget starts now, not when the caller looks.
                    self._calls[index + 1].started = time.perf_counter()
                call.done.set()
            if call.error is not None:
                return

    def _given_up(self) -> bool:
        with self._lock:
            return self._abandoned

    def wait(self, call: _PluginCall, budget: float) -> bool:
        """Whether ``call`` completed within ``budget`` seconds of its start; if not, the
        job is abandoned (``call`` and every later call belong to the caller again) and
        ``call.culprit`` names the plugin call running then, now counted stuck."""
        if call.done.wait(max(0.0, call.started + budget - time.perf_counter())):
            return True
        with self._lock:
            if call.done.is_set():  # it completed as the wait timed out
                return True
            self._abandoned = True
            gate = call.progress.gate
            if gate is not None:
                call.culprit = gate.abandon(call.progress)
            return False


@dataclass(eq=False)
class _Worker:
    """One thread of a :class:`DaemonExecutor`; ``detached`` once it was replaced."""

    detached: bool = False


class DaemonExecutor:
    """The thread pool of the plugin runs: like ``ThreadPoolExecutor``, but on daemon
    threads, and a worker stuck in a call can be replaced.

    ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so one plugin call
    that never returns (a deadlock, a network call without a timeout) would keep the guard
    from exiting after its drain, however long it waits; such a call is left behind here.

    At most ``max_workers`` threads (W, ``min(32, cpus + 4)`` by default) take work from the
    queue, started on demand. :meth:`detach` takes a worker whose call overran its budget out
    of them and starts another in its place, while fewer than ``max_detached`` (default W)
    are detached; a detached worker ends when its call returns. So the pool never holds more
    than ``max_workers + max_detached`` threads, and calls stuck in one plugin (which the
    :class:`~guard.engine.plugins.PluginGate` keeps to W) cannot take the workers from the
    others. The counts are exact: a submit takes an idle worker, starts one, or waits for the
    next to free up.
    """

    def __init__(self, name: str, max_workers: int | None = None,
                 max_detached: int | None = None) -> None:
        self._name = name
        self.max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self.max_detached = self.max_workers if max_detached is None else max_detached
        self._work: WorkQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Workers serving the queue (detached ones not counted), and among them the ones
        #: waiting for work that no submit has claimed yet.
        self._active = 0
        self._idle = 0
        #: Queued work that no worker was free for: the next worker to free up takes it.
        self._unclaimed = 0
        self._detached = 0
        self._running: dict[futures.Future[Any], _Worker] = {}
        self._started = 0
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
               ) -> futures.Future[T]:
        future: futures.Future[T] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot run plugins after the engine was closed")
            self._work.put((future, partial(fn, *args, **kwargs)))
            if self._idle:
                self._idle -= 1
            elif not (self._active < self.max_workers and self._start_worker()):
                self._unclaimed += 1
        return future

    def _start_worker(self) -> bool:
        """Start a worker (holding the lock); False when no thread could start (a pids
        limit: the work waits for a running worker instead)."""
        thread = threading.Thread(target=self._worker, args=(_Worker(),), daemon=True,
                                  name=f"{self._name}_{self._started}")
        try:
            thread.start()
        except RuntimeError as exc:
            log.warning("cannot start a plugin worker", reason=str(exc), active=self._active,
                        detached=self._detached)
            return False
        self._started += 1
        self._active += 1
        return True

    def _worker(self, me: _Worker) -> None:
        while (item := self._work.get()) is not None:
            future, fn = item
            del item
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self._running[future] = me
                settle(future, fn)
                with self._lock:
                    del self._running[future]
                    if me.detached:  # replaced while in the call: leave
                        self._detached -= 1
                        return
            del future, fn  # no reference kept while idle
            with self._lock:
                if self._unclaimed:
                    self._unclaimed -= 1  # takes the oldest waiting work
                else:
                    self._idle += 1
        with self._lock:
            self._active -= 1

    def detach(self, future: futures.Future[Any]) -> bool:
        """Replace the worker running ``future`` (stuck in a call past its budget) with a new
        one; it ends when the call returns. False when ``future`` is not running, or
        ``max_detached`` workers are detached already (then it keeps its place)."""
        with self._lock:
            worker = self._running.get(future)
            if (worker is None or worker.detached or self._shutdown
                    or self._detached >= self.max_detached):
                return False
            self._active -= 1
            if not self._start_worker():
                self._active += 1
                return False
            worker.detached = True
            self._detached += 1
            # The new worker is free: it takes waiting work, or waits for the next.
            if self._unclaimed:
                self._unclaimed -= 1
            else:
                self._idle += 1
            return True

    @property
    def threads(self) -> int:
        """The pool's threads now: its workers and the detached ones still in a call."""
        with self._lock:
            return self._active + self._detached

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Stop the workers once they are idle (never waits for them)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                cancel_waiting(self._work)
            for _ in range(self._active):
                self._work.put(None)


def _combined_steering(batch: ActivationRows, decisions: Sequence[Decision]
                       ) -> tuple[Steering, ...]:
    """One delta per hook over every row of a batch with segments: each steered request's
    delta in its rows, zero elsewhere (the host adds it to the whole step at once)."""
    combined: dict[str, NDArray[np.float32]] = {}
    for segment, decision in zip(batch.segments, decisions, strict=True):
        for steering in decision.steering:
            delta = combined.get(steering.hook)
            if delta is None:
                delta = combined[steering.hook] = np.zeros(
                    (batch.rows.shape[0], steering.delta.shape[1]), dtype=np.float32)
            delta[segment.start:segment.stop] = steering.delta
    return tuple(Steering(hook, delta) for hook, delta in combined.items())


def _defer(deferred: list[Callable[[], object]] | None, work: Callable[[], object]) -> None:
    """Leave ``work`` for after the reply when the caller collects it, else do it now."""
    if deferred is None:
        work()
    else:
        deferred.append(work)


_DETAIL_FEATURES = 6


def _describe_finding(finding: Finding) -> str:
    features = ""
    if finding.feature_ids:
        named = [f"{i}" + (f" ({label})" if label else "")
                 for i, label in zip(finding.feature_ids,
                                     finding.feature_labels or ("",) * len(finding.feature_ids),
                                     strict=False)]
        # The reply's details are for humans: the full list is in the finding itself.
        shown = ", ".join(named[:_DETAIL_FEATURES])
        more = len(named) - _DETAIL_FEATURES
        features = f" on features {shown}" + (f" and {more} more" if more > 0 else "")
    text = (f"detector {finding.detector} fired: score {finding.score:.4g} >= threshold "
            f"{finding.threshold:.4g}{features}")
    return f"{text}: {finding.message}" if finding.message else text


def check_input_range(batch: ActivationRows, limit: float) -> None:
    """Refuse a batch with a row the SAE cannot encode: a NaN, an infinity, or a value
    beyond ``limit`` (:attr:`guard.sae.Sae.input_limit`: within it no feature's encode can
    overflow float32, whether that feature is subscribed or not). Checked before every
    encode, full or subset; two reductions over the rows (no copy) when all is well. The
    error names the hook and how many rows, never a value."""
    rows = batch.rows
    if rows.size == 0:
        return
    with np.errstate(invalid="ignore"):
        largest, smallest = rows.max(), rows.min()  # NaN propagates: not <= limit
    if largest <= limit and -smallest <= limit:
        return
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.abs(rows).max(axis=1) <= limit))
    positions = batch.positions
    shown = ", ".join(str(int(positions[i])) for i in bad[:8])
    more = f" and {bad.size - 8} more" if bad.size > 8 else ""
    raise InvalidInput(
        f"batch.activations: {bad.size} of {rows.shape[0]} rows of {batch.hook} are out of "
        f"the range its SAE can encode (rows at positions {shown}{more}); expected finite "
        f"values of magnitude at most {limit:.3g}, beyond which the SAE's float32 encode "
        "could overflow")


def check_finite_features(activations: NDArray[np.float32], batch: ActivationRows) -> None:
    """Refuse a batch whose rows encode to NaN or Inf features (a last line behind
    :func:`check_input_range`): a detector would silently not fire on a NaN score, so the
    batch gets an error reply and the host's failure policy decides instead. One summation
    when all is well. The error names the hook and how many rows, never a value."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(activations.sum())
    if np.isfinite(total) or np.isfinite(activations).all():
        return
    bad = int(np.count_nonzero(~np.isfinite(activations).all(axis=1)))
    raise InvalidInput(
        f"batch.activations: {bad} of {activations.shape[0]} rows of {batch.hook} encode to "
        "NaN or Inf feature activations; expected residual-stream values the SAE can encode "
        "in float32")
