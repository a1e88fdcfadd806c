"""Shadow-side verification: how much of a detector's score its named features carry, live.

Opt-in (``plugins.config.verify``; without it the plugin subscribes to nothing and does
nothing). For a sampled share of requests, on each batch where one of its detectors fires,
the detector is scored again on the same batch with some of its features ablated (their
activations set to 0: one more evaluation of the detector on the batch's features, no model
run, no encode), by default the features that carry a label. The scoring is the detectors
plugin's own: private instances of it, fed every batch of a sampled request (so a detector
that pools over a request's batches pools the ablated rows the same way), one with the
detectors as configured (did it fire?), and per detector one scoring the batch with the
chosen features ablated and one with all of its features ablated (its floor), both with the
threshold out of the way. The result goes into the
decision record as a ``log`` finding ``verify:<detector>`` (score: the score with them
ablated; message: the score, the ablated score, the share of the score they carry and whether
the detector would still fire) and into two metrics:

- ``guard_plugins.verify.carried`` (histogram): the share of the detector's score, above its
  score with every feature ablated (its bias for a linear detector, 0 for a threshold one),
  that the ablated features carry; attribute ``guard.detector``;
- ``guard_plugins.verify.checks`` (counter): checks made; attributes ``guard.detector`` and
  ``guard.verify.still_fires`` (whether it fires without them).

A share near 1 means the named features carry the score; near 0, the detector fires on
features nobody named. ``guard features verify`` asks the causal question offline (does
ablating them in the model change the behaviour); this plugin watches the detectors' own
arithmetic on live traffic.

Configuration::

    plugins:
      config:
        detectors: &detectors
          jailbreak: {type: linear, hook: blocks.15.hook_resid_post, weights: {...}, ...}
        verify:
          detectors: *detectors   # the detectors to check: the detectors plugin's block (an
                                  # alias of it); threshold and linear ones are checked
          sample: 0.1             # share of requests checked (by a hash of the request id)
          features:               # per detector, the features ablated (default: labelled)
            jailbreak: [2669, 4170]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import structlog
from opentelemetry import metrics

from guard import (
    ConfigError,
    FeatureBatch,
    FeatureRequest,
    Finding,
    RequestEndReason,
    Settings,
    hookimpl,
)
from guard_plugins.detectors import Detectors

log = structlog.get_logger("guard_plugins.verify")

_meter = metrics.get_meter("guard_plugins.verify")
_carried = _meter.create_histogram(
    "guard_plugins.verify.carried", unit="1",
    description="share of a fired detector's score carried by its ablated (named) features")
_checks = _meter.create_counter(
    "guard_plugins.verify.checks", unit="{check}",
    description="shadow verifications of fired detectors, by whether they fire without the "
    "ablated features")

#: The detector types whose score is a function of their features (a probe reads the
#: residual; a sustained detector counts tokens).
CHECKED_TYPES = ("threshold", "linear")
#: The threshold of the scoring instances: below any score, so that they report a score
#: whenever the detector decides.
_NO_THRESHOLD = -1e30


@dataclass(frozen=True)
class Check:
    """One detector under check: its rule, the features ablated (None: those with a label),
    and the detectors-plugin instances that score it with them ablated and with all of its
    features ablated."""

    name: str
    hook: str
    features: tuple[int, ...]
    threshold: float
    ablate: tuple[int, ...] | None
    without: Detectors
    floor: Detectors

    def chosen(self, batch: FeatureBatch) -> tuple[int, ...]:
        if self.ablate is not None:
            return self.ablate
        return tuple(f for f in self.features if batch.label(f))


def sampled(request_id: str, share: float) -> bool:
    """Whether a request is in the sampled ``share`` (a hash of its id: every batch of a
    request is in or out together)."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def ablated(batch: FeatureBatch, features: Sequence[int]) -> FeatureBatch:
    """``batch`` with ``features`` set to 0 on every row (a copy; the batch is shared)."""
    wanted = {int(f) for f in features}
    columns = [j for j, f in enumerate(batch.feature_ids.tolist()) if f in wanted]
    if not columns:
        return batch
    acts = np.array(batch.activations, dtype=np.float32, copy=True)
    acts[:, columns] = 0.0
    return replace(batch, activations=acts)


def _scores(instance: Detectors, batch: FeatureBatch) -> dict[str, float]:
    return {f.detector: float(f.score) for f in instance.guard_detect(batch) or ()}


def _configured(settings: Mapping[str, Any], where: str) -> Detectors:
    instance = Detectors()
    try:
        instance.guard_configure(settings)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.key}" if exc.key else where, exc.expected,
                          exc.found, source=exc.source) from None
    return instance


