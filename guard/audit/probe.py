"""Raw-activation probes: a logistic probe on the residual rows a detector reads, pooled per
request as the ``probe`` detector pools them, and evaluation by whole held-out sources.

The probe scores each row ``weights . row + bias`` (standardisation folded into the weights)
and pools the scores of the rows its ``rows`` setting chooses (:func:`pool`):

- ``mean``: the mean row score, which is the logit of the mean row: the probe is fitted as a
  logistic regression on each prompt's mean chosen row, so for ``mean`` the fitted logit is
  exactly the served score;
- ``max``: the highest row score;
- ``rolling_max``: the highest mean over ``window`` consecutive rows (the mean of all rows
  when there are fewer than ``window``): a spike on one token is not enough.

For ``max`` and ``rolling_max`` the weights are the same (fitted on mean rows); only the
threshold is chosen on the pooled training scores. :func:`leave_one_source_out` refits on
every source but one and measures the held-out source at the operating point chosen the same
way on the rest: the number that predicts traffic the detector never saw.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from guard.errors import InvalidInput

Pooling = Literal["mean", "max", "rolling_max"]
POOLINGS: tuple[str, ...] = ("mean", "max", "rolling_max")
FloatArray = NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class PromptRows:
    """Every prompt's chosen residual rows (the rows a detector with a given ``rows``
    setting reads), prompt after prompt."""

    rows: NDArray[np.float32]
    """``[chosen rows, d_model]``."""
    offsets: NDArray[np.int64]
    """``[prompts + 1]``: prompt ``i``'s rows are ``rows[offsets[i]:offsets[i+1]]``."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def means(self) -> FloatArray:
        """``[prompts, d_model]``: each prompt's mean chosen row (zeros for none)."""
        out = np.zeros((len(self), self.rows.shape[1]), dtype=np.float64)
        sums = np.add.reduceat(self.rows.astype(np.float64), self.offsets[:-1], axis=0) \
            if len(self.rows) else out
        counts = np.diff(self.offsets)
        has = counts > 0
        out[has] = sums[has] / counts[has, None]
        return out


def chosen_rows(rows: NDArray[np.float32], offsets: NDArray[np.int64],
                mask: NDArray[np.bool_] | None) -> PromptRows:
    """The rows of ``mask`` (None: every row) of each prompt of ``rows``/``offsets``."""
    if mask is None:
        return PromptRows(rows, np.asarray(offsets, dtype=np.int64))
    counts = [int(mask[int(a):int(b)].sum()) for a, b in itertools.pairwise(offsets)]
    return PromptRows(np.ascontiguousarray(rows[mask]),
                      np.r_[0, np.cumsum(counts)].astype(np.int64))


def pool(row_scores: NDArray[Any], offsets: NDArray[np.int64], pooling: str,
         window: int = 1) -> FloatArray:
    """Each prompt's pooled score (NaN for a prompt with no rows)."""
    if pooling not in POOLINGS:
        raise InvalidInput(f"pooling: expected one of {', '.join(POOLINGS)}, found {pooling!r}")
    if window < 1:
        raise InvalidInput(f"window: expected a number of rows >= 1, found {window}")
    s = np.asarray(row_scores, dtype=np.float64)
    out = np.full(len(offsets) - 1, np.nan)
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        r = s[int(a):int(b)]
        if not len(r):
            continue
        if pooling == "mean":
            out[i] = r.mean()
        elif pooling == "max":
            out[i] = r.max()
        elif len(r) <= window:
            out[i] = r.mean()
        else:
            c = np.r_[0.0, np.cumsum(r)]
            out[i] = float(((c[window:] - c[:-window]) / window).max())
    return out


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    """A fitted probe on raw residual rows."""

    weights: FloatArray
    bias: float
    threshold: float
    pooling: str
    window: int
    l2: float

    def scores(self, prompts: PromptRows) -> FloatArray:
        """Each prompt's pooled score, as the detector computes it."""
        row_scores = prompts.rows.astype(np.float64) @ self.weights + self.bias
        return pool(row_scores, prompts.offsets, self.pooling, self.window)


