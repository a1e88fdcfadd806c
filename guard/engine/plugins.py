"""Plugin discovery and the one facade the engine calls plugins through.

Plugins come from the ``guard`` entry-point group, first-party and third-party alike. An
entry point may name a class (instantiated once per configuration, so a reload starts from a
fresh instance) or a module or object with ``@hookimpl`` functions. The engine never touches
``pm.hook``: it calls the typed methods of :class:`PluginSet`, which call each plugin on its
own so that one failing plugin is logged and counted while the others still run.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import pluggy
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from guard import hookspecs
from guard.decision import (
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    RequestEndReason,
)
from guard.errors import ConfigError, GuardError
from guard.telemetry.instruments import Instruments

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP: Final = "guard"
#: Hooks called per batch: each call gets a span (when the batch is traced) and a latency.
OBSERVED_HOOKS: Final = frozenset({"guard_detect", "guard_steer", "guard_record"})
#: Set to 1 to load only the plugins named in ``plugins.enabled``.
AUTOLOAD_ENV: Final = "GUARD_DISABLE_PLUGIN_AUTOLOAD"


class PluginError(GuardError):
    """A plugin could not be loaded or registered (bad entry point, unknown hook)."""


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin comes from: a name, a version, and the object or class to register."""

    name: str
    version: str
    target: Any


