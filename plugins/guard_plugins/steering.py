"""First-party steering: pin, nudge and scale features, optionally when a detector fires."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guard import (
    EditKind,
    FeatureBatch,
    FeatureEdit,
    FeatureRequest,
    Finding,
    RowRole,
    Settings,
    hookimpl,
)
from guard_plugins.detectors import DEFAULT_ROWS, ROW_ROLES, parse_rows

#: ``fired``: the triggering findings' rows; a set of roles: the rows of those roles (rows
#: the host did not label included); None (``all``): every row.
Rows = Literal["fired"] | frozenset[RowRole] | None
_KINDS: tuple[EditKind, ...] = ("pin", "nudge", "scale")


@dataclass(frozen=True)
class Edit:
    """One configured edit: ``kind`` of ``feature`` by ``value``."""

    feature: int
    kind: EditKind
    value: float


@dataclass(frozen=True)
class SteeringRule:
    """A named set of edits on one hook, applied always or when a detector fired."""

    name: str
    hook: str
    edits: tuple[Edit, ...]
    #: Detector names; empty: steer every batch of the hook.
    when: tuple[str, ...] = ()
    #: ``fired``: only the positions the triggering findings name; a set of roles: the rows
    #: of those roles (and unlabelled rows); None: every row, template markup included.
    rows: Rows = DEFAULT_ROWS

    @property
    def needs_activations(self) -> tuple[int, ...]:
        """Features whose current activation the edits need (pin and scale; nudge needs none)."""
        return tuple(e.feature for e in self.edits if e.kind != "nudge")

    def triggers(self, findings: Sequence[Finding]) -> list[Finding]:
        """The findings of this rule's ``when`` detectors."""
        return [f for f in findings if f.detector in self.when]

    def positions(self, batch: FeatureBatch, triggers: Sequence[Finding]
                  ) -> tuple[int, ...] | Literal[False] | None:
        """The rows to edit, given the triggering findings (None: every row; False: none)."""
        if self.rows == "fired":
            # A finding with no positions speaks for the whole batch.
            if any(not f.positions for f in triggers):
                return None
            return tuple(sorted({int(p) for f in triggers for p in f.positions}))
        mask = batch.rows_of(self.rows)
        if mask is None:
            return None
        if not mask.any():
            return False
        return tuple(int(p) for p in batch.positions[mask])


class SteeringPlugin:
    """Feature edits per hook, each rule optionally conditional on a detector's finding.

    ``plugins.config.steering`` maps a rule name to its settings::

        calm:
          hook: blocks.15.hook_resid_post
          when: jailbreak      # optional: a detector name (any plugin's) or a list of them
          rows: fired          # with `when`: fired (default, the findings' positions); or the
                               # roles of the rows edited, as the detectors' `rows` (default
                               # without `when`: system, user, assistant, tool, generated)
          edits:
            - {feature: 12, pin: 0.0}     # set the activation to 0
            - {feature: 40, nudge: -2.0}  # add -2 times the decoder direction
            - {feature: 7, scale: 0.5}    # halve the feature's contribution

    The engine turns the edits into one residual delta per hook and resolves conflicting
    edits on one feature (see ``guard.engine.deltas``). Pin and scale need the current activation,
    so this plugin subscribes to those features.
    """

    def __init__(self) -> None:
        self._rules: tuple[SteeringRule, ...] = ()
        self._by_hook: Mapping[str, tuple[SteeringRule, ...]] = {}

    @property
    def rules(self) -> tuple[SteeringRule, ...]:
        return self._rules

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        block = Settings(settings, what="a mapping of steering rules")
        rules = tuple(_parse(name, rule) for name, rule in block.sections("steering rule"))
        by_hook: dict[str, tuple[SteeringRule, ...]] = {}
        for rule in rules:
            by_hook[rule.hook] = (*by_hook.get(rule.hook, ()), rule)
        self._rules, self._by_hook = rules, by_hook

    @hookimpl
    def guard_idle(self) -> bool:
        """No steering rule configured: nothing to do per batch."""
        return not self._rules

    @hookimpl
    def guard_subscriptions(self) -> Sequence[FeatureRequest]:
        requests = []
        for hook, rules in self._by_hook.items():
            needed = sorted({f for rule in rules for f in rule.needs_activations})
            if needed:  # a hook steered only by nudges costs no encode
                requests.append(FeatureRequest(hook, needed))
        return requests

    @hookimpl
    def guard_steer(
        self, batch: FeatureBatch, findings: Sequence[Finding]
    ) -> Sequence[FeatureEdit] | None:
        rules = self._by_hook.get(batch.hook)
        if not rules:
            return None
        edits: list[FeatureEdit] = []
        for rule in rules:
            triggers: list[Finding] = []
            if rule.when:
                triggers = rule.triggers(findings)
                if not triggers:
                    continue
            positions = rule.positions(batch, triggers)
            if positions is False:  # none of the rows it edits
                continue
            edits.extend(FeatureEdit(rule.hook, e.feature, e.kind, e.value, positions)
                         for e in rule.edits)
        return edits


def _parse(name: str, block: Settings) -> SteeringRule:
    block.only(("hook", "when", "rows", "edits"), "of a steering rule")
    hook = block.string("hook")
    when = _detector_names(block)
    rows: Rows
    if "rows" not in block:
        rows = "fired" if when else DEFAULT_ROWS
    elif block.data["rows"] == "fired":
        if not when:
            raise block.error("rows", f"all or a list of row roles ({', '.join(ROW_ROLES)}); "
                              "fired needs `when`", "fired")
        rows = "fired"
    else:
        rows = parse_rows(block)
    return SteeringRule(name, hook, _edits(block), when, rows)


def _detector_names(block: Settings) -> tuple[str, ...]:
    """``when``: plain strings only: the detector may belong to any plugin, so its name is
    not checked."""
    if "when" not in block:
        return ()
    if isinstance(block.data["when"], str):
        return (block.string("when"),)
    names = block.sequence("when", "a detector name or a non-empty list of them",
                           non_empty=True)
    return tuple(names.string(i) for i in names.names())


def _edits(block: Settings) -> tuple[Edit, ...]:
    listed = block.sequence("edits", "a non-empty list of edits ({feature: N, pin|nudge|scale: "
                            "V})", non_empty=True)
    edits = []
    for i in listed.names():
        edit = listed.section(i, what="an edit: {feature: N, pin|nudge|scale: V}")
        edit.only(("feature", *_KINDS), "of an edit")
        feature = edit.feature_id("feature", digits=True)
        kinds = [k for k in _KINDS if k in edit]
        if len(kinds) != 1:
            raise edit.error(None, "exactly one of pin, nudge, scale", ", ".join(kinds) or "none")
        edits.append(Edit(feature, kinds[0], edit.number(kinds[0])))
    return tuple(edits)
