"""The guard's configuration: one YAML file, validated at load.

The same file is mounted by the Helm chart. Every error names the key path, what was
expected and what was found (``saes[1].sha256: expected 64 hex characters, found 'abc'``).
A few deployment knobs can be overridden by environment variables (see ``ENV_OVERRIDES``).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, cast

import yaml

from guard.errors import ConfigError
from guard.settings import Settings

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
SaeDtype = Literal["auto", "fp32", "fp16", "int8"]

#: Default fits a [512, 8192] F32 batch (16 MiB of tensor bytes) with room for labels.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: Default encode budget: fits the Helm chart's 2 GiB memory limit (docs/operations.md, Memory).
DEFAULT_MAX_INFLIGHT_ENCODE_BYTES: Final = 512 * 1024 * 1024
DEFAULT_LISTEN: Final = "unix:///tmp/activation-guard/guard.sock"
#: Messages up to this multiple of server.max_message_bytes reach the guard, which answers
#: with a per-batch RESOURCE_EXHAUSTED naming the option; beyond it gRPC itself refuses them.
TRANSPORT_HEADROOM: Final = 2
#: gRPC's message length options are signed 32-bit integers.
GRPC_MAX_MESSAGE_LENGTH: Final = 2**31 - 1

#: Environment variable -> (section, key). Applied after the file is read, then validated.
ENV_OVERRIDES: Final[dict[str, tuple[str, str]]] = {
    "GUARD_LISTEN": ("server", "listen"),
    "GUARD_TCP_LISTEN": ("server", "tcp_listen"),
    "GUARD_HEALTH_LISTEN": ("server", "health_listen"),
    "GUARD_SOCKET_MODE": ("server", "socket_mode"),
    "GUARD_LOG_LEVEL": ("logging", "level"),
    "GUARD_LOG_FORMAT": ("logging", "format"),
    "GUARD_METRICS_LISTEN": ("telemetry", "metrics_listen"),
}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


#: Permissions of the guard's Unix socket: owner and group may connect, nobody else.
DEFAULT_SOCKET_MODE: Final = 0o660


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the TCP listeners (``server.listen`` when it is host:port, ``server.tcp_listen``).

    The Unix socket never uses TLS: it stays in the pod, guarded by its file permissions. The
    health-only listener (``server.health_listen``) stays plaintext for the kubelet's probes.
    """

    #: PEM certificate (chain) the guard presents; set with ``key_file`` to serve TLS.
    cert_file: Path | None = None
    #: PEM private key of ``cert_file`` (unencrypted: gRPC takes no passphrase).
    key_file: Path | None = None
    #: PEM CA bundle; when set, clients must present a certificate signed by it (mutual TLS).
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


