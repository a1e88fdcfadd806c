"""The soak of bench/soak.py, short: 4 INLINE and 1 MONITOR host streams for 10 seconds against a
real ``guard serve`` (576x4608 SAE, detectors, decision log), then a SIGTERM drain.

Asserted: no errors (no policy verdict, no rejected batch, no exception), exit code 0, and
every decision the hosts received in the decision log exactly once. Throughput and latency
are reported, never asserted (these machines are shared and noisy). RSS growth is asserted
only against a loose bound, see RSS_BOUND_PCT.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.soak import SoakOptions, report, run_soak

pytestmark = pytest.mark.slow  # a real process for about 12 s

#: RSS growth from the first seconds after the warm-up to the last, in percent. A 10 s run
#: measures two windows of under 2 s each, while the allocator's arenas are still settling and
#: the record queue may back up on a loaded machine (bounded: at most
#: ``plugins.record_queue_size`` small records, about 10% of the guard's RSS here): a tight
#: bound would be flaky. 25% still catches a leak of what the hot path handles by the
#: megabyte (activations kept per batch: a 7 s measured window of about 2,000 rows/s of
#: 576 floats is over 30 MB, more than 20% of the guard's ~140 MiB). The 5% target belongs to
#: the long run (``python -m bench.soak``, bench/RESULTS.md).
RSS_BOUND_PCT = 25.0


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "doorbell"])
def test_short_soak_no_errors_and_every_decision_logged_once(tmp_path: Path,
                                                            shared_memory: bool) -> None:
    """The rows as gRPC bytes, or in shared memory with the batches on the doorbell."""
    result = run_soak(SoakOptions(streams=4, monitor_streams=1, seconds=10.0, warmup=3.0,
                                  shared_memory=shared_memory), tmp_path)
    print(report(result))  # shown with -s, and kept in the log of a failed run
    assert result.errors == 0, result.error_examples
    assert result.exit_code == 0
    assert result.decisions_received > 0
    assert result.missing == [] and result.duplicated == []
    assert result.logged_not_received == 0
    assert result.records_dropped == 0
    assert math.isfinite(result.rss_growth_pct)
    assert result.rss_growth_pct < RSS_BOUND_PCT, report(result)
