"""The ``guard`` command line: serve, describe, config check, and the SAE tools."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import grpc
import structlog

from guard import __version__
from guard.config import (
    DEFAULT_LISTEN,
    ENV_OVERRIDES,
    GuardConfig,
    load_config,
    load_default_config,
)
from guard.errors import GuardError, bounded_repr

if TYPE_CHECKING:
    from guard.engine.core import Engine
    from guard.sidecar.reload import ConfigReloader
    from guard.sidecar.server import GuardServer
    from guard.sidecar.watchdog import Watchdog
    from guard.telemetry.setup import Telemetry

log = structlog.get_logger(__name__)


def _load(path: str | None, env: dict[str, str] | None = None) -> GuardConfig:
    return load_config(path, env=env) if path else load_default_config(env=env)


def override_flag(variable: str) -> str:
    """The ``guard serve`` flag of an ENV_OVERRIDES variable: GUARD_TCP_LISTEN: --tcp-listen."""
    return "--" + variable.removeprefix("GUARD_").lower().replace("_", "-")


def serve_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment the configuration is read with: the process's, with each override flag
    given in place of its variable (a flag wins over the variable, which wins over the file)."""
    flags = {variable: getattr(args, variable) for variable in ENV_OVERRIDES}
    return {**os.environ, **{k: v for k, v in flags.items() if v is not None}}


def cmd_serve(args: argparse.Namespace) -> int:
    from guard.engine.core import Engine
    from guard.sidecar.reload import ConfigReloader
    from guard.sidecar.server import GuardServer
    from guard.telemetry.setup import configure_logging, start_telemetry

    env = serve_environment(args)
    try:
        config = _load(args.config, env)
    except Exception as exc:  # a start-up error is a message, not a traceback
        message = str(exc) if isinstance(exc, GuardError) else bounded_repr(exc)
        print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
        return 1
    configure_logging(config.logging)
    stop = threading.Event()
    reload_requested = threading.Event()
    signals_seen: list[int] = []

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:  # a second signal: stop now, no drain
            log.warning("second signal, stopping without drain", signal=signum)
            raise SystemExit(1)
        stop.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        reload_requested.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)

    try:
        telemetry = start_telemetry(config.telemetry)
    except GuardError as exc:
        log.error("cannot start", reason=str(exc))
        return 1
    try:
        server = GuardServer(config)  # starts every gRPC worker thread: may hit a pids limit
        server.start()
    except GuardError as exc:
        log.error("cannot start", reason=str(exc))
        telemetry.shutdown()
        return 1
    try:
        engine = Engine.load(config, instruments=telemetry.instruments)
    except GuardError as exc:
        log.error("cannot start", reason=str(exc))
        server.stop(0)
        telemetry.shutdown()
        return 1
    reloader = None
    if args.config:
        reloader = ConfigReloader(engine, Path(args.config), config, env=env)
        reloader.start(config.plugins.watch_interval_seconds)
    died: list[tuple[str, str]] = []

    def on_failure(part: str, reason: str) -> None:
        died.append((part, reason))
        stop.set()

    watchdog = _watchdog(server, reloader, config, on_failure)
    _log_thread_budget(server, engine)
    if not stop.is_set():
        server.set_ready(engine)
    while not stop.wait(0.2):  # short waits so signal handlers run promptly
        if reload_requested.is_set():
            reload_requested.clear()
            if reloader is not None:
                reloader.reload("SIGHUP")
            else:
                log.warning("SIGHUP ignored: the embedded default config cannot change")
    if died:
        _die(server, telemetry, *died[0])
    watchdog.stop()
    log.info("signal received", signal=signal.Signals(signals_seen[0]).name)
    if reloader is not None:
        reloader.stop()
    server.stop()
    telemetry.shutdown()  # after the drain: the last batches' spans are exported too
    return 0


#: The exit status of a guard that stopped because a part of it died (EX_SOFTWARE).
DIED_EXIT_CODE = 70


