"""One Inspect stream: the protocol's state machine, validation and message conversion.

The first message must be a StreamConfig; then each ActivationBatch gets exactly one
InspectResponse. A bad batch gets a per-batch error reply and the stream goes on; only a
protocol violation (a batch before the config, a second config, an unknown hook or an
unsupported version in the config) ends the stream with a status.

Rules for bad input, as the README documents them:

- unknown hook: NOT_FOUND listing the served hooks;
- unsupported datatype, a byte length that does not match shape and datatype, a width that
  is not the SAE's d_in, positions or token ids that do not match the rows: INVALID_ARGUMENT;
- NaN or infinite rows are rejected (INVALID_ARGUMENT naming the row positions), never
  encoded: a NaN feature score would silently pass every threshold test;
- sequence numbers increase by exactly 1 per batch; a repeat or a step back is rejected
  (ALREADY_EXISTS) and not processed twice; a gap is accepted and reported in
  ``skipped_sequences`` (a MONITOR-mode host may drop batches);
- a tensor above ``server.max_message_bytes``: RESOURCE_EXHAUSTED naming that option.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from guard import codec
from guard.decision import ActivationRows, Decision, Phase
from guard.engine import Engine
from guard.errors import (
    AlreadySeen,
    GuardError,
    InvalidInput,
    ProtocolViolation,
    TooLarge,
    public_message,
    status_code,
)
from guard.v1 import guard_pb2 as pb

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = "1.0"
_MODES = {pb.MODE_MONITOR: "monitor", pb.MODE_INLINE: "inline"}
_PHASES = {int(p): p for p in Phase}


class StreamEnded(Exception):
    """The stream must end with this status (a protocol violation)."""

    def __init__(self, error: GuardError) -> None:
        super().__init__(str(error))
        self.code = status_code(error)
        self.details = str(error)


@dataclass
class StreamCounters:
    """Per-stream counts, logged when the stream ends."""

    batches: int = 0
    rows: int = 0
    rejected: int = 0
    skipped_sequences: int = 0
    counts_by_code: dict[str, int] = field(default_factory=dict)


class InspectStream:
    """Handles the messages of one Inspect stream, in order. Not shared between threads."""

    def __init__(self, engine: Engine, max_message_bytes: int, peer: str = "") -> None:
        self._engine = engine
        self._max_message_bytes = max_message_bytes
        self._config: pb.StreamConfig | None = None
        self._last_sequence: int | None = None
        self.peer = peer
        self.counters = StreamCounters()

    @property
    def mode(self) -> str:
        return _MODES.get(self._config.mode, "unset") if self._config is not None else "unset"

    def handle(self, request: pb.InspectRequest) -> pb.InspectResponse | None:
        """Process one message; returns the reply (None for the config) or raises StreamEnded."""
        kind = request.WhichOneof("message")
        if kind == "config":
            self._configure(request.config)
            return None
        if kind != "batch":
            raise StreamEnded(
                InvalidInput("InspectRequest: expected a config or a batch, found neither")
            )
        if self._config is None:
            batch = request.batch
            raise StreamEnded(
                ProtocolViolation(
                    "the first message on an Inspect stream must be a StreamConfig; found a "
                    f"batch (request_id={batch.request_id!r}, sequence={batch.sequence})"
                )
            )
        return self._inspect(request.batch)

    def _configure(self, config: pb.StreamConfig) -> None:
        if self._config is not None:
            raise StreamEnded(
                ProtocolViolation("a StreamConfig was already received on this stream; "
                                  "open a new stream to change it")
            )
        version = config.protocol_version or "1"
        if version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise StreamEnded(
                ProtocolViolation(
                    f"config.protocol_version: this guard speaks {PROTOCOL_VERSION}, "
                    f"found {version!r}"
                )
            )
        if config.mode not in _MODES:
            found = _enum_name(pb.Mode, config.mode)
            raise StreamEnded(
                InvalidInput(f"config.mode: expected MODE_MONITOR or MODE_INLINE, found {found}")
            )
        for hook in config.hooks:
            try:
                self._engine.hook(hook)
            except GuardError as exc:
                raise StreamEnded(exc) from exc
        self._config = config
        log.info(
            "stream configured",
            peer=self.peer,
            mode=self.mode,
            hooks=list(config.hooks),
            failure_policy=_enum_name(pb.FailurePolicy, config.failure_policy),
            batch_deadline_ms=config.batch_deadline_ms,
            host=config.host,
        )

    def _inspect(self, batch: pb.ActivationBatch) -> pb.InspectResponse:
        self.counters.batches += 1
        started = time.perf_counter()
        skipped = 0
        try:
            skipped = self._check_sequence(batch.sequence)
            rows = self._decode(batch)
            timings = {"decode": time.perf_counter() - started}
            decision = self._engine.inspect(rows, timings, started)
        except GuardError as exc:
            return self._reject(batch, exc, skipped)
        except Exception as exc:  # a bug: the peer gets a generic message, the log the details
            log.exception("batch failed", request_id=batch.request_id, sequence=batch.sequence)
            return self._reject(batch, exc, skipped)
        self.counters.rows += len(batch.positions)
        return decision_to_proto(decision, skipped, batch.positions)

    def _check_sequence(self, sequence: int) -> int:
        last = self._last_sequence
        if last is not None and sequence <= last:
            raise AlreadySeen(
                f"batch.sequence: expected {last + 1} (sequence numbers increase by 1 per "
                f"batch on a stream), found {sequence}, which repeats or goes back; "
                "the batch was not processed"
            )
        self._last_sequence = sequence
        skipped = 0 if last is None else sequence - last - 1
        if skipped:
            self.counters.skipped_sequences += skipped
            log.warning("sequence gap", peer=self.peer, expected=last + 1 if last is not None
                        else None, found=sequence, skipped=skipped)
        return skipped

    def _decode(self, batch: pb.ActivationBatch) -> ActivationRows:
        # Fields are read once into locals: every access to a message field allocates.
        request_id = batch.request_id
        hook = batch.hook
        if not request_id:
            raise InvalidInput("batch.request_id: expected a non-empty request id, found ''")
        d_in = self._engine.hook(hook).d_in
        tensor = batch.activations
        raw = tensor.raw
        if len(raw) > self._max_message_bytes:
            raise TooLarge(
                f"batch.activations: {len(raw)} bytes exceed the limit of "
                f"{self._max_message_bytes}; raise server.max_message_bytes in the guard's "
                "config (and the host's max send size) or send fewer rows per batch"
            )
        shape = tensor.shape
        if len(shape) != 2:
            raise InvalidInput(
                f"batch.activations.shape: expected [rows, d_in], found {list(shape)}"
            )
        n_rows, width = shape
        if width != d_in:
            raise InvalidInput(
                f"batch.activations.shape: hook {hook!r} has d_in {d_in}, "
                f"found width {width} (shape {list(shape)})"
            )
        if n_rows < 1:
            raise InvalidInput(
                f"batch.activations.shape: expected at least one row, found {list(shape)}"
            )
        rows = codec.decode(tensor.datatype, (n_rows, width), raw)
        position_field = batch.positions
        if len(position_field) != n_rows:
            raise InvalidInput(
                f"batch.positions: expected one position per row ({n_rows}), "
                f"found {len(position_field)}"
            )
        token_field = batch.token_ids
        if token_field and len(token_field) != n_rows:
            raise InvalidInput(
                f"batch.token_ids: expected none or one per row ({n_rows}), "
                f"found {len(token_field)}"
            )
        positions = np.array(position_field, dtype=np.int64)
        bad = codec.nonfinite_rows(rows)
        if bad.size:
            shown = ", ".join(str(int(positions[i])) for i in bad[:8])
            more = f" and {bad.size - 8} more" if bad.size > 8 else ""
            raise InvalidInput(
                f"batch.activations: rows at positions {shown}{more} hold NaN or Inf; "
                "expected finite values (non-finite rows are rejected, never encoded)"
            )
        attributes = batch.attributes
        return ActivationRows(
            request_id=request_id,
            sequence=batch.sequence,
            hook=hook,
            rows=rows,
            positions=positions,
            token_ids=np.array(token_field, dtype=np.int64) if token_field else None,
            phase=_PHASES.get(batch.phase, Phase.UNSPECIFIED),
            attributes=dict(attributes) if attributes else {},
        )

    def _reject(self, batch: pb.ActivationBatch, error: BaseException, skipped: int
                ) -> pb.InspectResponse:
        code = status_code(error)
        self.counters.rejected += 1
        self.counters.counts_by_code[code.name] = self.counters.counts_by_code.get(code.name, 0) + 1
        message = public_message(error)
        if code is not grpc.StatusCode.INTERNAL:
            log.info("batch rejected", peer=self.peer, request_id=batch.request_id,
                     sequence=batch.sequence, code=code.name, reason=message)
        return pb.InspectResponse(
            request_id=batch.request_id,
            sequence=batch.sequence,
            error=pb.BatchError(code=code.value[0], message=message),
            skipped_sequences=skipped,
        )


def _enum_name(enum: Any, value: int) -> str:
    """The name of a protobuf enum value, or the number for a value this guard does not know."""
    return str(enum.Name(value)) if value in enum.values() else str(value)


def decision_to_proto(
    decision: Decision, skipped_sequences: int = 0, positions: Iterable[int] | None = None
) -> pb.InspectResponse:
    """The wire form of a decision; ``positions`` may pass the request's own field (faster)."""
    response = pb.InspectResponse(
        request_id=decision.request_id,
        sequence=decision.sequence,
        decision_id=decision.decision_id,
        action=pb.Action.ValueType(decision.action.value),
        details=decision.details,
        skipped_sequences=skipped_sequences,
    )
    response.positions.extend(decision.positions.tolist() if positions is None else positions)
    for finding in decision.findings:
        if finding.action == "log":  # log-only findings go to the decision log, not the host
            continue
        response.findings.add(
            detector=finding.detector,
            score=finding.score,
            threshold=finding.threshold,
            action=pb.ACTION_ABORT if finding.action == "abort" else pb.ACTION_CONTINUE,
            feature_ids=finding.feature_ids,
            feature_activations=finding.feature_activations,
            feature_labels=finding.feature_labels,
            positions=finding.positions,
            message=finding.message,
        )
    for steering in decision.steering:
        shape, raw = codec.encode(steering.delta, "F32")
        response.steering.add(
            hook=steering.hook, delta=pb.Tensor(datatype="F32", shape=shape, raw=raw)
        )
    return response
