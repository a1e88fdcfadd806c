"""Security at the guard's edges: TLS and mutual TLS on the TCP listener (certificates made
here with the openssl binary), the Unix socket's permissions, and the SAE sha256 pin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from guard.cli import main
from guard.config import GuardConfig, ServerConfig, TlsConfig, parse_config
from guard.engine.core import Engine
from guard.errors import ConfigError, ListenError
from guard.host import AsyncGuardClient, GuardClient, tls_credentials
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.conftest import D_IN, D_SAE, HOOK, StreamClient, make_batch, make_config
from tests.sae_fixtures import write_saelens
from tests.sidecar import refused_start

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
pytestmark = pytest.mark.skipif(not Path(OPENSSL).exists(), reason="no openssl binary")


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, the guard's certificate (localhost, 127.0.0.1), a client certificate from the
    same CA, and a rogue client certificate from another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str
               ) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Every certificate and key of :class:`Pki`, written into ``folder``."""
    ca = _make_ca(folder, "guard-test-ca")
    server = _make_leaf(folder, "localhost", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                        "extendedKeyUsage=serverAuth\n")
    client = _make_leaf(folder, "host-1", ca, "extendedKeyUsage=clientAuth\n")
    rogue_ca = _make_ca(folder, "rogue-ca")
    rogue = _make_leaf(folder, "rogue-host", rogue_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue_ca[0], rogue[0],
               rogue[1])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_config(tmp_path: Path, sae_dir: Path, pki: Pki, *, mutual: bool) -> GuardConfig:
    config = make_config(tmp_path, sae_dir, tcp_listen="127.0.0.1:0")
    tls = TlsConfig(cert_file=pki.server_cert, key_file=pki.server_key,
                    client_ca_file=pki.ca if mutual else None)
    return replace(config, server=replace(config.server, tls=tls))


def _start(config: GuardConfig) -> GuardServer:
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    return server


@pytest.fixture
def tls_server(tmp_path: Path, sae_dir: Path, pki: Pki) -> Iterator[GuardServer]:
    server = _start(_tls_config(tmp_path, sae_dir, pki, mutual=False))
    yield server
    server.stop(0)


@pytest.fixture
def mtls_server(tmp_path: Path, sae_dir: Path, pki: Pki) -> Iterator[GuardServer]:
    server = _start(_tls_config(tmp_path, sae_dir, pki, mutual=True))
    yield server
    server.stop(0)


def _tcp(server: GuardServer) -> str:
    (address,) = [a for a in server.addresses if not a.startswith("unix:")]
    return address


def _describe(channel: grpc.Channel) -> pb.DescribeResponse:
    return pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest(), timeout=10)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        _describe(channel)
    code: grpc.StatusCode = failed.value.code()
    return code


# -- TLS ------------------------------------------------------------------------------------


def test_the_tls_listener_serves_inspect_describe_health_and_reflection(
    tls_server: GuardServer, pki: Pki
) -> None:
    credentials = tls_credentials(pki.ca)
    with grpc.secure_channel(_tcp(tls_server), credentials) as channel:
        assert list(_describe(channel).hooks) == [HOOK]
        client = StreamClient(channel)
        client.configure()
        reply = client.ask(make_batch(sequence=1))
        assert not reply.HasField("error"), reply.error.message
        assert reply.action == pb.ACTION_CONTINUE
        assert client.rest() == []
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"guard.v1.Guard", "grpc.health.v1.Health"} <= services


def test_the_unix_socket_stays_plaintext_next_to_a_tls_listener(tls_server: GuardServer
                                                                 ) -> None:
    with grpc.insecure_channel(tls_server.addresses[0]) as channel:
        assert list(_describe(channel).hooks) == [HOOK]


def test_a_plaintext_client_is_refused_by_the_tls_listener(tls_server: GuardServer) -> None:
    with grpc.insecure_channel(_tcp(tls_server)) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_guards_ca_is_refused(
    tls_server: GuardServer, pki: Pki
) -> None:
    with grpc.secure_channel(_tcp(tls_server), tls_credentials(pki.rogue_ca)) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS -----------------------------------------------------------------------------


def test_mutual_tls_accepts_a_client_certificate_from_the_ca(
    mtls_server: GuardServer, pki: Pki
) -> None:
    credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with grpc.secure_channel(_tcp(mtls_server), credentials) as channel:
        assert list(_describe(channel).hooks) == [HOOK]


