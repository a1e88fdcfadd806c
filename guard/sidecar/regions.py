"""Shared-memory regions of one Inspect stream: the in-pod fast path (opt-in).

Modelled on Triton's system shared memory. The host registers regions in its StreamConfig
(``shared_memory``); a batch's ``Tensor.shm`` then names a byte range of a region instead of
carrying the bytes, and ``ActivationBatch.steering_ref`` may name where the guard writes the
steering delta. Regions belong to one stream: :meth:`RegionTable.close` closes them when the
stream ends.

What a region must pass to be opened (``server.shared_memory``; each failure ends the stream
with a status naming ``config.shared_memory[i]`` and what was expected):

- shared memory is enabled, and the stream registers at most ``max_regions_per_stream``
  regions, each with a non-empty unique name and a size > 0;
- the path is absolute, normalised (no ``..``), and its folder, with symbolic links resolved,
  is one of ``allowed_dirs`` (also resolved) or below one;
- the file is opened with ``O_NOFOLLOW`` (the last component is not a symbolic link) and then
  checked on the open descriptor (no window between check and use): a regular file, one hard
  link (no alias of another file), not writable by others, owned by the guard's effective uid
  or one of ``allowed_uids`` (gRPC does not tell the guard the peer's uid, so the owner is what
  is checked; on the doorbell, whose peer's uid the kernel tells, it must also be the peer's
  own file), and exactly ``size`` bytes long;
- a ``writable`` region is opened read-write (the guard writes steering deltas there),
  otherwise read-only.

Every reference is checked before use: a registered region, ``offset + length`` within the
region, ``offset`` a multiple of the item size, ``length`` equal to the tensor's byte length,
and the file not shrunk since registration. A bad reference gets the per-batch error reply
(NOT_FOUND for an unknown region, INVALID_ARGUMENT otherwise) and the stream goes on.

Rows are read with ``pread`` into a private buffer (one copy; F32 rows are then a view on it)
and steering deltas written with ``pwrite``; the guard never maps a region. A mapping would
save that copy, but a host that shrinks the file while a batch is read or written would make
the pages past the new end raise SIGBUS, which kills the guard and every stream it serves; a
short read is a per-batch INVALID_ARGUMENT instead. The descriptor is closed when the stream
ends, however it ends (the server calls :meth:`RegionTable.close` from its ``finally``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog
from numpy.typing import NDArray

from guard.config import SharedMemoryConfig
from guard.errors import GuardError, InvalidInput, NotFound, ProtocolViolation
from guard.wire import codec

log = structlog.get_logger(__name__)

_ITEMSIZE: Final = codec.DATATYPES


class RegionRefused(GuardError):
    """A region's file is outside the allowed folders, or has the wrong owner or type."""

    code = "PERMISSION_DENIED"


class RegionLimit(GuardError):
    """More regions than ``server.shared_memory.max_regions_per_stream``."""

    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True, slots=True)
class Ref:
    """A validated byte range of a region."""

    region: OpenRegion
    offset: int
    length: int


