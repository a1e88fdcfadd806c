"""Feature batches on disk: :func:`save_batches`, :func:`load_batches` and the
:class:`BatchRecorder` plugin that collects what a running guard hands to plugins.

Used by the auditing commands (``guard detectors calibrate --batches``) and re-exported by the
plugin authors' test kit (:mod:`guard.testing`). NumPy only; files never hold pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray

from guard.decision import FeatureBatch, FeatureRequest, Phase, RowRole
from guard.hookspecs import hookimpl
from guard.settings import Settings

__all__ = ["BATCH_FILE_FORMAT", "BatchRecorder", "load_batches", "save_batches"]

#: Written into every file of :func:`save_batches`; :func:`load_batches` checks it.
BATCH_FILE_FORMAT: Final = "guard-feature-batches/1"


def frozen_batch(
    *,
    request_id: str,
    sequence: int,
    hook: str,
    feature_ids: NDArray[np.int64],
    activations: NDArray[np.float32],
    positions: NDArray[Any],
    token_ids: NDArray[Any] | None,
    phase: Phase,
    feature_labels: Mapping[int, str],
    sae_sha256: str,
    attributes: Mapping[str, str],
    roles: NDArray[Any] | None = None,
    prompt_complete: bool | None = None,
) -> FeatureBatch:
    """A batch whose arrays are read-only copies of the given ones, with rows checked (and no
    residual rows: they are never recorded)."""
    n_rows = activations.shape[0]
    if roles is not None and roles.size and (roles.min() < 0 or roles.max() > max(RowRole)):
        raise ValueError(f"roles: expected RowRole values (0 to {int(max(RowRole))}), found "
                         f"{int(roles.min())} to {int(roles.max())}")
    for name, array in (("positions", positions), ("token_ids", token_ids), ("roles", roles)):
        if array is not None and array.shape != (n_rows,):
            raise ValueError(
                f"{name}: expected {n_rows} values (one per row), found shape {array.shape}"
            )
    return FeatureBatch(
        request_id=request_id,
        sequence=int(sequence),
        hook=hook,
        feature_ids=_read_only(feature_ids, np.int64),
        activations=_read_only(activations, np.float32),
        positions=_read_only(positions, np.int64),
        token_ids=None if token_ids is None else _read_only(token_ids, np.int64),
        phase=phase,
        feature_labels=feature_labels,
        sae_sha256=sae_sha256,
        attributes=attributes,
        roles=None if roles is None else _read_only(roles, np.int8),
        prompt_complete=prompt_complete,
    )


_Scalar = TypeVar("_Scalar", bound=np.generic)


def _read_only(array: NDArray[Any], dtype: type[_Scalar]) -> NDArray[_Scalar]:
    copy: NDArray[_Scalar] = np.array(array, dtype=dtype)
    copy.setflags(write=False)
    return copy


def save_batches(path: str | os.PathLike[str], batches: Sequence[FeatureBatch]) -> None:
    """Write feature batches to ``path`` (a compressed ``.npz``, exactly that name).

    Every field is kept: ids, activations, positions, token ids, row roles, phase, whether
    the rows complete the prompt, labels, SAE revision and attributes; never the raw residual
    rows. The file holds plain arrays and JSON text, so
    :func:`load_batches` reads it with ``allow_pickle=False``. Token ids can reveal the
    text: treat such files as data of the requests they came from.

    >>> import tempfile, pathlib
    >>> from guard.testing import make_feature_batch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "batches.npz"
    >>> save_batches(path, [make_feature_batch(activations=[[0.5, 0.0]])])
    >>> load_batches(path)[0].activations.tolist()
    [[0.5, 0.0]]
    """
    arrays: dict[str, NDArray[Any]] = {
        "format": np.array(BATCH_FILE_FORMAT),
        "count": np.array(len(batches), dtype=np.int64),
    }
    for i, batch in enumerate(batches):
        meta = {
            "request_id": batch.request_id,
            "sequence": int(batch.sequence),
            "hook": batch.hook,
            "phase": Phase(batch.phase).name,
            "feature_labels": {str(k): v for k, v in batch.feature_labels.items()},
            "sae_sha256": batch.sae_sha256,
            "attributes": dict(batch.attributes),
            "prompt_complete": batch.prompt_complete,
        }
        arrays[f"{i}.meta"] = np.array(json.dumps(meta, sort_keys=True))
        arrays[f"{i}.feature_ids"] = np.asarray(batch.feature_ids, dtype=np.int64)
        arrays[f"{i}.activations"] = np.asarray(batch.activations, dtype=np.float32)
        arrays[f"{i}.positions"] = np.asarray(batch.positions, dtype=np.int64)
        if batch.token_ids is not None:
            arrays[f"{i}.token_ids"] = np.asarray(batch.token_ids, dtype=np.int64)
        if batch.roles is not None:
            arrays[f"{i}.roles"] = np.asarray(batch.roles, dtype=np.int8)
    with open(path, "wb") as file:  # a file object: numpy would append .npz to a name
        np.savez_compressed(file, allow_pickle=False, **arrays)


def load_batches(path: str | os.PathLike[str]) -> list[FeatureBatch]:
    """Read the feature batches that :func:`save_batches` wrote, in their order.

    Raises ValueError naming the file when it is not such a file (or a newer format).
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:  # not a zip file, or a .npy holding objects
        raise ValueError(f"{path}: expected an .npz file of feature batches: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz file of feature batches, found one array")
    with data:
        found = str(data["format"]) if "format" in data.files else "no format key"
        if found != BATCH_FILE_FORMAT:
            raise ValueError(f"{path}: format: expected {BATCH_FILE_FORMAT!r}, found {found!r}")
        try:
            return [_load_batch(data, i) for i in range(int(data["count"]))]
        except (KeyError, ValueError) as exc:  # a missing array, bad JSON, an object array
            raise ValueError(f"{path}: damaged feature batch file: {exc}") from exc


