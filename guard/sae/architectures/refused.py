"""Architectures the guard refuses, by their SAELens names, with the reason the error gives.

An encoder the guard serves is one fixed ONNX graph over one activation row. These are not:

- ``temporal`` (SAELens ``temporal_sae.py``): its codes come from causal attention over the
  earlier tokens of the sequence (the "predicted" part is subtracted before the sparse
  encode), so a row's features depend on rows the guard may never see, in an order a batch
  does not carry.
- ``matching_pursuit`` (``matching_pursuit_sae.py``): the encoder is a loop that picks one
  latent at a time and stops when the residual is small or the support repeats, so how many
  steps it runs depends on the row: no fixed graph computes it.

And two names SAELens uses only while training: BatchTopK and Matryoshka BatchTopK SAEs
(``batchtopk_sae.py``, ``matryoshka_batchtopk_sae.py``) select the top ``k * rows`` of a whole
batch, which depends on the batch; SAELens saves them for inference (``save_inference_model``)
as ``jumprelu`` with the learned threshold broadcast to every latent, which the guard reads.
"""

from __future__ import annotations

from guard.sae.registry import refuse_architecture

_NOT_A_FIXED_GRAPH = "cannot be exported to a fixed ONNX graph over one activation row: "
_TRAINING_ONLY = (
    "a training checkpoint: its activation selects the top k * rows of a whole batch, so a "
    "row's features would depend on the batch. SAELens saves these SAEs for inference "
    "(SAE.save_inference_model, run at the end of training) as architecture 'jumprelu' with "
    "the learned threshold broadcast to every latent: export that folder instead"
)

refuse_architecture(
    "temporal",
    _NOT_A_FIXED_GRAPH + "a temporal SAE attends over the earlier tokens of the sequence (its "
    "predicted codes come from causal attention), so a row's features depend on other rows",
)
refuse_architecture(
    "matching_pursuit",
    _NOT_A_FIXED_GRAPH + "matching pursuit picks latents one at a time until the residual is "
    "small or the support repeats, so the number of steps depends on the data",
)
refuse_architecture("batchtopk", _TRAINING_ONLY)
refuse_architecture("matryoshka_batchtopk", _TRAINING_ONLY)
