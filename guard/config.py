"""The guard's configuration: one YAML file, validated at load.

The same file is mounted by the Helm chart. Every error names the key path, what was
expected and what was found (``saes[1].sha256: expected 64 hex characters, found 'abc'``).
A few deployment knobs can be overridden by environment variables (see ``ENV_OVERRIDES``).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import yaml

from guard.errors import ConfigError

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
SaeDtype = Literal["auto", "fp32", "fp16", "int8"]

#: Default fits a [512, 8192] F32 batch (16 MiB of tensor bytes) with room for labels.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
DEFAULT_LISTEN: Final = "unix:///tmp/activation-guard/guard.sock"

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

_HOOK_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
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
    #: Largest accepted message; a larger batch gets RESOURCE_EXHAUSTED naming this key.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: On SIGTERM, in-flight streams get this long to finish before they are cancelled.
    drain_grace_seconds: float = 10.0
    #: Concurrent RPCs (streams and unary calls); more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 64
    #: Serve gRPC server reflection (``grpcurl list``).
    reflection: bool = True
    #: Permissions of the Unix socket file (in YAML an octal string such as ``'0660'``).
    socket_mode: int = DEFAULT_SOCKET_MODE
    #: Group given the Unix socket (a name or a number); empty: the guard's own group.
    socket_group: str = ""
    #: TLS (and mutual TLS) on the TCP listeners; off unless ``cert_file`` is set.
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: The in-pod shared-memory transport (opt-in); see :mod:`guard.sidecar.regions`.
    shared_memory: SharedMemoryConfig = field(default_factory=SharedMemoryConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """structlog output: JSON lines when not on a TTY (``auto``), readable on a TTY."""

    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class SaeConfig:
    """One SAE served on one hook."""

    #: SAELens folder, sparsify layer folder, Gemma Scope params.npz or exported artifact.
    path: Path
    #: Hook name; defaults to the one stored with the SAE.
    hook: str | None = None
    #: sha256 pin of what is served (the weights file of a SAELens, sparsify or Gemma Scope
    #: SAE; the manifest.json of an exported artifact); a mismatch refuses to start.
    sha256: str | None = None
    #: Weight dtype of the encoder graph.
    dtype: SaeDtype = "auto"
    #: Features computed for every batch until plugins subscribe (``all`` or a list of ids).
    features: tuple[int, ...] | Literal["all"] = ()


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
    #: Decisions waiting for sinks; when full, new records are dropped and counted.
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


T = TypeVar("T")


class _Section:
    """A mapping read with type checks; errors carry the full key path."""

    def __init__(self, data: object, path: str, source: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path or "<top level>", "a mapping", data, source=source)
        self.data: Mapping[str, Any] = data
        self.path = path
        self.source = source
        self.read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, check: Callable[[str, object], T], default: T) -> T:
        self.read.add(name)
        if name not in self.data:
            return default
        return check(self.key(name), self.data[name])

    def finish(self) -> None:
        """Reject keys nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(str(k) for k in self.data if k not in self.read)
        if unknown:
            raise ConfigError(
                self.key(unknown[0]),
                f"one of the keys {', '.join(sorted(self.read))}",
                f"unknown key {unknown[0]!r}",
                source=self.source,
            )
        return None


