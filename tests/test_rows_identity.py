"""One conversation, two paths, the same rows (issue 22): what calibration fits a detector on
(``guard.audit.rank.collect_activations`` and ``shadow_prompts``) is what a real ``guard serve``
hands the detector when the demo host (``ChatService``: ``guard.host.chat.render`` and the
transformers attach over the host SDK) sends the same conversation: the same positions, token
ids and roles, the same feature activations, and the same detector scores.

The guard runs SmolLM2's embedded SAE with two always-firing linear detectors (the demo's
jailbreak weights, threshold far below any score): one reading the default rows, one reading
``all``; the ``BatchRecorder`` plugin (installed by entry point, as a user's plugin is) writes
the feature batches the plugins were handed when the guard drains.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard import FeatureBatch, RowRole
from guard.host.attach import attach
from guard.recording import load_batches
from tests.sidecar import Sidecar

models = pytest.importorskip("guard.models.smollm2")
pytest.importorskip("transformers")
try:
    models.smollm2_gguf_dir()
except models.ModelUnavailable as exc:  # pragma: no cover - make test installs it
    pytest.skip(f"SmolLM2 not installed: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow

HOOK = "blocks.15.hook_resid_post"
PROMPT = "How do I convert Celsius to Fahrenheit?"


def _demo() -> tuple[dict[str, Any], Path]:
    """The demo's config (its jailbreak detector and SAE entry) and its defaults folder."""
    base = Path(str(resources.files("guard").joinpath("defaults")))
    return yaml.safe_load((base / "demo.yaml").read_text(encoding="utf-8")), base


def detector_blocks() -> dict[str, dict[str, Any]]:
    # the calibrated SAE-feature linear detector (the demo ships the raw-residual probe)
    shipped = _demo()[1] / "detectors" / "jailbreak.yaml"
    jailbreak = yaml.safe_load(shipped.read_text(encoding="utf-8"))[
        "plugins"]["config"]["detectors"]["jailbreak-linear"]
    probe = {**jailbreak, "threshold": -1e9, "action": "flag"}  # always fires: a score
    return {"content": dict(probe), "every-row": {**probe, "rows": "all"}}


def install_recorder(site: Path) -> Path:
    """A ``.dist-info`` declaring ``guard.recording:BatchRecorder`` as the ``batch_recorder``
    plugin (``guard serve`` finds it by entry point with ``site`` on its path)."""
    info = site / "guard_recorder-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: guard-recorder\nVersion: 0.0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[guard]\nbatch_recorder = guard.recording:BatchRecorder\n", encoding="utf-8")
    return site


@dataclasses.dataclass(frozen=True)
class Served:
    batches: list[FeatureBatch]
    findings: dict[str, Any]
    features: list[int]


@dataclasses.dataclass(frozen=True)
class Calibrated:
    acts: Any
    shadow: Any


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    model, tokenizer = models.load_smollm2()
    return model, tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smollm2: tuple[Any, Any]) -> Served:
    from guard.demo.chat_server import ChatRequest, ChatService
    from guard.host import GuardClient

    model, tokenizer = smollm2
    demo, base = _demo()
    work = tmp_path_factory.mktemp("identity")
    blocks = detector_blocks()
    features = sorted(int(f) for f in blocks["content"]["weights"])
    recorded = work / "batches.npz"
    (sae,) = demo["saes"]
    config = {
        "saes": [{"path": str((base / sae["path"]).resolve()), "sha256": sae["sha256"]}],
        "plugins": {"enabled": ["detectors", "batch_recorder"], "timeout_ms": 60_000,
                    "config": {"detectors": blocks,
                               "batch_recorder": {"hook": HOOK, "features": features,
                                                  "path": str(recorded), "token_ids": True}}},
    }
    sidecar = Sidecar(work / "guard", config, plugin_site=install_recorder(work / "site"),
                      tag="identity")
    sidecar.start(120)
    try:
        with GuardClient(sidecar.address, hooks=[HOOK], deadline_ms=60_000) as client:
            attachment = attach(model, client, [HOOK])
            try:
                service = ChatService(model, tokenizer, attachment)
                request = ChatRequest(({"role": "user", "content": PROMPT},), max_tokens=1,
                                      temperature=0.0, stream=False)
                *_, (_, generation) = service.generate(request)
                verdicts = list(attachment.verdicts)
            finally:
                attachment.detach()
    finally:
        sidecar.stop(grace=60)  # a drain: the recorder writes its file at shutdown
    assert generation.aborted is None
    (verdict,) = verdicts  # one forward pass (the prompt), one hook
    assert verdict.source == "guard", verdict.reason
    return Served(load_batches(recorded), {f.detector: f for f in verdict.findings}, features)


