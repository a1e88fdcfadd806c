"""A bare echo servicer of `guard.v1.Guard`: the reference the transport benchmark compares with.

`Inspect` answers every batch with a minimal CONTINUE reply (request id and sequence echoed)
and decodes nothing; the configuration message gets no reply, as on the guard. Two flavours,
sync `grpc.server` on a thread pool and `grpc.aio`, with the server options the guard uses.

Standalone (prints one ``listening on ADDRESS`` line per bound address, stops on SIGTERM)::

    python -m bench.echo --flavour sync --listen unix:///tmp/echo.sock --listen 127.0.0.1:0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc
from grpc import aio

from guard.v1 import guard_pb2, guard_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

Flavour = Literal["sync", "aio"]
FLAVOURS: tuple[Flavour, ...] = ("sync", "aio")

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# The guard's server options: 32 MiB both ways, no compression (gzip was 26x slower here).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SYNC_WORKERS = 8
"""Each open sync stream holds one worker thread for its whole life."""

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _reply(request: guard_pb2.InspectRequest) -> guard_pb2.InspectResponse | None:
    if not request.HasField("batch"):
        return None
    return guard_pb2.InspectResponse(
        request_id=request.batch.request_id,
        sequence=request.batch.sequence,
        action=guard_pb2.ACTION_CONTINUE,
    )


class SyncEchoServicer(guard_pb2_grpc.GuardServicer):
    """Echo on the sync server: one worker thread per stream."""

    def Inspect(
        self,
        request_iterator: Iterator[guard_pb2.InspectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[guard_pb2.InspectResponse]:
        for request in request_iterator:
            reply = _reply(request)
            if reply is not None:
                yield reply

    def Describe(
        self, request: guard_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> guard_pb2.DescribeResponse:
        return guard_pb2.DescribeResponse(protocol_version="1", guard_version="echo")


class AsyncEchoServicer(guard_pb2_grpc.GuardServicer):
    """Echo on grpc.aio, written as an async generator (the idiomatic aio servicer)."""

    async def Inspect(
        self,
        request_iterator: AsyncIterator[guard_pb2.InspectRequest],
        context: aio.ServicerContext[guard_pb2.InspectRequest, guard_pb2.InspectResponse],
    ) -> AsyncIterator[guard_pb2.InspectResponse]:
        async for request in request_iterator:
            reply = _reply(request)
            if reply is not None:
                yield reply

    async def Describe(
        self,
        request: guard_pb2.DescribeRequest,
        context: aio.ServicerContext[guard_pb2.DescribeRequest, guard_pb2.DescribeResponse],
    ) -> guard_pb2.DescribeResponse:
        return guard_pb2.DescribeResponse(protocol_version="1", guard_version="echo")


def _bound(listen: str, port: int) -> str:
    """The address a client dials: the TCP port the server picked for ``:0``."""
    if listen.startswith("unix:") or not listen.endswith(":0"):
        return listen
    return f"{listen[:-2]}:{port}"


def start_sync(listen: Sequence[str]) -> tuple[grpc.Server, list[str]]:
    """Start the sync echo server on every address; returns it and the bound addresses."""
    server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_WORKERS), options=SERVER_OPTIONS)
    guard_pb2_grpc.add_GuardServicer_to_server(SyncEchoServicer(), server)
    bound = [_bound(address, server.add_insecure_port(address)) for address in listen]
    server.start()
    return server, bound


def stop_sync(server: grpc.Server, grace: float | None = None) -> None:
    server.stop(grace).wait()


async def start_aio(listen: Sequence[str]) -> tuple[aio.Server, list[str]]:
    """Start the grpc.aio echo server on every address; returns it and the bound addresses."""
    server = aio.server(options=SERVER_OPTIONS)
    guard_pb2_grpc.add_GuardServicer_to_server(AsyncEchoServicer(), server)
    bound = [_bound(address, server.add_insecure_port(address)) for address in listen]
    await server.start()
    return server, bound


async def stop_aio(server: aio.Server, grace: float | None = None) -> None:
    await server.stop(grace)


def _announce(bound: list[str]) -> None:
    for address in bound:
        print(f"listening on {address}", flush=True)


def _serve_sync(listen: Sequence[str]) -> None:
    server, bound = start_sync(listen)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop(None))
    _announce(bound)
    with contextlib.suppress(KeyboardInterrupt):
        server.wait_for_termination()
    stop_sync(server)


async def _serve_aio(listen: Sequence[str]) -> None:
    server, bound = await start_aio(listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    _announce(bound)
    await stopping.wait()
    await stop_aio(server)


@contextlib.contextmanager
def echo_process(flavour: Flavour, listen: Sequence[str]) -> Iterator[list[str]]:
    """Run the echo server in its own process (its own GIL); yields the bound addresses."""
    command = [sys.executable, "-m", "bench.echo", "--flavour", flavour]
    for address in listen:
        command += ["--listen", address]
    process = subprocess.Popen(command, cwd=_REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        bound = []
        for _ in listen:
            line = process.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(
                    f"echo server ({flavour}) did not start: exit code {process.poll()}, "
                    f"first line {line!r}"
                )
            bound.append(line.removeprefix("listening on ").strip())
        yield bound
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", choices=FLAVOURS, default="sync")
    parser.add_argument(
        "--listen", action="append", required=True,
        help="address to bind, e.g. unix:///tmp/echo.sock or 127.0.0.1:0; repeatable",
    )
    args = parser.parse_args(argv)
    if args.flavour == "sync":
        _serve_sync(args.listen)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_aio(args.listen))


if __name__ == "__main__":
    main()
