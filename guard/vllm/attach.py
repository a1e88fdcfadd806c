"""The guard inside a vLLM worker: hooks on the model's decoder layers, the step's manifest,
one ``inspect_step`` per hooked layer per step (two when a request recomputed after a
preemption has prompt and generated rows in the step), steering and ABORTs.

How the hooks survive vLLM's compiled mode: they are registered in the worker's
``load_model``, before vLLM compiles the model, and the layer hook calls one custom op
(``activation_guard::inspect``) that Dynamo keeps as an opaque call in the compiled graph.
The op's body runs eagerly every step: it copies the step's rows out (``hidden + residual``
after layer L), sends them, and returns the delta to add (zero unless the guard steers). The
manifest (which rows belong to which request, their positions and phase) is built by a
pre-hook on the outer model, which vLLM does not compile.

Imports torch and the host SDK; vLLM only through what the worker hands it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from guard.decision import Action
from guard.host import GuardClient, StepVerdict, Verdict
from guard.vllm.manifest import ABORTS, GuardAbort, StepManifest, build_manifest, client_request_id
from guard.vllm.roles import decode_runs
from guard.vllm.settings import (
    REQUEST_ID_ARG,
    ROLES_ARG,
    RequestArgsError,
    RequestSettings,
    VllmGuardSettings,
    VllmSetupError,
    layer_of,
)

log = structlog.get_logger("guard.vllm")

#: The vLLM versions this integration was written and tested against.
SUPPORTED_VLLM: Final = ("0.32.",)

#: The attachment of this process's worker (vLLM runs one worker per process).
_CURRENT: Attachment | None = None


@torch.library.custom_op("activation_guard::inspect", mutates_args=())
def inspect_op(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """The delta to add to ``hidden`` after decoder layer ``layer`` (zeros unless the guard
    steers); sends the step's rows to the guard on the way."""
    current = _CURRENT
    if current is None:
        return torch.zeros_like(hidden)
    return current.on_layer(layer, hidden, residual)


@inspect_op.register_fake
def _inspect_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        supported = ", ".join(v + "x" for v in SUPPORTED_VLLM)
        raise VllmSetupError(f"guard.vllm supports vLLM {supported}, found {version}: it "
                             "reads vLLM internals that change between releases")


