"""The decision engine with real plugins in a real PluginSet: isolation, budgets, records,
steering against hand-computed decoder directions, subscriptions and reload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from guard import ConfigError, FeatureBatch, FeatureEdit, FeatureRequest, Finding, hookimpl
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action, ActivationRows, Decision, Phase, Segment
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import GuardError
from guard.telemetry.instruments import DECISION_ID
from guard.telemetry.setup import add_trace_context
from tests.conftest import D_IN, D_SAE, HOOK
from tests.sae_fixtures import random_standard_weights


def _config(sae_dir: Path, **plugins: Any) -> GuardConfig:
    return GuardConfig(
        server=ServerConfig(listen="unix:///tmp/unused.sock"),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=sae_dir),),
        plugins=PluginsConfig(autoload=False, **plugins),
    )


def _rows(n: int = 3, seed: int = 0) -> ActivationRows:
    rows = np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)
    return ActivationRows("req-1", 1, HOOK, rows, np.arange(n, dtype=np.int64), None,
                          Phase.GENERATION)


def _encode(x: np.ndarray, feature_ids: Sequence[int]) -> np.ndarray:
    """SAELens standard SAE: relu((x - b_dec) @ W_enc + b_enc), in float64."""
    w = random_standard_weights(D_IN, D_SAE, seed=0)
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return np.maximum(pre, 0.0)[:, list(feature_ids)]


class Subscriber:
    def __init__(self, features: Sequence[int] | str = (3, 9)) -> None:
        self.features = features

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        ids: Any = self.features
        return [FeatureRequest(HOOK, ids)]


class Flagger(Subscriber):
    """Flags every batch, with the max of feature 3."""

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        return [Finding("flagger", float(batch.column(3).max()), 0.0, "flag",
                        feature_ids=(3,))]


class Raiser:
    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        raise RuntimeError("detector bug")


class Sleeper:
    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        self.release.wait(10)


class Sink:
    def __init__(self) -> None:
        self.records: list[Decision] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.shut = False

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.records.append(decision)

    @hookimpl
    def guard_shutdown(self) -> None:
        self.shut = True


def _engine(sae_dir: Path, *plugins: tuple[str, object], **config: Any) -> Engine:
    sources = [PluginSource(name, "1.0", plugin) for name, plugin in plugins]
    return Engine.load(_config(sae_dir, **config), extra_plugins=sources)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close(timeout=5)


def test_no_plugins_no_encode(sae_dir: Path, engines: list[Engine]) -> None:
    engine = _engine(sae_dir)
    engines.append(engine)
    assert engine.hook(HOOK).encoder is None
    decision = engine.inspect(_rows(), {})
    assert decision.action == Action.CONTINUE
    assert decision.findings == ()


def test_subscriptions_build_a_subset_encoder(sae_dir: Path, engines: list[Engine]) -> None:
    engine = _engine(sae_dir, ("a", Subscriber((9, 3))), ("b", Subscriber((5,))),
                     ("c", Flagger((3,))))
    engines.append(engine)
    runtime = engine.hook(HOOK)
    assert runtime.subscription.feature_ids == (3, 5, 9)
    assert runtime.feature_ids.tolist() == [3, 5, 9]
    rows = _rows()
    decision = engine.inspect(rows, {})
    (finding,) = decision.findings
    expected = _encode(rows.rows, [3]).max()
    assert finding.score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert finding.plugin == "c"
    assert [(p.name, p.version) for p in decision.plugins] == [("a", "1.0"), ("b", "1.0"),
                                                                 ("c", "1.0")]
    assert decision.sae_sha256 == runtime.info.sha256


def test_subscribing_to_all_features(sae_dir: Path, engines: list[Engine]) -> None:
    engine = _engine(sae_dir, ("all", Subscriber("all")))
    engines.append(engine)
    assert engine.hook(HOOK).subscription.all_features
    assert engine.hook(HOOK).feature_ids.shape == (D_SAE,)


def test_subscription_to_an_unknown_hook_fails_start(sae_dir: Path) -> None:
    class Lost:
        @hookimpl
        def guard_subscriptions(self) -> list[FeatureRequest]:
            return [FeatureRequest("blocks.99.hook_resid_post", [1])]

    with pytest.raises(ConfigError, match=r"blocks\.99\.hook_resid_post"):
        _engine(sae_dir, ("lost", Lost()))


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_raising_plugin_is_isolated(sae_dir: Path, engines: list[Engine], mode: str) -> None:
    # A generous budget: the first error log renders a rich traceback, which can take over
    # the default 100 ms on a cold process, and an overrun is not what this test is about.
    engine = _engine(sae_dir, ("raiser", Raiser()), ("flagger", Flagger()), failure_mode=mode,
                     timeout_ms=10_000)
    engines.append(engine)
    decision = engine.inspect(_rows(), {})
    assert decision.plugin_errors == ("raiser",)
    assert engine.counters["plugin_failures"] == 1
    assert engine.plugin_set.failures[("raiser", "guard_detect")] == 1
    if mode == "open":
        assert decision.action == Action.CONTINUE
        detectors = {f.detector for f in decision.findings}
        assert detectors == {"flagger", "plugin-error:raiser"}  # the other plugin still ran
        error = next(f for f in decision.findings if f.detector == "plugin-error:raiser")
        # The type only: the message could quote the batch (telemetry.record_sensitive).
        assert "guard_detect: RuntimeError (message withheld" in error.message
        assert "detector bug" not in error.message
    else:
        assert decision.action == Action.ABORT
        assert "plugin raiser failed in guard_detect: RuntimeError (message withheld" in (
            decision.details)
        assert "detector bug" not in decision.details


def test_a_hanging_plugin_overruns_its_budget(sae_dir: Path, engines: list[Engine]) -> None:
    sleeper = Sleeper()
    engine = _engine(sae_dir, ("sleeper", sleeper), ("flagger", Flagger()), timeout_ms=50)
    engines.append(engine)
    try:
        started = time.monotonic()
        first = engine.inspect(_rows(), {})
        assert time.monotonic() - started < 5
        assert first.action == Action.CONTINUE
        assert first.plugin_errors == ("sleeper",)
        assert any("overran the plugin budget of 50 ms" in f.message for f in first.findings)
        assert engine.counters["plugin_timeouts"] == 1
        # While its call is still running, later batches skip it (counted as a failure)
        # and the other plugins still run.
        second = engine.inspect(_rows(), {})
        assert second.plugin_errors == ("sleeper",)
        assert {f.detector for f in second.findings} == {"flagger", "plugin-error:sleeper"}
    finally:
        sleeper.release.set()
    deadline = time.monotonic() + 5
    while engine.plugin_calls_stuck() and time.monotonic() < deadline:
        time.sleep(0.01)
    sleeper.release.set()
    third = engine.inspect(_rows(), {})
    assert third.plugin_errors == ()


def test_full_record_queue_drops_new_records_and_counts(
    sae_dir: Path, engines: list[Engine]
) -> None:
    sink = Sink()
    sink.gate.clear()
    engine = _engine(sae_dir, ("sink", sink), record_queue_size=2)
    decisions = [engine.inspect(_rows(), {})]
    assert sink.entered.wait(5)  # the sink thread now holds the first record
    decisions += [engine.inspect(_rows(), {}) for _ in range(5)]
    # One record is held by the blocked sink, two wait in the queue, the rest were dropped.
    assert engine.records.dropped == 3
    sink.gate.set()
    engine.close(timeout=5)
    assert [d.decision_id for d in sink.records] == [d.decision_id for d in decisions[:3]]
    assert sink.shut


def test_close_delivers_every_accepted_record(sae_dir: Path) -> None:
    sink = Sink()
    engine = _engine(sae_dir, ("sink", sink))
    ids = [engine.inspect(_rows(), {}).decision_id for _ in range(50)]
    engine.close(timeout=5)
    assert [d.decision_id for d in sink.records] == ids
    assert engine.records.dropped == 0


class Pinner(Subscriber):
    def __init__(self, kind: str, value: float, feature: int = 3) -> None:
        super().__init__((feature,))
        self.kind, self.value, self.feature = kind, value, feature

    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> list[FeatureEdit]:
        return [FeatureEdit(HOOK, self.feature, self.kind, self.value)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "value"), [("pin", 0.0), ("pin", 4.0), ("nudge", -2.5),
                                             ("scale", 0.5)])
def test_steering_delta_matches_decoder_directions(
    sae_dir: Path, engines: list[Engine], kind: str, value: float
) -> None:
    engine = _engine(sae_dir, ("pinner", Pinner(kind, value)))
    engines.append(engine)
    rows = _rows(n=4, seed=3)
    decision = engine.inspect(rows, {})
    a = _encode(rows.rows, [3])[:, 0]
    w_dec = random_standard_weights(D_IN, D_SAE, seed=0)["W_dec"].astype(np.float64)
    coefficient = {"pin": value - a, "nudge": np.full(4, value), "scale": (value - 1) * a}[kind]
    expected = coefficient[:, None] * w_dec[3][None, :]
    if not np.any(coefficient):
        assert decision.action == Action.CONTINUE
        return
    assert decision.action == Action.STEER
    (steering,) = decision.steering
    assert steering.hook == HOOK
    np.testing.assert_allclose(steering.delta, expected, rtol=1e-4, atol=1e-5)


def test_abort_wins_and_names_the_detector(sae_dir: Path, engines: list[Engine]) -> None:
    class Aborter(Subscriber):
        @hookimpl
        def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
            return [Finding("harm", 7.5, 2.0, "abort", feature_ids=(3,), message="too much")]

    engine = _engine(sae_dir, ("pinner", Pinner("nudge", 1.0)), ("aborter", Aborter()))
    engines.append(engine)
    decision = engine.inspect(_rows(), {})
    assert decision.action == Action.ABORT
    assert decision.steering == ()
    assert decision.details == ("detector harm fired: score 7.5 >= threshold 2 on features 3: "
                                "too much")


class Configurable:
    def __init__(self) -> None:
        self.threshold = -1.0

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        value = settings.get("threshold", 0.0)
        if not isinstance(value, int | float):
            raise ConfigError("threshold", "a number", value)
        self.threshold = float(value)

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        return [Finding("configured", 0.0, self.threshold, "log")]


def test_configure_errors_name_the_plugin_key(sae_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.config\.conf\.threshold: expected a number"):
        _engine(sae_dir, ("conf", Configurable), config={"conf": {"threshold": "high"}})


def test_reload_swaps_plugins_and_rejects_bad_config(
    sae_dir: Path, engines: list[Engine]
) -> None:
    sink = Sink()
    engine = _engine(sae_dir, ("conf", Configurable), ("sink", sink),
                     config={"conf": {"threshold": 1.0}})
    engines.append(engine)
    assert engine.inspect(_rows(), {}).findings[0].threshold == 1.0
    engine.reload(_config(sae_dir, config={"conf": {"threshold": 2.0}}))
    assert engine.inspect(_rows(), {}).findings[0].threshold == 2.0  # a fresh instance
    with pytest.raises(ConfigError, match=r"plugins\.config\.conf\.threshold"):
        engine.reload(_config(sae_dir, config={"conf": {"threshold": "x"}}))
    assert engine.inspect(_rows(), {}).findings[0].threshold == 2.0  # old one in force
    assert engine.counters["reloads"] == 1
    assert engine.counters["reloads_rejected"] == 1


def test_an_abort_found_before_a_hang_is_kept(sae_dir: Path, engines: list[Engine]) -> None:
    class Aborter(Subscriber):
        @hookimpl(tryfirst=True)
        def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
            return [Finding("harm", 9.0, 1.0, "abort")]

    sleeper = Sleeper()
    engine = _engine(sae_dir, ("sleeper", sleeper), ("aborter", Aborter()), timeout_ms=50)
    engines.append(engine)
    try:
        decision = engine.inspect(_rows(), {})
    finally:
        sleeper.release.set()
    assert decision.action == Action.ABORT
    assert "detector harm fired" in decision.details
    assert decision.plugin_errors == ("sleeper",)


def test_a_failed_start_shuts_down_the_plugins_it_built(sae_dir: Path) -> None:
    sink = Sink()

    class Broken:
        @hookimpl
        def guard_startup(self) -> None:
            raise OSError("cannot open the model registry")

    with pytest.raises(GuardError, match="guard_startup raised OSError"):
        _engine(sae_dir, ("sink", sink), ("broken", Broken()))
    assert sink.shut


def test_a_subscription_out_of_range_names_the_plugin(sae_dir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"plugins\.config\.wide: expected feature ids of "
                                          rf"hook {HOOK} in \[0, {D_SAE}\), found {D_SAE}"):
        _engine(sae_dir, ("wide", Subscriber((1, D_SAE))))


def test_unmarked_hooks_and_wrappers_are_refused(sae_dir: Path) -> None:
    class Unmarked:
        def guard_detect(self, batch: FeatureBatch) -> None:
            return None

    class Wrapper:
        @hookimpl(wrapper=True)
        def guard_detect(self, batch: FeatureBatch) -> Any:
            return (yield)

    with pytest.raises(GuardError, match=r"guard_detect is not marked with @guard\.hookimpl"):
        _engine(sae_dir, ("unmarked", Unmarked()))
    with pytest.raises(GuardError, match="guard_detect is a hook wrapper"):
        _engine(sae_dir, ("wrapper", Wrapper()))


def test_decision_timings_are_a_snapshot(sae_dir: Path, engines: list[Engine]) -> None:
    engine = _engine(sae_dir, ("flagger", Flagger()), ("sink", Sink()))
    engines.append(engine)
    timings: dict[str, float] = {"decode": 0.001}
    decision = engine.inspect(_rows(), timings, time.perf_counter())
    timings["late"] = 1.0
    assert set(decision.timings) == {"decode", "encode", "detect", "steer", "total"}


# -- engine steps: one hand-off to the plugin worker per batch ------------------------------


def _step(n: int, seed: int = 1) -> ActivationRows:
    """A batch of ``n`` one-row requests ``req-0`` .. ``req-{n-1}``, as an engine step."""
    rows = np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)
    segments = tuple(Segment(f"req-{i}", i, i + 1, Phase.GENERATION) for i in range(n))
    return ActivationRows("", 1, HOOK, rows, np.arange(n, dtype=np.int64), None,
                          Phase.GENERATION, segments=segments)


def _count_submissions(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per job handed to the engine's plugin worker."""
    submitted: list[int] = []
    submit = engine._executor.submit

    def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        submitted.append(1)
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(engine._executor, "submit", counting)
    return submitted


