"""The vLLM integration: guard a vLLM engine's requests with Activation Guard.

vLLM runs the guard's worker and scheduler (``--worker-cls guard.vllm.worker.GuardWorker
--scheduler-cls guard.vllm.scheduler.GuardScheduler``, settings in ``GUARD_VLLM_*``
environment variables: :mod:`guard.vllm.settings`). Every engine step the worker sends the
configured layers' residual rows of all the step's requests, one multi-request batch per layer,
through :meth:`guard.host.GuardClient.inspect_step`; in INLINE mode it adds the guard's
steering before the next layer runs and hands ABORTs to the scheduler, which ends only those
requests (finish reason ``abort``, stop reason ``guard:<decision id>``). See docs/vllm.md.

Only :mod:`guard.vllm.worker`, :mod:`guard.vllm.scheduler` and :mod:`guard.vllm.attach`
import vLLM or torch; this package's ``__init__`` imports neither. It reaches the guard only
through the host SDK (:mod:`guard.host`).
"""