class Attachment:
    """The guard's state in one worker: the client, the hooks, the current step."""

    def __init__(self, settings: VllmGuardSettings, model_runner: Any, model: Any,
                 client: GuardClient, hooks: Mapping[int, str]) -> None:
        self.settings = settings
        self.runner = model_runner
        self.client = client
        self.hooks = dict(hooks)
        self.paused = False
        self._manifest: StepManifest | None = None
        self._in_step = False
        self._scheduled: Mapping[str, int] = {}
        self._calls = 0
        self._step = 0
        #: internal id -> the id the guard knows, for the requests the guard has seen.
        self._known: dict[str, str] = {}
        self._aborted: set[str] = set()
        #: internal id -> its name and settings, fixed when the worker first sees it (until
        #: vLLM finishes it); the names in use, each held by one live request.
        self._requests: dict[str, _Request] = {}
        self._names: set[str] = set()
        self._logged_refusal = False
        self._logged_rename = False
        self._logged_roles = False
        self.counters: dict[str, float] = {
            "steps": 0, "batches": 0, "rows": 0, "op_calls": 0, "aborts": 0, "steered_rows": 0,
            "policy_verdicts": 0, "inspect_seconds": 0.0, "refused": 0, "renamed": 0,
            # Requests whose prompt rows have roles (from their chat), and whose roles were
            # unusable (dropped: their prompt rows go unlabelled).
            "with_roles": 0, "roles_dropped": 0,
            # Where a step's time goes (bench/vllm_throughput.py): the manifest (outer pre-hook)
            # and the rows' copy out; the client's CPU on this thread in ``inspect_step``
            # (encode, queue, reply) and the rest of that call (off CPU: waiting for the
            # verdicts, or for the GIL or a core); applying the verdicts (aborts, steering);
            # telling the guard of ended requests.
            "manifest_seconds": 0.0, "copy_seconds": 0.0, "send_seconds": 0.0,
            "wait_seconds": 0.0, "apply_seconds": 0.0, "end_seconds": 0.0,
        }
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True)]
        layers = model.model.layers
        for layer in self.hooks:
            self._handles.append(layers[layer].register_forward_hook(_layer_hook(layer)))

    # -- the step -----------------------------------------------------------------------------

    def begin_step(self, scheduler_output: Any) -> None:
        """Before vLLM's forward: tell the guard which requests ended or were preempted."""
        self._in_step = True
        self._scheduled = scheduler_output.num_scheduled_tokens
        started = time.perf_counter()
        finished = [r for r in scheduler_output.finished_req_ids if r in self._known]
        preempted = [r for r in (getattr(scheduler_output, "preempted_req_ids", None) or ())
                     if r in self._known]
        if finished:
            aborted = [r for r in finished if r in self._aborted]
            done = [r for r in finished if r not in self._aborted]
            if done:
                self._end([self._known[r] for r in done], "finished")
            if aborted:
                self._end([self._known[r] for r in aborted], "aborted")
            for r in finished:
                self._known.pop(r, None)
                self._aborted.discard(r)
            ABORTS.forget(finished)
        if preempted:
            self._end([self._known[r] for r in preempted], "preempted")
        if self._requests:
            self._forget_requests(scheduler_output.finished_req_ids)
        self.counters["end_seconds"] += time.perf_counter() - started

    def _end(self, names: list[str], reason: Literal["finished", "aborted", "preempted"]
             ) -> None:
        self.client.end_requests(names, reason)
        if self.settings.tap:  # before the rows of step number self._step + 1
            folder = Path(self.settings.tap)
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "ended.jsonl").open("a", encoding="utf-8") as out:
                out.write(json.dumps({"before_step": self._step + 1, "reason": reason,
                                      "request_ids": names}) + "\n")

    def end_step(self) -> None:
        """After vLLM's forward. A step with rows whose hooks did not all run means the model
        runs without them (compiled before they were registered): fail loudly rather than
        serve unguarded."""
        manifest, calls = self._manifest, self._calls
        self._in_step = False
        self._manifest = None
        self._scheduled = {}
        self._calls = 0
        if manifest is not None and manifest.step_rows and calls < len(self.hooks):
            raise VllmSetupError(
                f"guard.vllm: {calls} of {len(self.hooks)} layer hooks ran in a step of "
                f"{manifest.step_rows} rows: vLLM runs the model without the guard's hooks")

    def _before_forward(self, module: Any, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        """The outer model's pre-hook (eager): the manifest of this forward's rows."""
        self._manifest = None
        if not self._in_step or self.paused:
            return  # a warm-up or profiling forward, or paused
        started = time.perf_counter()
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if positions is None:
            return
        batch = self.runner.input_batch
        internal = list(batch.req_ids[:batch.num_reqs])
        if not internal:
            return
        scheduled_by_id = self._scheduled
        scheduled = [int(scheduled_by_id.get(r, 0)) for r in internal]
        prompt_lengths = [int(n) for n in batch.num_prompt_tokens[:len(internal)]]
        requests = [self._request(r) for r in internal]
        total = sum(scheduled)
        pos = positions[:total].detach().to("cpu", torch.int64).numpy()
        ids = (input_ids[:total].detach().to("cpu", torch.int64).numpy()
               if input_ids is not None else np.zeros(total, dtype=np.int64))
        manifest = build_manifest(internal, [r.name for r in requests], scheduled,
                                  prompt_lengths, pos, ids, self.settings.skip_positions,
                                  [r.roles for r in requests])
        for r, c in zip(manifest.internal_ids, (s.request_id for s in manifest.segments),
                        strict=True):
            self._known[r] = c
        self._manifest = manifest
        self._step += 1
        self.counters["steps"] += 1
        self.counters["manifest_seconds"] += time.perf_counter() - started

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The custom op's body: send the rows of this layer, return the delta to add."""
        self.counters["op_calls"] += 1
        delta = torch.zeros_like(hidden)
        manifest = self._manifest
        if manifest is None:
            return delta
        self._calls += 1
        part: StepManifest | None = manifest
        while part is not None:  # a second batch holds recomputed generated rows (phase)
            delta = self._send(layer, hidden, residual, part, delta)
            part = part.then
        return delta

    def _send(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor,
              manifest: StepManifest, delta: torch.Tensor) -> torch.Tensor:
        """Send one batch of the step's rows at this layer; add its steering to ``delta``."""
        if manifest.rows == 0:
            return delta
        hook = self.hooks[layer]
        n = manifest.rows
        copying = time.perf_counter()
        keep = torch.from_numpy(manifest.keep).to(hidden.device)
        rows = (hidden.detach().index_select(0, keep) + residual.detach().index_select(0, keep)
                ).to("cpu", torch.float32).numpy()
        started, cpu = time.perf_counter(), time.thread_time()
        step = self.client.inspect_step(hook, rows, manifest.segments, manifest.positions,
                                        manifest.token_ids, roles=manifest.roles)
        answered, cpu = time.perf_counter(), time.thread_time() - cpu
        call = answered - started
        self.counters["copy_seconds"] += started - copying
        self.counters["inspect_seconds"] += call
        self.counters["send_seconds"] += min(cpu, call)
        self.counters["wait_seconds"] += max(0.0, call - cpu)
        self.counters["batches"] += 1
        self.counters["rows"] += n
        if self.settings.tap:
            self._tap(hook, rows, manifest, step)
        if self.settings.mode == "monitor":
            return delta
        applying = time.perf_counter()
        self._act(manifest, step)
        steer = step.steering.get(hook)
        if steer is not None and step.action is not Action.CONTINUE:
            steer = self._inline_only(manifest, steer)
            delta.index_add_(0, keep, torch.tensor(steer, dtype=delta.dtype,
                                                    device=delta.device))
            self.counters["steered_rows"] += int(np.count_nonzero(np.abs(steer).sum(axis=1)))
        self.counters["apply_seconds"] += time.perf_counter() - applying
        return delta

    def _act(self, manifest: StepManifest, step: StepVerdict) -> None:
        if step.decided_by_policy:
            self.counters["policy_verdicts"] += 1
        for internal, verdict in zip(manifest.internal_ids, step.verdicts, strict=True):
            abort = self._aborts(internal, verdict, step)
            if abort is not None and internal not in self._aborted:
                self._aborted.add(internal)
                self.counters["aborts"] += 1
                ABORTS.post(internal, abort)
                log.info("guard aborted a request", request_id=verdict.request_id,
                         decision_id=abort.decision_id, source=abort.source,
                         details=abort.details)

    def _aborts(self, internal: str, verdict: Verdict, step: StepVerdict) -> GuardAbort | None:
        """The ABORT this verdict means for this request under its own settings: none for a
        MONITOR request; under the failure policy, the request's own policy."""
        request = self._requests.get(internal)
        settings = request.settings if request is not None else None
        if settings is not None and settings.mode == "monitor":
            return None
        if (step.decided_by_policy and settings is not None
                and settings.failure_policy != self.settings.failure_policy):
            if settings.failure_policy == "open":
                return None
            return GuardAbort("", verdict.reason or "the guard did not answer (fail closed)",
                              "fail_closed")
        if verdict.action is Action.ABORT:
            return GuardAbort(verdict.decision_id, verdict.details, verdict.source)
        return None

    def _inline_only(self, manifest: StepManifest, steer: Any) -> Any:
        """The step's steering without the rows of its MONITOR requests (never steered)."""
        monitored = [i for i, internal in enumerate(manifest.internal_ids)
                     if (r := self._requests.get(internal)) is not None
                     and r.settings.mode == "monitor"]
        if not monitored:
            return steer
        steer = np.array(steer, dtype=np.float32, copy=True)
        starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.segments])])
        for i in monitored:
            steer[starts[i]:starts[i + 1]] = 0.0
        return steer

    # -- the requests -------------------------------------------------------------------------

    def _request(self, internal: str) -> _Request:
        """A request's name for the guard and its settings, fixed at first sight. A request
        whose ``guard_*`` arguments the server refuses is ended with the reason as its stop
        reason (vLLM's admission check, guard.vllm.admission, refuses it before it runs);
        a name already held by another live request gets ``#2``, ``#3``... (two requests
        ``n=2`` share their arguments; a client must not reach another request's state)."""
        found = self._requests.get(internal)
        if found is not None:
            return found
        state = self.runner.requests.get(internal)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None)
        refused = ""
        try:
            settings = self.settings.request_settings(extra)
        except RequestArgsError as exc:
            refused = str(exc)
            settings = RequestSettings(None, self.settings.mode, self.settings.failure_policy)
        wanted = settings.name or client_request_id(internal, None, REQUEST_ID_ARG)
        name, copy = wanted, 1
        while name in self._names:
            copy += 1
            name = f"{wanted}#{copy}"
        if copy > 1:
            self.counters["renamed"] += 1
            if not self._logged_rename:
                self._logged_rename = True
                log.warning("two live requests share a guard request id: the later ones are "
                            "renamed (logged once; counted as renamed)", request_id=wanted,
                            renamed=name)
        request = _Request(name, settings, self._roles(state, extra, name))
        self._requests[internal] = request
        self._names.add(name)
        if refused:
            self.counters["refused"] += 1
            self._aborted.add(internal)
            ABORTS.post(internal, GuardAbort("", refused, "refused"))
            if not self._logged_refusal:
                self._logged_refusal = True
                log.warning("guard refused a request's arguments and ends it (logged once; "
                            "counted as refused)", request_id=name, error=refused)
        return request

    def _roles(self, state: Any, extra: Any, name: str) -> NDArray[np.int8] | None:
        """The roles of the request's prompt positions, from the runs the front end put in
        its ``extra_args`` (:mod:`guard.vllm.roles`); None without them, or when they do not
        fit its prompt (counted and logged once: its prompt rows then go unlabelled)."""
        runs = (extra or {}).get(ROLES_ARG)
        if runs is None:
            return None
        try:
            roles = decode_runs(runs, int(getattr(state, "num_prompt_tokens", -1)))
        except ValueError as exc:
            self.counters["roles_dropped"] += 1
            if not self._logged_roles:
                self._logged_roles = True
                log.warning("a request's row roles do not fit its prompt: its prompt rows "
                            "are sent unlabelled (logged once; counted as roles_dropped)",
                            request_id=name, error=str(exc))
            return None
        self.counters["with_roles"] += 1
        return roles

    def _forget_requests(self, finished: Any) -> None:
        gone = []
        for internal in finished:
            request = self._requests.pop(internal, None)
            if request is not None:
                self._names.discard(request.name)
                self._aborted.discard(internal)
                gone.append(internal)
        if gone:
            ABORTS.forget(gone)  # a refused request the client ended before its first step

    def _tap(self, hook: str, rows: Any, manifest: StepManifest, step: StepVerdict) -> None:
        folder = Path(self.settings.tap)
        folder.mkdir(parents=True, exist_ok=True)
        part = f".{manifest.part}" if manifest.part else ""
        np.savez(folder / f"step{self._step:05d}{part}-{hook}.npz", rows=rows,
                 positions=manifest.positions, token_ids=manifest.token_ids,
                 request_ids=np.array([s.request_id for s in manifest.segments]),
                 counts=np.array([s.rows for s in manifest.segments]),
                 phases=np.array([str(s.phase) for s in manifest.segments]),
                 roles=manifest.roles,
                 # -1: not said (generation), 0: an earlier chunk, 1: the prompt's end
                 prompt_complete=np.array([-1 if s.prompt_complete is None
                                           else int(s.prompt_complete)
                                           for s in manifest.segments]),
                 actions=np.array([v.action.name for v in step.verdicts]))

    # -- the worker's other calls ---------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """This worker's counters, and its client's (``client_sent``, ``client_timeouts``,
        ``client_fail_open``, ...)."""
        found = dict(self.counters)
        for name, value in dataclasses.asdict(self.client.counters).items():
            if isinstance(value, int | float):
                found[f"client_{name}"] = value
        return found

    def reconnect(self, settings: VllmGuardSettings) -> None:
        """From the next step on, reach the guard with these settings (address, mode,
        failure policy, deadline, queue): a new client replaces the current one, closed.
        Requests already seen keep the mode and failure policy they were given then."""
        old, self.client = self.client, connect(settings, tuple(self.hooks.values()))
        self.settings = settings
        old.close()

    def close(self) -> None:
        global _CURRENT
        for handle in self._handles:
            handle.remove()
        self.client.close()
        if _CURRENT is self:
            _CURRENT = None


@dataclasses.dataclass(frozen=True)
class _Request:
    name: str
    settings: RequestSettings
    #: The role of each position of its prompt (from its chat), or None.
    roles: NDArray[np.int8] | None = None


def _layer_hook(layer: int) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        hidden, residual = output
        delta = torch.ops.activation_guard.inspect(hidden, residual, layer)
        return hidden + delta, residual
    return hook


def attach(vllm_config: Any, model_runner: Any, version: str,
           settings: VllmGuardSettings | None = None) -> Attachment:
    """Check what this integration needs of vLLM (failing loudly otherwise), connect a
    client and install the hooks. Called from the worker's ``load_model``."""
    global _CURRENT
    settings = settings or VllmGuardSettings.from_env()
    check_vllm_version(version)
    if not hasattr(model_runner, "input_batch") or not hasattr(model_runner, "requests"):
        raise VllmSetupError(f"guard.vllm: model runner {type(model_runner).__name__} has no "
                             "input_batch (Model Runner V2?): set VLLM_USE_V2_MODEL_RUNNER=0")
    parallel = vllm_config.parallel_config
    if parallel.world_size != 1:
        raise VllmSetupError("guard.vllm supports one worker (no tensor or pipeline parallelism)")
    if str(parallel.distributed_executor_backend) not in ("uni", "None"):
        raise VllmSetupError("guard.vllm needs distributed_executor_backend='uni' (the worker "
                             "and the scheduler share a process), found "
                             f"{parallel.distributed_executor_backend!r}")
    scheduler_cls = vllm_config.scheduler_config.scheduler_cls
    if "guard.vllm" not in str(getattr(scheduler_cls, "__module__", scheduler_cls)):
        raise VllmSetupError("guard.vllm: set scheduler_cls='guard.vllm.scheduler.GuardScheduler'"
                             " (--scheduler-cls): without it the guard's ABORTs end nothing, "
                             f"found {scheduler_cls!r}")
    if vllm_config.cache_config.enable_prefix_caching and settings.prefix_caching == "refuse":
        raise VllmSetupError("guard.vllm: prefix caching is on: cached prompt rows are never "
                             "computed, so the guard would neither see nor steer them. Turn it "
                             "off (enable_prefix_caching=False, --no-enable-prefix-caching) or "
                             "set GUARD_VLLM_PREFIX_CACHING=allow (docs/vllm.md)")
    model = model_runner.get_model()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise VllmSetupError(f"guard.vllm: {type(model).__name__} has no model.layers")
    client = connect(settings, settings.hooks)
    hooks = _hooks(settings, client, len(layers), model_runner)
    attachment = Attachment(settings, model_runner, model, client, hooks)
    _CURRENT = attachment
    log.info("guard attached to vLLM", address=settings.address, mode=settings.mode,
             hooks=sorted(hooks.values()), deadline_ms=settings.deadline_ms)
    return attachment


