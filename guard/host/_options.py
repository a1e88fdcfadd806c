"""The client's settings (validated once, at construction), its counters and its backoff."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final, Literal

import grpc
from grpc import aio

if TYPE_CHECKING:
    from guard.host._verdict import Verdict

Mode = Literal["inline", "monitor"]
FailurePolicy = Literal["open", "closed"]
WireDtype = Literal["auto", "F32", "F16", "BF16"]

_WIRE_DTYPES: Final[dict[str, WireDtype]] = {"auto": "auto", "F32": "F32", "F16": "F16",
                                             "BF16": "BF16"}

#: The guard's own default for ``server.max_message_bytes``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: Transport limits are this multiple of max_message_bytes, as on the guard: a batch a little
#: above the limit still reaches the other side's check (with its clear message), and a
#: steering reply in F32 for rows sent in F16 is twice their size.
TRANSPORT_HEADROOM: Final = 2

#: Called when a stream opens: pairs for the Inspect call's gRPC metadata.
MetadataHook = Callable[[], Sequence[tuple[str, str]]]
#: Called on the caller's thread for every batch: entries for the batch's attributes.
TraceContextHook = Callable[[], Mapping[str, str]]
#: Called with every guard verdict in MONITOR mode (on the client's reader thread or task).
ReplyHook = Callable[["Verdict"], None]


@dataclass(frozen=True)
class ClientOptions:
    """Everything a client was built with; :meth:`build` validates each argument."""

    target: str
    mode: Mode
    hooks: tuple[str, ...]
    failure_policy: FailurePolicy
    deadline_ms: float
    queue_size: int
    host_name: str
    reconnect_backoff_ms: float
    reconnect_backoff_max_ms: float
    reconnect_jitter: float
    max_message_bytes: int
    wire_dtype: WireDtype
    reset_after_late: int
    metadata: MetadataHook | None
    trace_context: TraceContextHook | None
    on_reply: ReplyHook | None
    #: TLS credentials for a guard's TCP listener (see :func:`tls_credentials`); None:
    #: plaintext (the in-pod Unix socket).
    credentials: grpc.ChannelCredentials | None = None

    @classmethod
    def build(
        cls,
        target: str,
        *,
        mode: str,
        hooks: Sequence[str],
        failure_policy: str,
        deadline_ms: float,
        queue_size: int,
        host_name: str,
        reconnect_backoff_ms: float,
        reconnect_backoff_max_ms: float,
        reconnect_jitter: float,
        max_message_bytes: int,
        wire_dtype: str,
        reset_after_late: int,
        metadata: MetadataHook | None,
        trace_context: TraceContextHook | None,
        on_reply: ReplyHook | None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> ClientOptions:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target: expected a gRPC address ('unix:///path' or "
                             f"'host:port'), found {target!r}")
        if mode not in ("inline", "monitor"):
            raise ValueError(f"mode: expected 'inline' or 'monitor', found {mode!r}")
        if failure_policy not in ("open", "closed"):
            raise ValueError(
                f"failure_policy: expected 'open' or 'closed', found {failure_policy!r}")
        if isinstance(hooks, str) or not all(isinstance(h, str) and h for h in hooks):
            raise ValueError(f"hooks: expected a list of hook names, found {hooks!r}")
        wire = _WIRE_DTYPES.get(wire_dtype) if isinstance(wire_dtype, str) else None
        if wire is None:
            raise ValueError(
                f"wire_dtype: expected 'auto', 'F32', 'F16' or 'BF16', found {wire_dtype!r}")
        _positive("deadline_ms", deadline_ms)
        _positive("reconnect_backoff_ms", reconnect_backoff_ms)
        _positive("reconnect_backoff_max_ms", reconnect_backoff_max_ms)
        if reconnect_backoff_max_ms < reconnect_backoff_ms:
            raise ValueError(
                f"reconnect_backoff_max_ms: expected >= reconnect_backoff_ms "
                f"({reconnect_backoff_ms}), found {reconnect_backoff_max_ms}")
        if not 0 <= reconnect_jitter < 1:
            raise ValueError(f"reconnect_jitter: expected a fraction in [0, 1), "
                             f"found {reconnect_jitter!r}")
        _positive_int("queue_size", queue_size)
        _positive_int("max_message_bytes", max_message_bytes)
        _positive_int("reset_after_late", reset_after_late)
        for name, hook in (("metadata", metadata), ("trace_context", trace_context),
                           ("on_reply", on_reply)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name}: expected a callable or None, found {hook!r}")
        if credentials is not None and not isinstance(credentials, grpc.ChannelCredentials):
            raise TypeError("credentials: expected grpc.ChannelCredentials (such as "
                            f"guard.host.tls_credentials(...)) or None, found {credentials!r}")
        if credentials is not None and target.startswith("unix:"):
            raise ValueError(f"credentials: the guard serves TLS on TCP only, not on the Unix "
                             f"socket {target!r}; pass credentials=None")
        return cls(
            target=target, mode="inline" if mode == "inline" else "monitor",
            hooks=tuple(hooks), failure_policy="open" if failure_policy == "open" else "closed",
            deadline_ms=float(deadline_ms), queue_size=queue_size, host_name=host_name,
            reconnect_backoff_ms=float(reconnect_backoff_ms),
            reconnect_backoff_max_ms=float(reconnect_backoff_max_ms),
            reconnect_jitter=float(reconnect_jitter), max_message_bytes=max_message_bytes,
            wire_dtype=wire,
            reset_after_late=reset_after_late, metadata=metadata, trace_context=trace_context,
            on_reply=on_reply, credentials=credentials,
        )

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel arguments: message limits, and gRPC's own reconnect backoff aligned
        with ours (otherwise a channel in its backoff refuses our new stream for up to 2 min)."""
        transport_limit = self.max_message_bytes * TRANSPORT_HEADROOM
        return [
            ("grpc.max_send_message_length", transport_limit),
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.initial_reconnect_backoff_ms", int(self.reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", int(self.reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", int(self.reconnect_backoff_max_ms)),
        ]

    def open_channel(self) -> grpc.Channel:
        """A channel to the target: TLS with ``credentials``, plaintext without."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.channel_options())
        return grpc.secure_channel(self.target, self.credentials, options=self.channel_options())

    def open_aio_channel(self) -> aio.Channel:
        """The asyncio twin of :meth:`open_channel` (call it inside the event loop)."""
        if self.credentials is None:
            return aio.insecure_channel(self.target, options=self.channel_options())
        return aio.secure_channel(self.target, self.credentials, options=self.channel_options())


def tls_credentials(
    root_ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files, for a guard whose TCP listener serves TLS.

    :param root_ca: the CA that signed the guard's certificate (None: the system's roots).
    :param cert: this host's client certificate, for a guard with mutual TLS
        (``server.tls.client_ca_file``); give ``key`` with it.
    :param key: the unencrypted private key of ``cert``.
    """
    if cert is not None and key is None:
        raise ValueError("key: expected the private key of cert (a client certificate needs "
                         "its key), found None")
    if key is not None and cert is None:
        raise ValueError("cert: expected the client certificate of key (a key alone proves "
                         "nothing), found None")

    def read(name: str, path: str | os.PathLike[str] | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise ValueError(f"{name}: expected a readable PEM file, found {str(path)!r} "
                             f"({exc.strerror})") from exc

    return grpc.ssl_channel_credentials(root_certificates=read("root_ca", root_ca),
                                        private_key=read("key", key),
                                        certificate_chain=read("cert", cert))


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, found {value!r}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, found {value!r}")


@dataclass(frozen=True)
class ClientCounters:
    """A snapshot of a client's counts since it was built."""

    #: Batches handed to gRPC.
    sent: int = 0
    #: Replies received from the guard (decisions and per-batch errors).
    replies: int = 0
    #: INLINE verdicts decided by the failure policy: CONTINUE (open) or ABORT (closed).
    fail_open: int = 0
    fail_closed: int = 0
    #: INLINE batches whose reply missed the deadline.
    timeouts: int = 0
    #: Per-batch error replies (``error`` set), and replies that break the protocol.
    errors: int = 0
    #: INLINE batches decided while no stream was up, or whose stream broke before the reply.
    unavailable: int = 0
    #: Replies that arrived after their batch's deadline and were discarded.
    late_replies: int = 0
    #: Streams opened after a broken one.
    reconnects: int = 0
    #: MONITOR batches dropped because the queue was full (or left in it at close).
    dropped: int = 0
    #: Batches whose rows went through the shared-memory region (``shared_memory=``).
    shm_batches: int = 0
    #: Batches sent as bytes although shared memory is on: no free slot, or the guard refused
    #: the region.
    shm_fallbacks: int = 0
    #: Requests named in RequestEnded messages sent (``end_requests``).
    requests_ended: int = 0


_COUNTER_NAMES: Final = frozenset(f.name for f in fields(ClientCounters))


class CounterBox:
    """The live counters, shared by the caller threads and the client's own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTER_NAMES, 0)

    def add(self, name: str, amount: int = 1) -> int:
        """Add to one counter; returns its new value."""
        with self._lock:
            self._counts[name] += amount
            return self._counts[name]

    def snapshot(self) -> ClientCounters:
        with self._lock:
            return ClientCounters(**self._counts)


class Backoff:
    """Exponential reconnect delays: doubling from ``initial_s`` up to ``cap_s``, each spread
    by +-``jitter`` so that many hosts restarting together do not reconnect in step."""

    def __init__(self, initial_s: float, cap_s: float, jitter: float,
                 rng: random.Random | None = None) -> None:
        self._initial = initial_s
        self._cap = cap_s
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt, in seconds."""
        base = min(self._cap, self._initial * 2.0 ** min(self._attempt, 62))
        self._attempt += 1
        spread = 1.0 + self._jitter * (2.0 * self._rng.random() - 1.0)
        return min(self._cap, base * spread)

    def reset(self) -> None:
        """Back to the initial delay (after a stream that worked)."""
        self._attempt = 0