def alignment(w_dec: NDArray[Any], weights: NDArray[Any], top: int = 8) -> tuple[list[int],
                                                                                  list[float]]:
    """The ``top`` SAE features whose decoder directions align most with the probe
    (``W_dec[j] . w``, largest first): the features that move its score up most per unit of
    activation, which a finding names to explain a firing probe."""
    a = np.asarray(w_dec, dtype=np.float64) @ np.asarray(weights, dtype=np.float64)
    order = np.argsort(-a, kind="stable")[:top]
    return [int(j) for j in order], [float(a[j]) for j in order]


# ---------------------------------------------------------------------------------------------
# Operating points


def threshold_per_source(scores: NDArray[Any], labels: NDArray[np.int64],
                         sources: Sequence[str], target_fpr: float) -> float:
    """The lowest threshold at which every benign source's FPR is at most ``target_fpr``
    (the largest of the per-source thresholds): a threshold set on the pooled benign prompts
    lets a small source fire far more often than the target."""
    from guard.audit.calibrate import threshold_for_fpr

    s = np.asarray(scores, dtype=np.float64)
    benign = [int(i) for i in np.flatnonzero(labels == 0)]
    names = sorted({sources[i] for i in benign})
    if not names:
        raise InvalidInput("target FPR: expected benign scores, found none")
    return max(threshold_for_fpr(s[[i for i in benign if sources[i] == n]], target_fpr, s)
               for n in names)


# ---------------------------------------------------------------------------------------------
# Leave one source out


@dataclasses.dataclass(frozen=True)
class SourceResult:
    source: str
    label: str
    """``positive`` or ``benign``."""
    prompts: int
    fired: int
    rate: float
    rate_ci95: tuple[float, float]
    auroc: float | None
    """The held-out source against the other class's prompts, all scored by the fit that did
    not see the held-out source (the other class's prompts were its training prompts)."""

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "prompts": self.prompts, "fired": self.fired,
                "fire_rate": round(self.rate, 4),
                "fire_rate_ci95": [round(v, 4) for v in self.rate_ci95],
                "auroc": None if self.auroc is None else round(self.auroc, 4)}


@dataclasses.dataclass(frozen=True)
class SourceEvaluation:
    """Leave-one-source-out results of one detector kind."""

    kind: str
    by_source: dict[str, SourceResult]
    scores: FloatArray
    """Every prompt's score from the fit that did not see its source."""
    fired: NDArray[np.bool_]
    """Whether that fit's operating point fires on it."""

    def worst_fpr(self) -> SourceResult:
        benign = [r for r in self.by_source.values() if r.label == "benign"]
        return max(benign, key=lambda r: (r.rate, r.rate_ci95[1]))

    def worst_recall(self) -> SourceResult:
        positive = [r for r in self.by_source.values() if r.label == "positive"]
        return min(positive, key=lambda r: (r.rate, r.rate_ci95[0]))

    def as_dict(self, labels: NDArray[np.int64], buckets: NDArray[np.int64],
                bucket_names: Sequence[str]) -> dict[str, Any]:
        from guard.audit.calibrate import wilson_interval

        by_bucket: dict[str, Any] = {}
        for b in np.unique(buckets):
            m = buckets == b
            pos, neg = m & (labels == 1), m & (labels == 0)
            fp, tp = int(self.fired[neg].sum()), int(self.fired[pos].sum())
            by_bucket[bucket_names[int(b)]] = {
                "positives": int(pos.sum()), "benign": int(neg.sum()),
                "recall": round(tp / int(pos.sum()), 4) if pos.any() else None,
                "fpr": round(fp / int(neg.sum()), 4) if neg.any() else None,
                "fpr_ci95": [round(v, 4) for v in wilson_interval(fp, int(neg.sum()))]
                if neg.any() else None,
                # how the out-of-source score depends on length, before any threshold
                "benign_score": _quantiles(self.scores[neg]),
                "positive_score": _quantiles(self.scores[pos]),
            }
        worst = self.worst_fpr()
        low = self.worst_recall()
        a = [r.auroc for r in self.by_source.values() if r.auroc is not None]
        pos, neg = labels == 1, labels == 0
        return {
            "by_source": {s: r.as_dict() for s, r in self.by_source.items()},
            "by_length_bucket": by_bucket,
            "worst_source_fpr": {"source": worst.source, "fpr": round(worst.rate, 4),
                                 "fpr_ci95": [round(v, 4) for v in worst.rate_ci95]},
            "worst_source_recall": {"source": low.source, "recall": round(low.rate, 4),
                                    "recall_ci95": [round(v, 4) for v in low.rate_ci95]},
            "pooled_fpr": round(float(self.fired[neg].mean()), 4),
            "pooled_recall": round(float(self.fired[pos].mean()), 4),
            # scores of different folds' fits are on different scales: no pooled AUROC
            "source_auroc_range": [round(min(a), 4), round(max(a), 4)] if a else None,
        }


