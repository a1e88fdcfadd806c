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
SmolLM2 and it carries no content of the request (``skip_positions``). ``detach()`` restores
the model exactly.

Batches of several sequences (``[batch, seq, hidden]``, padded left or right, with the
attention mask that ``generate`` and the tokenizer give) go to the guard as one step per
layer (``inspect_step``): only the real tokens' rows, one segment per sequence with its own
request id (:meth:`Attachment.requests` names them per batch row; by default each new
generation gets fresh ids), with positions counted from each sequence's first real token.
Each request's verdict applies to its own sequence: a STEER delta goes onto that sequence's
rows, and an ABORT stops only that sequence. Its verdict is kept in
:attr:`Attachment.aborted_requests`, its rows are no longer sent, the guard is told the
request ended (``end_requests``, when the client has it), and the stopping criterion from
:meth:`Attachment.stopping_criteria` finishes that sequence after the current step while the
others go on. ``GuardAbort`` is raised (``on_abort="raise"``) only once every sequence of the
batch is aborted. A batch of one sequence is sent exactly as before (``inspect``).

Row roles: when the caller says what the prompt's tokens are (``request(..., roles=...)``,
``requests(..., roles=[...])``, one role per token position as :func:`guard.host.chat.render`
gives them with the token ids), each batch carries each row's role: the prompt's rows the
given roles, the generated tokens' rows :attr:`RowRole.GENERATED`, and prompt rows past the
given roles :attr:`RowRole.UNSPECIFIED`. Without roles, batches carry none (detectors then
read every row), as before.

Prompt completeness: a prompt always reaches the guard whole, in one batch (or one segment of
a step), so its batch says ``prompt_complete=True`` (detectors that average the prompt decide
on it). A client whose ``inspect`` takes no ``prompt_complete`` argument is sent none.
"""

from __future__ import annotations

import inspect
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

from guard.decision import Action, RowRole
from guard.host import Segment, StepVerdict, Verdict
from guard.host._batch import Roles, role_values
from guard.host.tracing import generation_span

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

log = structlog.get_logger("guard.host")

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class InspectClient(Protocol):
    """What :func:`attach` needs of a client (``guard.host.GuardClient`` has it). Batches of
    several sequences need :class:`StepClient`'s ``inspect_step`` too."""

    def inspect(
        self, request_id: str, hook: str, rows: NDArray[np.floating], positions: Sequence[int],
        token_ids: Sequence[int] | None = None, phase: Any = "prompt",
        attributes: Any = None, *, deadline_ms: float | None = None,
    ) -> Verdict: ...

    def describe(self, timeout: float = 5.0) -> Any: ...


class StepClient(InspectClient, Protocol):
    """A client that also sends engine steps (batches of several sequences). ``end_requests``
    (``GuardClient`` has it) is used when the client has it."""

    def inspect_step(
        self, hook: str, rows: NDArray[np.floating], segments: Sequence[Segment],
        positions: Sequence[int], token_ids: Sequence[int] | None = None,
        attributes: Any = None, *, deadline_ms: float | None = None,
    ) -> StepVerdict: ...


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
    input_ids: Any = None  # the current forward pass's input ids, [B, T]
    attention_mask: Any = None  # the current forward pass's 2-D attention mask, [B, past + T]
    #: A batch of several sequences: the request id of each batch row (given by
    #: :meth:`Attachment.requests`, or derived), and those the guard was not yet told ended.
    request_ids: tuple[str, ...] = ()
    open_ids: list[str] = field(default_factory=list)
    #: Forward passes of the model so far, and the one whose (fresh) start set the ids: a
    #: pass reaches every hooked layer, and only its first may start new requests.
    passes: int = 0
    started_at: int = -1
    #: Per batch row (one for a single sequence): the role of each token position of its
    #: prompt, when the caller gave them.
    roles: tuple[NDArray[np.int8] | None, ...] = ()


