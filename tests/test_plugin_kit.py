"""The plugin authors' kit, ``guard.testing``: batches, the harness, recorded batches and the
pytest fixtures."""

from __future__ import annotations

import doctest
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import guard.testing
from guard import (
    Action,
    ConfigError,
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    Phase,
    RequestEndReason,
    hookimpl,
)
from guard.engine.plugins import PluginError, PluginSet
from guard.testing import (
    DEFAULT_HOOK,
    SAE_SHA256,
    BatchRecorder,
    FeatureBatchFactory,
    PluginHarness,
    PluginHarnessFactory,
    load_batches,
    make_decision,
    make_feature_batch,
    save_batches,
    steering_delta,
)
from tests.test_plugin_hooks import install_fake_plugin

# -- make_feature_batch ----------------------------------------------------------------------


def test_a_batch_from_rows_has_the_engines_types_and_defaults() -> None:
    batch = make_feature_batch(activations=[[0.5, 0.0, 1.0], [0.0, 2.0, 0.25]])
    assert batch.feature_ids.dtype == np.int64 and batch.feature_ids.tolist() == [0, 1, 2]
    assert batch.activations.dtype == np.float32 and batch.activations.shape == (2, 3)
    assert batch.positions.dtype == np.int64 and batch.positions.tolist() == [0, 1]
    assert batch.token_ids is None
    assert (batch.hook, batch.request_id, batch.sequence) == (DEFAULT_HOOK, "req-1", 1)
    assert batch.phase is Phase.GENERATION and batch.sae_sha256 == SAE_SHA256
    assert batch.column(1).tolist() == [0.0, 2.0]


def test_a_batch_from_one_column_or_a_mapping_of_columns() -> None:
    column = make_feature_batch(feature_ids=[7], activations=[0.25, 0.75, 1.0])
    assert column.activations.shape == (3, 1) and column.column(7).tolist() == [0.25, 0.75, 1.0]
    mapped = make_feature_batch(activations={12: [1.0, 0.0], 4: [0.5, 0.5]})
    assert mapped.feature_ids.tolist() == [12, 4]
    assert mapped.columns([4, 12]).tolist() == [[0.5, 1.0], [0.5, 0.0]]


def test_a_batch_carries_every_field_given() -> None:
    batch = make_feature_batch(
        feature_ids=[5, 9], activations=np.ones((2, 2)), hook="blocks.2.hook_resid_post",
        positions=[40, 41], token_ids=[101, 102], request_id="r-9", sequence=4,
        phase=Phase.PROMPT, labels={5: "deception"}, sae_sha256="ab" * 32,
        attributes={"tenant": "t1"},
    )
    assert batch.positions.tolist() == [40, 41]
    assert batch.token_ids is not None and batch.token_ids.dtype == np.int64
    assert (batch.request_id, batch.sequence, batch.phase) == ("r-9", 4, Phase.PROMPT)
    assert batch.label(5) == "deception" and batch.label(9) == ""
    assert batch.attributes == {"tenant": "t1"} and batch.sae_sha256 == "ab" * 32


