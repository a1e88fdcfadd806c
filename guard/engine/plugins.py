"""Plugin discovery and the one facade the engine calls plugins through.

Plugins come from the ``guard`` entry-point group, first-party and third-party alike. An
entry point may name a class (instantiated once per configuration, so a reload starts from a
fresh instance) or a module or object with ``@hookimpl`` functions. The engine never touches
``pm.hook``: it calls the typed methods of :class:`PluginSet`, which call each plugin on its
own so that one failing plugin is logged and counted while the others still run.

On the hot path (``guard_detect``, ``guard_steer``) every call goes through a
:class:`PluginGate`: a plugin with ``plugins.max_stuck_calls`` calls still running past their
budget is skipped (a failure, counted) instead of taking another worker, and a request that
the engine stopped waiting for calls no further plugin. A plugin's exception message (which
can quote the token ids or text it was given) reaches replies, logs and records only with
``telemetry.record_sensitive``; otherwise they carry its type.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import threading
import time
import traceback
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

#: A plugin's failures on one hook that are all logged; after them, every
#: LOG_FAILURES_EVERY-th is (each one is counted in ``guard.plugin.errors``).
LOG_FIRST_FAILURES = 10
LOG_FAILURES_EVERY = 1000

ENTRY_POINT_GROUP: Final = "guard"
#: Hooks called per batch: each call gets a span (when the batch is traced) and a latency.
OBSERVED_HOOKS: Final = frozenset({"guard_detect", "guard_steer", "guard_record"})
#: The per-batch hooks a plugin's ``guard_idle`` turns off.
_HOT_HOOKS: Final = frozenset({"guard_detect", "guard_steer"})
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


#: Why a hot-path call of a plugin was not made (``guard.plugin.skip_reason``): the plugin
#: had ``plugins.max_stuck_calls`` calls stuck past their budget, or the request's budget ran
#: out before its turn (no plugin worker free, or the plugins before it took the budget).
SKIP_STUCK: Final = "stuck"
SKIP_BUDGET: Final = "budget"
#: What a stuck plugin's skipped calls report (tests and dashboards match on it).
STUCK_MESSAGE: Final = "skipped: still running a call that overran its budget"
_WITHHELD: Final = "message withheld: telemetry.record_sensitive is off"


@dataclass
class CallProgress:
    """Where one request's plugin pass is (the engine reads it when the pass overruns its
    budget), and the results it collected so far.

    ``current`` and ``hook``, ``abandoned`` and ``stuck`` change under the gate's lock only.
    """

    #: Admits each hot-path call (None: every call is made, as for a harness).
    gate: PluginGate | None = None
    #: ``plugins.max_stuck_calls`` of the pipeline the pass runs in.
    max_stuck: int = 1
    #: Whether the pass runs on a plugin worker (counted against the gate's ``max_running``).
    pooled: bool = False
    #: The plugin being called now, and in which hook ("" between calls).
    current: str = ""
    hook: str = ""
    #: The plugins called so far (the others were not run when the budget ran out).
    called: set[str] = field(default_factory=set)
    #: The engine stopped waiting: no further plugin is called, the running call's result
    #: is discarded.
    abandoned: bool = False
    #: The running call is counted as stuck in the gate (it overran its budget).
    stuck: bool = False
    #: Results collected so far, kept when the run overruns (an abort found before a hang
    #: must not be lost).
    findings: list[Finding] = field(default_factory=list)
    edits: list[FeatureEdit] = field(default_factory=list)
    #: (plugin, hook, seconds) of the calls made, when metrics are on: the engine records
    #: them once the batch is answered (a measurement costs the host microseconds).
    durations: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that raised (or overran its budget) on a hook call.

    ``error`` is the whole message, the exception's text included: what replies, logs and
    decision records show is :attr:`reported`.
    """

    plugin: str
    hook: str
    error: str
    #: The exception raised, when there was one (None for an overrun or a skip).
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    #: What goes out when the exception's text must not (without
    #: ``telemetry.record_sensitive``): its type; empty when ``error`` may go out as it is.
    redacted: str = field(default="", compare=False, repr=False)

    @property
    def reported(self) -> str:
        """The failure as replies, logs and decision records show it."""
        return self.redacted or self.error


class MalformedResult(TypeError):
    """A hook returned something other than what it promises (a guard-made message that
    names types only, so it is shown whatever ``telemetry.record_sensitive`` says)."""