@dataclass
class Attachment:
    """Hooks on a model; :meth:`detach` removes them. Use as a context manager."""

    model: Any
    client: InspectClient
    hooks: tuple[str, ...]
    on_abort: Literal["raise", "stop"]
    skip_positions: int
    verdicts: list[Verdict] = field(default_factory=list)
    #: The ABORT verdict that stopped the current request, if any (for a batch of several
    #: sequences: set once every sequence of the batch is aborted).
    aborted: Verdict | None = None
    #: The ABORT verdict of each request of the current generation that the guard (or the
    #: failure policy) stopped, by request id: for a batch, each sequence's own.
    aborted_requests: dict[str, Verdict] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _state: _RequestState = field(default_factory=lambda: _RequestState("", False))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    keep_verdicts: int = 1024
    _paused: bool = False
    #: Whether the client's ``inspect`` takes ``prompt_complete`` (GuardClient's does).
    _says_complete: bool = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model inside the block as if no guard were attached (for comparisons)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def request(self, request_id: str | None = None, *,
                roles: Roles | None = None) -> Iterator[str]:
        """Label the forward passes inside the block with one request id, inside one
        ``guard.host.generation`` span (a child of the current span; each inspected batch's
        ``guard.host.inspect`` span is its child; see :mod:`guard.host.tracing`). The rows of
        a batch of several sequences are then requests ``<id>/0``, ``<id>/1``... (see
        :meth:`requests`).

        ``roles``: the role of each token position of the prompt the block runs (position 0
        first), e.g. ``guard.host.chat.render(tokenizer, messages).roles``; the client must
        then take ``roles=`` (``GuardClient`` does)."""
        rid = request_id or uuid.uuid4().hex
        known = () if roles is None else (_prompt_roles("roles", roles),)
        with self._labelled(_RequestState(rid, explicit=True, roles=known), rid):
            yield rid

    @contextmanager
    def requests(self, request_ids: Sequence[str], *,
                 roles: Sequence[Roles | None] | None = None) -> Iterator[tuple[str, ...]]:
        """Label the forward passes of a batch inside the block: row ``b`` of the batch is
        request ``request_ids[b]`` (one ``guard.host.generation`` span with the ids in
        ``guard.request_ids``). On leaving the block the guard is told that the requests
        not aborted finished (``end_requests``). A batch of another size inside the block
        raises ValueError. ``roles``: per batch row, the roles of its prompt's token
        positions (counted from its first real token, as :meth:`request` takes them), or
        None for a row whose roles are unknown."""
        if isinstance(request_ids, str) or not isinstance(request_ids, Sequence):
            raise TypeError(f"request_ids: expected a sequence of request ids, one per batch "
                            f"row, found {request_ids!r}")
        ids = tuple(request_ids)
        if not ids or not all(isinstance(r, str) and r for r in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"request_ids: expected distinct non-empty strings, one per batch "
                             f"row, found {ids!r}")
        known: tuple[NDArray[np.int8] | None, ...] = ()
        if roles is not None:
            if isinstance(roles, str) or not isinstance(roles, Sequence) or len(roles) != len(ids):
                raise ValueError(f"roles: expected one entry per batch row ({len(ids)}): the "
                                 "roles of its prompt's positions, or None")
            known = tuple(None if r is None else _prompt_roles(f"roles[{b}]", r)
                          for b, r in enumerate(roles))
        state = _RequestState(ids[0] if len(ids) == 1 else "", explicit=True, request_ids=ids,
                              roles=known)
        with self._labelled(state, ids):
            yield ids

    @contextmanager
    def _labelled(self, state: _RequestState, label: str | tuple[str, ...]) -> Iterator[None]:
        previous = self._state
        self._state = state
        self.aborted = None
        self.aborted_requests = {}
        try:
            with generation_span(label, model=getattr(getattr(self.model, "config", None),
                                                      "name_or_path", None)) as span:
                try:
                    yield
                except GuardAbort:  # a decision, not a fault: the span status stays unset
                    raise
                except BaseException as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    raise
                finally:
                    self._record_abort(span)
        finally:
            self._end_open(state, "finished")
            self._state = previous

    def _record_abort(self, span: Any) -> None:
        """Put the ABORT that stopped the generation (if any) on its span."""
        aborted = self.aborted
        if aborted is not None and span.is_recording():
            span.set_attributes({"guard.decision.action": "abort",
                                 "guard.decision.id": aborted.decision_id,
                                 "guard.verdict.source": aborted.source})

    def stopping_criteria(self) -> Any:
        """A transformers StoppingCriteriaList that stops when the guard aborted: for a batch
        of several sequences, each sequence whose own request was aborted (the others go
        on)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        attachment = self

        class _GuardStop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                ids = attachment._state.request_ids
                if input_ids.shape[0] > 1 and len(ids) == input_ids.shape[0]:
                    aborted = attachment.aborted_requests
                    return torch.tensor([rid in aborted for rid in ids], dtype=torch.bool,
                                        device=input_ids.device)
                stop = attachment.aborted is not None
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        return StoppingCriteriaList([_GuardStop()])

    def detach(self) -> None:
        """Remove every hook: the model computes exactly as before :func:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._end_open(self._state, "finished")

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
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        state = self._state
        state.input_ids = input_ids
        state.attention_mask = mask
        state.passes += 1

    def _layer_hook(self, hook: str) -> Callable[..., Any]:
        def on_output(_module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any],
                      output: Any) -> Any:
            if self._paused:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            position_ids = kwargs.get("position_ids")
            if hidden.shape[0] != 1:
                self._on_batch(hook, hidden, position_ids)
                return output
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
            sent = [positions[i] for i in keep]
            extra: dict[str, Any] = {}
            if state.roles and state.roles[0] is not None:
                extra["roles"] = _row_roles(state.roles[0], sent, phase == "generation")
            if phase == "prompt" and self._says_complete:
                extra["prompt_complete"] = True  # the prompt's rows all come in this pass
            verdict = self.client.inspect(
                state.request_id, hook, rows, sent, token_ids, phase, **extra
            )
            with self._lock:
                self.verdicts.append(verdict)
                del self.verdicts[:-self.keep_verdicts]
            if verdict.action == Action.ABORT:
                self.aborted = verdict
                self.aborted_requests[verdict.request_id] = verdict
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

    # -- batches of several sequences ------------------------------------------------------

    def _on_batch(self, hook: str, hidden: torch.Tensor, position_ids: Any) -> None:
        """One forward pass of a batch at ``hook``: its real, new rows as one step, each
        request's verdict applied to its own sequence (in place)."""
        import torch

        inspect_step = getattr(self.client, "inspect_step", None)
        if inspect_step is None:
            raise TypeError(f"{hook}: a batch of {hidden.shape[0]} sequences needs a client "
                            "with inspect_step (guard.host.GuardClient has it)")
        rows_of, length = int(hidden.shape[0]), int(hidden.shape[1])
        state = self._state
        real, positions, fresh = _batch_layout(state.attention_mask, position_ids, rows_of,
                                               length, hidden.device)
        ids = self._batch_ids(state, rows_of, fresh, hook)
        aborted = self.aborted_requests
        keep = real & (positions >= self.skip_positions)
        if aborted:
            live = torch.tensor([rid not in aborted for rid in ids], device=hidden.device)
            keep &= live[:, None]
        batch_index, step_index = keep.nonzero(as_tuple=True)
        if batch_index.numel() == 0:
            return
        counts = keep.sum(dim=1).tolist()
        first = torch.where(real, positions, positions.new_full((), 2**62)).min(dim=1).values
        segments = [Segment(ids[b], int(n), "prompt", prompt_complete=True)
                    if length > 1 or int(first[b]) == 0 else Segment(ids[b], int(n), "generation")
                    for b, n in enumerate(counts) if n]
        # Select the rows on the device first, then copy only those to the host.
        rows = hidden[batch_index, step_index].detach().float().cpu().numpy()
        token_ids = None
        input_ids = state.input_ids
        if input_ids is not None and tuple(input_ids.shape) == (rows_of, length):
            token_ids = input_ids[batch_index, step_index].tolist()
        sent = positions[batch_index, step_index].tolist()
        extra: dict[str, Any] = {}
        if any(r is not None for r in state.roles):
            extra["roles"] = self._step_roles(state, segments, [b for b, n in enumerate(counts)
                                                                 if n], sent)
        step: StepVerdict = inspect_step(hook, rows, segments, sent, token_ids, **extra)
        with self._lock:
            self.verdicts.extend(step.verdicts)
            del self.verdicts[:-self.keep_verdicts]
        steered = np.zeros(len(rows), dtype=bool)
        start = 0
        newly: list[str] = []
        for segment, verdict in zip(segments, step.verdicts, strict=True):
            if verdict.action == Action.STEER:
                steered[start:start + segment.rows] = True
            elif verdict.action == Action.ABORT and segment.request_id not in aborted:
                aborted[segment.request_id] = verdict
                newly.append(segment.request_id)
                log.info("generation aborted", hook=hook, request_id=segment.request_id,
                         decision_id=verdict.decision_id, source=verdict.source)
            start += segment.rows
        delta = step.steering.get(hook)
        if delta is not None and steered.any():
            where = torch.from_numpy(steered).to(hidden.device)
            update = torch.tensor(delta[steered], dtype=hidden.dtype, device=hidden.device)
            with torch.no_grad():
                hidden[batch_index[where], step_index[where]] += update
        if newly:
            self._end_requests(state, newly, "aborted")
        if newly and all(rid in aborted for rid in ids):  # nothing of the batch is left
            self.aborted = aborted[newly[-1]]
            if self.on_abort == "raise":
                raise GuardAbort(self.aborted, hook)

    @staticmethod
    def _step_roles(state: _RequestState, segments: Sequence[Segment], rows_of: Sequence[int],
                    positions: Sequence[int]) -> NDArray[np.int8]:
        """The role of every row of a step: each segment's (batch row ``rows_of[i]``'s) rows
        from its prompt's roles, or unspecified when they are unknown."""
        parts = []
        start = 0
        for segment, b in zip(segments, rows_of, strict=True):
            known = state.roles[b] if b < len(state.roles) else None
            own = positions[start:start + segment.rows]
            parts.append(_row_roles(known, own, segment.phase == "generation"))
            start += segment.rows
        return np.concatenate(parts)

    def _batch_ids(self, state: _RequestState, rows_of: int, fresh: bool,
                   hook: str) -> tuple[str, ...]:
        """The request id of each batch row: the caller's (:meth:`requests`), derived from
        :meth:`request`'s id, or fresh ids for each new generation."""
        starts = fresh and state.started_at != state.passes  # once per forward pass
        if state.explicit:
            if not state.request_ids:
                state.request_ids = tuple(f"{state.request_id}/{b}" for b in range(rows_of))
            if len(state.request_ids) != rows_of:
                raise ValueError(f"{hook}: a batch of {rows_of} sequences, but "
                                 f"{len(state.request_ids)} request ids were given to "
                                 "Attachment.requests")
            if starts:
                self._start_batch(state)
            return state.request_ids
        if starts or len(state.request_ids) != rows_of:  # a new generation: new requests
            self._end_open(state, "finished")
            state.request_ids = tuple(uuid.uuid4().hex for _ in range(rows_of))
            self._start_batch(state)
        return state.request_ids

    def _start_batch(self, state: _RequestState) -> None:
        """A new generation of the batch's requests: nothing aborted yet."""
        state.started_at = state.passes
        self.aborted = None
        self.aborted_requests = {}
        state.open_ids = list(state.request_ids)

    def _end_open(self, state: _RequestState, reason: str) -> None:
        """Tell the guard the batch's requests it was not told about yet are over."""
        if state.open_ids:
            self._end_requests(state, list(state.open_ids), reason)

    def _end_requests(self, state: _RequestState, request_ids: list[str], reason: str) -> None:
        for rid in request_ids:
            if rid in state.open_ids:
                state.open_ids.remove(rid)
        end = getattr(self.client, "end_requests", None)
        if end is None or not request_ids:
            return
        try:
            end(request_ids, reason)
        except Exception as exc:  # the guard frees them anyway when the stream ends
            log.warning("end_requests failed", reason=str(exc), requests=len(request_ids))