@dataclass
class CallProgress:
    """Which plugin a batch's plugin run is in (read when the run overruns its budget)."""

    skip: frozenset[str] = frozenset()
    current: str = ""
    #: Results collected so far, kept when the run overruns (an abort found before a hang
    #: must not be lost).
    findings: list[Finding] = field(default_factory=list)
    edits: list[FeatureEdit] = field(default_factory=list)
    #: (plugin, hook, seconds) of the calls made, when metrics are on: the engine records
    #: them once the batch is answered (a measurement costs the host microseconds).
    durations: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that raised (or overran its budget) on a hook call."""

    plugin: str
    hook: str
    error: str
    #: The exception raised, when there was one (None for an overrun or a skip).
    exception: BaseException | None = field(default=None, compare=False, repr=False)


def discover(
    enabled: Sequence[str] = (),
    disabled: Sequence[str] = (),
    *,
    autoload: bool = True,
    env: Mapping[str, str] | None = None,
) -> list[PluginSource]:
    """Plugins of the ``guard`` entry-point group, filtered by the enable/disable lists.

    With autoload off (``plugins.autoload: false`` or ``GUARD_DISABLE_PLUGIN_AUTOLOAD=1``)
    only the plugins named in ``enabled`` load. A name in ``enabled`` with no entry point is
    an error (a typo must not silently run the guard without a detector).
    """
    environment = os.environ if env is None else env
    if environment.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes"):
        autoload = False
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point)
    missing = [name for name in enabled if name not in found]
    if missing:
        raise ConfigError(
            "plugins.enabled",
            f"names of installed plugins ({', '.join(sorted(found)) or 'none installed'})",
            missing[0],
        )
    names = [n for n in sorted(found) if (autoload and not enabled) or n in enabled]
    sources = []
    for name in names:
        if name in disabled:
            continue
        entry_point = found[name]
        try:
            target = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {name!r}: cannot load entry point {entry_point.value!r}: {exc}"
            ) from exc
        version = entry_point.dist.version if entry_point.dist is not None else "unknown"
        sources.append(PluginSource(name, version, target))
    return sources


def _check_markers(name: str, plugin: object) -> None:
    """A ``guard_*`` attribute without ``@hookimpl`` would be silently ignored: refuse it."""
    for attribute in dir(plugin):
        if not attribute.startswith("guard_"):
            continue
        function = getattr(plugin, attribute, None)
        if callable(function) and not hasattr(function, f"{hookspecs.PROJECT}_impl"):
            raise PluginError(
                f"plugin {name!r}: {attribute} is not marked with @guard.hookimpl, so it "
                "would never be called; add the marker (or rename it)"
            )


class PluginSet:
    """A configured set of plugin instances, called hook by hook with fault isolation.

    Thread-safe for ``detect``/``steer`` (called from many stream threads) as long as the
    plugins are; counters are guarded by a lock.
    """

    def __init__(self, sources: Iterable[PluginSource], *, trace: bool = False,
                 instruments: Instruments | None = None) -> None:
        self._instruments = instruments if instruments is not None else Instruments()
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._versions: dict[str, str] = {}
        self.trace = trace
        for source in sources:
            plugin = source.target() if inspect.isclass(source.target) else source.target
            _check_markers(source.name, plugin)
            try:
                self._pm.register(plugin, name=source.name)
            except ValueError as exc:
                raise PluginError(f"plugin {source.name!r}: {exc}") from exc
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {source.name!r}: {exc}") from exc
            self._versions[source.name] = source.version
        try:
            self._pm.check_pending()  # a misspelled hook fails at start-up, not silently
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"{exc}; the hooks are: {', '.join(self.hook_names())}"
            ) from exc
        for hook in self.hook_names():
            for impl in self._impls(hook):
                if impl.wrapper or impl.hookwrapper:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}: {hook} is a hook wrapper; guard calls "
                        "each plugin on its own, so wrappers are not supported"
                    )
        self._lock = threading.Lock()
        self.failures: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def hook_names() -> list[str]:
        return sorted(n for n in dir(hookspecs) if n.startswith("guard_"))

    @property
    def plugins(self) -> dict[str, str]:
        """Plugin name -> version, in registration order."""
        return dict(self._versions)

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook)
        # tryfirst plugins first and trylast ones last (as pluggy does); otherwise in
        # registration order, which is deterministic (discovery sorts by name).
        return sorted(caller.get_hookimpls(),
                      key=lambda impl: 0 if impl.tryfirst else 2 if impl.trylast else 1)

    def _traced(self, hook: str, plugin: str, started: float) -> None:
        if self.trace:
            log.info("hook call", hook=hook, plugin=plugin,
                     duration_ms=round((time.perf_counter() - started) * 1e3, 3))

    def _call(
        self, hook: str, kwargs: Mapping[str, Any],
        on_result: Callable[[str, Any], None] | None = None,
        progress: CallProgress | None = None,
    ) -> list[PluginFailure]:
        failures = []
        instruments = self._instruments if hook in OBSERVED_HOOKS else None
        for impl in self._impls(hook):
            if progress is not None:
                if impl.plugin_name in progress.skip:
                    failures.append(PluginFailure(
                        impl.plugin_name, hook,
                        "skipped: still running a call that overran its budget"))
                    continue
                progress.current = impl.plugin_name
            args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            span = token = None
            if instruments is not None:
                span = instruments.plugin_span(hook, impl.plugin_name,
                                               self._versions.get(impl.plugin_name, ""))
                if span is not None:  # current, so that the plugin's own spans nest in it
                    token = otel_context.attach(trace.set_span_in_context(span))
            started = time.perf_counter()
            try:
                result = impl.function(**args)
            except Exception as exc:
                if span is not None:
                    if instruments is not None and instruments.record_sensitive:
                        span.record_exception(exc)
                    else:  # a plugin's message could quote the rows it was given
                        span.add_event("exception", {
                            "exception.type": type(exc).__qualname__,
                            "exception.message": "withheld (telemetry.record_sensitive)"})
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                failures.append(self._failed(impl.plugin_name, hook, exc))
                continue
            finally:
                if instruments is not None:
                    if instruments.metering:
                        elapsed = time.perf_counter() - started
                        if progress is not None:
                            progress.durations.append((impl.plugin_name, hook, elapsed))
                        else:
                            instruments.plugin_called(impl.plugin_name, hook, elapsed)
                    if token is not None:
                        otel_context.detach(token)
                    if span is not None:
                        span.end()
                self._traced(hook, impl.plugin_name, started)
            if on_result is not None and result is not None:
                on_result(impl.plugin_name, result)
        return failures

    def _failed(self, plugin: str, hook: str, exc: BaseException) -> PluginFailure:
        with self._lock:
            self.failures[(plugin, hook)] += 1
        self._instruments.plugin_failed(plugin, hook)
        log.error("plugin failed", plugin=plugin, hook=hook, error=type(exc).__name__,
                  reason=str(exc), exc_info=exc)
        return PluginFailure(plugin, hook, f"{type(exc).__name__}: {exc}", exc)

    # -- lifecycle ----------------------------------------------------------------------

    def configure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        """Hand each plugin its block; a ConfigError names ``plugins.config.<name>.<key>``."""
        for impl in self._impls("guard_configure"):
            name = impl.plugin_name
            settings = config.get(name, {})
            started = time.perf_counter()
            try:
                impl.function(**({"settings": settings} if "settings" in impl.argnames else {}))
            except ConfigError as exc:
                raise ConfigError(
                    f"plugins.config.{name}.{exc.key}" if exc.key else f"plugins.config.{name}",
                    exc.expected, exc.found, source=exc.source,
                ) from exc
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} rejected its settings (plugins.config.{name}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._traced("guard_configure", name, started)

    def subscriptions(self, config: Mapping[str, Mapping[str, Any]]) -> list[FeatureRequest]:
        """Every plugin's feature requests; a raising plugin is a start-up error."""
        return [request for _plugin, request in self.named_subscriptions(config)]

    def named_subscriptions(
        self, config: Mapping[str, Mapping[str, Any]]
    ) -> list[tuple[str, FeatureRequest]]:
        """Every plugin's feature requests, as (plugin, request); raising fails start-up."""
        requests: list[tuple[str, FeatureRequest]] = []
        for impl in self._impls("guard_subscriptions"):
            name = impl.plugin_name
            settings = config.get(name, {})
            started = time.perf_counter()
            try:
                result: Any = impl.function(
                    **({"settings": settings} if "settings" in impl.argnames else {})
                )
            except GuardError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r}: guard_subscriptions raised {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._traced("guard_subscriptions", name, started)
            for request in result or ():
                if not isinstance(request, FeatureRequest):
                    raise PluginError(
                        f"plugin {name!r}: guard_subscriptions must return FeatureRequest "
                        f"items, found {type(request).__name__}"
                    )
                requests.append((name, request))
        return requests

    def startup(self) -> None:
        for impl in self._impls("guard_startup"):
            started = time.perf_counter()
            try:
                impl.function()
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: guard_startup raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._traced("guard_startup", impl.plugin_name, started)

    def shutdown(self) -> None:
        """Call every guard_shutdown; failures are logged, never raised."""
        self._call("guard_shutdown", {})

    # -- hot path -----------------------------------------------------------------------

    def detect(
        self, batch: FeatureBatch, progress: CallProgress | None = None
    ) -> tuple[list[Finding], list[PluginFailure]]:
        findings: list[Finding] = []

        def collect(plugin: str, result: Any) -> None:
            for finding in result:
                if not isinstance(finding, Finding):
                    raise TypeError(f"guard_detect returned {type(finding).__name__}, "
                                    "expected Finding")
                findings.append(replace(finding, plugin=plugin))
                if progress is not None:
                    progress.findings.append(findings[-1])

        failures = self._call_collecting("guard_detect", {"batch": batch}, collect, progress)
        return findings, failures

    def steer(
        self, batch: FeatureBatch, findings: Sequence[Finding],
        progress: CallProgress | None = None,
    ) -> tuple[list[FeatureEdit], list[PluginFailure]]:
        edits: list[FeatureEdit] = []

        def collect(plugin: str, result: Any) -> None:
            for edit in result:
                if not isinstance(edit, FeatureEdit):
                    raise TypeError(f"guard_steer returned {type(edit).__name__}, "
                                    "expected FeatureEdit")
                edits.append(replace(edit, plugin=plugin))
                if progress is not None:
                    progress.edits.append(edits[-1])

        failures = self._call_collecting(
            "guard_steer", {"batch": batch, "findings": tuple(findings)}, collect, progress
        )
        return edits, failures

    def _call_collecting(
        self, hook: str, kwargs: Mapping[str, Any], collect: Callable[[str, Any], None],
        progress: CallProgress | None,
    ) -> list[PluginFailure]:
        failures: list[PluginFailure] = []

        def checked(plugin: str, result: Any) -> None:
            try:
                collect(plugin, result)
            except Exception as exc:  # a malformed result counts as the plugin's failure
                failures.append(self._failed(plugin, hook, exc))

        failures.extend(self._call(hook, kwargs, checked, progress))
        return failures

    def record(self, decision: Decision) -> list[PluginFailure]:
        """Hand a decision to every sink (called from the sink thread only)."""
        return self._call("guard_record", {"decision": decision})

    def request_ended(self, request_id: str, reason: RequestEndReason) -> list[PluginFailure]:
        """Tell every plugin that a request is over (called from the sink thread only); a
        plugin that raises is logged and counted, the others still hear of it."""
        return self._call("guard_request_ended", {"request_id": request_id, "reason": reason})

    def has_hook(self, hook: str) -> bool:
        return bool(self._impls(hook))
