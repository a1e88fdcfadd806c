"""``guard detectors calibrate`` and ``guard detectors shadow``: detectors with measured error
rates.

Two detectors are fitted on the training split, each scoring a prompt exactly as the
detectors plugin scores the prompt's batch (one batch of every row but position 0, each with
its role; the detector reads the rows of the roles chosen, by default the user's words and not
the chat template's markup, and the written block says which in its ``rows`` setting):

- **threshold**: the per-prompt ``max`` (or ``mean``) of each chosen feature, combined with
  ``any`` (largest) or ``all`` (smallest); fires when that reaches the threshold. With
  ``--top N`` the features are picked greedily from the N best-ranked ones (ranked on the
  training split only): each added feature must raise the training recall at the target FPR.
- **linear**: an L2-regularised logistic regression over the chosen features' per-prompt
  **means**. The plugin's linear detector with ``reduce: mean`` scores
  ``mean_rows(bias + w . a_row) = bias + w . mean_rows(a)``, which is exactly the fitted
  logit; the L2 strength is chosen by cross-validated log-loss on the training split.

The operating point of each is chosen on the training split: the lowest threshold whose
false-positive rate there is at most the target. Precision, recall, F1, AUROC and the FPR at
that point are then measured on the held-out split, overall, per length bucket and per data
source. A logistic regression on the mean raw residual row of the same layer (the "linear
probe") is fitted the same way as the ceiling a feature-based detector is measured against.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from guard.audit.data import bucket_names, length_buckets
from guard.audit.probe import ProbeFit, PromptRows, SourceEvaluation, leave_one_source_out
from guard.audit.rank import PromptActivations, auroc, rank_features, role_names
from guard.decision import RowRole
from guard.errors import InvalidInput

Combine = Literal["any", "all"]
Reduce = Literal["max", "mean"]
FloatArray = NDArray[np.float64]

#: L2 strengths tried (on standardised inputs; the loss is the mean log-loss).
L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CV_FOLDS = 5


# ---------------------------------------------------------------------------------------------
# Operating points and metrics


def threshold_for_fpr(benign_scores: NDArray[Any], target_fpr: float,
                      all_scores: NDArray[Any] | None = None) -> float:
    """The threshold (fire when ``score >= threshold``) with the highest recall whose FPR on
    ``benign_scores`` is at most ``target_fpr`` (see :func:`threshold_for_count`)."""
    if not 0.0 <= target_fpr < 1.0:
        raise InvalidInput(f"target FPR: expected a number in [0, 1), found {target_fpr}")
    n = len(benign_scores)
    return threshold_for_count(benign_scores, math.floor(target_fpr * n + 1e-9), all_scores)


def threshold_for_count(benign_scores: NDArray[Any], allowed: int,
                        all_scores: NDArray[Any] | None = None) -> float:
    """The lowest threshold at which at most ``allowed`` of ``benign_scores`` fire.

    Any threshold above the ``(allowed+1)``-th largest benign score works; the midpoint
    between it and the next larger score of ``all_scores`` (both classes) keeps the training
    result and leaves a margin.
    """
    benign = np.sort(np.asarray(benign_scores, dtype=np.float64))[::-1]
    if len(benign) == 0:
        raise InvalidInput("target FPR: expected benign scores, found none")
    if allowed >= len(benign):
        return float(benign[-1])
    bound = float(benign[allowed])
    pool = benign if all_scores is None else np.asarray(all_scores, dtype=np.float64)
    above = pool[pool > bound]
    if len(above) == 0:
        return float(np.nextafter(bound, np.inf))
    return (bound + float(above.min())) / 2.0


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A detector's confusion counts and rates at one threshold."""

    threshold: float
    positives: int
    benign: int
    tp: int
    fp: int
    precision: float | None
    """None when nothing fired."""
    recall: float | None
    f1: float | None
    fpr: float | None
    fpr_ci95: tuple[float, float] | None
    """Wilson 95% interval of the FPR."""
    auroc: float | None
    """None unless both classes are present."""

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fpr_ci95"] = list(self.fpr_ci95) if self.fpr_ci95 is not None else None
        return {k: _rounded(v) for k, v in data.items()}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def metrics_at(scores: NDArray[Any], labels: NDArray[np.int64], threshold: float) -> Metrics:
    """Precision, recall, F1, FPR (with its interval) and AUROC of ``scores >= threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    fired = scores >= threshold
    pos, neg = labels == 1, labels == 0
    tp, fp = int((fired & pos).sum()), int((fired & neg).sum())
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / n_pos if n_pos else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else
          (0.0 if precision is not None and recall is not None else None))
    fpr = fp / n_neg if n_neg else None
    return Metrics(
        threshold=float(threshold), positives=n_pos, benign=n_neg, tp=tp, fp=fp,
        precision=precision, recall=recall, f1=f1, fpr=fpr,
        fpr_ci95=wilson_interval(fp, n_neg) if n_neg else None,
        auroc=auroc(scores[pos], scores[neg]) if n_pos and n_neg else None,
    )


def roc_curve(scores: NDArray[Any], labels: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y == 1)[distinct]
    fps = np.cumsum(y == 0)[distinct]
    n_pos, n_neg = max(int((labels == 1).sum()), 1), max(int((labels == 0).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


# ---------------------------------------------------------------------------------------------
# Logistic regression (NumPy, Newton's method)


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    """``logit = bias + x . weights`` on raw (unstandardised) inputs."""

    weights: FloatArray
    bias: float
    l2: float

    def logits(self, x: NDArray[Any]) -> FloatArray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias


def logistic_fit(x: NDArray[Any], y: NDArray[Any], *, l2: float,
                 iterations: int = 50, sample_weight: NDArray[Any] | None = None,
                 ) -> LogisticModel:
    """Minimise ``weighted mean log-loss + l2/2 |w|^2`` over standardised columns (the bias
    is not penalised) by Newton's method with step halving; returns raw-space weights.
    ``sample_weight`` (default: all 1) weighs each prompt's loss, e.g. the length weights of
    :func:`guard.audit.data.length_weights`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise InvalidInput(f"logistic fit: expected x [n, d] and y [n], found {x.shape} and "
                           f"{y.shape}")
    sw = (np.ones(len(x)) if sample_weight is None
          else np.asarray(sample_weight, dtype=np.float64))
    sw = sw / sw.mean()
    mu = np.average(x, axis=0, weights=sw)
    sd = np.sqrt(np.average((x - mu) ** 2, axis=0, weights=sw))
    sd[sd == 0] = 1.0
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    n, d = z.shape
    penalty = np.full(d, l2)
    penalty[-1] = 0.0
    theta = np.zeros(d)

    def loss(t: FloatArray) -> float:
        m = z @ t
        return float(np.mean(sw * (np.logaddexp(0.0, m) - y * m))
                     + 0.5 * np.sum(penalty * t * t))

    current = loss(theta)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        grad = z.T @ (sw * (p - y)) / n + penalty * theta
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z / n + np.diag(penalty + 1e-10)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            candidate = theta - scale * step
            value = loss(candidate)
            if value <= current:
                break
            scale /= 2
        else:
            break
        done = current - value < 1e-10
        theta, current = candidate, value
        if done:
            break
    weights = theta[:-1] / sd
    bias = float(theta[-1] - np.sum(theta[:-1] * mu / sd))
    return LogisticModel(weights, bias, l2)


