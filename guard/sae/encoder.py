"""ONNX Runtime sessions for SAE encoders, and the thread-safe :class:`Encoder`.

An encoder runs a batch in chunks of at most ``rows_per_run`` rows (``saes[].
max_rows_per_encode``), so the graph's intermediates (``[rows, d_sae]`` float32
pre-activations and what TopK, JumpReLU or gated SAEs derive from them) are bounded by the
chunk, not by the batch: rows are encoded independently, so the result is the same. Each run
asks ONNX Runtime to shrink its CPU arena afterwards (``memory.enable_memory_arena_shrinkage``):
without it the arena keeps the largest allocation it ever made (measured: 2.7 GB resident
after two rounds of three concurrent unchunked [14563, 576] batches of a 4608-feature TopK
SAE, against 0.35 GB at the peak chunked and shrunk). See docs/operations.md (Memory).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
import structlog
from numpy.typing import NDArray

from guard.errors import ConfigError, InvalidInput
from guard.sae.graph import INPUT_NAME, OUTPUT_NAME

log = structlog.get_logger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

#: ``rows_per_run`` 0 (automatic) picks the most rows whose ``[rows, width]`` float32
#: intermediate fits in this many bytes (910 rows of a 4608-feature SAE, 170 of a
#: 24576-feature one): measured on CPU, chunks of this size encode as fast as whole batches or
#: faster (4096 rows of the 4608-feature SAE: 24,000 rows/s in chunks of 256 to 1024 rows,
#: 18,000 in one run; 2048 rows of a 768 x 24576 one: 2,400 rows/s in chunks of 170, 1,600 in
#: one run), while intermediates stay a few tens of MiB.
AUTO_CHUNK_BYTES: Final = 16 * 1024 * 1024
#: What one run holds besides its output, as a multiple of one ``[rows, width]`` float32
#: array (measured on CPU: 0 for standard, 1 for TopK, 3.4 for JumpReLU and gated graphs):
#: what :meth:`Encoder.peak_bytes` counts per row of a chunk, with room to spare.
INTERMEDIATE_COPIES: Final = 4
#: Run option that returns the CPU arena's free memory to the system after each run.
_SHRINK_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")


def auto_rows_per_run(width: int) -> int:
    """The automatic chunk size for a graph computing ``width`` values per row."""
    return max(1, AUTO_CHUNK_BYTES // (4 * max(1, width)))


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Explicit providers: CUDA then CPU when onnxruntime-gpu sees a GPU, else CPU."""
    available = ort.get_available_providers()
    if providers is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    chosen = list(providers)
    for provider in chosen:
        if provider not in available:
            raise ConfigError("sae.providers", f"one of {available}", provider)
    if not chosen:
        raise ConfigError("sae.providers", "at least one execution provider", chosen)
    return chosen


def create_session(
    model: onnx.ModelProto | Path, providers: Sequence[str], threads: int | None
) -> ort.InferenceSession:
    """A session on ``providers``; ``threads`` None keeps ONNX Runtime's default pool size."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    # One node at a time: the graph is a chain, and parallel branches would only fight
    # the matmul for the same cores.
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: on a small pod the sidecar's gRPC and
    # plugin threads need those cores between batches, and measured here spinning did not
    # make the next run faster (bench/sae_encode.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=list(providers))


class Encoder:
    """Feature activations for a fixed list of features of one SAE.

    ``encode`` may be called from several threads at once: ONNX Runtime sessions allow
    concurrent ``run`` calls, and the CUDA path keeps its I/O binding per thread.
    """

    def __init__(
        self, session: ort.InferenceSession, feature_ids: NDArray[np.int64], d_in: int, *,
        rows_per_run: int = 0, width: int | None = None,
    ) -> None:
        """``width``: the values the graph computes per row (the SAE's ``d_sae`` for a full
        or exact TopK encoder, the subset's size for a subset graph; None: the output's);
        ``rows_per_run``: the most rows per ONNX Runtime run (0: :func:`auto_rows_per_run`)."""
        self._session = session
        ids = np.array(feature_ids, dtype=np.int64)
        ids.setflags(write=False)
        self.feature_ids: NDArray[np.int64] = ids
        self.d_in = d_in
        if rows_per_run < 0:
            raise ValueError(f"rows_per_run: expected 0 (automatic) or more, found "
                             f"{rows_per_run}")
        #: Values computed per row by the graph; the input normalisation's intermediates are
        #: ``d_in`` wide, so never less than that.
        self.width = max(len(ids) if width is None else width, d_in)
        #: The most rows one ONNX Runtime run encodes.
        self.rows_per_run = rows_per_run or auto_rows_per_run(self.width)
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry(*_SHRINK_ARENA)
        self.execution_provider: str = session.get_providers()[0]
        """The provider that actually runs the graph (first of ``session.get_providers()``)."""
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != "tensor(float)":
            raise ValueError(f"encoder graph must take one float32 input {INPUT_NAME!r}")
        if [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ValueError(f"encoder graph must have one output {OUTPUT_NAME!r}")
        self._bound = self.execution_provider == CUDA
        self._local = threading.local()

    @property
    def n_features(self) -> int:
        return len(self.feature_ids)

    def peak_bytes(self, rows: int) -> int:
        """About the most memory encoding ``rows`` rows holds at once: the float32 output
        ``[rows, n_features]`` and one chunk's intermediates (``INTERMEDIATE_COPIES`` arrays
        of ``[min(rows, rows_per_run), width]`` float32)."""
        chunk = min(rows, self.rows_per_run)
        return 4 * (rows * self.n_features + INTERMEDIATE_COPIES * chunk * self.width)

    def encode(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Activations ``[rows, n_features]`` of C-contiguous float32 rows ``[rows, d_in]``,
        in runs of at most ``rows_per_run`` rows (the same values as one run: rows are
        encoded independently; int8 graphs quantize activations per run, as they do per
        batch)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            found = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise InvalidInput(f"activation rows: expected float32, found {found}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InvalidInput(
                f"activation rows: expected shape [rows, {self.d_in}], found {list(x.shape)}"
            )
        if not x.flags.c_contiguous:
            raise InvalidInput("activation rows: expected a C-contiguous array")
        rows = x.shape[0]
        if rows == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        step = self.rows_per_run
        if rows <= step:
            return self._run(x)
        result = np.empty((rows, self.n_features), dtype=np.float32)
        for start in range(0, rows, step):
            # A slice of whole rows of a C-contiguous array is C-contiguous: no copy.
            result[start:start + step] = self._run(x[start:start + step])
        return result

    def _run(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._bound:
            return self._encode_bound(x)
        result: NDArray[np.float32] = self._session.run(
            [OUTPUT_NAME], {INPUT_NAME: x}, self._run_options)[0]
        return result

    def _encode_bound(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        # CUDA: bind the host input (copied in during the run) and a device output buffer
        # kept per thread and reused while the batch size stays the same.
        local: Any = self._local
        binding = getattr(local, "binding", None)
        if binding is None:
            binding = local.binding = self._session.io_binding()
            local.rows = -1
        if local.rows != x.shape[0]:
            local.output = ort.OrtValue.ortvalue_from_shape_and_type(
                [x.shape[0], self.n_features], np.float32, "cuda", 0
            )
            local.rows = x.shape[0]
            binding.bind_ortvalue_output(OUTPUT_NAME, local.output)
        binding.bind_cpu_input(INPUT_NAME, x)
        self._session.run_with_iobinding(binding, self._run_options)
        result: NDArray[np.float32] = binding.copy_outputs_to_cpu()[0]
        return result
