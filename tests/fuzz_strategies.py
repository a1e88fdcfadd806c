"""Hypothesis strategies and properties for fuzzing the wire protocol and the tensor codec.

Shared by the short suite (``tests/test_fuzz_protocol.py``) and the long run
(``bench/fuzz.py``). A fuzzed stream is a list of messages; :func:`simulate` is an oracle
that predicts, from the protocol rules the README documents, what the guard must answer to
each one, and :func:`check_stream` sends the messages to a live guard and compares. Every
check returns an outcome label (``decision:CONTINUE``, ``error:INVALID_ARGUMENT``,
``status:NOT_FOUND``...) so that the callers can count what the fuzzing exercised.

Shared memory is fuzzed against real region files: :func:`fuzz_server` writes them (and
files the guard must refuse: a symbolic link, a directory, a FIFO, a file writable by
others, a file with two links) in the guard's ``allowed_dirs``. Configs register them, well
or badly; batches refer to them (``Tensor.shm``, ``ActivationBatch.steering_ref``) with
offsets and lengths in and out of bounds, misaligned or huge. The oracle knows each file's
bytes, so it predicts a region batch's answer exactly, NaN refusal included; answers that
involved shared memory get a second label (``shm:...``).

Engine steps (several requests in one batch): batches sometimes carry ``segments``, valid
splits of their rows or each kind of bad one (row counts that do not sum, a segment of no
rows, an empty or repeated request id, more than the fuzz guard's ``MAX_SEGMENTS``), and some
streams are an engine's (:func:`step_streams`: every batch a step). The oracle predicts one
verdict per segment (request ids, each segment's slice of the positions, the batch's action
the most severe, a steering delta zero on the rows of requests not steered), or the error
naming the field; those answers get a ``segments:...`` label. Streams also carry
``RequestEnded`` messages: no reply (label ``ended``), or before the config the stream's end
(``ended:status:FAILED_PRECONDITION``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from guard.config import (
    TRANSPORT_HEADROOM,
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    SaeConfig,
    ServerConfig,
    SharedMemoryConfig,
)
from guard.engine.core import Engine
from guard.errors import InvalidInput
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard.wire import codec
from guard.wire.framing import FrameReader, send_frame
from tests.sae_fixtures import write_saelens

HOOK = "blocks.6.hook_resid_post"
D_IN, D_SAE = 16, 64
#: Small on purpose: the RESOURCE_EXHAUSTED paths (the guard's own and gRPC's) are reachable.
MAX_MESSAGE_BYTES = D_IN * 4 * 64
TRANSPORT_LIMIT = MAX_MESSAGE_BYTES * TRANSPORT_HEADROOM
#: gRPC deadline of every fuzzed stream: a hang ends as DEADLINE_EXCEEDED, which fails.
STREAM_TIMEOUT_S = 20.0
METHOD = "/guard.v1.Guard/Inspect"
#: What the guard answers when a message's bytes do not parse (it decodes requests itself).
DESERIALIZE_DETAILS = "is not a guard.v1.InspectRequest"
#: The guard's refusal of rows whose features overflow (guard.engine.core.check_finite_features).
NONFINITE_FEATURES = "encode to NaN or Inf feature activations"
#: The guard's refusal of rows beyond its SAE's range (guard.engine.core.check_input_range),
#: checked before the encode: the same huge rows, refused sooner.
OUT_OF_RANGE = "out of the range its SAE can encode"
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1
#: ``server.shared_memory.max_regions_per_stream`` (the default, which the fuzz guard keeps).
MAX_REGIONS = SharedMemoryConfig().max_regions_per_stream
#: The region files in the guard's shm folder: role -> (file name, size, mode, sprinkled
#: with non-finite words or not). ``ro.bin`` is read-only for its owner: registered
#: writable, the guard cannot open it read-write (unless it runs as root, which
#: :func:`make_regions` finds out).
REGION_FILES = {"ro": ("ro.bin", 64 * 1024, 0o400, True),
                "rw": ("rw.bin", 48 * 1024, 0o600, False)}
#: Bytes [start, end) of every region file that hold only NaN, +Inf and -Inf (float32 words
#: whose high halves are NaN or Inf in F16 and BF16 too): rows read there are refused.
NONFINITE_BYTES = (8192, 8704)
#: In a sprinkled file, one such word in every NONFINITE_EVERY bytes (the last of each
#: span): a read of that many bytes or more holds one, a shorter one may. Everywhere else
#: every 16-bit half is a finite F16 and BF16 value (and every 32-bit word a finite F32), so
#: rows of any datatype read at any aligned offset are finite and below 8.
NONFINITE_EVERY = 512
#: ``server.max_segments_per_batch`` of the fuzz guard: small, so that batches with more
#: segments (RESOURCE_EXHAUSTED) are cheap to draw.
MAX_SEGMENTS = 4
#: ``server.max_requests_per_stream`` of the fuzz guard: small, so that streams evict.
MAX_REQUESTS = 6
#: Region paths with a NUL character among the bad registrations (refused as INVALID_ARGUMENT
#: naming the path; they once raised ValueError: gRPC UNKNOWN, doorbell INTERNAL).
FUZZ_NUL_PATHS = True

PLUGIN_SETTINGS: dict[str, dict[str, Any]] = {
    "detectors": {
        "watch": {"hook": HOOK, "features": [3, 17], "threshold": 0.5, "action": "flag"},
        "stop": {"hook": HOOK, "features": [29], "threshold": 4.0, "action": "abort"},
    },
    "steering": {
        "calm": {"hook": HOOK, "when": "watch", "edits": [
            {"feature": 17, "scale": 0.5},
            {"feature": 40, "nudge": -1.0},
        ]},
    },
}


# --- shared-memory region files ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegionFile:
    """A region file the streams may register, and the bytes it holds at each stream's start."""

    path: str
    data: bytes = dataclasses.field(repr=False)
    #: This process (the guard's) can open the file read-write.
    opens_writable: bool

    @property
    def size(self) -> int:
        return len(self.data)

    def restore(self) -> None:
        """Put the original bytes back (steering deltas of the last stream overwrote some)."""
        if not self.opens_writable:
            return  # nobody can have written it
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, self.data, 0)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclasses.dataclass(frozen=True)
class Regions:
    """What the fuzz guard's shm folder holds, for the strategies and the oracle."""

    folder: str
    readonly: RegionFile
    writable: RegionFile
    #: Files the guard opens and then refuses (PERMISSION_DENIED): path -> the message
    #: fragment when registered read-only, and when registered writable.
    refused: Mapping[str, tuple[str, str]]
    #: Paths a registration may name to be refused, for every rule: relative, not
    #: normalised, outside the folder, missing, refused files, too long, below a file.
    bad_paths: tuple[str, ...]

    @property
    def files(self) -> tuple[RegionFile, RegionFile]:
        return self.readonly, self.writable

    def file(self, path: str) -> RegionFile | None:
        return next((f for f in self.files if f.path == path), None)


