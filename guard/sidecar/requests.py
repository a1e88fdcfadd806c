"""The requests a stream has seen, for the request lifecycle (``RequestEnded``).

A continuously batching host sends the rows of many requests over one stream and says when
each request is over. The guard keeps a little state per request (how many batches and rows
it decided on) until then; the table is bounded so that a host that never says "ended"
cannot grow the guard's memory: past ``capacity`` requests, the one seen least recently is
forgotten (an eviction, counted). Ending a request the table does not hold (never seen on
this stream, or already forgotten) is ignored and counted: the host's threads may race.

Whenever a request leaves the table (ended by the host, evicted, or still open when the
stream closes) the stream tells the plugins through the engine (``guard_request_ended``), so
that they free their own state for it too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple


@dataclass
class RequestState:
    """What the guard keeps for one request of a stream until it ends."""

    batches: int = 0
    rows: int = 0


class Forgotten(NamedTuple):
    """The outcome of ending requests: states freed, and ids the table did not hold."""

    freed: dict[str, RequestState]
    unknown: int


class RequestTable:
    """Per-request state of one stream, at most ``capacity`` requests, least recently seen
    evicted first. Not thread-safe: one stream's messages are handled in order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1, found {capacity}")
        self.capacity = capacity
        self._states: OrderedDict[str, RequestState] = OrderedDict()
        #: Requests forgotten because the table was full, since the stream began.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def seen(self, request_id: str, rows: int) -> str | None:
        """Count a decided batch of ``rows`` rows for the request; returns the id of the
        request evicted to make room, or None."""
        states = self._states
        state = states.get(request_id)
        if state is None:
            state = states[request_id] = RequestState()
        else:
            states.move_to_end(request_id)
        state.batches += 1
        state.rows += rows
        if len(states) <= self.capacity:
            return None
        evicted, _state = states.popitem(last=False)
        self.evicted += 1
        return evicted

    def end(self, request_ids: Iterable[str]) -> Forgotten:
        """Free the state of these requests; ids not held are counted, not an error."""
        freed: dict[str, RequestState] = {}
        unknown = 0
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is None:
                unknown += 1
            else:
                freed[request_id] = state
        return Forgotten(freed, unknown)

    def clear(self) -> list[str]:
        """Forget every request (the stream ended); returns their ids, least recently seen
        first."""
        ids = list(self._states)
        self._states.clear()
        return ids