def group_folds(groups: Sequence[str], folds: int, seed: int) -> NDArray[np.int64]:
    """A fold number per item; items of one group share a fold."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    fold_of = dict(zip(names, rng.permutation(len(names)) % folds, strict=True))
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def fit_logistic_cv(x: NDArray[Any], y: NDArray[np.int64], groups: Sequence[str], *,
                    grid: Sequence[float] = L2_GRID, folds: int = CV_FOLDS,
                    seed: int = 0, sample_weight: NDArray[Any] | None = None,
                    ) -> tuple[LogisticModel, dict[float, float]]:
    """The L2 strength with the lowest cross-validated (weighted) log-loss (group-aware
    folds), refitted on all of ``x``; also the mean held-out log-loss of each strength
    tried."""
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    fold = group_folds(groups, folds, seed)
    scores: dict[float, float] = {}
    for l2 in grid:
        losses = []
        for k in range(folds):
            train, test = fold != k, fold == k
            if not test.any() or len(np.unique(y[train])) < 2:
                continue
            m = logistic_fit(x[train], y[train], l2=l2,
                             sample_weight=sw[train]).logits(x[test])
            losses.append(float(np.average(np.logaddexp(0.0, m) - y[test] * m,
                                           weights=sw[test])))
        scores[l2] = float(np.mean(losses)) if losses else math.inf
    best = min(scores, key=lambda k: (scores[k], -k))
    return logistic_fit(x, y, l2=best, sample_weight=sw), scores


# ---------------------------------------------------------------------------------------------
# The detectors


def combined(reduced: NDArray[Any], combine: Combine) -> FloatArray:
    """The threshold detector's score of each prompt from ``[prompts, features]``."""
    values = np.asarray(reduced, dtype=np.float64)
    scores: FloatArray = values.max(axis=1) if combine == "any" else values.min(axis=1)
    return scores


