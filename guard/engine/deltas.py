"""Turn feature edits into one residual delta per hook.

The delta only moves the residual along the edited features' decoder directions, so the
SAE's reconstruction error stays in the residual untouched. For a feature ``f`` with current
activation ``a`` and decoder row ``d_f`` (a row of ``W_dec``):

- ``pin v``   adds ``(v - a) * d_f``
- ``nudge c`` adds ``c * d_f``
- ``scale m`` adds ``(m - 1) * a * d_f``

Conflicting edits on one feature of one row resolve by a fixed rule:

1. a pin overrides every scale and nudge of that feature;
2. several pins: the one whose value is smallest in magnitude wins (the most suppressive
   edit, the safe side for a guard), and the conflict is counted in ``conflicts``;
3. otherwise scales multiply and nudges add: ``((m1 * m2 ...) - 1) * a + (c1 + c2 ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from guard.decision import FeatureBatch, FeatureEdit
from guard.errors import InvalidInput


@dataclass(frozen=True)
class SteeringResult:
    """The delta ``[rows, d_in]`` (None when the edits cancel out) and the conflicts seen."""

    delta: NDArray[np.float32] | None
    conflicts: int


def build_delta(
    batch: FeatureBatch,
    edits: Sequence[FeatureEdit],
    directions: Callable[[Sequence[int]], NDArray[np.float32]],
) -> SteeringResult:
    """Combine ``edits`` on ``batch`` into one delta; ``directions(ids)`` gives W_dec rows.

    Raises InvalidInput for a pin or scale on a feature that was not encoded (its current
    activation is unknown: the plugin must subscribe to it).
    """
    n_rows = batch.activations.shape[0]
    edits = [e for e in edits if e.hook == batch.hook]
    if not edits:
        return SteeringResult(None, 0)
    row_of = {int(p): i for i, p in enumerate(batch.positions)}
    features = sorted({int(e.feature_id) for e in edits})
    column = {f: j for j, f in enumerate(features)}
    k = len(features)
    pin = np.full((n_rows, k), np.nan)  # NaN = no pin
    scale = np.ones((n_rows, k))
    nudge = np.zeros((n_rows, k))
    conflicts = 0
    for edit in edits:
        j = column[int(edit.feature_id)]
        rows = (
            np.arange(n_rows)
            if edit.positions is None
            else np.array([row_of[p] for p in edit.positions if p in row_of], dtype=np.intp)
        )
        value = float(edit.value)
        if edit.kind == "pin":
            current = pin[rows, j]
            clash = ~np.isnan(current)
            conflicts += int(clash.sum())
            pin[rows, j] = np.where(clash & (np.abs(current) <= abs(value)), current, value)
        elif edit.kind == "scale":
            scale[rows, j] *= value
        elif edit.kind == "nudge":
            nudge[rows, j] += value
        else:
            raise InvalidInput(f"edit.kind: expected pin, nudge or scale, found {edit.kind!r}")

    needs_activation = ~np.isnan(pin).all(axis=0) | (scale != 1.0).any(axis=0)
    current = np.zeros((n_rows, k))
    for f, j in column.items():
        if needs_activation[j]:
            if not batch.has(f):
                raise InvalidInput(
                    f"a pin or scale edit on feature {f} of hook {batch.hook!r} needs its "
                    "current activation, but the feature was not encoded: subscribe to it"
                )
            current[:, j] = batch.column(f)
    pinned = ~np.isnan(pin)
    coefficients = np.where(pinned, np.nan_to_num(pin) - current, (scale - 1.0) * current + nudge)
    if not coefficients.any():
        return SteeringResult(None, conflicts)
    weights = directions(features).astype(np.float64)
    delta = (coefficients @ weights).astype(np.float32)
    return SteeringResult(delta, conflicts)