def test_a_batchs_arrays_are_read_only_copies() -> None:
    given = np.zeros((2, 1), dtype=np.float32)
    batch = make_feature_batch(activations=given)
    given[0, 0] = 9.0  # the caller's array stays theirs
    assert batch.activations[0, 0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        batch.activations[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        batch.positions[0] = 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"activations": [[1.0, 2.0]], "feature_ids": [1]}, r"feature_ids: expected 2 ids"),
        ({"activations": [[1.0, 2.0]], "feature_ids": [1, 1]}, r"distinct ids >= 0"),
        ({"activations": [[1.0]], "feature_ids": [-1]}, r"distinct ids >= 0"),
        ({"activations": [1.0, 2.0]}, r"expected a \[rows, features\] array"),
        ({"activations": [1.0, 2.0], "feature_ids": [1, 2]}, r"found shape \(2,\)"),
        ({"activations": np.zeros((1, 1, 1))}, r"found shape \(1, 1, 1\)"),
        ({"activations": [[1.0]], "positions": [0, 1]}, r"positions: expected 1 values"),
        ({"activations": [[1.0]], "token_ids": [7, 8]}, r"token_ids: expected 1 values"),
        ({"activations": {1: [0.0]}, "feature_ids": [1]}, r"not both"),
        ({"activations": {1: [0.0], 2: [0.0, 1.0]}}, r"columns of one length"),
    ],
)
def test_a_bad_batch_is_refused_with_the_argument_named(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_feature_batch(**arguments)


# -- save_batches / load_batches -------------------------------------------------------------


def test_saved_batches_load_back_field_for_field(tmp_path: Path) -> None:
    batches = [
        make_feature_batch(feature_ids=[3, 8], activations=[[0.5, 0.0], [0.0, 1.5]],
                           positions=[10, 11], token_ids=[5, 6], request_id="r-1",
                           sequence=3, phase=Phase.PROMPT, labels={8: "élan ✓"},
                           sae_sha256="cd" * 32, attributes={"k": "v"}),
        make_feature_batch(activations=np.zeros((3, 0))),  # no subscriptions on the hook
    ]
    path = tmp_path / "recorded"  # the exact name: nothing appended
    save_batches(path, batches)
    assert path.exists()

    loaded = load_batches(path)

    assert len(loaded) == 2
    for before, after in zip(batches, loaded, strict=True):
        for name in ("request_id", "sequence", "hook", "phase", "feature_labels",
                     "sae_sha256", "attributes"):
            assert getattr(after, name) == getattr(before, name), name
        for name in ("feature_ids", "activations", "positions"):
            np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
            assert getattr(after, name).dtype == getattr(before, name).dtype
        assert not after.activations.flags.writeable
    assert loaded[0].token_ids is not None and loaded[0].token_ids.tolist() == [5, 6]
    assert loaded[1].token_ids is None


def test_saved_batches_hold_no_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    save_batches(path, [make_feature_batch(activations=[[1.0]], labels={0: "x"})])
    with np.load(path, allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)


def test_load_batches_refuses_other_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a batch file")
    with pytest.raises(ValueError, match=r"notes\.txt: expected an \.npz file"):
        load_batches(text)
    array = tmp_path / "one.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(ValueError, match=r"one\.npy: expected an \.npz file .* found one array"):
        load_batches(array)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz: format: expected "
                                         r"'guard-feature-batches/1', found 'no format key'"):
        load_batches(other)
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, format=np.array("guard-feature-batches/1"), count=np.array(1))
    with pytest.raises(ValueError, match=r"damaged\.npz: damaged feature batch file"):
        load_batches(damaged)


# -- make_decision and steering_delta --------------------------------------------------------


def test_make_decision_takes_the_request_fields_from_the_batch() -> None:
    batch = make_feature_batch(activations=[[1.0], [2.0]], request_id="r-2", sequence=7,
                               positions=[4, 5], phase=Phase.PROMPT)
    finding = Finding("d", 2.0, 1.0, "abort")
    decision = make_decision(batch, action=Action.ABORT, findings=[finding],
                             plugins={"d": "1.0"}, timings={"total": 0.001})
    assert (decision.request_id, decision.sequence, decision.hook) == ("r-2", 7, DEFAULT_HOOK)
    assert decision.positions.tolist() == [4, 5] and decision.phase is Phase.PROMPT
    assert decision.findings == (finding,) and decision.action is Action.ABORT
    assert [(p.name, p.version) for p in decision.plugins] == [("d", "1.0")]
    assert decision.decision_id != make_decision(batch).decision_id
    assert make_decision().action is Action.CONTINUE


def test_steering_delta_follows_the_decoder_directions() -> None:
    decoder = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    batch = make_feature_batch(feature_ids=[0, 1], activations=[[3.0, 1.0], [0.5, 0.0]],
                               positions=[7, 8])
    edits = [
        FeatureEdit(batch.hook, 0, "pin", 1.0),  # adds (1 - a0) * d0
        FeatureEdit(batch.hook, 1, "scale", 3.0, positions=(7,)),  # adds 2 * a1 * d1 on row 7
        FeatureEdit(batch.hook, 2, "nudge", 0.5),  # adds 0.5 * d2; no activation needed
    ]
    delta = steering_delta(batch, edits, decoder)
    assert delta is not None
    np.testing.assert_allclose(delta, [[-2.0, 4.0, 0.5], [0.5, 0.0, 0.5]])
    assert steering_delta(batch, [FeatureEdit(batch.hook, 0, "scale", 1.0)], decoder) is None
    with pytest.raises(ValueError, match=r"decoder: expected W_dec as \[d_sae, d_in\]"):
        steering_delta(batch, edits, [1.0, 2.0])