@dataclass(frozen=True)
class SharedMemoryConfig:
    """``server.shared_memory``: regions a host may register on its streams (Triton's system
    shared memory); the checks each region passes are in :mod:`guard.sidecar.regions`."""

    #: Accept regions at all; off, a StreamConfig that registers one ends its stream.
    enabled: bool = False
    #: Absolute folders the region files must lie in (memory-backed volumes: /dev/shm, an
    #: emptyDir with medium Memory mounted in both containers).
    allowed_dirs: tuple[str, ...] = ("/dev/shm",)
    #: Owners accepted besides the guard's own uid (a host container running as another user).
    allowed_uids: tuple[int, ...] = ()
    #: Regions one stream may register.
    max_regions_per_stream: int = 4
    #: Serve the doorbell (:mod:`guard.sidecar.doorbell`): the Inspect stream framed on a plain Unix
    #: socket, without gRPC's exchange per batch. Needs a socket folder: ``doorbell_socket``,
    #: or a Unix ``server.listen`` beside which it goes.
    doorbell: bool = True
    #: The doorbell socket's absolute path; empty: ``<listen socket>.doorbell``.
    doorbell_socket: str = ""


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server listens."""

    #: Main listener: ``unix:///path/guard.sock`` (the in-pod path) or ``host:port``.
    listen: str = DEFAULT_LISTEN
    #: Optional second listener on TCP (``host:port``); empty for none.
    tcp_listen: str = ""
    #: Optional TCP listener serving only the health service (Kubernetes probes).
    health_listen: str = ""
    #: Largest accepted message; a larger batch gets RESOURCE_EXHAUSTED naming this key. At
    #: most 1073741823 (gRPC's 2^31 - 1 over the transport headroom of 2).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: On SIGTERM, in-flight streams get this long to finish before they are cancelled.
    drain_grace_seconds: float = 10.0
    #: Memory that batches being encoded and decided may hold at once, over every stream
    #: (each counts its float32 features, rows x features, plus one encode chunk's
    #: intermediates, see ``saes[].max_rows_per_encode``). A batch needing more than this
    #: alone gets RESOURCE_EXHAUSTED at once; one that does not fit beside the batches in
    #: progress waits up to ``encode_queue_seconds``.
    max_inflight_encode_bytes: int = DEFAULT_MAX_INFLIGHT_ENCODE_BYTES
    #: How long a batch waits (first come, first served) for ``max_inflight_encode_bytes`` to
    #: have room before it gets RESOURCE_EXHAUSTED naming that key; 0: never waits.
    encode_queue_seconds: float = 5.0
    #: Concurrent RPCs (streams and unary calls, the health service's Check aside); more get
    #: RESOURCE_EXHAUSTED. The gRPC worker threads, all started at start-up, are this many
    #: plus 4 kept for Check, so health answers when every stream slot is taken.
    max_concurrent_rpcs: int = 64
    #: The watchdog's limit: when the main listener's health service (asked over the socket
    #: once a second) has not answered for this long, the guard reports NOT_SERVING, flushes
    #: its records and exits with status 70 so it is restarted; 0: no probe (a dead gRPC
    #: loop or doorbell acceptor still ends the process).
    liveness_timeout_seconds: float = 10.0
    #: Segments (requests) one batch may carry (an engine step); more get RESOURCE_EXHAUSTED.
    max_segments_per_batch: int = 1024
    #: Requests a stream keeps state for; past it the least recently seen is forgotten
    #: (counted in ``guard.requests.evicted``). Hosts free requests with RequestEnded.
    max_requests_per_stream: int = 4096
    #: Streams (gRPC calls or doorbell connections) one peer may hold at once; more get
    #: RESOURCE_EXHAUSTED naming the peer; 0: no cap. The peer is the uid on the doorbell and
    #: the address on TCP; on gRPC's Unix socket every peer counts as one (grpcio gives no
    #: credentials there).
    max_streams_per_peer: int = 32
    #: An Inspect stream with no message for this long (while the guard waits for one) is
    #: ended with UNAVAILABLE saying so; 0: never.
    stream_idle_seconds: float = 300.0
    #: Serve gRPC server reflection (``grpcurl list``).
    reflection: bool = True
    #: Permissions of the Unix socket file (in YAML an octal string such as ``'0660'``). A
    #: mode that lets other users in (any of the last digit's bits) is refused unless
    #: ``allow_world_socket`` is set.
    socket_mode: int = DEFAULT_SOCKET_MODE
    #: Accept a ``socket_mode`` open to every user of the machine (``'0666'``, ``'0777'``):
    #: any process could then send rows and read verdicts. Off: such a mode is an error.
    allow_world_socket: bool = False
    #: Group given the Unix socket (a name or a number); empty: the guard's own group.
    socket_group: str = ""
    #: TLS (and mutual TLS) on the TCP listeners; off unless ``cert_file`` is set.
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: The in-pod shared-memory transport (opt-in); see :mod:`guard.sidecar.regions`.
    shared_memory: SharedMemoryConfig = field(default_factory=SharedMemoryConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """structlog output: JSON lines when not on a TTY (``auto``), readable on a TTY."""

    #: Lowest level written.
    level: LogLevel = "info"
    #: ``auto`` (JSON lines unless stderr is a TTY), ``json`` or ``console``.
    format: LogFormat = "auto"


@dataclass(frozen=True)
class ReconstructionConfig:
    """``saes[].reconstruction``: how often the guard measures how well the SAE explains the
    rows it serves."""

    #: The fraction of batches (0 to 1; 0: off) on which the guard measures the SAE's
    #: reconstruction error per request (normalised MSE, exported as the
    #: ``guard.sae.reconstruction.nmse`` histogram, handed to plugins as
    #: ``FeatureBatch.reconstruction``, read by ``type: reconstruction`` detectors). A sampled
    #: batch whose plugins do not read every feature is encoded once more in full: set it with
    #: the cost in mind (docs/operations.md). Refused for a transcoder.
    sample: float = 0.0


@dataclass(frozen=True)
class SaeConfig:
    """One SAE served on one hook."""

    #: An SAE or transcoder: a SAELens folder, a sparsify layer folder, Gemma Scope's
    #: params.npz, a Gemma Scope 2 or Llama Scope folder, a folder written by `guard sae
    #: convert` (OpenAI, Goodfire), or an exported artifact (docs/saes.md lists them all).
    path: Path
    #: Hook name; defaults to the one stored with the SAE.
    hook: str | None = None
    #: sha256 pin of what is served (the weights file of a folder format; the manifest.json
    #: of an exported artifact), checked on the raw bytes before anything is parsed; a
    #: mismatch refuses to start.
    sha256: str | None = None
    #: Weight dtype of the encoder graph.
    dtype: SaeDtype = "auto"
    #: Features encoded for every batch on top of the plugins' subscriptions (``all`` or ids).
    features: tuple[int, ...] | Literal["all"] = ()
    #: The most rows one ONNX Runtime run encodes (a batch takes several runs), which bounds
    #: the encoder's intermediates to this many rows x d_sae; 0: automatic (rows of 16 MiB of
    #: float32 features: 910 for a 4608-feature SAE). Results are the same either way.
    max_rows_per_encode: int = 0
    #: Measuring the SAE's reconstruction error on served traffic.
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces, metrics and what they may hold (the OTLP side is set by ``OTEL_*`` variables)."""

    #: ``host:port`` of the Prometheus ``/metrics`` endpoint (``0.0.0.0:9464``); empty: none.
    metrics_listen: str = ""
    #: Set up OpenTelemetry tracing from the standard ``OTEL_*`` environment variables; spans
    #: are recorded and exported only when an OTLP endpoint is set.
    tracing: bool = True
    #: Put token ids and feature activations in spans; off, spans carry ids, names and scores.
    record_sensitive: bool = False


