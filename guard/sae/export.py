"""``guard sae export``: write an artifact folder and report its accuracy against fp32."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import onnx
from numpy.typing import NDArray

from guard.errors import SaeFileError
from guard.sae.encoder import CPU, Encoder, create_session
from guard.sae.formats import Artifact, load_any
from guard.sae.formats.artifact import MANIFEST_FILE, parse_feature_labels, write_artifact
from guard.sae.formats.fields import read_json_object
from guard.sae.labels import read_feature_labels
from guard.sae.model import SaeModel
from guard.sae.neuronpedia import parse_neuronpedia_id
from guard.sae.quantize import quantize_int8
from guard.sae.safetensors import sha256_of_files

ExportDtype = Literal["fp32", "fp16", "int8"]

# Above this many weights (about 16 MB of fp32 W_enc) an export takes long enough to show
# progress.
PROGRESS_MIN_WEIGHTS = 4 * 1024 * 1024
SAMPLE_ROWS = 256


@dataclasses.dataclass(frozen=True)
class AccuracyReport:
    """How far an encoder's activations are from a float32 reference on sample rows."""

    reference: str
    rows: int
    max_abs_error: float
    flip_rate: float
    """Fraction of (row, feature) on/off states (activation > 0) that differ."""
    active_fraction: float
    """Fraction of (row, feature) pairs active in the reference (context for flip_rate)."""

    def as_dict(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)

    def line(self, dtype: str) -> str:
        return (
            f"accuracy of {dtype} vs {self.reference} on {self.rows} rows: max abs error "
            f"{self.max_abs_error:.3g}, on/off flips {self.flip_rate:.4%} "
            f"(reference active fraction {self.active_fraction:.4%})"
        )


def compare(
    reference: NDArray[np.float32], candidate: NDArray[np.float32], name: str
) -> AccuracyReport:
    on_ref, on_cand = reference > 0, candidate > 0
    return AccuracyReport(
        reference=name,
        rows=int(reference.shape[0]),
        max_abs_error=float(np.abs(reference.astype(np.float64) - candidate).max(initial=0.0)),
        flip_rate=float(np.mean(on_ref != on_cand)) if reference.size else 0.0,
        active_fraction=float(np.mean(on_ref)) if reference.size else 0.0,
    )


def synthetic_rows(model: SaeModel, rows: int = SAMPLE_ROWS, seed: int = 0) -> NDArray[np.float32]:
    """Rows shaped like what the SAE models: ``b_dec`` plus a few decoder directions with
    exponential magnitudes, plus a little noise. Real activations (``--sample``) are better;
    these keep the report meaningful without them.

    A transcoder's decoder writes another hook, so its rows are no input: there each row
    follows a few encoder columns instead (``W_enc[:, j] / |W_enc[:, j]|^2``, which adds about
    the drawn magnitude to feature ``j``'s pre-activation)."""
    rng = np.random.default_rng(seed)
    per_row = min(16, model.d_sae)
    if model.decoder.is_transcoder:
        x = np.zeros((rows, model.d_in), dtype=np.float64)
        for i in range(rows):
            chosen = np.sort(rng.choice(model.d_sae, size=per_row, replace=False))
            columns = np.asarray(model.architecture.w_enc[:, chosen], dtype=np.float64).T
            square = np.square(columns).sum(axis=1, keepdims=True)
            directions = np.divide(columns, square, out=np.zeros_like(columns), where=square > 0)
            x[i] = rng.exponential(2.0, size=per_row) @ directions
        rms = float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
        x += rng.normal(0.0, 0.1 * rms, size=x.shape)
        return x.astype(np.float32)
    w_dec = model.decoder.w_dec
    scale = float(np.sqrt(np.mean(np.square(w_dec[: min(1024, model.d_sae)], dtype=np.float64))))
    x = np.repeat(model.decoder.b_dec[None, :].astype(np.float64), rows, axis=0)
    for i in range(rows):
        chosen = rng.choice(model.d_sae, size=per_row, replace=False)
        x[i] += rng.exponential(2.0, size=per_row) @ w_dec[chosen]
    x += rng.normal(0.0, scale, size=x.shape)
    return x.astype(np.float32)