class ShadowVerify:
    """Re-scores fired detectors with their named features ablated, for a sampled share of
    requests (see the module's documentation)."""

    def __init__(self) -> None:
        self._checks: tuple[Check, ...] = ()
        self._detectors: Detectors | None = None
        self._sample = 0.0

    @property
    def checks(self) -> tuple[Check, ...]:
        return self._checks

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        block = Settings(settings, what="the verify plugin's settings")
        block.only(("detectors", "sample", "features"), "of the verify plugin")
        sample = block.number("sample", 0.1, min=0.0)
        if sample > 1.0:
            raise block.error("sample", "a share of requests between 0 and 1", sample)
        given = block.section("detectors", what="a mapping of detectors (the detectors "
                              "plugin's block)")
        kept = {name: rule for name, rule in given.data.items()
                if isinstance(rule, Mapping) and rule.get("type", "threshold") in CHECKED_TYPES}
        skipped = [str(n) for n in given.data if n not in kept]
        real = _configured(kept, "detectors")
        overrides = block.section("features", what="a mapping of detector name to the "
                                  "feature ids ablated")
        rules = {d.rule.name: d.rule for d in real.detectors}
        for name in overrides.names():
            if name not in rules:
                raise overrides.error(name, f"a threshold or linear detector of "
                                      f"verify.detectors ({', '.join(rules) or 'none'})", name)
        checks = []
        for name, rule in rules.items():
            ablate: tuple[int, ...] | None = None
            if name in overrides:
                ablate = overrides.int_list(name, expected="a list of feature ids of the "
                                            "detector")
                stray = [f for f in ablate if f not in rule.features]
                if stray:
                    raise overrides.error(name, f"feature ids of detector {name!r}", stray[0])
            scoring = {name: {**kept[name], "threshold": _NO_THRESHOLD, "action": "log"}}
            checks.append(Check(name, rule.hook, tuple(rule.features), rule.threshold, ablate,
                                _configured(scoring, "detectors"),
                                _configured(scoring, "detectors")))
        if skipped:
            log.info("detectors not verified: only threshold and linear detectors are scored "
                     "from their features", detectors=skipped)
        self._checks, self._detectors, self._sample = tuple(checks), real, sample

    @hookimpl
    def guard_subscriptions(self) -> Sequence[FeatureRequest]:
        return [] if self._detectors is None else list(self._detectors.guard_subscriptions())

    @hookimpl
    def guard_idle(self) -> bool:
        """Installed with the first-party plugins, configured by few: off the hot path
        without detectors to check or with a sample of 0."""
        return self._detectors is None or not self._checks or not self._sample

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> Sequence[Finding] | None:
        real = self._detectors
        if real is None or not self._checks or not self._sample or \
                not sampled(batch.request_id, self._sample):
            return None
        fired = {f.detector: float(f.score) for f in real.guard_detect(batch) or ()}
        findings = []
        for check in self._checks:
            if check.hook != batch.hook:
                continue
            features = check.chosen(batch)
            # Fed on every batch of the request, fired or not: pooled state stays in step.
            without = _scores(check.without, ablated(batch, features)).get(check.name)
            floor = _scores(check.floor, ablated(batch, check.features)).get(check.name)
            full = fired.get(check.name)
            if full is None or without is None or floor is None or not features:
                continue
            span = full - floor
            share = (full - without) / span if span and math.isfinite(span) else math.nan
            still = bool(without >= check.threshold)
            attributes = {"guard.detector": check.name}
            if math.isfinite(share):
                _carried.record(share, attributes)
            _checks.add(1, {**attributes, "guard.verify.still_fires": still})
            findings.append(Finding(
                detector=f"verify:{check.name}", score=without, threshold=check.threshold,
                action="log", feature_ids=tuple(features),
                message=f"{check.name}: score {full:.4g}, {without:.4g} with {len(features)} "
                f"named features ablated ("
                + (f"{share:.0%}" if math.isfinite(share) else "an unknown share")
                + f" of the score above {floor:.4g} carried by them); "
                f"{'still fires' if still else 'would not fire'} without them"))
        return findings

    @hookimpl
    def guard_request_ended(self, request_id: str, reason: RequestEndReason) -> None:
        """Free what the private detector instances keep for the request."""
        if self._detectors is None:
            return
        self._detectors.guard_request_ended(request_id, reason)
        for check in self._checks:
            check.without.guard_request_ended(request_id, reason)
            check.floor.guard_request_ended(request_id, reason)
