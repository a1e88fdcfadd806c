"""The SAE the engine holds: :func:`open_sae`, :class:`Sae` and :class:`SaeInfo`."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import onnx
import structlog
from numpy.typing import NDArray

from guard.errors import InvalidInput, NotFound, SaeFileError
from guard.sae.encoder import CPU, CUDA, Encoder, create_session, resolve_providers
from guard.sae.formats import Artifact, identity_file, load_any
from guard.sae.formats.artifact import (
    ENCODER_FILE,
    MANIFEST_FILE,
    recorded_source_sha256,
    verify_file,
)
from guard.sae.model import SaeModel
from guard.sae.quantize import quantize_int8
from guard.sae.safetensors import sha256_of_files

log = structlog.get_logger(__name__)

WeightDtype = Literal["auto", "fp32", "fp16", "int8"]
_DTYPES = ("auto", "fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class SaeInfo:
    """What an opened SAE is, for ``Describe``, decision logs and plugins."""

    hook_name: str
    d_in: int
    d_sae: int
    architecture: str
    sha256: str
    """The identity of what is served, what a pin must equal and what ``Describe``, decision
    logs and the ``guard.sae.sha256`` span attribute report: the sha256 of the weights file
    for a source format, of ``manifest.json`` for an exported artifact (which records the
    sha256 of its other files, all verified at load; see ``guard.sae.formats.artifact``)."""
    source_sha256: str
    """sha256 of the source weights file; for an artifact, the one its manifest records it
    was exported from (lineage, not vouched for). Equals ``sha256`` for a source format."""
    source_format: str
    """``saelens``, ``sparsify``, ``gemmascope``, ``gemmascope2``, ``llamascope``, ``openai``,
    ``goodfire`` or ``artifact``."""
    weight_dtype: str
    """The dtype the full encoder runs in: ``fp32``, ``fp16`` or ``int8``."""
    feature_labels: Mapping[int, str]
    neuronpedia_id: str | None = None
    """``model/<layer>-<set>``: where Neuronpedia keeps the SAE's feature pages (from its
    SAELens cfg, converted folder's cfg or artifact manifest); None when nothing says."""
    hook_name_out: str | None = None
    """Transcoders only: the hook their decoder writes ("" when the files do not name it);
    the features are still served on ``hook_name``. None for an SAE."""
    d_out: int | None = None
    """Transcoders only: the width of what their decoder writes. None for an SAE."""