def _load_config_from_mapping(data: object, source: str, base_dir: Path | None) -> GuardConfig:
    def fail(key: str, expected: str, found: object) -> ConfigError:
        return ConfigError(key, expected, found, source=source)

    def string(key: str, value: object) -> str:
        if not isinstance(value, str):
            raise fail(key, "a string", value)
        return value

    def optional_string(key: str, value: object) -> str | None:
        return None if value is None else string(key, value)

    def positive_int(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(key, "a positive integer", value)
        return value

    def nonneg_number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise fail(key, "a number >= 0", value)
        return float(value)

    def boolean(key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise fail(key, "true or false", value)
        return value

    def choice(*options: str) -> Callable[[str, object], Any]:
        def check(key: str, value: object) -> str:
            if not isinstance(value, str) or value.lower() not in options:
                raise fail(key, f"one of {', '.join(options)}", value)
            return value.lower()

        return check

    def address(key: str, value: object) -> str:
        text = string(key, value).strip()
        if text and not (text.startswith("unix:") or re.match(r"^[\w.\-\[\]:]*:\d+$", text)):
            raise fail(key, "unix:///path/to.sock or host:port", value)
        return text

    top = _Section(data, "", source)
    server_section = _Section(top.get("server", lambda k, v: v, None), "server", source)
    defaults = ServerConfig()
    server = ServerConfig(
        listen=server_section.get("listen", address, defaults.listen),
        tcp_listen=server_section.get("tcp_listen", address, defaults.tcp_listen),
        health_listen=server_section.get("health_listen", address, defaults.health_listen),
        max_message_bytes=server_section.get(
            "max_message_bytes", positive_int, defaults.max_message_bytes
        ),
        drain_grace_seconds=server_section.get(
            "drain_grace_seconds", nonneg_number, defaults.drain_grace_seconds
        ),
        max_concurrent_rpcs=server_section.get(
            "max_concurrent_rpcs", positive_int, defaults.max_concurrent_rpcs
        ),
        reflection=server_section.get("reflection", boolean, defaults.reflection),
        socket_mode=server_section.get("socket_mode", _socket_mode(source),
                                       defaults.socket_mode),
        socket_group=server_section.get("socket_group", _socket_group(source),
                                        defaults.socket_group),
        tls=_tls_section(server_section.get("tls", lambda k, v: v, None), source, base_dir),
        shared_memory=_shared_memory_section(
            server_section.get("shared_memory", lambda k, v: v, None), source),
    )
    server_section.finish()
    if not server.listen:
        raise fail("server.listen", "an address (unix:///path or host:port)", server.listen)
    if server.tls.enabled and server.listen.startswith("unix:") and not server.tcp_listen:
        raise fail("server.tcp_listen", "a TCP listener (host:port) for server.tls to secure "
                   "(the Unix socket never uses TLS)", server.tcp_listen)

    log_section = _Section(top.get("logging", lambda k, v: v, None), "logging", source)
    logging_config = LoggingConfig(
        level=log_section.get("level", choice("debug", "info", "warning", "error"), "info"),
        format=log_section.get("format", choice("auto", "json", "console"), "auto"),
    )
    log_section.finish()

    raw_saes = top.get("saes", lambda k, v: v, None)
    if raw_saes is None:
        raw_saes = []
    if not isinstance(raw_saes, list):
        raise fail("saes", "a list of SAE entries", raw_saes)
    saes: list[SaeConfig] = []
    for index, entry in enumerate(raw_saes):
        section = _Section(entry, f"saes[{index}]", source)

        def hook_name(key: str, value: object) -> str:
            text = string(key, value)
            if not _HOOK_NAME.match(text):
                raise fail(key, "a hook name such as blocks.12.hook_resid_post", value)
            return text

        def sha256(key: str, value: object) -> str:
            text = string(key, value).lower()
            if not _SHA256.match(text):
                raise fail(key, "64 hex characters (a sha256 digest)", value)
            return text

        def features(key: str, value: object) -> tuple[int, ...] | Literal["all"]:
            if value == "all":
                return "all"
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise fail(key, "'all' or a list of feature ids (integers >= 0)", value)
            return tuple(sorted(set(cast(list[int], value))))

        raw_path = section.get("path", optional_string, None)
        if not raw_path:
            raise fail(f"saes[{index}].path", "the path of an SAE", raw_path)
        path = Path(os.path.expanduser(raw_path))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        saes.append(
            SaeConfig(
                path=path,
                hook=section.get("hook", hook_name, None),
                sha256=section.get("sha256", sha256, None),
                dtype=section.get("dtype", choice("auto", "fp32", "fp16", "int8"), "auto"),
                features=section.get("features", features, ()),
            )
        )
        section.finish()
    plugins = _plugins_section(top.get("plugins", lambda k, v: v, None), source)

    def tcp_address(key: str, value: object) -> str:
        text = address(key, value)
        if text.startswith("unix:"):
            raise fail(key, "host:port (an HTTP endpoint for Prometheus)", value)
        return text

    telemetry_section = _Section(top.get("telemetry", lambda k, v: v, None), "telemetry", source)
    telemetry_defaults = TelemetryConfig()
    telemetry = TelemetryConfig(
        metrics_listen=telemetry_section.get("metrics_listen", tcp_address,
                                             telemetry_defaults.metrics_listen),
        tracing=telemetry_section.get("tracing", boolean, telemetry_defaults.tracing),
        record_sensitive=telemetry_section.get("record_sensitive", boolean,
                                               telemetry_defaults.record_sensitive),
    )
    telemetry_section.finish()
    top.finish()
    return GuardConfig(
        server=server, logging=logging_config, saes=tuple(saes), plugins=plugins,
        telemetry=telemetry, source=source,
    )


def _socket_mode(source: str) -> Callable[[str, object], int]:
    def check(key: str, value: object) -> int:
        # Only strings: YAML 1.1 reads an unquoted 0660 as octal but 660 as decimal.
        text = value.strip().lower() if isinstance(value, str) else ""
        if re.fullmatch(r"(0o?)?[0-7]{3}", text):
            return int(text.removeprefix("0o"), 8)
        raise ConfigError(key, "a quoted octal permission string such as '0660' (owner and "
                          "group) or '0600' (owner only)", value, source=source)

    return check


def _socket_group(source: str) -> Callable[[str, object], str]:
    def check(key: str, value: object) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)
        if isinstance(value, str) and re.fullmatch(r"([A-Za-z_][\w.\-]*\$?|\d+)?", value):
            return value
        raise ConfigError(key, "a group name or a numeric group id ('' for the guard's own "
                          "group)", value, source=source)

    return check


def _tls_section(data: object, source: str, base_dir: Path | None) -> TlsConfig:
    """``server.tls``: both halves of the key pair, every file readable PEM, and the key
    matching the certificate (checked with the ssl module, so a bad pair is reported here
    rather than by gRPC's bind)."""

    def fail(key: str, expected: str, found: object) -> ConfigError:
        return ConfigError(key, expected, found, source=source)

    def file_path(key: str, value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise fail(key, "the path of a PEM file", value)
        path = Path(os.path.expanduser(value.strip()))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path

    section = _Section(data, "server.tls", source)
    cert = section.get("cert_file", file_path, None)
    key = section.get("key_file", file_path, None)
    client_ca = section.get("client_ca_file", file_path, None)
    section.finish()
    if cert is None and key is None and client_ca is None:
        return TlsConfig()
    if cert is None:
        needed_by = "server.tls.key_file" if key is not None else "server.tls.client_ca_file"
        raise fail("server.tls.cert_file", f"the server's PEM certificate ({needed_by} is set; "
                   "TLS needs cert_file and key_file together)", None)
    if key is None:
        raise fail("server.tls.key_file", "the PEM private key of server.tls.cert_file (TLS "
                   "needs cert_file and key_file together)", None)

    def read(name: str, path: Path, marker: bytes, what: str) -> bytes:
        full = f"server.tls.{name}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise fail(full, f"a readable {what}", f"{path} ({exc.strerror})") from exc
        if marker not in data:
            raise fail(full, f"a {what} (with a '-----BEGIN ...' line)", str(path))
        return data

    read("cert_file", cert, b"-----BEGIN CERTIFICATE-----", "PEM certificate file")
    key_pem = read("key_file", key, b"PRIVATE KEY-----", "PEM private key file")
    if b"ENCRYPTED" in key_pem:
        raise fail("server.tls.key_file", "an unencrypted PEM private key (gRPC takes no "
                   "passphrase)", str(key))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        raise fail("server.tls.key_file", f"the private key of the certificate in {cert}",
                   f"{key} ({exc.reason or exc})") from exc
    if client_ca is not None:
        read("client_ca_file", client_ca, b"-----BEGIN CERTIFICATE-----",
             "PEM CA certificate file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise fail("server.tls.client_ca_file", "a PEM bundle of CA certificates",
                       f"{client_ca} ({exc.reason or exc})") from exc
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)


def _shared_memory_section(data: object, source: str) -> SharedMemoryConfig:
    """``server.shared_memory``: absolute folders, numeric uids, a positive region count."""

    def fail(key: str, expected: str, found: object) -> ConfigError:
        return ConfigError(key, expected, found, source=source)

    def boolean(key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise fail(key, "true or false", value)
        return value

    def folders(key: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise fail(key, "a non-empty list of absolute folder paths", value)
        for index, item in enumerate(value):
            if (not isinstance(item, str) or not os.path.isabs(item) or ".." in Path(item).parts
                    or os.path.normpath(item) == "/"):
                raise fail(f"{key}[{index}]", "an absolute folder path without '..', other "
                           "than / (a memory-backed folder such as /dev/shm)", item)
        return tuple(os.path.normpath(item) for item in value)

    def uids(key: str, value: object) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise fail(key, "a list of numeric user ids (integers >= 0)", value)
        return tuple(cast(list[int], value))

    def positive_int(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(key, "a positive integer", value)
        return value

    def socket_file(key: str, value: object) -> str:
        if value == "":  # the default: beside the listen socket
            return ""
        if (not isinstance(value, str) or not os.path.isabs(value)
                or ".." in Path(value).parts or value.endswith("/")):
            raise fail(key, "an absolute socket file path without '..' (or '' for beside "
                            "server.listen)", value)
        return os.path.normpath(value)

    section = _Section(data, "server.shared_memory", source)
    defaults = SharedMemoryConfig()
    config = SharedMemoryConfig(
        enabled=section.get("enabled", boolean, defaults.enabled),
        allowed_dirs=section.get("allowed_dirs", folders, defaults.allowed_dirs),
        allowed_uids=section.get("allowed_uids", uids, defaults.allowed_uids),
        max_regions_per_stream=section.get("max_regions_per_stream", positive_int,
                                           defaults.max_regions_per_stream),
        doorbell=section.get("doorbell", boolean, defaults.doorbell),
        doorbell_socket=section.get("doorbell_socket", socket_file, defaults.doorbell_socket),
    )
    section.finish()
    return config


def _plugins_section(data: object, source: str) -> PluginsConfig:
    def fail(key: str, expected: str, found: object) -> ConfigError:
        return ConfigError(key, expected, found, source=source)

    def boolean(key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise fail(key, "true or false", value)
        return value

    def names(key: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(key, "a list of plugin names", value)
        return tuple(value)

    def number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise fail(key, "a number >= 0", value)
        return float(value)

    def positive_int(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(key, "a positive integer", value)
        return value

    def failure_mode(key: str, value: object) -> FailureMode:
        if value == "open" or value == "closed":
            return value
        raise fail(key, "open or closed", value)

    def blocks(key: str, value: object) -> Mapping[str, Mapping[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail(key, "a mapping of plugin name to its settings", value)
        for name, block in value.items():
            if not isinstance(block, Mapping) and block is not None:
                raise fail(f"{key}.{name}", "a mapping of settings", block)
        return {str(n): (b if b is not None else {}) for n, b in value.items()}

    section = _Section(data, "plugins", source)
    defaults = PluginsConfig()
    plugins = PluginsConfig(
        autoload=section.get("autoload", boolean, defaults.autoload),
        enabled=section.get("enabled", names, defaults.enabled),
        disabled=section.get("disabled", names, defaults.disabled),
        trace=section.get("trace", boolean, defaults.trace),
        timeout_ms=section.get("timeout_ms", number, defaults.timeout_ms),
        failure_mode=section.get("failure_mode", failure_mode, defaults.failure_mode),
        record_queue_size=section.get("record_queue_size", positive_int,
                                      defaults.record_queue_size),
        watch_interval_seconds=section.get("watch_interval_seconds", number,
                                           defaults.watch_interval_seconds),
        config=section.get("config", blocks, {}),
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


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GuardConfig:
    """Parse and validate YAML text; ``env`` overrides apply (pass ``{}`` for none)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("<file>", f"valid YAML{where}", str(exc).splitlines()[0],
                          source=source) from exc
    if data is None:
        data = {}
    data = _apply_env(data, os.environ if env is None else env)
    return _load_config_from_mapping(data, source, base_dir)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
                ) -> GuardConfig:
    """Read and validate a configuration file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", "a readable configuration file", f"{exc.strerror}",
                          source=str(file)) from exc
    return parse_config(text, source=str(file), base_dir=file.parent.resolve(), env=env)


def default_config_text() -> str:
    """The embedded default configuration (what ``guard serve`` uses without --config)."""
    return resources.files("guard").joinpath("defaults/guard.yaml").read_text(encoding="utf-8")


def load_default_config(*, env: Mapping[str, str] | None = None) -> GuardConfig:
    """The embedded default configuration, validated, with env overrides applied."""
    base = Path(str(resources.files("guard").joinpath("defaults")))
    return parse_config(default_config_text(), source="<embedded default>", base_dir=base,
                        env=env)