@pytest.mark.parametrize("client", ["no certificate", "rogue certificate", "plaintext"])
def test_mutual_tls_refuses_clients_without_a_good_certificate(
    mtls_server: GuardServer, pki: Pki, client: str
) -> None:
    if client == "plaintext":
        channel = grpc.insecure_channel(_tcp(mtls_server))
    elif client == "no certificate":
        channel = grpc.secure_channel(_tcp(mtls_server), tls_credentials(pki.ca))
    else:
        channel = grpc.secure_channel(
            _tcp(mtls_server), tls_credentials(pki.ca, pki.rogue_cert, pki.rogue_key))
    with channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_the_host_clients_speak_mutual_tls(mtls_server: GuardServer, pki: Pki) -> None:
    credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    rows = np.ones((2, D_IN), dtype=np.float32)
    with GuardClient(_tcp(mtls_server), hooks=[HOOK], deadline_ms=10_000,
                     credentials=credentials) as client:
        verdict = client.inspect("req-tls", HOOK, rows, [0, 1])
        assert (verdict.source, verdict.request_id) == ("guard", "req-tls")
        assert list(client.describe().hooks) == [HOOK]

    async def run() -> str:
        async with AsyncGuardClient(_tcp(mtls_server), hooks=[HOOK], deadline_ms=10_000,
                                    credentials=credentials) as aclient:
            return (await aclient.inspect("req-aio", HOOK, rows, [0, 1])).source

    assert asyncio.run(run()) == "guard"


def test_a_host_client_without_its_certificate_gets_the_failure_policy(
    mtls_server: GuardServer, pki: Pki
) -> None:
    rows = np.ones((1, D_IN), dtype=np.float32)
    with GuardClient(_tcp(mtls_server), hooks=[HOOK], deadline_ms=10_000,
                     failure_policy="closed", credentials=tls_credentials(pki.ca)) as client:
        verdict = client.inspect("req-1", HOOK, rows, [0])
    assert verdict.source == "fail_closed"
    assert verdict.decision_id == ""


