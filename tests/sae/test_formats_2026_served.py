"""Issue 17's formats served end to end by an in-process GuardServer (real gRPC over a Unix
socket): Describe names them, a plugin reads the features the format's own formula gives,
and steering through a transcoder is refused by the engine while it keeps serving."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from numpy.typing import NDArray
from structlog.testing import capture_logs

from guard import FeatureBatch, FeatureEdit, FeatureRequest, Finding, hookimpl
from guard.cli import format_description
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import Action, ActivationRows, Phase
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.sae.cli import register
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import StreamClient, make_batch
from tests.sae_fixtures import (
    llamascope_hyperparams,
    random_gemmascope2_params,
    random_llamascope_tensors,
    random_transcoder_weights,
    write_gemmascope2,
    write_llamascope,
    write_saelens_transcoder,
)

D_IN, D_SAE = 16, 48
FEATURES = (2, 5, 11, 30)
F64 = NDArray[np.float64]
Served = tuple[Path, str, str, Callable[[F64], F64]]


def _gemmascope2(tmp: Path) -> Served:
    params = random_gemmascope2_params(D_IN, D_SAE, affine=True, seed=1)
    folder = write_gemmascope2(tmp / "transcoder_all" / "layer_3_width_16k_l0_small_affine",
                               params, {"affine_connection": True})
    p = {k: v.astype(np.float64) for k, v in params.items()}

    def encode(x: F64) -> F64:  # Gemma Scope 2's JumpReLUSAE.encode
        pre = x @ p["w_enc"] + p["b_enc"]
        return np.where(pre > p["threshold"], np.maximum(pre, 0.0), 0.0)

    return folder, "blocks.3.ln2.hook_normalized", "gemmascope2", encode


def _llamascope(tmp: Path) -> Served:
    tensors = random_llamascope_tensors(D_IN, D_SAE, seed=2)
    hp = llamascope_hyperparams(D_IN, D_SAE, hook_point_in="blocks.3.hook_resid_post",
                                hook_point_out="blocks.3.hook_resid_post",
                                jump_relu_threshold=0.3,
                                dataset_average_activation_norm={"in": 2.5, "out": 2.5})
    folder = write_llamascope(tmp / "L3R", tensors, hp)
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    s_in = math.sqrt(D_IN) / 2.5

    def encode(x: F64) -> F64:  # SAELens's llama_scope loader, the norm folded in
        pre = s_in * x @ t["encoder.weight"].T + t["encoder.bias"]
        return np.maximum(pre, 0.0) * (pre > 0.3 * s_in)

    return folder, "blocks.3.hook_resid_post", "llamascope", encode


def _artifact(tmp: Path) -> Served:
    weights = random_transcoder_weights(D_IN, D_SAE, 8, jumprelu=True, skip=True, seed=3)
    source = write_saelens_transcoder(tmp / "src", weights,
                                      architecture="jumprelu_skip_transcoder",
                                      hook_name="blocks.3.ln2.hook_normalized",
                                      hook_name_out="blocks.3.hook_mlp_out")
    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sae", "export", str(source), str(tmp / "artifact")])
    assert args.func(args) == 0
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def encode(x: F64) -> F64:  # SAELens JumpReLUTranscoder.encode
        pre = x @ w["W_enc"] + w["b_enc"]
        return np.maximum(pre, 0.0) * (pre > w["threshold"])

    return tmp / "artifact", "blocks.3.ln2.hook_normalized", "artifact", encode


class Recorder:
    """Subscribes to FEATURES on one hook and keeps the columns it is given."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.seen: list[NDArray[np.float32]] = []

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(self.hook, list(FEATURES))]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        self.seen.append(np.stack([batch.column(f) for f in FEATURES], axis=1))
        return []


@pytest.mark.parametrize("make", [_gemmascope2, _llamascope, _artifact],
                         ids=["gemmascope2-transcoder", "llamascope", "artifact-transcoder"])
def test_served_through_grpc(tmp_path: Path, make: Callable[[Path], Served]) -> None:
    path, hook, source, encode = make(tmp_path)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock"),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=path),),
        plugins=PluginsConfig(autoload=False),
    )
    recorder = Recorder(hook)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config, extra_plugins=[PluginSource("rec", "1", recorder)]))
    try:
        with grpc.insecure_channel(server.addresses[0]) as channel:
            described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest(), timeout=5)
            (sae,) = described.saes
            assert (sae.hook, sae.source, sae.architecture) == (hook, source, "jumprelu")
            assert (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
            # A transcoder's decoder side is described; an SAE has none.
            info = server.servicer.engine.hooks[hook].info  # type: ignore[union-attr]
            assert sae.d_out == (info.d_out or 0)
            assert bool(sae.hook_out) == bool(info.d_out)
            if make is not _llamascope:
                assert sae.d_out > 0 and sae.hook_out, sae
                assert (f"transcoder  writes {sae.hook_out} (d_out {sae.d_out})"
                        in format_description(described, "here"))
            client = StreamClient(channel)
            client.configure(hooks=[hook])
            rows = (np.random.default_rng(0).normal(0.0, 2.0, size=(6, D_IN)) + 0.3).astype(
                np.float32)
            reply = client.ask(make_batch(rows, hook=hook))
            assert not reply.HasField("error"), reply.error.message
            assert reply.action == pb.ACTION_CONTINUE
            client.close()
    finally:
        server.stop(0)
    (seen,) = recorder.seen
    expected = encode(rows.astype(np.float64))[:, list(FEATURES)]
    assert 0 < np.count_nonzero(expected) < expected.size
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=3e-5)


class Pinner(Recorder):
    @hookimpl
    def guard_steer(self, batch: FeatureBatch) -> Sequence[FeatureEdit]:
        return [FeatureEdit(self.hook, 5, "nudge", 2.0)]


def test_steering_through_a_transcoder_is_refused_and_the_batch_still_answered(
    tmp_path: Path,
) -> None:
    path, hook, _, _ = _gemmascope2(tmp_path)
    config = GuardConfig(
        server=ServerConfig(listen="unix:///tmp/unused.sock"),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=path),),
        plugins=PluginsConfig(autoload=False),
    )
    engine = Engine.load(config, extra_plugins=[PluginSource("pinner", "1", Pinner(hook))])
    try:
        x = np.random.default_rng(1).normal(size=(3, D_IN)).astype(np.float32)
        rows = ActivationRows("req-1", 1, hook, x, np.arange(3, dtype=np.int64), None,
                              Phase.GENERATION)
        for _ in range(2):  # refused each time, and the engine keeps answering
            with capture_logs() as logs:
                decision = engine.inspect(rows, {})
            assert decision.action == Action.CONTINUE
            assert decision.steering == ()
            assert decision.plugin_errors == ("pinner",)
            (rejected,) = [e for e in logs if e["event"] == "steering edits rejected"]
            for fragment in ("transcoder", repr(hook), "blocks.3.hook_mlp_out", "d_out=16"):
                assert fragment in rejected["reason"], rejected
    finally:
        engine.close(timeout=5)
