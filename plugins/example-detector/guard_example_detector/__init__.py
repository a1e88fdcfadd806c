"""An example guard detector: flag a batch when one feature's mean over its rows is high."""

from collections.abc import Mapping
from typing import Any

from guard import FeatureBatch, FeatureRequest, Finding, Settings, hookimpl


class ExampleDetector:
    """Settings (``plugins.config.example_detector``): ``hook``, ``feature``, ``threshold``."""

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        block = Settings(settings)
        block.only(("hook", "feature", "threshold"))
        self.hook = block.hook("hook")
        self.feature = block.feature_id("feature")
        self.threshold = block.number("threshold")

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
