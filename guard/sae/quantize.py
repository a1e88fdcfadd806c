"""int8 weights through ONNX Runtime's dynamic quantization of the encoder's MatMul.

Weights become per-column int8; activations are quantized per batch at run time
(``DynamicQuantizeLinear``), which is why int8 graphs scale each row first
(``GraphBuilder.matmul``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose MatMul weights are int8."""
    with tempfile.TemporaryDirectory(prefix="guard-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, source)
        with _quiet_root_logger():
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
            )
        return onnx.load_model(target)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizer logs a "consider pre-processing" hint on the root logger for every call;
    # pre-processing (shape inference for conv nets) does nothing for a single MatMul.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
