"""The host's shared-memory region: the in-pod fast path of the Inspect stream (opt-in).

A client built with ``shared_memory=...`` creates one file on a memory-backed folder
(``/dev/shm``, or an emptyDir with medium Memory mounted in both containers), maps it, and
registers it in the StreamConfig of every stream it opens. Each batch's rows are encoded
straight into a slot of the region and the batch carries only ``{region, offset, length}``;
with ``steering=True`` the guard writes a STEER delta back into the same slot (it reads the
rows first), and the client copies it out before the slot is reused. The file is unlinked
when the client closes (and at interpreter exit, should the client never be closed).

The file's pages are reserved when it is created (``posix_fallocate``): a folder with less
room left than the region gets no region (one error line; batches go as bytes) rather than a
SIGBUS at the first write past the room left. The client holds an exclusive ``flock`` on the
file while it lives; a client killed outright leaves its file unlocked, and the next region
created in the folder removes it (:func:`remove_stale_regions`).

Slots come from a ring allocator: batches take space at the head, their slots return when
their reply arrives (in time or late) or when their stream ends without one. A batch whose
deadline passed keeps its slot until then: the guard may still be reading it. When no slot is
free the batch goes as bytes, as without shared memory, and ``counters.shm_fallbacks`` counts
it. If the guard refuses the region (shared memory off, folder not allowed, another owner),
the stream ends with a status naming ``config.shared_memory``: the client logs it once and
sends bytes from then on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import stat
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog
from numpy.typing import NDArray

from guard.host._options import CounterBox
from guard.v1 import guard_pb2 as pb
from guard.wire import codec

log = structlog.get_logger("guard.host")

#: Default region size: 64 in-flight [32, 8192] F32 batches (or many more small ones).
DEFAULT_SIZE_BYTES: Final = 64 * 1024 * 1024
#: Slot alignment: a cache line (and every datatype's item size).
ALIGNMENT: Final = 64
#: What the guard's refusal of a region names (stream status details).
REFUSAL_MARKER: Final = "config.shared_memory"
#: The region files' names: ``activation-guard-<pid>-<random>.shm``.
REGION_PREFIX: Final = "activation-guard-"
REGION_SUFFIX: Final = ".shm"
_WIRE_DTYPES: Final[dict[str, str]] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class SharedMemory:
    """How a client uses shared memory; pass it (or just a folder) as ``shared_memory=``.

    :param directory: a memory-backed folder that the guard's container sees at the same path
        and lists in ``server.shared_memory.allowed_dirs``.
    :param size_bytes: the region's size: room for every batch in flight at once (INLINE
        callers waiting, MONITOR batches queued); when it is full, batches go as bytes.
    :param mode: the file's permissions: ``0o600`` (host and guard run as the same user) or
        ``0o660`` (another user in the same group; the guard then lists the host's uid in
        ``server.shared_memory.allowed_uids``). Never permissions for others.
    :param steering: ask the guard to write steering deltas into the batch's slot instead of
        the reply (the region is registered writable, so the guard must be able to write it).
    :param name: the region's name on the wire.
    :param doorbell: open streams on the guard's doorbell socket when its ``Describe`` names
        one (:mod:`guard.host.doorbell`: the same protocol without gRPC's exchange per
        batch); False: always gRPC.
    """

    directory: str = "/dev/shm"
    size_bytes: int = DEFAULT_SIZE_BYTES
    mode: int = 0o600
    steering: bool = True
    name: str = "host"
    doorbell: bool = True

    @classmethod
    def of(cls, value: object) -> SharedMemory | None:
        """Validate the ``shared_memory`` argument: None, a folder, or a SharedMemory."""
        if value is None:
            return None
        spec = cls(directory=os.fspath(value)) if isinstance(value, str | os.PathLike) else value
        if not isinstance(spec, SharedMemory):
            raise TypeError(f"shared_memory: expected a folder path, a SharedMemory or None, "
                            f"found {value!r}")
        if not isinstance(spec.directory, str) or not os.path.isabs(spec.directory):
            raise ValueError(f"shared_memory.directory: expected an absolute folder path, "
                             f"found {spec.directory!r}")
        if (isinstance(spec.size_bytes, bool) or not isinstance(spec.size_bytes, int)
                or spec.size_bytes < ALIGNMENT):
            raise ValueError(f"shared_memory.size_bytes: expected an integer >= {ALIGNMENT}, "
                             f"found {spec.size_bytes!r}")
        if (not isinstance(spec.mode, int) or spec.mode & ~0o777 or spec.mode & 0o007
                or spec.mode & 0o600 != 0o600):
            mode = f"{spec.mode:04o}" if isinstance(spec.mode, int) else repr(spec.mode)
            raise ValueError(f"shared_memory.mode: expected owner read-write and nothing for "
                             f"others, such as 0o600 or 0o660, found {mode}")
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"shared_memory.name: expected a non-empty string, "
                             f"found {spec.name!r}")
        if not isinstance(spec.doorbell, bool):
            raise TypeError(f"shared_memory.doorbell: expected True or False, "
                            f"found {spec.doorbell!r}")
        return spec


class _Block:
    __slots__ = ("end", "freed", "offset")

    def __init__(self, offset: int, end: int) -> None:
        self.offset = offset
        self.end = end
        self.freed = False


class RingAllocator:
    """Slots of a byte range handed out in ring order. A slot freed out of order is reused
    once the slots before it are free (replies come in order, so that is at once)."""

    def __init__(self, size: int, alignment: int = ALIGNMENT) -> None:
        self.size = size
        self._alignment = alignment
        self._live: deque[_Block] = deque()
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> _Block | None:
        """A slot of at least ``nbytes`` (aligned), or None when none is free."""
        need = max(self._alignment, -(-nbytes // self._alignment) * self._alignment)
        with self._lock:
            live = self._live
            if not live:
                offset: int | None = 0 if need <= self.size else None
            else:
                first, last = live[0].offset, live[-1]
                if last.offset >= first:  # not wrapped: free space at the end, then the start
                    offset = (last.end if self.size - last.end >= need
                              else 0 if first >= need else None)
                else:  # wrapped: free space between the newest and the oldest slot
                    offset = last.end if first - last.end >= need else None
            if offset is None:
                return None
            block = _Block(offset, offset + need)
            live.append(block)
            return block

    def free(self, block: _Block) -> None:
        with self._lock:
            block.freed = True
            live = self._live
            while live and live[0].freed:
                live.popleft()

    @property
    def in_use(self) -> int:
        """Slots not yet freed (including those waiting behind an older one)."""
        with self._lock:
            return len(self._live)


class Lease:
    """One batch's slot: its rows, and (with steering) the guard's delta."""

    __slots__ = ("_block", "_released", "length", "offset", "region")

    def __init__(self, region: HostRegion, block: _Block, length: int) -> None:
        self.region = region
        self._block = block
        self.offset = block.offset
        self.length = length
        self._released = False

    def release(self) -> None:
        """Return the slot (idempotent)."""
        if not self._released:
            self._released = True
            self.region.allocator.free(self._block)

    @property
    def released(self) -> bool:
        return self._released

    def ref(self) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region=self.region.spec.name, offset=self.offset,
                                  length=self.length)

    def tensor(self, datatype: str, shape: list[int]) -> pb.Tensor:
        """The batch's activations: a reference, or the bytes once the guard refused the
        region (a MONITOR batch queued before the refusal)."""
        if self.region.enabled:
            return pb.Tensor(datatype=datatype, shape=shape, shm=self.ref())
        return pb.Tensor(datatype=datatype, shape=shape, raw=self.region.read(self.offset,
                                                                               self.length))

    def steering_ref(self) -> pb.SharedMemoryRef | None:
        region = self.region
        return self.ref() if region.spec.steering and region.enabled else None


class HostRegion:
    """The client's region file, mapped read-write; thread-safe."""

    def __init__(self, spec: SharedMemory, counters: CounterBox) -> None:
        self.spec = spec
        self._counters = counters
        folder = Path(spec.directory)
        if not folder.is_dir():
            raise ValueError(f"shared_memory.directory: {spec.directory!r} is not a folder")
        remove_stale_regions(spec.directory)
        self._map: mmap.mmap | None = None
        self._array: NDArray[np.uint8] | None = None
        self.allocator = RingAllocator(spec.size_bytes)
        self._disabled = ""
        #: The guard said (Describe) that it accepts regions in this folder.
        self.confirmed = False
        #: The guard's doorbell socket (Describe), when this client may use it; else "".
        self.doorbell = ""
        self._full = False
        self._lock = threading.Lock()
        name = f"{REGION_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = str(folder / f"{name}{REGION_SUFFIX}")
        # Created under a name that the sweep of stale regions ignores, locked, then renamed:
        # a file with a region's name is locked for as long as its client lives (the lock
        # belongs to the open file, so the rename keeps it, and so does the fd kept open).
        creating = str(folder / f".{name}.creating")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(creating, flags, spec.mode)
        self._unlink = weakref.finalize(self, _release, creating, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._unlink()
            self._give_up(f"could not lock {creating}", error,
                          "a folder whose files can be locked (flock)")
            return
        except BaseException:
            self._unlink()
            raise
        try:
            os.rename(creating, self.path)
        except BaseException:
            self._unlink()
            raise
        # Unlinked (and unlocked) at close, or at exit or collection if the client is never
        # closed. A process killed outright leaves the file unlocked: the next region created
        # in the folder removes it.
        self._unlink.detach()
        self._unlink = weakref.finalize(self, _release, self.path, fd)
        try:
            os.fchmod(fd, spec.mode)  # the umask must not narrow it (0660 for a shared group)
            os.ftruncate(fd, spec.size_bytes)
            try:
                # Reserve the pages now: on a memory-backed folder with less room left than
                # the region, a sparse file kills this process with SIGBUS at the first write
                # into a page past what is left.
                os.posix_fallocate(fd, 0, spec.size_bytes)
            except OSError as error:
                self._unlink()
                self._give_up(f"could not reserve {spec.size_bytes} bytes in "
                              f"{spec.directory}", error,
                              "room for the region in the memory-backed folder (lower "
                              "SharedMemory(size_bytes=...), or enlarge the volume: the "
                              "emptyDir's sizeLimit, Docker's --shm-size)")
                return
            self._map = mmap.mmap(fd, spec.size_bytes)
        except BaseException:
            self._unlink()
            raise
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        log.info("shared-memory region created", path=self.path, size_bytes=spec.size_bytes,
                 mode=f"{stat.S_IMODE(spec.mode):04o}", steering=spec.steering)

    def _give_up(self, what: str, error: OSError, expected: str) -> None:
        """The region could not be made (its file is gone): send bytes from the start."""
        code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
        self._disabled = f"{what}: {f'{code}: {error.strerror}' if code else error}"
        log.error("shared-memory region not created: sending batches as bytes",
                  folder=self.spec.directory, size_bytes=self.spec.size_bytes,
                  error=self._disabled, expected=expected)

    @property
    def enabled(self) -> bool:
        return not self._disabled and self._array is not None

    def registration(self) -> pb.SharedMemoryRegion:
        spec = self.spec
        return pb.SharedMemoryRegion(name=spec.name, path=self.path, size=spec.size_bytes,
                                     writable=spec.steering)

    def place(self, rows: NDArray[np.floating], datatype: str, nbytes: int) -> Lease | None:
        """Encode ``rows`` in ``datatype`` into a free slot; None (counted) to send bytes."""
        array = self._array
        if array is None or self._disabled:
            self._counters.add("shm_fallbacks")
            return None
        block = self.allocator.allocate(nbytes)
        if block is None:
            fallbacks = self._counters.add("shm_fallbacks")
            if not self._full:  # one line per episode
                self._full = True
                log.warning("shared-memory region full: sending batches as bytes",
                            size_bytes=self.spec.size_bytes, batch_bytes=nbytes,
                            fallbacks=fallbacks)
            return None
        self._full = False
        target = array[block.offset:block.offset + nbytes].view(_WIRE_DTYPES[datatype])
        target = target.reshape(rows.shape)
        if datatype == "BF16":
            target[...] = codec.float32_to_bf16_bits(np.asarray(rows, dtype=np.float32))
        else:
            np.copyto(target, rows, casting="same_kind")
        self._counters.add("shm_batches")
        return Lease(self, block, nbytes)

    def read(self, offset: int, length: int) -> bytes:
        array = self._array
        return b"" if array is None else array[offset:offset + length].tobytes()

    @property
    def needs_check(self) -> bool:
        """Still to ask the guard (Describe) whether it accepts this region."""
        return self.enabled and not self.confirmed

    def check_guard(self, described: pb.DescribeResponse) -> None:
        """Keep the region only if the guard lists its folder in ``shared_memory_dirs``: a
        guard that predates shared memory, or has it off, would answer every batch sent by
        reference with an error (the failure policy's), not fall back to bytes."""
        folder = os.path.realpath(os.path.dirname(self.path))
        dirs = [os.path.realpath(d) for d in described.shared_memory_dirs]
        if any(folder == d or folder.startswith(d.rstrip("/") + "/") for d in dirs):
            self.confirmed = True
            self.doorbell = described.shared_memory_doorbell if self.spec.doorbell else ""
            return
        self.disable(f"the guard's Describe lists {dirs or 'no'} shared-memory folders, not "
                     f"{folder} (a guard without shared memory, or server.shared_memory off "
                     "or with other allowed_dirs)")

    def disable(self, reason: str) -> None:
        """The guard refused the region: send bytes from now on."""
        with self._lock:
            if self._disabled:
                return
            self._disabled = reason
        log.error("the guard refused the shared-memory region; sending batches as bytes "
                  "from now on (check server.shared_memory on the guard)", path=self.path,
                  reason=reason)

    def close(self) -> None:
        """Unmap and unlink the file, and release its lock (idempotent)."""
        mapping, self._map = self._map, None
        self._array = None
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a stray view: unmapped when it goes
                mapping.close()
        self._unlink()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _release(path: str, fd: int) -> None:
    """Unlink the region file, then close its fd (which releases its lock)."""
    try:
        _unlink_quietly(path)
    finally:
        os.close(fd)


def remove_stale_regions(directory: str) -> int:
    """Remove the region files in ``directory`` that no live client holds: regular files of
    this uid named ``activation-guard-*.shm`` whose lock can be taken (their owner died
    without closing its client: kill -9, a crash). Symbolic links, other names, other
    owners and locked files are left alone. Returns how many were removed (logged)."""
    removed = 0
    freed = 0
    try:
        with os.scandir(directory) as listing:
            entries = [entry for entry in listing if entry.name.startswith(REGION_PREFIX)
                       and entry.name.endswith(REGION_SUFFIX)]
    except OSError as error:
        log.warning("could not list the shared-memory folder for stale region files",
                    folder=directory, error=str(error))
        return 0
    uid = os.geteuid()
    for entry in entries:
        with contextlib.suppress(OSError):
            size = _remove_if_stale(entry, uid)
            if size is not None:
                removed += 1
                freed += size
    if removed:
        log.info("removed stale shared-memory region files (left by clients that exited "
                 "without closing)", folder=directory, removed=removed, freed_bytes=freed)
    return removed


def _remove_if_stale(entry: os.DirEntry[str], uid: int) -> int | None:
    """Unlink one candidate if it is unlocked; its size, or None when it was kept."""
    before = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(before.st_mode) or before.st_uid != uid:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(entry.path, flags)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            return None  # replaced since it was listed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live client holds it
        now = os.stat(entry.path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            return None  # already removed (and the name reused) by another sweep
        os.unlink(entry.path)
        return opened.st_size
    finally:
        os.close(fd)


class StreamShm:
    """One stream's view of the region: registration, and the slots of its batches by
    sequence number. With no region every method does nothing."""

    def __init__(self, region: HostRegion | None) -> None:
        self.region = region if region is not None and region.enabled else None
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()

    def configure(self, config: pb.StreamConfig) -> pb.StreamConfig:
        """The StreamConfig, with the region registered when there is one."""
        if self.region is not None:
            config.shared_memory.append(self.region.registration())
        return config

    def bind(self, sequence: int, lease: Lease | None) -> None:
        """The batch got this sequence number on this stream: its slot waits for the reply."""
        if lease is not None:
            with self._lock:
                self._leases[sequence] = lease

    def release(self, sequence: int) -> None:
        with self._lock:
            lease = self._leases.pop(sequence, None)
        if lease is not None:
            lease.release()

    def on_reply(self, reply: pb.InspectResponse) -> None:
        """Copy a delta the guard wrote into the batch's slot into the reply, then free the
        slot (the reply's own bytes are what the verdict decodes)."""
        if not self._leases:
            return
        with self._lock:
            lease = self._leases.pop(reply.sequence, None)
        if lease is None:
            return
        try:
            for steering in reply.steering:
                delta = steering.delta
                if delta.HasField("shm"):
                    ref = delta.shm
                    if (ref.region == lease.region.spec.name and ref.offset >= lease.offset
                            and ref.offset + ref.length <= lease.offset + lease.length):
                        delta.raw = lease.region.read(ref.offset, ref.length)
                        delta.ClearField("shm")
                    # else: left as is; the verdict reports the reply as invalid
        finally:
            lease.release()

    def close(self, reason: str, replies: int) -> None:
        """The stream ended: free every slot still bound to it. A stream refused before any
        reply because of the region disables shared memory for the client."""
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            lease.release()
        if self.region is not None and not replies and REFUSAL_MARKER in reason:
            self.region.disable(reason)


def release_unsent(lease: Lease | None) -> None:
    """A batch that was never sent (the stream was down, or the queue full): free its slot."""
    if lease is not None:
        lease.release()