FailureMode = Literal["open", "closed"]


@dataclass(frozen=True)
class PluginsConfig:
    """Plugin discovery, fault handling and each plugin's settings (hot-reloadable)."""

    #: Load every plugin of the ``guard`` entry-point group (env GUARD_DISABLE_PLUGIN_AUTOLOAD=1
    #: turns this off: then only ``enabled`` plugins load).
    autoload: bool = True
    #: When non-empty, only these plugins load (a name not installed is an error).
    enabled: tuple[str, ...] = ()
    #: These plugins never load.
    disabled: tuple[str, ...] = ()
    #: Log every hook call with its duration.
    trace: bool = False
    #: Budget for all detect and steer calls of one batch; an overrun is a plugin failure.
    timeout_ms: float = 100.0
    #: What a batch gets when a plugin fails: ``open`` (CONTINUE with an error finding) or
    #: ``closed`` (ABORT naming the plugin).
    failure_mode: FailureMode = "open"
    #: Calls of one plugin that may run past their budget at once: while that many are
    #: stuck, the plugin is skipped (a failure, counted in ``guard.plugin.skipped``) until one
    #: returns, and holds no further plugin worker.
    max_stuck_calls: int = 1
    #: Decisions waiting for each sink (every sink has its own queue and thread); when a
    #: sink's queue is full, new records are dropped for that sink and counted.
    record_queue_size: int = 10_000
    #: Check the config file for changes this often (seconds; 0: only on SIGHUP).
    watch_interval_seconds: float = 2.0
    #: Plugin name -> that plugin's settings (handed to guard_configure).
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class GuardConfig:
    """The whole configuration file."""

    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    saes: tuple[SaeConfig, ...] = ()
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    #: Where the configuration came from (a path, or ``<embedded default>``).
    source: str = "<defaults>"


def _load_config_from_mapping(data: object, source: str, base_dir: Path | None) -> GuardConfig:
    if not isinstance(data, Mapping):
        raise ConfigError("<top level>", "a mapping", data)
    top = Settings(data)
    server = _server_section(top.section("server"), base_dir)
    log_section = top.section("logging")
    logging_config = LoggingConfig(
        level=cast(LogLevel, log_section.choice(
            "level", ("debug", "info", "warning", "error"), "info", fold_case=True)),
        format=cast(LogFormat, log_section.choice(
            "format", ("auto", "json", "console"), "auto", fold_case=True)),
    )
    log_section.finish()
    entries = top.sequence("saes", "a list of SAE entries")
    saes = tuple(_sae_entry(entries.section(index), base_dir) for index in entries.names())
    plugins = _plugins_section(top.section("plugins"))
    telemetry_section = top.section("telemetry")
    telemetry_defaults = TelemetryConfig()
    telemetry = TelemetryConfig(
        metrics_listen=telemetry_section.get("metrics_listen", _tcp_address,
                                             telemetry_defaults.metrics_listen),
        tracing=telemetry_section.boolean("tracing", telemetry_defaults.tracing),
        record_sensitive=telemetry_section.boolean("record_sensitive",
                                                   telemetry_defaults.record_sensitive),
    )
    telemetry_section.finish()
    top.finish()
    return GuardConfig(server=server, logging=logging_config, saes=saes, plugins=plugins,
                       telemetry=telemetry, source=source)


