"""The SAE runtime: read SAELens, sparsify and Gemma Scope SAEs, export them to ONNX, and
encode activation rows on ONNX Runtime, computing only the features in use.

>>> sae = open_sae("saes/layer6", sha256=pin)            # doctest: +SKIP
>>> enc = sae.encoder([12, 345])                         # doctest: +SKIP
>>> acts = enc.encode(rows)  # [rows, 2] float32         # doctest: +SKIP
"""

from __future__ import annotations

from guard.sae.encoder import Encoder
from guard.sae.sae import Sae, SaeInfo, WeightDtype, open_sae

__all__ = ["Encoder", "Sae", "SaeInfo", "WeightDtype", "open_sae"]
