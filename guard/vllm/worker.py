"""The vLLM worker that carries the guard: ``--worker-cls guard.vllm.worker.GuardWorker``.

A subclass of the platform's worker (``CPUWorker`` on CPUs, ``Worker`` on GPUs), because the
hooks must be registered in ``load_model``, before vLLM compiles the model: a
``--worker-extension-cls`` is mixed in *after* the worker's own class and vLLM refuses
extensions that redefine its methods. Its extra methods (``guard_stats``,
``guard_set_paused``, ``guard_reconnect``) are reachable with ``LLM.collective_rpc``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import vllm
from vllm.platforms import current_platform

from guard.vllm.attach import Attachment, attach
from guard.vllm.settings import PREFIX, VllmGuardSettings, VllmSetupError

#: What ``guard_reconnect`` may change.
RECONNECT_SETTINGS: Final = ("address", "mode", "failure_policy", "deadline_ms", "queue_size")

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

    def guard_reconnect(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Reach the guard, from the next step on, with the worker's ``GUARD_VLLM_*`` settings
        changed by ``overrides`` (``address``, ``mode``, ``failure_policy``, ``deadline_ms``,
        ``queue_size``), checked as at start-up; ``{}`` restores them. For drills and tests of
        the failure policy on a running engine. Returns the settings now in use."""
        guard = self._guard
        if guard is None:
            raise VllmSetupError("guard_reconnect: no guard is attached to this worker")
        unknown = sorted(set(overrides) - set(RECONNECT_SETTINGS))
        if unknown:
            raise VllmSetupError(f"guard_reconnect: {', '.join(unknown)}: expected some of "
                                 f"{', '.join(RECONNECT_SETTINGS)}")
        env = {**os.environ, **{PREFIX + name.upper(): str(value)
                                for name, value in overrides.items()}}
        settings = VllmGuardSettings.from_env(env)
        guard.reconnect(settings)
        return {name: getattr(settings, name) for name in RECONNECT_SETTINGS}

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        return super().shutdown(*args, **kwargs)