def _hooks(settings: VllmGuardSettings, client: GuardClient, num_layers: int,
           model_runner: Any) -> dict[int, str]:
    names: Sequence[str] = settings.hooks
    if not names:
        try:
            served = client.describe()
        except Exception as exc:
            raise VllmSetupError(f"guard.vllm: GUARD_VLLM_HOOKS is not set and the guard at "
                                 f"{settings.address} did not answer Describe: {exc}") from exc
        names = [h for h in served.hooks if layer_of_or_none(h) is not None]
        if not names:
            raise VllmSetupError("guard.vllm: the guard serves no blocks.L.hook_resid_post hook")
    hooks = {layer_of(name): name for name in names}
    for layer, name in hooks.items():
        if layer >= num_layers:
            raise VllmSetupError(f"guard.vllm: {name}: the model has {num_layers} layers")
    return hooks


def connect(settings: VllmGuardSettings, hooks: Sequence[str]) -> GuardClient:
    """The worker's client of the guard (it connects on its first step)."""
    return GuardClient(settings.address, mode=settings.mode, hooks=hooks,
                       failure_policy=settings.failure_policy,
                       deadline_ms=settings.deadline_ms, queue_size=settings.queue_size,
                       host_name="vllm")


def layer_of_or_none(hook: str) -> int | None:
    try:
        return layer_of(hook)
    except VllmSetupError:
        return None


def attached() -> Attachment | None:
    return _CURRENT


__all__ = ["Attachment", "attach", "attached", "check_vllm_version", "connect", "inspect_op"]