def test_client_credentials_are_checked(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^key: expected the private key of cert"):
        tls_credentials(pki.ca, cert=pki.client_cert)
    with pytest.raises(ValueError, match=r"^cert: expected the client certificate of key"):
        tls_credentials(pki.ca, key=pki.client_key)
    with pytest.raises(ValueError, match=r"^root_ca: expected a readable PEM file"):
        tls_credentials(tmp_path / "missing.crt")
    with pytest.raises(ValueError, match=r"^credentials: the guard serves TLS on TCP only"):
        GuardClient(f"unix://{tmp_path}/g.sock", credentials=tls_credentials(pki.ca))
    with pytest.raises(TypeError, match=r"^credentials: expected grpc.ChannelCredentials"):
        GuardClient("127.0.0.1:1", credentials="tls")  # type: ignore[arg-type]


def test_guard_describe_talks_to_a_mutual_tls_listener(
    mtls_server: GuardServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _tcp(mtls_server)
    code = main(["describe", "--target", target, "--ca", str(pki.ca), "--cert",
                 str(pki.client_cert), "--key", str(pki.client_key)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert HOOK in out and f"at {target}" in out
    assert main(["describe", "--target", target, "--ca", str(pki.ca), "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["describe", "--target", target, "--cert", str(pki.client_cert)]) == 2
    assert "--key: expected the private key of cert" in capsys.readouterr().err


# -- configuration errors name the key --------------------------------------------------------


def _tls_yaml(**files: object) -> str:
    entries = ", ".join(f"{k}: {v!s}" for k, v in files.items())
    return f"server: {{tcp_listen: '127.0.0.1:0', tls: {{{entries}}}}}"


def test_tls_configuration_is_read_and_relative_paths_follow_the_file(
    pki: Pki, tmp_path: Path
) -> None:
    config = parse_config(_tls_yaml(cert_file=pki.server_cert.name,
                                    key_file=pki.server_key.name,
                                    client_ca_file=pki.ca.name),
                          base_dir=pki.ca.parent, env={})
    tls = config.server.tls
    assert (tls.cert_file, tls.key_file, tls.client_ca_file) == (
        pki.server_cert, pki.server_key, pki.ca)
    assert tls.enabled and tls.mutual
    assert not parse_config("", env={}).server.tls.enabled


@pytest.mark.parametrize(("files", "key", "expected"), [
    ({"cert_file": "CERT"}, "server.tls.key_file", "the PEM private key of server.tls.cert_file"),
    ({"key_file": "KEY"}, "server.tls.cert_file", "server.tls.key_file is set"),
    ({"client_ca_file": "CA"}, "server.tls.cert_file", "server.tls.client_ca_file is set"),
    ({"cert_file": "MISSING", "key_file": "KEY"}, "server.tls.cert_file",
     "a readable PEM certificate file"),
    ({"cert_file": "CERT", "key_file": "MISSING"}, "server.tls.key_file",
     "a readable PEM private key file"),
    ({"cert_file": "KEY", "key_file": "KEY"}, "server.tls.cert_file",
     "a PEM certificate file (with a '-----BEGIN ...' line)"),
    ({"cert_file": "CERT", "key_file": "ROGUE_KEY"}, "server.tls.key_file",
     "the private key of the certificate in"),
    ({"cert_file": "CERT", "key_file": "KEY", "client_ca_file": "MISSING"},
     "server.tls.client_ca_file", "a readable PEM CA certificate file"),
    ({"cert_file": "CERT", "key_file": "KEY", "client_ca_file": "KEY"},
     "server.tls.client_ca_file", "a PEM CA certificate file"),
    ({"cert_file": "CERT", "key_file": "KEY", "colour": "blue"}, "server.tls.colour",
     "one of the keys cert_file, client_ca_file, key_file"),
])
def test_bad_tls_configuration_names_the_key(
    pki: Pki, tmp_path: Path, files: dict[str, str], key: str, expected: str
) -> None:
    paths = {"CERT": pki.server_cert, "KEY": pki.server_key, "CA": pki.ca,
             "ROGUE_KEY": pki.rogue_key, "MISSING": tmp_path / "missing.pem", "blue": "blue"}
    with pytest.raises(ConfigError) as failed:
        parse_config(_tls_yaml(**{k: paths[v] for k, v in files.items()}), env={})
    assert failed.value.key == key
    assert expected in str(failed.value)
    if "MISSING" in files.values():
        assert "missing.pem (No such file or directory)" in str(failed.value)


def test_tls_without_a_tcp_listener_is_a_configuration_error(pki: Pki) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_config(f"server: {{tls: {{cert_file: {pki.server_cert}, "
                     f"key_file: {pki.server_key}}}}}", env={})
    assert failed.value.key == "server.tcp_listen"
    assert "the Unix socket never uses TLS" in str(failed.value)
    config = parse_config(f"server: {{listen: '127.0.0.1:0', tls: {{cert_file: "
                          f"{pki.server_cert}, key_file: {pki.server_key}}}}}", env={})
    assert config.server.tls.enabled  # a TCP main listener is secured too


def test_guard_config_check_reports_the_tls_key(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "guard.yaml"
    file.write_text(_tls_yaml(cert_file=pki.server_cert))
    assert main(["config", "check", str(file)]) == 2
    assert "server.tls.key_file: expected the PEM private key" in capsys.readouterr().err


# -- plaintext TCP --------------------------------------------------------------------------


def test_plaintext_tcp_off_loopback_is_allowed_with_a_warning(tmp_path: Path, sae_dir: Path
                                                              ) -> None:
    config = make_config(tmp_path, sae_dir, tcp_listen="0.0.0.0:0")
    server = GuardServer(config)
    with structlog.testing.capture_logs() as logs:
        server.start()
    try:
        (warning,) = [e for e in logs if e["log_level"] == "warning"]
        assert "without TLS" in warning["event"] and warning["address"] == "0.0.0.0:0"
    finally:
        server.stop(0)
    loopback = GuardServer(make_config(tmp_path, sae_dir, tcp_listen="127.0.0.1:0"))
    with structlog.testing.capture_logs() as logs:
        loopback.start()
    loopback.stop(0)
    assert [e for e in logs if e["log_level"] == "warning"] == []


# -- the Unix socket's permissions -----------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_unix_socket_is_0660_and_its_new_folder_0750(tmp_path: Path, sae_dir: Path
                                                         ) -> None:
    socket = tmp_path / "run" / "guard" / "guard.sock"
    umask = os.umask(0o002)  # a lax umask: the socket's mode must not depend on it
    try:
        server = _start(make_config(tmp_path, sae_dir, listen=f"unix://{socket}"))
        assert os.umask(0o002) == 0o002  # the bind's umask was put back
    finally:
        os.umask(umask)
    try:
        assert stat.S_ISSOCK(socket.stat().st_mode)
        assert _mode(socket) == 0o660
        assert _mode(socket.parent) == 0o750
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            assert list(_describe(channel).hooks) == [HOOK]
    finally:
        server.stop(0)
    assert not socket.exists()


def test_socket_mode_and_group_are_configurable(tmp_path: Path, sae_dir: Path) -> None:
    config = parse_config(f"server: {{listen: 'unix://{tmp_path}/g.sock', socket_mode: '0600', "
                          f"socket_group: {os.getgid()}}}", env={})
    assert (config.server.socket_mode, config.server.socket_group) == (0o600, str(os.getgid()))
    server = GuardServer(config)
    server.start()
    try:
        assert _mode(tmp_path / "g.sock") == 0o600
    finally:
        server.stop(0)
    from_env = parse_config("", env={"GUARD_SOCKET_MODE": "0o640"})
    assert from_env.server.socket_mode == 0o640


@pytest.mark.parametrize("value", ["0660", 660, "0888", "rw-rw----", "01777"])
def test_socket_mode_must_be_a_quoted_octal_string(value: object) -> None:
    text = f"'{value}'" if isinstance(value, str) else str(value)
    if value == "0660":
        assert parse_config(f"server: {{socket_mode: {text}}}", env={}).server.socket_mode == (
            0o660)
        return
    with pytest.raises(ConfigError) as failed:
        parse_config(f"server: {{socket_mode: {text}}}", env={})
    assert failed.value.key == "server.socket_mode"
    assert "a quoted octal permission string such as '0660'" in str(failed.value)


def test_an_unknown_socket_group_stops_the_start(tmp_path: Path, sae_dir: Path) -> None:
    config = make_config(tmp_path, sae_dir, socket_group="no-such-group-xyz")
    server = GuardServer(config)
    with pytest.raises(ListenError, match=r"server\.socket_group: no group named"):
        server.start()
    server.stop(0)


def test_a_world_writable_socket_folder_is_reported(tmp_path: Path, sae_dir: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    server = GuardServer(make_config(tmp_path, sae_dir, listen=f"unix://{folder}/g.sock"))
    with structlog.testing.capture_logs() as logs:
        server.start()
    server.stop(0)
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert "writable by every user" in warning["event"]
    assert warning["folder"] == str(folder)


def test_server_config_defaults_are_restrictive() -> None:
    defaults = ServerConfig()
    assert defaults.socket_mode == 0o660 and defaults.socket_group == ""
    assert not defaults.tls.enabled


# -- SAE sha256 pins ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_mismatching_sha256_pin_refuses_to_start(tmp_path: Path, sae_dir: Path) -> None:
    weights = sae_dir / "sae_weights.safetensors"
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    pinned = "0" * 64
    log = refused_start(tmp_path, {"path": str(sae_dir), "sha256": pinned})
    assert str(weights) in log
    assert f"sha256 expected {pinned} (pinned), found {actual}" in log
    events = [json.loads(line)["event"] for line in log.splitlines() if line.startswith("{")]
    assert "cannot start" in events and "serving" not in events


@pytest.mark.slow
def test_a_tampered_pinned_artifact_refuses_to_start(tmp_path: Path, sae_dir: Path) -> None:
    """An artifact's pin is the sha256 of its manifest.json, which records every file's hash:
    another SAE's files with the manifest's hashes rewritten to match no longer match it."""
    other = write_saelens(tmp_path / "other", D_IN, D_SAE, hook_name=HOOK, seed=7)
    for source, out in ((sae_dir, "art"), (other, "other_art")):
        assert main(["sae", "export", str(source), str(tmp_path / out), "--dtype", "fp32"]) == 0
    art, manifest_file = tmp_path / "art", tmp_path / "art" / "manifest.json"
    pinned = hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    manifest = json.loads(manifest_file.read_text())
    for name in ("weights.safetensors", "encoder.onnx"):
        shutil.copyfile(tmp_path / "other_art" / name, art / name)
        manifest["files"][name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    actual = hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    log = refused_start(tmp_path, {"path": str(art), "sha256": pinned})
    assert str(manifest_file) in log
    assert f"sha256 expected {pinned} (pinned), found {actual}" in log
