"""The server through a real gRPC channel: Inspect, Describe, health, and every bad input."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.engine.core import Engine
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import D_IN, D_SAE, HOOK, StreamClient, make_batch, make_config


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return status


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_inspect_over_unix_socket_and_tcp(running_server: GuardServer, listener: str) -> None:
    address = running_server.addresses[0 if listener == "unix" else 1]
    assert address.startswith("unix://") == (listener == "unix")
    with grpc.insecure_channel(address) as channel:
        client = StreamClient(channel)
        client.configure()
        decision_ids = set()
        for sequence in range(5, 9):
            reply = client.ask(make_batch(sequence=sequence, n_rows=4))
            assert not reply.HasField("error"), reply.error.message
            assert reply.action == pb.ACTION_CONTINUE
            assert (reply.request_id, reply.sequence) == ("req-1", sequence)
            assert list(reply.positions) == [0, 1, 2, 3]
            assert reply.skipped_sequences == 0
            decision_ids.add(reply.decision_id)
        assert len(decision_ids) == 4
        assert client.rest() == []


@pytest.mark.parametrize("datatype", ["F32", "F16", "BF16"])
def test_every_datatype_is_accepted(stream: StreamClient, datatype: str) -> None:
    stream.configure()
    reply = stream.ask(make_batch(datatype=datatype))
    assert not reply.HasField("error"), reply.error.message
    assert reply.action == pb.ACTION_CONTINUE


def test_describe(channel: grpc.Channel) -> None:
    reply = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest(), timeout=5)
    assert reply.protocol_version == "1.0"
    assert list(reply.hooks) == [HOOK]
    (sae,) = reply.saes
    assert (sae.hook, sae.d_in, sae.d_sae, sae.architecture) == (HOOK, D_IN, D_SAE, "standard")
    assert len(sae.sha256) == 64
    assert sae.execution_provider == "CPUExecutionProvider"
    assert sae.source == "saelens"
    (sub,) = reply.subscriptions
    assert sub.all_features
    assert reply.max_message_bytes == 32 * 2**20
    assert list(reply.datatypes) == ["F32", "F16", "BF16"]


# --- bad input: per-batch error replies; the stream goes on -------------------------------


def _assert_error(reply: pb.InspectResponse, code: grpc.StatusCode, *fragments: str) -> None:
    assert reply.HasField("error"), f"expected an error reply, got {reply}"
    assert reply.error.code == code.value[0], reply.error
    for fragment in fragments:
        assert fragment in reply.error.message, reply.error.message
    assert reply.action == pb.ACTION_UNSPECIFIED
    assert reply.decision_id == ""


def _bad_bytes() -> pb.ActivationBatch:
    batch = make_batch(sequence=1)
    batch.activations.raw = batch.activations.raw[:-4]
    return batch


def _bad_dtype() -> pb.ActivationBatch:
    batch = make_batch(sequence=1)
    batch.activations.datatype = "F64"
    return batch


def _nan_rows() -> pb.ActivationBatch:
    rows = np.ones((4, D_IN), dtype=np.float32)
    rows[1, 3] = np.nan
    rows[3, 0] = np.inf
    batch = make_batch(rows, sequence=1)
    batch.positions[:] = [10, 11, 12, 13]
    return batch


def _three_d() -> pb.ActivationBatch:
    batch = make_batch(sequence=1)
    batch.activations.shape[:] = [1, 3, D_IN]
    return batch


def _positions_short() -> pb.ActivationBatch:
    batch = make_batch(sequence=1, n_rows=3)
    del batch.positions[-1]
    return batch


def _token_ids_long() -> pb.ActivationBatch:
    batch = make_batch(sequence=1, n_rows=3)
    batch.token_ids.append(7)
    return batch


def _no_request_id() -> pb.ActivationBatch:
    return make_batch(sequence=1, request_id="")


@pytest.mark.parametrize(
    ("make", "code", "fragments"),
    [
        (lambda: make_batch(sequence=1, hook="blocks.99.hook_resid_post"),
         grpc.StatusCode.NOT_FOUND, ["'blocks.99.hook_resid_post'", f"served hooks: {HOOK}"]),
        (_bad_dtype, grpc.StatusCode.INVALID_ARGUMENT,
         ["expected one of F32, F16, BF16, found 'F64'"]),
        (lambda: make_batch(sequence=1, width=D_IN + 1), grpc.StatusCode.INVALID_ARGUMENT,
         [f"has d_in {D_IN}, found width {D_IN + 1}"]),
        (_bad_bytes, grpc.StatusCode.INVALID_ARGUMENT,
         [f"needs {3 * D_IN * 4} bytes, found {3 * D_IN * 4 - 4}"]),
        (_nan_rows, grpc.StatusCode.INVALID_ARGUMENT, ["positions 11, 13 hold NaN or Inf"]),
        (_three_d, grpc.StatusCode.INVALID_ARGUMENT, ["expected [rows, d_in], found [1, 3,"]),
        (_positions_short, grpc.StatusCode.INVALID_ARGUMENT,
         ["one position per row (3), found 2"]),
        (_token_ids_long, grpc.StatusCode.INVALID_ARGUMENT, ["none or one per row (3), found 4"]),
        (_no_request_id, grpc.StatusCode.INVALID_ARGUMENT, ["batch.request_id"]),
        (lambda: make_batch(np.zeros((0, D_IN), np.float32), sequence=1),
         grpc.StatusCode.INVALID_ARGUMENT, ["at least one row"]),
    ],
    ids=["unknown-hook", "dtype", "width", "byte-length", "nan-inf", "rank", "positions",
         "token-ids", "request-id", "no-rows"],
)
def test_bad_batch_gets_an_error_reply_and_the_stream_survives(
    stream: StreamClient, make: object, code: grpc.StatusCode, fragments: list[str]
) -> None:
    stream.configure()
    assert callable(make)
    _assert_error(stream.ask(make()), code, *fragments)
    good = stream.ask(make_batch(sequence=2))
    assert not good.HasField("error"), good.error.message
    assert good.action == pb.ACTION_CONTINUE


def test_sequence_repeat_is_rejected_and_gap_is_reported(stream: StreamClient) -> None:
    stream.configure()
    assert stream.ask(make_batch(sequence=10)).skipped_sequences == 0
    _assert_error(stream.ask(make_batch(sequence=10)), grpc.StatusCode.ALREADY_EXISTS,
                  "expected 11", "found 10", "not processed")
    _assert_error(stream.ask(make_batch(sequence=4)), grpc.StatusCode.ALREADY_EXISTS,
                  "found 4")
    gap = stream.ask(make_batch(sequence=14))
    assert not gap.HasField("error")
    assert gap.skipped_sequences == 3
    assert stream.ask(make_batch(sequence=15)).skipped_sequences == 0


def test_oversized_batch_names_the_option(tmp_path: Path, sae_dir: Path) -> None:
    config = make_config(tmp_path, sae_dir, max_message_bytes=D_IN * 4 * 8)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    try:
        with grpc.insecure_channel(server.addresses[0]) as channel:
            client = StreamClient(channel)
            client.configure()
            _assert_error(client.ask(make_batch(sequence=1, n_rows=9)),
                          grpc.StatusCode.RESOURCE_EXHAUSTED, "server.max_message_bytes")
            assert client.ask(make_batch(sequence=2, n_rows=8)).action == pb.ACTION_CONTINUE
            # Far beyond the limit, gRPC itself refuses the message and ends the stream.
            with pytest.raises(grpc.RpcError) as info:
                client.ask(make_batch(sequence=3, n_rows=64))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.close()
    finally:
        server.stop(0)


def test_default_limit_fits_512_by_8192(tmp_path: Path) -> None:
    from tests.sae_fixtures import write_saelens

    sae = write_saelens(tmp_path / "wide", 8192, 16, hook_name="blocks.1.hook_resid_post")
    config = make_config(tmp_path, sae)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    try:
        with grpc.insecure_channel(server.addresses[0]) as channel:
            client = StreamClient(channel)
            client.configure(hooks=["blocks.1.hook_resid_post"])
            rows = np.ones((512, 8192), dtype=np.float32)
            reply = client.ask(make_batch(rows, hook="blocks.1.hook_resid_post"))
            assert not reply.HasField("error"), reply.error.message
            assert len(reply.positions) == 512
            client.close()
    finally:
        server.stop(0)


# --- protocol violations end the stream with a status; the server keeps serving -----------


def _stream_status(channel: grpc.Channel, *requests: pb.InspectRequest) -> grpc.RpcError:
    stub = pb_grpc.GuardStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Inspect(iter(requests), timeout=10))
    return info.value


def test_batch_before_config(channel: grpc.Channel) -> None:
    error = _stream_status(channel, pb.InspectRequest(batch=make_batch(sequence=3)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "first message on an Inspect stream must be a StreamConfig" in str(error.details())
    assert "sequence=3" in str(error.details())
    # The process keeps serving.
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_config_naming_an_unknown_hook(channel: grpc.Channel) -> None:
    config = pb.StreamConfig(mode=pb.MODE_INLINE, hooks=[HOOK, "blocks.2.hook_resid_post"])
    error = _stream_status(channel, pb.InspectRequest(config=config))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"served hooks: {HOOK}" in str(error.details())


@pytest.mark.parametrize(
    ("config", "code", "fragment"),
    [
        (pb.StreamConfig(hooks=[HOOK]), grpc.StatusCode.INVALID_ARGUMENT,
         "config.mode: expected MODE_MONITOR or MODE_INLINE, found MODE_UNSPECIFIED"),
        (pb.StreamConfig(mode=pb.MODE_INLINE, protocol_version="2.0"),
         grpc.StatusCode.FAILED_PRECONDITION, "this guard speaks 1.0, found '2.0'"),
    ],
)
def test_bad_config(channel: grpc.Channel, config: pb.StreamConfig, code: grpc.StatusCode,
                    fragment: str) -> None:
    error = _stream_status(channel, pb.InspectRequest(config=config))
    assert error.code() == code
    assert fragment in str(error.details())


def test_second_config_ends_the_stream(channel: grpc.Channel) -> None:
    config = pb.InspectRequest(config=pb.StreamConfig(mode=pb.MODE_MONITOR, hooks=[HOOK]))
    error = _stream_status(channel, config, config)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already received" in str(error.details())


def test_streams_are_independent(channel: grpc.Channel) -> None:
    good = StreamClient(channel)
    good.configure()
    assert good.ask(make_batch(sequence=1)).action == pb.ACTION_CONTINUE
    _stream_status(channel, pb.InspectRequest(batch=make_batch(sequence=1)))
    assert good.ask(make_batch(sequence=2)).action == pb.ACTION_CONTINUE
    good.close()


# --- health ------------------------------------------------------------------------------


def test_health_transitions(tmp_path: Path, sae_dir: Path) -> None:
    config = make_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()
    with grpc.insecure_channel(server.addresses[0]) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(channel, "guard.v1.Guard") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Before the engine is ready, calls get UNAVAILABLE with a reason.
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in str(info.value.details())
        server.set_ready(Engine.load(config))
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "guard.v1.Guard") == health_pb2.HealthCheckResponse.SERVING
    server.stop(0)
    assert not Path(server.addresses[0][len("unix://"):]).exists()


def test_separate_health_listener(tmp_path: Path, sae_dir: Path) -> None:
    config = make_config(tmp_path, sae_dir, health_listen="127.0.0.1:0")
    server = GuardServer(config)
    server.start()
    try:
        with grpc.insecure_channel(server.health_address) as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            server.set_ready(Engine.load(config))
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


@pytest.mark.parametrize("datatype", ["F32", "F16", "BF16"])
def test_steering_deltas_travel_in_the_batch_datatype(datatype: str) -> None:
    from guard.decision import Action, Decision, Steering
    from guard.sidecar.session import decision_to_proto
    from guard.wire import codec

    delta = np.array([[0.5, -1.25, 2.0]], dtype=np.float32)
    decision = Decision("d1", Action.STEER, "req", 1, HOOK, np.array([4]),
                        steering=(Steering(HOOK, delta),))
    reply = decision_to_proto(decision, delta_datatype=datatype)
    (steering,) = reply.steering
    assert steering.delta.datatype == datatype
    decoded = codec.decode(datatype, steering.delta.shape, steering.delta.raw)
    np.testing.assert_array_equal(decoded, delta)  # these values are exact in every dtype


def test_bytes_that_are_not_a_message_get_invalid_argument_and_the_drain_still_ends(
    tmp_path: Path, sae_dir: Path
) -> None:
    """grpcio answers a request its deserializer cannot parse with INTERNAL and then never
    finishes that call, so the server's stop() waited forever; the guard decodes requests
    itself: INVALID_ARGUMENT naming the message, other streams unaffected, stop() returns."""
    config = make_config(tmp_path, sae_dir)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    stopped = threading.Event()
    try:
        with grpc.insecure_channel(server.addresses[0]) as channel:
            raw_inspect = channel.stream_stream("/guard.v1.Guard/Inspect", None, None)
            with pytest.raises(grpc.RpcError) as ended:
                list(raw_inspect(iter([b"\xff\xff\xff"]), timeout=30))
            assert ended.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "message 1 on this call is not a guard.v1.InspectRequest" in str(
                ended.value.details())
            raw_describe = channel.unary_unary("/guard.v1.Guard/Describe", None, None)
            with pytest.raises(grpc.RpcError) as refused:
                raw_describe(b"\xff\xff\xff", timeout=30)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "guard.v1.DescribeRequest" in str(refused.value.details())
            stream = StreamClient(channel)
            stream.configure()
            reply = stream.ask(make_batch(np.zeros((2, D_IN), np.float32)))
            assert reply.action == pb.ACTION_CONTINUE
            stream.close()
    finally:
        def stop() -> None:
            server.stop(0)
            stopped.set()

        threading.Thread(target=stop, daemon=True).start()
        # A liveness bound, not a timing: before the fix this waited forever.
        assert stopped.wait(60), "GuardServer.stop(0) did not return"


def test_rows_that_overflow_the_sae_get_an_error_not_nan_scores(stream: StreamClient) -> None:
    """Finite rows so large that the encode overflows float32 would give NaN feature scores,
    on which a detector silently does not fire: the batch is refused (the host's failure
    policy decides) and the stream goes on."""
    stream.configure()
    huge = np.full((2, D_IN), 3e38, dtype=np.float32)
    huge[:, ::2] = -3e38
    reply = stream.ask(make_batch(huge, sequence=1))
    assert reply.HasField("error")
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "2 of 2 rows of" in reply.error.message
    assert "out of the range its SAE can encode" in reply.error.message
    assert "3e+38" not in reply.error.message  # never an activation value
    ok = stream.ask(make_batch(np.ones((2, D_IN), np.float32), sequence=2))
    assert not ok.HasField("error") and ok.action == pb.ACTION_CONTINUE


def test_a_servers_log_lines_reach_pytests_capture_not_stdout(
    running_server: GuardServer, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The stream's last line is written by the server's thread when the stream ends, maybe
    after the test did: it goes through logging (tests/conftest.py), which pytest captures,
    not to stdout, where it used to land in the middle of pytest's progress output."""
    with grpc.insecure_channel(running_server.addresses[0]) as channel:
        client = StreamClient(channel)
        client.configure()
        assert client.ask(make_batch(sequence=1)).action == pb.ACTION_CONTINUE
        client.close()
    deadline = time.monotonic() + 10
    while "stream closed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "stream closed" in caplog.text
    assert capsys.readouterr().out == ""
