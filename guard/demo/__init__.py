"""``guard demo``: the sidecar and a guarded SmolLM2 chat server on a laptop, the demo's
trace walk and its loopback OTLP receiver. Host side (imports torch): never on the sidecar path."""
