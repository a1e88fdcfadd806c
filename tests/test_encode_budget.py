"""Memory bounds of encoding (issue 19, finding 1): encodes run in chunks of rows with the
same results, a guard-wide budget admits, queues or refuses batches, and three maximum-size
batches at once stay within a stated memory bound in a real ``guard serve``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from numpy.typing import NDArray
from structlog.testing import capture_logs

from guard.config import DEFAULT_MAX_MESSAGE_BYTES, parse_config
from guard.engine.budget import EncodeBudget, EncodeBudgetExhausted
from guard.engine.core import Engine
from guard.errors import ConfigError
from guard.host import GuardClient, Verdict
from guard.sae import Sae, open_sae
from guard.sae.encoder import INTERMEDIATE_COPIES, auto_rows_per_run
from guard.sae.export import ExportDtype, export_artifact
from guard.sidecar.process import GuardProcess
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from tests.conftest import D_IN, D_SAE, StreamClient, make_batch, make_config
from tests.sae_fixtures import random_gated_weights, random_jumprelu_weights, write_saelens
from tests.sidecar import poll, short_socket

DEMO_SAE = (Path(__file__).resolve().parent.parent / "guard" / "defaults" / "saes"
            / "smollm2-135m-instruct" / "blocks.15.hook_resid_post")
DEMO_HOOK = "blocks.15.hook_resid_post"
MIB = 1024 * 1024


def _rows(n: int, d_in: int, seed: int = 3) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0.0, 1.0, size=(n, d_in)).astype(np.float32)


# -- chunks of rows: the same features as one run ----------------------------------------


def _saelens(folder: Path, arch: str, d_in: int = 24, d_sae: int = 96) -> Path:
    weights = {"jumprelu": random_jumprelu_weights,
               "gated": random_gated_weights}.get(arch)
    return write_saelens(folder, d_in, d_sae, architecture=arch,
                         extra_cfg={"k": 6} if arch == "topk" else None,
                         weights=weights(d_in, d_sae) if weights else None)


def _assert_chunks_change_nothing(source: Path) -> None:
    """Every encoder of the SAE (all features, an exact subset, an approximate TopK subset)
    gives the same bytes in runs of 7 rows as in one run of all 50."""
    chunked = open_sae(source, rows_per_run=7)
    whole = open_sae(source, rows_per_run=10_000)
    x = _rows(50, chunked.info.d_in)
    for features, approximate in ((None, False), ([0, 5, 41, 77], False), ([3, 9], True)):
        small = chunked.encoder(features, approximate_topk=approximate)
        big = whole.encoder(features, approximate_topk=approximate)
        assert (small.rows_per_run, big.rows_per_run) == (7, 10_000)
        np.testing.assert_array_equal(small.encode(x), big.encode(x))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_chunked_encode_equals_one_run(tmp_path: Path, arch: str) -> None:
    _assert_chunks_change_nothing(_saelens(tmp_path / arch, arch))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_chunked_encode_of_an_exported_artifact(tmp_path: Path, dtype: ExportDtype) -> None:
    _saelens(tmp_path / "src", "topk")
    export_artifact(tmp_path / "src", tmp_path / "out", dtype=dtype, stream=None)
    _assert_chunks_change_nothing(tmp_path / "out")


def test_the_demo_sae_encodes_in_automatic_chunks_with_the_same_result() -> None:
    sae = open_sae(DEMO_SAE)
    encoder = sae.encoder()
    # 16 MiB of float32 features per chunk: 910 rows of 4608 features.
    assert encoder.rows_per_run == auto_rows_per_run(4608) == 910
    assert encoder.width == 4608
    x = _rows(2000, sae.info.d_in)  # three runs: 910, 910, 180
    whole = open_sae(DEMO_SAE, rows_per_run=4096).encoder()
    np.testing.assert_array_equal(encoder.encode(x), whole.encode(x))
    # A TopK subset still computes every feature: its intermediates are d_sae wide.
    subset = sae.encoder([3725])
    assert (subset.width, subset.rows_per_run) == (4608, 910)
    assert subset.peak_bytes(14563) == 4 * (14563 + INTERMEDIATE_COPIES * 910 * 4608)


def test_subset_graphs_count_only_their_columns(tmp_path: Path) -> None:
    sae: Sae = open_sae(_saelens(tmp_path / "std", "standard", d_in=24, d_sae=96))
    subset = sae.encoder([1, 2, 3])
    assert subset.width == 24  # three columns, but the input's d_in is wider
    full = sae.encoder()
    assert full.width == 96 and full.peak_bytes(10) == 4 * (10 * 96 + 4 * 10 * 96)


# -- the budget itself ------------------------------------------------------------------


def test_a_batch_larger_than_the_budget_is_refused_at_once() -> None:
    budget = EncodeBudget(1000, wait_seconds=3600)  # waiting would hang the test
    with pytest.raises(EncodeBudgetExhausted) as caught, budget.hold(1001, "batch of 9 rows"):
        pass
    message = str(caught.value)
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert "batch of 9 rows" in message and "1001 bytes" in message
    assert "server.max_inflight_encode_bytes (1000 bytes" in message
    assert (budget.in_use, budget.counts.refused_too_large) == (0, 1)


def test_a_batch_waits_for_room_then_goes_through() -> None:
    budget = EncodeBudget(100, wait_seconds=3600)
    admitted = threading.Event()

    def second() -> None:
        with budget.hold(70, "second"):
            admitted.set()

    with budget.hold(60, "first"):
        thread = threading.Thread(target=second)
        thread.start()
        poll(lambda: budget.waiting == 1, 10, "the second batch to queue")
        assert not admitted.is_set() and budget.in_use == 60
    thread.join(10)
    assert admitted.is_set() and budget.in_use == 0
    assert (budget.counts.admitted, budget.counts.waited, budget.counts.peak_bytes) == (2, 1, 70)


def test_waiters_are_served_in_arrival_order() -> None:
    """A small batch that would fit does not overtake a large one waiting before it."""
    budget = EncodeBudget(100, wait_seconds=3600)
    order: list[str] = []
    release = threading.Event()

    def take(name: str, nbytes: int) -> None:
        with budget.hold(nbytes, name):
            order.append(name)
            release.wait(10)

    with budget.hold(60, "first"):
        large = threading.Thread(target=take, args=("large", 50))
        large.start()
        poll(lambda: budget.waiting == 1, 10, "the large batch to queue")
        small = threading.Thread(target=take, args=("small", 10))
        small.start()
        poll(lambda: budget.waiting == 2, 10, "the small batch to queue")
        assert order == [] and budget.in_use == 60  # 60 + 10 would fit: it still waits
    poll(lambda: len(order) == 2, 10, "both batches to be admitted")
    assert order == ["large", "small"] and budget.in_use == 60
    release.set()
    large.join(10)
    small.join(10)
    assert budget.in_use == 0


def test_a_batch_that_waits_too_long_is_refused_naming_the_keys() -> None:
    budget = EncodeBudget(100, wait_seconds=0.05)
    with budget.hold(80, "first"), pytest.raises(EncodeBudgetExhausted) as caught, \
            budget.hold(30, "batch of 3 rows for hook 'h'"):
        pass
    message = str(caught.value)
    assert message.startswith("batch of 3 rows for hook 'h': encoding it needs about 30 bytes")
    assert "server.max_inflight_encode_bytes (100 bytes" in message
    assert "server.encode_queue_seconds (0.05 s)" in message
    assert "(80 bytes" in message  # what the batches in progress held
    assert budget.waiting == 0 and budget.in_use == 0
    assert budget.counts.refused_timeout == 1
    with budget.hold(100, "after"):  # the refused batch left nothing behind
        assert budget.in_use == 100


# -- configuration ------------------------------------------------------------------------


def test_budget_keys_are_read_and_checked(tmp_path: Path) -> None:
    text = (f"server:\n  max_inflight_encode_bytes: 1048576\n  encode_queue_seconds: 0.5\n"
            f"saes:\n  - path: {tmp_path}\n    max_rows_per_encode: 256\n")
    config = parse_config(text, env={})
    assert config.server.max_inflight_encode_bytes == MIB
    assert config.server.encode_queue_seconds == 0.5
    assert config.saes[0].max_rows_per_encode == 256
    defaults = parse_config(f"saes:\n  - path: {tmp_path}\n", env={})
    assert defaults.server.max_inflight_encode_bytes == 512 * MIB
    assert defaults.saes[0].max_rows_per_encode == 0
    bad = {
        "server:\n  max_inflight_encode_bytes: 0\n": "server.max_inflight_encode_bytes",
        "server:\n  encode_queue_seconds: -1\n": "server.encode_queue_seconds",
        f"saes:\n  - path: {tmp_path}\n    max_rows_per_encode: -3\n":
            "saes[0].max_rows_per_encode: expected a whole number of rows",
        f"saes:\n  - path: {tmp_path}\n    max_rows_per_encode: yes\n":
            "saes[0].max_rows_per_encode",
    }
    for text, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_config(text, env={})


def test_start_up_warns_when_the_largest_batch_cannot_fit() -> None:
    """Every feature of the SmolLM2 SAE: a maximum-size batch in F16 (29127 rows) needs
    576 MiB, over the default budget; the operator hears it at start."""
    encoder = open_sae(DEMO_SAE).encoder()
    with capture_logs() as logs:
        EncodeBudget().warn_unless_fits({DEMO_HOOK: encoder, "unused": None},
                                        DEFAULT_MAX_MESSAGE_BYTES)
        EncodeBudget(1024 * MIB).warn_unless_fits({DEMO_HOOK: encoder},
                                                  DEFAULT_MAX_MESSAGE_BYTES)
    (warning,) = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["event"] == "encode budget below the largest batch"
    assert warning["hook"] == DEMO_HOOK and warning["rows"] == 29127
    assert warning["needs_bytes"] == encoder.peak_bytes(29127) > 512 * MIB
    fits = warning["rows_that_fit"]
    assert encoder.peak_bytes(fits) <= 512 * MIB < encoder.peak_bytes(fits + 1)


# -- a served guard: refusals are per batch, the stream goes on --------------------------

#: What a row of the test SAE (d_in 16, d_sae 64, every feature) counts against the budget:
#: its 64 features and 4 intermediates of 64 float32 (one chunk holds every row).
PER_ROW = 4 * (D_SAE + INTERMEDIATE_COPIES * D_SAE)


@pytest.fixture
def small_budget_server(tmp_path: Path, sae_dir: Path) -> Iterator[GuardServer]:
    """A guard whose budget fits 100 rows of the test SAE; a batch never waits long."""
    config = make_config(tmp_path, sae_dir, max_inflight_encode_bytes=100 * PER_ROW,
                         encode_queue_seconds=3600)
    server = GuardServer(config)
    server.start()
    server.set_ready(Engine.load(config))
    yield server
    server.stop(0)


def _with_segments(batch: pb.ActivationBatch, *rows: int) -> pb.ActivationBatch:
    batch.request_id = ""
    for index, count in enumerate(rows):
        batch.segments.add(request_id=f"r{index}", rows=count, phase=pb.PHASE_PROMPT)
    return batch


def test_a_served_batch_above_the_budget_gets_resource_exhausted(
        small_budget_server: GuardServer) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    with grpc.insecure_channel(small_budget_server.addresses[0]) as channel:
        client = StreamClient(channel)
        client.configure()
        # A distinctive value: no error text may quote the rows.
        rows = np.full((101, D_IN), 1234.5, dtype=np.float32)
        reply = client.ask(make_batch(rows, sequence=1))
        assert reply.error.code == exhausted, reply
        message = reply.error.message
        assert "batch of 101 rows for hook 'blocks.6.hook_resid_post'" in message
        assert f"{101 * PER_ROW} bytes" in message
        assert f"server.max_inflight_encode_bytes ({100 * PER_ROW} bytes" in message
        assert "1234" not in message
        # The stream goes on: a batch within the budget is decided.
        reply = client.ask(make_batch(n_rows=100, sequence=2))
        assert not reply.HasField("error") and reply.action == pb.ACTION_CONTINUE
        # A step (several requests' rows) is held to the same budget, as one batch.
        step = client.ask(_with_segments(make_batch(n_rows=101, sequence=3), 60, 41))
        assert step.error.code == exhausted and "101 rows" in step.error.message
        step = client.ask(_with_segments(make_batch(n_rows=100, sequence=4), 60, 40))
        assert not step.HasField("error")
        assert client.rest() == []


# -- three maximum-size batches at once in a real guard serve ----------------------------

#: Rows of the largest batch the default server.max_message_bytes lets through for d_in 576.
MAX_ROWS = DEFAULT_MAX_MESSAGE_BYTES // (576 * 4)  # 14563
#: The bound on the guard's peak memory growth while three such batches are in flight:
#: server.max_inflight_encode_bytes (512 MiB by default) for the encodes, about three copies
#: of each 32 MiB message in flight (gRPC's buffer, the parsed message, its bytes: 3 x 3 x
#: 32 MiB = 288 MiB), less slack than that: 768 MiB. Before the budget the same run grew by
#: 1.4 to 1.65 GB (every batch's [14563, 4608] intermediates at once, kept by the arena).
PEAK_GROWTH_BOUND = 768 * MIB


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in bytes (VmHWM: the peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _demo_sae_config(tmp_path: Path, socket: Path) -> Path:
    """The SmolLM2 SAE (d_model 576, 4608 TopK features) with every feature encoded, one
    detector reading one of them, and every server limit at its default."""
    config: dict[str, Any] = {
        "server": {"listen": f"unix://{socket}"},
        "plugins": {"autoload": False, "enabled": ["detectors"], "config": {"detectors": {
            "food": {"type": "threshold", "hook": DEMO_HOOK, "features": [3725],
                     "threshold": 0.5, "action": "log"}}}},
        "saes": [{"path": str(DEMO_SAE), "features": "all"}],
    }
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_three_maximum_size_batches_at_once_stay_within_the_memory_bound(
        tmp_path: Path) -> None:
    socket = short_socket("budget")
    with GuardProcess(_demo_sae_config(tmp_path, socket), f"unix://{socket}") as guard:
        clients = [GuardClient(f"unix://{socket}", hooks=[DEMO_HOOK], deadline_ms=300_000)
                   for _ in range(3)]
        try:
            warm = clients[0].inspect("warm-up", DEMO_HOOK, _rows(4, 576), range(4))
            assert warm.source == "guard", warm.reason
            before = _status(guard.pid, "VmHWM")
            rows = _rows(MAX_ROWS, 576)
            verdicts: list[Verdict | None] = [None] * 3

            def send(index: int) -> None:
                verdicts[index] = clients[index].inspect(f"max-{index}", DEMO_HOOK, rows,
                                                         range(MAX_ROWS))

            threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            peak = _status(guard.pid, "VmHWM")
            assert guard.running, guard.log_tail()
            decided = 0
            for verdict in verdicts:
                assert verdict is not None
                if verdict.source == "guard":
                    decided += 1
                else:  # queued longer than server.encode_queue_seconds on a slow machine
                    assert verdict.cause == "error", verdict
                    assert "RESOURCE_EXHAUSTED" in verdict.reason
                    assert "server.max_inflight_encode_bytes" in verdict.reason
            assert decided >= 1
            growth = peak - before
            assert growth < PEAK_GROWTH_BOUND, (
                f"the guard's peak resident memory grew by {growth / MIB:.0f} MiB (from "
                f"{before / MIB:.0f} MiB), above {PEAK_GROWTH_BOUND / MIB:.0f} MiB")
            # It still serves, every stream.
            for index, client in enumerate(clients):
                after = client.inspect(f"after-{index}", DEMO_HOOK, _rows(8, 576), range(8))
                assert after.source == "guard", after.reason
        finally:
            for client in clients:
                client.close()