def _server_section(section: Settings, base_dir: Path | None) -> ServerConfig:
    defaults = ServerConfig()
    server = ServerConfig(
        listen=section.get("listen", _address, defaults.listen),
        tcp_listen=section.get("tcp_listen", _address, defaults.tcp_listen),
        health_listen=section.get("health_listen", _address, defaults.health_listen),
        max_message_bytes=section.positive_int("max_message_bytes", defaults.max_message_bytes),
        drain_grace_seconds=section.number("drain_grace_seconds", defaults.drain_grace_seconds,
                                           min=0),
        max_inflight_encode_bytes=section.positive_int("max_inflight_encode_bytes",
                                                       defaults.max_inflight_encode_bytes),
        encode_queue_seconds=section.number("encode_queue_seconds",
                                            defaults.encode_queue_seconds, min=0),
        max_concurrent_rpcs=section.positive_int("max_concurrent_rpcs",
                                                 defaults.max_concurrent_rpcs),
        liveness_timeout_seconds=section.number("liveness_timeout_seconds",
                                                defaults.liveness_timeout_seconds, min=0),
        max_segments_per_batch=section.positive_int("max_segments_per_batch",
                                                    defaults.max_segments_per_batch),
        max_requests_per_stream=section.positive_int("max_requests_per_stream",
                                                     defaults.max_requests_per_stream),
        max_streams_per_peer=section.get("max_streams_per_peer", _stream_cap,
                                         defaults.max_streams_per_peer),
        stream_idle_seconds=section.number("stream_idle_seconds",
                                           defaults.stream_idle_seconds, min=0),
        reflection=section.boolean("reflection", defaults.reflection),
        socket_mode=section.get("socket_mode", _socket_mode, defaults.socket_mode),
        allow_world_socket=section.boolean("allow_world_socket", defaults.allow_world_socket),
        socket_group=section.get("socket_group", _socket_group, defaults.socket_group),
        tls=_tls_section(section.section("tls"), base_dir),
        shared_memory=_shared_memory_section(section.section("shared_memory")),
    )
    section.finish()
    if server.max_message_bytes * TRANSPORT_HEADROOM > GRPC_MAX_MESSAGE_LENGTH:
        raise section.error("max_message_bytes", "at most "
                            f"{GRPC_MAX_MESSAGE_LENGTH // TRANSPORT_HEADROOM} (gRPC's limit, "
                            f"2^31 - 1, over the transport headroom of {TRANSPORT_HEADROOM})",
                            server.max_message_bytes)
    if not server.listen:
        raise section.error("listen", "an address (unix:///path or host:port)", server.listen)
    if server.socket_mode & 0o007 and not server.allow_world_socket:
        raise section.error("socket_mode", "a mode closed to other users, such as '0660' "
                            "(owner and group) or '0600' (owner only); to open the socket to "
                            "every user of the machine set server.allow_world_socket: true",
                            f"{server.socket_mode:04o}")
    if server.tls.enabled and server.listen.startswith("unix:") and not server.tcp_listen:
        raise section.error("tcp_listen", "a TCP listener (host:port) for server.tls to secure "
                            "(the Unix socket never uses TLS)", server.tcp_listen)
    return server


def _sae_entry(section: Settings, base_dir: Path | None) -> SaeConfig:
    raw_path = section.string("path", None, empty=True)
    if not raw_path:
        raise section.error("path", "the path of an SAE", raw_path)
    features = section.features("features", ())
    entry = SaeConfig(
        path=_resolve(raw_path, base_dir),
        hook=section.hook("hook", None),
        sha256=section.get("sha256", _sha256, None),
        dtype=cast(SaeDtype, section.choice("dtype", ("auto", "fp32", "fp16", "int8"), "auto",
                                            fold_case=True)),
        features=features if features == "all" else tuple(sorted(set(features))),
        max_rows_per_encode=section.get("max_rows_per_encode", _rows_per_encode, 0),
        reconstruction=_reconstruction(section.section("reconstruction")),
    )
    section.finish()
    return entry