@pytest.fixture(scope="module")
def calibrated(smollm2: tuple[Any, Any]) -> Calibrated:
    from guard.audit.calibrate import shadow_prompts
    from guard.audit.rank import collect_activations
    from guard.sae import open_sae

    model, tokenizer = smollm2
    demo, base = _demo()
    sae = open_sae(base / demo["saes"][0]["path"], providers=["CPUExecutionProvider"])
    acts = collect_activations([PROMPT], [0], model, tokenizer, sae, max_tokens=None)
    return Calibrated(acts, shadow_prompts(detector_blocks(), acts))


@pytest.fixture
def batch(served: Served) -> FeatureBatch:
    (only,) = served.batches  # the prompt's rows, in one batch
    return only


def test_the_detector_gets_the_same_rows_with_the_same_roles(
        batch: FeatureBatch, calibrated: Calibrated, smollm2: tuple[Any, Any]) -> None:
    acts = calibrated.acts
    n = len(acts.tokens[0])
    np.testing.assert_array_equal(batch.positions, np.arange(1, n + 1))
    assert batch.token_ids is not None and batch.roles is not None
    np.testing.assert_array_equal(batch.token_ids, acts.token_ids_of(0))
    np.testing.assert_array_equal(batch.roles, acts.roles_of(0))
    user = batch.roles == RowRole.USER
    question = smollm2[1](PROMPT, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(batch.token_ids[user], question)  # the rest: the template
    assert set(batch.roles[~user].tolist()) == {RowRole.TEMPLATE}


def test_the_feature_activations_are_the_same(batch: FeatureBatch, calibrated: Calibrated,
                                              served: Served) -> None:
    expected = calibrated.acts.rows_of(0)[:, served.features]
    # bit for bit: the same model forward (one prompt, no padding) and the same encoder
    np.testing.assert_array_equal(batch.columns(served.features), expected)


def test_the_scores_are_the_same(served: Served, calibrated: Calibrated) -> None:
    for name in ("content", "every-row"):
        assert served.findings[name].score == float(calibrated.shadow.scores[name][0]), name
    # what calibration fits the linear detector on (the mean over the chosen rows) gives the
    # served score: bias + w . mean_acts
    block = detector_blocks()["content"]
    weights = {int(f): float(w) for f, w in block["weights"].items()}
    fitted = block["bias"] + sum(w * float(calibrated.acts.mean_acts[0, f])
                                 for f, w in weights.items())
    assert served.findings["content"].score == pytest.approx(fitted, rel=1e-4, abs=1e-4)
    # and reading only the content rows is what changes the score, not noise
    assert abs(served.findings["content"].score - served.findings["every-row"].score) > 1.0


def test_the_finding_names_only_the_rows_it_read(served: Served, batch: FeatureBatch) -> None:
    assert batch.roles is not None
    user_positions = tuple(int(p) for p in batch.positions[batch.roles == RowRole.USER])
    assert served.findings["content"].positions == user_positions
    assert served.findings["every-row"].positions == tuple(int(p) for p in batch.positions)
