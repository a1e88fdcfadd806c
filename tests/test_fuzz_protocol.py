"""Property-based fuzzing of the Inspect protocol against a live guard, and of the codec.

A real GuardServer (SAELens SAE, detectors and steering plugins, shared memory on) on a Unix
socket and a real gRPC channel, and its doorbell socket. Each example is one whole stream; an
oracle (``tests.fuzz_strategies.simulate``) says what each message must get. Properties: no
stream hangs (every call has a gRPC deadline), every rejection is a per-batch error naming
the field or a stream status with details (never UNKNOWN or INTERNAL; undecodable bytes are
INVALID_ARGUMENT), valid batches get a decision, and a known-good stream still works after
every example. Streams register real region files (well and badly) and refer to them
(``Tensor.shm``, ``steering_ref``): the oracle knows the files' bytes, a delta asked for in a
region must be there, and nothing else in a region may change. Batches with segments (engine
steps) get one verdict per request or an error naming the segment field; RequestEnded
messages get no reply.

The suite runs ~150 examples per property with a fixed seed (``derandomize``); ``-s`` prints
the counts. ``python -m bench.fuzz`` runs the same properties for longer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.errors import InvalidInput
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.wire import codec
from tests.fuzz_strategies import (
    byte_streams,
    check_decode,
    check_still_serving,
    check_stream,
    codec_inputs,
    current_regions,
    fuzz_server,
    good_config,
    streams,
)

EXAMPLES = 200
#: The server fixture is module-scoped on purpose: one live guard takes every example (that
#: is the point: it must keep serving), so the function-scoped-fixture check does not apply.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

COUNTS: dict[str, Counter[str]] = {}


def _count(prop: str, outcomes: list[str]) -> None:
    counter = COUNTS.setdefault(prop, Counter())
    counter["cases"] += 1
    counter.update(outcomes)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[GuardServer, grpc.Channel]]:
    with fuzz_server() as pair:
        yield pair
    for prop, counter in sorted(COUNTS.items()):
        print(f"\nfuzz {prop}: {counter['cases']} cases; "
              + ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if k != "cases"))


@FUZZ
@given(messages=streams())
def test_fuzzed_streams_get_the_documented_answers(
    live: tuple[GuardServer, grpc.Channel], messages: list[pb.InspectRequest]
) -> None:
    _, channel = live
    _count("streams", check_stream(channel, messages))
    check_still_serving(channel)


@FUZZ
@given(messages=byte_streams())
def test_malformed_bytes_end_the_stream_cleanly(
    live: tuple[GuardServer, grpc.Channel], messages: list[bytes]
) -> None:
    _, channel = live
    _count("bytes", check_stream(channel, messages))
    check_still_serving(channel)


@FUZZ
@given(messages=streams())
def test_fuzzed_doorbell_streams_get_the_same_answers(
    live: tuple[GuardServer, grpc.Channel], messages: list[pb.InspectRequest]
) -> None:
    """The same oracle on the doorbell socket: a StreamEnd frame where gRPC has a status."""
    server, channel = live
    assert server.doorbell is not None
    _count("doorbell streams", check_stream(server.doorbell.path, messages))
    check_still_serving(server.doorbell.path)
    check_still_serving(channel)


@FUZZ
@given(messages=byte_streams())
def test_malformed_doorbell_frames_end_the_stream_cleanly(
    live: tuple[GuardServer, grpc.Channel], messages: list[bytes]
) -> None:
    server, channel = live
    assert server.doorbell is not None
    _count("doorbell bytes", check_stream(server.doorbell.path, messages))
    check_still_serving(server.doorbell.path)
    check_still_serving(channel)


def test_the_fuzzing_reached_every_kind_of_answer() -> None:
    """Guards the strategies: a change that stops them reaching a path fails here."""
    properties = ("streams", "bytes", "doorbell streams", "doorbell bytes")
    if any(prop not in COUNTS for prop in properties):
        pytest.skip("runs after the fuzz tests of this module")
    seen = set(COUNTS["streams"]) | set(COUNTS["bytes"])
    on_the_doorbell = set(COUNTS["doorbell streams"]) | set(COUNTS["doorbell bytes"])
    assert {"decision:CONTINUE", "error:INVALID_ARGUMENT", "status:FAILED_PRECONDITION",
            "status:RESOURCE_EXHAUSTED", "undecodable"} <= on_the_doorbell, COUNTS
    for outcome in ["decision:CONTINUE", "error:INVALID_ARGUMENT", "error:NOT_FOUND",
                    "error:ALREADY_EXISTS", "error:RESOURCE_EXHAUSTED",
                    "status:FAILED_PRECONDITION", "status:RESOURCE_EXHAUSTED",
                    "undecodable"]:
        assert outcome in seen, (outcome, COUNTS)
    # Shared memory, on both transports: regions registered, a stream refused for a bad
    # registration, per-batch errors for bad references (rows and steering_ref), decisions on
    # rows read from a region, rows refused for the NaN and Inf in a region, and a steering
    # delta written into a region.
    for transport, outcomes in (("gRPC", seen), ("doorbell", on_the_doorbell)):
        for path in ("shm:registered", "shm:refused:status:", "shm:ref:error:",
                     "shm:steering-ref:error:", "shm:rows:decision:",
                     "shm:nonfinite:error:INVALID_ARGUMENT", "shm:delta"):
            assert any(o.startswith(path) for o in outcomes), (transport, path, COUNTS)
    # Engine steps, on both transports: batches with valid segments decided (one verdict per
    # request), each kind of bad segments refused (RESOURCE_EXHAUSTED: too many), and
    # RequestEnded messages taken without a reply, or ending a stream not configured yet.
    for transport, outcomes in (("gRPC", seen), ("doorbell", on_the_doorbell)):
        assert "ended" in outcomes, (transport, COUNTS)
        for path in ("segments:decision:", "segments:error:INVALID_ARGUMENT",
                     "segments:error:RESOURCE_EXHAUSTED", "ended:status:FAILED_PRECONDITION"):
            assert any(o.startswith(path) for o in outcomes), (transport, path, COUNTS)


@pytest.mark.parametrize("name", ["ro\x00.bin", "a\x00b/ro.bin"])
@pytest.mark.parametrize("transport", ["grpc", "doorbell"])
def test_a_region_path_with_a_nul_byte_is_refused_naming_the_field(
    live: tuple[GuardServer, grpc.Channel], name: str, transport: str
) -> None:
    server, channel = live
    assert server.doorbell is not None
    config = good_config()
    config.shared_memory.add(name="r", path=f"{current_regions().folder}/{name}", size=4096)
    target = channel if transport == "grpc" else server.doorbell.path
    # The oracle: INVALID_ARGUMENT (or PERMISSION_DENIED, NOT_FOUND) naming the path field.
    assert check_stream(target, [pb.InspectRequest(config=config)])[0].startswith("status:")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(codec_inputs())
def test_decode_of_anything_is_a_shaped_array_or_invalid_input(
    case: tuple[str, list[int], bytes],
) -> None:
    _count("codec-decode", [check_decode(*case)])


_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=8)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(hnp.arrays(np.float32, _shapes, elements=st.floats(width=32, allow_nan=True)),
       st.sampled_from(["F32", "F16", "BF16"]))
def test_round_trip_every_datatype(array: np.ndarray, datatype: str) -> None:
    """F32 exact; F16 exact where float16 holds the value (else the cast's own rounding,
    overflow to Inf included); BF16 within its 8-bit mantissa, NaN and Inf kept."""
    with np.errstate(over="ignore"):
        shape, raw = codec.encode(array, datatype)
        expected = (array.astype(np.float16).astype(np.float32) if datatype == "F16"
                    else array)
    out = codec.decode(datatype, shape, raw)
    assert out.shape == array.shape and out.dtype == np.float32
    if datatype == "BF16":
        finite = np.isfinite(array) & (np.abs(array) < np.float32(3.38e38))
        np.testing.assert_array_equal(np.isnan(out), np.isnan(array))
        np.testing.assert_array_equal(out[np.isinf(array)], array[np.isinf(array)])
        error = np.abs(out[finite].astype(np.float64) - array[finite].astype(np.float64))
        assert np.all(error <= np.abs(array[finite].astype(np.float64)) * 2.0**-8 + 1e-38)
    else:
        np.testing.assert_array_equal(out, expected)
    _count("codec-round-trip", [datatype])


def test_nonfinite_rows_is_silent_on_overflow_and_inf_minus_inf() -> None:
    """Found by the fuzzing: the fast path's float32 sum warned ("invalid value encountered in
    reduce" for Inf + -Inf, "overflow" for huge finite rows); under -W error that turned a
    batch into INTERNAL. The answer is the exact per-row check, with no warning."""
    rows = np.array([[np.inf, -np.inf], [3e38, 3e38], [1.0, 2.0]], dtype=np.float32)
    assert codec.nonfinite_rows(rows).tolist() == [0]
    assert codec.nonfinite_rows(np.full((2, 4), 3e38, dtype=np.float32)).tolist() == []


@pytest.mark.parametrize("shape", [[0] * 65, [0, 2**62], [2**40, 2**40, 0]])
def test_decode_refuses_shapes_numpy_cannot_hold(shape: list[int]) -> None:
    """Found by the fuzzing: empty shapes with more than 64 sides or with overflowing sides
    raised NumPy's ValueError instead of InvalidInput."""
    with pytest.raises(InvalidInput, match="tensor shape"):
        codec.decode("F32", shape, b"")
