"""The first-party decision log sink, through a real PluginSet."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from guard import (
    Action,
    ConfigError,
    Decision,
    FeatureEdit,
    Finding,
    Phase,
    PluginRun,
)
from guard.engine.plugins import PluginError, PluginSet, PluginSource
from guard_plugins.decision_log import DecisionLog

HOOK = "blocks.6.hook_resid_post"


def sink(settings: Mapping[str, Any]) -> PluginSet:
    plugins = PluginSet([PluginSource("decision_log", "test", DecisionLog)])
    plugins.configure({"decision_log": settings})
    plugins.startup()
    return plugins


def decision(decision_id: str = "d-1", **changes: Any) -> Decision:
    fields: dict[str, Any] = {
        "decision_id": decision_id, "action": Action.ABORT, "request_id": "req-1",
        "sequence": 3, "hook": HOOK, "positions": np.array([4, 5, 6], dtype=np.int64),
        "findings": (
            Finding(detector="jailbreak", score=3.5, threshold=2.5, action="abort",
                    feature_ids=(12, 40), feature_activations=(3.5, 2.75),
                    feature_labels=("deception", ""), positions=(5,), message="over",
                    plugin="detectors"),
            Finding(detector="plugin-error:broken", score=float("nan"),
                    threshold=float("inf"), message="guard_detect: boom", plugin="broken"),
        ),
        "edits": (FeatureEdit(HOOK, 12, "pin", 0.0, (5,), plugin="steering"),
                  FeatureEdit(HOOK, 7, "nudge", -float("inf"), None, plugin="steering")),
        "details": "detector jailbreak fired",
        "phase": Phase.GENERATION,
        "sae_sha256": "ab" * 32,
        "plugins": (PluginRun("detectors", "0.1.0"), PluginRun("decision_log", "0.1.0")),
        "plugin_errors": ("broken",),
        "timings": {"decode": 0.0001, "encode": 0.0025, "detect": float("nan")},
        "timestamp": 1_700_000_000.25,
    }
    fields.update(changes)
    return Decision(**fields)


def strict_lines(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines, refusing the NaN/Infinity tokens that json.dumps would write."""
    def refuse(token: str) -> None:
        raise ValueError(f"invalid JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "folder" / "decisions.jsonl"


def test_one_json_line_per_decision_with_every_field(log_path: Path) -> None:
    plugins = sink({"path": str(log_path)})
    assert plugins.record(decision("d-1")) == []
    assert plugins.record(decision("d-2", action=Action.CONTINUE, findings=(), edits=())) == []
    plugins.shutdown()

    first, second = strict_lines(log_path.read_text())
    assert first == {
        "decision_id": "d-1",
        "timestamp": "2023-11-14T22:13:20.250000Z",
        "request_id": "req-1",
        "sequence": 3,
        "hook": HOOK,
        "phase": "generation",
        "action": "abort",
        "details": "detector jailbreak fired",
        "positions": [4, 5, 6],
        "findings": [
            {"detector": "jailbreak", "score": 3.5, "threshold": 2.5, "action": "abort",
             "feature_ids": [12, 40], "feature_activations": [3.5, 2.75],
             "feature_labels": ["deception", ""], "positions": [5], "message": "over",
             "plugin": "detectors"},
            {"detector": "plugin-error:broken", "score": None, "threshold": None,
             "action": "flag", "feature_ids": [], "feature_activations": [],
             "feature_labels": [], "positions": [], "message": "guard_detect: boom",
             "plugin": "broken"},
        ],
        "edits": [
            {"hook": HOOK, "feature": 12, "kind": "pin", "value": 0.0, "positions": [5],
             "plugin": "steering"},
            {"hook": HOOK, "feature": 7, "kind": "nudge", "value": None, "positions": None,
             "plugin": "steering"},
        ],
        "plugins": [{"name": "detectors", "version": "0.1.0"},
                    {"name": "decision_log", "version": "0.1.0"}],
        "plugin_errors": ["broken"],
        "sae_sha256": "ab" * 32,
        "out_of_distribution": False,
        "timings_ms": {"decode": 0.1, "encode": 2.5, "detect": None},
        "event": "decision",
    }
    assert (second["decision_id"], second["action"], second["findings"]) == ("d-2", "continue",
                                                                              [])


def test_the_end_of_a_request_is_a_line_of_ids_reason_and_time(log_path: Path) -> None:
    plugins = sink({"path": str(log_path), "include_token_ids": True})
    plugins.record(decision("d-1"))
    before = datetime.datetime.now(datetime.UTC)
    assert plugins.request_ended("req-1", "preempted") == []
    # read while the file is open: the line is flushed as it is written
    decision_line, end = strict_lines(log_path.read_text())
    assert decision_line["event"] == "decision"
    assert end.keys() == {"event", "timestamp", "request_id", "reason"}
    assert (end["event"], end["request_id"], end["reason"]) == (
        "request ended", "req-1", "preempted")
    written = datetime.datetime.fromisoformat(end["timestamp"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(seconds=1) <= written <= datetime.datetime.now(
        datetime.UTC)
    plugins.shutdown()


def test_a_closed_stream_writes_no_end_lines(log_path: Path) -> None:
    """A host that never sends RequestEnded keeps the log it had: one line per decision."""
    plugins = sink({"path": str(log_path)})
    plugins.record(decision("d-1"))
    assert plugins.request_ended("req-1", "stream_closed") == []
    assert [line["event"] for line in strict_lines(log_path.read_text())] == ["decision"]
    plugins.shutdown()


def test_the_end_record_is_json_ready_and_holds_nothing_of_the_request() -> None:
    assert DecisionLog.end_record("req-9", "stream_closed", 1_700_000_000.25) == {
        "timestamp": "2023-11-14T22:13:20.250000Z", "request_id": "req-9",
        "reason": "stream_closed"}


def test_each_record_is_flushed_before_guard_record_returns(log_path: Path) -> None:
    plugins = sink({"path": str(log_path)})
    plugins.record(decision("d-1"))
    # read through another handle while the sink still holds its file open
    assert [r["decision_id"] for r in strict_lines(log_path.read_text())] == ["d-1"]
    plugins.shutdown()


def test_the_file_is_appended_across_configurations(log_path: Path) -> None:
    for decision_id in ("d-1", "d-2"):
        plugins = sink({"path": str(log_path)})  # a reload makes a fresh instance
        plugins.record(decision(decision_id))
        plugins.shutdown()
    assert [r["decision_id"] for r in strict_lines(log_path.read_text())] == ["d-1", "d-2"]


def test_shutdown_closes_the_file(log_path: Path) -> None:
    plugin = DecisionLog()
    plugin.guard_configure({"path": str(log_path)})
    plugin.guard_startup()
    file = plugin._file
    assert file is not None
    plugin.guard_shutdown()
    assert file.closed


def test_stdout_is_the_default_and_never_closed(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = sink({})
    plugins.record(decision("d-1"))
    plugins.shutdown()
    print("still open")
    out = capsys.readouterr().out.splitlines()
    assert [r["decision_id"] for r in strict_lines(out[0])] == ["d-1"]
    assert out[1] == "still open"


def test_positions_can_be_left_out(log_path: Path) -> None:
    plugins = sink({"path": str(log_path), "include_positions": False})
    plugins.record(decision())
    plugins.shutdown()
    text = log_path.read_text()
    assert '"positions"' not in text
    assert strict_lines(text)[0]["findings"][0]["feature_ids"] == [12, 40]


def test_feature_activations_can_be_masked(log_path: Path) -> None:
    plugins = sink({"path": str(log_path), "mask_feature_activations": True})
    plugins.record(decision())
    plugins.shutdown()
    finding = strict_lines(log_path.read_text())[0]["findings"][0]
    assert "feature_activations" not in finding
    assert finding["feature_ids"] == [12, 40]


def test_no_token_ids_by_default(log_path: Path) -> None:
    plugins = sink({"path": str(log_path)})
    plugins.record(replace(decision(), token_ids=np.array([101, 102, 103])))
    plugins.shutdown()
    assert "token_ids" not in strict_lines(log_path.read_text())[0]


def test_token_ids_are_written_when_enabled(log_path: Path) -> None:
    plugins = sink({"path": str(log_path), "include_token_ids": True})
    plugins.record(replace(decision(), token_ids=np.array([101, 102, 103])))
    plugins.shutdown()
    assert strict_lines(log_path.read_text())[0]["token_ids"] == [101, 102, 103]


@pytest.fixture
def quiet_structlog() -> Iterator[None]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("quiet_structlog")
def test_the_guards_log_level_never_drops_a_record(log_path: Path) -> None:
    plugins = sink({"path": str(log_path)})
    plugins.record(decision())
    plugins.shutdown()
    assert len(strict_lines(log_path.read_text())) == 1


def test_an_unwritable_path_fails_at_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PluginError, match="guard_startup raised"):
        sink({"path": str(blocker / "decisions.jsonl")})


BAD_SETTINGS: list[tuple[Any, str]] = [
    ({"bogus": 1}, "bogus"),
    ({"path": ""}, "path"),
    ({"path": 5}, "path"),
    ({"path": "."}, "path"),
    ({"include_positions": "yes"}, "include_positions"),
    ({"include_token_ids": 1}, "include_token_ids"),
    ({"mask_feature_activations": None}, "mask_feature_activations"),
    (["path"], ""),
]


@pytest.mark.parametrize(("settings", "key"), BAD_SETTINGS)
def test_every_config_error_names_its_key(settings: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sink(settings)
    expected = f"plugins.config.decision_log.{key}" if key else "plugins.config.decision_log"
    assert caught.value.key == expected
