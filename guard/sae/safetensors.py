"""A strict safetensors reader and a small writer, in NumPy only (the sidecar never imports torch).

Format: 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}`` (offsets relative to the end of the header), then
the raw little-endian data. Every check that could catch a truncated or inconsistent file
is made, and every error names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import SaeFileError

# Largest header we accept: real SAE files have a few tensors, so anything bigger is corrupt.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    # BF16 has no NumPy dtype: read as uint16 and widen by bit-shifting into float32.
    "BF16": np.dtype("<u2"),
}
_NAMES_FOR_WRITING = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the first data byte in the file."""
    end: int


class SafetensorsFile:
    """An opened, validated safetensors file whose tensors are read on demand.

    Tensors are memory-mapped, so reading a few rows of a large matrix touches only those rows.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._read_header()

    def _read_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise SaeFileError(
                        self.path, f"truncated safetensors file: {size} bytes, no header length"
                    )
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                    raise SaeFileError(
                        self.path,
                        f"safetensors header length {header_len} does not fit in a file of "
                        f"{size} bytes (truncated or not a safetensors file)",
                    )
                raw_header = f.read(header_len)
        except OSError as e:
            raise SaeFileError(self.path, f"cannot read file: {e.strerror or e}") from e
        try:
            header = json.loads(raw_header)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SaeFileError(self.path, f"safetensors header is not valid JSON: {e}") from e
        except RecursionError as e:  # nesting deeper than Python's recursion limit
            raise SaeFileError(self.path, "safetensors header is not valid JSON: nested too "
                                          "deeply") from e
        if not isinstance(header, dict):
            raise SaeFileError(self.path, "safetensors header: expected a JSON object")
        data_start = 8 + header_len
        data_len = size - data_start
        for name, spec in header.items():
            if name == "__metadata__":
                if isinstance(spec, dict):
                    self.metadata = {str(k): str(v) for k, v in spec.items()}
                continue
            self.entries[name] = self._entry(name, spec, data_start, data_len)

    def _entry(self, name: str, spec: object, data_start: int, data_len: int) -> TensorEntry:
        where = f"tensor {name!r}"
        if not isinstance(spec, dict):
            raise SaeFileError(self.path, f"{where}: expected a header object, found {spec!r}")
        dtype = spec.get("dtype")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if dtype not in _DTYPES:
            raise SaeFileError(
                self.path, f"{where}: dtype expected one of {sorted(_DTYPES)}, found {dtype!r}"
            )
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SaeFileError(
                self.path, f"{where}: shape must be a list of sizes, found {shape!r}"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise SaeFileError(
                self.path, f"{where}: data_offsets must be [begin, end], found {offsets!r}"
            )
        begin, end = offsets
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SaeFileError(
                self.path,
                f"{where}: data_offsets span {end - begin} bytes but dtype {dtype} with shape "
                f"{shape} needs {expected}",
            )
        if end > data_len:
            raise SaeFileError(
                self.path,
                f"{where}: data ends at byte {end} of the data section but the file holds only "
                f"{data_len} data bytes (truncated file)",
            )
        return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> NDArray[Any]:
        """The tensor in its stored dtype (BF16 as uint16), memory-mapped read-only."""
        entry = self.entries.get(name)
        if entry is None:
            raise SaeFileError(
                self.path, f"missing tensor {name!r}; the file has {sorted(self.entries)}"
            )
        dtype = _DTYPES[entry.dtype]
        if math.prod(entry.shape) == 0:
            return np.zeros(entry.shape, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=entry.start, shape=entry.shape)

    def float32(self, name: str) -> NDArray[np.float32]:
        """The tensor widened to a float32 array in memory."""
        stored = self.raw(name)
        if self.entries[name].dtype == "BF16":
            return bf16_to_float32(stored)
        with np.errstate(over="ignore"):  # F64 beyond the float32 range: refused below
            out = np.array(stored, dtype=np.float32)
        if self.entries[name].dtype == "F64":
            overflow = np.isinf(out) & np.isfinite(stored)
            if overflow.any():
                raise SaeFileError(
                    self.path,
                    f"tensor {name!r}: F64 values beyond the float32 range "
                    f"(e.g. {float(stored[overflow][0])!r})",
                )
        return out

    def float32_rows(self, name: str, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        """Selected rows of a 2-D tensor as float32, reading only those rows from disk."""
        stored = self.raw(name)
        picked = np.asarray(stored[rows])
        if self.entries[name].dtype == "BF16":
            return bf16_to_float32(picked)
        return picked.astype(np.float32)


def bf16_to_float32(bits: NDArray[Any]) -> NDArray[np.float32]:
    """Widen raw bfloat16 bit patterns (uint16) to float32: bf16 is the top half of a float32."""
    widened = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16
    return widened.view(np.float32)


def write_safetensors(
    path: Path,
    tensors: Mapping[str, NDArray[Any]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write float32/float16 tensors as a safetensors file (header padded to 8 bytes)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays: list[NDArray[Any]] = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES_FOR_WRITING:
            raise ValueError(f"tensor {name!r}: cannot write dtype {array.dtype}")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _NAMES_FOR_WRITING[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for array in arrays:
            array.tofile(f)


def sha256_of_files(paths: Iterable[Path]) -> str:
    """The sha256 of the files' bytes, concatenated in the given order (1 MiB reads)."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as e:
            raise SaeFileError(path, f"cannot read file: {e.strerror or e}") from e
    return digest.hexdigest()
