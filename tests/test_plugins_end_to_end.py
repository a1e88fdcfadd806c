"""The first-party plugins end to end: entry points, a real engine and a real gRPC stream.

One scenario runs once per module: an SAE built so that chosen rows fire chosen features,
four batches on one stream (quiet, abort, flag + steer, log only), then ``server.stop()``.
Each test checks one part of what came back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from guard.config import PluginsConfig, SaeConfig
from guard.engine.core import Engine
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from tests.conftest import HOOK, StreamClient, make_batch, make_config
from tests.sae_fixtures import write_saelens

D_IN, D_SAE = 16, 64
#: Feature -> the input coordinate that alone drives it (no other feature reads 0..4).
STOP, WATCH, QUIET, PINNED, NUDGED = 3, 17, 29, 40, 51
DRIVER = {STOP: 0, WATCH: 1, QUIET: 2, PINNED: 3}
B_ENC = -0.1


def sae_weights() -> dict[str, NDArray[np.float32]]:
    rng = np.random.default_rng(11)
    w_enc = rng.normal(0.0, 0.25, size=(D_IN, D_SAE)).astype(np.float32)
    w_enc[: len(DRIVER)] = 0.0
    for feature, coordinate in DRIVER.items():
        w_enc[:, feature] = 0.0
        w_enc[coordinate, feature] = 1.0
    return {
        "W_enc": w_enc,
        "b_enc": np.full(D_SAE, B_ENC, dtype=np.float32),
        # independent of W_enc, so that a decoder mix-up cannot pass
        "W_dec": rng.normal(0.0, 0.3, size=(D_SAE, D_IN)).astype(np.float32),
        "b_dec": rng.normal(0.0, 0.1, size=D_IN).astype(np.float32),
    }


WEIGHTS = sae_weights()


def encode_by_hand(rows: NDArray[np.float32]) -> NDArray[np.float32]:
    """A standard SAELens SAE with apply_b_dec_to_input: relu((x - b_dec) @ W_enc + b_enc)."""
    pre = (rows - WEIGHTS["b_dec"]) @ WEIGHTS["W_enc"] + WEIGHTS["b_enc"]
    return np.maximum(pre, 0.0).astype(np.float32)


def rows(n: int, seed: int, drive: Mapping[int, Mapping[int, float]] | None = None
         ) -> NDArray[np.float32]:
    """``n`` background rows (no chosen feature active); ``drive[row][feature] = strength``."""
    x = np.tile(WEIGHTS["b_dec"], (n, 1))
    x[:, len(DRIVER):] += np.random.default_rng(seed).normal(size=(n, D_IN - len(DRIVER)))
    for row, features in (drive or {}).items():
        for feature, strength in features.items():
            x[row, DRIVER[feature]] += strength
    return x.astype(np.float32)


PLUGIN_SETTINGS: dict[str, dict[str, Any]] = {
    "detectors": {
        "stop": {"hook": HOOK, "features": [STOP], "threshold": 2.0, "action": "abort"},
        "watch": {"hook": HOOK, "features": [WATCH], "threshold": 2.0, "action": "flag"},
        "quiet": {"hook": HOOK, "features": [QUIET], "threshold": 2.0, "action": "log"},
    },
    "steering": {
        "calm": {"hook": HOOK, "when": "watch", "edits": [
            {"feature": PINNED, "pin": 0.0},
            {"feature": NUDGED, "nudge": -2.0},
            {"feature": WATCH, "scale": 0.5},
        ]},
    },
}

#: (rows, first position) per batch, in stream order.
BATCHES = [
    (rows(3, 1), 0),                                      # nothing fires
    (rows(3, 2, {1: {STOP: 3.0}}), 3),                    # stop: abort
    (rows(3, 3, {0: {WATCH: 3.0, PINNED: 1.5}}), 6),      # watch: flag, calm steers row 0
    (rows(3, 4, {2: {QUIET: 3.0}}), 9),                   # quiet: log only
]


@dataclass(frozen=True)
class Scenario:
    replies: list[pb.InspectResponse]
    #: The decision log's decision lines, then its other lines (the request's end).
    log_lines: list[dict[str, Any]]
    end_lines: list[dict[str, Any]]
    subscribed: tuple[int, ...]
    plugins: dict[str, str]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("e2e")
    sae_dir = write_saelens(tmp / "sae", D_IN, D_SAE, hook_name=HOOK, weights=WEIGHTS)
    log_path = tmp / "logs" / "decisions.jsonl"
    settings = {**PLUGIN_SETTINGS, "decision_log": {"path": str(log_path)}}
    config = dataclasses.replace(
        make_config(tmp, sae_dir, listen="127.0.0.1:0", drain_grace_seconds=1),
        saes=(SaeConfig(path=sae_dir),),  # only what the plugins subscribe to is encoded
        plugins=PluginsConfig(
            enabled=("detectors", "steering", "decision_log"),  # by entry point, nothing else
            timeout_ms=30_000,  # a loaded 2-core machine must not turn into plugin timeouts
            config=settings,
        ),
    )
    server = GuardServer(config)
    server.start()
    try:
        engine = Engine.load(config)
        server.set_ready(engine)
        with grpc.insecure_channel(server.addresses[0]) as channel:
            client = StreamClient(channel)
            client.configure()
            replies = []
            for sequence, (x, first) in enumerate(BATCHES, start=1):
                batch = make_batch(x, sequence=sequence, request_id="req-e2e")
                del batch.positions[:]
                batch.positions.extend(range(first, first + len(x)))
                replies.append(client.ask(batch))
            client.send(pb.InspectRequest(ended=pb.RequestEnded(
                request_ids=["req-e2e"], reason=pb.RequestEnded.REASON_FINISHED)))
            client.close()
            described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    finally:
        server.stop(1)  # closes the engine: drains the record queue, shuts the plugins down
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    return Scenario(replies, [line for line in lines if line["event"] == "decision"],
                    [line for line in lines if line["event"] != "decision"],
                    tuple(described.subscriptions[0].feature_ids),
                    {p.name: p.version for p in described.plugins})


def test_plugins_load_by_entry_point_and_subscribe_to_their_features(
    scenario: Scenario,
) -> None:
    assert set(scenario.plugins) == {"detectors", "steering", "decision_log"}
    # pin and scale need current activations; the nudged feature needs no encode
    assert scenario.subscribed == (STOP, WATCH, QUIET, PINNED)


def test_no_feature_fires_on_background_rows(scenario: Scenario) -> None:
    reply = scenario.replies[0]
    assert not reply.HasField("error")
    assert reply.action == pb.ACTION_CONTINUE
    assert list(reply.findings) == []
    assert list(reply.steering) == []


def test_abort_detector_aborts_naming_the_detector(scenario: Scenario) -> None:
    reply = scenario.replies[1]
    assert reply.action == pb.ACTION_ABORT
    assert "detector stop fired" in reply.details
    (finding,) = reply.findings
    assert (finding.detector, finding.action) == ("stop", pb.ACTION_ABORT)
    assert list(finding.positions) == [4]  # exactly the row built to fire it
    expected = encode_by_hand(BATCHES[1][0])[1, STOP]
    assert expected == pytest.approx(3.0 + B_ENC)
    assert list(finding.feature_ids) == [STOP]
    assert finding.feature_activations[0] == pytest.approx(expected, abs=1e-5)


def test_flag_continues_with_the_finding_and_steering_returns_the_expected_delta(
    scenario: Scenario,
) -> None:
    reply = scenario.replies[2]
    assert reply.action == pb.ACTION_STEER  # flagged, and calm steered because watch fired
    (finding,) = reply.findings
    assert (finding.detector, finding.action) == ("watch", pb.ACTION_CONTINUE)
    assert list(finding.positions) == [6]

    (steering,) = reply.steering
    assert steering.hook == HOOK
    delta = codec.decode(steering.delta.datatype, list(steering.delta.shape), steering.delta.raw)
    acts = encode_by_hand(BATCHES[2][0])[0]
    w_dec = WEIGHTS["W_dec"]
    expected_row = (
        (0.0 - acts[PINNED]) * w_dec[PINNED]        # pin 0
        + -2.0 * w_dec[NUDGED]                       # nudge -2
        + (0.5 - 1.0) * acts[WATCH] * w_dec[WATCH]   # scale 0.5
    )
    assert acts[PINNED] == pytest.approx(1.5 + B_ENC) and acts[WATCH] == pytest.approx(2.9)
    assert delta.shape == (3, D_IN)
    np.testing.assert_allclose(delta[0], expected_row, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(delta[1:], 0.0)  # `when` limits edits to the fired row


def test_log_only_findings_stay_out_of_the_reply(scenario: Scenario) -> None:
    reply = scenario.replies[3]
    assert reply.action == pb.ACTION_CONTINUE
    assert list(reply.findings) == []


def test_decision_log_has_one_line_per_decision_with_the_replies_ids(
    scenario: Scenario,
) -> None:
    lines = scenario.log_lines
    assert [line["decision_id"] for line in lines] == [r.decision_id for r in scenario.replies]
    assert [line["action"] for line in lines] == ["continue", "abort", "steer", "continue"]
    assert [line["sequence"] for line in lines] == [1, 2, 3, 4]
    assert {line["request_id"] for line in lines} == {"req-e2e"}
    assert all(len(line["sae_sha256"]) == 64 for line in lines)
    assert {p["name"] for p in lines[0]["plugins"]} == {"detectors", "steering",
                                                        "decision_log"}


def test_decision_log_closes_the_request_after_its_decisions(scenario: Scenario) -> None:
    (end,) = scenario.end_lines
    assert end.keys() == {"event", "timestamp", "request_id", "reason"}
    assert (end["event"], end["request_id"], end["reason"]) == (
        "request ended", "req-e2e", "finished")
    assert end["timestamp"] >= scenario.log_lines[-1]["timestamp"]  # ISO 8601 UTC: sortable


def test_decision_log_holds_the_log_only_finding_and_the_edits(scenario: Scenario) -> None:
    (quiet,) = scenario.log_lines[3]["findings"]
    assert (quiet["detector"], quiet["action"], quiet["plugin"]) == ("quiet", "log",
                                                                     "detectors")
    assert quiet["positions"] == [11]
    assert quiet["feature_ids"] == [QUIET]
    steer = scenario.log_lines[2]
    assert [(e["feature"], e["kind"], e["value"], e["positions"]) for e in steer["edits"]] == [
        (PINNED, "pin", 0.0, [6]), (NUDGED, "nudge", -2.0, [6]), (WATCH, "scale", 0.5, [6])
    ]
    assert {e["plugin"] for e in steer["edits"]} == {"steering"}
    assert "stop" in scenario.log_lines[1]["details"]
    assert all("token_ids" not in line for line in scenario.log_lines)
