"""Attach a guard to a transformers model: forward hooks that send residual rows and apply
the verdicts.

``blocks.L.hook_resid_post`` (SAELens naming) is the output of decoder layer ``L``. At each
forward pass only the new rows are sent: the prompt once (phase ``prompt``), then one row per
generated token (phase ``generation``), with their positions and token ids. It works with
``model.generate`` and the KV cache. A STEER verdict's residual delta is added to the layer's
output in place before the next layer runs. An ABORT verdict stops generation, in one of two
documented ways (``on_abort``):

- ``"raise"`` (default): :class:`GuardAbort` is raised from the forward pass; ``generate``
  stops at once and the caller catches it (it carries the decision id and the reason);
- ``"stop"``: the forward pass finishes, and the stopping criterion from
  :meth:`Attachment.stopping_criteria` ends generation after the current step.

Position 0 (BOS) is not sent by default: its residual norm is about 100x the others' in
SmolLM2 and it carries no content of the request (``skip_positions``). One sequence per
forward pass (batch size 1) is supported; ``detach()`` restores the model exactly.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import structlog
from opentelemetry.trace import Status, StatusCode

from guard.decision import Action
from guard.host import Verdict
from guard.host.tracing import generation_span

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

log = structlog.get_logger("guard.host")

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class InspectClient(Protocol):
    """What :func:`attach` needs of a client (``guard.host.GuardClient`` has it)."""

    def inspect(
        self, request_id: str, hook: str, rows: NDArray[np.floating], positions: Sequence[int],
        token_ids: Sequence[int] | None = None, phase: Any = "prompt",
        attributes: Any = None, *, deadline_ms: float | None = None,
    ) -> Verdict: ...

    def describe(self, timeout: float = 5.0) -> Any: ...


class GuardAbort(RuntimeError):
    """The guard answered ABORT: generation stopped. ``verdict`` has the decision id."""

    def __init__(self, verdict: Verdict, hook: str) -> None:
        self.verdict = verdict
        self.hook = hook
        self.decision_id = verdict.decision_id
        who = "the guard" if verdict.source == "guard" else f"the failure policy ({verdict.source})"
        super().__init__(
            f"generation stopped by {who} on {hook}, request {verdict.request_id!r}, "
            f"decision {verdict.decision_id or '-'}: {verdict.details or verdict.reason}"
        )


def layer_index(hook: str) -> int:
    """The decoder layer of a ``blocks.L.hook_resid_post`` hook name."""
    match = _HOOK.match(hook)
    if match is None:
        raise ValueError(f"hooks: expected names like blocks.12.hook_resid_post, found {hook!r}")
    return int(match.group(1))


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of a transformers causal LM (Llama, Mistral, Qwen, Gemma...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        target = model
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if target is not None:
            return list(target)
    raise TypeError(f"{type(model).__name__}: cannot find its decoder layers")


@dataclass
class _RequestState:
    request_id: str
    explicit: bool
    input_ids: Any = None  # the current forward pass's input ids, [1, T]


@dataclass
class Attachment:
    """Hooks on a model; :meth:`detach` removes them. Use as a context manager."""

    model: Any
    client: InspectClient
    hooks: tuple[str, ...]
    on_abort: Literal["raise", "stop"]
    skip_positions: int
    verdicts: list[Verdict] = field(default_factory=list)
    #: The ABORT verdict that stopped the current request, if any.
    aborted: Verdict | None = None
    _handles: list[Any] = field(default_factory=list)
    _state: _RequestState = field(default_factory=lambda: _RequestState("", False))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    keep_verdicts: int = 1024
    _paused: bool = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model inside the block as if no guard were attached (for comparisons)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def request(self, request_id: str | None = None) -> Iterator[str]:
        """Label the forward passes inside the block with one request id, inside one
        ``guard.host.generation`` span (a child of the current span; each inspected batch's
        ``guard.host.inspect`` span is its child; see :mod:`guard.host.tracing`)."""
        rid = request_id or uuid.uuid4().hex
        previous = self._state
        self._state = _RequestState(rid, explicit=True)
        self.aborted = None
        try:
            with generation_span(rid, model=getattr(getattr(self.model, "config", None),
                                                    "name_or_path", None)) as span:
                try:
                    yield rid
                except GuardAbort:  # a decision, not a fault: the span status stays unset
                    raise
                except BaseException as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    raise
                finally:
                    self._record_abort(span)
        finally:
            self._state = previous

    def _record_abort(self, span: Any) -> None:
        """Put the ABORT that stopped the generation (if any) on its span."""
        aborted = self.aborted
        if aborted is not None and span.is_recording():
            span.set_attributes({"guard.decision.action": "abort",
                                 "guard.decision.id": aborted.decision_id,
                                 "guard.verdict.source": aborted.source})

    def stopping_criteria(self) -> Any:
        """A transformers StoppingCriteriaList that stops when the guard aborted."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        attachment = self

        class _GuardStop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                stop = attachment.aborted is not None
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        return StoppingCriteriaList([_GuardStop()])

    def detach(self) -> None:
        """Remove every hook: the model computes exactly as before :func:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- the hooks -------------------------------------------------------------------------

    def _on_model_input(self, _module: Any, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        if self._paused:
            return
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        self._state.input_ids = input_ids

    def _layer_hook(self, hook: str) -> Callable[..., Any]:
        def on_output(_module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any],
                      output: Any) -> Any:
            if self._paused:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            position_ids = kwargs.get("position_ids")
            if hidden.shape[0] != 1:
                raise ValueError(
                    f"{hook}: guard.host.attach supports one sequence per forward pass, "
                    f"found a batch of {hidden.shape[0]}"
                )
            length = hidden.shape[1]
            if position_ids is None:
                raise ValueError(f"{hook}: the layer got no position_ids; cannot label rows")
            positions = position_ids[0].tolist()
            state = self._state
            if positions[0] == 0 and not state.explicit:
                state.request_id = uuid.uuid4().hex  # a new sequence: a new request
                self.aborted = None
            keep = [i for i, p in enumerate(positions) if p >= self.skip_positions]
            if not keep:
                return output
            phase = "prompt" if positions[0] == 0 or length > 1 else "generation"
            index = keep if len(keep) != length else slice(None)
            # Select the rows on the device first, then copy only those to the host.
            rows = hidden[0, index].detach().float().cpu().numpy()
            token_ids = None
            if state.input_ids is not None and state.input_ids.shape[-1] == length:
                token_ids = state.input_ids[0, index].tolist()
            verdict = self.client.inspect(
                state.request_id, hook, rows, [positions[i] for i in keep], token_ids, phase
            )
            with self._lock:
                self.verdicts.append(verdict)
                del self.verdicts[:-self.keep_verdicts]
            if verdict.action == Action.ABORT:
                self.aborted = verdict
                log.info("generation aborted", hook=hook, request_id=state.request_id,
                         decision_id=verdict.decision_id, source=verdict.source)
                if self.on_abort == "raise":
                    raise GuardAbort(verdict, hook)
                return output
            delta = verdict.steering.get(hook)
            if verdict.action == Action.STEER and delta is not None:
                _add_delta(hidden, index, delta)
            return output

        return on_output


def _add_delta(hidden: torch.Tensor, index: Any, delta: NDArray[np.float32]) -> None:
    import torch

    update = torch.tensor(delta, dtype=hidden.dtype, device=hidden.device)  # a copy
    with torch.no_grad():
        hidden[0, index] += update


def attach(
    model: Any,
    client: InspectClient,
    hooks: Sequence[str],
    *,
    on_abort: Literal["raise", "stop"] = "raise",
    skip_positions: int = 1,
    check: bool = True,
) -> Attachment:
    """Register forward hooks on the decoder layers named by ``hooks``.

    :param check: ask the guard (Describe) that it serves each hook with the model's width;
        a mismatch raises ValueError naming the hook and both widths. When the guard cannot
        be reached the check is skipped (the first batch then meets the failure policy).
    """
    if not hooks:
        raise ValueError("hooks: expected at least one hook such as blocks.12.hook_resid_post")
    layers = decoder_layers(model)
    indices = {hook: layer_index(hook) for hook in hooks}
    for hook, index in indices.items():
        if index >= len(layers):
            raise ValueError(f"{hook}: the model has {len(layers)} decoder layers "
                             f"(0 to {len(layers) - 1})")
    if check:
        _check_widths(model, client, hooks)
    attachment = Attachment(model=model, client=client, hooks=tuple(hooks), on_abort=on_abort,
                            skip_positions=skip_positions)
    base = getattr(model, "model", model)
    attachment._handles.append(
        base.register_forward_pre_hook(attachment._on_model_input, with_kwargs=True))
    for hook, index in indices.items():
        attachment._handles.append(
            layers[index].register_forward_hook(attachment._layer_hook(hook), with_kwargs=True))
    return attachment


def _check_widths(model: Any, client: InspectClient, hooks: Sequence[str]) -> None:
    import grpc

    width = int(getattr(model.config, "hidden_size", 0))
    try:
        described = client.describe(timeout=5.0)
    except grpc.RpcError as exc:
        log.warning("guard not reachable at attach; width check skipped", reason=str(exc))
        return
    served = {sae.hook: int(sae.d_in) for sae in described.saes}
    for hook in hooks:
        if hook not in served:
            raise ValueError(f"{hook}: the guard does not serve this hook; it serves "
                             f"{', '.join(sorted(served)) or 'none'}")
        if served[hook] != width:
            raise ValueError(f"{hook}: the guard's SAE expects d_in {served[hook]}, "
                             f"the model's residual width is {width}")
