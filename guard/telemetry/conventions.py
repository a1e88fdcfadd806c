"""Telemetry conventions the sidecar and the host SDK share: rpc attributes and latency buckets.

Plain constants (no OpenTelemetry import), so the host SDK can use them without the sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

RPC_SERVICE: Final = "guard.v1.Guard"
#: Stream-level attributes of every batch span (semantic conventions for gRPC servers).
RPC_ATTRIBUTES: Final[Mapping[str, str]] = {
    "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": "Inspect",
}
#: The same for a stream on the doorbell socket (:mod:`guard.sidecar.doorbell`): Inspect, not gRPC.
DOORBELL_ATTRIBUTES: Final[Mapping[str, str]] = {
    "rpc.system": "guard_doorbell", "rpc.service": RPC_SERVICE, "rpc.method": "Inspect",
    "network.transport": "unix",
}
#: Latency buckets in seconds: 50 us to 5 s (the OpenTelemetry default buckets are for ms).
LATENCY_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                          0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Buckets of the SAE reconstruction error (normalised MSE, a fraction of the rows' variance):
#: well-trained SAEs sit around 0.02 to 0.3 in distribution; 1 is no better than the mean row.
NMSE_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                       5.0)
