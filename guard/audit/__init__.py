"""Auditing a known failure mode: rank the SAE features that fire on it, calibrate detectors
with measured error rates, and run them in shadow mode before they may block.

``guard features rank``, ``guard detectors calibrate`` and ``guard detectors shadow`` (see
``docs/auditing.md``). Host side: running prompts needs torch and transformers (the
``host`` extra); the statistics and the config writer are NumPy only.
"""

from __future__ import annotations