def _reconstruction(section: Settings) -> ReconstructionConfig:
    """``saes[].reconstruction``: ``sample``, the fraction of batches measured (0: off)."""
    def fraction(key: str, value: object) -> float:
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0.0 <= value <= 1.0):
            raise ConfigError(key, "a fraction of batches from 0 (off) to 1 (every batch)",
                              value)
        return float(value)

    sample = section.get("sample", fraction, ReconstructionConfig.sample)
    section.finish()
    return ReconstructionConfig(sample=sample)


def _resolve(path: str, base_dir: Path | None) -> Path:
    """``~`` expanded; a relative path is relative to the config file's folder."""
    resolved = Path(os.path.expanduser(path))
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    return resolved


def _address(key: str, value: object) -> str:
    text = value.strip() if isinstance(value, str) else None
    if text is None or (text and not (text.startswith("unix:")
                                      or re.match(r"^[\w.\-\[\]:]*:\d+$", text))):
        raise ConfigError(key, "unix:///path/to.sock or host:port", value)
    return text


def _tcp_address(key: str, value: object) -> str:
    text = _address(key, value)
    if text.startswith("unix:"):
        raise ConfigError(key, "host:port (an HTTP endpoint for Prometheus)", value)
    return text


def _stream_cap(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, "a whole number of streams >= 0 (0: no cap)", value)
    return value


def _rows_per_encode(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, "a whole number of rows >= 1 (0: automatic)", value)
    return value


def _sha256(key: str, value: object) -> str:
    text = value.lower() if isinstance(value, str) else ""
    if not _SHA256.match(text):
        raise ConfigError(key, "64 hex characters (a sha256 digest)", value)
    return text


def _socket_mode(key: str, value: object) -> int:
    # Only strings: YAML 1.1 reads an unquoted 0660 as octal but 660 as decimal.
    text = value.strip().lower() if isinstance(value, str) else ""
    if re.fullmatch(r"(0o?)?[0-7]{3}", text):
        return int(text.removeprefix("0o"), 8)
    raise ConfigError(key, "a quoted octal permission string such as '0660' (owner and "
                      "group) or '0600' (owner only)", value)


def _socket_group(key: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"([A-Za-z_][\w.\-]*\$?|\d+)?", value):
        return value
    raise ConfigError(key, "a group name or a numeric group id ('' for the guard's own "
                      "group)", value)


def _tls_section(section: Settings, base_dir: Path | None) -> TlsConfig:
    """``server.tls``: both halves of the key pair, every file readable PEM, and the key
    matching the certificate (checked with the ssl module, so a bad pair is reported here
    rather than by gRPC's bind)."""

    def file_path(key: str, value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, "the path of a PEM file", value)
        return _resolve(value.strip(), base_dir)

    cert = section.get("cert_file", file_path, None)
    key = section.get("key_file", file_path, None)
    client_ca = section.get("client_ca_file", file_path, None)
    section.finish()
    if cert is None and key is None and client_ca is None:
        return TlsConfig()
    if cert is None:
        needed_by = section.key("key_file" if key is not None else "client_ca_file")
        raise section.error("cert_file", f"the server's PEM certificate ({needed_by} is set; "
                            "TLS needs cert_file and key_file together)", None)
    if key is None:
        raise section.error("key_file", f"the PEM private key of {section.key('cert_file')} "
                            "(TLS needs cert_file and key_file together)", None)

    def read(name: str, path: Path, marker: bytes, what: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise section.error(name, f"a readable {what}", f"{path} ({exc.strerror})") from exc
        if marker not in data:
            raise section.error(name, f"a {what} (with a '-----BEGIN ...' line)", str(path))
        return data

    read("cert_file", cert, b"-----BEGIN CERTIFICATE-----", "PEM certificate file")
    key_pem = read("key_file", key, b"PRIVATE KEY-----", "PEM private key file")
    if b"ENCRYPTED" in key_pem:
        raise section.error("key_file", "an unencrypted PEM private key (gRPC takes no "
                            "passphrase)", str(key))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        raise section.error("key_file", f"the private key of the certificate in {cert}",
                            f"{key} ({exc.reason or exc})") from exc
    if client_ca is not None:
        read("client_ca_file", client_ca, b"-----BEGIN CERTIFICATE-----",
             "PEM CA certificate file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise section.error("client_ca_file", "a PEM bundle of CA certificates",
                                f"{client_ca} ({exc.reason or exc})") from exc
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)