def _prompt_roles(name: str, roles: Roles) -> NDArray[np.int8]:
    """A prompt's roles (one per token position) as int8; errors name the argument."""
    return np.array(role_values(name, roles, len(roles)), dtype=np.int8)


def _row_roles(known: NDArray[np.int8] | None, positions: Sequence[int],
               generation: bool) -> NDArray[np.int8]:
    """The role of the rows at ``positions``: the prompt's role at each position it has one
    for; past the prompt, GENERATED for generated tokens, else UNSPECIFIED."""
    at = np.asarray(positions, dtype=np.int64)
    out = np.full(len(at), RowRole.GENERATED if generation else RowRole.UNSPECIFIED,
                  dtype=np.int8)
    if known is not None:
        inside = (at >= 0) & (at < len(known))
        out[inside] = known[at[inside]]
    return out


def _batch_layout(mask: Any, position_ids: Any, rows_of: int, length: int, device: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Which of a batch pass's ``[rows_of, length]`` tokens are real (not padding), their
    positions in their own sequences, and whether the pass starts new sequences (no cache).

    With a 2-D attention mask ``[rows_of, past + length]`` (what ``generate`` and the
    tokenizer give, padded left or right), a token is real where the mask is 1 and its
    position counts the real tokens before it. Without one every token is real and the
    layer's ``position_ids`` give the positions.
    """
    import torch

    if (mask is not None and getattr(mask, "ndim", 0) == 2
            and tuple(mask.shape[:1]) == (rows_of,) and mask.shape[1] >= length):
        mask = mask.to(device=device)
        real = mask[:, -length:] != 0
        positions = (mask.long().cumsum(dim=1) - 1)[:, -length:]
        return real, positions, int(mask.shape[1]) == length
    if position_ids is None:
        raise ValueError("the layer got no position_ids and the model no attention mask; "
                         "cannot label rows")
    positions = position_ids.to(device=device).long().expand(rows_of, length)
    real = torch.ones((rows_of, length), dtype=torch.bool, device=device)
    return real, positions, int(positions.min()) == 0


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
                            skip_positions=skip_positions,
                            _says_complete=_takes(client.inspect, "prompt_complete"))
    base = getattr(model, "model", model)
    attachment._handles.append(
        base.register_forward_pre_hook(attachment._on_model_input, with_kwargs=True))
    for hook, index in indices.items():
        attachment._handles.append(
            layers[index].register_forward_hook(attachment._layer_hook(hook), with_kwargs=True))
    return attachment


def _takes(function: Callable[..., Any], argument: str) -> bool:
    """Whether ``function`` accepts the keyword ``argument`` (or any keyword)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in parameters)


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
