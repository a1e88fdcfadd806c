"""bench/steps.py at a tiny scale: both guards start (the demo config and a small random SAE in
place of the 4096x32768 one), every case runs, and every ratio is reported.

No timed assertion (these machines are shared and noisy): the ratios are only checked to be
there and finite. The one assertion on content is not about time: each request's verdict in
a step is what its rows get when sent alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two real `guard serve` processes, about half a minute

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_steps_benchmark_runs_and_reports_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.steps", "--rounds", "1", "--scale", "0.05",
         "--large-d-in", "256", "--large-d-sae", "1024", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for row in ("one 33-request batch / 33 batches, through the sidecar (INLINE), [96, 576]",
                "MONITOR through the sidecar / in process, 32-request steps [32, 256]",
                "INLINE p50 through the sidecar / in process, 32-request step [32, 576]",
                "a vectorised hook would save"):
        assert row in run.stdout, run.stdout
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert set(results) == {"576", "256"}
    for result in results.values():
        for ratio in ("split_sidecar", "split_in_process", "monitor", "monitor_metered",
                      "inline", "loop_share", "vectorised_saving"):
            assert math.isfinite(result[ratio]), (ratio, result[ratio])
        assert result["split_sidecar"] > 0 and result["monitor"] > 0 and result["inline"] > 0
        assert set(result["dispatch_ms"]) >= {"step", "encode", "hooks", "handoff", "engine"}
        assert result["verdicts_compared"] == 2 * 33
        assert result["verdicts_disagreeing"] == 0
