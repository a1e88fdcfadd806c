"""The sidecar process: the gRPC server and its lifecycle, the doorbell socket, the protocol
session one Inspect stream runs (shared by both transports), shared-memory regions, hot
reload, and ``guard serve`` run as a child process (for the demo, benches and tests)."""