def region_bytes(size: int, seed: int, sprinkled: bool) -> bytes:
    """Region contents: random 16-bit halves, each a finite F16 in ±[2**-5, 2.5) whose bits
    are also a finite BF16 in ±[2**-47, 8), so any aligned read of any datatype is finite
    and small (rows that the detectors mostly steer, sometimes abort); but the
    NONFINITE_BYTES range holds NaN, +Inf and -Inf float32 words, and in a ``sprinkled``
    file one word in NONFINITE_EVERY bytes is one of them."""
    rng = np.random.default_rng(seed)
    n = size // 2
    exponent = rng.integers(10, 17, n)
    mantissa = rng.integers(0, 1024, n)
    mantissa = np.where(exponent == 16, mantissa % 256, mantissa)
    halves = ((rng.integers(0, 2, n) << 15) | (exponent << 10) | mantissa).astype("<u2")
    data = bytearray(halves.tobytes())
    start, end = NONFINITE_BYTES
    nonfinite = np.array([0x7FC00000, 0x7F800000, 0xFF800000], dtype="<u4")
    data[start:end] = np.resize(nonfinite, (end - start) // 4).tobytes()
    if sprinkled:
        for i, at in enumerate(range(NONFINITE_EVERY - 4, size, NONFINITE_EVERY)):
            data[at:at + 4] = nonfinite[i % 3:i % 3 + 1].tobytes()
    return bytes(data)


def _opens_writable(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return False
    os.close(fd)
    return True


def make_regions(folder: Path, outside: Path) -> Regions:
    """Write the region files and the files the guard must refuse into ``folder`` (the
    guard's allowed folder); ``outside`` is a folder outside it."""
    files: list[RegionFile] = []
    for seed, (name, size, mode, sprinkled) in enumerate(REGION_FILES.values()):
        path = folder / name
        path.write_bytes(region_bytes(size, seed, sprinkled))
        path.chmod(mode)
        files.append(RegionFile(str(path), path.read_bytes(), _opens_writable(path)))
    (folder / "link.bin").symlink_to(folder / "ro.bin")
    (folder / "dir").mkdir()
    os.mkfifo(folder / "fifo", 0o600)
    (folder / "shared.bin").write_bytes(bytes(4096))
    (folder / "shared.bin").chmod(0o606)
    (folder / "twin-a.bin").write_bytes(bytes(4096))
    (folder / "twin-a.bin").chmod(0o600)
    os.link(folder / "twin-a.bin", folder / "twin-b.bin")
    (folder / "linkdir").symlink_to(outside)
    (outside / "outside.bin").write_bytes(bytes(4096))
    (outside / "outside.bin").chmod(0o600)
    f = str(folder)
    symlink = "expected a regular file, found a symbolic link"
    regular = "expected a regular file"
    links = "expected a file with one link"
    others = "expected a file not writable by others"
    refused = {
        f"{f}/link.bin": (symlink, symlink),
        f"{f}/dir": (f"{regular}, found a directory", "cannot open"),
        f"{f}/fifo": (f"{regular}, found a FIFO", f"{regular}, found a FIFO"),
        f"{f}/shared.bin": (others, others),
        f"{f}/twin-a.bin": (links, links),
        f"{f}/twin-b.bin": (links, links),
    }
    bad_paths = (
        "", "ro.bin", "shm/ro.bin", "./ro.bin",
        f"{f}/./ro.bin", f"{f}//ro.bin", f"{f}/../shm/ro.bin", f"{f}/ro.bin/", f"{f}/..",
        str(outside / "outside.bin"), "/etc/passwd", "/", f, f"{f}/linkdir/outside.bin",
        f"{f}/missing.bin", f"{f}/sub/missing.bin", f"{f}/dir/missing.bin",
        f"{f}/ro.bin/inside", f"{f}/" + "x" * 300, *refused,
        *((f"{f}/ro\x00.bin", f"{f}/a\x00b/ro.bin") if FUZZ_NUL_PATHS else ()),
    )
    return Regions(f, files[0], files[1], refused, bad_paths)


#: The regions of the running fuzz_server (the strategies draw paths from it at draw time).
_REGIONS: Regions | None = None


def current_regions() -> Regions:
    if _REGIONS is None:
        raise RuntimeError("the shared-memory strategies and oracle need the region files "
                           "of a running fuzz_server()")
    return _REGIONS


# --- the live server -----------------------------------------------------------------------


def fuzz_config(workdir: Path) -> GuardConfig:
    """A guard with a real SAELens SAE, the detectors and the steering plugins (so every
    valid batch is encoded, inspected and may get a steering delta), and shared memory on
    (regions in ``workdir/shm``), so that it also serves the doorbell socket."""
    sae = write_saelens(workdir / "sae", D_IN, D_SAE, hook_name=HOOK)
    (workdir / "shm").mkdir()
    return GuardConfig(
        server=ServerConfig(listen=f"unix://{workdir}/guard.sock",
                            max_message_bytes=MAX_MESSAGE_BYTES, drain_grace_seconds=1,
                            max_segments_per_batch=MAX_SEGMENTS,
                            max_requests_per_stream=MAX_REQUESTS,
                            shared_memory=SharedMemoryConfig(
                                enabled=True, allowed_dirs=(str(workdir / "shm"),))),
        logging=LoggingConfig(level="error"),
        saes=(SaeConfig(path=sae),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )


@contextmanager
def fuzz_server() -> Iterator[tuple[GuardServer, grpc.Channel]]:
    """A started, ready guard and a channel to it, with its region files (see
    :func:`current_regions`); all closed and removed on exit."""
    global _REGIONS
    with tempfile.TemporaryDirectory(prefix="guard-fuzz-") as tmp:
        workdir = Path(tmp)
        config = fuzz_config(workdir)
        _REGIONS = make_regions(workdir / "shm", workdir)
        server = GuardServer(config)
        server.start()
        try:
            server.set_ready(Engine.load(config))
            with grpc.insecure_channel(server.addresses[0]) as channel:
                yield server, channel
        finally:
            server.stop(0)
            _REGIONS = None


# --- strategies ----------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
int64s = st.one_of(st.integers(*INT64), st.sampled_from([INT64[0], INT64[1], 0, -1]))
uint64s = st.one_of(st.integers(0, UINT64_MAX), st.sampled_from([0, 1, UINT64_MAX]))
#: An enum field is open in proto3: any int32 may arrive.
enum_values = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))
request_ids = st.one_of(
    st.just("req-1"), st.just(""), _text,
    st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=1,
            max_size=40),
    st.sampled_from(["\x00", "\u202e\u0645\U0001f600", "a" * 300, "\ufeff", "🚀" * 9]),
)
hooks = st.one_of(st.just(HOOK), st.just(HOOK), st.just(""),
                  st.sampled_from(["blocks.99.hook_resid_post", HOOK + " ", HOOK.upper()]), _text)
datatypes = st.one_of(
    st.sampled_from(list(codec.DATATYPES)),
    st.sampled_from(["F64", "f32", "FP32", "I8", "BF16 ", "", "F32\x00", "bf16"]),
    _text,
)
attributes: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.dictionaries(_text, _text, max_size=4),
    st.just({"traceparent": "00-zz-not-a-trace-01"}),
    # A giant map: beyond the transport limit gRPC itself refuses the message.
    st.integers(1, 400).map(lambda n: {f"key-{i}": "v" * 40 for i in range(n)}),
)
special_floats = st.sampled_from([
    np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, 65504.0,
    65520.0, 1e30, -1e30, 6e-8,
])
row_values = st.one_of(
    st.floats(-8.0, 8.0, width=32),
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    special_floats,
)
Registered = Sequence[pb.SharedMemoryRegion]


