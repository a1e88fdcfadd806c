"""First-party sink: one JSON line per decision (and per request end), to stdout or an
appended file."""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from guard import Decision, FeatureEdit, Finding, RequestEndReason, Settings, hookimpl

STDOUT = "-"

@dataclass(frozen=True)
class DecisionLogSettings:
    """What the log writes and where."""

    #: ``-`` for stdout, or a file (appended; parent folders are created).
    path: str = STDOUT
    include_token_ids: bool = False
    include_positions: bool = True
    mask_feature_activations: bool = False


class DecisionLog:
    """Writes every decision as one JSON line (OPA-style decision log) through structlog.

    ``plugins.config.decision_log``::

        path: /var/log/guard/decisions.jsonl   # default "-": stdout
        include_positions: true          # token positions of the batch, findings and edits
        include_token_ids: false         # token ids of the batch's rows (off: they are text)
        mask_feature_activations: false  # drop the detectors' feature activations

    A line holds decision_id, timestamp (ISO 8601 UTC), request_id, sequence, hook, phase,
    action, details, positions, findings, edits, plugins (with versions), plugin_errors,
    sae_sha256 (and sae_neuronpedia_id when the SAE has one), out_of_distribution (true when a
    finding says the SAE does not explain the rows, so that feature-based verdicts on them
    read outside its distribution), reconstruction_nmse (on batches sampled for it) and
    timings_ms; never activations or token text. Each line is flushed as it
    is written, so a record the sink accepted survives a SIGTERM. Non-finite numbers are
    written as null, so every line is valid JSON.

    When a request ends (``guard_request_ended``) a line with ``"event": "request ended"``
    closes it: request_id, reason (finished, aborted, preempted, unspecified, evicted) and
    timestamp (when the log learned of it), written after every decision line of the request.
    A stream that closes with requests open writes no such line: for a host that predates
    RequestEnded every request would otherwise gain one, and its log must read as before.
    Decision lines have ``"event": "decision"``: a reader that wants decisions only filters
    on ``event``.

    structlog's ``WriteLogger`` is used because it writes and flushes one line under a lock
    per file: on stdout, decision lines never interleave with other structlog output.
    """

    def __init__(self) -> None:
        self._settings = DecisionLogSettings()
        self._file: TextIO | None = None
        self._log: Any = None

    @property
    def settings(self) -> DecisionLogSettings:
        return self._settings

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        block = Settings(settings, what="a mapping of decision log settings")
        block.only(DecisionLogSettings.__dataclass_fields__, "of the decision log")
        parsed = DecisionLogSettings(
            path=block.string("path", STDOUT),
            include_token_ids=block.boolean("include_token_ids", False),
            include_positions=block.boolean("include_positions", True),
            mask_feature_activations=block.boolean("mask_feature_activations", False),
        )
        if parsed.path != STDOUT and Path(parsed.path).is_dir():
            raise block.error("path", "a file path or - for stdout", f"{parsed.path} (a folder)")
        # The file opens at startup, not here: a configuration rejected later (by another
        # plugin) never gets guard_shutdown, and would leak an open file.
        self._settings = parsed

    @hookimpl
    def guard_startup(self) -> None:
        self._logger()  # an unwritable path stops the guard at start, not at the first record

    @hookimpl
    def guard_record(self, decision: Decision) -> None:
        self._logger().msg("decision", **self.record(decision))

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        if reason == "stream_closed":  # not an end the host reported (see the class docstring)
            return
        self._logger().msg("request ended", **self.end_record(request_id, reason))

    @hookimpl
    def guard_shutdown(self) -> None:
        file, self._file, self._log = self._file, None, None
        if file is not None and file is not sys.stdout:
            file.close()

    def _logger(self) -> Any:
        if self._log is None:
            if self._settings.path == STDOUT:
                self._file = sys.stdout
            else:
                path = Path(self._settings.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            # A dedicated logger: the generic wrapper, so that the guard's global level filter
            # (which may drop info lines) never drops a decision record.
            self._log = structlog.wrap_logger(
                structlog.WriteLogger(self._file),
                wrapper_class=structlog.BoundLogger,
                processors=[structlog.processors.JSONRenderer(allow_nan=False)],
            )
        return self._log

    def record(self, decision: Decision) -> dict[str, Any]:
        """The JSON-ready record of a decision (what one log line holds, less ``event``)."""
        settings = self._settings
        record: dict[str, Any] = {
            "decision_id": decision.decision_id,
            "timestamp": _iso_utc(decision.timestamp),
            "request_id": decision.request_id,
            "sequence": decision.sequence,
            "hook": decision.hook,
            "phase": decision.phase.name.lower(),
            "action": decision.action.name.lower(),
            "details": decision.details,
        }
        if settings.include_positions:
            record["positions"] = [int(p) for p in decision.positions]
        if settings.include_token_ids:
            token_ids = decision.token_ids
            record["token_ids"] = None if token_ids is None else [int(t) for t in token_ids]
        record["findings"] = [self._finding(f) for f in decision.findings]
        record["edits"] = [self._edit(e) for e in decision.edits]
        record["plugins"] = [{"name": p.name, "version": p.version} for p in decision.plugins]
        record["plugin_errors"] = list(decision.plugin_errors)
        record["sae_sha256"] = decision.sae_sha256
        # A finding says the SAE does not explain these rows: its features read them outside
        # the SAE's training distribution (a reconstruction detector).
        record["out_of_distribution"] = decision.out_of_distribution
        if decision.reconstruction_nmse is not None:  # the batch was sampled for it
            record["reconstruction_nmse"] = _number(decision.reconstruction_nmse)
        if decision.sae_neuronpedia_id:  # links each finding's features to their pages
            record["sae_neuronpedia_id"] = decision.sae_neuronpedia_id
        # dict() copies in one step: the stream may still add "total" to this dict while the
        # sink thread reads it, and iterating it directly could fail mid-way.
        timings = dict(decision.timings)
        record["timings_ms"] = {k: _number(v * 1e3, 3) for k, v in timings.items()}
        return record

    @staticmethod
    def end_record(request_id: str, reason: str, timestamp: float | None = None
                   ) -> dict[str, Any]:
        """The JSON-ready record of a request's end (a ``request ended`` line, less
        ``event``): ids and a time only."""
        return {"timestamp": _iso_utc(time.time() if timestamp is None else timestamp),
                "request_id": request_id, "reason": reason}

    def _finding(self, finding: Finding) -> dict[str, Any]:
        item: dict[str, Any] = {
            "detector": finding.detector,
            "score": _number(finding.score),
            "threshold": _number(finding.threshold),
            "action": finding.action,
            "feature_ids": [int(f) for f in finding.feature_ids],
        }
        if not self._settings.mask_feature_activations:
            item["feature_activations"] = _numbers(finding.feature_activations)
        item["feature_labels"] = list(finding.feature_labels)
        if self._settings.include_positions:
            item["positions"] = [int(p) for p in finding.positions]
        item["message"] = finding.message
        item["plugin"] = finding.plugin
        if finding.out_of_distribution:
            item["out_of_distribution"] = True
        return item

    def _edit(self, edit: FeatureEdit) -> dict[str, Any]:
        item: dict[str, Any] = {"hook": edit.hook, "feature": int(edit.feature_id),
                                "kind": edit.kind, "value": _number(edit.value)}
        if self._settings.include_positions:
            item["positions"] = None if edit.positions is None else [int(p)
                                                                     for p in edit.positions]
        item["plugin"] = edit.plugin
        return item


def _number(value: float, digits: int | None = None) -> float | None:
    """A JSON-safe float: NaN and infinities (which json.dumps writes as invalid JSON) become
    null; a plugin-error finding's score is NaN."""
    number = float(value)
    if not math.isfinite(number):
        return None
    return round(number, digits) if digits is not None else number


def _numbers(values: Iterable[float]) -> list[float | None]:
    return [_number(v) for v in values]


def _iso_utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")