def _load_batch(data: np.lib.npyio.NpzFile, i: int) -> FeatureBatch:
    meta = json.loads(str(data[f"{i}.meta"]))
    token_key, role_key = f"{i}.token_ids", f"{i}.roles"
    return frozen_batch(
        request_id=meta["request_id"],
        sequence=meta["sequence"],
        hook=meta["hook"],
        feature_ids=data[f"{i}.feature_ids"],
        activations=data[f"{i}.activations"],
        positions=data[f"{i}.positions"],
        token_ids=data[token_key] if token_key in data.files else None,
        phase=Phase[meta["phase"]],
        feature_labels={int(k): v for k, v in meta["feature_labels"].items()},
        sae_sha256=meta["sae_sha256"],
        attributes=meta["attributes"],
        roles=data[role_key] if role_key in data.files else None,
        prompt_complete=meta.get("prompt_complete"),  # absent from older files
    )


# -- a plugin that records batches -----------------------------------------------------------


class BatchRecorder:
    """A plugin that keeps the feature batches the guard hands to plugins.

    Register it under a name of your choice (an entry point of your package naming
    ``guard.recording:BatchRecorder``, or a harness) and configure it::

        plugins:
          config:
            batch_recorder:
              hook: blocks.6.hook_resid_post
              features: [7, 12]       # or "all"
              path: /tmp/batches.npz  # written at shutdown; optional
              max_batches: 1000       # later batches are not kept (default 1000)
              token_ids: false        # keep token ids (they can reveal the text)

    The batches go to :attr:`batches` and, at ``guard_shutdown``, to ``path`` in the format
    of :func:`save_batches`. Meant for collecting regression data, not for production.
    """

    def __init__(self) -> None:
        self.hook = ""
        self.features: list[int] | None = []  # None: every feature
        self.path = ""
        self.max_batches = 1000
        self.token_ids = False
        self.batches: list[FeatureBatch] = []
        #: Batches not kept because ``max_batches`` were.
        self.skipped = 0

    @hookimpl
    def guard_configure(self, settings: Mapping[str, Any]) -> None:
        block = Settings(settings)
        block.only(("hook", "features", "path", "max_batches", "token_ids"))
        self.hook = block.hook("hook")
        features = block.features("features")
        self.features = None if features == "all" else list(features)
        self.path = block.string("path", "", empty=True)
        self.max_batches = block.positive_int("max_batches", 1000)
        self.token_ids = block.boolean("token_ids", False)

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(self.hook, "all" if self.features is None else self.features)]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> None:
        if batch.hook != self.hook:
            return
        if len(self.batches) >= self.max_batches:
            self.skipped += 1
            return
        # Copies: the engine's arrays are not promised to outlive the call.
        self.batches.append(frozen_batch(
            request_id=batch.request_id, sequence=batch.sequence, hook=batch.hook,
            feature_ids=batch.feature_ids, activations=batch.activations,
            positions=batch.positions, token_ids=batch.token_ids if self.token_ids else None,
            phase=batch.phase, feature_labels=dict(batch.feature_labels),
            sae_sha256=batch.sae_sha256, attributes=dict(batch.attributes),
            roles=batch.roles, prompt_complete=batch.prompt_complete,
        ))

    @hookimpl
    def guard_shutdown(self) -> None:
        if self.path:
            save_batches(self.path, self.batches)