# -- PluginHarness ---------------------------------------------------------------------------


class Lifecycle:
    """Logs its lifecycle into a shared list; flags feature 7 above its threshold."""

    log: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.threshold = 0.0

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        self.log.append(f"configure {dict(settings)}")
        threshold = settings.get("threshold", 0.5)
        if not isinstance(threshold, float):
            raise ConfigError("threshold", "a number", threshold)
        self.threshold = threshold

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(DEFAULT_HOOK, [7])]

    @hookimpl
    def guard_startup(self) -> None:
        self.log.append("startup")

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        score = float(batch.column(7).max())
        return [Finding("lifecycle", score, self.threshold)] if score > self.threshold else []

    @hookimpl
    def guard_steer(self, batch: FeatureBatch, findings: Sequence[Finding]) -> list[FeatureEdit]:
        return [FeatureEdit(batch.hook, 7, "pin", 0.0)] if findings else []

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        self.log.append(f"record {decision.action.name}")

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        self.log.append(f"ended {request_id} {reason}")

    @hookimpl
    def guard_shutdown(self) -> None:
        self.log.append("shutdown")


@pytest.fixture
def lifecycle() -> list[str]:
    Lifecycle.log = []
    return Lifecycle.log


def test_the_harness_runs_the_lifecycle_in_the_guards_order(lifecycle: list[str]) -> None:
    harness = PluginHarness(Lifecycle)
    assert harness.name == "Lifecycle" and harness.version == "0+test"
    assert lifecycle == []  # nothing before the first call

    findings = harness.detect(make_feature_batch(feature_ids=[7], activations=[0.2, 0.9]))

    assert lifecycle == ["configure {}", "startup"]
    assert [(f.detector, f.plugin) for f in findings] == [("lifecycle", "Lifecycle")]
    assert findings[0].score == pytest.approx(0.9)
    edits = harness.steer(make_feature_batch(feature_ids=[7], activations=[0.9]), findings)
    assert edits == [FeatureEdit(DEFAULT_HOOK, 7, "pin", 0.0, plugin="Lifecycle")]
    harness.record(make_decision(action=Action.STEER))
    harness.close()
    assert lifecycle == ["configure {}", "startup", "record STEER", "shutdown"]
    harness.close()  # once only
    assert lifecycle[-2:] == ["record STEER", "shutdown"]


def test_the_harness_ends_requests_after_starting_the_plugin(lifecycle: list[str]) -> None:
    harness = PluginHarness(Lifecycle)
    harness.request_ended("req-7")
    harness.request_ended("req-8", "evicted")
    harness.close()
    assert lifecycle == ["configure {}", "startup", "ended req-7 finished",
                         "ended req-8 evicted", "shutdown"]


def test_the_harness_raises_what_guard_request_ended_raised() -> None:
    class Leaky:
        @hookimpl
        def guard_request_ended(self, request_id: str) -> None:
            raise KeyError(request_id)

    harness = PluginHarness(Leaky)
    with pytest.raises(KeyError, match="req-1"):
        harness.request_ended("req-1", "aborted")
    harness.close()


def test_the_harness_configures_and_subscribes(lifecycle: list[str]) -> None:
    harness = PluginHarness(Lifecycle, name="life", settings={"threshold": 0.95})
    assert lifecycle == ["configure {'threshold': 0.95}"]
    assert harness.settings == {"threshold": 0.95}
    assert harness.subscriptions() == [FeatureRequest(DEFAULT_HOOK, [7])]
    assert harness.detect(make_feature_batch(feature_ids=[7], activations=[0.9])) == []
    assert harness.implements("guard_detect") and isinstance(harness.plugin, Lifecycle)
    assert isinstance(harness.plugin_set, PluginSet)