class Sae:
    """An opened SAE: makes encoders over chosen features and hands out decoder rows."""

    def __init__(
        self,
        model: SaeModel,
        *,
        source_format: str,
        weight_dtype: Literal["fp32", "fp16", "int8"],
        providers: Sequence[str],
        threads: int | None = None,
        feature_labels: Mapping[int, str] | None = None,
        prebuilt_encoder: Path | None = None,
        prebuilt_encoder_sha256: str | None = None,
        sha256: str | None = None,
        rows_per_run: int = 0,
    ) -> None:
        """``sha256``: the identity of what is served (None: ``model.sha256``, the source
        weights'); ``prebuilt_encoder_sha256``: the hash ``prebuilt_encoder`` was verified
        against at load, checked again when the encoder is built from it; ``rows_per_run``:
        the most rows each encoder hands ONNX Runtime at once (0: automatic, see
        :class:`guard.sae.encoder.Encoder`)."""
        self.model = model
        self.info = SaeInfo(
            hook_name=model.hook_name,
            d_in=model.d_in,
            d_sae=model.d_sae,
            architecture=model.architecture.name,
            sha256=model.sha256 if sha256 is None else sha256,
            source_sha256=model.sha256,
            source_format=source_format,
            weight_dtype=weight_dtype,
            feature_labels=MappingProxyType(dict(feature_labels or {})),
            neuronpedia_id=model.neuronpedia_id,
            hook_name_out=model.decoder.hook_name_out,
            d_out=model.decoder.d_out if model.decoder.is_transcoder else None,
        )
        self.providers = list(providers)
        self._threads = threads
        self._rows_per_run = rows_per_run
        self._prebuilt_encoder = prebuilt_encoder
        self._prebuilt_encoder_sha256 = prebuilt_encoder_sha256
        self._encoders: dict[tuple[tuple[int, ...] | None, bool], Encoder] = {}
        self._lock = threading.Lock()
        self._input_limit: float | None = None

    @property
    def input_limit(self) -> float:
        """The largest magnitude any value of an input row may have: within it, no
        intermediate of the full encoder (every feature, subscribed or not) can overflow
        float32, so the engine refuses rows beyond it before any encode, full or subset.

        Derived once from the weights (computed on first use; :func:`open_sae` does it at
        load): for each feature ``j``, ``max|z| * L1_j * max(1, gain_j) + |b_j|`` must stay
        within float32's largest value over ``4 * d_in`` (room for rounding and int8
        scaling), where ``L1_j`` is the L1 norm of column ``j`` of ``W_enc`` and ``z`` the
        normalised row; SAEs that normalise rows also need the row's sum of squares finite;
        fp16 graphs also need ``z`` within float16's range (65504). See docs/saes.md.
        """
        limit = self._input_limit
        if limit is None:
            with self._lock:
                if self._input_limit is None:
                    self._input_limit = self.model.input_limit(self.info.weight_dtype)
                limit = self._input_limit
        return limit

    def encoder(
        self, feature_ids: Sequence[int] | None = None, *, approximate_topk: bool = False
    ) -> Encoder:
        """An encoder over ``feature_ids`` (None: all features), built once and cached.

        Standard, JumpReLU and gated SAEs get a graph over just those columns, exact. TopK
        SAEs run the full encoder and select the columns, because whether a feature survives
        depends on every other feature of the row; ``approximate_topk`` instead computes only
        the columns and reports ``relu(pre-activation)`` (see ``guard.sae.architectures.topk``).
        """
        columns = self._columns(feature_ids)
        approximate = (
            approximate_topk and columns is not None and not self.model.architecture.exact_subsets
        )
        key = (None if columns is None else tuple(int(c) for c in columns), approximate)
        with self._lock:
            encoder = self._encoders.get(key)
            if encoder is None:
                encoder = self._build(columns, approximate)
                self._encoders[key] = encoder
        return encoder

    def decoder_directions(self, feature_ids: Sequence[int]) -> NDArray[np.float32]:
        """``[k, d_in]`` rows of ``W_dec`` (with any per-feature decode scale folded in):
        what one unit of each feature adds to the reconstruction, for steering. Refused
        (InvalidInput) for a transcoder, whose decoder writes another hook."""
        self.model.check_steerable()
        columns = self._columns(feature_ids)
        ids = np.arange(self.info.d_sae) if columns is None else columns
        return np.ascontiguousarray(self.model.decoder.w_dec[ids], dtype=np.float32)

    def decode(
        self, feature_acts: NDArray[np.float32], x: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """Reconstruct rows from full activations (``x``: the encoded rows, needed by SAEs that
        normalise their input or have a skip connection)."""
        return self.model.decode(feature_acts, x)

    def _columns(self, feature_ids: Sequence[int] | None) -> NDArray[np.int64] | None:
        if feature_ids is None:
            return None
        ids = np.asarray(list(feature_ids))
        if ids.size == 0:
            raise InvalidInput("feature_ids: expected at least one feature id")
        if ids.dtype.kind not in "iu":
            raise InvalidInput(f"feature_ids: expected integer ids, found {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.info.d_sae)]
        if bad.size:
            raise NotFound(
                f"feature {int(bad[0])} of SAE at {self.info.hook_name}: expected an id in "
                f"[0, d_sae={self.info.d_sae})"
            )
        columns = ids.astype(np.int64)
        if len(columns) == self.info.d_sae and (columns == np.arange(self.info.d_sae)).all():
            return None
        return columns

    def _build(self, columns: NDArray[np.int64] | None, approximate: bool) -> Encoder:
        dtype = self.info.weight_dtype
        graph: onnx.ModelProto | Path
        full_matmul = columns is None or not (
            self.model.architecture.exact_subsets or approximate
        )
        if columns is None and self._prebuilt_encoder is not None:
            # Read at first use, possibly long after load: check it is still what was verified.
            if self._prebuilt_encoder_sha256 is not None:
                verify_file(self._prebuilt_encoder, self._prebuilt_encoder_sha256)
            graph = self._prebuilt_encoder
        else:
            # int8 pays off only on the full matmul; a few columns stay exact in float32.
            if dtype == "int8" and not full_matmul:
                dtype = "fp32"
            if dtype == "int8":
                graph = quantize_int8(self.model.encoder_model(columns, "fp32", for_int8=True))
            else:
                graph = self.model.encoder_model(
                    columns, "fp16" if dtype == "fp16" else "fp32", approximate_topk=approximate
                )
        session = create_session(graph, self.providers, self._threads)
        ids = np.arange(self.info.d_sae) if columns is None else columns
        # A full matmul computes every feature of each row, a subset graph only its columns.
        encoder = Encoder(session, ids, self.info.d_in, rows_per_run=self._rows_per_run,
                          width=self.info.d_sae if full_matmul else len(ids))
        log.info(
            "sae.encoder_ready",
            hook=self.info.hook_name,
            features=encoder.n_features,
            approximate_topk=approximate,
            weight_dtype=dtype,
            provider=encoder.execution_provider,
        )
        if self.providers[0] == CUDA and encoder.execution_provider != CUDA:
            log.warning(
                "sae.cuda_unavailable",
                hook=self.info.hook_name,
                requested=self.providers,
                running_on=encoder.execution_provider,
            )
        return encoder


def open_sae(
    path: str | os.PathLike[str],
    *,
    hook: str | None = None,
    sha256: str | None = None,
    dtype: WeightDtype = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    require_hook: bool = True,
    rows_per_run: int = 0,
) -> Sae:
    """Open an SAE or transcoder: an exported artifact folder, a SAELens folder, a sparsify
    layer folder, a Gemma Scope ``params.npz`` or Gemma Scope 2 ``params.safetensors`` (or a
    folder holding one), a Llama Scope folder, or a folder ``guard sae convert`` wrote (see
    docs/saes.md for each format's conventions).

    :param hook: overrides the hook name found in the files.
    :param require_hook: False: files that name no hook open with an empty hook name
        (encoding rows offline needs none; serving does).
    :param sha256: pin (``sha256:`` prefix and case ignored); a different hash refuses to
        load. For a source format it is the weights file's sha256; for an artifact the
        sha256 of its ``manifest.json`` (printed by ``guard sae export``), which vouches for
        every file of the artifact. An artifact refuses a pin on the weights it was exported
        from: its manifest only claims that hash, and anyone editing the folder can copy it.
    :param dtype: ``auto`` keeps an artifact's dtype and otherwise picks fp16 on CUDA and
        fp32 on CPU; an explicit dtype different from an artifact's rebuilds the encoder
        from the artifact's float32 weights.
    :param providers: ONNX Runtime execution providers; None means CUDA when onnxruntime-gpu
        sees a GPU, else CPU.
    :param threads: ONNX Runtime intra-op threads per session (None: its default).
    :param rows_per_run: the most rows an encoder hands ONNX Runtime in one run, which bounds
        the graph's intermediates (``saes[].max_rows_per_encode``; 0: automatic).
    """
    if dtype not in _DTYPES:
        raise InvalidInput(f"dtype: expected one of {list(_DTYPES)}, found {dtype!r}")
    weights_sha256: str | None = None
    if sha256 is not None:
        # The pin is checked on the raw bytes first: a file that is not the pinned one is
        # never parsed (a compressed archive can expand far beyond its size).
        pinned_file, artifact = identity_file(path)
        found = sha256_of_files([pinned_file])
        _check_pin(pinned_file, found, sha256, artifact=artifact)
        weights_sha256 = None if artifact else found
    loaded = load_any(path, hook, require_hook=require_hook, weights_sha256=weights_sha256)
    model = loaded.model if isinstance(loaded, Artifact) else loaded
    identity = loaded.sha256 if isinstance(loaded, Artifact) else model.sha256
    if sha256 is not None:  # an artifact's loader reads and hashes its manifest once more
        _check_pin(model.weights_file, identity, sha256, artifact=isinstance(loaded, Artifact))
    chosen = resolve_providers(providers)
    prebuilt: Path | None = None
    prebuilt_sha256: str | None = None
    labels: Mapping[int, str] = {}
    resolved: Literal["fp32", "fp16", "int8"]
    if dtype == "auto":
        if isinstance(loaded, Artifact):
            resolved = _artifact_dtype(loaded.weight_dtype)
        else:
            resolved = "fp16" if chosen[0] == CUDA else "fp32"
    else:
        resolved = dtype
    if isinstance(loaded, Artifact):
        labels = loaded.feature_labels
        if resolved == loaded.weight_dtype:
            prebuilt = loaded.encoder_path
            prebuilt_sha256 = loaded.files[ENCODER_FILE]
    sae = Sae(
        model,
        source_format="artifact" if isinstance(loaded, Artifact) else model.source_format,
        weight_dtype=resolved,
        providers=chosen,
        threads=threads,
        feature_labels=labels,
        prebuilt_encoder=prebuilt,
        prebuilt_encoder_sha256=prebuilt_sha256,
        sha256=identity,
        rows_per_run=rows_per_run,
    )
    log.info(
        "sae.opened",
        path=str(path),
        hook=sae.info.hook_name,
        architecture=sae.info.architecture,
        d_in=sae.info.d_in,
        d_sae=sae.info.d_sae,
        source_format=sae.info.source_format,
        weight_dtype=resolved,
        providers=chosen,
        sha256=sae.info.sha256,
        source_sha256=sae.info.source_sha256,
        # Transcoders: the hook their decoder writes, and its width (None for SAEs).
        hook_out=sae.info.hook_name_out,
        d_out=sae.info.d_out,
        # Computed here, at load; None when unbounded (no weights).
        input_limit=float(f"{sae.input_limit:.3g}") if np.isfinite(sae.input_limit) else None,
    )
    if chosen[0] == CPU and resolved == "fp16":
        log.warning("sae.fp16_on_cpu", hook=sae.info.hook_name, note="fp16 gains nothing on CPU")
    return sae


def _artifact_dtype(value: str) -> Literal["fp32", "fp16", "int8"]:
    if value == "fp16":
        return "fp16"
    if value == "int8":
        return "int8"
    return "fp32"


def _check_pin(pinned_file: Path, identity: str, pinned: str, *, artifact: bool) -> None:
    """Refuse unless ``pinned`` is ``identity`` (see :attr:`SaeInfo.sha256`), the sha256 of
    ``pinned_file`` (an artifact's manifest, a source format's weights file)."""
    expected = pinned.strip().lower().removeprefix("sha256:")
    if expected == identity:
        return
    problem = f"sha256 expected {expected} (pinned), found {identity}: refusing to load"
    if artifact and expected == recorded_source_sha256(pinned_file):
        problem += (
            f"; the pin is the sha256 of the weights this artifact records it was exported "
            f"from, which {MANIFEST_FILE} only claims: pin the artifact itself, {identity} "
            f"(the sha256 of {MANIFEST_FILE}, printed by guard sae export)"
        )
    elif artifact:
        problem += f" (an artifact's sha256 is that of its {MANIFEST_FILE})"
    raise SaeFileError(pinned_file, problem)