def _shared_memory_section(section: Settings) -> SharedMemoryConfig:
    """``server.shared_memory``: absolute folders, numeric uids, a positive region count."""

    def socket_file(key: str, value: object) -> str:
        if value == "":  # the default: beside the listen socket
            return ""
        if (not isinstance(value, str) or not os.path.isabs(value)
                or ".." in Path(value).parts or value.endswith("/")):
            raise ConfigError(key, "an absolute socket file path without '..' (or '' for "
                              "beside server.listen)", value)
        return os.path.normpath(value)

    defaults = SharedMemoryConfig()
    # Read even when absent, so that a typo's error lists allowed_dirs among the known keys.
    given = "allowed_dirs" in section
    folders = section.sequence("allowed_dirs", "a non-empty list of absolute folder paths",
                               non_empty=given)
    allowed_dirs = (tuple(_folder(folders, index) for index in folders.names()) if given
                    else defaults.allowed_dirs)
    config = SharedMemoryConfig(
        enabled=section.boolean("enabled", defaults.enabled),
        allowed_dirs=allowed_dirs,
        allowed_uids=section.int_list("allowed_uids", defaults.allowed_uids,
                                      expected="a list of numeric user ids (integers >= 0)"),
        max_regions_per_stream=section.positive_int("max_regions_per_stream",
                                                    defaults.max_regions_per_stream),
        doorbell=section.boolean("doorbell", defaults.doorbell),
        doorbell_socket=section.get("doorbell_socket", socket_file, defaults.doorbell_socket),
    )
    section.finish()
    return config


def _folder(folders: Settings, index: int) -> str:
    path = folders.string(index, empty=True)
    if not os.path.isabs(path) or ".." in Path(path).parts or os.path.normpath(path) == "/":
        raise folders.error(index, "an absolute folder path without '..', other than / (a "
                            "memory-backed folder such as /dev/shm)", path)
    return os.path.normpath(path)


def _plugins_section(section: Settings) -> PluginsConfig:
    def names(name: str) -> tuple[str, ...]:
        listed = section.sequence(name, "a list of plugin names")
        return tuple(listed.string(index) for index in listed.names())

    defaults = PluginsConfig()
    blocks = section.section("config", what="a mapping of plugin name to its settings")
    plugins = PluginsConfig(
        autoload=section.boolean("autoload", defaults.autoload),
        enabled=names("enabled"),
        disabled=names("disabled"),
        trace=section.boolean("trace", defaults.trace),
        timeout_ms=section.number("timeout_ms", defaults.timeout_ms, min=0),
        failure_mode=cast(FailureMode, section.choice("failure_mode", ("open", "closed"),
                                                      defaults.failure_mode)),
        max_stuck_calls=section.positive_int("max_stuck_calls", defaults.max_stuck_calls),
        record_queue_size=section.positive_int("record_queue_size",
                                               defaults.record_queue_size),
        watch_interval_seconds=section.number("watch_interval_seconds",
                                              defaults.watch_interval_seconds, min=0),
        config={name: block.data for name, block in blocks.sections("plugin")},
    )
    section.finish()
    return plugins


def _apply_env(data: object, env: Mapping[str, str]) -> object:
    if not isinstance(data, Mapping):
        return data  # the validator reports it
    merged: dict[str, Any] = dict(data)
    for variable, (section, key) in ENV_OVERRIDES.items():
        if variable in env:
            current = merged.get(section)
            block = dict(current) if isinstance(current, Mapping) else {}
            block[key] = env[variable]
            merged[section] = block
    return merged