class Witness(Subscriber):
    """Logs each request it sees and notes the decision id set while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, str] = {}

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        self.seen[batch.request_id] = DECISION_ID.get()
        structlog.get_logger("witness").info("witness saw", request_id=batch.request_id)
        return [Finding("witness", 1.0, 0.0, "flag")]


class HangsOn(Subscriber):
    """Hangs on one request until released; flags every other one."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.release = threading.Event()
        self.calls: list[str] = []

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        self.calls.append(batch.request_id)
        if batch.request_id == self.request_id:
            self.release.wait(10)
        return [Finding("hangs-on", 1.0, 0.0, "flag")]


def _without_ids(decision: Decision) -> tuple[Any, ...]:
    return (decision.request_id, decision.action, decision.details, decision.plugin_errors,
            [(f.detector, f.score, f.action) for f in decision.findings])


def test_a_step_makes_one_hand_off_and_the_decisions_of_each_request_alone(
    sae_dir: Path, engines: list[Engine], monkeypatch: pytest.MonkeyPatch,
) -> None:
    witness = Witness()
    engine = _engine(sae_dir, ("flagger", Flagger()), ("witness", witness), ("sink", Sink()))
    engines.append(engine)
    submitted = _count_submissions(engine, monkeypatch)
    batch = _step(8)
    with capture_logs(processors=[add_trace_context]) as logs:
        step = engine.inspect_step(batch, {})
    seen_in_step = dict(witness.seen)
    assert len(submitted) == 1
    assert [d.request_id for d in step.decisions] == [f"req-{i}" for i in range(8)]
    # Each request decided as its rows alone are (one hand-off each).
    alone = [engine.inspect(batch.request(s), {}) for s in batch.segments]
    assert len(submitted) == 1 + 8
    assert [_without_ids(d) for d in step.decisions] == [_without_ids(d) for d in alone]
    assert all(set(d.timings) >= {"encode", "detect", "steer", "total"}
               for d in step.decisions)
    # Each request's plugin calls ran with its own decision id, in its log lines too.
    ids = {d.request_id: d.decision_id for d in step.decisions}
    assert len(set(ids.values())) == 8
    assert seen_in_step == ids
    logged = {e["request_id"]: e["decision_id"] for e in logs if e["event"] == "witness saw"}
    assert logged == ids