class OpenRegion:
    """One registered file, open for the life of its stream (the descriptor checked at
    registration). Rows are read with ``pread`` into a private buffer and deltas written
    with ``pwrite``, never through a mapping: a host that shrinks the file mid-batch would
    make a mapping's pages past the new end raise SIGBUS, which kills the whole guard."""

    def __init__(self, name: str, path: str, size: int, writable: bool, fd: int) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.writable = writable
        self._fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:
            raise InvalidInput(f"region {self.name!r} is closed (its stream ended)")
        return fd

    def file_size(self) -> int:
        """The file's size now (fstat on the registered descriptor)."""
        return os.fstat(self._descriptor()).st_size

    def check_range(self, field: str, offset: int, length: int, itemsize: int) -> None:
        if offset + length > self.size:
            raise InvalidInput(
                f"{field}: offset {offset} + length {length} = {offset + length} exceeds "
                f"region {self.name!r} of {self.size} bytes")
        if offset % itemsize:
            raise InvalidInput(
                f"{field}.offset: expected a multiple of the item size {itemsize}, "
                f"found {offset}")
        now = self.file_size()
        if now < offset + length:
            raise InvalidInput(self._shrank(field, now))

    def _shrank(self, field: str, now: int) -> str:
        return (f"{field}: region {self.name!r} ({self.path}) shrank to {now} bytes since it "
                f"was registered with {self.size}; expected the file to keep its size while "
                "the stream is open")

    def read(self, field: str, offset: int, length: int) -> bytes:
        """A private copy of ``length`` bytes at ``offset``; a file cut short meanwhile is an
        InvalidInput naming ``field``, never a crash."""
        data = os.pread(self._descriptor(), length, offset) if length else b""
        if len(data) < length:
            raise InvalidInput(self._shrank(field, self.file_size()))
        return data

    def write(self, offset: int, datatype: str, array: NDArray[np.floating]) -> None:
        """Encode ``array`` in ``datatype`` and write it at ``offset`` (``pwrite``: a file
        that shrank meanwhile grows back rather than fault)."""
        _shape, data = codec.encode(array, datatype)
        written = os.pwrite(self._descriptor(), data, offset)
        if written != len(data):
            raise OSError(f"short write to region {self.name!r}: {written} of {len(data)} "
                          "bytes")

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _within(folder: Path, roots: Sequence[Path]) -> bool:
    return any(folder == root or root in folder.parents for root in roots)


def open_region(config: SharedMemoryConfig, field: str, name: str, path: str, size: int,
                writable: bool, peer_uid: int | None = None) -> OpenRegion:
    """Check a registration against ``config`` and open its file; errors name ``field``."""
    if not path or not os.path.isabs(path):
        raise InvalidInput(f"{field}.path: expected an absolute path, found {path!r}")
    if "\x00" in path:
        raise InvalidInput(f"{field}.path: expected a path without NUL characters, "
                           f"found {path!r}")
    if os.path.normpath(path) != path or ".." in Path(path).parts:
        raise InvalidInput(f"{field}.path: expected a normalised path (no '..', '.' or '//'), "
                           f"found {path!r}")
    roots = [Path(os.path.realpath(d)) for d in config.allowed_dirs]
    folder = Path(os.path.realpath(os.path.dirname(path)))
    if not _within(folder, roots):
        raise RegionRefused(
            f"{field}.path: expected a file in {', '.join(config.allowed_dirs)} "
            f"(server.shared_memory.allowed_dirs), found {path!r}"
            + (f" (its folder resolves to {folder})" if str(folder) != os.path.dirname(path)
               else ""))
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError as exc:
        raise NotFound(f"{field}.path: no file at {path!r}") from exc
    except OSError as exc:
        if os.path.islink(path):
            raise RegionRefused(f"{field}.path: expected a regular file, found a symbolic link "
                                f"at {path!r}") from exc
        mode = "read-write (writable: true)" if writable else "read-only"
        raise RegionRefused(f"{field}.path: cannot open {path!r} {mode}: "
                            f"{exc.strerror}") from exc
    keep = False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RegionRefused(f"{field}.path: expected a regular file, found "
                                f"{_kind(info.st_mode)} at {path!r}")
        if info.st_nlink != 1:
            raise RegionRefused(f"{field}.path: expected a file with one link, found "
                                f"{info.st_nlink} links to {path!r}")
        if info.st_mode & stat.S_IWOTH:
            raise RegionRefused(f"{field}.path: expected a file not writable by others, found "
                                f"mode {stat.S_IMODE(info.st_mode):04o} on {path!r}")
        owners = {os.geteuid(), *config.allowed_uids}
        if info.st_uid not in owners:
            raise RegionRefused(
                f"{field}.path: expected a file owned by uid "
                f"{' or '.join(str(u) for u in sorted(owners))} (the guard's uid or "
                f"server.shared_memory.allowed_uids), found uid {info.st_uid} on {path!r}")
        if peer_uid is not None and info.st_uid != peer_uid:
            raise RegionRefused(
                f"{field}.path: expected a file owned by the stream's own uid {peer_uid} (the "
                f"doorbell's peer: a host registers only its own files), found uid "
                f"{info.st_uid} on {path!r}")
        if info.st_size != size:
            raise InvalidInput(f"{field}.size: the file {path!r} is {info.st_size} bytes, "
                               f"found size {size}")
        os.set_blocking(fd, True)
        keep = True
        return OpenRegion(name, path, size, writable, fd)
    finally:
        if not keep:
            os.close(fd)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


