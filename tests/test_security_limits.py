"""Security details of issue 19 ("Hold under attack") and the input range of issue 21.

- a live Unix socket is refused at start-up, never unlinked and taken over (a stale one is
  still replaced);
- a world-accessible ``server.socket_mode`` is refused at load unless opted into;
- SAE pins are checked on the raw bytes before anything is parsed;
- request ids and hook names are length-capped, and an id over its cap is never echoed;
- no activation value in any error; every encode (full or subset) refuses rows beyond the
  range its SAE can encode, soundly (rows within it never overflow any feature).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import guard.sae.sae as sae_module
from guard import FeatureBatch, FeatureRequest, hookimpl
from guard.config import (
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    SaeConfig,
    ServerConfig,
    SharedMemoryConfig,
    parse_config,
)
from guard.decision import ActivationRows, Phase
from guard.engine.core import Engine, check_finite_features, check_input_range
from guard.engine.plugins import PluginSource
from guard.errors import ConfigError, InvalidInput, ListenError, SaeFileError
from guard.sae import open_sae
from guard.sae.export import export_artifact
from guard.sae.model import FLOAT32_MAX
from guard.sae.safetensors import sha256_of_files
from guard.sidecar.process import GuardProcess, ServeFailed
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.wire import codec
from tests.conftest import D_IN, HOOK, StreamClient, make_batch, make_config
from tests.sae_fixtures import (
    random_gated_weights,
    random_jumprelu_weights,
    random_standard_weights,
    write_gemmascope,
    write_saelens,
)

# -- a live socket is not taken over -------------------------------------------------------


def _health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status)
        except grpc.RpcError:
            return None


@pytest.fixture
def first_guard(tmp_path: Path, sae_dir: Path) -> Iterator[GuardServer]:
    """A guard listening on ``tmp_path/guard.sock`` (not ready: it answers NOT_SERVING)."""
    server = GuardServer(make_config(tmp_path, sae_dir))
    server.start()
    yield server
    server.stop(0)


def test_a_second_guard_on_a_live_socket_is_refused_and_the_first_keeps_it(
    first_guard: GuardServer, tmp_path: Path, sae_dir: Path,
) -> None:
    path = tmp_path / "guard.sock"
    second = GuardServer(make_config(tmp_path, sae_dir))
    try:
        with pytest.raises(ListenError) as refused:
            second.start()
    finally:
        second.stop(0)  # removes only the sockets it created: none
    message = str(refused.value)
    assert f"the socket {path} is live" in message and "\n" not in message
    assert "refusing to take it over" in message
    assert path.exists()  # before the fix: unlinked and bound again by the second guard
    assert _health(first_guard.addresses[0]) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_guard_serve_on_a_live_socket_exits_with_one_line_saying_so(
    first_guard: GuardServer, tmp_path: Path, sae_dir: Path,
) -> None:
    """The real ``guard serve``: it exits 1 with one log line naming the socket, and the
    running guard keeps its socket and answers."""
    path = tmp_path / "guard.sock"
    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": f"unix://{path}"},
                                      "saes": [{"path": str(sae_dir)}]}), encoding="utf-8")
    second = GuardProcess(config, f"unix://{path}", log=tmp_path / "second.log")
    with pytest.raises(ServeFailed, match="exited with 1 before it was ready"):
        second.start(60)
    (line,) = [json.loads(text) for text in second.log_text().splitlines()
               if '"cannot start"' in text]
    assert f"the socket {path} is live" in line["reason"]
    assert path.exists()
    assert _health(first_guard.addresses[0]) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_stale_socket_file_is_still_replaced(tmp_path: Path, sae_dir: Path) -> None:
    path = tmp_path / "guard.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # bound, never listening, closed: what a killed guard leaves
    left.close()
    server = GuardServer(make_config(tmp_path, sae_dir))
    try:
        server.start()
        assert _health(server.addresses[0]) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


def test_a_live_doorbell_socket_is_refused(tmp_path: Path, sae_dir: Path) -> None:
    doorbell = tmp_path / "guard.sock.doorbell"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(doorbell))
    other.listen(1)
    config = make_config(tmp_path, sae_dir,
                         shared_memory=SharedMemoryConfig(enabled=True, allowed_dirs=("/tmp",)))
    server = GuardServer(config)
    try:
        with pytest.raises(ListenError, match=r"doorbell socket .* is live"):
            server.start()
        assert doorbell.exists()
    finally:
        server.stop(0)
        other.close()


# -- world-accessible socket modes ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["0666", "0777", "0661", "0604"])
def test_a_socket_mode_open_to_other_users_is_refused_at_load(mode: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(f"server: {{socket_mode: '{mode}'}}", env={})
    assert refused.value.key == "server.socket_mode"
    assert "server.allow_world_socket: true" in str(refused.value)
    assert f"found '{mode}'" in str(refused.value)
    with pytest.raises(ConfigError):  # the environment override is checked the same way
        parse_config("", env={"GUARD_SOCKET_MODE": mode})


def test_a_world_socket_mode_needs_the_explicit_opt_in() -> None:
    config = parse_config("server: {socket_mode: '0666', allow_world_socket: true}", env={})
    assert (config.server.socket_mode, config.server.allow_world_socket) == (0o666, True)
    for closed in ("0660", "0600", "0700", "0640"):
        assert parse_config(f"server: {{socket_mode: '{closed}'}}",
                            env={}).server.socket_mode == int(closed, 8)


# -- SAE pins on the raw bytes -------------------------------------------------------------


def _saelens(folder: Path) -> tuple[Path, Path]:
    return write_saelens(folder, D_IN, 32, hook_name=HOOK), folder / "sae_weights.safetensors"


def _gemmascope(folder: Path) -> tuple[Path, Path]:
    path = write_gemmascope(folder / "layer_6" / "params.npz", D_IN, 32)
    return path, path


def _artifact(folder: Path) -> tuple[Path, Path]:
    source, _ = _saelens(folder / "source")
    export_artifact(source, folder / "artifact", dtype="fp32", stream=None)
    return folder / "artifact", folder / "artifact" / "manifest.json"


SAE_FORMATS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "saelens": _saelens, "gemmascope": _gemmascope, "artifact": _artifact}


@pytest.mark.parametrize("fmt", sorted(SAE_FORMATS))
def test_a_wrong_pin_is_refused_before_anything_is_parsed(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2 MB zip-bomb params.npz OOM-killed start-up even with a wrong pin: the file was
    parsed (decompressed) before its hash was compared. Now no loader runs at all."""
    path, pinned_file = SAE_FORMATS[fmt](tmp_path)

    def no_parsing(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the SAE was parsed before its pin was checked")

    monkeypatch.setattr(sae_module, "load_any", no_parsing)
    wrong = "ab" * 32
    with pytest.raises(SaeFileError) as refused:
        open_sae(path, hook=HOOK, sha256=wrong)
    message = str(refused.value)
    assert message.startswith(f"{pinned_file}: sha256 expected {wrong} (pinned), found ")


def test_the_right_pin_loads_and_hashes_the_weights_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = _gemmascope(tmp_path)
    digest = sha256_of_files([path])
    hashed: list[Path] = []
    real = sha256_of_files

    def counting(paths: Any) -> str:
        paths = list(paths)
        hashed.extend(paths)
        return real(paths)

    import guard.sae.formats.gemmascope as gemmascope

    monkeypatch.setattr(sae_module, "sha256_of_files", counting)
    monkeypatch.setattr(gemmascope, "sha256_of_files", counting)
    sae = open_sae(path, hook=HOOK, sha256=f"sha256:{digest.upper()}")
    assert sae.info.sha256 == digest
    assert hashed == [path]  # checked before parsing, not hashed a second time after


# -- request ids and hook names ------------------------------------------------------------


def test_an_oversized_request_id_is_refused_and_never_echoed(
    stream: StreamClient, caplog: pytest.LogCaptureFixture,
) -> None:
    stream.configure()
    huge = "x" * (1 << 20)
    reply = stream.ask(make_batch(request_id=huge, sequence=1))
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.error.message == (
        f"batch.request_id: expected at most {codec.MAX_REQUEST_ID_BYTES} bytes (UTF-8), "
        f"found {1 << 20} bytes")
    assert reply.request_id == ""  # not echoed back (8 MiB ids went into replies)
    at_cap = "é" * (codec.MAX_REQUEST_ID_BYTES // 2)  # 2 bytes each: exactly the cap
    ok = stream.ask(make_batch(request_id=at_cap, sequence=2))
    assert not ok.HasField("error") and ok.request_id == at_cap
    over = "é" * (codec.MAX_REQUEST_ID_BYTES // 2) + "x"
    assert stream.ask(make_batch(request_id=over, sequence=3)).HasField("error")
    assert not any("x" * 1000 in record.getMessage() for record in caplog.records)


def test_an_oversized_hook_or_segment_id_is_refused(stream: StreamClient) -> None:
    stream.configure()
    reply = stream.ask(make_batch(hook="h" * 300, sequence=1))
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.error.message.startswith("batch.hook: expected at most 256 bytes")
    assert "hhhh" not in reply.error.message
    batch = make_batch(sequence=2, n_rows=2)
    batch.request_id = ""
    batch.segments.add(request_id="ok", rows=1)
    batch.segments.add(request_id="s" * 257, rows=1)
    reply = stream.ask(batch)
    assert reply.error.message.startswith(
        "batch.segments[1].request_id: expected at most 256 bytes (UTF-8), found 257")
    assert not stream.ask(make_batch(sequence=3)).HasField("error")  # the stream goes on


def test_an_oversized_hook_in_the_config_ends_the_stream_without_quoting_it(
    channel: grpc.Channel,
) -> None:
    client = StreamClient(channel)
    client.send(pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_INLINE,
                                                         hooks=["k" * 5000])))
    with pytest.raises(grpc.RpcError) as ended:
        client.next()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = ended.value.details() or ""
    assert details == "config.hooks[0]: expected at most 256 bytes (UTF-8), found 5000 bytes"


# -- no activation values in errors; the input range ---------------------------------------


def _batch(rows: np.ndarray[Any, Any]) -> ActivationRows:
    return ActivationRows("req-1", 1, HOOK, rows.astype(np.float32),
                          np.arange(10, 10 + rows.shape[0], dtype=np.int64), None,
                          Phase.GENERATION)


def test_the_encode_overflow_error_quotes_no_value() -> None:
    rows = np.ones((2, D_IN), dtype=np.float32)
    rows[1, 0] = 3e38
    features = np.zeros((2, 4), dtype=np.float32)
    features[1, 2] = np.inf
    with pytest.raises(InvalidInput) as refused:
        check_finite_features(features, _batch(rows))
    message = str(refused.value)
    assert f"1 of 2 rows of {HOOK} encode to NaN or Inf" in message
    assert "3e+38" not in message and "e+" not in message


class Subscriber:
    def __init__(self, feature: int) -> None:
        self.feature = feature

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, (self.feature,))]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        del batch  # a detector that finds nothing: the rows are encoded and decided


