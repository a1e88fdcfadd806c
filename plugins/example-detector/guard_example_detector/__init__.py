"""An example guard detector: flag a batch when one feature's mean over its rows is high."""

from collections.abc import Mapping
from typing import Any

from guard import ConfigError, FeatureBatch, FeatureRequest, Finding, hookimpl


class ExampleDetector:
    """Settings (``plugins.config.example_detector``): ``hook``, ``feature``, ``threshold``."""

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        hook, feature, threshold = (settings.get(k) for k in ("hook", "feature", "threshold"))
        if not isinstance(hook, str) or not hook:
            raise ConfigError("hook", "a hook name such as blocks.6.hook_resid_post", hook)
        if not isinstance(feature, int) or isinstance(feature, bool) or feature < 0:
            raise ConfigError("feature", "a feature id (an integer >= 0)", feature)
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise ConfigError("threshold", "a number", threshold)
        self.hook, self.feature, self.threshold = hook, feature, float(threshold)

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(self.hook, [self.feature])]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        if batch.hook != self.hook or len(batch.positions) == 0:
            return []
        values = batch.column(self.feature)
        score = float(values.mean())
        if score <= self.threshold:
            return []
        fired = tuple(int(p) for p in batch.positions[values > self.threshold])
        return [Finding("example_detector", score, self.threshold, "flag",
                        feature_ids=(self.feature,), positions=fired)]