def test_each_request_of_a_step_has_the_whole_budget_from_its_own_start(
    sae_dir: Path, engines: list[Engine],
) -> None:
    class Slow(Subscriber):
        @hookimpl
        def guard_detect(self, batch: FeatureBatch) -> None:
            time.sleep(0.15)  # three of them overrun one budget together, none alone

    engine = _engine(sae_dir, ("slow", Slow()), ("flagger", Flagger()), timeout_ms=400)
    engines.append(engine)
    step = engine.inspect_step(_step(3), {})
    assert [d.plugin_errors for d in step.decisions] == [(), (), ()]
    assert engine.counters["plugin_timeouts"] == 0
    assert all({f.detector for f in d.findings} == {"flagger"} for d in step.decisions)


def test_a_plugin_hanging_on_one_request_of_a_step_costs_only_that_request(
    sae_dir: Path, engines: list[Engine], monkeypatch: pytest.MonkeyPatch,
) -> None:
    hangs = HangsOn("req-2")
    engine = _engine(sae_dir, ("hangs", hangs), ("flagger", Flagger()), timeout_ms=200)
    engines.append(engine)
    submitted = _count_submissions(engine, monkeypatch)
    try:
        started = time.monotonic()
        with capture_logs(processors=[add_trace_context]) as logs:
            step = engine.inspect_step(_step(5), {})
        assert time.monotonic() - started < 5  # not behind the hung call
        before, (hung,), after = step.decisions[:2], step.decisions[2:3], step.decisions[3:]
        for decision in before:  # decided normally, every plugin's findings
            assert decision.plugin_errors == ()
            assert {f.detector for f in decision.findings} == {"hangs-on", "flagger"}
        assert hung.request_id == "req-2"
        assert hung.plugin_errors == ("hangs",)
        assert any("overran the plugin budget of 200 ms" in f.message for f in hung.findings)
        assert engine.counters["plugin_timeouts"] == 1
        (overran,) = [e for e in logs if e["event"] == "plugin overran its budget"]
        assert (overran["plugin"], overran["request_id"], overran["decision_id"]) == (
            "hangs", "req-2", hung.decision_id)
        for decision in after:  # run on a fresh hand-off, the stuck plugin skipped
            assert decision.plugin_errors == ("hangs",)
            assert {f.detector for f in decision.findings} == {"flagger", "plugin-error:hangs"}
            assert "skipped" in next(f.message for f in decision.findings
                                     if f.detector == "plugin-error:hangs")
        assert len(submitted) == 2
    finally:
        hangs.release.set()
    deadline = time.monotonic() + 5
    while engine.plugin_calls_stuck() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.plugin_calls_stuck()  # unstuck once the hung call returned
    # The abandoned job stopped after the hung request: no request ran twice.
    assert hangs.calls == ["req-0", "req-1", "req-2"]
    again = engine.inspect_step(_step(2), {})
    assert [d.plugin_errors for d in again.decisions] == [(), ()]