def test_a_huge_finite_row_is_refused_for_a_subset_that_would_not_overflow(
    tmp_path: Path,
) -> None:
    """The plugins read feature 3, whose column barely weighs dimension 0; feature 5's weighs
    it heavily. A row of 1e37 in dimension 0 leaves feature 3 finite (1e35) but overflows
    feature 5: it was scored as normal, and is now refused before the encode."""
    d_sae = 8
    weights = random_standard_weights(D_IN, d_sae, seed=4)
    weights["W_enc"][0, :] = 0.01
    weights["W_enc"][0, 5] = 50.0
    folder = write_saelens(tmp_path / "sae", D_IN, d_sae, hook_name=HOOK, weights=weights)
    config = GuardConfig(
        server=ServerConfig(listen=f"unix://{tmp_path}/unused.sock"),
        logging=LoggingConfig(level="warning"), saes=(SaeConfig(path=folder),),
        plugins=PluginsConfig(autoload=False))
    engine = Engine.load(config, extra_plugins=[PluginSource("reader", "1", Subscriber(3))])
    try:
        assert engine.hooks[HOOK].subscription.feature_ids == (3,)  # a subset encode
        rows = np.random.default_rng(0).normal(size=(2, D_IN)).astype(np.float32)
        assert engine.inspect(_batch(rows), {}).action.name == "CONTINUE"
        rows[1, :] = 0.0
        rows[1, 0] = 1e37
        with np.errstate(over="ignore"):  # what the subset alone computes: finite
            assert np.isfinite(engine.hooks[HOOK].encoder.encode(rows)).all()  # type: ignore[union-attr]
        with pytest.raises(InvalidInput) as refused:
            engine.inspect(_batch(rows), {})
    finally:
        engine.close(timeout=5)
    message = str(refused.value)
    assert message.startswith(f"batch.activations: 1 of 2 rows of {HOOK} are out of the range "
                              "its SAE can encode (rows at positions 11)")
    assert "1e+37" not in message


