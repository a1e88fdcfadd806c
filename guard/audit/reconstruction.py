"""``guard detectors reconstruction``: calibrate a ``type: reconstruction`` detector on benign
(training-like) traffic.

Each prompt goes through the model as the host sends it (:func:`guard.audit.rank.
residual_rows`: the chat template, every position but 0), and its rows of the detector's roles
through the SAE the guard serves (:mod:`guard.sae.reconstruction`, the sidecar's own encode
and decode). A prompt's NMSE is :meth:`guard.decision.Reconstruction.of` over those rows, the
value the detector compares on a prompt that reaches the guard whole; prompts with fewer than
``min_rows`` such rows get none, as the detector judges none. The threshold is the chosen
percentile of the prompts' NMSE (NumPy's linear interpolation), so about ``100 - percentile``
percent of such traffic is flagged; the block written carries the distribution in its header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.decision import Reconstruction, RowRole, role_mask
from guard.errors import InvalidInput
from guard.sae import Sae
from guard.sae.reconstruction import check_reconstructs, squared_errors

FloatArray = NDArray[np.float64]

#: The percentiles the header and the summary report.
REPORTED_PERCENTILES = (50, 90, 95, 99)


@dataclasses.dataclass(frozen=True)
class ReconstructionCalibration:
    """The NMSE of every calibration prompt and the threshold at the chosen percentile."""

    hook: str
    sae_sha256: str
    #: Per prompt; NaN for a prompt with fewer than ``min_rows`` rows of the roles read.
    nmse: FloatArray
    #: Rows of the roles read, per prompt.
    rows: NDArray[np.int64]
    percentile: float
    threshold: float
    min_rows: int
    roles: frozenset[RowRole] | None

    @property
    def measured(self) -> FloatArray:
        """The NMSE of the prompts that have one."""
        return self.nmse[np.isfinite(self.nmse)]

    @property
    def flagged_fraction(self) -> float:
        """The share of measured calibration prompts the threshold flags (``>=``)."""
        values = self.measured
        return float((values >= self.threshold).mean()) if values.size else 0.0

    def summary(self) -> dict[str, Any]:
        """The distribution, for the header and ``--json``."""
        values = self.measured
        record: dict[str, Any] = {
            "hook": self.hook, "sae_sha256": self.sae_sha256,
            "prompts": int(self.nmse.size), "measured": int(values.size),
            "too_short": int(self.nmse.size - values.size), "min_rows": self.min_rows,
            "percentile": self.percentile, "threshold": self.threshold,
            "flagged_fraction": self.flagged_fraction,
            "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()),
        }
        for p in REPORTED_PERCENTILES:
            record[f"p{p}"] = float(np.percentile(values, p))
        return record


def prompt_nmse(sae: Sae, rows: NDArray[np.float32], offsets: NDArray[np.int64],
                roles: NDArray[np.int8] | None, read: frozenset[RowRole] | None, *,
                min_rows: int) -> tuple[FloatArray, NDArray[np.int64]]:
    """(each prompt's NMSE, its rows read): prompt ``i``'s rows are
    ``rows[offsets[i]:offsets[i+1]]`` with ``roles`` (None: unlabelled, every row read);
    ``read``: the roles a detector reads (None: every row). NaN below ``min_rows`` rows."""
    check_reconstructs(sae)
    errors = squared_errors(sae, np.ascontiguousarray(rows, dtype=np.float32))
    n = len(offsets) - 1
    nmse = np.full(n, np.nan)
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        a, b = int(offsets[i]), int(offsets[i + 1])
        mask = role_mask(None if roles is None else roles[a:b], read)
        prompt, error = rows[a:b], errors[a:b]
        if mask is not None:
            prompt, error = prompt[mask], error[mask]
        counts[i] = len(error)
        if counts[i] >= min_rows:
            nmse[i] = Reconstruction.of(prompt, error).nmse
    return nmse, counts


def calibrate(sae: Sae, nmse: FloatArray, rows: NDArray[np.int64], *, hook: str,
              percentile: float, min_rows: int,
              roles: frozenset[RowRole] | None) -> ReconstructionCalibration:
    """The threshold at ``percentile`` of the prompts' NMSE."""
    if not 0 < percentile <= 100:
        raise InvalidInput(f"--percentile: expected a percentile in (0, 100], found "
                           f"{percentile:g}")
    values = nmse[np.isfinite(nmse)]
    if values.size < 2:
        raise InvalidInput(
            f"--prompts: expected at least 2 prompts with {min_rows} or more rows of the roles "
            f"read, found {values.size} of {nmse.size} (give more or longer prompts, or lower "
            "--min-rows)")
    threshold = float(np.percentile(values, percentile))
    if threshold <= 0:
        raise InvalidInput(f"the SAE reconstructs these prompts exactly (NMSE {threshold:g} at "
                           f"the {percentile:g}th percentile): no threshold to calibrate")
    return ReconstructionCalibration(hook=hook, sae_sha256=sae.info.sha256, nmse=nmse,
                                     rows=rows, percentile=float(percentile),
                                     threshold=threshold, min_rows=min_rows, roles=roles)


def detector_block(cal: ReconstructionCalibration, *, action: str = "log",
                   phases: Sequence[str] = ("prompt",)) -> dict[str, Any]:
    """The ``type: reconstruction`` settings the detectors plugin reads."""
    from guard.audit.rank import role_names

    return {"type": "reconstruction", "hook": cal.hook,
            "threshold": float(f"{cal.threshold:.6g}"), "percentile": cal.percentile,
            "min_rows": cal.min_rows, "action": action, "phases": list(phases),
            "rows": role_names(cal.roles)}


def header(cal: ReconstructionCalibration, command: str) -> list[str]:
    """The comment lines above the block: where it came from and the distribution."""
    s = cal.summary()
    spread = "  ".join(f"p{p} {s[f'p{p}']:.4g}" for p in REPORTED_PERCENTILES)
    return [
        f"Reconstruction detector for {cal.hook} (SAE sha256 {cal.sae_sha256})",
        f"written by: {command}",
        f"NMSE of {s['measured']} calibration prompts ({s['too_short']} with fewer than "
        f"{cal.min_rows} rows read left out):",
        f"  min {s['min']:.4g}  mean {s['mean']:.4g}  {spread}  max {s['max']:.4g}",
        f"threshold: the {cal.percentile:g}th percentile, {cal.threshold:.6g}: flags "
        f"{cal.flagged_fraction:.1%} of these prompts",
        "The guard measures the NMSE on sampled batches only: serve the SAE with "
        "saes[].reconstruction.sample > 0 (its cost: docs/operations.md).",
        "",
    ]


def format_calibration(cal: ReconstructionCalibration) -> str:
    """The human summary printed on stderr."""
    s = cal.summary()
    spread = "  ".join(f"p{p} {s[f'p{p}']:.4g}" for p in REPORTED_PERCENTILES)
    return (f"{s['measured']} prompts measured ({s['too_short']} too short) on {cal.hook}: "
            f"NMSE min {s['min']:.4g}  mean {s['mean']:.4g}  {spread}  max {s['max']:.4g}\n"
            f"threshold at the {cal.percentile:g}th percentile: {cal.threshold:.6g} "
            f"(flags {cal.flagged_fraction:.1%} of them)")