#: Largest configuration file read (bytes); a bigger one is refused before parsing.
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: Deepest nesting of mappings and lists in the YAML.
MAX_CONFIG_DEPTH: Final = 32
#: Most alias uses (``*name``) in one file, and most nodes the file may hold with every
#: alias expanded (a "billion laughs" file stays small on disk but not in use).
MAX_CONFIG_ALIASES: Final = 100
MAX_CONFIG_NODES: Final = 100_000


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader (pure Python: the C composer would bypass these checks), with caps on
    nesting depth, alias uses and nodes after alias expansion, and construction errors
    (an integer past Python's digit limit, a bad date) reported at the value's position."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0
        self._anchor_sizes: dict[str, int] = {}

    def _peek(self) -> yaml.Event:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        return event

    def _too_much(self, what: str) -> yaml.composer.ComposerError:
        mark = cast("yaml.Mark | None", self._peek().start_mark)
        return yaml.composer.ComposerError(None, None, what, mark)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = cast(yaml.AliasEvent, self._peek())
            self._aliases += 1
            if self._aliases > MAX_CONFIG_ALIASES:
                raise self._too_much(f"more than {MAX_CONFIG_ALIASES} aliases")
            self._nodes += self._anchor_sizes.get(str(event.anchor), 1)
            if self._nodes > MAX_CONFIG_NODES:
                raise self._too_much(f"more than {MAX_CONFIG_NODES} values with its aliases "
                                     "expanded")
            return super().compose_node(parent, index)
        anchor = getattr(self._peek(), "anchor", None)
        start = self._nodes
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise self._too_much(f"more than {MAX_CONFIG_NODES} values")
        self._depth += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise self._too_much(f"nesting deeper than {MAX_CONFIG_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if anchor is not None:
            self._anchor_sizes[str(anchor)] = self._nodes - start
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({reason[:160]})", node.start_mark,
            ) from exc


def _yaml_error(exc: BaseException, source: str) -> ConfigError:
    """A parse failure as a ConfigError naming the line and column where known."""
    if isinstance(exc, RecursionError):
        return ConfigError("<file>", f"YAML nested at most {MAX_CONFIG_DEPTH} levels deep",
                           "deeper nesting", source=source)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) if isinstance(exc, yaml.MarkedYAMLError) else None
    text = problem or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return ConfigError("<file>", f"valid YAML{where}", text, source=source)


def _read_yaml(text: str, source: str) -> object:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError("<file>", f"at most {MAX_CONFIG_BYTES} bytes of YAML",
                          f"{len(text)} characters", source=source)
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError, TypeError) as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    allow_empty: bool = True,
) -> GuardConfig:
    """Parse and validate YAML text; ``env`` overrides apply (pass ``{}`` for none).

    Empty text (or only comments) means every default unless ``allow_empty`` is false (a
    reload: an emptied file is more likely a botched edit than a wish to drop every plugin
    setting). The YAML is capped in size, depth and aliases (``MAX_CONFIG_*``); every failure
    is a :class:`ConfigError`.
    """
    data = _read_yaml(text, source)
    if data is None:
        if not allow_empty:
            raise ConfigError("<file>", "a configuration (an empty file is refused on reload; "
                              "write {} for every default)", "an empty file", source=source)
        data = {}
    data = _apply_env(data, os.environ if env is None else env)
    try:
        return _load_config_from_mapping(data, source, base_dir)
    except ConfigError as exc:  # the one place that names the file in a key's error
        if exc.source:
            raise
        named = ConfigError(exc.key, exc.expected, exc.found, source=source)
        raise named.with_traceback(exc.__traceback__) from None
    except RecursionError:
        raise ConfigError("<file>", "a configuration nested less deeply", "deeper nesting",
                          source=source) from None


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                allow_empty: bool = True) -> GuardConfig:
    """Read and validate a configuration file (at most ``MAX_CONFIG_BYTES``)."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("<file>", "a readable configuration file", f"{exc.strerror}",
                          source=str(file)) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("<file>", f"a configuration file of at most {MAX_CONFIG_BYTES} bytes",
                          "a larger file", source=str(file))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", "UTF-8 text", f"an invalid byte at offset {exc.start}",
                          source=str(file)) from None
    return parse_config(text, source=str(file), base_dir=file.parent.resolve(), env=env,
                        allow_empty=allow_empty)


def default_config_text() -> str:
    """The embedded default configuration (what ``guard serve`` uses without --config)."""
    return resources.files("guard").joinpath("defaults/guard.yaml").read_text(encoding="utf-8")


def load_default_config(*, env: Mapping[str, str] | None = None) -> GuardConfig:
    """The embedded default configuration, validated, with env overrides applied."""
    base = Path(str(resources.files("guard").joinpath("defaults")))
    return parse_config(default_config_text(), source="<embedded default>", base_dir=base,
                        env=env)