class Progress:
    """A one-line stderr progress bar over export stages (no dependency, no tty needed)."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 24) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.started = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.stream is None:
            return
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        print(
            f"[{bar}] {self.done}/{self.total} {what} ({elapsed:.1f}s)",
            file=self.stream,
            flush=True,
        )


def read_labels(path: Path, d_sae: int) -> dict[int, str]:
    """A JSON object mapping feature ids to labels: ``{"12": "deception"}``."""
    return parse_feature_labels(path, read_json_object(path), d_sae)


LabelPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def encoder_graph(model: SaeModel, dtype: ExportDtype) -> onnx.ModelProto:
    """The full encoder in ``dtype``."""
    if dtype == "int8":
        return quantize_int8(model.encoder_model(None, "fp32", for_int8=True))
    return model.encoder_model(None, dtype)


def export_artifact(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: ExportDtype,
    labels: LabelPaths | None = None,
    hook: str | None = None,
    sample: NDArray[np.float32] | None = None,
    force: bool = False,
    stream: TextIO | None,
    neuronpedia_id: str | None = None,
) -> AccuracyReport:
    """Export ``source`` (any format :func:`guard.sae.open_sae` reads) to an artifact folder.

    Prints progress (large SAEs), the accuracy report and the artifact's sha256 (the sha256
    of its ``manifest.json``: what ``saes[].sha256`` pins, see
    ``guard.sae.formats.artifact``) to ``stream`` (None: silent); returns the report.

    ``labels``: a ``{"12": "deception"}`` JSON file, or Neuronpedia explanation exports
    (``.jsonl``/``.jsonl.gz`` files or folders of them) kept for the SAE's ``neuronpedia_id``
    (see ``guard.sae.labels``); ``neuronpedia_id`` sets that id (recorded in the manifest)
    where the source has none or another.
    """
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise SaeFileError(
            target, "output exists and is not an empty folder (use --force to replace)"
        )
    started = time.perf_counter()
    loaded = load_any(source, hook)
    model = loaded.model if isinstance(loaded, Artifact) else loaded
    feature_labels: Mapping[int, str] = (
        loaded.feature_labels if isinstance(loaded, Artifact) else {}
    )
    if neuronpedia_id is not None:
        model_id, source_id = parse_neuronpedia_id(neuronpedia_id, "--neuronpedia-id")
        model = dataclasses.replace(model, neuronpedia_id=f"{model_id}/{source_id}")
    if labels is not None:
        paths = ([Path(labels)] if isinstance(labels, str | os.PathLike)
                 else [Path(p) for p in labels])
        label_set = read_feature_labels(paths, model.d_sae, neuronpedia_id=model.neuronpedia_id)
        feature_labels = label_set.labels
        if model.neuronpedia_id is None and label_set.neuronpedia_id is not None:
            model = dataclasses.replace(model, neuronpedia_id=label_set.neuronpedia_id)
        if stream is not None:
            print(label_set.summary(), file=stream, flush=True)
    large = model.d_in * model.d_sae >= PROGRESS_MIN_WEIGHTS
    progress = Progress(4, stream if large else None)
    progress.started = started
    progress.step(f"read {model.architecture.name} SAE {model.d_in}x{model.d_sae}")

    graph = encoder_graph(model, dtype)
    encoder_bytes = graph.SerializeToString()
    progress.step(f"built the {dtype} encoder graph ({len(encoder_bytes) / 1e6:.1f} MB)")

    rows = sample if sample is not None else synthetic_rows(model)
    candidate = _encode_once(graph, model, rows)
    if dtype == "fp32":
        # The fp32 graph's own reference is the NumPy encode of the same canonical weights.
        report = compare(model.encode(rows), candidate, "NumPy fp32 reference")
    else:
        reference = _encode_once(model.encoder_model(None, "fp32"), model, rows)
        report = compare(reference, candidate, "fp32 ONNX encoder")
    progress.step("measured accuracy")

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent.resolve()))
    try:
        write_artifact(
            staging,
            model,
            encoder_bytes,
            weight_dtype=dtype,
            feature_labels=feature_labels,
            accuracy=report.as_dict(),
        )
        artifact_sha256 = sha256_of_files([staging / MANIFEST_FILE])
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.step(f"wrote {target}")
    if stream is not None:
        print(report.line(dtype), file=stream, flush=True)
        print(
            f"artifact sha256 {artifact_sha256} (of {MANIFEST_FILE}, which records every "
            "file's): pin this as saes[].sha256, not the source weights' sha256",
            file=stream,
            flush=True,
        )
    return report


def _encode_once(
    graph: onnx.ModelProto, model: SaeModel, rows: NDArray[np.float32]
) -> NDArray[np.float32]:
    encoder = Encoder(create_session(graph, [CPU], None), np.arange(model.d_sae), model.d_in)
    return encoder.encode(np.ascontiguousarray(rows, dtype=np.float32))
