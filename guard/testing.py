"""Test a guard plugin without a server: the plugin authors' kit.

This module is a pytest plugin (entry point ``pytest11``): wherever activation-guard is
installed, every test can ask for its fixtures.

- ``feature_batch``: builds :class:`~guard.FeatureBatch` objects (it is
  :func:`make_feature_batch`);
- ``guard_plugin_harness``: loads a plugin into a :class:`PluginHarness`, the same plugin
  manager the sidecar uses, and shuts it down after the test.

Example, a test of a detector::

    from guard.testing import FeatureBatchFactory, PluginHarnessFactory
    from my_detector import MyDetector

    def test_fires_on_feature_7(
        guard_plugin_harness: PluginHarnessFactory, feature_batch: FeatureBatchFactory
    ) -> None:
        harness = guard_plugin_harness(
            MyDetector, name="my_detector", settings={"feature": 7, "threshold": 0.5}
        )
        batch = feature_batch(feature_ids=[7], activations=[0.2, 0.9])
        [finding] = harness.detect(batch)
        assert finding.plugin == "my_detector"

Recorded batches (re-exported from :mod:`guard.recording`): :func:`save_batches` and
:func:`load_batches` keep feature batches in an ``.npz`` file (no pickle) for regression tests,
and :class:`BatchRecorder` is a plugin that collects the batches a real guard hands to plugins.

pytest imports this module in every run, so it defines fixtures and helpers only (no hooks,
no side effects) and imports the plugin manager only when a harness is first built.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import pytest
from numpy.typing import ArrayLike, NDArray

from guard.decision import (
    ROLE_NAMES,
    Action,
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    Phase,
    PluginRun,
    Reconstruction,
    RequestEndReason,
    RowRole,
    Steering,
    new_decision_id,
)
from guard.recording import BatchRecorder, frozen_batch, load_batches, save_batches

if TYPE_CHECKING:
    from guard.engine.plugins import PluginSet, PluginSource

__all__ = [
    "DEFAULT_HOOK",
    "SAE_SHA256",
    "BatchRecorder",
    "FeatureBatchFactory",
    "PluginHarness",
    "PluginHarnessFactory",
    "feature_batch",
    "guard_plugin_harness",
    "load_batches",
    "make_decision",
    "make_feature_batch",
    "save_batches",
    "steering_delta",
]

#: The hook of synthetic batches unless one is given (a SAELens hook name).
DEFAULT_HOOK: Final = "blocks.6.hook_resid_post"
#: The SAE revision of synthetic batches unless one is given.
SAE_SHA256: Final = "0" * 64


# -- feature batches -------------------------------------------------------------------------


def make_feature_batch(
    *,
    activations: ArrayLike | Mapping[int, ArrayLike],
    feature_ids: Sequence[int] | None = None,
    hook: str = DEFAULT_HOOK,
    positions: Sequence[int] | None = None,
    token_ids: Sequence[int] | None = None,
    request_id: str = "req-1",
    sequence: int = 1,
    phase: Phase = Phase.GENERATION,
    labels: Mapping[int, str] | None = None,
    sae_sha256: str = SAE_SHA256,
    attributes: Mapping[str, str] | None = None,
    roles: Sequence[RowRole | int | str] | None = None,
    prompt_complete: bool | None = None,
    residual: ArrayLike | None = None,
    squared_error: ArrayLike | None = None,
) -> FeatureBatch:
    """A :class:`~guard.FeatureBatch` as the engine hands it to ``guard_detect``.

    ``activations`` is one of:

    - a ``[rows, features]`` array or list of rows; column ``j`` is ``feature_ids[j]``
      (``feature_ids`` defaults to ``0 .. features-1``);
    - a list of values, one per row, when ``feature_ids`` names exactly one feature;
    - a mapping of feature id to its column (then ``feature_ids`` is its keys).

    ``positions`` default to ``0 .. rows-1``. ``roles``: each row's :class:`~guard.RowRole`
    (a member, its value or its name such as ``"user"``); default none, as from a host that
    labels no roles. ``prompt_complete``: whether the rows end the request's prompt (None:
    the host does not say). ``residual``: the raw residual rows ``[rows, d_in]`` (for probe
    detectors; default none). ``squared_error``: each row's ``||x - x_hat||^2`` (NaN: not
    measured), making the batch one the guard sampled for its reconstruction error
    (``FeatureBatch.reconstruction``, its NMSE computed over ``residual``, which it needs);
    default none. The arrays are copies marked read-only, as plugins must treat
    them: a batch is shared by every plugin of the guard.

    >>> batch = make_feature_batch(activations={7: [0.25, 0.75], 3: [0.0, 0.5]})
    >>> batch.feature_ids.tolist(), batch.column(7).tolist(), batch.positions.tolist()
    ([7, 3], [0.25, 0.75], [0, 1])
    """
    if isinstance(activations, Mapping):
        if feature_ids is not None:
            raise ValueError("give feature_ids or a mapping of feature id to column, not both")
        feature_ids = [int(f) for f in activations]
        columns = [np.asarray(c, dtype=np.float32).reshape(-1) for c in activations.values()]
        if len({c.shape[0] for c in columns}) > 1:
            raise ValueError(
                "activations: expected columns of one length (one value per row), found "
                f"lengths {[c.shape[0] for c in columns]}"
            )
        values = np.stack(columns, axis=1) if columns else np.zeros((0, 0), np.float32)
    else:
        values = np.array(activations, dtype=np.float32)
        if values.ndim == 1 and feature_ids is not None and len(feature_ids) == 1:
            values = values.reshape(-1, 1)
    if values.ndim != 2:
        raise ValueError(
            "activations: expected a [rows, features] array (or, with one feature id, one "
            f"value per row), found shape {values.shape}"
        )
    n_rows, n_features = values.shape
    ids = np.array(range(n_features) if feature_ids is None else feature_ids, dtype=np.int64)
    if ids.shape != (n_features,):
        raise ValueError(
            f"feature_ids: expected {n_features} ids (one per activations column), found "
            f"{ids.size}"
        )
    if len(set(ids.tolist())) != ids.size or (ids < 0).any():
        raise ValueError(f"feature_ids: expected distinct ids >= 0, found {ids.tolist()}")
    raw = None
    if residual is not None:
        raw = np.array(residual, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[0] != n_rows:
            raise ValueError(f"residual: expected [rows, d_in] with {n_rows} rows, found shape "
                             f"{raw.shape}")
        raw.setflags(write=False)
    batch = frozen_batch(
        request_id=request_id,
        sequence=sequence,
        hook=hook,
        feature_ids=ids,
        activations=values,
        positions=np.arange(n_rows) if positions is None else np.asarray(positions),
        token_ids=None if token_ids is None else np.asarray(token_ids),
        phase=Phase(phase),
        feature_labels={int(k): str(v) for k, v in (labels or {}).items()},
        sae_sha256=sae_sha256,
        attributes=dict(attributes or {}),
        roles=None if roles is None else np.array(
            [ROLE_NAMES[r] if isinstance(r, str) else int(r) for r in roles], dtype=np.int8),
        prompt_complete=prompt_complete,
    )
    reconstruction = None
    if squared_error is not None:
        errors = np.array(squared_error, dtype=np.float64)
        if raw is None or errors.shape != (n_rows,):
            raise ValueError(f"squared_error: expected {n_rows} values (one per row) and the "
                             f"residual rows, found shape {errors.shape}"
                             + ("" if raw is not None else " and no residual"))
        reconstruction = Reconstruction.of(raw, errors)
    if raw is None:
        return batch
    return dataclasses.replace(batch, residual=raw, reconstruction=reconstruction)


def make_decision(
    batch: FeatureBatch | None = None,
    *,
    action: Action = Action.CONTINUE,
    findings: Sequence[Finding] = (),
    edits: Sequence[FeatureEdit] = (),
    steering: Sequence[Steering] = (),
    details: str = "",
    plugins: Mapping[str, str] | None = None,
    plugin_errors: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
) -> Decision:
    """A :class:`~guard.Decision` on ``batch`` (default: one synthetic row), for sink tests.

    The request fields (request id, sequence, hook, positions, phase, SAE revision) come
    from the batch; ``plugins`` maps plugin names to versions.

    >>> make_decision(action=Action.ABORT, details="too risky").action.name
    'ABORT'
    """
    if batch is None:
        batch = make_feature_batch(activations=np.zeros((1, 0)))
    return Decision(
        decision_id=new_decision_id(),
        action=action,
        request_id=batch.request_id,
        sequence=batch.sequence,
        hook=batch.hook,
        positions=batch.positions,
        findings=tuple(findings),
        edits=tuple(edits),
        steering=tuple(steering),
        details=details,
        phase=batch.phase,
        sae_sha256=batch.sae_sha256,
        plugins=tuple(PluginRun(n, v) for n, v in (plugins or {}).items()),
        plugin_errors=tuple(plugin_errors),
        timings=dict(timings or {}),
        timestamp=time.time(),
    )


def steering_delta(
    batch: FeatureBatch, edits: Sequence[FeatureEdit], decoder: ArrayLike
) -> NDArray[np.float32] | None:
    """The residual delta ``[rows, d_in]`` the engine makes of ``edits`` on ``batch``.

    ``decoder`` is the SAE's ``W_dec`` (``[d_sae, d_in]``); the rule for conflicting edits
    is the engine's (``guard.engine.deltas``). None when the edits change nothing.

    >>> batch = make_feature_batch(feature_ids=[1], activations=[2.0])
    >>> edit = FeatureEdit(batch.hook, feature_id=1, kind="pin", value=0.0)
    >>> steering_delta(batch, [edit], [[0.0, 0.0], [1.0, 0.5]]).tolist()
    [[-2.0, -1.0]]
    """
    from guard.engine.deltas import build_delta

    weights = np.asarray(decoder, dtype=np.float32)
    if weights.ndim != 2:
        raise ValueError(f"decoder: expected W_dec as [d_sae, d_in], found shape {weights.shape}")
    return build_delta(batch, edits, lambda ids: weights[list(ids)]).delta


# -- the plugin harness ----------------------------------------------------------------------


class PluginHarness:
    """One plugin in a real plugin manager, called the way the guard calls it.

    ``plugin`` is what an entry point names (a class, instantiated once per
    configuration; or a module or object with ``@hookimpl`` functions), or the name of an
    installed entry point of the ``guard`` group. ``name`` is the plugin's name (the key of
    its ``plugins.config`` block); it defaults to the entry point's name, or else to the
    class, module or type name.

    As in the guard, a plugin is configured, asked for its subscriptions and started before
    it sees a batch: a hook call on a harness that was not configured configures it with an
    empty block (what the guard hands a plugin without one), and ``detect``, ``steer``,
    ``record`` and ``request_ended`` start it first. A batch that lacks a feature the plugin
    subscribed to on the batch's hook is refused (the guard always encodes those). Unlike
    the guard, an exception of the plugin is not isolated but raised from the call, with its
    traceback, so that a test fails where it should.

    >>> from guard import Finding, hookimpl
    >>> class Always:
    ...     @hookimpl
    ...     def guard_detect(self, batch):
    ...         return [Finding("always", 1.0, 0.0)]
    >>> harness = PluginHarness(Always, name="always")
    >>> [f.plugin for f in harness.detect(make_feature_batch(activations=[[0.0]]))]
    ['always']
    >>> harness.close()
    """

    def __init__(
        self,
        plugin: object,
        *,
        name: str | None = None,
        settings: Mapping[str, Any] | None = None,
        version: str = "0+test",
        trace: bool = False,
    ) -> None:
        if isinstance(plugin, str):
            source = _entry_point(plugin)
            plugin, version, name = source.target, source.version, name or source.name
        self.name: str = name or _default_name(plugin)
        self.version = version
        self.trace = trace
        #: The settings of the last :meth:`configure` (an empty mapping before).
        self.settings: Mapping[str, Any] = {}
        self._target = plugin
        self._raised: list[BaseException] = []
        self._configured = False
        self._started = False
        self._subscribed: dict[str, set[int] | None] = {}  # hook -> ids; None: every feature
        self._plugin_set, self._plugin = self._build()
        if settings is not None:
            self.configure(settings)

    @property
    def plugin(self) -> object:
        """The registered plugin object (for a class: the instance of this configuration)."""
        return self._plugin

    @property
    def plugin_set(self) -> PluginSet:
        """The underlying ``guard.engine.plugins.PluginSet``."""
        return self._plugin_set

    def implements(self, hook: str) -> bool:
        """Whether the plugin implements ``hook`` (such as ``"guard_detect"``)."""
        return self._plugin_set.has_hook(hook)

    def _build(self) -> tuple[PluginSet, object]:
        from guard.engine.plugins import PluginFailure, PluginSet, PluginSource

        target = self._target
        instance = target() if inspect.isclass(target) else target
        raised = self._raised

        class KeepingPluginSet(PluginSet):
            # PluginFailure carries only the message; keep the exception to re-raise it.
            def _failed(self, plugin: str, hook: str, exc: BaseException) -> PluginFailure:
                raised.append(exc)
                return super()._failed(plugin, hook, exc)

        plugin_set = KeepingPluginSet([PluginSource(self.name, self.version, instance)],
                                      trace=self.trace)
        return plugin_set, instance

    def _calling(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` and raise the first exception the plugin manager isolated in it."""
        self._raised.clear()
        result = call()
        if self._raised:
            error = self._raised[0]
            self._raised.clear()
            raise error
        return result

    # -- lifecycle ---------------------------------------------------------------------------

    def configure(self, settings: Mapping[str, Any] | None = None) -> None:
        """Hand the plugin its settings, as ``plugins.config.<name>`` would.

        As in a reload, a second call starts from a fresh instance of a class plugin (and
        shuts a started one down first). A :class:`~guard.ConfigError` of the plugin is raised
        with its key under ``plugins.config.<name>.``, as the guard reports it.
        """
        if self._configured:
            self.close()
            self._plugin_set, self._plugin = self._build()
        self._configured = True  # a failed configuration is not retried on this instance
        self.settings = dict(settings or {})
        self._plugin_set.configure({self.name: self.settings})

    def subscriptions(self) -> list[FeatureRequest]:
        """The plugin's feature requests (``guard_subscriptions``)."""
        self._ensure_configured()
        return self._plugin_set.subscriptions({self.name: self.settings})

    def startup(self) -> None:
        """Start the plugin as the guard does: ``guard_subscriptions``, then ``guard_startup``
        (once; ``detect``, ``steer`` and ``record`` call this when needed)."""
        self._ensure_configured()
        if not self._started:
            self._subscribed = {}
            for request in self.subscriptions():
                ids = self._subscribed.setdefault(request.hook, set())
                if request.feature_ids == "all" or ids is None:
                    self._subscribed[request.hook] = None
                else:
                    ids.update(int(f) for f in request.feature_ids)
            self._plugin_set.startup()
            self._started = True

    def shutdown(self) -> None:
        """Call ``guard_shutdown``; raises what the plugin raised."""
        self._started = False
        self._calling(self._plugin_set.shutdown)

    def close(self) -> None:
        """Shut the plugin down if it was started (the fixture does this after a test)."""
        if self._started:
            self.shutdown()

    # -- hook calls --------------------------------------------------------------------------

    def detect(self, batch: FeatureBatch) -> list[Finding]:
        """The plugin's findings on ``batch``, each with ``plugin`` set to its name."""
        self.startup()
        self._check_features(batch)
        findings: list[Finding] = self._calling(lambda: self._plugin_set.detect(batch)[0])
        return findings

    def steer(self, batch: FeatureBatch, findings: Sequence[Finding] = ()) -> list[FeatureEdit]:
        """The plugin's edits on ``batch``, given every plugin's ``findings`` on it.

        :func:`steering_delta` turns edits into the residual delta the guard would send.
        """
        self.startup()
        self._check_features(batch)
        edits: list[FeatureEdit] = self._calling(
            lambda: self._plugin_set.steer(batch, findings)[0]
        )
        return edits

    def record(self, decision: Decision) -> None:
        """Hand ``decision`` to the plugin's ``guard_record`` (see :func:`make_decision`)."""
        self.startup()
        self._calling(lambda: self._plugin_set.record(decision))

    def request_ended(self, request_id: str, reason: RequestEndReason = "finished") -> None:
        """Tell the plugin that a request is over (``guard_request_ended``), as the guard does
        once the host ends it, its stream evicts it, or its stream closes."""
        self.startup()
        self._calling(lambda: self._plugin_set.request_ended(request_id, reason))

    def _ensure_configured(self) -> None:
        if not self._configured:
            self.configure({})

    def _check_features(self, batch: FeatureBatch) -> None:
        wanted = self._subscribed.get(batch.hook)
        missing = sorted(wanted - set(batch.feature_ids.tolist())) if wanted else []
        if missing:
            raise ValueError(
                f"the batch of hook {batch.hook!r} lacks features {missing} that plugin "
                f"{self.name!r} subscribed to (the guard always encodes them): add them to "
                "the batch's feature_ids"
            )


