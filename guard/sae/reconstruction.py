"""The SAE's reconstruction error on activation rows: what the guard measures on a sampled
fraction of served batches (``saes[].reconstruction.sample``) and what ``guard detectors
reconstruction`` calibrates on benign traffic.

Per row, ``||x - x_hat||^2`` in float64, ``x_hat`` the SAE's own decode of its full encode
(``SaeModel.decode``: every feature's activation times ``W_dec`` plus ``b_dec``, the skip
connection if any, and the input normalisation undone); per request, the normalised MSE of
:meth:`guard.decision.Reconstruction.of`. Rows go through in chunks, so that what one
measurement holds at once is bounded by the chunk, not by the batch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from guard.errors import InvalidInput
from guard.sae.sae import Sae

#: Rows per chunk when the caller does not say: the full encoder's own run size (its
#: ``[rows, d_sae]`` output fits ``guard.sae.encoder.AUTO_CHUNK_BYTES``).
_DEFAULT_CHUNK = 0


def check_reconstructs(sae: Sae) -> None:
    """Refuse (InvalidInput) an SAE whose decoder does not reconstruct the rows it reads: a
    transcoder's decoder predicts another hook's rows, which the guard never sees."""
    info = sae.info
    if info.hook_name_out is None:
        return
    out = info.hook_name_out or "a hook its files do not name"
    raise InvalidInput(
        f"the SAE at {info.hook_name!r} is a transcoder: its decoder writes {out} "
        f"(d_out={info.d_out}), not the rows it reads, so it has no reconstruction error "
        "to measure on them")


def chunk_rows(sae: Sae, chunk: int = _DEFAULT_CHUNK) -> int:
    """Rows measured at once (``chunk`` 0: the full encoder's ``rows_per_run``)."""
    return chunk if chunk > 0 else sae.encoder(None).rows_per_run


def peak_bytes(sae: Sae, rows: int, *, encoded: bool, chunk: int = _DEFAULT_CHUNK) -> int:
    """About the most memory :func:`squared_errors` holds at once for ``rows`` rows: per
    chunk, the reconstruction (float32) and its float64 difference, plus the full encode of
    the chunk unless ``encoded`` (the caller has every feature already)."""
    step = min(rows, chunk_rows(sae, chunk))
    held = step * sae.info.d_in * (4 + 8)
    if not encoded:
        held += sae.encoder(None).peak_bytes(step)
    return held


def squared_errors(
    sae: Sae,
    rows: NDArray[np.float32],
    *,
    measured: NDArray[np.bool_] | None = None,
    activations: NDArray[np.float32] | None = None,
    chunk: int = _DEFAULT_CHUNK,
) -> NDArray[np.float64]:
    """``||x - x_hat||^2`` of each of ``rows`` (C-contiguous float32 ``[rows, d_in]``), in
    float64; NaN for the rows ``measured`` leaves out (None: every row is measured).

    ``activations``: every feature of every row (``[rows, d_sae]``, from the full encoder),
    when the caller encoded them already; otherwise each chunk of ``chunk`` rows (0: the full
    encoder's run size) is encoded with the SAE's full encoder (built once and cached), in
    its served weight dtype, so the error is that of the features plugins read.
    """
    check_reconstructs(sae)
    n = rows.shape[0]
    errors = np.full(n, np.nan, dtype=np.float64)
    index = np.arange(n) if measured is None else np.flatnonzero(measured)
    if activations is not None and activations.shape != (n, sae.info.d_sae):
        raise ValueError(f"activations: expected every feature of every row, "
                         f"[{n}, {sae.info.d_sae}], found {list(activations.shape)}")
    step = chunk_rows(sae, chunk)
    contiguous = measured is None or bool(measured.all())
    for start in range(0, index.size, step):
        if contiguous:  # whole rows of a C-contiguous array: views, no copy
            part = slice(start, start + step)
            x, acts = rows[part], None if activations is None else activations[part]
        else:
            taken = index[start:start + step]
            x = np.ascontiguousarray(rows[taken])
            acts = None if activations is None else activations[taken]
        if acts is None:
            acts = sae.encoder(None).encode(x)
        difference = x.astype(np.float64) - sae.decode(acts, x)
        errors[index[start:start + step]] = np.einsum("ij,ij->i", difference, difference)
    return errors
