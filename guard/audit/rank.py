"""``guard features rank``: which SAE features tell a behaviour's prompts from benign ones.

Each prompt runs through the host model as the host SDK sends it (rendered by
:func:`guard.host.chat.render`, the chat template with a generation prompt, which also gives
each token's role; every position but 0, whose residual is an attention sink) and through the
guard's own encoder (:func:`guard.sae.open_sae`, ONNX Runtime), so the scores are the ones the
sidecar computes. Per prompt and feature the activations are reduced over the rows a detector
reads (the roles chosen, ``rows``: by default the user's words, not the template's markup)
twice, by ``max`` and by ``mean`` (the two reductions of the detectors plugin), and features
are ranked by how well the per-prompt max separates the classes: AUROC (rank-based, ties
counted half), then the difference of the class means. The firing rate is the share of a
class's prompts on which the feature is nonzero at some token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from numpy.typing import NDArray

from guard.decision import CONTENT_ROLES, RowRole, role_mask
from guard.errors import InvalidInput

if TYPE_CHECKING:
    from guard.sae import Sae

FloatArray = NDArray[np.float32]
#: Bump when the cache layout or what is computed changes.
_CACHE_FORMAT = "guard-audit/2"
#: Tokens per forward batch (padding included): bounds memory on long prompts.
_BATCH_TOKENS = 4096


@dataclasses.dataclass
class PromptActivations:
    """Per-prompt SAE features (and raw residuals) of one hook, for a list of prompts."""

    hook: str
    sae_sha256: str
    labels: NDArray[np.int64]
    """1 positive, 0 benign, per prompt."""
    max_acts: FloatArray
    """``[prompts, d_sae]``: each feature's maximum over the prompt's chosen rows."""
    mean_acts: FloatArray
    """``[prompts, d_sae]``: each feature's mean over the prompt's chosen rows."""
    resid_mean: FloatArray
    """``[prompts, d_in]``: the mean chosen residual row (for the linear-probe ceiling)."""
    prompt_tokens: NDArray[np.int64]
    """Tokens of the user's message (after truncation): the length used for buckets."""
    tokens: list[list[str]]
    """Each prompt's token strings at the rows encoded (positions 1...)."""
    offsets: NDArray[np.int64]
    """``[prompts + 1]``: prompt ``i``'s nonzero activations are ``offsets[i]:offsets[i+1]``."""
    nz_row: NDArray[np.int32]
    nz_feature: NDArray[np.int32]
    nz_value: FloatArray
    roles: NDArray[np.int8] | None = None
    """Every row's :class:`RowRole` value, prompt after prompt (prompt ``i``'s rows are
    ``row_offsets[i]:row_offsets[i+1]``); None: unlabelled (every row is read)."""
    token_ids: NDArray[np.int64] | None = None
    """Every row's token id, aligned with ``roles`` (None: unknown)."""
    rows: frozenset[RowRole] | None = CONTENT_ROLES
    """The roles whose rows ``max_acts``, ``mean_acts`` and ``resid_mean`` reduce (None:
    every row), as the detectors plugin's ``rows`` setting chooses them."""

    @property
    def row_offsets(self) -> NDArray[np.int64]:
        """``[prompts + 1]``: prompt ``i``'s rows are ``row_offsets[i]:row_offsets[i+1]``."""
        offsets: NDArray[np.int64] = np.r_[0, np.cumsum([len(t) for t in self.tokens])
                                           ].astype(np.int64)
        return offsets

    def roles_of(self, prompt: int) -> NDArray[np.int8] | None:
        """The role of each row of one prompt (None: unlabelled)."""
        if self.roles is None:
            return None
        offsets = self.row_offsets
        return self.roles[int(offsets[prompt]):int(offsets[prompt + 1])]

    def token_ids_of(self, prompt: int) -> NDArray[np.int64] | None:
        """The token id of each row of one prompt (None: unknown)."""
        if self.token_ids is None:
            return None
        offsets = self.row_offsets
        return self.token_ids[int(offsets[prompt]):int(offsets[prompt + 1])]

    @property
    def d_sae(self) -> int:
        return int(self.max_acts.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def feature_values(self, prompt: int, feature: int) -> FloatArray:
        """One feature's activation at every row of one prompt."""
        lo, hi = int(self.offsets[prompt]), int(self.offsets[prompt + 1])
        values = np.zeros(len(self.tokens[prompt]), dtype=np.float32)
        hit = self.nz_feature[lo:hi] == feature
        values[self.nz_row[lo:hi][hit]] = self.nz_value[lo:hi][hit]
        return values

    def rows_of(self, prompt: int) -> FloatArray:
        """Dense activations ``[rows, d_sae]`` of one prompt (what the sidecar encodes)."""
        lo, hi = int(self.offsets[prompt]), int(self.offsets[prompt + 1])
        dense = np.zeros((len(self.tokens[prompt]), self.d_sae), dtype=np.float32)
        dense[self.nz_row[lo:hi], self.nz_feature[lo:hi]] = self.nz_value[lo:hi]
        return dense

    def save(self, path: Path) -> None:
        arrays: dict[str, NDArray[Any]] = {
            "format": np.array(_CACHE_FORMAT),
            "meta": np.array(json.dumps({"hook": self.hook, "sae_sha256": self.sae_sha256,
                                         "tokens": self.tokens,
                                         "rows": role_names(self.rows)})),
        }
        for field in ("labels", "max_acts", "mean_acts", "resid_mean", "prompt_tokens",
                      "offsets", "nz_row", "nz_feature", "nz_value", "roles", "token_ids"):
            if getattr(self, field) is not None:
                arrays[field] = getattr(self, field)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as file:
            np.savez(file, allow_pickle=False, **arrays)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> PromptActivations:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != _CACHE_FORMAT:
                raise InvalidInput(f"{path}: format: expected {_CACHE_FORMAT!r}, "
                                   f"found {str(data['format'])!r}")
            meta = json.loads(str(data["meta"]))
            return cls(hook=meta["hook"], sae_sha256=meta["sae_sha256"], tokens=meta["tokens"],
                       labels=data["labels"], max_acts=data["max_acts"],
                       mean_acts=data["mean_acts"], resid_mean=data["resid_mean"],
                       prompt_tokens=data["prompt_tokens"], offsets=data["offsets"],
                       nz_row=data["nz_row"], nz_feature=data["nz_feature"],
                       nz_value=data["nz_value"],
                       roles=data["roles"] if "roles" in data.files else None,
                       token_ids=data["token_ids"] if "token_ids" in data.files else None,
                       rows=_roles_named(meta["rows"]))


# ---------------------------------------------------------------------------------------------
# Running prompts through the model and the SAE


class _Stop(Exception):
    """Raised by the hook once the layer ran: the rest of the model is not needed."""


def prompt_rows(
    tokenizer: Any, text: str, max_tokens: int | None
) -> tuple[list[int], NDArray[np.int8], int]:
    """(chat token ids as the host sends them, each token's role, tokens of the user's
    message): the prompt as a one-message conversation through
    :func:`guard.host.chat.render`, the path the host SDK and the demo take. The message is
    cut to ``max_tokens`` tokens first (then its rows are a prefix of what a host serving
    the whole message sends)."""
    from guard.host.chat import render

    content: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None and len(content) > max_tokens:
        content = content[:max_tokens]
        text = tokenizer.decode(content)
    ids, roles = render(tokenizer, [{"role": "user", "content": text}])
    return ids, roles, len(content)


def prompt_token_ids(
    tokenizer: Any, text: str, max_tokens: int | None
) -> tuple[list[int], int]:
    """(chat token ids as the host sends them, tokens of the user's message): see
    :func:`prompt_rows`."""
    ids, _roles, length = prompt_rows(tokenizer, text, max_tokens)
    return ids, length


@dataclasses.dataclass
class ResidualRows:
    """Residual rows of one layer for a list of prompts (all positions but 0)."""

    layer: int
    rows: FloatArray
    """``[total rows, d_model]``, prompt after prompt."""
    offsets: NDArray[np.int64]
    """``[prompts + 1]``: prompt ``i``'s rows are ``rows[offsets[i]:offsets[i+1]]``."""
    prompt_tokens: NDArray[np.int64]
    tokens: list[list[str]]
    roles: NDArray[np.int8]
    """``[total rows]``: each row's :class:`RowRole` value."""
    token_ids: NDArray[np.int64]
    """``[total rows]``: each row's token id."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as file:
            np.savez(file, allow_pickle=False, format=np.array(_CACHE_FORMAT),
                     meta=np.array(json.dumps({"layer": self.layer, "tokens": self.tokens})),
                     rows=self.rows, offsets=self.offsets, prompt_tokens=self.prompt_tokens,
                     roles=self.roles, token_ids=self.token_ids)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> ResidualRows:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != _CACHE_FORMAT:
                raise InvalidInput(f"{path}: format: expected {_CACHE_FORMAT!r}, "
                                   f"found {str(data['format'])!r}")
            meta = json.loads(str(data["meta"]))
            return cls(layer=meta["layer"], rows=data["rows"], offsets=data["offsets"],
                       prompt_tokens=data["prompt_tokens"], tokens=meta["tokens"],
                       roles=data["roles"], token_ids=data["token_ids"])


def residual_rows(
    texts: Sequence[str],
    model: Any,
    tokenizer: Any,
    layer: int,
    *,
    max_tokens: int | None = 256,
    progress: TextIO | None = None,
) -> ResidualRows:
    """Run every prompt (:func:`prompt_rows`: the chat template, message cut to
    ``max_tokens``) through ``model`` up to decoder layer ``layer`` and keep that layer's
    output at every position but 0, with each row's role and token id: the rows the host
    SDK sends for ``blocks.{layer}.hook_resid_post``. Prompts of similar lengths share a
    right-padded batch (padding does not change a causal model's rows)."""
    import torch

    from guard.host.attach import decoder_layers

    target = decoder_layers(model)[layer]
    rendered = [prompt_rows(tokenizer, t, max_tokens) for t in texts]
    encoded = [(ids, length) for ids, _roles, length in rendered]
    n = len(texts)
    per_prompt: list[FloatArray] = [np.zeros((0, 0), np.float32)] * n
    tokens: list[list[str]] = [[] for _ in range(n)]
    captured: list[Any] = []

    def stop(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    order = sorted(range(n), key=lambda i: -len(encoded[i][0]))
    started, done = time.monotonic(), 0
    handle = target.register_forward_hook(stop)
    try:
        for batch in _length_batches(order, [len(e[0]) for e in encoded]):
            width = len(encoded[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            captured.clear()
            with torch.no_grad(), suppress(_Stop):
                model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
                      use_cache=False)
            hidden = captured[0]
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                per_prompt[i] = hidden[row, 1 : len(seq)].float().numpy()
                tokens[i] = tokenizer.batch_decode([[t] for t in seq[1:]])
            done += len(batch)
            if progress is not None:
                rate = done / max(time.monotonic() - started, 1e-9)
                print(f"\r  ran {done}/{n} prompts ({rate:.1f}/s)", end="", file=progress,
                      flush=True)
    finally:
        handle.remove()
        if progress is not None and n:
            print(file=progress)
    counts = [len(r) for r in per_prompt]
    return ResidualRows(
        layer=layer,
        rows=np.ascontiguousarray(np.concatenate(per_prompt), dtype=np.float32) if n
        else np.zeros((0, 0), np.float32),
        offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        prompt_tokens=np.array([e[1] for e in encoded], dtype=np.int64),
        tokens=tokens,
        roles=np.concatenate([r[1][1:] for r in rendered]).astype(np.int8) if n
        else np.zeros(0, np.int8),
        token_ids=np.array([t for ids, _length in encoded for t in ids[1:]], dtype=np.int64),
    )


def encode_prompts(
    resid: ResidualRows, labels: Sequence[int], sae: Sae, *, hook: str | None = None,
    chunk_rows: int = 8192, rows: frozenset[RowRole] | None = CONTENT_ROLES,
) -> PromptActivations:
    """Encode every prompt's rows with the SAE's full encoder (ONNX Runtime, the sidecar's)
    and reduce them per prompt over the rows of the ``rows`` roles (None: every row), the
    rows a detector with that ``rows`` setting reads. A prompt with none of them reduces to
    zeros."""
    from guard.host.attach import layer_index

    hook_name = hook or sae.info.hook_name
    if layer_index(hook_name) != resid.layer:
        raise InvalidInput(f"hook {hook_name}: the rows are from layer {resid.layer}")
    encoder = sae.encoder(None)
    n, d_sae = len(resid.tokens), sae.info.d_sae
    max_acts = np.zeros((n, d_sae), dtype=np.float32)
    mean_acts = np.zeros((n, d_sae), dtype=np.float32)
    resid_mean = np.zeros((n, resid.rows.shape[1] if n else 0), dtype=np.float32)
    nz_row, nz_feature, nz_value, counts = [], [], [], []
    i = 0
    while i < n:  # whole prompts, about chunk_rows rows per encoder run
        j = i + 1
        while j < n and resid.offsets[j + 1] - resid.offsets[i] <= chunk_rows:
            j += 1
        lo = int(resid.offsets[i])
        acts = encoder.encode(np.ascontiguousarray(resid.rows[lo : int(resid.offsets[j])]))
        for k in range(i, j):
            a, b = int(resid.offsets[k]) - lo, int(resid.offsets[k + 1]) - lo
            prompt = acts[a:b]
            mask = role_mask(resid.roles[lo + a : lo + b], rows)
            read = prompt if mask is None else prompt[mask]
            raw = resid.rows[lo + a : lo + b]
            if len(read):
                max_acts[k], mean_acts[k] = read.max(axis=0), read.mean(axis=0)
                resid_mean[k] = (raw if mask is None else raw[mask]).mean(axis=0)
            r, f = np.nonzero(prompt)
            nz_row.append(r.astype(np.int32))
            nz_feature.append(f.astype(np.int32))
            nz_value.append(prompt[r, f])
            counts.append(len(r))
        i = j
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    return PromptActivations(
        hook=hook_name, sae_sha256=sae.info.sha256,
        labels=np.asarray(labels, dtype=np.int64), max_acts=max_acts, mean_acts=mean_acts,
        resid_mean=resid_mean, prompt_tokens=resid.prompt_tokens, tokens=resid.tokens,
        offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        nz_row=np.concatenate(nz_row) if nz_row else empty_i,
        nz_feature=np.concatenate(nz_feature) if nz_feature else empty_i,
        nz_value=np.concatenate(nz_value) if nz_value else empty_f,
        roles=resid.roles, token_ids=resid.token_ids, rows=rows,
    )


def collect_activations(
    texts: Sequence[str],
    labels: Sequence[int],
    model: Any,
    tokenizer: Any,
    sae: Sae,
    *,
    hook: str | None = None,
    max_tokens: int | None = 256,
    progress: TextIO | None = None,
    rows: frozenset[RowRole] | None = CONTENT_ROLES,
) -> PromptActivations:
    """:func:`residual_rows` at the SAE's layer, then :func:`encode_prompts`."""
    from guard.host.attach import layer_index

    layer = layer_index(hook or sae.info.hook_name)
    resid = residual_rows(texts, model, tokenizer, layer, max_tokens=max_tokens,
                          progress=progress)
    return encode_prompts(resid, labels, sae, hook=hook, rows=rows)


def _length_batches(order: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
    """Consecutive runs of ``order`` (longest first) of at most ``_BATCH_TOKENS`` padded
    tokens each."""
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= _BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def cached_activations(
    cache: Path | None,
    texts: Sequence[str],
    labels: Sequence[int],
    sae: Sae,
    model: Any,
    tokenizer: Any,
    *,
    hook: str | None,
    max_tokens: int | None,
    progress: TextIO | None = sys.stderr,
    rows: frozenset[RowRole] | None = CONTENT_ROLES,
) -> PromptActivations:
    """:func:`collect_activations`, with the residual rows (the slow part: the model) cached
    in ``cache`` under a key of the prompts, the model, the layer and the token budget, so
    that another SAE of the same layer, or another command, reuses them."""
    from guard.host.attach import layer_index

    layer = layer_index(hook or sae.info.hook_name)
    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT, list(texts), layer, max_tokens,
         str(getattr(model, "name_or_path", ""))]).encode()).hexdigest()[:24]
    path = cache / f"residuals-{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        if progress is not None:
            print(f"  residual rows from the cache: {path}", file=progress)
        resid = ResidualRows.load(path)
    else:
        started = time.monotonic()
        resid = residual_rows(texts, model, tokenizer, layer, max_tokens=max_tokens,
                              progress=progress)
        if progress is not None:
            print(f"  {len(texts)} prompts, {len(resid.rows)} rows through the model in "
                  f"{time.monotonic() - started:.0f} s", file=progress)
        if path is not None:
            resid.save(path)
    started = time.monotonic()
    acts = encode_prompts(resid, labels, sae, hook=hook, rows=rows)
    if progress is not None:
        print(f"  encoded {len(resid.rows)} rows with the SAE in "
              f"{time.monotonic() - started:.0f} s", file=progress)
    return acts


def parse_rows(text: str, option: str = "--rows") -> frozenset[RowRole] | None:
    """``all`` (None) or comma-separated role names (``user,generated``), as the detectors
    plugin's ``rows`` setting takes them; InvalidInput names ``option``."""
    if text.strip() == "all":
        return None
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = {r.name.lower(): r for r in RowRole if r is not RowRole.UNSPECIFIED}
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise InvalidInput(f"{option}: expected 'all' or comma-separated row roles "
                           f"({', '.join(known)}), found {text!r}")
    return frozenset(known[n] for n in names)


def role_names(rows: frozenset[RowRole] | None) -> list[str] | str:
    """A ``rows`` choice as the detectors plugin's config writes it."""
    return "all" if rows is None else [r.name.lower() for r in sorted(rows)]


def _roles_named(value: list[str] | str) -> frozenset[RowRole] | None:
    return None if value == "all" else frozenset(RowRole[n.upper()] for n in value)


# ---------------------------------------------------------------------------------------------
# Separation statistics


def auroc_columns(positive: NDArray[Any], benign: NDArray[Any]) -> NDArray[np.float64]:
    """AUROC of each column as a score for "positive": the probability that a random
    positive scores above a random benign row, ties counted half (Mann-Whitney U over
    average ranks). ``positive`` is ``[p, k]``, ``benign`` ``[q, k]``."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(benign, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise InvalidInput(f"auroc: expected [p, k] and [q, k] arrays, found {pos.shape} and "
                           f"{neg.shape}")
    p, q = pos.shape[0], neg.shape[0]
    if p == 0 or q == 0:
        raise InvalidInput(f"auroc: expected both classes, found {p} positive and {q} benign")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise InvalidInput("auroc: scores must be finite (found NaN or Inf)")
    result = np.empty(pos.shape[1], dtype=np.float64)
    step = max(1, 2_000_000 // (p + q))
    for lo in range(0, pos.shape[1], step):
        x = np.concatenate([pos[:, lo : lo + step], neg[:, lo : lo + step]])
        ranks = _average_ranks(x)
        result[lo : lo + step] = (ranks[:p].sum(axis=0) - p * (p + 1) / 2) / (p * q)
    return result


def _average_ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks down each column, tied values sharing their average rank."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    ordered = np.take_along_axis(x, order, axis=0)
    index = np.broadcast_to(np.arange(n)[:, None], x.shape)
    first = np.ones(x.shape, dtype=np.bool_)
    first[1:] = ordered[1:] != ordered[:-1]
    last = np.ones(x.shape, dtype=np.bool_)
    last[:-1] = ordered[:-1] != ordered[1:]
    start = np.maximum.accumulate(np.where(first, index, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, index, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks


def auroc(positive: Sequence[float] | NDArray[Any], benign: Sequence[float] | NDArray[Any],
          ) -> float:
    """AUROC of one score (see :func:`auroc_columns`)."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1, 1)
    neg = np.asarray(benign, dtype=np.float64).reshape(-1, 1)
    return float(auroc_columns(pos, neg)[0])


@dataclasses.dataclass(frozen=True)
class FeatureRank:
    """How well one feature separates the classes (per-prompt statistics)."""

    feature: int
    auroc: float
    """AUROC of the per-prompt max (the ranking key)."""
    auroc_mean: float
    """AUROC of the per-prompt mean."""
    mean_difference: float
    """Mean per-prompt max over positives minus that over benign prompts."""
    mean_positive: float
    mean_benign: float
    fire_rate_positive: float
    """Share of positive prompts on which the feature is nonzero at some token."""
    fire_rate_benign: float
    label: str = ""


def rank_features(
    max_acts: NDArray[Any],
    mean_acts: NDArray[Any],
    labels: NDArray[np.int64],
    *,
    feature_labels: Mapping[int, str] | None = None,
    top: int | None = None,
) -> list[FeatureRank]:
    """Features ordered by AUROC of the per-prompt max (best first), then by the difference
    of the class means."""
    positive, benign = labels == 1, labels == 0
    auc_max = auroc_columns(max_acts[positive], max_acts[benign])
    auc_mean = auroc_columns(mean_acts[positive], mean_acts[benign])
    mean_pos = max_acts[positive].mean(axis=0, dtype=np.float64)
    mean_neg = max_acts[benign].mean(axis=0, dtype=np.float64)
    fire_pos = (max_acts[positive] > 0).mean(axis=0)
    fire_neg = (max_acts[benign] > 0).mean(axis=0)
    difference = mean_pos - mean_neg
    order = np.lexsort((-difference, -auc_max))
    if top is not None:
        order = order[:top]
    names = feature_labels or {}
    return [
        FeatureRank(int(f), float(auc_max[f]), float(auc_mean[f]), float(difference[f]),
                    float(mean_pos[f]), float(mean_neg[f]), float(fire_pos[f]),
                    float(fire_neg[f]), names.get(int(f), ""))
        for f in order
    ]


# ---------------------------------------------------------------------------------------------
# Top-activating examples


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt on which a feature fires strongly, with the feature's value at each token."""

    prompt: int
    label: int
    peak: float
    peak_row: int
    tokens: list[str]
    values: FloatArray


def top_examples(
    acts: PromptActivations, feature: int, *, count: int = 5, label: int | None = None
) -> list[Example]:
    """The prompts (of one class, or both) with the feature's largest per-prompt max."""
    column = acts.max_acts[:, feature]
    candidates = np.flatnonzero(column > 0)
    if label is not None:
        candidates = candidates[acts.labels[candidates] == label]
    best = candidates[np.argsort(-column[candidates], kind="stable")[:count]]
    examples = []
    for i in best:
        values = acts.feature_values(int(i), feature)
        peak_row = int(np.argmax(values))
        examples.append(Example(int(i), int(acts.labels[i]), float(values[peak_row]), peak_row,
                                acts.tokens[int(i)], values))
    return examples


def marked_text(example: Example, *, before: int = 12, after: int = 4) -> str:
    """The tokens around the peak, each token where the feature fires as «token»."""
    lo = max(0, example.peak_row - before)
    hi = min(len(example.tokens), example.peak_row + after + 1)
    parts = [f"«{t}»" if v > 0 else t
             for t, v in zip(example.tokens[lo:hi], example.values[lo:hi], strict=True)]
    text = "".join(parts).replace("\n", "⏎")
    return ("…" if lo > 0 else "") + text + ("…" if hi < len(example.tokens) else "")


def format_ranking(
    ranks: Sequence[FeatureRank], acts: PromptActivations, *, examples: int = 3,
    width: int = 100,
) -> str:
    """A terminal table: one line per feature, then its top positive and benign examples."""
    lines = [f"{'rank':>4} {'feature':>7} {'AUROC':>6} {'AUROCμ':>6} {'Δmean':>7} "
             f"{'fire+':>6} {'fire-':>6}  label"]
    for n, r in enumerate(ranks, 1):
        lines.append(f"{n:>4} {r.feature:>7} {r.auroc:6.3f} {r.auroc_mean:6.3f} "
                     f"{r.mean_difference:7.3f} {r.fire_rate_positive:6.1%} "
                     f"{r.fire_rate_benign:6.1%}  {r.label}")
        for label, sign in ((1, "+"), (0, "-")):
            for ex in top_examples(acts, r.feature, count=examples if label else 1,
                                   label=label):
                text = marked_text(ex)
                lines.append(f"{'':>12}{sign} {ex.peak:6.2f}  {_clip(text, width - 22)}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Feature labels


_INDEX_KEYS = ("index", "feature", "featureIndex", "feature_index", "id")
_LABEL_KEYS = ("description", "label", "explanation", "name")


def load_labels(path: Path | Sequence[Path], d_sae: int | None = None, *,
                neuronpedia_id: str | None = None) -> dict[int, str]:
    """Feature labels from a JSON file: a mapping (``{"12": "deception"}``, the form
    ``guard sae export --labels`` reads) or a Neuronpedia-style export (a list of objects
    with ``index``/``feature`` and ``description``/``label``, or with an ``explanations``
    list whose first ``description`` is taken). The first label of a feature wins.

    Neuronpedia's bulk explanation exports (``.jsonl``/``.jsonl.gz`` files, several, or
    folders of them) are read by :func:`guard.sae.labels.read_neuronpedia`, kept for
    ``neuronpedia_id`` (``model/<layer>-<set>``; None: the one source the records name)."""
    from guard.sae.labels import is_neuronpedia_export, read_neuronpedia

    paths = [path] if isinstance(path, Path) else list(path)
    if len(paths) != 1 or is_neuronpedia_export(paths[0]):
        return read_neuronpedia(paths, d_sae, neuronpedia_id=neuronpedia_id).labels
    path = paths[0]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the labels file: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path}: not valid JSON: {e}") from e
    pairs: list[tuple[str, object, object]] = []
    if isinstance(raw, dict):
        pairs = [(f"{path}: key {k!r}", k, v) for k, v in raw.items()]
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise InvalidInput(f"{path}[{i}]: expected an object, found {item!r:.60}")
            index = next((item[k] for k in _INDEX_KEYS if k in item), None)
            label = next((item[k] for k in _LABEL_KEYS if isinstance(item.get(k), str)), None)
            explanations = item.get("explanations")
            if label is None and isinstance(explanations, list) and explanations:
                first = explanations[0]
                label = first.get("description") if isinstance(first, dict) else None
            pairs.append((f"{path}[{i}]", index, label))
    else:
        raise InvalidInput(f"{path}: expected a JSON object or list, found "
                           f"{type(raw).__name__}")
    labels: dict[int, str] = {}
    for where, index, label in pairs:
        try:
            feature = int(str(index))
        except ValueError:
            raise InvalidInput(f"{where}: expected a feature id (one of "
                               f"{', '.join(_INDEX_KEYS)}), found {index!r}") from None
        if feature < 0 or (d_sae is not None and feature >= d_sae):
            raise InvalidInput(f"{where}: expected a feature id in [0, {d_sae}), "
                               f"found {feature}")
        if not isinstance(label, str):
            raise InvalidInput(f"{where}: expected a string label (one of "
                               f"{', '.join(_LABEL_KEYS)}), found {label!r}")
        labels.setdefault(feature, label)
    return labels


def write_labels(path: Path, labels: Mapping[int, str]) -> None:
    """Write labels in the mapping form that ``guard sae export --labels`` reads."""
    path.write_text(json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=2) + "\n",
                    encoding="utf-8")
