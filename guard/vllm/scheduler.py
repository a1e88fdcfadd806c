"""The vLLM scheduler that ends the requests the guard aborts:
``--scheduler-cls guard.vllm.scheduler.GuardScheduler`` (``GuardAsyncScheduler`` with
``--async-scheduling``, the default on GPUs).

A request the guard aborted in a step ends in that step's update, with the step's other
requests untouched: the token sampled for it, if any, is dropped, and it finishes as
``FINISHED_ABORTED``. The client sees the generation end with finish reason ``abort`` and stop
reason ``guard:<decision id>``, and vLLM frees its KV blocks. A request aborted in a prefill
chunk that samples no token ends the same way (its other chunks are never computed).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import RequestStatus

from guard.vllm.manifest import ABORTS


class _EndsGuardAborts:
    requests: dict[str, Any]

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

    def update_from_output(self, scheduler_output: Any,
                           model_runner_output: Any) -> dict[int, Any]:
        outputs: dict[int, Any] = super().update_from_output(  # type: ignore[misc]
            scheduler_output, model_runner_output)
        if not ABORTS.any():
            return outputs
        # Aborted in a step that sampled no token for them (a prefill chunk): vLLM never
        # reached _update_request_with_output, so end them here, as it ends failed requests.
        for req_id in scheduler_output.num_scheduled_tokens:
            abort = ABORTS.take(req_id)
            request = self.requests.get(req_id)
            if abort is None or request is None or request.is_finished():
                continue
            request.stop_reason = abort.stop_reason
            self.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)  # type: ignore[attr-defined]
            ended = EngineCoreOutput(request_id=req_id, new_token_ids=[],
                                     finish_reason=FinishReason.ABORT,
                                     stop_reason=abort.stop_reason,
                                     events=request.take_events(),
                                     trace_headers=request.trace_headers)
            if request.client_index in outputs:
                outputs[request.client_index].outputs.append(ended)
            else:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[ended])
        return outputs


class GuardScheduler(_EndsGuardAborts, Scheduler):  # type: ignore[misc]
    """vLLM's scheduler, ending the requests the guard aborted."""


class GuardAsyncScheduler(_EndsGuardAborts, AsyncScheduler):  # type: ignore[misc]
    """vLLM's asynchronous scheduler, ending the requests the guard aborted (untested: vLLM
    turns asynchronous scheduling off on CPUs)."""