def _quantiles(scores: NDArray[Any]) -> dict[str, float] | None:
    """Median and 95th percentile of the finite ``scores`` (None for none)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return None
    return {"median": round(float(np.median(s)), 4), "p95": round(float(np.percentile(s, 95)), 4)}


#: A fit on training indices: returns a scorer of any indices and its operating point.
Fitter = Callable[[NDArray[np.int64]], tuple[Callable[[NDArray[np.int64]], FloatArray], float]]


def leave_one_source_out(kind: str, fit: Fitter, labels: NDArray[np.int64],
                         sources: Sequence[str]) -> SourceEvaluation:
    """For each source: ``fit`` on every other source (both classes), score the held-out
    source, and fire at that fit's own operating point."""
    from guard.audit.calibrate import wilson_interval
    from guard.audit.data import source_folds
    from guard.audit.rank import auroc

    n = len(labels)
    scores = np.full(n, np.nan)
    fired = np.zeros(n, dtype=np.bool_)
    folds = source_folds(sources)
    against: dict[str, FloatArray] = {}
    for source, held in folds.items():
        train = np.setdiff1d(np.arange(n), held)
        if len(np.unique(labels[train])) < 2:
            raise InvalidInput("leave-one-source-out: every fold's training side needs both "
                               "classes; give at least two sources of each class")
        scorer, threshold = fit(train)
        scores[held] = scorer(held)
        fired[held] = scores[held] >= threshold
        other = train[labels[train] != labels[held[0]]]
        against[source] = scorer(other)
    results: dict[str, SourceResult] = {}
    for source, held in folds.items():
        label = int(labels[held[0]])
        hits = int(fired[held].sum())
        other_scores = against[source]
        pos, neg = ((scores[held], other_scores) if label else (other_scores, scores[held]))
        results[source] = SourceResult(
            source, "positive" if label else "benign", len(held), hits, hits / len(held),
            wilson_interval(hits, len(held)), auroc(pos, neg) if len(other_scores) else None)
    return SourceEvaluation(kind, results, scores, fired)


def probe_block(fit: ProbeFit, *, hook: str, rows: list[str] | str, action: str,
                explain: tuple[list[int], list[float]] | None) -> dict[str, Any]:
    """The ``type: probe`` detector entry (weights written in full precision)."""
    block: dict[str, Any] = {
        "type": "probe", "hook": hook,
        "weights": [float(w) for w in fit.weights], "bias": float(fit.bias),
        "threshold": float(fit.threshold), "pooling": fit.pooling,
    }
    if fit.pooling == "rolling_max":
        block["window"] = int(fit.window)
    block.update({"rows": rows, "phases": ["prompt"], "action": action})
    if explain is not None:
        block["explain"] = {"features": explain[0],
                            "alignment": [round(a, 6) for a in explain[1]]}
    return block


def cached_residuals(cache: Any, texts: Sequence[str], model: Any, tokenizer: Any,
                     layer: int, max_tokens: int | None) -> Any:
    """:func:`guard.audit.rank.residual_rows`, from (or into) the same cache file that
    :func:`guard.audit.rank.cached_activations` uses for the same prompts."""
    import hashlib
    import json
    import sys
    import time

    from guard.audit.rank import _CACHE_FORMAT, ResidualRows, residual_rows

    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT, list(texts), layer, max_tokens,
         str(getattr(model, "name_or_path", ""))]).encode()).hexdigest()[:24]
    path = cache / f"residuals-{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        print(f"  residual rows from the cache: {path}", file=sys.stderr)
        return ResidualRows.load(path)
    started = time.monotonic()
    resid = residual_rows(texts, model, tokenizer, layer, max_tokens=max_tokens,
                          progress=sys.stderr)
    print(f"  {len(texts)} prompts, {len(resid.rows)} rows through the model in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    if path is not None:
        resid.save(path)
    return resid
