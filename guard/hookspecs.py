"""The plugin hook specification: every hook a guard plugin can implement.

Implement a hook with ``@guard.hookimpl`` on a function or method of the same name. A plugin
may accept fewer arguments than the spec lists (pluggy passes only those it names), so new
arguments can be added without breaking plugins. docs/plugins.md has one section per hook;
a test fails when a hook is undocumented or untested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from guard.decision import (
    Decision,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    RequestEndReason,
)

PROJECT = "guard"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def guard_configure(settings: Mapping[str, Any]) -> None:
    """Receive this plugin's settings (``plugins.config.<name>`` in the guard's config).

    Called at start-up and on every configuration reload, on a fresh plugin instance where
    the plugin is a class. Validate here: raise :class:`guard.ConfigError` with a key path
    relative to the plugin's block to reject the configuration (at start-up the guard does
    not start; on reload the old configuration stays in force).

    :param settings: the plugin's own block (an empty mapping when absent).
    """


@hookspec
def guard_subscriptions(settings: Mapping[str, Any]) -> Sequence[FeatureRequest] | None:
    """Declare which features of which hooks this plugin reads.

    The engine encodes the union of all subscriptions per hook, and only those features:
    a plugin that subscribes to nothing costs no encode.

    :param settings: the plugin's own block, as given to ``guard_configure``.
    :return: the feature requests, or None for none.
    """


@hookspec
def guard_idle() -> bool | None:
    """Whether this plugin, as configured, has nothing to do on the hot path.

    Asked once after ``guard_configure`` (at start-up and on every reload). True: the guard
    does not call this plugin's ``guard_detect`` or ``guard_steer`` (nor time or trace them)
    until the next configuration; its other hooks are called as usual. A plugin installed for
    everyone but configured by few (a shadow check, an optional detector) stays off the
    per-batch path where it is not configured. Raising here is a start-up (or reload) error.

    :return: True when idle; False or None when it wants every batch.
    """


@hookspec
def guard_startup() -> None:
    """Called once the SAEs are loaded, before the guard reports SERVING."""


@hookspec
def guard_detect(batch: FeatureBatch) -> Sequence[Finding] | None:
    """Inspect one batch's features and return findings; every plugin's findings are kept.

    Runs on the hot path, within ``plugins.timeout_ms``: keep it fast and free of I/O.

    :param batch: the feature activations of one batch of one hook.
    :return: findings (an ``abort`` finding turns the decision into ABORT), or None.
    """


@hookspec
def guard_steer(batch: FeatureBatch, findings: Sequence[Finding]) -> Sequence[FeatureEdit] | None:
    """Return feature edits for this batch; the engine turns them into one residual delta
    per hook (pin, nudge, scale; conflicts resolved as ``guard.engine.deltas`` documents).

    :param batch: the feature activations of one batch of one hook.
    :param findings: every plugin's findings on this batch (for "when X fires, steer Y").
    :return: edits, or None.
    """


@hookspec
def guard_record(decision: Decision) -> None:
    """Receive a decision for a sink (a log, a tracer, a metrics store).

    Never called on the hot path: decisions go through a bounded queue to a sink thread.
    Records hold ids, findings and timings, never activations or token text.

    :param decision: the decision, with its findings, edits, plugins and timings.
    """


@hookspec
def guard_request_ended(request_id: str, reason: RequestEndReason) -> None:
    """Forget a request that is over: free what this plugin keeps for it (windows, counters).

    Called from the sink thread (as ``guard_record``), after every decision of the request
    that the record queue accepted: when the host ends it (``RequestEnded``), when its stream
    evicts it at ``server.max_requests_per_stream``, and when its stream closes with it open.
    Keep it fast; an exception is logged and counted, and the stream goes on.

    :param request_id: the request's id (``FeatureBatch.request_id``, ``Decision.request_id``).
    :param reason: why it ended (:data:`guard.RequestEndReason`).
    """


@hookspec
def guard_shutdown() -> None:
    """Called once when the guard stops, after every accepted record was handed to sinks,
    and on the old plugin instances after a reload."""
