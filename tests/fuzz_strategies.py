"""Hypothesis strategies and properties for fuzzing the wire protocol and the tensor codec.

Shared by the short suite (``tests/test_fuzz_protocol.py``) and the long run
(``bench/fuzz.py``). A fuzzed stream is a list of messages; :func:`simulate` is an oracle
that predicts, from the protocol rules the README documents, what the guard must answer to
each one, and :func:`check_stream` sends the messages to a live guard and compares. Every
check returns an outcome label (``decision:CONTINUE``, ``error:INVALID_ARGUMENT``,
``status:NOT_FOUND``...) so that the callers can count what the fuzzing exercised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from guard import codec
from guard.config import (
    GuardConfig,
    LoggingConfig,
    PluginsConfig,
    SaeConfig,
    ServerConfig,
    SharedMemoryConfig,
)
from guard.engine import Engine
from guard.errors import InvalidInput
from guard.framing import FrameReader, send_frame
from guard.server import TRANSPORT_HEADROOM, GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
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
#: The guard's refusal of rows whose features overflow (guard.engine.check_finite_features).
NONFINITE_FEATURES = "encode to NaN or Inf feature activations"
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1

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


# --- the live server -----------------------------------------------------------------------


def fuzz_config(workdir: Path) -> GuardConfig:
    """A guard with a real SAELens SAE, the detectors and the steering plugins (so every
    valid batch is encoded, inspected and may get a steering delta), and shared memory on, so
    that it also serves the doorbell socket."""
    sae = write_saelens(workdir / "sae", D_IN, D_SAE, hook_name=HOOK)
    (workdir / "shm").mkdir()
    return GuardConfig(
        server=ServerConfig(listen=f"unix://{workdir}/guard.sock",
                            max_message_bytes=MAX_MESSAGE_BYTES, drain_grace_seconds=1,
                            shared_memory=SharedMemoryConfig(
                                enabled=True, allowed_dirs=(str(workdir / "shm"),))),
        logging=LoggingConfig(level="error"),
        saes=(SaeConfig(path=sae),),
        plugins=PluginsConfig(enabled=("detectors", "steering"), timeout_ms=30_000,
                              config=PLUGIN_SETTINGS),
    )


@contextmanager
def fuzz_server() -> Iterator[tuple[GuardServer, grpc.Channel]]:
    """A started, ready guard and a channel to it; both closed on exit."""
    with tempfile.TemporaryDirectory(prefix="guard-fuzz-") as tmp:
        config = fuzz_config(Path(tmp))
        server = GuardServer(config)
        server.start()
        try:
            server.set_ready(Engine.load(config))
            with grpc.insecure_channel(server.addresses[0]) as channel:
                yield server, channel
        finally:
            server.stop(0)


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


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.Tensor, int]:
    """A Tensor (valid or not) and the row count its positions should match."""
    datatype = draw(datatypes)
    n_rows = draw(st.one_of(st.integers(1, 6), st.integers(-3, 0), st.integers(60, 130)))
    wire_type = datatype if datatype in codec.DATATYPES else "F32"
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
    return pb.Tensor(datatype=datatype, shape=shape, raw=raw), n_rows


@st.composite
def batches(draw: st.DrawFn, sequence: int) -> pb.ActivationBatch:
    tensor, n_rows = draw(tensors())
    rows = max(n_rows, 0)
    positions: list[int] = list(range(rows))
    kind = draw(st.sampled_from(["ok"] * 4 + ["values", "short", "long"]))
    if kind == "values":
        positions = draw(st.lists(int64s, min_size=rows, max_size=rows))
    elif kind == "short" and positions:
        positions = positions[: draw(st.integers(0, len(positions) - 1))]
    elif kind == "long":
        positions += draw(st.lists(int64s, min_size=1, max_size=3))
    token_ids: list[int] = draw(st.one_of(
        st.just([100 + i for i in range(rows)]), st.just([]),
        st.lists(int64s, min_size=rows, max_size=rows), st.lists(int64s, max_size=8)))
    return pb.ActivationBatch(
        request_id=draw(request_ids), sequence=sequence, hook=draw(hooks),
        activations=tensor, positions=positions, token_ids=token_ids,
        phase=pb.Phase.ValueType(draw(enum_values)), attributes=draw(attributes),
    )


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
    """A whole stream: usually a good config then batches; sometimes a bad or missing config,
    a second config, or an empty message in between."""
    messages: list[pb.InspectRequest] = []
    first = draw(st.sampled_from(["good"] * 6 + ["fuzzed", "none"]))
    if first == "good":
        messages.append(pb.InspectRequest(config=good_config()))
    elif first == "fuzzed":
        messages.append(pb.InspectRequest(config=draw(stream_configs)))
    count = draw(st.integers(1, 5))
    for sequence in draw(sequences(count)):
        messages.append(pb.InspectRequest(batch=draw(batches(sequence))))
    extra = draw(st.sampled_from(["none"] * 8 + ["config", "empty"]))
    if extra != "none":
        at = draw(st.integers(1, len(messages)))
        message = (pb.InspectRequest(config=good_config()) if extra == "config"
                   else pb.InspectRequest())
        messages.insert(at, message)
    return messages


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


@dataclasses.dataclass(frozen=True)
class Expect:
    """What one message must get: a decision, a per-batch error (one of ``errors``, each a
    status name and a fragment of the message), nothing (a config), or the stream's end with
    one of ``errors``."""

    kind: str  # "decision" | "error" | "none" | "end"
    errors: tuple[tuple[str, str], ...] = ()
    skipped: int = 0


#: A region the fuzzing registers (its path is made up) is refused with one of these codes,
#: the details naming ``config.shared_memory``.
_REGION_CODES = ("PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                 "FAILED_PRECONDITION")


def _config_problem(config: pb.StreamConfig) -> tuple[tuple[str, str], ...] | None:
    version = config.protocol_version or "1"
    if version.split(".")[0] != "1":
        return (("FAILED_PRECONDITION", "config.protocol_version"),)
    if config.mode not in (pb.MODE_MONITOR, pb.MODE_INLINE):
        return (("INVALID_ARGUMENT", "config.mode"),)
    if any(hook != HOOK for hook in config.hooks):
        return (("NOT_FOUND", "is not served"),)
    if config.shared_memory:
        return tuple((code, "config.shared_memory") for code in _REGION_CODES)
    return None


def batch_problems(batch: pb.ActivationBatch) -> list[tuple[str, str]]:
    """Every rule the batch breaks (the guard reports the first it checks)."""
    problems: list[tuple[str, str]] = []
    if not batch.request_id:
        problems.append(("INVALID_ARGUMENT", "batch.request_id"))
    if batch.hook != HOOK:
        problems.append(("NOT_FOUND", "is not served"))
    tensor = batch.activations
    if len(tensor.raw) > MAX_MESSAGE_BYTES:
        problems.append(("RESOURCE_EXHAUSTED", "server.max_message_bytes"))
    if tensor.HasField("shm"):  # no region is ever registered: refused, whatever it says
        problems += [("NOT_FOUND", "batch.activations.shm"),
                     ("INVALID_ARGUMENT", "batch.activations")]
        if tensor.shm.length > MAX_MESSAGE_BYTES:
            problems.append(("RESOURCE_EXHAUSTED", "server.max_message_bytes"))
    if batch.HasField("steering_ref"):
        problems += [("NOT_FOUND", "batch.steering_ref"),
                     ("INVALID_ARGUMENT", "batch.steering_ref")]
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != D_IN or shape[0] < 1:
        problems.append(("INVALID_ARGUMENT", "batch.activations.shape"))
    if tensor.datatype not in codec.DATATYPES:
        problems.append(("INVALID_ARGUMENT", "tensor datatype"))
    rows: NDArray[np.float32] | None = None
    if len(shape) == 2 and shape[0] >= 0 and shape[1] >= 0 and tensor.datatype in codec.DATATYPES:
        if len(tensor.raw) != codec.expected_nbytes(tensor.datatype, shape):
            problems.append(("INVALID_ARGUMENT", "tensor raw"))
        else:
            rows = codec.decode(tensor.datatype, shape, tensor.raw)
    if len(shape) == 2:
        if len(batch.positions) != shape[0]:
            problems.append(("INVALID_ARGUMENT", "batch.positions"))
        if batch.token_ids and len(batch.token_ids) != shape[0]:
            problems.append(("INVALID_ARGUMENT", "batch.token_ids"))
    if rows is not None and rows.ndim == 2 and not np.isfinite(rows).all():
        problems.append(("INVALID_ARGUMENT", "hold NaN or Inf"))
    return problems


def simulate(messages: Sequence[pb.InspectRequest | bytes]) -> list[Expect]:
    """The expected outcome of each message, up to and including the one that ends the
    stream (later messages are never read)."""
    out: list[Expect] = []
    configured = False
    last: int | None = None
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
            problems = ((("FAILED_PRECONDITION", "already received"),) if configured
                        else _config_problem(message.config))
            if problems is not None:
                out.append(Expect("end", problems))
                return out
            configured = True
            out.append(Expect("none"))
            continue
        if kind is None:
            out.append(Expect("end", (("INVALID_ARGUMENT", "expected a config or a batch"),)))
            return out
        if not configured:
            out.append(Expect("end", (("FAILED_PRECONDITION", "must be a StreamConfig"),)))
            return out
        batch = message.batch
        if last is not None and batch.sequence <= last:
            out.append(Expect("error", (("ALREADY_EXISTS", "batch.sequence"),)))
            continue
        skipped = 0 if last is None else batch.sequence - last - 1
        last = batch.sequence
        broken = batch_problems(batch)
        out.append(Expect("error", tuple(broken), skipped) if broken
                   else Expect("decision", (), skipped))
    return out


# --- the properties ------------------------------------------------------------------------

_ACTIONS = {pb.ACTION_CONTINUE: "CONTINUE", pb.ACTION_STEER: "STEER", pb.ACTION_ABORT: "ABORT"}


def _code_name(value: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == value), str(value))


def _check_reply(reply: pb.InspectResponse, batch: pb.ActivationBatch, expect: Expect) -> str:
    assert (reply.request_id, reply.sequence) == (batch.request_id, batch.sequence), reply
    assert reply.skipped_sequences == expect.skipped, (reply, expect)
    if expect.kind == "error":
        assert reply.HasField("error"), f"expected one of {expect.errors}, got {reply}"
        code = _code_name(reply.error.code)
        message = reply.error.message
        assert message, reply
        assert any(code == want and fragment in message for want, fragment in expect.errors), (
            f"got {code}: {message!r}; expected one of {expect.errors}")
        assert reply.action == pb.ACTION_UNSPECIFIED and not reply.decision_id, reply
        return f"error:{code}"
    if reply.HasField("error") and NONFINITE_FEATURES in reply.error.message:
        # Finite rows so large that the SAE overflows float32: refused rather than scored NaN.
        rows = codec.decode(batch.activations.datatype, list(batch.activations.shape),
                            batch.activations.raw)
        assert _code_name(reply.error.code) == "INVALID_ARGUMENT", reply
        assert float(np.max(np.abs(rows))) > 1e30, f"refused rows that are not huge: {reply}"
        return "error:INVALID_ARGUMENT(non-finite features)"
    assert not reply.HasField("error"), f"a valid batch was rejected: {reply.error}"
    assert reply.action in _ACTIONS, reply
    assert reply.decision_id, reply
    assert list(reply.positions) == list(batch.positions)
    datatype = batch.activations.datatype
    n_rows = batch.activations.shape[0]
    for steering in reply.steering:
        assert steering.hook == HOOK
        assert steering.delta.datatype == datatype
        delta = codec.decode(datatype, steering.delta.shape, steering.delta.raw)
        assert delta.shape == (n_rows, D_IN)
        assert np.isfinite(delta).all(), f"non-finite steering delta for {datatype} rows"
    return f"decision:{_ACTIONS[reply.action]}"


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
    """Send every message as a frame on one doorbell connection (the socket times out
    instead of hanging); the replies and the StreamEnd that ended the stream."""
    replies: list[pb.InspectResponse] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(STREAM_TIMEOUT_S)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the guard ended it
            for message in messages:
                data = message if isinstance(message, bytes) else message.SerializeToString()
                send_frame(sock, data)
            sock.shutdown(socket.SHUT_WR)
        reader = FrameReader(sock, 1 << 26)
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
    label per answered message."""
    expected = simulate(messages)
    replies, error = run_stream(target, messages)
    outcomes: list[str] = []
    answers = iter(replies)
    for item, expect in zip(messages, expected, strict=False):
        if expect.kind == "none":
            continue
        if expect.kind == "end":
            assert error is not None, f"expected the stream to end with {expect.errors}"
            code, details = error.code().name, str(error.details() or "")
            assert details, f"status {code} without details"
            assert any(code == want and fragment in details for want, fragment in expect.errors), (
                f"stream ended with {code}: {details!r}; expected one of {expect.errors}")
            outcomes.append("undecodable" if DESERIALIZE_DETAILS in details else f"status:{code}")
            break
        message = item if isinstance(item, pb.InspectRequest) else pb.InspectRequest.FromString(
            item)
        reply = next(answers, None)
        assert reply is not None, f"no reply to a batch; stream error {error!r}"
        outcomes.append(_check_reply(reply, message.batch, expect))
    else:
        assert error is None, f"the stream ended with {error!r}; expected it to go on"
    assert next(answers, None) is None, "more replies than batches"
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