class RegionTable:
    """The regions registered on one stream (``config`` None: shared memory is disabled)."""

    def __init__(self, config: SharedMemoryConfig | None, peer_uid: int | None = None) -> None:
        self._config = config if config is not None and config.enabled else None
        #: The uid of the process at the other end, when the transport tells it (the
        #: doorbell's SO_PEERCRED; gRPC does not): region files must then be its own.
        self._peer_uid = peer_uid
        self._regions: dict[str, OpenRegion] = {}

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def regions(self) -> dict[str, OpenRegion]:
        return dict(self._regions)

    def register(self, registrations: Sequence[tuple[str, str, int, bool]]) -> None:
        """Open every region of a StreamConfig (name, path, size, writable); all or nothing."""
        if not registrations:
            return
        if self._config is None:
            raise ProtocolViolation(
                "config.shared_memory: this guard accepts no shared-memory regions "
                "(server.shared_memory.enabled is false); send tensors as bytes (Tensor.raw)")
        limit = self._config.max_regions_per_stream
        if len(registrations) > limit:
            raise RegionLimit(
                f"config.shared_memory: expected at most {limit} regions per stream "
                f"(server.shared_memory.max_regions_per_stream), found {len(registrations)}")
        try:
            for index, (name, path, size, writable) in enumerate(registrations):
                field = f"config.shared_memory[{index}]"
                if not name:
                    raise InvalidInput(f"{field}.name: expected a non-empty name, found ''")
                if name in self._regions:
                    raise InvalidInput(f"{field}.name: expected a name unique on the stream, "
                                       f"found {name!r} twice")
                if size <= 0:
                    raise InvalidInput(f"{field}.size: expected the file's size in bytes "
                                       f"(> 0), found {size}")
                self._regions[name] = open_region(self._config, field, name, path, size,
                                                  writable, self._peer_uid)
        except BaseException:
            self.close()
            raise
        log.info("shared-memory regions registered",
                 regions={n: r.path for n, r in self._regions.items()})

    def resolve(self, field: str, region: str, offset: int, length: int, datatype: str,
                expected: int, *, write: bool = False) -> Ref:
        """Check a reference against its region and the tensor's byte length ``expected``."""
        mapped = self._regions.get(region)
        if mapped is None:
            known = ", ".join(repr(n) for n in sorted(self._regions)) or "none"
            if self._config is None:
                known += " (server.shared_memory.enabled is false on this guard)"
            raise NotFound(f"{field}.region: {region!r} is not registered on this stream; "
                           f"registered regions: {known}")
        if write and not mapped.writable:
            raise InvalidInput(f"{field}.region: {region!r} was registered read-only; expected "
                               "a region registered with writable: true")
        if length != expected:
            raise InvalidInput(f"{field}.length: expected {expected} bytes (the tensor's "
                               f"datatype and shape), found {length}")
        mapped.check_range(field, offset, length, _ITEMSIZE[datatype])
        return Ref(mapped, offset, length)

    def rows(self, field: str, region: str, offset: int, length: int, datatype: str,
             shape: tuple[int, int]) -> NDArray[np.float32]:
        """Decode a batch's rows from a region (read into a private buffer: F32 rows are a
        read-only view on it, not another copy)."""
        ref = self.resolve(field, region, offset, length, datatype,
                           codec.expected_nbytes(datatype, shape))
        return codec.decode(datatype, shape, ref.region.read(field, ref.offset, ref.length))

    def close(self) -> None:
        """Close every region (the stream ended)."""
        regions, self._regions = self._regions, {}
        for region in regions.values():
            with contextlib.suppress(Exception):  # never let cleanup end the server's loop
                region.close()