def _watchdog(server: GuardServer, reloader: ConfigReloader | None, config: GuardConfig,
              on_failure: Callable[[str, str], None]) -> Watchdog:
    """A started watchdog over the parts of this ``guard serve``: the gRPC loops, the
    doorbell's acceptor, the config watch, and the main listener's health probe."""
    from guard.sidecar.watchdog import HealthProbe, Watchdog

    probe = None
    timeout = config.server.liveness_timeout_seconds
    main_address = server.addresses[0] if server.addresses else ""
    if timeout > 0 and (main_address.startswith("unix://") or not config.server.tls.enabled):
        probe = HealthProbe(main_address)
    elif timeout > 0:
        log.info("no liveness probe: the main listener needs TLS client credentials; the "
                 "watchdog still watches the guard's threads")
    watchdog = Watchdog(on_failure, probe=probe, liveness_timeout=timeout)
    for part, threads in server.serving_threads.items():
        for thread in threads:
            watchdog.watch_thread(part, thread)
    for part, thread in server.critical_threads().items():
        watchdog.watch_thread(part, thread)
    if reloader is not None and reloader.thread is not None:
        watchdog.watch_thread("config watch", reloader.thread)
    watchdog.start()
    return watchdog


def _log_thread_budget(server: GuardServer, engine: Engine) -> None:
    """One log line with the tasks the guard runs and the most it may start, for sizing a
    pod's pids limit (docs/operations.md, "Threads")."""
    from guard.sidecar.threads import ThreadBudget, tasks_now

    budget = ThreadBudget(
        now=tasks_now(),
        doorbell_streams=server.config.server.max_concurrent_rpcs if server.doorbell else 0,
        plugin_threads=engine.plugin_threads_max)
    log.info("thread budget", tasks_now=budget.now, on_demand=budget.on_demand,
             most=budget.most, doorbell_streams=budget.doorbell_streams,
             plugin_threads=budget.plugin_threads)


def _die(server: GuardServer, telemetry: Telemetry, part: str, reason: str) -> NoReturn:
    """A part of the guard died: NOT_SERVING everywhere, one log line saying what and why,
    every accepted record to its sink (as on SIGTERM), then exit with DIED_EXIT_CODE without
    waiting for gRPC's own shutdown (its loop may be the part that died)."""
    server.fail()
    log.critical("a part of the guard died; exiting so that it is restarted", part=part,
                 reason=reason, exit_code=DIED_EXIT_CODE)
    try:
        server.close_engine()
        telemetry.shutdown()
    finally:
        server.remove_sockets()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(DIED_EXIT_CODE)


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    saes = ", ".join(str(s.path) for s in config.saes) or "none"
    print(f"{config.source}: OK (listen {config.server.listen}; SAEs: {saes})")
    if args.load:
        from guard.engine.core import Engine

        engine = Engine.load(config)
        try:
            for name, runtime in sorted(engine.hooks.items()):
                info = runtime.info
                print(f"  {name}: {info.architecture} d_in={info.d_in} d_sae={info.d_sae} "
                      f"sha256={info.sha256[:12]} provider={runtime.execution_provider}")
            plugins = ", ".join(f"{n} {v}" for n, v in engine.plugins.items()) or "none"
            print(f"  plugins: {plugins}")
        finally:
            engine.close()
    return 0



