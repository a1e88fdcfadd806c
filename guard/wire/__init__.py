"""The wire: tensors as bytes (KServe v2 / Triton convention) and length-prefixed frames.

Knows nothing of SAEs, plugins or the server; both the sidecar and the host SDK use it."""
