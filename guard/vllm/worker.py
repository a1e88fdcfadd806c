"""The vLLM worker that carries the guard: ``--worker-cls guard.vllm.worker.GuardWorker``.

A subclass of the platform's worker (``CPUWorker`` on CPUs, ``Worker`` on GPUs), because the
hooks must be registered in ``load_model``, before vLLM compiles the model: a
``--worker-extension-cls`` is mixed in *after* the worker's own class and vLLM refuses
extensions that redefine its methods. Its extra methods (``guard_stats``,
``guard_set_paused``) are reachable with ``LLM.collective_rpc``.
"""

from __future__ import annotations

from typing import Any

import vllm
from vllm.platforms import current_platform

from guard.vllm.attach import Attachment, attach

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:  # untested here: no GPU on the machines this was written on
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker


class GuardWorker(_PlatformWorker):  # type: ignore[misc]  # vLLM is untyped here
    """The platform's worker, with the guard attached to its model."""

    _guard: Attachment | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        self._guard = attach(self.vllm_config, self.model_runner, vllm.__version__)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        if guard is None:
            return super().execute_model(scheduler_output, *args, **kwargs)
        guard.begin_step(scheduler_output)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            guard.end_step()

    def guard_stats(self) -> dict[str, float]:
        """The guard's counters in this worker (steps, batches, rows, aborts, ...)."""
        return self._guard.stats() if self._guard is not None else {}

    def guard_set_paused(self, paused: bool) -> bool:
        """Stop (or resume) sending steps to the guard; for baselines in tests."""
        if self._guard is not None:
            self._guard.paused = bool(paused)
        return paused

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        return super().shutdown(*args, **kwargs)
