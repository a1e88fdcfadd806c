"""The README's plugin example runs as shown."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np

from guard.engine.plugins import PluginSet, PluginSource
from guard.testing import make_feature_batch

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_the_readme_detector_is_short_and_works() -> None:
    code = _snippet("### Your own detector in under 30 lines")
    assert len(code.strip().splitlines()) < 30
    module = types.ModuleType("my_detector")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    plugins = PluginSet([PluginSource("my_detector", "0.1", module.MyDetector)])
    settings = {"my_detector": {"hook": "blocks.6.hook_resid_post", "feature": 12}}
    plugins.configure(settings)
    (request,) = plugins.subscriptions(settings)
    assert (request.hook, list(request.feature_ids)) == ("blocks.6.hook_resid_post", [12])
    batch = make_feature_batch(hook="blocks.6.hook_resid_post", feature_ids=[12],
                               activations=np.array([0.2, 1.5, 0.9], dtype=np.float32),
                               positions=[4, 5, 6])
    findings, failures = plugins.detect(batch)
    assert failures == []
    (finding,) = findings
    assert (finding.detector, finding.score, finding.positions) == ("my_detector", 1.5, (5,))
