"""The vLLM scheduler that ends the requests the guard aborts:
``--scheduler-cls guard.vllm.scheduler.GuardScheduler`` (``GuardAsyncScheduler`` with
``--async-scheduling``, the default on GPUs).

When the step's token of a request the guard aborted comes back, the token is dropped and the
request finishes with ``FINISHED_ABORTED``: the client sees the generation end with finish
reason ``abort`` and stop reason ``guard:<decision id>``, vLLM frees its KV blocks, and the
step's other requests go on untouched.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from guard.vllm.manifest import ABORTS


class _EndsGuardAborts:
    def _update_request_with_output(self, request: Any, new_token_ids: list[int],
                                    is_stale: bool = False) -> tuple[list[int], bool]:
        abort = ABORTS.take(request.request_id)
        if abort is None:
            result: tuple[list[int], bool] = super()._update_request_with_output(  # type: ignore[misc]
                request, new_token_ids, is_stale)
            return result
        request.status = RequestStatus.FINISHED_ABORTED
        request.stop_reason = abort.stop_reason
        return [], True


class GuardScheduler(_EndsGuardAborts, Scheduler):  # type: ignore[misc]
    """vLLM's scheduler, ending the requests the guard aborted."""


class GuardAsyncScheduler(_EndsGuardAborts, AsyncScheduler):  # type: ignore[misc]
    """vLLM's asynchronous scheduler, ending the requests the guard aborted (untested: vLLM
    turns asynchronous scheduling off on CPUs)."""