def test_a_batch_without_the_subscribed_features_is_refused(lifecycle: list[str]) -> None:
    harness = PluginHarness(Lifecycle, name="life")
    batch = make_feature_batch(feature_ids=[3], activations=[1.0])
    with pytest.raises(ValueError, match=r"^the batch of hook 'blocks\.6\.hook_resid_post' "
                                         r"lacks features \[7\] that plugin 'life' subscribed"):
        harness.detect(batch)
    with pytest.raises(ValueError, match=r"lacks features \[7\]"):
        harness.steer(batch)
    assert lifecycle == ["configure {}", "startup"]  # refused before the plugin saw it


def test_a_config_error_comes_with_the_plugins_key(lifecycle: list[str]) -> None:
    harness = PluginHarness(Lifecycle, name="life")
    with pytest.raises(ConfigError, match=r"^plugins\.config\.life\.threshold: expected a "
                                          r"number, found 'high'$"):
        harness.configure({"threshold": "high"})


def test_a_second_configuration_gets_a_fresh_instance_and_the_old_one_shut_down(
    lifecycle: list[str],
) -> None:
    harness = PluginHarness(Lifecycle, settings={"threshold": 0.1})
    first = harness.plugin
    harness.startup()
    harness.configure({"threshold": 0.2})
    assert harness.plugin is not first
    assert lifecycle == ["configure {'threshold': 0.1}", "startup", "shutdown",
                         "configure {'threshold': 0.2}"]


def test_a_module_or_object_plugin_is_used_as_it_is() -> None:
    module = types.ModuleType("detector_module")

    @hookimpl
    def guard_detect() -> list[Finding]:
        return [Finding("module", 1.0, 0.0)]

    module.guard_detect = guard_detect  # type: ignore[attr-defined]  # a module built here
    harness = PluginHarness(module)
    assert harness.name == "detector_module" and harness.plugin is module
    harness.configure({})
    assert harness.plugin is module
    assert [f.plugin for f in harness.detect(make_feature_batch(activations=[[0.0]]))] == [
        "detector_module"
    ]


class Buggy:
    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        return [Finding("buggy", float(batch.column(99)[0]), 0.0)]  # never subscribed to 99

    @hookimpl
    def guard_steer(self) -> list[object]:
        return ["not an edit"]

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        raise OSError("disk full")

    @hookimpl
    def guard_shutdown(self) -> None:
        raise RuntimeError("cannot flush")


def test_the_harness_raises_what_the_plugin_raised_with_its_traceback() -> None:
    harness = PluginHarness(Buggy)
    batch = make_feature_batch(feature_ids=[7], activations=[1.0])
    with pytest.raises(KeyError, match="feature 99 of hook") as excinfo:
        harness.detect(batch)
    assert any(entry.name == "guard_detect" for entry in excinfo.traceback)
    with pytest.raises(TypeError, match="guard_steer returned str, expected FeatureEdit"):
        harness.steer(batch)
    with pytest.raises(OSError, match="disk full"):
        harness.record(make_decision())
    with pytest.raises(RuntimeError, match="cannot flush"):
        harness.close()


def test_a_misspelled_hook_fails_when_the_harness_is_made() -> None:
    class Typo:
        @hookimpl
        def guard_steeer(self) -> None: ...

    with pytest.raises(PluginError, match=r"guard_steeer.*the hooks are: guard_configure"):
        PluginHarness(Typo)


def test_a_harness_from_an_installed_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_plugin(tmp_path, "kit_probe", version="2.0.1")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_guard_plugin_kit_probe", raising=False)
    try:
        harness = PluginHarness("kit_probe")
        assert (harness.name, harness.version) == ("kit_probe", "2.0.1")
        [finding] = harness.detect(make_feature_batch(activations=[[0.0]]))
        assert finding.plugin == "kit_probe"
        assert PluginHarness("kit_probe", name="renamed").name == "renamed"
    finally:
        sys.modules.pop("fake_guard_plugin_kit_probe", None)
    with pytest.raises(ConfigError, match=r"^plugins\.enabled: .*found 'kit_probe_typo'"):
        PluginHarness("kit_probe_typo")


# -- the fixtures ----------------------------------------------------------------------------


@pytest.fixture
def shut_down_after_the_test(lifecycle: list[str]) -> Iterator[list[str]]:
    """Checks, after ``guard_plugin_harness`` was torn down, that it shut its plugin down."""
    yield lifecycle
    assert lifecycle[-1:] == ["shutdown"]