def _entry_point(name: str) -> PluginSource:
    from guard.engine.plugins import discover

    [source] = discover([name], autoload=False, env={})
    return source


def _default_name(plugin: object) -> str:
    name = getattr(plugin, "__name__", None)
    return name if isinstance(name, str) else type(plugin).__name__


# -- pytest fixtures -------------------------------------------------------------------------


class FeatureBatchFactory(Protocol):
    """The type of the ``feature_batch`` fixture (:func:`make_feature_batch`)."""

    def __call__(
        self,
        *,
        activations: ArrayLike | Mapping[int, ArrayLike],
        feature_ids: Sequence[int] | None = ...,
        hook: str = ...,
        positions: Sequence[int] | None = ...,
        token_ids: Sequence[int] | None = ...,
        request_id: str = ...,
        sequence: int = ...,
        phase: Phase = ...,
        labels: Mapping[int, str] | None = ...,
        sae_sha256: str = ...,
        attributes: Mapping[str, str] | None = ...,
    ) -> FeatureBatch: ...


class PluginHarnessFactory(Protocol):
    """The type of the ``guard_plugin_harness`` fixture (arguments of :class:`PluginHarness`)."""

    def __call__(
        self,
        plugin: object,
        *,
        name: str | None = ...,
        settings: Mapping[str, Any] | None = ...,
        version: str = ...,
        trace: bool = ...,
    ) -> PluginHarness: ...


@pytest.fixture
def feature_batch() -> FeatureBatchFactory:
    """Build a :class:`~guard.FeatureBatch`: ``feature_batch(feature_ids=[7], activations=[0.9])``.

    The arguments are those of :func:`guard.testing.make_feature_batch`.
    """
    factory: FeatureBatchFactory = make_feature_batch
    return factory


@pytest.fixture
def guard_plugin_harness() -> Iterator[PluginHarnessFactory]:
    """Load a plugin into a :class:`guard.testing.PluginHarness`; started ones are shut down
    after the test (an exception in ``guard_shutdown`` then fails the test).

    ``guard_plugin_harness(MyDetector, name="my_detector", settings={...})``, or the name of
    an installed entry point: ``guard_plugin_harness("my_detector", settings={...})``.
    """
    harnesses: list[PluginHarness] = []

    def factory(
        plugin: object,
        *,
        name: str | None = None,
        settings: Mapping[str, Any] | None = None,
        version: str = "0+test",
        trace: bool = False,
    ) -> PluginHarness:
        harness = PluginHarness(plugin, name=name, settings=settings, version=version,
                                trace=trace)
        harnesses.append(harness)
        return harness

    yield factory
    for harness in harnesses:
        harness.close()
