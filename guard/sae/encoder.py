"""ONNX Runtime sessions for SAE encoders, and the thread-safe :class:`Encoder`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        self, session: ort.InferenceSession, feature_ids: NDArray[np.int64], d_in: int
    ) -> None:
        self._session = session
        ids = np.array(feature_ids, dtype=np.int64)
        ids.setflags(write=False)
        self.feature_ids: NDArray[np.int64] = ids
        self.d_in = d_in
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

    def encode(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Activations ``[rows, n_features]`` of C-contiguous float32 rows ``[rows, d_in]``,
        all rows in one run."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            found = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise InvalidInput(f"activation rows: expected float32, found {found}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InvalidInput(
                f"activation rows: expected shape [rows, {self.d_in}], found {list(x.shape)}"
            )
        if not x.flags.c_contiguous:
            raise InvalidInput("activation rows: expected a C-contiguous array")
        if x.shape[0] == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        if self._bound:
            return self._encode_bound(x)
        result: NDArray[np.float32] = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
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
        self._session.run_with_iobinding(binding)
        result: NDArray[np.float32] = binding.copy_outputs_to_cpu()[0]
        return result
