"""Tensor codec: round trips for every datatype, strict validation, zero copy, BF16."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from guard.errors import InvalidInput
from guard.wire import codec

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9)


@given(hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=True)))
@settings(max_examples=200, deadline=None)
def test_f32_round_trip_is_exact(array: np.ndarray) -> None:
    shape, raw = codec.encode(array, "F32")
    out = codec.decode("F32", shape, raw)
    assert out.dtype == np.float32
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@given(hnp.arrays(np.float16, shapes, elements=st.floats(width=16, allow_nan=True)))
@settings(max_examples=200, deadline=None)
def test_f16_round_trip_is_exact(array: np.ndarray) -> None:
    shape, raw = codec.encode(array, "F16")
    out = codec.decode("F16", shape, raw)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, array.astype(np.float32))


bf16_values = st.integers(0, 0xFFFF).map(
    lambda bits: float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
)


@given(hnp.arrays(np.float32, shapes, elements=bf16_values))
@settings(max_examples=200, deadline=None)
def test_bf16_round_trip_is_exact_for_bf16_values(array: np.ndarray) -> None:
    shape, raw = codec.encode(array, "BF16")
    assert len(raw) == array.size * 2
    out = codec.decode("BF16", shape, raw)
    np.testing.assert_array_equal(out, array)


@given(hnp.arrays(np.float32, st.just((64,)),
                  elements=st.floats(-2.0**100, 2.0**100, width=32, allow_nan=False,
                                                  allow_subnormal=False)))
@settings(max_examples=100, deadline=None)
def test_bf16_rounds_to_nearest(array: np.ndarray) -> None:
    """Each decoded value is the closest bf16 to the input (relative error <= 2**-9)."""
    shape, raw = codec.encode(array, "BF16")
    out = codec.decode("BF16", shape, raw)
    error = np.abs(out.astype(np.float64) - array.astype(np.float64))
    assert np.all(error <= np.abs(array.astype(np.float64)) * 2.0**-8 + 1e-38)


def test_bf16_known_bits() -> None:
    # 1.0 is 0x3F80; 1 + 2**-8 lies halfway between 0x3F80 and 0x3F81 and rounds to even.
    values = np.array([1.0, -2.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32)
    bits = codec.float32_to_bf16_bits(values)
    assert [hex(b) for b in bits] == ["0x3f80", "0xc000", "0x3f80", "0x3f82"]


def test_bf16_keeps_nan_and_inf() -> None:
    values = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    shape, raw = codec.encode(values, "BF16")
    out = codec.decode("BF16", shape, raw)
    assert np.isnan(out[0])
    assert out[1] == np.inf and out[2] == -np.inf
    assert np.signbit(out[3])


def test_f32_decode_is_zero_copy() -> None:
    raw = np.arange(12, dtype="<f4").tobytes()
    out = codec.decode("F32", [3, 4], raw)
    assert not out.flags.owndata
    assert not out.flags.writeable  # a view on the message's immutable bytes
    assert np.shares_memory(out, np.frombuffer(raw, dtype=np.uint8))


@pytest.mark.parametrize(
    ("datatype", "shape", "nbytes", "message"),
    [
        ("F64", [2, 2], 32, "expected one of F32, F16, BF16, found 'F64'"),
        ("", [2, 2], 16, "found ''"),
        ("F32", [2, 2], 15, "F32 with shape [2, 2] needs 16 bytes, found 15"),
        ("F16", [3, 4], 25, "F16 with shape [3, 4] needs 24 bytes, found 25"),
        ("BF16", [1, 8], 0, "BF16 with shape [1, 8] needs 16 bytes, found 0"),
        ("F32", [2, -1], 8, "dimensions must be >= 0"),
    ],
)
def test_decode_rejects_bad_input(datatype: str, shape: list[int], nbytes: int,
                                  message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        codec.decode(datatype, shape, b"\0" * nbytes)


def test_encode_rejects_unknown_datatype() -> None:
    with pytest.raises(InvalidInput, match="found 'I8'"):
        codec.encode(np.zeros(2, dtype=np.float32), "I8")


def test_nonfinite_rows() -> None:
    rows = np.zeros((5, 4), dtype=np.float32)
    rows[1, 2] = np.nan
    rows[3, 0] = -np.inf
    rows[4, :] = np.finfo(np.float32).max  # large but finite: kept
    assert codec.nonfinite_rows(rows).tolist() == [1, 3]
    assert codec.nonfinite_rows(np.zeros((0, 4), dtype=np.float32)).tolist() == []