def _architecture_sae(tmp_path: Path, arch: str, normalization: str, dtype: str
                      ) -> sae_module.Sae:
    weights = {"jumprelu": random_jumprelu_weights, "gated": random_gated_weights}.get(
        arch, random_standard_weights)(D_IN, 32, 3)
    extra: dict[str, Any] = {"normalize_activations": normalization}
    if arch == "topk":
        extra["k"] = 4
    folder = write_saelens(tmp_path / f"{arch}-{normalization}", D_IN, 32, hook_name=HOOK,
                           architecture=arch, extra_cfg=extra, weights=weights)
    return open_sae(folder, dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize(("arch", "normalization"), [
    ("standard", "none"), ("topk", "none"), ("jumprelu", "none"), ("gated", "none"),
    ("standard", "constant_norm_rescale"), ("standard", "layer_norm")])
def test_rows_within_the_limit_never_overflow_and_rows_beyond_it_are_refused(
    tmp_path: Path, arch: str, normalization: str, dtype: str,
) -> None:
    """Soundness of :attr:`Sae.input_limit`: the worst rows at the limit (each value at the
    limit, with the signs of the heaviest column) encode to finite features in the full
    encoder; a row just beyond it is refused by the range check."""
    sae = _architecture_sae(tmp_path, arch, normalization, dtype)
    limit = sae.input_limit
    assert 0 < limit < FLOAT32_MAX
    w_enc = sae.model.architecture.w_enc
    heaviest = int(np.argmax(np.abs(w_enc.astype(np.float64)).sum(axis=0)))
    worst = np.where(w_enc[:, heaviest] >= 0, 1.0, -1.0)
    exact = np.stack([worst, -worst, np.ones(D_IN)]) * limit
    # Within the limit after rounding to float32.
    rows: np.ndarray[Any, np.dtype[np.float32]] = np.nextafter(
        exact.astype(np.float32), np.float32(0)).astype(np.float32)
    check_input_range(_batch(rows), limit)
    assert np.isfinite(sae.encoder().encode(rows)).all()
    beyond = rows.copy()
    beyond[2, 3] = np.nextafter(np.float32(limit), np.float32(np.inf)) * 2
    with pytest.raises(InvalidInput, match="1 of 3 rows"):
        check_input_range(_batch(beyond), limit)


def test_nan_and_inf_rows_are_refused_by_the_range_check_too() -> None:
    rows = np.zeros((3, D_IN), dtype=np.float32)
    rows[0, 1] = np.nan
    rows[2, 2] = -np.inf
    with pytest.raises(InvalidInput, match=r"2 of 3 rows .* \(rows at positions 10, 12\)"):
        check_input_range(_batch(rows), 1e30)


def test_fp16_graphs_keep_their_input_within_float16(tmp_path: Path) -> None:
    fp32 = _architecture_sae(tmp_path / "a", "standard", "none", "fp32")
    fp16 = _architecture_sae(tmp_path / "b", "standard", "none", "fp16")
    assert fp16.input_limit == min(fp32.input_limit, float(np.finfo(np.float16).max))


def test_the_limit_is_computed_at_load_and_logged(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = _saelens(tmp_path)
    sae = open_sae(folder)
    assert sae._input_limit is not None  # at load, not on the first batch
    assert any("input_limit=" in record.getMessage() for record in caplog.records)
