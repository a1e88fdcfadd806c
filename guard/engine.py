"""The decision engine: one validated batch in, one decision out.

encode (only the subscribed features) -> decide. Plugins (detect, steer, record) join this
path with the plugin work; until then no detector runs and every decision is CONTINUE, but
the SAEs are real: hooks, d_in and the encoder come from the loaded SAE files.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import structlog
from numpy.typing import NDArray

from guard.config import GuardConfig, SaeConfig
from guard.decision import Action, ActivationRows, Decision, new_decision_id
from guard.errors import ConfigError, NotFound
from guard.sae import Encoder, Sae, SaeInfo, open_sae

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Subscription:
    """The features computed for a hook: ``feature_ids`` or every feature."""

    hook: str
    feature_ids: tuple[int, ...]
    all_features: bool


@dataclass
class HookRuntime:
    """One served hook: its SAE and the encoder over the subscribed features."""

    sae: Sae
    encoder: Encoder | None
    subscription: Subscription

    @property
    def info(self) -> SaeInfo:
        return self.sae.info

    @property
    def d_in(self) -> int:
        return self.sae.info.d_in

    @property
    def execution_provider(self) -> str:
        return self.encoder.execution_provider if self.encoder is not None else "none"


class Engine:
    """Holds the loaded SAEs and turns batches into decisions. Thread-safe."""

    def __init__(self, hooks: Mapping[str, HookRuntime]) -> None:
        self._hooks = dict(hooks)

    @classmethod
    def load(cls, config: GuardConfig) -> Engine:
        """Load every SAE in the config and build its encoder; refuses duplicate hooks."""
        hooks: dict[str, HookRuntime] = {}
        for index, entry in enumerate(config.saes):
            runtime = _load_hook(entry)
            hook = runtime.info.hook_name
            if hook in hooks:
                raise ConfigError(
                    f"saes[{index}].hook",
                    "a hook not served by an earlier entry",
                    hook,
                    source=config.source,
                )
            hooks[hook] = runtime
            log.info(
                "sae loaded",
                hook=hook,
                d_in=runtime.info.d_in,
                d_sae=runtime.info.d_sae,
                architecture=runtime.info.architecture,
                sha256=runtime.info.sha256,
                execution_provider=runtime.execution_provider,
                features="all" if runtime.subscription.all_features
                else len(runtime.subscription.feature_ids),
            )
        return cls(hooks)

    @property
    def hooks(self) -> Mapping[str, HookRuntime]:
        return self._hooks

    def hook(self, name: str) -> HookRuntime:
        """The runtime of a served hook; NotFound lists the served hooks."""
        runtime = self._hooks.get(name)
        if runtime is None:
            served = ", ".join(sorted(self._hooks)) or "none"
            raise NotFound(f"hook {name!r} is not served by this guard; served hooks: {served}")
        return runtime

    def inspect(self, batch: ActivationRows, timings: dict[str, float]) -> Decision:
        """Encode the subscribed features of a validated batch and decide."""
        runtime = self.hook(batch.hook)
        if runtime.encoder is not None:
            started = time.perf_counter()
            _features: NDArray[np.float32] = runtime.encoder.encode(batch.rows)
            timings["encode"] = time.perf_counter() - started
        return Decision(
            decision_id=new_decision_id(),
            action=Action.CONTINUE,
            request_id=batch.request_id,
            sequence=batch.sequence,
            positions=batch.positions,
            timings=timings,
        )


def _load_hook(entry: SaeConfig) -> HookRuntime:
    sae = open_sae(entry.path, hook=entry.hook, sha256=entry.sha256, dtype=entry.dtype)
    hook = sae.info.hook_name
    if entry.features == "all":
        subscription = Subscription(hook, (), all_features=True)
        encoder: Encoder | None = sae.encoder(None)
    elif entry.features:
        subscription = Subscription(hook, tuple(entry.features), all_features=False)
        encoder = sae.encoder(list(entry.features))
    else:
        # Nothing subscribes: computing features nobody reads would only cost time.
        subscription = Subscription(hook, (), all_features=False)
        encoder = None
    return HookRuntime(sae=sae, encoder=encoder, subscription=subscription)


