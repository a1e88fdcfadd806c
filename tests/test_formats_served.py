"""The sidecar serves every SAE format users have, and an exported artifact, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard.cli import main
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.engine.core import Engine
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import StreamClient, make_batch
from tests.sae_fixtures import write_gemmascope, write_saelens, write_sparsify

D_IN, D_SAE = 16, 48


def _saelens(tmp: Path) -> tuple[Path, str | None]:
    return write_saelens(tmp / "saelens", D_IN, D_SAE, hook_name="blocks.3.hook_resid_post"), None


def _sparsify(tmp: Path) -> tuple[Path, str | None]:
    return write_sparsify(tmp / "sparsify" / "layers.3", D_IN, D_SAE, k=4), (
        "blocks.3.hook_resid_post")


def _gemmascope(tmp: Path) -> tuple[Path, str | None]:
    return write_gemmascope(tmp / "gemmascope" / "params.npz", D_IN, D_SAE), (
        "blocks.3.hook_resid_post")


def _artifact(tmp: Path) -> tuple[Path, str | None]:
    source, _ = _saelens(tmp)
    assert main(["sae", "export", str(source), str(tmp / "artifact"), "--dtype", "fp32"]) == 0
    return tmp / "artifact", None


@pytest.mark.parametrize(
    ("make", "source", "architecture"),
    [(_saelens, "saelens", "standard"), (_sparsify, "sparsify", "topk"),
     (_gemmascope, "gemmascope", "jumprelu"), (_artifact, "artifact", "standard")],
    ids=["saelens", "sparsify", "gemmascope", "artifact"],
)
def test_each_format_is_served(
    tmp_path: Path, make: Callable[[Path], tuple[Path, str | None]], source: str,
    architecture: str, capsys: pytest.CaptureFixture[str],
) -> None:
    path, hook = make(tmp_path)
    capsys.readouterr()
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/guard.sock"),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=path, hook=hook, features=(2, 5, 11)),),
        plugins=PluginsConfig(autoload=False),
    )
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    try:
        with grpc.insecure_channel(server.addresses[0]) as channel:
            described = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest(), timeout=5)
            (sae,) = described.saes
            assert (sae.hook, sae.source, sae.architecture) == (
                "blocks.3.hook_resid_post", source, architecture)
            assert (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
            assert sae.execution_provider == "CPUExecutionProvider"
            assert list(described.subscriptions[0].feature_ids) == [2, 5, 11]
            client = StreamClient(channel)
            client.configure(hooks=["blocks.3.hook_resid_post"])
            rows = np.random.default_rng(0).normal(size=(4, D_IN)).astype(np.float32)
            reply = client.ask(make_batch(rows, hook="blocks.3.hook_resid_post"))
            assert not reply.HasField("error"), reply.error.message
            assert reply.action == pb.ACTION_CONTINUE
            client.close()
    finally:
        server.stop(0)