@st.composite
def registrations(draw: st.DrawFn, *, well: bool = False) -> list[pb.SharedMemoryRegion]:
    """``StreamConfig.shared_memory``: none, the region files registered well (read-only or
    writable, once or twice), with one bad registration among them (wrong size, a refused
    path, an empty or repeated name), or more than the guard allows. ``well``: none, or
    registered well."""
    regions = current_regions()
    # The common choice comes last too: hypothesis favours the ends of a list.
    kind = draw(st.sampled_from(["good", "none", "good"] if well else
                                ["good"] * 5 + ["none"] * 3 + ["many"] + ["bad"] * 4 + ["good"]))
    if kind == "none":
        return []
    count = MAX_REGIONS + draw(st.integers(1, 2)) if kind == "many" else draw(st.integers(1, 3))
    out: list[pb.SharedMemoryRegion] = []
    for i in range(count):
        file = draw(st.sampled_from([regions.writable, regions.readonly, regions.writable]))
        own = file is regions.writable
        name = draw(st.one_of(st.just("rw" if own else "ro"), _text))
        if any(r.name == name for r in out) or not name:
            name = f"region-{i}"
        writable = draw(st.sampled_from([own, own, own, not own]))
        out.append(pb.SharedMemoryRegion(name=name, path=file.path, size=file.size,
                                         writable=writable))
    if kind == "bad":
        bad = draw(st.sampled_from(["size", "path", "path", "name", "twice"]))
        file = draw(st.sampled_from(regions.files))
        region = pb.SharedMemoryRegion(name="bad", path=file.path, size=file.size,
                                       writable=draw(st.booleans()))
        if bad == "size":
            region.size = draw(st.sampled_from([file.size - 1, file.size + 1, file.size * 2,
                                                file.size // 2, 0, 1, UINT64_MAX]))
        elif bad == "path":
            region.path = draw(st.sampled_from(regions.bad_paths))
            region.size = draw(st.sampled_from([4096, file.size]))
        elif bad == "name":
            region.name = ""
        else:
            region.name = draw(st.sampled_from([r.name for r in out]))
        out.insert(draw(st.integers(0, len(out))), region)
    return out


@st.composite
def shm_refs(draw: st.DrawFn, registered: Registered, length: int, itemsize: int, *,
             steering: bool = False, good: bool = False) -> pb.SharedMemoryRef:
    """A byte range of a region, for rows of ``length`` bytes: usually a registered region
    (a writable one for a ``steering`` ref) at an aligned offset that fits, sometimes the
    range of NaN and Inf, the last range that fits or the first that does not, misaligned,
    huge, random; a wrong length; an unknown region. ``good``: a registered region, in
    bounds and aligned (often the range of NaN and Inf)."""
    pool = [r for r in registered if r.writable] if steering else list(registered)
    pick = "pool" if good else draw(st.sampled_from(["pool"] * 8 + ["any", "unknown", "pool"]))
    if pick == "any" or not pool:
        pool = list(registered)
    if pool and pick != "unknown":
        region = draw(st.sampled_from(pool))
        name, size = region.name, min(region.size, 1 << 20)
    else:
        name, size = draw(st.sampled_from(["nowhere", "", "RO", "rw "])), 1 << 16
    span = max(size - length, 0)
    fits = draw(st.integers(0, span // itemsize)) * itemsize
    where = draw(st.sampled_from(["nonfinite", "fits", "end", "fits", "nonfinite"] if good else
                                 ["fits"] * 6 + ["nonfinite", "end", "nonfinite", "past",
                                                 "misaligned", "huge", "any", "nonfinite",
                                                 "fits"]))
    offset = fits
    if where == "end":
        offset = span - span % itemsize
    elif where == "nonfinite":
        low = min(max(NONFINITE_BYTES[0] - length + itemsize, 0), span)
        high = max(min(NONFINITE_BYTES[1] - itemsize, span), low)
        offset = draw(st.integers(low, high)) // itemsize * itemsize
    elif where == "past":
        offset = span - span % itemsize + itemsize
    elif where == "misaligned":
        offset = fits + draw(st.integers(1, itemsize - 1))
    elif where == "huge":
        offset = draw(st.sampled_from([UINT64_MAX, 2**63, 2**64 - max(length, 1), size]))
    elif where == "any":
        offset = draw(uint64s)
    how = "ok" if good else draw(st.sampled_from(["ok"] * 10 + ["short", "long", "zero", "any",
                                                              "ok"]))
    ref_length = {"ok": length, "short": max(length - itemsize, 0), "long": length + itemsize,
                  "zero": 0}.get(how)
    if ref_length is None:
        ref_length = draw(uint64s)
    return pb.SharedMemoryRef(region=name, offset=min(offset, UINT64_MAX), length=ref_length)


@st.composite
def tensors(draw: st.DrawFn, registered: Registered = (), *, clean: bool = False,
            tidy: bool = False, good_ref: bool = False) -> tuple[pb.Tensor, int]:
    """A Tensor (valid or not) and the row count its positions should match. With regions
    registered, the rows are often in one of them (``shm``), sometimes ``raw`` and ``shm``
    are both set; without, rarely (an unknown region). ``clean``: a valid datatype, shape
    and row count, the rows in a region (only the reference is fuzzed; ``good_ref``: not
    even that, see :func:`shm_refs`). ``tidy``: valid finite rows in ``raw`` (for a batch
    whose segments are what is fuzzed)."""
    if tidy:
        datatype = draw(st.sampled_from(list(codec.DATATYPES)))
        n_rows = draw(st.integers(1, 8))
        values = draw(hnp.arrays(np.float32, (n_rows, D_IN),
                                 elements=st.floats(-8.0, 8.0, width=32)))
        return pb.Tensor(datatype=datatype, shape=[n_rows, D_IN],
                         raw=codec.encode(values, datatype)[1]), n_rows
    datatype = draw(st.sampled_from(list(codec.DATATYPES)) if clean else datatypes)
    wire_type = datatype if datatype in codec.DATATYPES else "F32"
    itemsize = codec.DATATYPES[wire_type]
    if clean:
        n_rows = draw(st.one_of(st.integers(1, 6),
                                st.integers(60, MAX_MESSAGE_BYTES // (D_IN * itemsize) + 1)))
        ref = draw(shm_refs(registered, n_rows * D_IN * itemsize, itemsize, good=good_ref))
        raw = b"" if good_ref else bytes(draw(st.sampled_from([0] * 10 + [
            4, n_rows * D_IN * itemsize, 0])))
        return pb.Tensor(datatype=datatype, shape=[n_rows, D_IN], raw=raw, shm=ref), n_rows
    n_rows = draw(st.one_of(st.integers(1, 6), st.integers(-3, 0), st.integers(60, 130)))
    rows = max(n_rows, 0)
    values = draw(hnp.arrays(np.float32, (rows, D_IN), elements=row_values,
                             fill=st.just(np.float32(0.25))))
    with np.errstate(over="ignore"):  # F16 overflow becomes Inf, as a host's cast would
        _, raw = codec.encode(values, wire_type)
    shape: list[int] = [n_rows, D_IN]
    shape_kind = draw(st.sampled_from(["ok"] * 6 + ["width", "rank", "random", "empty"]))
    if shape_kind == "width":
        shape = [n_rows, draw(st.sampled_from([D_IN - 1, D_IN + 1, 0, -D_IN, 2 * D_IN]))]
    elif shape_kind == "rank":
        shape = draw(st.sampled_from([[n_rows * D_IN], [1, n_rows, D_IN], [n_rows, D_IN, 1]]))
    elif shape_kind == "random":
        shape = draw(st.lists(int64s, max_size=4))
    elif shape_kind == "empty":
        shape = []
    raw_kind = draw(st.sampled_from(["ok"] * 6 + ["truncate", "extend", "random", "bits"]))
    if raw_kind == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif raw_kind == "extend":
        raw += draw(st.binary(min_size=1, max_size=9))
    elif raw_kind == "random":
        raw = draw(st.binary(max_size=256))
    elif raw_kind == "bits" and raw:  # arbitrary bit patterns: NaN payloads, subnormals
        raw = bytes(draw(st.binary(min_size=len(raw), max_size=len(raw))))
    storage = draw(st.sampled_from(["raw"] * 3 + ["shm"] * 2 + ["both", "raw"] if registered
                                   else ["raw"] * 14 + ["shm", "both", "raw"]))
    if storage == "raw":
        return pb.Tensor(datatype=datatype, shape=shape, raw=raw), n_rows
    ref = draw(shm_refs(registered, rows * D_IN * itemsize, itemsize))
    raw = (raw or bytes(4)) if storage == "both" else b""
    return pb.Tensor(datatype=datatype, shape=shape, raw=raw, shm=ref), n_rows


#: Request ids of segments: a few short ones (so that RequestEnded messages name them), and
#: any other non-empty id.
segment_ids = st.one_of(st.sampled_from(["req-a", "req-b", "req-c", "req-d", "req-e"]),
                        request_ids.filter(bool))
segment_attributes: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}), st.dictionaries(_text, _text, max_size=2),
    st.just({"traceparent": "00-zz-not-a-trace-01"}))
#: What a batch's segments are, when it has some: a valid split of its rows, or one of the
#: bad kinds (row counts that do not sum, a segment of no rows, an empty or repeated request
#: id, more than MAX_SEGMENTS segments, anything at all). Hypothesis favours the ends.
SEGMENT_KINDS = ("many", "valid", "zero", "empty", "valid", "repeat", "many", "random", "valid",
                 "sum")
#: The batches of an engine's stream (:func:`step_streams`) in turn: SEGMENT_KINDS, and
#: ``fuzzed`` batches (drawn as in any stream: with segments or not, valid or not).
STEP_CYCLE = (*SEGMENT_KINDS[:5], "fuzzed", *SEGMENT_KINDS[5:], "fuzzed")


def _cut(draw: st.DrawFn, rows: int, count: int) -> list[int]:
    """Row counts of ``count`` segments (each >= 1) that sum to ``rows`` (>= count)."""
    cuts = sorted(draw(st.lists(st.integers(1, rows - 1), min_size=count - 1,
                                max_size=count - 1, unique=True))) if count > 1 else []
    edges = [0, *cuts, rows]
    return [b - a for a, b in itertools.pairwise(edges)]


@st.composite
def segment_lists(draw: st.DrawFn, rows: int, kind: str) -> list[pb.Segment]:
    """``ActivationBatch.segments`` of the given ``kind`` (see SEGMENT_KINDS) for a tensor
    of ``rows`` rows. The oracle checks any list by the rules, so a kind only shapes the
    distribution."""
    def segment(request_id: str, count: int) -> pb.Segment:
        return pb.Segment(request_id=request_id, rows=count,
                          phase=pb.Phase.ValueType(draw(enum_values)),
                          attributes=draw(segment_attributes))

    if kind == "random":
        return [segment(draw(request_ids), draw(st.one_of(st.integers(0, 4),
                                                          st.integers(0, 2**32 - 1))))
                for _ in range(draw(st.integers(1, MAX_SEGMENTS + 2)))]
    if kind == "many":
        count = MAX_SEGMENTS + draw(st.integers(1, 3))
        counts = _cut(draw, rows, count) if rows >= count else [1] * count
    else:
        counts = _cut(draw, max(rows, 1), draw(st.integers(1, max(min(rows, MAX_SEGMENTS), 1))))
    ids: list[str] = []
    for i in range(len(counts)):
        rid = draw(segment_ids)
        ids.append(rid if rid not in ids else f"seg-{i}")
    out = [segment(rid, count) for rid, count in zip(ids, counts, strict=True)]
    if kind == "sum":  # one count off (never to 0), or a segment too many
        i = draw(st.integers(0, len(out) - 1))
        how = draw(st.sampled_from(["more", "less", "extra", "huge"]))
        if how == "less" and out[i].rows > 1:
            out[i].rows -= draw(st.integers(1, out[i].rows - 1))
        elif how == "extra" and len(out) < MAX_SEGMENTS:
            out.append(segment(f"seg-{len(out)}", draw(st.integers(1, 3))))
        elif how == "huge":
            out[i].rows = 2**32 - 1
        else:
            out[i].rows += draw(st.integers(1, 3))
    elif kind == "zero":
        out.insert(draw(st.integers(0, len(out))), segment(f"seg-{len(out)}", 0))
    elif kind == "empty":
        out[draw(st.integers(0, len(out) - 1))].request_id = ""
    elif kind == "repeat":
        if len(out) < 2:  # a second segment for the first one's request
            out.append(segment(out[0].request_id, 1))
        else:
            i, j = sorted(draw(st.lists(st.integers(0, len(out) - 1), min_size=2, max_size=2,
                                        unique=True)))
            out[j].request_id = out[i].request_id
    return out


@st.composite
def batches(draw: st.DrawFn, sequence: int, registered: Registered = (), *,
            segment_kind: str | None = None, step: bool = False, in_region: bool = False
            ) -> pb.ActivationBatch:
    """A batch (valid or not). With regions registered, most batches are ``clean``
    except for their shared-memory fields (the rows' reference and the steering_ref), so
    that those reach the region checks and, when good, a decision. Some batches carry
    segments (several requests, see :func:`segment_lists`); most of those are otherwise
    valid (``tidy``, or ``clean`` with regions), so that the segments decide the answer.
    ``segment_kind``: one of SEGMENT_KINDS, or ``none``; by default drawn. ``step``: an
    engine's batch, valid but for its segments (and, ``in_region``, its rows' reference
    into a registered region)."""
    if segment_kind is None:
        stepped = draw(st.sampled_from([False] * 3 + [True] + [False]))
        segment_kind = draw(st.sampled_from(SEGMENT_KINDS)) if stepped else "none"
    stepped = segment_kind != "none"
    in_region = in_region and bool(registered)
    tidy = not in_region and (step or (stepped and draw(st.sampled_from([True] * 4
                                                                        + [False, True]))))
    clean = tidy or in_region or (bool(registered)
                                  and draw(st.sampled_from([True, True, False, True])))
    tensor, n_rows = draw(tensors(registered, clean=clean and not tidy, tidy=tidy,
                                  good_ref=in_region))
    rows = max(n_rows, 0)
    positions: list[int] = list(range(rows))
    kind = "ok" if step else draw(st.sampled_from(["ok"] * (12 if clean else 4)
                                                  + ["values", "short", "long"]))
    if kind == "values":
        positions = draw(st.lists(int64s, min_size=rows, max_size=rows))
    elif kind == "short" and positions:
        positions = positions[: draw(st.integers(0, len(positions) - 1))]
    elif kind == "long":
        positions += draw(st.lists(int64s, min_size=1, max_size=3))
    token_ids: list[int] = draw(st.one_of(
        st.just([100 + i for i in range(rows)]), st.just([]),
        st.lists(int64s, min_size=rows, max_size=rows),
        *(() if step else (st.lists(int64s, max_size=8),))))
    request_id = "req-1" if clean else draw(request_ids)
    if stepped and clean:  # ignored with segments; usually left empty
        request_id = draw(st.sampled_from(["", "", "req-1"]))
    batch = pb.ActivationBatch(
        request_id=request_id, sequence=sequence,
        hook=HOOK if clean else draw(hooks), activations=tensor, positions=positions,
        token_ids=token_ids[:rows] if clean else token_ids,
        phase=pb.Phase.ValueType(draw(enum_values)), attributes={} if clean else draw(attributes),
        segments=draw(segment_lists(rows, segment_kind)) if stepped else (),
    )
    if step:  # no reference, or a valid one (a step's delta written into a region)
        steering = draw(st.sampled_from(["none", "valid", "valid"] if registered else ["none"]))
    else:
        steering = draw(st.sampled_from(["ref", "none", "valid", "same", "none", "ref", "valid"]
                                        if registered else ["none"] * 15 + ["ref", "none"]))
    itemsize = codec.DATATYPES.get(tensor.datatype, 4)
    length = rows * D_IN * itemsize
    writable = [r for r in registered if r.writable]
    if steering == "same" and tensor.HasField("shm"):  # the delta over the rows' own range
        batch.steering_ref.CopyFrom(tensor.shm)
    elif steering == "valid" and writable:  # a writable region, in bounds, aligned
        region = draw(st.sampled_from(writable))
        slots = max(min(region.size, 1 << 20) - length, 0) // itemsize
        batch.steering_ref.CopyFrom(pb.SharedMemoryRef(
            region=region.name, offset=draw(st.integers(0, slots)) * itemsize, length=length))
    elif steering != "none":
        batch.steering_ref.CopyFrom(draw(shm_refs(registered, length, itemsize, steering=True)))
    return batch


def good_config() -> pb.StreamConfig:
    return pb.StreamConfig(mode=pb.MODE_INLINE, hooks=[HOOK])


stream_configs = st.builds(
    pb.StreamConfig,
    protocol_version=st.one_of(st.sampled_from(["", "1", "1.0", "1.99", "2.0", "0", "1x", "."]),
                               _text),
    mode=st.one_of(st.sampled_from([pb.MODE_INLINE, pb.MODE_MONITOR]), enum_values),
    hooks=st.one_of(st.just([HOOK]), st.just([]), st.lists(hooks, max_size=3)),
    failure_policy=enum_values,
    batch_deadline_ms=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    host=_text,
    attributes=st.dictionaries(_text, _text, max_size=3),
    shared_memory=registrations(),
)


@st.composite
def sequences(draw: st.DrawFn, count: int) -> list[int]:
    """Sequence numbers: mostly increasing by 1, with repeats, steps back, gaps, extremes."""
    out: list[int] = []
    for _ in range(count):
        last = out[-1] if out else None
        step = draw(st.sampled_from(["next"] * 5 + ["repeat", "back", "gap", "max", "any"]))
        if last is None or step == "any":
            value = draw(uint64s)
        elif step == "next":
            value = last + 1
        elif step == "repeat":
            value = last
        elif step == "back":
            value = draw(st.integers(0, last))
        elif step == "gap":
            value = last + draw(st.integers(2, 2**20))
        else:
            value = UINT64_MAX
        out.append(min(value, UINT64_MAX))
    return out


@st.composite
def streams(draw: st.DrawFn) -> list[pb.InspectRequest]:
    """A whole stream: usually a good config (often registering shared-memory regions) then
    batches; sometimes a bad or missing config, a second config, or an empty message in
    between. RequestEnded messages may come anywhere (rarely before the config). Some streams
    are an engine's (:func:`step_streams`)."""
    if draw(st.sampled_from([False, True, False, True, False])):
        return draw(step_streams())
    messages: list[pb.InspectRequest] = []
    first = draw(st.sampled_from(["good"] * 6 + ["fuzzed", "none"]))
    config: pb.StreamConfig | None = None
    if first == "good":
        config = good_config()
        config.shared_memory.extend(draw(registrations()))
    elif first == "fuzzed":
        config = draw(stream_configs)
    registered: list[pb.SharedMemoryRegion] = []
    if config is not None:
        messages.append(pb.InspectRequest(config=config))
        registered = list(config.shared_memory)
    count = draw(st.integers(1, 5))
    for sequence in draw(sequences(count)):
        messages.append(pb.InspectRequest(batch=draw(batches(sequence, registered))))
    extra = draw(st.sampled_from(["none"] * 8 + ["config", "empty"]))
    if extra != "none":
        at = draw(st.integers(1, len(messages)))
        message = (pb.InspectRequest(config=good_config()) if extra == "config"
                   else pb.InspectRequest())
        messages.insert(at, message)
    _insert_ended(draw, messages, draw(st.sampled_from([1, 0, 0, 1, 2, 0, 1])))
    return messages


@st.composite
def step_streams(draw: st.DrawFn) -> list[pb.InspectRequest]:
    """An engine's stream: a good config (sometimes registering regions), then batches in
    sequence, each with segments (valid or not; the rest of the batch mostly valid), and
    RequestEnded messages between them (rarely before the config). The batches take the
    kinds of segments in turn from a drawn start in SEGMENT_KINDS (hypothesis clusters its
    draws near the ends of a list: a kind drawn per batch would leave some kinds out of
    whole runs)."""
    config = good_config()
    config.shared_memory.extend(draw(registrations(well=True)))
    messages = [pb.InspectRequest(config=config)]
    start = draw(st.integers(0, 2**20))
    kind = draw(st.integers(0, len(STEP_CYCLE) - 1))
    for i, sequence in enumerate(range(start, start + draw(st.integers(2, 6)))):
        turn = STEP_CYCLE[(kind + i) % len(STEP_CYCLE)]
        messages.append(pb.InspectRequest(batch=draw(
            batches(sequence, list(config.shared_memory)) if turn == "fuzzed" else
            batches(sequence, list(config.shared_memory), segment_kind=turn, step=True,
                    in_region=bool((kind + i) % 2)))))
    _insert_ended(draw, messages, draw(st.sampled_from([1, 0, 2, 1, 3])), first=8)
    return messages


def _insert_ended(draw: st.DrawFn, messages: list[pb.InspectRequest], count: int,
                  first: int = 4) -> None:
    """Put ``count`` RequestEnded messages into the stream: anywhere after its first message,
    or (one time in ``first``) before it: before the config that ends the stream."""
    for _ in range(count):
        at = (draw(st.sampled_from([1] * (first - 2) + [0, 1]))
              and draw(st.integers(1, len(messages))))
        messages.insert(at, pb.InspectRequest(ended=draw(requests_ended(messages))))


@st.composite
def requests_ended(draw: st.DrawFn, messages: Sequence[pb.InspectRequest]
                   ) -> pb.RequestEnded:
    """A RequestEnded naming requests of the stream's batches, and ids the guard never saw
    (ignored: hosts race), for any reason (an open enum)."""
    seen = sorted({s.request_id for m in messages if m.HasField("batch")
                   for s in m.batch.segments} | {"req-1"})
    ids = draw(st.lists(st.one_of(st.sampled_from(seen), request_ids), max_size=4))
    return pb.RequestEnded(request_ids=ids, reason=pb.RequestEnded.Reason.ValueType(
        draw(st.one_of(st.sampled_from([1, 2, 3]), enum_values))))


#: Bytes no protobuf parser accepts as an InspectRequest (field 0, a length beyond the end,
#: a truncated varint, invalid UTF-8 in batch.request_id, a wrong wire type), and noise.
corrupt_messages = st.one_of(
    st.sampled_from([b"\x00", b"\x12\xff\x01", b"\x12\x05ab", b"\x08\xff",
                     b"\x12\x03\x0a\x01\xff", b"\x15\x00\x00", b"\xff" * 11]),
    st.binary(min_size=16, max_size=200),
)


@st.composite
def byte_streams(draw: st.DrawFn) -> list[bytes]:
    """Serialized messages that are often not valid InspectRequests: random bytes, and valid
    messages with bytes flipped, cut or appended."""
    valid = [m.SerializeToString() for m in draw(streams())]
    out: list[bytes] = []
    for data in valid:
        kind = draw(st.sampled_from(["keep", "keep", "random", "corrupt", "flip", "truncate",
                                     "append"]))
        if kind == "random":
            data = draw(st.binary(max_size=200))
        elif kind == "corrupt":
            data = draw(corrupt_messages)
        elif kind == "flip" and data:
            buf = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
            data = bytes(buf)
        elif kind == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        out.append(data)
    return out


# --- the oracle ----------------------------------------------------------------------------

#: A status name and a fragment of the message that must come with it.
Problem = tuple[str, str]
#: One request of a batch with segments: its id, first row and end row.
Span = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Expect:
    """What one message must get: a decision, a per-batch error (one of ``errors``, each a
    status name and a fragment of the message), nothing (a config), or the stream's end with
    one of ``errors``. A ``decision`` with ``errors`` may get one of them instead (its rows
    lie where an earlier batch's steering delta may have been written). ``tag`` names the
    shared-memory path that decided the answer, if any."""

    kind: str  # "decision" | "error" | "none" | "end"
    errors: tuple[Problem, ...] = ()
    skipped: int = 0
    #: "registered", "refused" (a config); "ref", "steering-ref" (a bad reference), "rows"
    #: (rows read from a region), "nonfinite" (region rows refused for NaN or Inf).
    tag: str = ""
    #: The rows the guard decodes, for a decision (None when unknown).
    rows: NDArray[np.float32] | None = dataclasses.field(default=None, compare=False,
                                                         repr=False)
    #: A valid steering_ref: (region name, file path, offset, length) of the delta.
    delta_to: tuple[str, str, int, int] | None = None
    #: A batch with segments: the requests' (request id, first row, end row), one verdict
    #: each (for a decision).
    segments: tuple[Span, ...] = ()
    #: The answer is the segments' (a segments rule broken, or a decision with verdicts).
    step: bool = False
    #: The message is a RequestEnded (no reply; the end of a stream not configured yet).
    ended: bool = False


@dataclasses.dataclass(frozen=True)
class Mapped:
    """A region the guard must have opened for the stream."""

    file: RegionFile
    writable: bool


def _within(path: str, folder: str) -> bool:
    """guard.sidecar.regions's rule: the path's folder, links resolved, is the allowed one or
    below."""
    parent, root = os.path.realpath(os.path.dirname(path)), os.path.realpath(folder)
    return parent == root or parent.startswith(root.rstrip(os.sep) + os.sep)


def _path_problem(field: str, path: str, size: int, writable: bool, regions: Regions
                  ) -> tuple[Problem, ...] | None:
    """What opening ``path`` as a region gets (guard.sidecar.regions.open_region's checks, in
    order)."""
    if not path or not os.path.isabs(path):
        return (("INVALID_ARGUMENT", f"{field}.path: expected an absolute path"),)
    if os.path.normpath(path) != path or ".." in Path(path).parts:
        return (("INVALID_ARGUMENT", f"{field}.path: expected a normalised path"),)
    if "\x00" in path:  # names no file; undocumented, so any refusal naming the field
        return tuple((code, f"{field}.path") for code in
                     ("INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND"))
    if not _within(path, regions.folder):
        return (("PERMISSION_DENIED", f"{field}.path: expected a file in"),)
    file = regions.file(path)
    if file is not None:
        if writable and not file.opens_writable:
            return (("PERMISSION_DENIED", f"{field}.path: cannot open"),)
        if size != file.size:
            return (("INVALID_ARGUMENT", f"{field}.size: the file"),)
        return None
    refused = regions.refused.get(path)
    if refused is not None:
        return (("PERMISSION_DENIED", f"{field}.path: {refused[1 if writable else 0]}"),)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return (("NOT_FOUND", f"{field}.path: no file at"),)
    except OSError:  # a name too long, a file where a folder should be
        return (("PERMISSION_DENIED", f"{field}.path: cannot open"),)
    raise AssertionError(f"the oracle does not know the file {path!r}")


def _config_outcome(config: pb.StreamConfig, regions: Regions | None
                    ) -> tuple[tuple[Problem, ...] | None, dict[str, Mapped]]:
    """The config's refusal (None: accepted) and the regions it registers."""
    version = config.protocol_version or "1"
    if version.split(".")[0] != "1":
        return (("FAILED_PRECONDITION", "config.protocol_version"),), {}
    if config.mode not in (pb.MODE_MONITOR, pb.MODE_INLINE):
        return (("INVALID_ARGUMENT", "config.mode"),), {}
    if any(hook != HOOK for hook in config.hooks):
        return (("NOT_FOUND", "is not served"),), {}
    registered = config.shared_memory
    if len(registered) > MAX_REGIONS:
        return (("RESOURCE_EXHAUSTED", "config.shared_memory: expected at most "
                                       f"{MAX_REGIONS} regions"),), {}
    table: dict[str, Mapped] = {}
    for index, region in enumerate(registered):
        regions = regions or current_regions()
        field = f"config.shared_memory[{index}]"
        if not region.name:
            return (("INVALID_ARGUMENT", f"{field}.name: expected a non-empty name"),), {}
        if region.name in table:
            return (("INVALID_ARGUMENT", f"{field}.name: expected a name unique"),), {}
        if region.size <= 0:
            return (("INVALID_ARGUMENT", f"{field}.size: expected the file's size"),), {}
        problem = _path_problem(field, region.path, region.size, region.writable, regions)
        if problem is not None:
            return problem, {}
        file = regions.file(region.path)
        assert file is not None
        table[region.name] = Mapped(file, region.writable)
    return None, table


def _ref_problem(field: str, ref: pb.SharedMemoryRef, table: Mapping[str, Mapped],
                 expected: int, itemsize: int, *, write: bool) -> Problem | None:
    """guard.sidecar.regions.RegionTable.resolve's checks, in order."""
    mapped = table.get(ref.region)
    if mapped is None:
        return ("NOT_FOUND", f"{field}.region: {ref.region!r} is not registered")
    if write and not mapped.writable:
        return ("INVALID_ARGUMENT", f"{field}.region: {ref.region!r} was registered read-only")
    if ref.length != expected:
        return ("INVALID_ARGUMENT", f"{field}.length: expected {expected} bytes")
    if ref.offset + ref.length > mapped.file.size:
        return ("INVALID_ARGUMENT", f"{field}: offset {ref.offset} + length {ref.length}")
    if ref.offset % itemsize:
        return ("INVALID_ARGUMENT", f"{field}.offset: expected a multiple of the item size")
    return None


def _overlaps(ranges: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return any(start < e and s < end for s, e in ranges)


def expect_batch(batch: pb.ActivationBatch, table: Mapping[str, Mapped],
                 dirty: Mapping[str, Sequence[tuple[int, int]]], skipped: int = 0) -> Expect:
    """What a batch gets: the first rule it breaks in the order guard.sidecar.session._decode checks
    them (then guard.sidecar.regions for a region), or a decision. ``table``: the stream's regions;
    ``dirty``: file ranges where earlier batches' steering deltas may have been written."""

    def error(problem: Problem, tag: str = "") -> Expect:
        return Expect("error", (problem,), skipped, tag)

    # Ids and the hook over their caps come first (guard.sidecar.session._oversized_identifier).
    for field, value, limit in [
            ("batch.request_id", batch.request_id, codec.MAX_REQUEST_ID_BYTES),
            ("batch.hook", batch.hook, codec.MAX_HOOK_BYTES),
            *((f"batch.segments[{index}].request_id", segment.request_id,
               codec.MAX_REQUEST_ID_BYTES)
              for index, segment in enumerate(batch.segments[:MAX_SEGMENTS]))]:
        if codec.oversized(value, limit):
            return error(("INVALID_ARGUMENT", f"{field}: expected at most {limit} bytes"))
    if not batch.request_id and not batch.segments:
        return error(("INVALID_ARGUMENT", "batch.request_id"))
    if batch.hook != HOOK:
        return error(("NOT_FOUND", "is not served"))
    tensor = batch.activations
    shm = tensor.shm if tensor.HasField("shm") else None
    if (len(tensor.raw) if shm is None else shm.length) > MAX_MESSAGE_BYTES:
        return error(("RESOURCE_EXHAUSTED", "server.max_message_bytes"),
                     "" if shm is None else "ref")
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != D_IN or shape[0] < 1:
        return error(("INVALID_ARGUMENT", "batch.activations.shape"))
    if shm is not None and tensor.raw:
        return error(("INVALID_ARGUMENT", "batch.activations: expected raw or shm, found both"),
                     "ref")
    datatype = tensor.datatype
    if datatype not in codec.DATATYPES:
        return error(("INVALID_ARGUMENT", "tensor datatype"))
    try:
        nbytes = codec.expected_nbytes(datatype, shape)
    except InvalidInput:
        return error(("INVALID_ARGUMENT", "tensor shape"))
    itemsize = codec.DATATYPES[datatype]
    tag, uncertain = "", False
    if shm is None:
        if len(tensor.raw) != nbytes:
            return error(("INVALID_ARGUMENT", "tensor raw"))
        rows = codec.decode(datatype, shape, tensor.raw)
    else:
        problem = _ref_problem("batch.activations.shm", shm, table, nbytes, itemsize,
                               write=False)
        if problem is not None:
            return error(problem, "ref")
        file = table[shm.region].file
        end = shm.offset + shm.length
        rows = codec.decode(datatype, shape, file.data[shm.offset:end])
        tag, uncertain = "rows", _overlaps(dirty.get(file.path, ()), shm.offset, end)
    delta_to = None
    if batch.HasField("steering_ref"):
        ref = batch.steering_ref
        problem = _ref_problem("batch.steering_ref", ref, table, nbytes, itemsize, write=True)
        if problem is not None:
            return error(problem, "steering-ref")
        delta_to = (ref.region, table[ref.region].file.path, ref.offset, ref.length)
    if len(batch.positions) != shape[0]:
        return error(("INVALID_ARGUMENT", "batch.positions"), tag)
    if batch.token_ids and len(batch.token_ids) != shape[0]:
        return error(("INVALID_ARGUMENT", "batch.token_ids"), tag)
    spans: tuple[Span, ...] = ()
    if batch.segments:
        problem, spans = _segments_outcome(batch.segments, shape[0])
        if problem is not None:
            return Expect("error", (problem,), skipped, tag, step=True)
    nonfinite = ("INVALID_ARGUMENT", "hold NaN or Inf")
    if uncertain:
        return Expect("decision", (nonfinite,), skipped, tag, None, delta_to, spans,
                      bool(spans))
    if not np.isfinite(rows).all():
        return error(nonfinite, "nonfinite" if tag else "")
    return Expect("decision", (), skipped, tag, rows, delta_to, spans, bool(spans))


def _segments_outcome(segments: Sequence[pb.Segment], n_rows: int
                      ) -> tuple[Problem | None, tuple[Span, ...]]:
    """The first segments rule a batch breaks (guard.sidecar.session's checks, in order),
    or None and each request's (id, first row, end row)."""
    def broken(code: str, fragment: str) -> tuple[Problem, tuple[Span, ...]]:
        return (code, fragment), ()

    if len(segments) > MAX_SEGMENTS:
        return broken("RESOURCE_EXHAUSTED", f"batch.segments: {len(segments)} segments exceed "
                                            f"the limit of {MAX_SEGMENTS}")
    spans: list[Span] = []
    first: dict[str, int] = {}
    start = 0
    for index, segment in enumerate(segments):
        field = f"batch.segments[{index}]"
        request_id = segment.request_id
        if not request_id:
            return broken("INVALID_ARGUMENT", f"{field}.request_id: expected a non-empty "
                                              "request id")
        if first.setdefault(request_id, index) != index:
            return broken("INVALID_ARGUMENT", f"{field}.request_id: {request_id!r} is already "
                                              f"segments[{first[request_id]}]'s")
        if segment.rows < 1:
            return broken("INVALID_ARGUMENT", f"{field}.rows: expected at least 1 row")
        spans.append((request_id, start, start + segment.rows))
        start += segment.rows
    if start != n_rows:
        return broken("INVALID_ARGUMENT", f"batch.segments: the segments' rows sum to {start}, "
                                          f"expected the {n_rows} rows")
    return None, tuple(spans)


def simulate(messages: Sequence[pb.InspectRequest | bytes], regions: Regions | None = None
             ) -> list[Expect]:
    """The expected outcome of each message, up to and including the one that ends the
    stream (later messages are never read). ``regions``: the guard's region files (by
    default those of the running fuzz_server), at their original bytes."""
    out: list[Expect] = []
    configured = False
    last: int | None = None
    table: dict[str, Mapped] = {}
    dirty: dict[str, list[tuple[int, int]]] = {}
    for item in messages:
        size = len(item) if isinstance(item, bytes) else item.ByteSize()
        if size > TRANSPORT_LIMIT:  # gRPC's own limit, or the doorbell's frame limit
            out.append(Expect("end", (("RESOURCE_EXHAUSTED", "larger than max"),
                                      ("RESOURCE_EXHAUSTED", "transport limit"))))
            return out
        if isinstance(item, bytes):
            try:
                message = pb.InspectRequest.FromString(item)
            except Exception:  # any parse failure: the stream ends with INVALID_ARGUMENT
                out.append(Expect("end", (("INVALID_ARGUMENT", DESERIALIZE_DETAILS),)))
                return out
        else:
            message = item
        kind = message.WhichOneof("message")
        if kind == "config":
            if configured:
                out.append(Expect("end", (("FAILED_PRECONDITION", "already received"),)))
                return out
            problems, table = _config_outcome(message.config, regions)
            if problems is not None:
                refused = any("config.shared_memory" in fragment for _, fragment in problems)
                out.append(Expect("end", problems, tag="refused" if refused else ""))
                return out
            configured = True
            out.append(Expect("none", tag="registered" if table else ""))
            continue
        if kind is None:
            out.append(Expect("end", (("INVALID_ARGUMENT", "expected a config or a batch"),)))
            return out
        if not configured:
            out.append(Expect("end", (("FAILED_PRECONDITION", "must be a StreamConfig"),),
                              ended=kind == "ended"))
            return out
        if kind == "ended":  # no reply, no sequence number
            out.append(Expect("none", ended=True))
            continue
        batch = message.batch
        if last is not None and batch.sequence <= last:
            out.append(Expect("error", (("ALREADY_EXISTS", "batch.sequence"),)))
            continue
        skipped = 0 if last is None else batch.sequence - last - 1
        last = batch.sequence
        expect = expect_batch(batch, table, dirty, skipped)
        if expect.kind == "decision" and expect.delta_to is not None:
            _, path, offset, length = expect.delta_to  # a STEER decision writes it there
            dirty.setdefault(path, []).append((offset, offset + length))
        out.append(expect)
    return out


# --- the properties ------------------------------------------------------------------------

_ACTIONS = {pb.ACTION_CONTINUE: "CONTINUE", pb.ACTION_STEER: "STEER", pb.ACTION_ABORT: "ABORT"}


def _code_name(value: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == value), str(value))


@dataclasses.dataclass(frozen=True)
class Written:
    """A steering delta the guard says it wrote into a region file."""

    path: str
    offset: int
    length: int
    datatype: str
    rows: int


def _check_reply(reply: pb.InspectResponse, batch: pb.ActivationBatch, expect: Expect,
                 written: list[Written]) -> str:
    # An id over its cap is not echoed (guard.sidecar.session._echoed).
    echoed = "" if codec.oversized(batch.request_id, codec.MAX_REQUEST_ID_BYTES) \
        else batch.request_id
    assert (reply.request_id, reply.sequence) == (echoed, batch.sequence), reply
    assert reply.skipped_sequences == expect.skipped, (reply, expect)
    if reply.HasField("error"):
        code = _code_name(reply.error.code)
        message = reply.error.message
        assert message, reply
        assert reply.action == pb.ACTION_UNSPECIFIED and not reply.decision_id, reply
        if expect.kind == "decision" and (NONFINITE_FEATURES in message
                                          or OUT_OF_RANGE in message):
            # Finite rows so large that the SAE overflows float32: refused rather than scored
            # NaN (the rows of a region's file, for a region batch).
            assert code == "INVALID_ARGUMENT", reply
            if expect.rows is not None:
                assert float(np.max(np.abs(expect.rows))) > 1e30, (
                    f"refused rows that are not huge: {reply}")
            return "error:INVALID_ARGUMENT(non-finite features)"
        assert expect.errors, f"a valid batch was rejected: {reply.error}"
        assert any(code == want and fragment in message for want, fragment in expect.errors), (
            f"got {code}: {message!r}; expected one of {expect.errors}")
        return f"error:{code}"
    assert expect.kind == "decision", f"expected one of {expect.errors}, got {reply}"
    assert reply.action in _ACTIONS, reply
    assert list(reply.positions) == list(batch.positions)
    if expect.segments:
        _check_verdicts(reply, batch, expect.segments)
    else:
        assert reply.decision_id, reply
        assert not reply.verdicts, f"verdicts for a batch without segments: {reply}"
    datatype = batch.activations.datatype
    n_rows = batch.activations.shape[0]
    for steering in reply.steering:
        assert steering.hook == HOOK
        delta = steering.delta
        assert delta.datatype == datatype
        if expect.delta_to is not None:  # written into the batch's steering_ref
            name, path, offset, length = expect.delta_to
            assert delta.HasField("shm") and not delta.raw, (
                f"expected the delta in the steering_ref {batch.steering_ref}, got {delta}")
            assert (delta.shm.region, delta.shm.offset, delta.shm.length) == (
                name, offset, length), delta
            assert list(delta.shape) == [n_rows, D_IN], delta
            written.append(Written(path, offset, length, datatype, n_rows))
            continue
        assert not delta.HasField("shm"), f"a delta in shared memory nobody asked for: {delta}"
        values = codec.decode(datatype, delta.shape, delta.raw)
        assert values.shape == (n_rows, D_IN)
        assert np.isfinite(values).all(), f"non-finite steering delta for {datatype} rows"
        for verdict, (_, start, stop) in zip(reply.verdicts, expect.segments, strict=False):
            if verdict.action != pb.ACTION_STEER:  # another request's rows stay as they are
                assert not values[start:stop].any(), (
                    f"a delta on the rows {start}-{stop} of request {verdict.request_id!r}, "
                    f"whose verdict is {_ACTIONS[verdict.action]}")
    return f"decision:{_ACTIONS[reply.action]}"


def _check_verdicts(reply: pb.InspectResponse, batch: pb.ActivationBatch,
                    segments: Sequence[Span]) -> None:
    """A step's reply: one verdict per segment, in order, each with its request id, its own
    decision id and its own rows' positions; the batch's action the most severe of them."""
    verdicts = list(reply.verdicts)
    assert [v.request_id for v in verdicts] == [rid for rid, _, _ in segments], (
        f"verdicts {[v.request_id for v in verdicts]} for segments {segments}")
    assert not reply.decision_id, f"a batch-level decision id for a step: {reply}"
    positions = list(batch.positions)
    for verdict, (_, start, stop) in zip(verdicts, segments, strict=True):
        assert verdict.action in _ACTIONS, verdict
        assert verdict.decision_id, verdict
        assert list(verdict.positions) == positions[start:stop], (verdict, start, stop)
        if verdict.action == pb.ACTION_ABORT:
            assert verdict.details, f"an ABORT verdict without details: {verdict}"
        for finding in verdict.findings:
            assert set(finding.positions) <= set(verdict.positions), (finding, verdict)
    ids = [v.decision_id for v in verdicts]
    assert len(set(ids)) == len(ids), f"verdicts share a decision id: {ids}"
    assert reply.action == max(v.action for v in verdicts), (
        f"the batch's action {_ACTIONS[reply.action]} is not the most severe of "
        f"{[_ACTIONS[v.action] for v in verdicts]}")
    if any(v.action == pb.ACTION_STEER for v in verdicts):
        assert reply.steering, f"a STEER verdict without a steering delta: {reply}"
    else:
        assert not reply.steering, f"a steering delta but no STEER verdict: {reply}"


def _check_region_files(regions: Regions, written: Sequence[Written]) -> None:
    """After a stream: the last delta written at each place decodes to finite values of the
    batch's shape, and no byte outside the written deltas changed."""
    for file in regions.files:
        now = file.read()
        assert len(now) == file.size, f"{file.path} changed size"
        covered = np.zeros(file.size, dtype=bool)
        for w in reversed([w for w in written if w.path == file.path]):
            span = slice(w.offset, w.offset + w.length)
            if not covered[span].any():  # not overwritten by a later delta
                values = codec.decode(w.datatype, (w.rows, D_IN), now[span])
                assert np.isfinite(values).all(), f"non-finite delta in {file.path} at {span}"
            covered[span] = True
        changed = np.frombuffer(now, np.uint8) != np.frombuffer(file.data, np.uint8)
        outside = np.flatnonzero(changed & ~covered)
        assert not outside.size, (
            f"the guard wrote {file.path} outside the steering refs, at bytes {outside[:8]}")


@dataclasses.dataclass(frozen=True)
class Ended:
    """How a doorbell stream ended (a StreamEnd frame), read like a gRPC error."""

    status: str
    message: str

    def code(self) -> Any:
        return getattr(grpc.StatusCode, self.status)

    def details(self) -> str:
        return self.message


#: Where a fuzzed stream goes: a gRPC channel (an Inspect call), or the path of the guard's
#: doorbell socket (the same protocol in frames).
Target = grpc.Channel | str


def run_doorbell_stream(path: str, messages: Sequence[pb.InspectRequest | bytes]
                        ) -> tuple[list[pb.InspectResponse], Ended | None]:
    """Send every message as a frame on one doorbell connection, then shut the sending side
    down (the socket times out instead of hanging); the replies and the StreamEnd that ended
    the stream. A half-closed host still gets its deltas in its region."""
    replies: list[pb.InspectResponse] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(STREAM_TIMEOUT_S)
        sock.connect(path)
        reader = FrameReader(sock, 1 << 26)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the guard ended it
            for message in messages:
                data = message if isinstance(message, bytes) else message.SerializeToString()
                send_frame(sock, data)
            sock.shutdown(socket.SHUT_WR)
        while (payload := reader.read()) is not None:
            frame = pb.DoorbellFrame.FromString(payload)
            if frame.WhichOneof("frame") == "end":
                with contextlib.suppress(ConnectionResetError):  # it may drop our last bytes
                    assert reader.read() is None, "frames after the StreamEnd"
                return replies, Ended(_code_name(frame.end.code), frame.end.message)
            assert frame.WhichOneof("frame") == "reply", frame
            replies.append(frame.reply)
    return replies, None


def run_stream(target: Target, messages: Sequence[pb.InspectRequest | bytes]
               ) -> tuple[list[pb.InspectResponse], grpc.RpcError | Ended | None]:
    """Send every message on one Inspect stream; the replies and the error that ended it."""
    if isinstance(target, str):
        return run_doorbell_stream(target, messages)
    channel = target
    if messages and isinstance(messages[0], bytes):
        call = channel.stream_stream(METHOD, request_serializer=None,
                                     response_deserializer=pb.InspectResponse.FromString)
    else:
        call = pb_grpc.GuardStub(channel).Inspect
    replies: list[pb.InspectResponse] = []
    try:
        for reply in call(iter(messages), timeout=STREAM_TIMEOUT_S):
            replies.append(reply)
    except grpc.RpcError as error:
        return replies, error
    return replies, None


def check_stream(target: Target, messages: Sequence[pb.InspectRequest | bytes]
                 ) -> list[str]:
    """The protocol property for one stream (on gRPC or the doorbell); returns an outcome
    label per answered message, and a ``shm:...`` label more for each answer that involved
    shared memory (a registration, a reference, rows or a delta in a region)."""
    regions = _REGIONS
    if regions is not None:
        for file in regions.files:
            file.restore()
    expected = simulate(messages, regions)
    replies, error = run_stream(target, messages)
    outcomes: list[str] = []
    written: list[Written] = []
    answers = iter(replies)
    for item, expect in zip(messages, expected, strict=False):
        if expect.kind == "none":
            if expect.tag:
                outcomes.append(f"shm:{expect.tag}")
            if expect.ended:
                outcomes.append("ended")
            continue
        if expect.kind == "end":
            assert error is not None, f"expected the stream to end with {expect.errors}"
            code, details = error.code().name, str(error.details() or "")
            assert details, f"status {code} without details"
            assert any(code == want and fragment in details for want, fragment in expect.errors), (
                f"stream ended with {code}: {details!r}; expected one of {expect.errors}")
            outcomes.append("undecodable" if DESERIALIZE_DETAILS in details else f"status:{code}")
            if expect.tag:
                outcomes.append(f"shm:{expect.tag}:status:{code}")
            if expect.ended:
                outcomes.append(f"ended:status:{code}")
            break
        message = item if isinstance(item, pb.InspectRequest) else pb.InspectRequest.FromString(
            item)
        reply = next(answers, None)
        assert reply is not None, f"no reply to a batch; stream error {error!r}"
        before = len(written)
        outcome = _check_reply(reply, message.batch, expect, written)
        outcomes.append(outcome)
        if expect.tag:
            outcomes.append(f"shm:{expect.tag}:{outcome}")
        if expect.step and (expect.kind == "error" or outcome.startswith("decision:")):
            outcomes.append(f"segments:{outcome}")
        if len(written) > before:
            outcomes.append("shm:delta")
    else:
        assert error is None, f"the stream ended with {error!r}; expected it to go on"
    assert next(answers, None) is None, "more replies than batches"
    if regions is not None:
        _check_region_files(regions, written)
    return outcomes


def check_still_serving(channel: Target) -> None:
    """A known-good stream still gets a decision."""
    rows = np.random.default_rng(0).normal(size=(2, D_IN)).astype(np.float32)
    shape, raw = codec.encode(rows)
    batch = pb.ActivationBatch(request_id="probe", sequence=1, hook=HOOK, positions=[0, 1],
                               activations=pb.Tensor(datatype="F32", shape=shape, raw=raw))
    outcomes = check_stream(channel, [pb.InspectRequest(config=good_config()),
                                      pb.InspectRequest(batch=batch)])
    assert outcomes[0].startswith("decision:"), outcomes


# --- the codec -----------------------------------------------------------------------------

codec_shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6).map(list),
    st.lists(int64s, max_size=4),
    st.lists(st.sampled_from([0, 1, 2**31, 2**62, INT64[1]]), max_size=6),
    st.integers(60, 70).map(lambda n: [0] * n),
)


@st.composite
def codec_inputs(draw: st.DrawFn) -> tuple[str, list[int], bytes]:
    """A datatype, a shape and raw bytes; the length matches the shape about half the time."""
    datatype = draw(datatypes)
    shape = draw(codec_shapes)
    itemsize = codec.DATATYPES.get(datatype, 4)
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if draw(st.booleans()) and 0 <= count * itemsize <= 4096:
        raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    else:
        raw = draw(st.binary(max_size=64))
    return datatype, shape, raw


def check_decode(datatype: str, shape: list[int], raw: bytes) -> str:
    """decode returns a float32 array of exactly ``shape`` or raises InvalidInput."""
    try:
        out = codec.decode(datatype, shape, raw)
    except InvalidInput as error:
        refused: InvalidInput | None = error
    else:
        refused = None
    if refused is not None:
        assert str(refused).startswith("tensor "), refused
        return "InvalidInput"
    assert out.dtype == np.float32
    assert out.shape == tuple(shape)
    return "decoded"


# --- SAE file loaders ----------------------------------------------------------------------
#
# A case is a valid SAE written by tests.sae_fixtures, then mutated: cfg.json fields set to
# wrong types, huge, negative or unknown values, removed or added, or the file replaced;
# tensors dropped, added, reshaped, retyped or given NaN; the weights file's bytes cut,
# flipped, padded or its header rewritten; npz members pickled, integer or of the wrong shape.
# Mutations are plain data (drawn before any file exists) so a failing case prints readably.

SAE_D_IN, SAE_D_SAE = 8, 16
SAE_FORMATS = ("saelens-standard", "saelens-topk", "saelens-jumprelu", "saelens-gated",
               "sparsify", "gemmascope")
SAE_FILES = frozenset({"cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz",
                       "activation_scaler.json"})
#: Words that show a refusal names what is wrong when no quoted field name does.
_FIELD_WORDS = ("'", "JSON", "header", "truncated", "file", "archive")

Mutation = tuple[Any, ...]

_CFG_KEYS = ["d_in", "d_sae", "architecture", "activation_fn", "k", "activation_fn_kwargs",
             "normalize_activations", "apply_b_dec_to_input", "hook_name", "metadata",
             "norm_scaling_factor", "finetuning_scaling_factor", "rescale_acts_by_decoder_norm",
             "normalize_decoder", "num_latents", "expansion_factor", "activation", "transcode",
             "skip_connection", "embed_skip", "gram_lookup"]
json_values: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.integers(),
    st.sampled_from([0, -1, 10**30, 2**63, 10**400, 1.5, float("nan"), float("inf"), 1e308]),
    st.floats(), _text,
    st.sampled_from(["standard", "topk", "jumprelu", "gated", "matryoshka", "relu",
                     "expected_average_only_in", "constant_norm_rescale", "layer_norm", "none",
                     "blocks.6.hook_resid_post", ""]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(_text, st.integers(), max_size=2),
    st.just({"k": 4}), st.just({"hook_name": 7}),
)
#: Stands for a JSON nesting deeper than Python's recursion limit (expanded when written,
#: so that a failing case prints short).
_DEEP_JSON = b"<deep>"
_DEEP_BYTES = b"[" * 100_000 + b"]" * 100_000
cfg_mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.tuples(st.just("cfg_set"), st.sampled_from(_CFG_KEYS), json_values),
    st.tuples(st.just("cfg_del"), st.sampled_from(_CFG_KEYS)),
    # Turn on the paths that read more fields (scaling factors, k, decoder-norm rescaling).
    st.tuples(st.just("cfg_set"), st.just("normalize_activations"),
              st.sampled_from([True, "expected_average_only_in"])),
    st.tuples(st.just("cfg_set"), st.sampled_from(["norm_scaling_factor", "k"]), json_values),
    st.tuples(st.just("cfg_set"), st.just("rescale_acts_by_decoder_norm"), st.just(True)),
    st.tuples(st.just("cfg_set"), _text, json_values),
    st.tuples(st.just("cfg_bytes"), st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"{", b"[]", b"null", b"42", b'"cfg"', b"\xff\xfe{}",
                         b'{"d_in": 8, "d_in": "x"}', _DEEP_JSON, b"{" + b" " * 10_000]))),
    st.tuples(st.just("scaler"), st.one_of(st.none(), json_values,
                                            st.just({"has_whitening": True}))),
)
tensor_mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 9)),
    st.tuples(st.just("extra"), st.sampled_from(["W_skip", "extra", "threshold", "b_gate",
                                                 "log_threshold", "scaling_factor"])),
    st.tuples(st.just("reshape"), st.integers(0, 9),
              st.lists(st.integers(0, 2 * SAE_D_SAE), max_size=3)),
    st.tuples(st.just("transpose"), st.integers(0, 9)),
    st.tuples(st.just("nan"), st.integers(0, 9), st.integers(0, 10**6),
              st.sampled_from([np.nan, np.inf, -np.inf, 1e300])),
    st.tuples(st.just("dtype"), st.integers(0, 9),
              st.sampled_from(["float16", "bf16", "float64", "int32", "int8", "bool", "object",
                               "complex64", "float128"])),
    st.tuples(st.just("scalar"), st.integers(0, 9)),
)
byte_mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)),
                                        min_size=1, max_size=6)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header_len"), st.one_of(st.integers(0, 2**64 - 1),
                                               st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]))),
    st.tuples(st.just("header"), st.one_of(
        st.binary(max_size=64), st.just(_DEEP_JSON),
        st.sampled_from([b"[]", b'{"W_enc": 3}', b'{"W_enc": {"dtype": "F32", "shape": [8, 16], '
                         b'"data_offsets": [0, 1e99]}}', b'{"__metadata__": [1]}',
                         b'{"W_enc": {"dtype": "F32", "shape": [-8, 16], "data_offsets": [0, 4]}}',
                         b'{"W_enc": {"dtype": "F32", "shape": [true, 16], '
                         b'"data_offsets": [0, 64]}}']))),
    st.tuples(st.just("replace"), st.binary(max_size=300)),
)