def test_without_a_budget_a_step_runs_its_plugins_on_the_calling_thread(
    sae_dir: Path, engines: list[Engine], monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[str] = []

    class Where(Subscriber):
        @hookimpl
        def guard_detect(self, batch: FeatureBatch) -> None:
            threads.append(threading.current_thread().name)

    engine = _engine(sae_dir, ("where", Where()), timeout_ms=0)
    engines.append(engine)
    submitted = _count_submissions(engine, monkeypatch)
    engine.inspect_step(_step(3), {})
    engine.inspect(_rows(), {})
    assert submitted == []
    assert threads == [threading.current_thread().name] * 4


@pytest.mark.parametrize("timeout_ms", [0, 1000])
def test_an_error_of_the_guard_in_a_step_plugin_run_is_raised(
    sae_dir: Path, engines: list[Engine], monkeypatch: pytest.MonkeyPatch, timeout_ms: int,
) -> None:
    engine = _engine(sae_dir, ("flagger", Flagger()), timeout_ms=timeout_ms)
    engines.append(engine)

    def broken(*_args: Any) -> Any:
        raise RuntimeError("engine bug")  # not a plugin's failure: the batch fails

    monkeypatch.setattr(engine.plugin_set, "detect", broken)
    with pytest.raises(RuntimeError, match="engine bug"):
        engine.inspect_step(_step(3), {})
    with pytest.raises(RuntimeError, match="engine bug"):
        engine.inspect(_rows(), {})
