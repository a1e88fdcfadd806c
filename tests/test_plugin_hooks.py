"""Every hook with a real PluginSet: what the guard hands plugins, what it collects, and how
it isolates a plugin that fails; plus discovery through the ``guard`` entry-point group."""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from guard import (
    ConfigError,
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    RequestEndReason,
    hookimpl,
)
from guard.engine.plugins import (
    AUTOLOAD_ENV,
    PluginError,
    PluginFailure,
    PluginSet,
    PluginSource,
    discover,
)
from guard.testing import DEFAULT_HOOK, make_decision, make_feature_batch

HOOK = DEFAULT_HOOK


def plugin_set(*plugins: tuple[str, object], trace: bool = False) -> PluginSet:
    return PluginSet([PluginSource(name, "1.0", p) for name, p in plugins], trace=trace)


def batch() -> FeatureBatch:
    return make_feature_batch(feature_ids=[3, 7], activations=[[0.0, 0.5], [1.0, 2.0]])


class Calls:
    """Records every hook call it gets, in order, with what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.calls.append(("configure", settings))

    @hookimpl
    def guard_subscriptions(self, settings: Mapping[str, Any]) -> list[FeatureRequest]:
        self.calls.append(("subscriptions", settings))
        return [FeatureRequest(HOOK, [int(settings.get("feature", 3))])]

    @hookimpl
    def guard_startup(self) -> None:
        self.calls.append(("startup", None))

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        self.calls.append(("detect", batch))
        return [Finding("calls", float(batch.column(7).max()), 1.0, "log", feature_ids=(7,))]

    @hookimpl
    def guard_steer(self, batch: FeatureBatch, findings: Sequence[Finding]) -> list[FeatureEdit]:
        self.calls.append(("steer", findings))
        return [FeatureEdit(batch.hook, 7, "scale", 0.5)] if findings else []

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        self.calls.append(("record", decision))

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        self.calls.append(("request_ended", (request_id, reason)))

    @hookimpl
    def guard_shutdown(self) -> None:
        self.calls.append(("shutdown", None))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Raising:
    """Raises in every hot-path and sink hook."""

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        raise RuntimeError("detector bug")

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
        raise RuntimeError("steering bug")

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        raise OSError("disk full")

    @hookimpl
    def guard_request_ended(self, request_id: str) -> None:
        raise KeyError(request_id)

    @hookimpl
    def guard_shutdown(self) -> None:
        raise RuntimeError("shutdown bug")


# -- guard_configure -------------------------------------------------------------------------


def test_guard_configure_hands_each_plugin_its_own_block() -> None:
    a, b = Calls(), Calls()
    plugins = plugin_set(("a", a), ("b", b))
    plugins.configure({"a": {"threshold": 2}, "unrelated": {"x": 1}})
    assert a.calls == [("configure", {"threshold": 2})]
    assert b.calls == [("configure", {})]  # no block: an empty mapping


class Strict:
    def __init__(self, key: str = "threshold") -> None:
        self.key = key

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        raise ConfigError(self.key, "a number", settings.get("threshold"))


@pytest.mark.parametrize(
    ("key", "message"),
    [("threshold", "plugins.config.strict.threshold: expected a number, found 'high'"),
     ("", "plugins.config.strict: expected a number, found 'high'")],
)
def test_guard_configure_config_error_is_reported_under_the_plugins_block(
    key: str, message: str
) -> None:
    plugins = plugin_set(("strict", Strict(key)))
    with pytest.raises(ConfigError) as excinfo:
        plugins.configure({"strict": {"threshold": "high"}})
    assert str(excinfo.value) == message
    assert excinfo.value.key == message.split(":")[0]


def test_guard_configure_other_exceptions_name_the_plugin() -> None:
    class Broken:
        @hookimpl
        def guard_configure(self) -> None:
            raise KeyError("threshold")

    with pytest.raises(PluginError, match=r"plugin 'broken' rejected its settings "
                                          r"\(plugins\.config\.broken\): KeyError"):
        plugin_set(("broken", Broken())).configure({})


def test_a_class_plugin_gets_a_fresh_instance_per_plugin_set() -> None:
    seen: list[object] = []

    class Counting:
        @hookimpl
        def guard_configure(self) -> None:
            seen.append(self)

    plugin_set(("counting", Counting)).configure({})
    plugin_set(("counting", Counting)).configure({})
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(isinstance(s, Counting) for s in seen)


def test_a_module_plugin_is_registered_as_it_is() -> None:
    module = types.ModuleType("a_module_plugin")
    found: list[FeatureBatch] = []

    @hookimpl
    def guard_detect(batch: FeatureBatch) -> None:
        found.append(batch)

    module.guard_detect = guard_detect  # type: ignore[attr-defined]  # a module built here
    plugins = plugin_set(("mod", module))
    plugins.detect(the_batch := batch())
    assert found == [the_batch]


# -- guard_subscriptions ---------------------------------------------------------------------


def test_guard_subscriptions_are_collected_with_each_plugins_settings() -> None:
    a, b = Calls(), Calls()
    requests = plugin_set(("a", a), ("b", b)).subscriptions({"b": {"feature": 9}})
    assert requests == [FeatureRequest(HOOK, [3]), FeatureRequest(HOOK, [9])]
    assert b.calls == [("subscriptions", {"feature": 9})]


def test_guard_subscriptions_must_return_feature_requests() -> None:
    class Sloppy:
        @hookimpl
        def guard_subscriptions(self) -> list[tuple[str, list[int]]]:
            return [(HOOK, [1, 2])]

    with pytest.raises(PluginError, match="plugin 'sloppy': guard_subscriptions must return "
                                          "FeatureRequest items, found tuple"):
        plugin_set(("sloppy", Sloppy())).subscriptions({})


def test_guard_subscriptions_raising_is_a_start_up_error() -> None:
    class Raises:
        @hookimpl
        def guard_subscriptions(self) -> None:
            raise ValueError("no hook configured")

    with pytest.raises(PluginError, match="plugin 'raises': guard_subscriptions raised "
                                          "ValueError: no hook configured"):
        plugin_set(("raises", Raises())).subscriptions({})


# -- guard_startup ---------------------------------------------------------------------------


def test_guard_startup_is_called_and_raising_stops_the_start() -> None:
    calls = Calls()
    plugin_set(("calls", calls)).startup()
    assert calls.names() == ["startup"]

    class NoDisk:
        @hookimpl
        def guard_startup(self) -> None:
            raise OSError("read-only file system")

    with pytest.raises(PluginError, match="plugin 'nodisk': guard_startup raised OSError"):
        plugin_set(("nodisk", NoDisk())).startup()


# -- guard_detect ----------------------------------------------------------------------------


def test_guard_detect_collects_every_plugins_findings_in_registration_order() -> None:
    a, b = Calls(), Calls()
    findings, failures = plugin_set(("b", b), ("a", a)).detect(the_batch := batch())
    assert failures == []
    assert [(f.plugin, f.detector, f.score) for f in findings] == [("b", "calls", 2.0),
                                                                   ("a", "calls", 2.0)]
    assert a.calls == [("detect", the_batch)]


def test_guard_detect_isolates_a_raising_plugin() -> None:
    first, last = Calls(), Calls()
    plugins = plugin_set(("first", first), ("raising", Raising()), ("last", last))

    findings, failures = plugins.detect(batch())

    assert [f.plugin for f in findings] == ["first", "last"]  # the others still ran
    assert failures == [PluginFailure("raising", "guard_detect", "RuntimeError: detector bug")]
    plugins.detect(batch())
    assert plugins.failures[("raising", "guard_detect")] == 2  # counted per plugin and hook


def test_guard_detect_a_malformed_result_is_the_plugins_failure() -> None:
    class Sloppy:
        @hookimpl
        def guard_detect(self) -> list[dict[str, float]]:
            return [{"score": 1.0}]

    findings, failures = plugin_set(("sloppy", Sloppy()), ("calls", Calls())).detect(batch())
    assert [f.plugin for f in findings] == ["calls"]
    assert failures == [PluginFailure("sloppy", "guard_detect",
                                      "TypeError: guard_detect returned dict, expected Finding")]


# -- guard_steer -----------------------------------------------------------------------------


def test_guard_steer_gets_every_plugins_findings_and_its_edits_are_collected() -> None:
    steerer = Calls()

    class FewerArguments:  # a plugin may take fewer arguments than the hook offers
        @hookimpl
        def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
            return [FeatureEdit(batch.hook, 3, "nudge", 1.5, positions=(1,))]

    plugins = plugin_set(("steerer", steerer), ("fewer", FewerArguments()))
    found = [Finding("x", 1.0, 0.5, plugin="detector")]

    edits, failures = plugins.steer(batch(), found)

    assert failures == []
    assert steerer.calls == [("steer", tuple(found))]
    assert edits == [FeatureEdit(HOOK, 7, "scale", 0.5, plugin="steerer"),
                     FeatureEdit(HOOK, 3, "nudge", 1.5, positions=(1,), plugin="fewer")]


def test_guard_steer_isolates_a_raising_plugin() -> None:
    plugins = plugin_set(("raising", Raising()), ("steerer", Calls()))
    edits, failures = plugins.steer(batch(), [Finding("x", 1.0, 0.5)])
    assert [e.plugin for e in edits] == ["steerer"]
    assert failures == [PluginFailure("raising", "guard_steer", "RuntimeError: steering bug")]


# -- guard_record ----------------------------------------------------------------------------


def test_guard_record_reaches_every_sink_despite_a_failing_one() -> None:
    before, after = Calls(), Calls()
    plugins = plugin_set(("before", before), ("raising", Raising()), ("after", after))
    decision = make_decision(batch(), findings=[Finding("x", 1.0, 0.5)])

    failures = plugins.record(decision)

    assert before.calls == after.calls == [("record", decision)]
    assert failures == [PluginFailure("raising", "guard_record", "OSError: disk full")]


# -- guard_request_ended ---------------------------------------------------------------------


def test_guard_request_ended_reaches_every_plugin_despite_a_failing_one() -> None:
    before, after = Calls(), Calls()
    plugins = plugin_set(("before", before), ("raising", Raising()), ("after", after))

    failures = plugins.request_ended("req-1", "evicted")

    assert before.calls == after.calls == [("request_ended", ("req-1", "evicted"))]
    assert failures == [PluginFailure("raising", "guard_request_ended", "KeyError: 'req-1'")]
    assert plugins.failures[("raising", "guard_request_ended")] == 1


# -- guard_shutdown --------------------------------------------------------------------------


def test_guard_shutdown_calls_every_plugin_and_never_raises() -> None:
    before, after = Calls(), Calls()
    plugins = plugin_set(("before", before), ("raising", Raising()), ("after", after))
    plugins.shutdown()
    assert before.names() == after.names() == ["shutdown"]
    assert plugins.failures[("raising", "guard_shutdown")] == 1


# -- registration ----------------------------------------------------------------------------


def test_a_misspelled_hook_is_rejected_at_registration_with_the_list_of_hooks() -> None:
    class Typo:
        @hookimpl
        def guard_detcet(self, batch: FeatureBatch) -> None:
            """A typo: without check_pending this plugin would silently never run."""

    with pytest.raises(PluginError, match="guard_detcet") as excinfo:
        plugin_set(("typo", Typo()))
    for hook in PluginSet.hook_names():
        assert hook in str(excinfo.value)


def test_an_argument_the_hook_does_not_have_is_rejected() -> None:
    class Greedy:
        @hookimpl
        def guard_detect(self, batch: FeatureBatch, tokens: list[str]) -> None:
            """``tokens`` is not an argument of guard_detect."""

    with pytest.raises(PluginError, match=r"(?s)^plugin 'greedy'.*\{'tokens'\} are declared"):
        plugin_set(("greedy", Greedy()))


def test_hook_names_are_the_specs() -> None:
    assert PluginSet.hook_names() == [
        "guard_configure", "guard_detect", "guard_idle", "guard_record", "guard_request_ended",
        "guard_shutdown", "guard_startup", "guard_steer", "guard_subscriptions",
    ]


def test_trace_mode_logs_every_hook_call_with_its_duration() -> None:
    plugins = plugin_set(("a", Calls()), ("b", Calls()), trace=True)
    with capture_logs() as logs:
        plugins.detect(batch())
    calls = [e for e in logs if e["event"] == "hook call"]
    assert [(e["hook"], e["plugin"]) for e in calls] == [("guard_detect", "a"),
                                                          ("guard_detect", "b")]
    assert all(e["duration_ms"] >= 0 for e in calls)


# -- discovery through entry points ----------------------------------------------------------


def install_fake_plugin(root: Path, name: str, version: str = "1.2.3") -> Path:
    """Write a module and its ``.dist-info`` (with a ``guard`` entry point) under ``root``:
    with ``root`` on sys.path, importlib.metadata finds it as if pip had installed it."""
    module = f"fake_guard_plugin_{name}"
    (root / f"{module}.py").write_text(textwrap.dedent(f'''
        from guard import Finding, hookimpl

        class Plugin:
            @hookimpl
            def guard_detect(self, batch):
                return [Finding("{name}", 1.0, 0.5)]
    '''))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(f"[guard]\n{name} = {module}:Plugin\n")
    return root


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Two fake installed plugins, ``fake_one`` and ``fake_two``."""
    names = ["fake_one", "fake_two"]
    for name in names:
        install_fake_plugin(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield names
    for name in names:
        sys.modules.pop(f"fake_guard_plugin_{name}", None)


def test_discover_loads_entry_points_of_the_guard_group(fake_plugins: list[str]) -> None:
    sources = {s.name: s for s in discover(env={})}
    assert set(fake_plugins) <= set(sources)
    assert sources["fake_one"].version == "1.2.3"
    assert sources["fake_one"].target.__name__ == "Plugin"
    findings, _ = PluginSet([sources["fake_one"]]).detect(batch())
    assert [(f.plugin, f.detector) for f in findings] == [("fake_one", "fake_one")]


def test_enabled_loads_only_those_plugins(fake_plugins: list[str]) -> None:
    assert [s.name for s in discover(["fake_two"], env={})] == ["fake_two"]


def test_disabled_plugins_never_load(fake_plugins: list[str]) -> None:
    names = [s.name for s in discover(disabled=["fake_one"], env={})]
    assert "fake_two" in names and "fake_one" not in names
    assert discover(["fake_one"], ["fake_one"], env={}) == []


def test_an_enabled_plugin_that_is_not_installed_is_a_config_error(
    fake_plugins: list[str],
) -> None:
    with pytest.raises(ConfigError, match=r"^plugins\.enabled: expected names of installed "
                                          r"plugins \(.*fake_one.*\), found 'fake_thre'"):
        discover(["fake_one", "fake_thre"], env={})


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_the_environment_variable_turns_autoload_off(
    fake_plugins: list[str], value: str
) -> None:
    assert discover(env={AUTOLOAD_ENV: value}) == []
    assert [s.name for s in discover(["fake_one"], env={AUTOLOAD_ENV: value})] == ["fake_one"]


def test_autoload_off_in_the_config_loads_only_enabled(fake_plugins: list[str]) -> None:
    assert discover(autoload=False, env={}) == []
    assert "fake_one" in [s.name for s in discover(env={AUTOLOAD_ENV: "0"})]


class Idle(Calls):
    """Idle on the hot path unless its settings say ``busy: true``."""

    busy = False

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        super().guard_configure(settings)
        self.busy = bool(settings.get("busy"))

    @hookimpl
    def guard_idle(self) -> bool:
        return not self.busy


def test_an_idle_plugin_is_not_called_on_the_hot_path_until_configured_busy() -> None:
    idle, other = Idle(), Calls()
    plugins = plugin_set(("idle", idle), ("other", other))
    plugins.configure({})
    assert plugins.idle == {"idle"}
    assert plugins.hot_plugins() == ["other"]
    findings, failures = plugins.detect(batch())
    plugins.steer(batch(), findings)
    assert not failures
    assert not any(name in ("detect", "steer") for name, _ in idle.calls)
    assert [name for name, _ in other.calls] == ["configure", "detect", "steer"]
    plugins.record(make_decision())  # its other hooks still run
    assert idle.calls[-1][0] == "record"
    plugins.configure({"idle": {"busy": True}})  # a reload that gives it work
    assert plugins.idle == frozenset()
    plugins.detect(batch())
    assert idle.calls[-1][0] == "detect"


def test_guard_idle_must_answer_a_bool_and_raising_is_a_start_up_error() -> None:
    class Bad:
        @hookimpl
        def guard_idle(self) -> Any:
            return "yes"

    class Raises:
        @hookimpl
        def guard_idle(self) -> bool:
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="'bad': guard_idle must return True, False or None"):
        plugin_set(("bad", Bad())).configure({})
    with pytest.raises(PluginError, match="'raises': guard_idle raised RuntimeError"):
        plugin_set(("raises", Raises())).configure({})


def test_the_first_party_plugins_are_idle_without_configuration() -> None:
    from guard_plugins.detectors import Detectors
    from guard_plugins.steering import SteeringPlugin
    from guard_plugins.verify import ShadowVerify

    plugins = plugin_set(("detectors", Detectors), ("steering", SteeringPlugin),
                         ("verify", ShadowVerify))
    plugins.configure({})
    assert plugins.idle == {"detectors", "steering", "verify"}
    assert plugins.hot_plugins() == []