@dataclasses.dataclass(frozen=True)
class ThresholdFit:
    """Threshold detectors: one shared threshold over all features (``per_feature`` false:
    one config entry, the plugin's ``combine``), or one threshold per feature (one config
    entry per feature; the group fires when any entry does)."""

    features: tuple[int, ...]
    thresholds: tuple[float, ...]
    """One per feature (all equal unless ``per_feature``)."""
    combine: Combine
    reduce: Reduce
    per_feature: bool

    @property
    def threshold(self) -> float:
        """The operating point of :func:`threshold_scores`: the shared threshold, or 1.0
        (a per-feature group's score is each feature's value over its own threshold)."""
        return 1.0 if self.per_feature else self.thresholds[0]


@dataclasses.dataclass(frozen=True)
class LinearFit:
    features: tuple[int, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    l2: float


def fit_threshold(
    reduced: NDArray[Any], labels: NDArray[np.int64], features: Sequence[int], *,
    target_fpr: float, combine: Combine = "any", reduce: Reduce = "max",
) -> ThresholdFit:
    """One threshold detector over ``features`` as given (columns of ``reduced``,
    ``[prompts, d_sae]``), with one shared threshold, as the plugin's ``combine`` reads it."""
    s = combined(reduced[:, list(features)], combine)
    t = threshold_for_fpr(s[labels == 0], target_fpr, s)
    return ThresholdFit(tuple(int(f) for f in features), (t,) * len(features), combine,
                        reduce, per_feature=False)


def fit_threshold_group(
    reduced: NDArray[Any], labels: NDArray[np.int64], candidates: Sequence[int], *,
    target_fpr: float, reduce: Reduce = "max", max_features: int = 4,
) -> ThresholdFit:
    """Single-feature threshold detectors picked greedily from ``candidates``, each with its
    own threshold (features live on different scales; the plugin's one threshold per entry
    cannot serve several of them).

    The training FPR budget (``floor(target_fpr * benign)`` prompts) is shared by the group:
    each step adds the candidate whose lowest threshold that keeps the group within the
    budget raises the group's training recall most; it stops when no candidate raises it.
    """
    pos, neg = labels == 1, labels == 0
    allowed = math.floor(target_fpr * int(neg.sum()) + 1e-9)
    values = np.asarray(reduced[:, list(candidates)], dtype=np.float64)
    fired = np.zeros(len(labels), dtype=np.bool_)
    chosen: list[int] = []
    thresholds: list[float] = []
    recall = 0.0
    while len(chosen) < max_features:
        best: tuple[float, float, int, float] | None = None
        for j, feature in enumerate(candidates):
            if feature in chosen:
                continue
            column = values[:, j]
            # benign prompts the group already fires on cost nothing more
            free = neg & ~fired
            t = threshold_for_count(column[free], allowed - int((neg & fired).sum()), column)
            gain = float(np.mean((fired | (column >= t))[pos]))
            key = (gain, auroc(column[pos], column[neg]), -j, t)
            if best is None or key[:3] > best[:3]:
                best = key
        if best is None or best[0] <= recall:
            break
        j = -best[2]
        chosen.append(int(candidates[j]))
        thresholds.append(best[3])
        fired |= values[:, j] >= best[3]
        recall = best[0]
    if not chosen:  # nothing reaches a positive at the target: the best single feature
        return fit_threshold(reduced, labels, [int(candidates[0])], target_fpr=target_fpr,
                             reduce=reduce)
    return ThresholdFit(tuple(chosen), tuple(thresholds), "any", reduce, per_feature=True)


def fit_linear(
    mean_acts: NDArray[Any], labels: NDArray[np.int64], features: Sequence[int],
    groups: Sequence[str], *, target_fpr: float, seed: int = 0,
    sample_weight: NDArray[Any] | None = None, sources: Sequence[str] | None = None,
    l2: float | None = None,
) -> LinearFit:
    """A linear detector over ``features``' per-prompt means, with its threshold on the logit
    (for every benign source when ``sources`` is given: :func:`operating_point`); ``l2``
    fixes the strength instead of cross-validating it."""
    x = np.asarray(mean_acts[:, list(features)], dtype=np.float64)
    if l2 is None:
        model, _ = fit_logistic_cv(x, labels, groups, seed=seed, sample_weight=sample_weight)
    else:
        model = logistic_fit(x, labels, l2=l2, sample_weight=sample_weight)
    logits = model.logits(x)
    t = operating_point(logits, labels, sources, target_fpr)
    return LinearFit(tuple(int(f) for f in features), tuple(float(w) for w in model.weights),
                     model.bias, t, model.l2)


def operating_point(scores: NDArray[Any], labels: NDArray[np.int64],
                    sources: Sequence[str] | None, target_fpr: float) -> float:
    """The lowest threshold whose training FPR is at most ``target_fpr`` on the benign
    prompts pooled (``sources`` None) or on every benign source (the largest of the
    per-source thresholds)."""
    if sources is None:
        return threshold_for_fpr(scores[labels == 0], target_fpr, scores)
    from guard.audit.probe import threshold_per_source

    return threshold_per_source(scores, labels, sources, target_fpr)


def linear_scores(fit: LinearFit, mean_acts: NDArray[Any]) -> FloatArray:
    x = np.asarray(mean_acts[:, list(fit.features)], dtype=np.float64)
    scores: FloatArray = x @ np.asarray(fit.weights, dtype=np.float64) + fit.bias
    return scores


def threshold_scores(fit: ThresholdFit, acts: PromptActivations) -> FloatArray:
    """Each prompt's score: the plugin's score for a shared threshold; for a per-feature
    group the largest ratio of a feature's value to its own threshold (fires at 1)."""
    reduced = acts.max_acts if fit.reduce == "max" else acts.mean_acts
    values = np.asarray(reduced[:, list(fit.features)], dtype=np.float64)
    if fit.per_feature:
        ratios: FloatArray = (values / np.asarray(fit.thresholds)).max(axis=1)
        return ratios
    return combined(values, fit.combine)


# ---------------------------------------------------------------------------------------------
# The whole calibration


@dataclasses.dataclass(frozen=True)
class DetectorResult:
    """One detector's scores and metrics on both splits."""

    kind: str
    threshold: float
    train: Metrics
    test: Metrics
    test_scores: FloatArray
    by_bucket: dict[str, Metrics]
    by_source: dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Calibration:
    name: str
    hook: str
    sae_sha256: str
    target_fpr: float
    threshold_fit: ThresholdFit
    linear_fit: LinearFit
    results: dict[str, DetectorResult]
    """``threshold``, ``linear`` and (when asked) ``probe``."""
    test_labels: NDArray[np.int64]
    train_size: int
    test_size: int
    rows: frozenset[RowRole] | None = None
    """The roles of the rows the detectors were fitted on (None: every row), which the
    written blocks' ``rows`` setting names."""
    probe_fit: ProbeFit | None = None
    """The raw-residual probe, refitted on every prompt (the one written), when asked."""
    by_source: dict[str, SourceEvaluation] = dataclasses.field(default_factory=dict)
    """Leave-one-source-out results per detector kind (empty unless asked)."""
    labels: NDArray[np.int64] | None = None
    buckets: NDArray[np.int64] | None = None
    bucket_names: tuple[str, ...] = ()
    weighting: str = "none"
    """How length was balanced: ``reweight`` (length weights in every fit), ``none``."""
    operating: str = "pooled"
    """``per-source`` (every benign training source within the target) or ``pooled``."""


def calibrate(
    acts: PromptActivations,
    train: NDArray[np.int64],
    test: NDArray[np.int64],
    *,
    name: str,
    groups: Sequence[str],
    sources: Sequence[str],
    target_fpr: float = 0.01,
    features: Sequence[int] | None = None,
    top: int = 32,
    linear_top: int | None = None,
    combine: Combine = "any",
    reduce: Reduce = "max",
    max_features: int = 4,
    probe: bool = False,
    edges: Sequence[int] | None = None,
    seed: int = 0,
    sample_weight: NDArray[Any] | None = None,
    prompt_rows: PromptRows | None = None,
    pooling: str = "mean",
    window: int = 1,
    per_source: bool = False,
    by_source: bool = False,
    probe_l2: float | None = None,
) -> Calibration:
    """Fit both detectors (and the probe) on ``train`` and measure them on ``test``; with
    ``by_source``, also leave each source out in turn (fit on the others, all prompts).

    ``sample_weight`` weighs each prompt in the logistic fits (length weights);
    ``prompt_rows`` are the probe's chosen residual rows (default: each prompt's mean row
    only, which serves ``pooling: mean``); ``per_source`` sets operating points so that every
    benign training source is within ``target_fpr``; ``probe_l2`` fixes the probe's L2
    strength (default: cross-validated over near-duplicate groups).
    """
    labels = acts.labels
    y_train, y_test = labels[train], labels[test]
    for split_name, y in (("training", y_train), ("held-out", y_test)):
        if not ((y == 1).any() and (y == 0).any()):
            raise InvalidInput(f"the {split_name} split needs both classes; found "
                               f"{int((y == 1).sum())} positive, {int((y == 0).sum())} benign")
    if pooling != "mean" and prompt_rows is None:
        raise InvalidInput(f"probe pooling {pooling!r}: needs every prompt's rows, not only "
                           "their mean")
    weight = (np.ones(len(labels)) if sample_weight is None
              else np.asarray(sample_weight, dtype=np.float64))
    reduced = acts.max_acts if reduce == "max" else acts.mean_acts
    if features:
        bad = [f for f in features if not 0 <= f < acts.d_sae]
        if bad:
            raise InvalidInput(f"--features: expected ids in [0, {acts.d_sae}), found {bad[0]}")

    def src(idx: NDArray[np.int64]) -> list[str] | None:
        return [sources[i] for i in idx] if per_source else None

    # the L2 strength is cross-validated over near-duplicate groups (choosing it over whole
    # sources was tried: it picked the strongest penalty and lost most recall)
    cv_groups = list(groups)

    def fit_features(idx: NDArray[np.int64], l2: float | None = None,
                     ) -> tuple[ThresholdFit, LinearFit]:
        y = labels[idx]
        if features:
            candidates = [int(f) for f in features]
            tfit = fit_threshold(reduced[idx], y, candidates, target_fpr=target_fpr,
                                 combine=combine, reduce=reduce)
            lin_candidates = candidates
        else:
            ranked = rank_features(acts.max_acts[idx], acts.mean_acts[idx], y,
                                   top=max(top, linear_top or top))
            candidates = [r.feature for r in ranked[:top]]
            lin_candidates = [r.feature for r in ranked[: linear_top or top]]
            tfit = fit_threshold_group(reduced[idx], y, candidates, target_fpr=target_fpr,
                                       reduce=reduce, max_features=max_features)
        lfit = fit_linear(acts.mean_acts[idx], y, lin_candidates, [cv_groups[i] for i in idx],
                          target_fpr=target_fpr, seed=seed, sample_weight=weight[idx],
                          sources=src(idx), l2=l2)
        return tfit, lfit

    def probe_scores(model: LogisticModel) -> FloatArray:
        if pooling == "mean" or prompt_rows is None:
            return model.logits(acts.resid_mean)
        fit = ProbeFit(model.weights, model.bias, 0.0, pooling, window, model.l2)
        return fit.scores(prompt_rows)

    def fit_probe(idx: NDArray[np.int64], l2: float | None = None) -> tuple[ProbeFit,
                                                                             FloatArray]:
        x = acts.resid_mean[idx]
        l2 = probe_l2 if l2 is None else l2
        if l2 is None:
            model, _ = fit_logistic_cv(x, labels[idx], [cv_groups[i] for i in idx], seed=seed,
                                       sample_weight=weight[idx])
        else:
            model = logistic_fit(x, labels[idx], l2=l2, sample_weight=weight[idx])
        s = probe_scores(model)
        t = operating_point(s[idx], labels[idx], src(idx), target_fpr)
        return ProbeFit(model.weights, model.bias, t, pooling, window, model.l2), s

    threshold_fit, linear_fit = fit_features(train)
    scores = {
        "threshold": (threshold_scores(threshold_fit, acts), threshold_fit.threshold),
        "linear": (linear_scores(linear_fit, acts.mean_acts), linear_fit.threshold),
    }
    probe_fit: ProbeFit | None = None
    if probe:
        split_probe, s = fit_probe(train)
        scores["probe"] = (s, split_probe.threshold)
    buckets = length_buckets(acts.prompt_tokens, *(() if edges is None else (edges,)))
    names = bucket_names(*(() if edges is None else (edges,)))
    results = {}
    for kind, (s, t) in scores.items():
        by_bucket = {}
        for b in np.unique(buckets[test]):
            members = test[buckets[test] == b]
            by_bucket[names[int(b)]] = metrics_at(s[members], labels[members], t)
        by_src: dict[str, dict[str, Any]] = {}
        for source in sorted({sources[i] for i in test}):
            members = np.array([i for i in test if sources[i] == source], dtype=np.int64)
            fired = int((s[members] >= t).sum())
            label = int(labels[members[0]])
            by_src[source] = {"label": "positive" if label else "benign",
                              "prompts": len(members), "fired": fired,
                              "fire_rate": round(fired / len(members), 4)}
        results[kind] = DetectorResult(kind, t, metrics_at(s[train], y_train, t),
                                       metrics_at(s[test], y_test, t), s[test], by_bucket,
                                       by_src)
    everything = np.arange(len(labels), dtype=np.int64)
    if probe:
        probe_fit, _ = fit_probe(everything)
    evaluations: dict[str, SourceEvaluation] = {}
    if by_source:
        l2_linear = linear_fit.l2

        def linear_fold(idx: NDArray[np.int64]) -> tuple[Any, float]:
            _t, lfit = fit_features(idx, l2_linear)
            return (lambda held: linear_scores(lfit, acts.mean_acts[held])), lfit.threshold

        def threshold_fold(idx: NDArray[np.int64]) -> tuple[Any, float]:
            tfit, _l = fit_features(idx, l2_linear)
            all_scores = threshold_scores(tfit, acts)
            return (lambda held: all_scores[held]), tfit.threshold

        folds: dict[str, Any] = {"threshold": threshold_fold, "linear": linear_fold}
        if probe_fit is not None:
            l2_probe = probe_fit.l2

            def probe_fold(idx: NDArray[np.int64]) -> tuple[Any, float]:
                fit, s = fit_probe(idx, l2_probe)
                return (lambda held: s[held]), fit.threshold

            folds["probe"] = probe_fold
        evaluations = {kind: leave_one_source_out(kind, fold, labels, sources)
                       for kind, fold in folds.items()}
    return Calibration(name, acts.hook, acts.sae_sha256, target_fpr, threshold_fit,
                       linear_fit, results, y_test, len(train), len(test),
                       rows=acts.rows if acts.roles is not None else None,
                       probe_fit=probe_fit, by_source=evaluations, labels=labels,
                       buckets=buckets, bucket_names=tuple(names),
                       weighting="none" if sample_weight is None else "reweight",
                       operating="per-source" if per_source else "pooled")


# ---------------------------------------------------------------------------------------------
# Outputs: the plugin's config block and the metrics


def threshold_entries(cal: Calibration) -> dict[str, tuple[list[int], float]]:
    """Config entry name -> (features, threshold) of the threshold detector(s):
    ``<name>`` for a shared threshold, ``<name>-f<feature>`` for each of a per-feature group."""
    t = cal.threshold_fit
    if not t.per_feature:
        return {cal.name: (list(t.features), float(t.thresholds[0]))}
    return {f"{cal.name}-f{f}": ([f], float(v))
            for f, v in zip(t.features, t.thresholds, strict=True)}


def detector_blocks(cal: Calibration, *, action: str = "log",
                    explain: tuple[list[int], list[float]] | None = None,
                    ) -> dict[str, dict[str, Any]]:
    """``plugins.config.detectors`` entries: the threshold detector(s) (see
    :func:`threshold_entries`), ``<name>-linear`` and, with a probe, ``<name>-probe``
    (``type: probe``, refitted on every prompt; ``explain``: the SAE features whose decoder
    directions align most with it, see :func:`guard.audit.probe.alignment`).

    Thresholds are written at full precision so that the plugin reproduces the measured
    operating point exactly. ``phases: [prompt]``: they were calibrated on prompts; ``rows``:
    the roles of the rows they were fitted on (``all`` for rows without roles).
    """
    t, lin = cal.threshold_fit, cal.linear_fit
    rows = role_names(cal.rows)
    blocks: dict[str, dict[str, Any]] = {
        name: {"type": "threshold", "hook": cal.hook, "features": features,
               "threshold": threshold, "combine": t.combine, "reduce": t.reduce,
               "action": action, "phases": ["prompt"], "rows": rows}
        for name, (features, threshold) in threshold_entries(cal).items()
    }
    if cal.probe_fit is not None:
        from guard.audit.probe import probe_block

        blocks[f"{cal.name}-probe"] = probe_block(cal.probe_fit, hook=cal.hook, rows=rows,
                                                  action=action, explain=explain)
    return {
        **blocks,
        f"{cal.name}-linear": {"type": "linear", "hook": cal.hook,
                               "weights": {int(f): float(w) for f, w in
                                           zip(lin.features, lin.weights, strict=True)},
                               "bias": float(lin.bias), "threshold": float(lin.threshold),
                               "reduce": "mean", "action": action, "phases": ["prompt"],
                               "rows": rows},
    }


def detector_yaml(blocks: Mapping[str, Mapping[str, Any]], *, header: Sequence[str] = (),
                  labels: Mapping[int, str] | None = None) -> str:
    """The file ``calibrate`` writes: ``plugins.config.detectors`` with the blocks, under
    comment lines (the header, then the label of every feature used)."""
    import yaml

    used = sorted({int(f) for b in blocks.values()
                   for f in (b.get("features") or (b.get("explain") or {}).get("features")
                             or (list(b["weights"]) if isinstance(b.get("weights"), Mapping)
                                 else []))})
    comments = [*header]
    if labels:
        comments += [f"feature {f}: {labels[f]}" for f in used if labels.get(f)]
    body = yaml.safe_dump({"plugins": {"config": {"detectors": _plain(blocks)}}},
                          sort_keys=False, default_flow_style=None, width=100)
    return "".join(f"# {c}\n" if c else "#\n" for c in comments) + body


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def metrics_record(cal: Calibration) -> dict[str, Any]:
    """Everything measured, for ``metrics.json``."""
    detectors = {}
    for kind, r in cal.results.items():
        detectors[kind] = {
            "threshold": r.threshold,
            "train": r.train.as_dict(),
            "heldout": r.test.as_dict(),
            "heldout_by_length_bucket": {k: m.as_dict() for k, m in r.by_bucket.items()},
            "heldout_by_source": r.by_source,
        }
    detectors["threshold"]["features"] = list(cal.threshold_fit.features)
    detectors["threshold"]["entries"] = {
        name: {"features": features, "threshold": threshold}
        for name, (features, threshold) in threshold_entries(cal).items()}
    detectors["threshold"]["per_feature_thresholds"] = cal.threshold_fit.per_feature
    detectors["threshold"]["combine"] = cal.threshold_fit.combine
    detectors["threshold"]["reduce"] = cal.threshold_fit.reduce
    detectors["linear"]["features"] = list(cal.linear_fit.features)
    detectors["linear"]["l2"] = cal.linear_fit.l2
    if "probe" in detectors:
        detectors["probe"]["what"] = ("logistic regression on the raw residual rows the "
                                      "detector reads, fitted on each prompt's mean row")
        if cal.probe_fit is not None:
            detectors["probe"]["pooling"] = cal.probe_fit.pooling
            detectors["probe"]["window"] = cal.probe_fit.window
            detectors["probe"]["l2"] = cal.probe_fit.l2
            detectors["probe"]["written_threshold"] = cal.probe_fit.threshold
    held_out_sources = {}
    if cal.by_source and cal.labels is not None and cal.buckets is not None:
        held_out_sources = {kind: e.as_dict(cal.labels, cal.buckets, cal.bucket_names)
                            for kind, e in cal.by_source.items()}
    return {
        "name": cal.name,
        "hook": cal.hook,
        "sae_sha256": cal.sae_sha256,
        "rows": role_names(cal.rows),
        "target_fpr": cal.target_fpr,
        "operating_point": "chosen on the training split: the lowest threshold with "
                           "training FPR <= target_fpr",
        "train_prompts": cal.train_size,
        "heldout_prompts": cal.test_size,
        "heldout_positive": int((cal.test_labels == 1).sum()),
        "heldout_benign": int((cal.test_labels == 0).sum()),
        "detectors": detectors,
        "length_balance": cal.weighting,
        "operating_point_rule": cal.operating,
        "leave_one_source_out": held_out_sources,
    }


# ---------------------------------------------------------------------------------------------
# Shadow mode: run a detector config through the plugin, log only


@dataclasses.dataclass(frozen=True)
class ShadowResult:
    """How often each detector would have fired over a set of requests."""

    requests: int
    fired: dict[str, list[int]]
    """Detector name -> indices of the requests it fired on."""
    scores: dict[str, NDArray[np.float64]]
    """Detector name -> its score per request (NaN where it did not fire)."""
    failures: list[str]


def detectors_block(document: Any, where: str) -> dict[str, Any]:
    """The detectors mapping of a YAML document: a guard config or the block
    ``calibrate`` writes (``plugins.config.detectors``), or a bare mapping of detectors."""
    block = document
    for key in ("plugins", "config", "detectors"):
        if isinstance(block, Mapping) and key in block:
            block = block[key]
    if not isinstance(block, Mapping) or not block:
        raise InvalidInput(f"{where}: expected plugins.config.detectors (a mapping of detector "
                           f"names to settings), found {str(document)[:80]!r}")
    return dict(block)


def shadow_plugins(blocks: Mapping[str, Any]) -> Any:
    """The installed ``detectors`` plugin (through its entry point, as the sidecar loads it),
    configured with every detector's action forced to ``log``."""
    from guard.engine.plugins import PluginSet, discover

    sources = [s for s in discover(["detectors"], autoload=False, env={}) if s.name == "detectors"]
    plugins = PluginSet(sources)
    plugins.configure({"detectors": {n: {**dict(b), "action": "log"} if isinstance(b, Mapping)
                                     else b for n, b in blocks.items()}})
    return plugins


def shadow_needs(blocks: Mapping[str, Any]) -> tuple[bool, bool]:
    """(whether a detector reads the raw residual rows, whether one reads their
    reconstruction error), as the detectors' own subscriptions declare them (``d_in``,
    ``reconstruction``): what a shadow run over prompts must compute besides features."""
    plugins = shadow_plugins(blocks)
    try:
        requests = plugins.subscriptions({})
    finally:
        plugins.shutdown()
    return (any(r.d_in is not None for r in requests),
            any(r.reconstruction for r in requests))


def shadow_prompts(blocks: Mapping[str, Any], acts: PromptActivations, *,
                   residual: NDArray[np.float32] | None = None,
                   errors: NDArray[np.float64] | None = None) -> ShadowResult:
    """Each prompt as one prompt-phase batch of its rows (positions 1..., with their roles
    and token ids), through the plugin. ``residual``: every prompt's raw rows, aligned with
    ``acts`` (for probe detectors); ``errors``: each of those rows' squared reconstruction
    error (for reconstruction detectors), as the guard hands them on a sampled batch."""
    from guard import FeatureBatch, Phase, Reconstruction

    plugins = shadow_plugins(blocks)
    requests = plugins.subscriptions({})
    features = sorted({f for r in requests if r.hook == acts.hook
                       for f in (range(acts.d_sae) if r.feature_ids == "all" else r.feature_ids)})
    names = list(blocks)
    fired: dict[str, list[int]] = {n: [] for n in names}
    scores = {n: np.full(len(acts), np.nan) for n in names}
    failures: list[str] = []
    offsets = acts.row_offsets
    for i in range(len(acts)):
        rows = acts.rows_of(i)[:, features] if features else np.zeros((len(acts.tokens[i]), 0))
        a, b = int(offsets[i]), int(offsets[i + 1])
        raw = None
        if residual is not None:
            raw = residual[a:b]
            raw.flags.writeable = False
        batch = FeatureBatch(
            request_id=f"prompt-{i}", sequence=1, hook=acts.hook,
            feature_ids=np.array(features, dtype=np.int64),
            activations=np.ascontiguousarray(rows, dtype=np.float32),
            positions=np.arange(1, rows.shape[0] + 1, dtype=np.int64),
            token_ids=acts.token_ids_of(i), phase=Phase.PROMPT, feature_labels={},
            sae_sha256=acts.sae_sha256, roles=acts.roles_of(i), prompt_complete=True,
            residual=raw,
            reconstruction=None if errors is None else Reconstruction.of(raw, errors[a:b]))
        findings, failed = plugins.detect(batch)
        failures += [f"prompt {i}: {e.error}" for e in failed]
        for finding in findings:
            fired.setdefault(finding.detector, []).append(i)
            scores.setdefault(finding.detector, np.full(len(acts), np.nan))[i] = finding.score
    plugins.shutdown()
    return ShadowResult(len(acts), fired, scores, failures)


def shadow_batches(blocks: Mapping[str, Any], batches: Sequence[Any]) -> ShadowResult:
    """Recorded feature batches (``guard.recording.save_batches`` files, e.g. from the
    ``BatchRecorder`` plugin) through the plugin; a request fires when any of its batches
    does."""
    plugins = shadow_plugins(blocks)
    request_ids = list(dict.fromkeys(b.request_id for b in batches))
    index = {r: i for i, r in enumerate(request_ids)}
    fired: dict[str, set[int]] = {n: set() for n in blocks}
    scores = {n: np.full(len(request_ids), np.nan) for n in blocks}
    failures: list[str] = []
    for batch in batches:
        findings, errors = plugins.detect(batch)
        failures += [f"request {batch.request_id} batch {batch.sequence}: {e.error}"
                     for e in errors]
        i = index[batch.request_id]
        for finding in findings:
            fired.setdefault(finding.detector, set()).add(i)
            column = scores.setdefault(finding.detector, np.full(len(request_ids), np.nan))
            column[i] = np.fmax(column[i], finding.score)
    plugins.shutdown()
    return ShadowResult(len(request_ids), {n: sorted(v) for n, v in fired.items()}, scores,
                        failures)


def format_shadow(result: ShadowResult, labels: NDArray[np.int64] | None = None) -> str:
    """A table: per detector, how many requests it would have fired on (with the Wilson
    interval), and per class when the requests are labelled."""
    lines = [f"{result.requests} requests, every detector in log-only mode"]
    rows = dict(result.fired)
    groups: dict[str, set[int]] = {}
    for name, hits in result.fired.items():
        match = re.match(r"^(.*)-f\d+$", name)
        if match:  # the per-feature entries of one calibrated threshold group
            groups.setdefault(f"{match.group(1)} (any -f entry)", set()).update(hits)
    rows.update({name: sorted(hits) for name, hits in groups.items()})
    for name, hits in rows.items():
        low, high = wilson_interval(len(hits), result.requests)
        line = (f"  {name:<24} fired on {len(hits):>5} ({len(hits) / max(result.requests, 1):.1%}"
                f", 95% CI {low:.1%}-{high:.1%})")
        if labels is not None:
            hit = np.zeros(result.requests, dtype=np.bool_)
            hit[hits] = True
            for label, what in ((1, "positive"), (0, "benign")):
                members = labels == label
                if members.any():
                    line += f"; {what} {int(hit[members].sum())}/{int(members.sum())}"
        lines.append(line)
    if result.failures:
        lines.append(f"  {len(result.failures)} plugin failures, first: {result.failures[0]}")
    return "\n".join(lines)