@st.composite
def sae_cases(draw: st.DrawFn) -> tuple[str, list[Mutation]]:
    """A format and 1-3 mutations of its files (occasionally none: the valid fixture)."""
    fmt = draw(st.sampled_from(SAE_FORMATS))
    kinds = [tensor_mutations, byte_mutations]
    if fmt != "gemmascope":
        kinds.append(cfg_mutations)
    mutations = draw(st.lists(st.one_of(*kinds), min_size=0, max_size=3))
    return fmt, mutations


def _write_tensors_file(path: Path, tensors: dict[str, NDArray[Any]]) -> None:
    """A safetensors file of any dtypes (BF16 given as uint16 bits); unsupported NumPy dtypes
    get a safetensors name the reader does not know."""
    import json
    import struct

    names = {"float32": "F32", "float16": "F16", "uint16": "BF16", "float64": "F64",
             "int32": "I32", "int8": "I8", "bool": "BOOL", "complex64": "C64"}
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        if array.dtype.kind == "O":  # safetensors has no objects: an unknown dtype name
            blob, dtype = b"\0" * (8 * array.size), "OBJECT"
        else:
            if array.dtype.itemsize > 8 and array.dtype.kind == "f":
                array = array.astype(np.float64)
            blob = np.ascontiguousarray(array).tobytes()
            dtype = names.get(array.dtype.name, array.dtype.name.upper())
        header[name] = {"dtype": dtype,
                        "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _retype(array: NDArray[Any], dtype: str) -> NDArray[Any]:
    from tests.sae_fixtures import bf16_bits

    if dtype == "bf16":
        return bf16_bits(array.astype(np.float32))
    if dtype == "object":
        return np.array([{"pickled": True}] * max(array.size, 1), dtype=object)
    if dtype == "float128":
        return array.astype(np.longdouble)
    with np.errstate(all="ignore"):
        return array.astype(dtype)


def _mutate_tensors(tensors: dict[str, NDArray[Any]], mutation: Mutation) -> None:
    with np.errstate(all="ignore"):  # overflowing casts are part of the corruption
        _mutate_tensors_unchecked(tensors, mutation)


def _mutate_tensors_unchecked(tensors: dict[str, NDArray[Any]], mutation: Mutation) -> None:
    kind = mutation[0]
    if kind == "extra":
        tensors[mutation[1]] = np.ones(SAE_D_SAE, dtype=np.float32)
        return
    if not tensors:
        return
    name = sorted(tensors)[mutation[1] % len(tensors)]
    array = tensors[name]
    if array.dtype.kind not in "fiub" and kind in ("reshape", "nan", "dtype"):
        return  # already as broken as it gets
    if kind == "drop":
        del tensors[name]
    elif kind == "reshape":
        shape = tuple(mutation[2])
        size = int(np.prod(shape, dtype=np.int64))
        tensors[name] = np.resize(array.astype(np.float32), size).reshape(shape)
    elif kind == "transpose":
        tensors[name] = np.ascontiguousarray(array.T)
    elif kind == "nan":
        out = array.astype(np.float64 if mutation[3] == 1e300 else np.float32)
        if out.size:
            out.reshape(-1)[mutation[2] % out.size] = mutation[3]
        tensors[name] = out
    elif kind == "dtype":
        tensors[name] = _retype(array, mutation[2])
    elif kind == "scalar":
        tensors[name] = np.asarray(array.reshape(-1)[0] if array.size else 0.0)


def _mutate_bytes(path: Path, mutation: Mutation, safetensors: bool) -> None:
    import struct

    data = bytearray(path.read_bytes())
    kind = mutation[0]
    if kind == "truncate":
        data = data[: int(len(data) * mutation[1])]
    elif kind == "flip" and data:
        for where, value in mutation[1]:
            data[min(int(len(data) * where), len(data) - 1)] = value
    elif kind == "append":
        data += mutation[1]
    elif kind == "header_len" and safetensors and len(data) >= 8:
        data[:8] = struct.pack("<Q", mutation[1])
    elif kind == "header" and safetensors and len(data) >= 8:
        (old,) = struct.unpack("<Q", data[:8])
        new = _DEEP_BYTES if mutation[1] == _DEEP_JSON else mutation[1]
        data = bytearray(struct.pack("<Q", len(new)) + new + data[8 + old:])
    elif kind == "replace":
        data = bytearray(mutation[1])
    path.write_bytes(bytes(data))


def build_sae(folder: Path, fmt: str, mutations: Sequence[Mutation]) -> Path:
    """Write the format's valid fixture under ``folder``, apply the mutations, and return the
    path to load."""
    import json

    from tests.sae_fixtures import (
        random_gated_weights,
        random_jumprelu_weights,
        random_standard_weights,
        write_gemmascope,
        write_saelens,
        write_sparsify,
    )

    d_in, d_sae = SAE_D_IN, SAE_D_SAE
    tensor_kinds = {"drop", "extra", "reshape", "transpose", "nan", "dtype", "scalar"}
    if fmt == "gemmascope":
        path = write_gemmascope(folder / "params.npz", d_in, d_sae)
        with np.load(path) as data:
            arrays: dict[str, NDArray[Any]] = {k: data[k] for k in data.files}
        for mutation in mutations:
            if mutation[0] in tensor_kinds:
                _mutate_tensors(arrays, mutation)
        with path.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types allow_pickle
        for mutation in mutations:
            if mutation[0] not in tensor_kinds:
                _mutate_bytes(path, mutation, safetensors=False)
        return path
    if fmt == "sparsify":
        root = write_sparsify(folder / "layers.6", d_in, d_sae, k=4)
        weights_file = root / "sae.safetensors"
        from guard.sae.safetensors import SafetensorsFile

        stored = SafetensorsFile(weights_file)
        tensors = {name: stored.float32(name) for name in stored.names()}
    else:
        arch = fmt.split("-", 1)[1]
        weights = {"jumprelu": random_jumprelu_weights, "gated": random_gated_weights}.get(
            arch, random_standard_weights)(d_in, d_sae)
        extra = {"k": 4} if arch == "topk" else {}
        root = write_saelens(folder / "sae", d_in, d_sae, architecture=arch, weights=weights,
                             extra_cfg=extra)
        weights_file = root / "sae_weights.safetensors"
        tensors = dict(weights)
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    cfg_path = root / "cfg.json"
    for mutation in mutations:
        kind = mutation[0]
        if kind in tensor_kinds:
            _mutate_tensors(tensors, mutation)
        elif kind in ("cfg_set", "cfg_del"):
            try:
                cfg = json.loads(cfg_path.read_bytes())
            except (ValueError, RecursionError):
                continue  # already replaced by bytes that are not a JSON object
            if isinstance(cfg, dict):
                if kind == "cfg_set":
                    cfg[mutation[1]] = mutation[2]
                else:
                    cfg.pop(mutation[1], None)
                cfg_path.write_text(json.dumps(cfg))
        elif kind == "cfg_bytes":
            cfg_path.write_bytes(_DEEP_BYTES if mutation[1] == _DEEP_JSON else mutation[1])
        elif kind == "scaler":
            if mutation[1] is None:
                (root / "activation_scaler.json").write_text("not json")
            else:
                (root / "activation_scaler.json").write_text(
                    json.dumps({"scaling_factor": mutation[1]} if not isinstance(mutation[1], dict)
                               else mutation[1]))
    _write_tensors_file(weights_file, tensors)
    for mutation in mutations:
        if mutation[0] in ("truncate", "flip", "append", "header_len", "header", "replace"):
            _mutate_bytes(weights_file, mutation, safetensors=True)
    return root


def check_loader(path: Path) -> str:
    """The loader property: a consistent SaeModel, or a SaeFileError naming a file of the SAE
    and what is wrong in it. Returns ``loaded`` or ``SaeFileError:<file name>``."""
    from guard.errors import SaeFileError
    from guard.sae.formats import load_any

    hook = "blocks.6.hook_resid_post" if path.suffix == ".npz" else None
    try:
        loaded = load_any(path, hook)
    except SaeFileError as error:
        refused: SaeFileError | None = error
    else:
        refused = None
    if refused is not None:
        named = Path(refused.path)
        assert named.name in SAE_FILES or named == path, f"names no file of the SAE: {refused}"
        assert str(refused).startswith(str(refused.path)), refused
        assert refused.problem and any(word in refused.problem for word in _FIELD_WORDS), refused
        return f"SaeFileError:{named.name}"
    model = loaded if not hasattr(loaded, "model") else loaded.model
    from guard.sae.model import SaeModel

    assert isinstance(model, SaeModel)
    d_in, d_sae = model.d_in, model.d_sae
    assert d_in > 0 and d_sae > 0, (d_in, d_sae)
    arch = model.architecture
    assert arch.w_enc.shape == (d_in, d_sae)
    for name, array in arch.params.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
        if name != "W_enc":
            assert array.shape == (d_sae,), (name, array.shape)
    assert model.decoder.w_dec.shape == (d_sae, d_in)
    assert model.decoder.b_dec.shape == (d_in,)
    assert np.isfinite(model.decoder.w_dec).all() and np.isfinite(model.decoder.b_dec).all()
    if path.is_dir():
        import json

        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["d_in"] == d_in
    return "loaded"