def test_the_harness_fixture_shuts_started_plugins_down(
    shut_down_after_the_test: list[str], guard_plugin_harness: PluginHarnessFactory
) -> None:
    harness = guard_plugin_harness(Lifecycle, name="life", settings={"threshold": 0.5})
    harness.detect(make_feature_batch(feature_ids=[7], activations=[1.0]))
    unstarted = guard_plugin_harness(Lifecycle, name="idle")  # never started: no shutdown
    assert unstarted.name == "idle"
    assert shut_down_after_the_test == ["configure {'threshold': 0.5}", "startup"]


def test_the_feature_batch_fixture_is_make_feature_batch(
    feature_batch: FeatureBatchFactory,
) -> None:
    assert feature_batch is make_feature_batch
    assert feature_batch(feature_ids=[3], activations=[1.0]).column(3).tolist() == [1.0]


# -- BatchRecorder ---------------------------------------------------------------------------


def test_the_batch_recorder_keeps_its_hooks_batches_and_saves_them(
    tmp_path: Path, guard_plugin_harness: PluginHarnessFactory
) -> None:
    path = tmp_path / "recorded.npz"
    harness = guard_plugin_harness(BatchRecorder, name="recorder", settings={
        "hook": DEFAULT_HOOK, "features": [7], "path": str(path), "max_batches": 2,
    })
    assert harness.subscriptions() == [FeatureRequest(DEFAULT_HOOK, [7])]
    batches = [make_feature_batch(feature_ids=[7], activations=[float(i)], token_ids=[i],
                                  sequence=i) for i in range(1, 4)]
    for batch in [*batches, make_feature_batch(hook="blocks.1.hook_resid_post",
                                               activations=[[1.0]])]:
        assert harness.detect(batch) == []
    recorder = harness.plugin
    assert isinstance(recorder, BatchRecorder)
    assert [b.sequence for b in recorder.batches] == [1, 2] and recorder.skipped == 1
    assert not path.exists()

    harness.shutdown()

    saved = load_batches(path)
    assert [b.column(7).tolist() for b in saved] == [[1.0], [2.0]]
    assert all(b.token_ids is None for b in saved)  # dropped unless asked for


def test_the_batch_recorder_keeps_token_ids_when_asked() -> None:
    harness = PluginHarness(BatchRecorder, settings={"hook": DEFAULT_HOOK, "features": "all",
                                                     "token_ids": True})
    assert harness.subscriptions() == [FeatureRequest(DEFAULT_HOOK, "all")]
    harness.detect(make_feature_batch(activations=[[1.0]], token_ids=[42]))
    recorder = harness.plugin
    assert isinstance(recorder, BatchRecorder)
    assert recorder.batches[0].token_ids is not None
    assert recorder.batches[0].token_ids.tolist() == [42]
    harness.close()  # no path: nothing written


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"features": [1]}, "hook"), ({"hook": DEFAULT_HOOK}, "features"),
     ({"hook": DEFAULT_HOOK, "features": [-1]}, "features"),
     ({"hook": DEFAULT_HOOK, "features": [1], "max_batches": 0}, "max_batches"),
     ({"hook": DEFAULT_HOOK, "features": [1], "path": 3}, "path"),
     ({"hook": DEFAULT_HOOK, "features": [1], "token_ids": "yes"}, "token_ids"),
     ({"hook": DEFAULT_HOOK, "features": [1], "feature": 2}, "feature")],
)
def test_the_batch_recorder_rejects_bad_settings(settings: dict[str, Any], key: str) -> None:
    harness = PluginHarness(BatchRecorder, name="recorder")
    with pytest.raises(ConfigError, match=rf"^plugins\.config\.recorder\.{key}: expected"):
        harness.configure(settings)


# -- the module itself -----------------------------------------------------------------------


def test_the_docstring_examples_run() -> None:
    result = doctest.testmod(guard.testing, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_importing_the_pytest_plugin_leaves_the_plugin_manager_unloaded() -> None:
    """pytest imports guard.testing in every run of the environment: keep it cheap."""
    code = ("import sys, guard.testing; "
            "print(sorted(m for m in ('guard.engine.plugins', 'structlog', 'guard.engine.core') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