def cmd_describe(args: argparse.Namespace) -> int:
    from guard.v1 import guard_pb2 as pb
    from guard.v1 import guard_pb2_grpc as pb_grpc

    try:
        channel = _describe_channel(args)
    except ValueError as exc:  # the option and what was wrong with it
        print(f"guard describe: --{str(exc).replace('root_ca', 'ca')}", file=sys.stderr)
        return 2
    with channel:
        stub = pb_grpc.GuardStub(channel)
        try:
            reply = stub.Describe(pb.DescribeRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"guard describe: {args.target}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    if args.json:
        from google.protobuf import json_format

        print(json.dumps(json_format.MessageToDict(reply), indent=2))
        return 0
    print(format_description(reply, args.target))
    return 0


def _describe_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS when --tls, --ca, --cert or --key is given (mutual TLS with both
    --cert and --key)."""
    if not (args.tls or args.ca or args.cert or args.key):
        return grpc.insecure_channel(args.target)
    from guard.host import tls_credentials

    return grpc.secure_channel(args.target, tls_credentials(args.ca, args.cert, args.key))


def format_description(reply: object, target: str) -> str:
    """A readable rendering of a DescribeResponse."""
    from guard.v1 import guard_pb2 as pb

    assert isinstance(reply, pb.DescribeResponse)
    lines = [
        f"Activation Guard {reply.guard_version} at {target} (protocol {reply.protocol_version})",
        f"max message: {reply.max_message_bytes / 2**20:.1f} MiB "
        f"(server.max_message_bytes); datatypes: {', '.join(reply.datatypes)}",
    ]
    subs = {s.hook: s for s in reply.subscriptions}
    if not reply.saes:
        lines.append("hooks: none (no SAE configured)")
    else:
        lines.append("hooks:")
    for sae in reply.saes:
        lines.append(f"  {sae.hook}")
        lines.append(f"    SAE         {sae.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}, "
                     f"{sae.weight_dtype}, from {sae.source}")
        if sae.d_out:
            lines.append(f"    transcoder  writes {sae.hook_out} (d_out {sae.d_out}); steering "
                         "through it is refused")
        lines.append(f"    provider    {sae.execution_provider}")
        lines.append(f"    sha256      {sae.sha256}")
        if sae.neuronpedia_id:
            lines.append(f"    neuronpedia {sae.neuronpedia_id} "
                         f"(https://www.neuronpedia.org/{sae.neuronpedia_id}/FEATURE)")
        lines.append(f"    labels      {sae.label_count} of {sae.d_sae} features")
        sub = subs.get(sae.hook)
        if sub is None or (not sub.all_features and not sub.feature_ids):
            features = "none subscribed (no encode)"
        elif sub.all_features:
            features = f"all {sae.d_sae}"
        else:
            ids = list(sub.feature_ids)
            shown = ", ".join(str(i) for i in ids[:16]) + (" ..." if len(ids) > 16 else "")
            features = f"{len(ids)}: {shown}"
        lines.append(f"    features    {features}")
    plugins = ", ".join(f"{p.name} {p.version}" for p in reply.plugins) or "none"
    lines.append(f"plugins: {plugins}")
    if reply.shared_memory_dirs:
        lines.append(f"shared memory: regions in {', '.join(reply.shared_memory_dirs)}; "
                     f"doorbell {reply.shared_memory_doorbell or 'off'}")
    else:
        lines.append("shared memory: off (server.shared_memory.enabled)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guard",
        description="Activation Guard: an SAE-based runtime guard sidecar for LLM inference.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="run the sidecar",
        description="Run the gRPC sidecar until SIGTERM or SIGINT, then drain and exit.",
    )
    serve.add_argument("--config", metavar="FILE",
                       help="YAML configuration (default: the embedded default)")
    overrides = serve.add_argument_group(
        "overrides", "Each sets one key of the configuration, over the file and over the "
        "key's environment variable.")
    for variable, (section, key) in ENV_OVERRIDES.items():
        metavar = "ADDRESS" if key.endswith("listen") else key.rpartition("_")[2].upper()
        overrides.add_argument(override_flag(variable), dest=variable, metavar=metavar,
                               help=f"{section}.{key} (environment: {variable})")
    serve.set_defaults(func=cmd_serve)

    describe = commands.add_parser(
        "describe", help="ask a running guard what it serves",
        description="Call Describe on a running guard and print the reply.",
    )
    describe.add_argument("--target", default=DEFAULT_LISTEN,
                          help="address: unix:///path.sock or host:port "
                          f"(default {DEFAULT_LISTEN})")
    describe.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    describe.add_argument("--json", action="store_true", help="print the reply as JSON")
    describe.add_argument("--tls", action="store_true",
                          help="use TLS (implied by --ca, --cert and --key); without --ca the "
                          "system's root CAs verify the guard")
    describe.add_argument("--ca", metavar="FILE",
                          help="PEM CA that signed the guard's certificate (server.tls)")
    describe.add_argument("--cert", metavar="FILE",
                          help="PEM client certificate, for mutual TLS (server.tls."
                          "client_ca_file); with --key")
    describe.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    describe.set_defaults(func=cmd_describe)

    config = commands.add_parser("config", help="configuration tools",
                                 description="Configuration tools.")
    config_commands = config.add_subparsers(dest="config_command", metavar="COMMAND",
                                            required=True)
    check = config_commands.add_parser(
        "check", help="validate a configuration file without starting",
        description="Validate a configuration file; exit 0 when valid, 2 when not.",
    )
    check.add_argument("file", nargs="?", metavar="FILE",
                       help="YAML configuration (default: the embedded default)")
    check.add_argument("--load", action="store_true",
                       help="also load every SAE (checks files, shapes and sha256 pins)")
    check.set_defaults(func=cmd_config_check)

    from guard.audit.cli import register as register_audit
    from guard.demo.runner import register as register_demo
    from guard.sae.cli import register as register_sae
    from guard.training.cli import register as register_training

    register_training(register_sae(commands))
    register_audit(commands)
    register_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except GuardError as exc:
        print(f"guard {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
