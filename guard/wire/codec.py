"""Tensor codec: wire tensors (datatype, shape, raw bytes) to NumPy arrays and back.

The wire convention is KServe v2 / Triton's: a datatype string, a shape, and row-major
little-endian raw bytes. NumPy has no bfloat16, so BF16 is decoded by shifting its 16 bits
into the high half of a float32 (exact) and encoded by rounding float32 to nearest-even.
Decoding F32 is zero-copy (a read-only view on the message's bytes) on little-endian hosts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray

from guard.decision import Phase, RowRole
from guard.errors import InvalidInput

#: Datatypes the guard accepts on the wire, with their item size in bytes.
DATATYPES: Final[dict[str, int]] = {"F32": 4, "F16": 2, "BF16": 2}

_LITTLE_ENDIAN = sys.byteorder == "little"
_MAX_DIMS: Final = 64  # NumPy's limit on ndim
_MAX_BYTES: Final = sys.maxsize
_NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}


#: Longest request id, in UTF-8 bytes, that a batch, a segment or a RequestEnded may carry:
#: ids go into logs, replies, spans and decision records, so a longer one is refused
#: (INVALID_ARGUMENT), never quoted.
MAX_REQUEST_ID_BYTES: Final = 256
#: Longest hook name, in UTF-8 bytes (a batch's ``hook``, a StreamConfig's ``hooks``).
MAX_HOOK_BYTES: Final = 256
#: Longest host name, in UTF-8 bytes (a StreamConfig's ``host``, which the guard logs).
MAX_HOST_BYTES: Final = 256


def oversized(value: str, limit: int) -> int:
    """The UTF-8 length of ``value`` when it exceeds ``limit`` bytes, else 0 (cheap for
    short strings: no encoding below ``limit // 4`` characters)."""
    if len(value) <= limit // 4:
        return 0
    size = len(value.encode("utf-8", "surrogatepass"))
    return size if size > limit else 0


def check_identifier(field: str, value: str, limit: int) -> None:
    """Refuse an id or name longer than ``limit`` UTF-8 bytes (:class:`InvalidInput` naming
    the field and both lengths, never quoting the value)."""
    size = oversized(value, limit)
    if size:
        raise InvalidInput(f"{field}: expected at most {limit} bytes (UTF-8), found {size} "
                           "bytes")


def shown(value: str, limit: int = MAX_REQUEST_ID_BYTES) -> str:
    """``value`` as an error message or a log line may quote it: its repr, or only its
    length when it is longer than ``limit`` bytes."""
    size = oversized(value, limit)
    return f"<{size} bytes>" if size else repr(value)


#: The largest ``RowRole`` value this guard knows; a larger one is refused.
_MAX_ROLE: Final = max(RowRole)


def row_roles(field: str, values: Sequence[int], n_rows: int) -> NDArray[np.int8] | None:
    """A batch's per-row roles as int8 (None when it sent none); :class:`InvalidInput`
    naming ``field`` when they are not one per row or not all known ``RowRole`` values."""
    if not values:
        return None
    if len(values) != n_rows:
        raise InvalidInput(f"{field}: expected none or one per row ({n_rows}), "
                           f"found {len(values)}")
    wide = np.array(values, dtype=np.int64)
    bad = np.flatnonzero((wide < 0) | (wide > _MAX_ROLE))
    if bad.size:
        first = int(bad[0])
        raise InvalidInput(
            f"{field}[{first}]: expected a RowRole (0 to {int(_MAX_ROLE)}: "
            f"{', '.join(f'ROLE_{r.name}' for r in RowRole)}), found {int(wide[first])}"
            + (f" ({bad.size} rows hold unknown values)" if bad.size > 1 else ""))
    return wide.astype(np.int8)


def prompt_complete(field: str, value: bool, phase: Phase) -> bool:
    """A batch's (or segment's) ``prompt_complete``, which only a PROMPT batch may set;
    :class:`InvalidInput` naming ``field`` otherwise."""
    if phase is not Phase.PROMPT:
        raise InvalidInput(f"{field}: only meaningful for phase PHASE_PROMPT, found it set "
                           f"({str(value).lower()}) with phase PHASE_{phase.name}; leave it "
                           "unset")
    return bool(value)


def expected_nbytes(datatype: str, shape: Sequence[int]) -> int:
    """Byte length of a tensor of this datatype and shape; validates both."""
    itemsize = DATATYPES.get(datatype)
    if itemsize is None:
        raise InvalidInput(
            f"tensor datatype: expected one of {', '.join(DATATYPES)}, found {datatype!r}"
        )
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"tensor shape: expected at most {_MAX_DIMS} dimensions, "
                           f"found {len(shape)}")
    count = 1
    extent = itemsize  # NumPy refuses a shape whose nonzero sides overflow, even if empty
    for dim in shape:
        if dim < 0:
            raise InvalidInput(f"tensor shape: dimensions must be >= 0, found {list(shape)}")
        count *= dim
        extent *= max(dim, 1)
    if extent > _MAX_BYTES:
        raise InvalidInput(f"tensor shape: {list(shape)} is too large for any array")
    return count * itemsize


def decode(datatype: str, shape: Sequence[int], raw: bytes) -> NDArray[np.float32]:
    """Decode wire bytes into a float32 array of ``shape``.

    F32 returns a read-only view on ``raw`` (no copy); F16 and BF16 are widened to float32
    (one copy). Raises :class:`InvalidInput` naming the datatype, the shape and the byte
    lengths expected and found.
    """
    shape = tuple(int(d) for d in shape)
    nbytes = expected_nbytes(datatype, shape)
    if len(raw) != nbytes:
        raise InvalidInput(
            f"tensor raw: {datatype} with shape {list(shape)} needs {nbytes} bytes, "
            f"found {len(raw)}"
        )
    flat = np.frombuffer(raw, dtype=_NUMPY_DTYPES[datatype])
    if datatype == "F32":
        out = flat if _LITTLE_ENDIAN else flat.astype(np.float32)
    elif datatype == "F16":
        out = flat.astype(np.float32)
    else:
        out = (flat.astype(np.uint32) << 16).view(np.float32)
    return out.reshape(shape)


def encode(array: NDArray[np.floating], datatype: str = "F32") -> tuple[list[int], bytes]:
    """Encode an array as (shape, raw bytes) in ``datatype``; returns copies, C order."""
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"tensor datatype: expected one of {', '.join(DATATYPES)}, found {datatype!r}"
        )
    shape = [int(d) for d in array.shape]
    if datatype == "F32":
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    elif datatype == "F16":
        raw = np.ascontiguousarray(array, dtype="<f2").tobytes()
    else:
        raw = float32_to_bf16_bits(np.asarray(array, dtype=np.float32)).astype("<u2").tobytes()
    return shape, raw


def float32_to_bf16_bits(array: NDArray[np.float32]) -> NDArray[np.uint16]:
    """Round float32 to bfloat16 (nearest, ties to even) and return the 16-bit patterns.

    NaN stays NaN (quiet); infinities and signed zeros are kept.
    """
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def nonfinite_rows(array: NDArray[np.float32]) -> NDArray[np.intp]:
    """Indices of the rows of a 2-D array that hold a NaN or an infinity."""
    # Fast path, one float32 reduction: NaN and Inf always propagate into the total, so a
    # finite total proves every row finite. A non-finite total (also from an overflow of
    # huge finite values) falls through to the exact per-row check.
    # The overflow and Inf - Inf are expected here: no RuntimeWarning (an error under -W error).
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum(dtype=np.float32)
    if np.isfinite(total):
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(~np.isfinite(array).all(axis=1))
