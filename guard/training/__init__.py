"""Training SAEs on a model's residual stream (``guard sae train``) and the text corpora it
reads. All torch of the SAE tooling lives here, beside the ONNX runtime in :mod:`guard.sae`."""