class PluginGate:
    """Which hot-path plugin calls are made, guard-wide (across reloads, by plugin name).

    Counts each plugin's calls in progress on the plugin workers (``running``) and those of
    them that the engine stopped waiting for (``stuck``: past their budget). A call is skipped
    when its plugin has ``max_stuck_calls`` calls stuck, or ``max_running`` calls running on
    the workers (the pool's size: only calls that are already stuck can bring a plugin
    there), so a plugin that blocks holds a bounded number of threads and never the pool.
    Thread-safe: one lock, held for the counts only.
    """

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self._stuck: Counter[str] = Counter()
        #: Calls skipped since the plugin last had no call stuck (for the log lines).
        self._skipped: Counter[str] = Counter()

    def stuck(self) -> dict[str, int]:
        """Plugin name -> its calls running past their budget now."""
        with self._lock:
            return {name: count for name, count in self._stuck.items() if count}

    def enter(self, progress: CallProgress, plugin: str, hook: str) -> str | None:
        """Admit a call of ``plugin`` in ``hook`` for the pass ``progress``: None when made,
        else why not (:data:`SKIP_STUCK`; ``""`` when the pass was abandoned: stop)."""
        with self._lock:
            if progress.abandoned:
                return ""
            if self._stuck[plugin] >= progress.max_stuck or (
                    progress.pooled and self._running[plugin] >= self.max_running):
                self._skipped[plugin] += 1
                first = self._skipped[plugin] == 1
                stuck = self._stuck[plugin]
            else:
                if progress.pooled:
                    self._running[plugin] += 1
                progress.current, progress.hook = plugin, hook
                progress.called.add(plugin)
                return None
        if first:  # once per episode: a stuck plugin is skipped by every batch
            log.warning("plugin skipped while stuck", plugin=plugin, stuck_calls=stuck,
                        max_stuck_calls=progress.max_stuck)
        return SKIP_STUCK

    def leave(self, progress: CallProgress) -> bool:
        """The call admitted by :meth:`enter` returned: whether its result is still wanted
        (False once the pass was abandoned: the engine answered without it)."""
        with self._lock:
            plugin = progress.current
            if progress.pooled:
                self._running[plugin] -= 1
                if self._running[plugin] <= 0:
                    del self._running[plugin]
            back = skipped = 0
            if progress.stuck:
                progress.stuck = False
                self._stuck[plugin] -= 1
                if self._stuck[plugin] <= 0:
                    del self._stuck[plugin]
                    back, skipped = 1, self._skipped.pop(plugin, 0)
            progress.current = progress.hook = ""
            wanted = not progress.abandoned
        if back:
            log.info("stuck plugin returned", plugin=plugin, skipped_calls=skipped)
        return wanted

    def abandon(self, progress: CallProgress) -> tuple[str, str]:
        """The engine stops waiting for the pass ``progress``: (plugin, hook) of the call
        running now, counted as stuck until it returns; ("", "") between calls."""
        with self._lock:
            progress.abandoned = True
            plugin, hook = progress.current, progress.hook
            if plugin and not progress.stuck:
                progress.stuck = True
                self._stuck[plugin] += 1
            return plugin, hook


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
        #: Plugins that said (``guard_idle``) they have nothing to do on the hot path.
        self.idle: frozenset[str] = frozenset()
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

    def hot_plugins(self) -> list[str]:
        """The plugins called on the hot path (``guard_detect`` or ``guard_steer``), in order."""
        names = [impl.plugin_name for hook in ("guard_detect", "guard_steer")
                 for impl in self._impls(hook)]
        return list(dict.fromkeys(names))

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook)
        # tryfirst plugins first and trylast ones last (as pluggy does); otherwise in
        # registration order, which is deterministic (discovery sorts by name).
        impls = sorted(caller.get_hookimpls(),
                       key=lambda impl: 0 if impl.tryfirst else 2 if impl.trylast else 1)
        if self.idle and hook in _HOT_HOOKS:
            return [impl for impl in impls if impl.plugin_name not in self.idle]
        return impls

    def _traced(self, hook: str, plugin: str, started: float) -> None:
        if self.trace:
            log.info("hook call", hook=hook, plugin=plugin,
                     duration_ms=round((time.perf_counter() - started) * 1e3, 3))

    def _call(
        self, hook: str, kwargs: Mapping[str, Any],
        on_result: Callable[[str, Any], None] | None = None,
        progress: CallProgress | None = None, only: str | None = None,
    ) -> list[PluginFailure]:
        failures = []
        instruments = self._instruments if hook in OBSERVED_HOOKS else None
        gate = progress.gate if progress is not None else None
        for impl in self._impls(hook):
            if only is not None and impl.plugin_name != only:
                continue  # one sink's call, on that sink's record thread
            if gate is not None and progress is not None:
                refused = gate.enter(progress, impl.plugin_name, hook)
                if refused == "":
                    break  # the engine answered without this request's remaining calls
                if refused is not None:
                    failures.append(PluginFailure(impl.plugin_name, hook, STUCK_MESSAGE))
                    self._instruments.plugin_skipped(impl.plugin_name, refused)
                    continue
            args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
            span = token = None
            if instruments is not None:
                span = instruments.plugin_span(hook, impl.plugin_name,
                                               self._versions.get(impl.plugin_name, ""))
                if span is not None:  # current, so that the plugin's own spans nest in it
                    token = otel_context.attach(trace.set_span_in_context(span))
            started = time.perf_counter()
            raised = left = False
            wanted = True
            try:
                result = impl.function(**args)
            except BaseException as exc:  # SystemExit too: the plugin failed, the guard goes on
                if isinstance(exc, KeyboardInterrupt) and (
                        threading.current_thread() is threading.main_thread()):
                    if gate is not None and progress is not None:
                        gate.leave(progress)
                    raise  # Ctrl-C in an in-process caller's main thread: not the plugin's
                if span is not None:
                    if instruments is not None and instruments.record_sensitive:
                        span.record_exception(exc)
                    else:  # a plugin's message could quote the rows it was given
                        span.add_event("exception", {
                            "exception.type": type(exc).__qualname__,
                            "exception.message": "withheld (telemetry.record_sensitive)"})
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raised = left = True
                if gate is not None and progress is not None:
                    wanted = gate.leave(progress)
                if wanted:  # logged in the plugin's span
                    failures.append(self._failed(impl.plugin_name, hook, exc))
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
            if not left and gate is not None and progress is not None:
                wanted = gate.leave(progress)
            if not wanted:
                break  # a late return: the request was answered without it, nothing applies
            if raised:
                continue
            if on_result is not None and result is not None:
                on_result(impl.plugin_name, result)
        return failures

    def _failed(self, plugin: str, hook: str, exc: BaseException) -> PluginFailure:
        with self._lock:
            self.failures[(plugin, hook)] += 1
            count = self.failures[(plugin, hook)]
        self._instruments.plugin_failed(plugin, hook)
        # A plugin that fails on every call (a sink on a full disk) must not flood the log:
        # its first failures are logged, then every LOG_FAILURES_EVERY-th, with the count
        # (the metric guard.plugin.errors counts each one).
        logged = count <= LOG_FIRST_FAILURES or count % LOG_FAILURES_EVERY == 0
        # A malformed result reads as the TypeError it is (its message names types only).
        kind = "TypeError" if isinstance(exc, MalformedResult) else type(exc).__name__
        error = f"{kind}: {exc}"
        if self._instruments.record_sensitive or isinstance(exc, MalformedResult):
            if logged:
                log.error("plugin failed", plugin=plugin, hook=hook, error=kind,
                          reason=str(exc), failures=count, exc_info=exc)
            return PluginFailure(plugin, hook, error, exc)
        # The message could quote what the plugin was given (token ids, prompt text): the
        # type and where it was raised go out, not the text.
        redacted = f"{type(exc).__name__} ({_WITHHELD})"
        if logged:
            log.error("plugin failed", plugin=plugin, hook=hook, error=type(exc).__name__,
                      reason=_WITHHELD, failures=count, traceback=redacted_traceback(exc))
        return PluginFailure(plugin, hook, error, exc, redacted)

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
            except (Exception, SystemExit) as exc:
                raise PluginError(
                    f"plugin {name!r} rejected its settings (plugins.config.{name}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._traced("guard_configure", name, started)
        self.idle = self._ask_idle()

    def _ask_idle(self) -> frozenset[str]:
        """The plugins whose ``guard_idle`` says they have nothing to do on the hot path."""
        idle = set()
        for impl in self._impls("guard_idle"):
            started = time.perf_counter()
            try:
                answer = impl.function()
            except (Exception, SystemExit) as exc:
                raise PluginError(f"plugin {impl.plugin_name!r}: guard_idle raised "
                                  f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._traced("guard_idle", impl.plugin_name, started)
            if answer is not None and not isinstance(answer, bool):
                raise PluginError(f"plugin {impl.plugin_name!r}: guard_idle must return True, "
                                  f"False or None, found {type(answer).__name__}")
            if answer:
                idle.add(impl.plugin_name)
        if idle:
            log.info("plugins idle on the hot path", plugins=sorted(idle))
        return frozenset(idle)

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
            except (Exception, SystemExit) as exc:
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
            except (Exception, SystemExit) as exc:
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
                    raise MalformedResult(f"guard_detect returned {type(finding).__name__}, "
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
                    raise MalformedResult(f"guard_steer returned {type(edit).__name__}, "
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

    def sinks(self, hook: str) -> list[str]:
        """The plugins implementing ``hook`` (``guard_record``, ``guard_request_ended``), in
        call order: each gets its own record queue and thread."""
        return [impl.plugin_name for impl in self._impls(hook)]

    def record(self, decision: Decision, plugin: str | None = None) -> list[PluginFailure]:
        """Hand a decision to every sink, or only to ``plugin`` (called from the record
        threads only: one per sink)."""
        return self._call("guard_record", {"decision": decision}, only=plugin)

    def request_ended(self, request_id: str, reason: RequestEndReason,
                      plugin: str | None = None) -> list[PluginFailure]:
        """Tell every plugin, or only ``plugin``, that a request is over (called from the
        record threads only); a plugin that raises is logged and counted, the others still
        hear of it."""
        return self._call("guard_request_ended", {"request_id": request_id, "reason": reason},
                          only=plugin)

    def has_hook(self, hook: str) -> bool:
        return bool(self._impls(hook))


def redacted_traceback(exc: BaseException) -> str:
    """Where ``exc`` was raised (the frames of its traceback: files, lines, code) and its
    type, without its message or the exceptions chained to it (their text could quote
    data)."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return (f"Traceback (most recent call last):\n{frames}"
            f"{type(exc).__module__}.{type(exc).__qualname__} ({_WITHHELD})")
